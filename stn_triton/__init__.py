"""stn-triton: fused Triton kernels for Spatial Transformer Networks (Jaderberg et al., 2015)."""

from ._backend import backend
from .functional import (ArgumentError, ArgumentTypeError, affine_sample, basis_sample, flow_sample, grid_sample,
                         projective_sample)
from .modules import SpatialTransformer, spatial_transform

__all__ = ["ArgumentError", "ArgumentTypeError", "SpatialTransformer", "affine_sample", "backend", "basis_sample", "flow_sample", "grid_sample", "projective_sample",
           "spatial_transform"]
__version__ = "0.1.0"
