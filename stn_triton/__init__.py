"""stn-triton: fused Triton kernels for Spatial Transformer Networks (Jaderberg et al., 2015)."""

from ._backend import backend
from .functional import (ArgumentError, ArgumentTypeError, affine_sample, basis_sample, flow_sample, grid_sample,
                         projective_sample)
from .export import ExportError, decompositions
from .modules import SpatialTransformer, spatial_transform
from .ops import FamilyKernelError
from .registration import FlowWarp, compose_flows, integrate_velocity

__all__ = ["ArgumentError", "ArgumentTypeError", "ExportError", "FamilyKernelError", "FlowWarp", "SpatialTransformer",
           "affine_sample", "backend", "basis_sample", "compose_flows", "decompositions", "flow_sample", "grid_sample",
           "integrate_velocity", "projective_sample", "spatial_transform"]
__version__ = "0.1.0"
