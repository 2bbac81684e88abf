"""The family contract: what a transformation family is, as data the kernels understand.

A family maps parameters theta (N, num_params) to a sampling grid. The paper's generalisation is
``T_theta = M_theta B``: ``kernel_form`` says which fused kernel form serves the family, with M
(and B for the basis form). Pure PyTorch; no kernel is known here.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

KINDS = ("affine", "projective", "basis", "grid")


@dataclass
class KernelForm:
    """How a batch of theta becomes a fused kernel's input.

    kind: "affine" (m (N, 2, 3)), "projective" (m (N, 3, 3)), "basis" (m (N, 2, D) and
    basis (D, Ho*Wo)) or "grid" (m is the grid (N, Ho, Wo, 2)).

    A 3-D family (``ndim = 3``, for 5-D input) uses the same kinds one dimension up: "affine"
    (m (N, 3, 4)), "basis" (m (N, 3, D) and basis (D, Do*Ho*Wo)) or "grid" (m (N, Do, Ho, Wo, 3));
    there is no 3-D "projective".
    """

    kind: str
    m: torch.Tensor
    basis: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"KernelForm.kind: expected one of {KINDS}, got {self.kind!r}")
        if (self.kind == "basis") != (self.basis is not None):
            raise ValueError("KernelForm.basis: required for kind 'basis' and only for it")


def base_grid(size, align_corners, dtype=torch.float32, device=None):
    """The regular output grid in homogeneous coordinates, as ``F.affine_grid`` makes it: for
    ``size = (Ho, Wo)``, (3, Ho*Wo) rows [x, y, 1] (pixels row-major); for ``size = (Do, Ho, Wo)``,
    (4, Do*Ho*Wo) rows [x, y, z, 1] (voxels row-major: depth, row, column)."""
    nd = len(size)
    numel = 1
    for s in size:
        numel *= s
    if numel == 0:  # F.affine_grid refuses empty sizes
        return torch.empty(nd + 1, 0, dtype=dtype, device=device)
    eye = torch.eye(nd, nd + 1, dtype=dtype, device=device)[None]
    xy = torch.nn.functional.affine_grid(eye, (1, 1, *size), align_corners=align_corners).reshape(-1, nd)
    return torch.cat([xy, torch.ones_like(xy[:, :1])], dim=1).T


GRID_METHOD = "grid(theta, size, align_corners)"
FORM_METHOD = "kernel_form(theta, size, align_corners)"


def _defines(cls, method):
    """Whether ``cls`` has its own ``method`` (its own or a base class's other than TransformFamily's)."""
    return getattr(cls, method, None) is not getattr(TransformFamily, method)


def incomplete_family(cls):
    """Why the family class ``cls`` cannot map theta to a grid, or None when it can: a family must
    define ``grid`` or ``kernel_form`` (TransformFamily's defaults each call the other)."""
    name = getattr(cls, "__qualname__", repr(cls))
    if getattr(cls, "triton_coords", None) is not None and not _defines(cls, "grid"):
        return (f"{name} defines triton_coords but not {GRID_METHOD}; a family with its own Triton map must also "
                f"define {GRID_METHOD} in PyTorch (the CPU path, and the oracle its kernels are tested against)")
    if getattr(cls, "triton_grad", None) is not None and getattr(cls, "triton_coords", None) is None:
        return f"{name} defines triton_grad but not triton_coords, the map it is the gradient of"
    if _defines(cls, "grid") or _defines(cls, "kernel_form"):
        return None
    return (f"{name} defines neither {GRID_METHOD} nor {FORM_METHOD}; a TransformFamily must define one: "
            f"{GRID_METHOD} returning the sampling grid (N, Ho, Wo, 2) ((N, Do, Ho, Wo, 3) when ndim = 3), or "
            f"{FORM_METHOD} returning a KernelForm")


class TransformFamily(nn.Module):
    """Base class of every family. Subclasses set ``name`` and implement ``num_params``,
    ``identity`` and either ``grid(theta, size, align_corners)`` (then the explicit-grid kernel
    serves them) or ``kernel_form(theta, size, align_corners)`` (then ``grid`` follows from it).
    ``register_transform`` refuses a class that defines neither.

    ``ndim``: 2 for a family of 2-D transforms (4-D input (N, C, H, W), ``size = (Ho, Wo)``, grids
    (N, Ho, Wo, 2)), 3 for volumetric ones (5-D input (N, C, D, H, W), ``size = (Do, Ho, Wo)``,
    grids (N, Do, Ho, Wo, 3)). A family applied to an input of the other dimensionality is an error."""

    name: str = ""
    ndim: int = 2
    # A family may bring its map into the fused kernels as Triton code (stn_triton.kernels.plugin has the
    # contract): ``triton_coords`` a @triton.jit (p, x, y) -> (gx, gy) (3-D: (p, x, y, z) -> (gx, gy, gz)) from
    # theta's row p and the output pixel's normalised base coordinate; ``triton_grad`` (optional) a
    # @triton.jit (p, x, y, gx_bar, gy_bar) -> one dL/dtheta_i term per parameter. Such a family still
    # defines ``grid`` (the reference and the oracle), from theta alone.
    triton_coords = None
    triton_grad = None

    @property
    def num_params(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define num_params")

    def identity(self) -> torch.Tensor:
        """Parameters of the identity transform, 1-D of length num_params (to initialise the
        localisation network's regression layer, as the paper does)."""
        raise NotImplementedError(f"{type(self).__name__} must define identity()")

    def check_theta(self, theta):
        if not isinstance(theta, torch.Tensor) or not theta.is_floating_point():
            raise TypeError(f"theta: expected a floating-point tensor for family {self.name!r}")
        if theta.dim() != 2 or theta.shape[1] != self.num_params:
            raise ValueError(f"theta: family {self.name!r} takes {self.num_params} parameters, expected shape "
                             f"(N, {self.num_params}), got {tuple(theta.shape)}")

    def kernel_form(self, theta, size, align_corners=False) -> KernelForm:
        """Default: the explicit grid (no fusion of grid generation)."""
        if not _defines(type(self), "grid"):  # else grid() and kernel_form() call each other forever
            cls = type(self).__qualname__
            raise NotImplementedError(incomplete_family(type(self)) or (
                f"{cls}.kernel_form calls TransformFamily.kernel_form, which wraps the grid that {GRID_METHOD} "
                f"returns; {cls} does not define {GRID_METHOD}"))
        return KernelForm("grid", self.grid(theta, size, align_corners))

    def grid(self, theta, size, align_corners=False) -> torch.Tensor:
        """theta (N, num_params) -> normalised sampling grid (N, Ho, Wo, 2), pure PyTorch
        ((N, Do, Ho, Wo, 3) for a 3-D family, ``size = (Do, Ho, Wo)``)."""
        if not _defines(type(self), "kernel_form"):  # else grid() and kernel_form() call each other forever
            cls = type(self).__qualname__
            raise NotImplementedError(incomplete_family(type(self)) or (
                f"{cls}.grid calls TransformFamily.grid, which derives the grid from {FORM_METHOD}; {cls} does "
                f"not define {FORM_METHOD}, so its {GRID_METHOD} must compute the grid itself"))
        form = self.kernel_form(theta, size, align_corners)
        N = theta.shape[0]
        nd = len(size)
        if form.kind == "grid":
            return form.m
        if form.kind == "basis":
            return torch.einsum("ncd,dp->npc", form.m, form.basis).reshape(N, *size, nd)
        base = base_grid(size, align_corners, form.m.dtype, form.m.device)  # (nd + 1, P)
        out = torch.einsum("nij,jp->npi", form.m, base)
        if form.kind == "projective":
            out = out[..., :2] / out[..., 2:]
        return out.reshape(N, *size, nd)

    def extra_repr(self):
        extra = f", ndim={self.ndim}" if self.ndim != 2 else ""
        return f"name={self.name!r}, num_params={self.num_params}{extra}"
