"""Projective form: ``[u, v, w] = H (3x3) @ [x_p, y_p, 1]``, coordinate ``(u / w, v / w)``.

.. math::

    g_x = u / w, \\qquad g_y = v / w

    \\bar u = \\bar g_x / w, \\qquad \\bar v = \\bar g_y / w, \\qquad
    \\bar w = -(\\bar g_x g_x + \\bar g_y g_y) / w

    \\frac{\\partial L}{\\partial h_{0j}} = \\sum_p \\bar u_p b_{j,p}, \\quad
    \\frac{\\partial L}{\\partial h_{1j}} = \\sum_p \\bar v_p b_{j,p}, \\quad
    \\frac{\\partial L}{\\partial h_{2j}} = \\sum_p \\bar w_p b_{j,p}, \\qquad b_p = [x_p, y_p, 1]

A pixel with ``w = 0`` has a non-finite coordinate: it reads nothing (zeros padding) and its
``bar u``, ``bar v``, ``bar w`` follow IEEE arithmetic, as autograd through the division does.
"""

import triton
import triton.language as tl


@triton.jit
def projective_coords(p_h, x, y):
    # p_h: float32 [9], H row-major for this (n, k); x, y: [BLOCK_P] base grid
    h0 = tl.load(p_h + 0)
    h1 = tl.load(p_h + 1)
    h2 = tl.load(p_h + 2)
    h3 = tl.load(p_h + 3)
    h4 = tl.load(p_h + 4)
    h5 = tl.load(p_h + 5)
    h6 = tl.load(p_h + 6)
    h7 = tl.load(p_h + 7)
    h8 = tl.load(p_h + 8)
    u = h0 * x + h1 * y + h2
    v = h3 * x + h4 * y + h5
    w = h6 * x + h7 * y + h8
    return u / w, v / w, w


@triton.jit
def projective_param_terms(a0, a1, a2, a3, a4, a5, a6, a7, a8, x, y, gx, gy, w, gg_x, gg_y, mask_p):
    # the nine per-pixel terms of dL/dH added to the running sums a0..a8 [BLOCK_P]; gx, gy, w from
    # projective_coords; mask_p: pixel exists
    g_u = tl.where(mask_p, gg_x / w, 0.0)
    g_v = tl.where(mask_p, gg_y / w, 0.0)
    g_w = tl.where(mask_p, -(gg_x * gx + gg_y * gy) / w, 0.0)
    return (a0 + g_u * x, a1 + g_u * y, a2 + g_u, a3 + g_v * x, a4 + g_v * y, a5 + g_v,
            a6 + g_w * x, a7 + g_w * y, a8 + g_w)
