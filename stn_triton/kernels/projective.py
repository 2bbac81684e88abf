"""Projective form (2-D): ``[u, v, w] = H (3x3) @ [x_p, y_p, 1]``, coordinate ``(u / w, v / w)``.

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

import torch
import triton
import triton.language as tl

import transforms_registry

from .common import stack16


@triton.jit
def projective_coords(p_h, p_aux, p_pix, s_ac, q, b, mask_p, P, DM, frame, FN: tl.constexpr, NDIM: tl.constexpr):
    # p_h: float32 [9], H row-major for this (n, k); b: (x, y, -) [BP] base grid
    tl.static_assert(NDIM == 2, "the projective form is 2-D")
    x, y, _ = b
    u = tl.load(p_h + 0) * x + tl.load(p_h + 1) * y + tl.load(p_h + 2)
    v = tl.load(p_h + 3) * x + tl.load(p_h + 4) * y + tl.load(p_h + 5)
    w = tl.load(p_h + 6) * x + tl.load(p_h + 7) * y + tl.load(p_h + 8)
    gx = u / w
    return (gx, v / w, gx), w


@triton.jit
def projective_terms(acc, p_part, p_m, p_aux, q, mask_p, P, DM, b, g_kept, w_kept, gg, FN: tl.constexpr,
                     NDIM: tl.constexpr):
    # acc: [BP, 16] running sums of dL/dH's nine per-pixel terms (row-major, then padding). The coordinate
    # and denominator are made again from H by projective_coords' own expression rather than kept live
    # through the backward's channel loop (three values a pixel): mnist's backward 62 -> 56 registers, cub-k4's
    # modelled time +3.7% (NOTES.md); g_kept and w_kept, the kernel's copies, are not used
    g2, w = projective_coords(p_m, p_aux, p_aux, DM, q, b, mask_p, P, DM, gg, FN, NDIM)  # reads only H and b
    gx = g2[0]
    gy = g2[1]
    x, y, _ = b
    gg_x, gg_y, _ = gg
    g_u = tl.where(mask_p, gg_x / w, 0.0)
    g_v = tl.where(mask_p, gg_y / w, 0.0)
    g_w = tl.where(mask_p, -(gg_x * gx + gg_y * gy) / w, 0.0)
    zero = tl.zeros_like(x)
    acc += stack16(g_u * x, g_u * y, g_u, g_v * x, g_v * y, g_v, g_w * x, g_w * y, g_w,
                   zero, zero, zero, zero, zero, zero, zero)
    return acc


def projective_grid(params, size, align_corners):
    """h (N, K, 3, 3) -> grid (N, K, Ho, Wo, 2), dividing by the third homogeneous coordinate."""
    h = params[0]
    N, K = h.shape[:2]
    base = transforms_registry.base_grid(size, align_corners, h.dtype, h.device).T  # (P, 3)
    uvw = torch.einsum("nkij,pj->nkpi", h, base)
    return (uvw[..., :2] / uvw[..., 2:]).reshape(N, K, *size, 2)
