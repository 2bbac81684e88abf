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


def _sanitize(grid, size_hw, padding_mode, align_corners):
    """Replace non-finite coordinates by finite ones with the same forward, and a zero gradient.

    Returns the grid to sample with and, for zeros padding, the mask of pixels that read anything.
    """
    H, W = size_hw
    scale = grid.new_tensor([(W - 1) / 2 if align_corners else W / 2,
                             (H - 1) / 2 if align_corners else H / 2])
    offset = grid.new_tensor([(W - 1) / 2, (H - 1) / 2])
    finite = torch.isfinite(grid)
    if padding_mode == "zeros":
        pix = grid * scale + offset
        ok = (finite & (pix.abs() < _FAR)).all(dim=-1)
        return torch.where(ok[..., None], grid, torch.zeros_like(grid)), ok
    if padding_mode == "border":
        # -2 and +2 lie beyond either border for both align_corners settings (clip -> 0 or size-1).
        far = torch.where(grid == float("inf"), 2.0, -2.0).to(grid.dtype)
    else:
        # Any point that reflects to pixel 0: the left border's centre (align_corners) or one
        # pixel beyond the left edge (not align_corners), whose reflection is pixel 0's centre.
        far = torch.full_like(grid, -1.0)
        if not align_corners:
            far = far - 1.0 / grid.new_tensor([W, H])
    return torch.where(finite, grid, far), None


def sample(x, grid, mode, padding_mode, align_corners):
    """x (N, C, H, W), grid (N, K, Ho, Wo, 2) -> (N, K, C, Ho, Wo), autograd-able."""
    N, C, H, W = x.shape
    K, Ho, Wo = grid.shape[1:4]
    compute = torch.float32 if (x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu") else x.dtype
    g, ok = _sanitize(grid.to(compute), (H, W), padding_mode, align_corners)
    xs = x.to(compute)[:, None].expand(N, K, C, H, W).reshape(N * K, C, H, W)
    out = F.grid_sample(xs, g.reshape(N * K, Ho, Wo, 2), mode=mode, padding_mode=padding_mode,
                        align_corners=align_corners)
    out = out.reshape(N, K, C, Ho, Wo)
    if ok is not None:
        out = torch.where(ok[:, :, None], out, torch.zeros_like(out))
    return out.to(x.dtype)


def form_grid(form, params, size, align_corners):
    """The grid of any form from its op-level parameters (see :mod:`stn_triton.ops`)."""
    if form == "affine":
        return affine_grid(params[0], size, align_corners)
    if form == "projective":
        return projective_grid(params[0], size, align_corners)
    if form == "basis":
        return basis_grid(params[0], params[1], size)
    return params[0]


def form_sample(form, x, params, size, mode, padding_mode, align_corners):
    """Reference forward of any form: x (N, C, H, W) -> (N, K, C, Ho, Wo)."""
    grid = form_grid(form, params, size, align_corners)
    return sample(x, grid, mode, padding_mode, align_corners)
