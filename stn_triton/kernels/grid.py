"""Explicit-grid form: the coordinate of pixel p is read from ``grid[n, k, (d,) i, j, :]`` (no fusion).

A drop-in for ``F.grid_sample`` and the path for any family that only knows its grid. The gradient
wrt the grid is :math:`\\bar g_p` itself, stored per pixel (the kernels' ``WRITE_GG``); the form has
no parameter terms.
"""

import triton
import triton.language as tl


@triton.jit
def grid_coords(p_m, p_aux, p_pix, s_ac, q, b, mask_p, P, DM, frame, FN: tl.constexpr, NDIM: tl.constexpr):
    # p_pix: [BP] pointers to each pixel's (x, y[, z]) in the grid (any float dtype), s_ac apart
    gx = tl.load(p_pix, mask=mask_p, other=0.0).to(tl.float32)
    gy = tl.load(p_pix + s_ac, mask=mask_p, other=0.0).to(tl.float32)
    if NDIM == 3:
        gz = tl.load(p_pix + 2 * s_ac, mask=mask_p, other=0.0).to(tl.float32)
    else:
        gz = gx
    return (gx, gy, gz), gx


@triton.jit
def no_terms(acc, p_part, p_m, p_aux, q, mask_p, P, DM, b, g, w, gg, FN: tl.constexpr, NDIM: tl.constexpr):
    return acc


def explicit_grid(params, size, align_corners):
    return params[0]
