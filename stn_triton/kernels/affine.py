"""Affine form: the sampling coordinate of output pixel p is ``M (2x3) @ [x_p, y_p, 1]``.

Serves the ``attention`` and ``affine`` families. The base grid ``(x_p, y_p)`` is PyTorch's
``affine_grid`` base, computed in the kernel from the pixel index (never read from memory).

.. math::

    g_x = m_{00} x + m_{01} y + m_{02}, \\qquad g_y = m_{10} x + m_{11} y + m_{12}

    \\frac{\\partial L}{\\partial m_{0j}} = \\sum_p \\bar g_{x,p} \\, b_{j,p}, \\qquad
    \\frac{\\partial L}{\\partial m_{1j}} = \\sum_p \\bar g_{y,p} \\, b_{j,p}, \\qquad
    b_p = [x_p, y_p, 1]

``gg_x``/``gg_y`` below are :math:`\\bar g_x, \\bar g_y`, the gradient of the loss wrt the
normalised coordinate; each program writes the sums over its pixels (stage one of a fixed-order,
two-stage reduction; the host sums the partials).
"""

import triton
import triton.language as tl


@triton.jit
def affine_coords(p_m, x, y):
    # p_m: float32 [6], M row-major for this (n, k); x, y: [BLOCK_P] base grid
    m00 = tl.load(p_m + 0)
    m01 = tl.load(p_m + 1)
    m02 = tl.load(p_m + 2)
    m10 = tl.load(p_m + 3)
    m11 = tl.load(p_m + 4)
    m12 = tl.load(p_m + 5)
    gx = m00 * x + m01 * y + m02
    gy = m10 * x + m11 * y + m12
    return gx, gy


@triton.jit
def affine_param_terms(a0, a1, a2, a3, a4, a5, x, y, gg_x, gg_y):
    # the six per-pixel terms of dL/dM, added to the running sums a0..a5 [BLOCK_P] (summed over the
    # program's pixels at its end); gg_x, gg_y: [BLOCK_P], 0 off the image
    return a0 + gg_x * x, a1 + gg_x * y, a2 + gg_x, a3 + gg_y * x, a4 + gg_y * y, a5 + gg_y
