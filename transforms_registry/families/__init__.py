"""The built-in families; importing this package registers them."""

from .affine import Affine, Attention
from .piecewise_affine import PiecewiseAffine
from .projective import Projective
from .tps import ThinPlateSpline

__all__ = ["Affine", "Attention", "PiecewiseAffine", "Projective", "ThinPlateSpline"]
