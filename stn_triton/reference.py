"""Pure-PyTorch reference: the CPU path, the float64 path, and the test oracle.

Every form is written as "make the normalised grid, then ``F.grid_sample``", with the grid made by
``F.affine_grid`` (affine), its base grid and an ``einsum`` (projective, basis), or given (grid).

Semantics are PyTorch's ``grid_sample`` for every finite coordinate. For non-finite ones PyTorch's
CPU and CUDA kernels disagree (the CPU one returns NaN for NaN coordinates with zeros padding and can
crash in backward); we follow the CUDA kernel's forward, which the Triton kernels implement too:

- ``zeros``: a coordinate that is non-finite, or more than 2^30 pixels away, reads nothing (output 0);
- ``border``: NaN and -inf go to pixel 0, +inf to the last pixel;
- ``reflection``: NaN and +-inf go to pixel 0.

Gradients are those of this forward: such a coordinate gets gradient 0, and the input pixel it reads
receives the incoming gradient.

Bicubic pads each of its 16 taps, not the coordinate, and PyTorch's CUDA kernel gives NaN for a
non-finite coordinate in every padding mode (its taps read the pixels above, with NaN weights). We
keep the rules above instead, the pixels CUDA's taps read with a finite weight: ``zeros`` reads
nothing; ``border`` reads pixel 0 (NaN, -inf) or the last pixel (+inf) with weight 1; ``reflection``
reads pixel 0 with weight 1. The kernels do the same (:mod:`stn_triton.kernels.common`).
"""

import torch
import torch.nn.functional as F

import transforms_registry

_FAR = 2.0 ** 30


def base_grid(size, align_corners, dtype, device):
    """PyTorch's affine_grid base, homogeneous: (Ho*Wo, 3) rows [x_p, y_p, 1], row-major pixels."""
    return transforms_registry.base_grid(size, align_corners, dtype, device).T


def affine_grid(theta, size, align_corners):
    """theta (N, K, 2, 3) -> grid (N, K, Ho, Wo, 2)."""
    N, K = theta.shape[:2]
    if N * K * size[0] * size[1] == 0:  # F.affine_grid refuses empty sizes; the grid is empty either way
        return torch.einsum("nkij,pj->nkpi", theta, base_grid(size, align_corners, theta.dtype, theta.device)
                            ).reshape(N, K, *size, 2)
    g = F.affine_grid(theta.reshape(N * K, 2, 3), (N * K, 1, *size), align_corners=align_corners)
    return g.reshape(N, K, *size, 2)


def projective_grid(h, size, align_corners):
    """h (N, K, 3, 3) -> grid (N, K, Ho, Wo, 2), dividing by the third homogeneous coordinate."""
    N, K = h.shape[:2]
    uvw = torch.einsum("nkij,pj->nkpi", h, base_grid(size, align_corners, h.dtype, h.device))
    return (uvw[..., :2] / uvw[..., 2:]).reshape(N, K, *size, 2)


def basis_grid(m, basis, size):
    """m (N, K, 2, D), basis (D, Ho*Wo) -> grid (N, K, Ho, Wo, 2)."""
    N, K = m.shape[:2]
    return torch.einsum("nkcd,dp->nkpc", m, basis).reshape(N, K, *size, 2)


def _ordinary(grid, sizes):
    """Whether every coordinate of ``grid`` is finite and lies well within ``_FAR`` pixels of an
    image of ``sizes``: then sanitizing changes nothing and is skipped, one pass over the grid
    (``aminmax``, NaN propagating) instead of about ten. Eager plain CPU tensors only: elsewhere
    (a GPU, tracing, fake tensors) reading the answer back would cost a sync or break the trace."""
    if grid.numel() == 0 or type(grid) is not torch.Tensor or grid.device.type != "cpu" \
            or torch.compiler.is_compiling():
        return False
    lo, hi = torch.aminmax(grid)
    bound = _FAR / max(sizes) - 1  # |g| below it puts the pixel coordinate below _FAR for either alignment
    return bool(lo > -bound) and bool(hi < bound)


def _sanitize(grid, size, padding_mode, align_corners):
    """Replace non-finite coordinates by finite ones with the same forward, and a zero gradient.

    ``size``: the sampled image's (H, W) or volume's (D, H, W); the grid's last axis is (x, y[, z]),
    and the rules are the same on every axis. Returns the grid to sample with and, for zeros
    padding, the mask of pixels that read anything.
    """
    if _ordinary(grid, size):
        return grid, None
    sizes = grid.new_tensor(size[::-1])  # per grid axis: W, H[, D]
    scale = (sizes - 1) / 2 if align_corners else sizes / 2
    offset = (sizes - 1) / 2
    finite = torch.isfinite(grid)
    if padding_mode == "zeros":
        pix = grid * scale + offset
        ok = (finite & (pix.abs() < _FAR)).all(dim=-1)
        return torch.where(ok[..., None], grid, torch.zeros_like(grid)), ok
    if padding_mode == "border":
        # -4 and +4 lie beyond either border for both align_corners settings (clip -> 0 or size-1),
        # far enough that all four bicubic taps clip to that border too, at a whole or half pixel
        # (weights summing to exactly 1).
        far = torch.where(grid == float("inf"), 4.0, -4.0).to(grid.dtype)
    else:
        # Any point that reflects to pixel 0: the left border's centre (align_corners) or one
        # pixel beyond the left edge (not align_corners), whose reflection is pixel 0's centre
        # (bicubic: the tap there, of weight 1, reflects to pixel 0).
        far = torch.full_like(grid, -1.0)
        if not align_corners:
            far = far - 1.0 / sizes
    return torch.where(finite, grid, far), None


def sample(x, grid, mode, padding_mode, align_corners):
    """x (N, C, H, W), grid (N, K, Ho, Wo, 2) -> (N, K, C, Ho, Wo), or one dimension up: x (N, C, D,
    H, W), grid (N, K, Do, Ho, Wo, 3) -> (N, K, C, Do, Ho, Wo); autograd-able; any mode of
    ``F.grid_sample`` for the input's dimensions (4-D: bilinear, nearest, bicubic; 5-D: "bilinear"
    is trilinear, as PyTorch names it, and nearest)."""
    N, C, *size = x.shape
    K, out_size = grid.shape[1], grid.shape[2:-1]
    compute = torch.float32 if (x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu") else x.dtype
    g, ok = _sanitize(grid.to(compute), tuple(size), padding_mode, align_corners)
    xs = x.to(compute)[:, None].expand(N, K, C, *size).reshape(N * K, C, *size)
    out = F.grid_sample(xs, g.reshape(N * K, *out_size, grid.shape[-1]), mode=mode, padding_mode=padding_mode,
                        align_corners=align_corners)
    out = out.reshape(N, K, C, *out_size)
    if ok is not None:
        out = torch.where(ok[:, :, None], out, torch.zeros_like(out))
    return out.to(x.dtype)


def form_grid(form, params, size, align_corners):
    """The grid of any form, 2-D or 3-D, from its op-level parameters (see :mod:`stn_triton.ops`)."""
    if form in ("affine", "affine3d"):
        return (affine_grid3d if form == "affine3d" else affine_grid)(params[0], size, align_corners)
    if form == "projective":
        return projective_grid(params[0], size, align_corners)
    if form in ("basis", "basis3d"):
        return (basis_grid3d if form == "basis3d" else basis_grid)(params[0], params[1], size)
    return params[0]


def form_sample(form, x, params, size, mode, padding_mode, align_corners):
    """Reference forward of any form: x (N, C, H, W) -> (N, K, C, Ho, Wo); a 3-D form's x (N, C, D,
    H, W) -> (N, K, C, Do, Ho, Wo)."""
    grid = form_grid(form, params, size, align_corners)
    return sample(x, grid, mode, padding_mode, align_corners)


# --------------------------------------------------------------------------------------------------
# Volumetric (5-D) forms: input (N, C, D, H, W), grid (..., 3) with coordinates (x, y, z)
# --------------------------------------------------------------------------------------------------
# The same rules as the 2-D forms above (non-finite coordinates included), one dimension up. Forms
# "affine3d" (theta (N, K, 3, 4)), "basis3d" (m (N, K, 3, Dm), basis (Dm, Do*Ho*Wo)) and "grid3d"
# (grid (N, K, Do, Ho, Wo, 3)); every output is (N, K, C, Do, Ho, Wo).

FORMS_3D = ("affine3d", "basis3d", "grid3d")


def base_grid3d(size, align_corners, dtype, device):
    """PyTorch's 5-D affine_grid base, homogeneous: (Do*Ho*Wo, 4) rows [x_p, y_p, z_p, 1], voxels
    row-major (depth, then row, then column)."""
    return transforms_registry.base_grid(size, align_corners, dtype, device).T


def affine_grid3d(theta, size, align_corners):
    """theta (N, K, 3, 4) -> grid (N, K, Do, Ho, Wo, 3)."""
    N, K = theta.shape[:2]
    if N * K * size[0] * size[1] * size[2] == 0:  # F.affine_grid refuses empty sizes
        return torch.einsum("nkij,pj->nkpi", theta, base_grid3d(size, align_corners, theta.dtype, theta.device)
                            ).reshape(N, K, *size, 3)
    g = F.affine_grid(theta.reshape(N * K, 3, 4), (N * K, 1, *size), align_corners=align_corners)
    return g.reshape(N, K, *size, 3)


def basis_grid3d(m, basis, size):
    """m (N, K, 3, Dm), basis (Dm, Do*Ho*Wo) -> grid (N, K, Do, Ho, Wo, 3)."""
    N, K = m.shape[:2]
    return torch.einsum("nkcd,dp->nkpc", m, basis).reshape(N, K, *size, 3)
