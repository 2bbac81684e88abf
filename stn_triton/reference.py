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

import functools

import torch
import torch.nn.functional as F

import transforms_registry

from .kernels.forms import FORMS

_FAR = 2.0 ** 30


def base_grid(size, align_corners, dtype, device):
    """PyTorch's affine_grid base, homogeneous: (P, n + 1) rows [x_p, y_p, (z_p,) 1], pixels row-major,
    for an output ``size`` of n = 2 (Ho, Wo) or 3 (Do, Ho, Wo) axes."""
    return transforms_registry.base_grid(size, align_corners, dtype, device).T


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
    g = g.reshape(N * K, *out_size, grid.shape[-1])
    if mode == "bicubic" and x.dim() == 5 and not _torch_has_tricubic():
        out = tricubic(xs, g, padding_mode, align_corners)
    else:
        out = F.grid_sample(xs, g, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    out = out.reshape(N, K, C, *out_size)
    if ok is not None:
        out = torch.where(ok[:, :, None], out, torch.zeros_like(out))
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Tricubic sampling (``mode="bicubic"`` on 5-D input), for a torch whose grid_sample lacks it
# --------------------------------------------------------------------------------------------------

@functools.cache
def _torch_has_tricubic():
    """Whether this torch's ``F.grid_sample`` takes ``mode="bicubic"`` on 5-D input (newer ones do)."""
    try:
        F.grid_sample(torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 3), mode="bicubic", align_corners=False)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


def _cubic_weights(t):
    """PyTorch's cubic convolution weights (A = -0.75) of the taps at -1, 0, 1, 2 from ``floor(i)``,
    for the fraction ``t``: (..., 4)."""
    A = -0.75

    def near(s):  # |s| <= 1
        return ((A + 2) * s - (A + 3)) * s * s + 1

    def far(s):  # 1 < |s| < 2
        return ((A * s - 5 * A) * s + 8 * A) * s - 4 * A

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def _reflect(f, size, align_corners):
    """PyTorch's ``reflect_coordinates`` then the clip, for float coordinates ``f``."""
    lo, span = (0.0, size - 1.0) if align_corners else (-0.5, float(size))
    if span <= 0:
        return torch.zeros_like(f)
    t = (f - lo).abs()
    flips = torch.floor(t / span)
    extra = t - flips * span
    r = torch.where(flips % 2 == 0, extra + lo, span - extra + lo)
    return r.clamp(0, size - 1)


def tricubic(x, grid, padding_mode, align_corners):
    """x (N, C, D, H, W), grid (N, Do, Ho, Wo, 3) of finite coordinates -> (N, C, Do, Ho, Wo): the
    bicubic interpolation of PyTorch's 2-D ``grid_sample`` on each of three axes, written from its
    definition (64 taps, each padded on its own: ``get_value_bounded``). Autograd-able in x and grid."""
    N, C = x.shape[:2]
    sizes = x.shape[2:][::-1]  # W, H, D: the grid's axis order
    out_size = grid.shape[1:-1]
    taps = []
    for a, size in enumerate(sizes):
        g = grid[..., a].reshape(N, -1)
        i = ((g + 1) / 2) * (size - 1) if align_corners else ((g + 1) * size - 1) / 2
        f = torch.floor(i)
        w = _cubic_weights(i - f)
        q, m = [], []
        for b in range(4):
            t = (f - 1 + b).detach()
            if padding_mode == "border":
                t = t.clamp(0, size - 1)
            elif padding_mode == "reflection":
                t = _reflect(t, size, align_corners)
            m.append((t >= 0) & (t <= size - 1))
            q.append(t.clamp(0, size - 1).long())
        taps.append((q, m, w))
    (qx, mx, wx), (qy, my, wy), (qz, mz, wz) = taps
    W, H = sizes[0], sizes[1]
    flat = x.reshape(N, C, -1)
    out = 0
    for c in range(4):
        for b in range(4):
            for a in range(4):
                idx = (qz[c] * H + qy[b]) * W + qx[a]  # (N, P)
                vals = flat.gather(2, idx[:, None].expand(N, C, idx.shape[1]))
                wt = wx[..., a] * wy[..., b] * wz[..., c] * (mx[a] & my[b] & mz[c])
                out = out + vals * wt[:, None]
    return out.reshape(N, C, *out_size)


def form_grid(form, params, size, align_corners):
    """The grid of any form, 2-D or 3-D, from its op-level parameters (see :mod:`stn_triton.ops`):
    the form table's own reference (:mod:`stn_triton.kernels.forms`)."""
    return FORMS[form].grid(params, size, align_corners)


def form_sample(form, x, params, size, mode, padding_mode, align_corners):
    """Reference forward of any form: x (N, C, *in_size) -> (N, K, C, *size)."""
    grid = form_grid(form, params, size, align_corners)
    return sample(x, grid, mode, padding_mode, align_corners)
