"""Explicit-grid form: the coordinate of pixel p is read from ``grid[n, k, i, j, :]`` (no fusion).

A drop-in for ``F.grid_sample`` and the path for any family that only knows its grid. The gradient
wrt the grid is :math:`\\bar g_{x,p}, \\bar g_{y,p}` itself, stored per pixel.
"""

import triton
import triton.language as tl


@triton.jit
def grid_coords(p_g, i, j, mask_p, s_gh, s_gw, s_gc):
    # p_g: grid at (n, k), any float dtype, strides s_gh, s_gw, s_gc; i, j: [BLOCK_P] int64 row, col
    off = i * s_gh + j * s_gw
    gx = tl.load(p_g + off, mask=mask_p, other=0.0).to(tl.float32)
    gy = tl.load(p_g + off + s_gc, mask=mask_p, other=0.0).to(tl.float32)
    return gx, gy
