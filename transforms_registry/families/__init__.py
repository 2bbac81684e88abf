"""The built-in families; importing this package registers them."""

from .affine import Affine, Attention
from .affine3d import Affine3d, Attention3d
from .piecewise_affine import PiecewiseAffine
from .projective import Projective
from .tps import ThinPlateSpline

__all__ = ["Affine", "Affine3d", "Attention", "Attention3d", "PiecewiseAffine", "Projective", "ThinPlateSpline"]
