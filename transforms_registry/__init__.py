"""Transformation families as data the kernels understand, and the plugin registry.

Pure PyTorch: a family says what T_theta is (``kernel_form``: M, and B where needed) and gives a
reference ``grid``; ``stn_triton`` owns the kernels.
"""

from .base import KernelForm, TransformFamily, base_grid
from .registry import ENTRY_POINT_GROUP, get_transform, list_transforms, load_plugins, register_transform
from . import families  # noqa: E402,F401  (registers the built-ins)

__all__ = ["ENTRY_POINT_GROUP", "KernelForm", "TransformFamily", "base_grid", "get_transform",
           "list_transforms", "load_plugins", "register_transform"]
