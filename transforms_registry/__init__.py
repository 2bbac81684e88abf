"""Transformation families as data the kernels understand, and the plugin registry.

Pure PyTorch: a family says what T_theta is (``kernel_form``: M, and B where needed) and gives a
reference ``grid``; ``stn_triton`` owns the kernels.

A family whose map is none of the kernel forms may bring it into the fused kernels as Triton code
(class attributes ``triton_coords`` and, optionally, ``triton_grad``; the contract, its constraints
and how such a family is tested are in :mod:`stn_triton.kernels.plugin` and the README's "Bring your
own map into the kernels"). It still defines ``grid``: the CPU path, and the oracle its Triton code is
tested against (the fused output and gradients must equal ``grid_sample`` on it).
"""

from .base import KernelForm, TransformFamily, base_grid
from .registry import ENTRY_POINT_GROUP, get_transform, list_transforms, load_plugins, register_transform
from . import families  # noqa: E402,F401  (registers the built-ins)

__all__ = ["ENTRY_POINT_GROUP", "KernelForm", "TransformFamily", "base_grid", "get_transform",
           "list_transforms", "load_plugins", "register_transform"]
