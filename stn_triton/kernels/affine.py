"""Affine form: the sampling coordinate of output pixel p is ``M (2x3) @ [x_p, y_p, 1]``.

Serves the ``attention`` and ``affine`` families. The base grid ``(x_p, y_p)`` is PyTorch's
``affine_grid`` base, computed in the kernel from the pixel index (never read from memory).

.. math::

    g_x = m_{00} x + m_{01} y + m_{02}, \\qquad g_y = m_{10} x + m_{11} y + m_{12}

    \\frac{\\partial L}{\\partial m_{0j}} = \\sum_p \\bar g_{x,p} \\, b_{j,p}, \\qquad
    \\frac{\\partial L}{\\partial m_{1j}} = \\sum_p \\bar g_{y,p} \\, b_{j,p}, \\qquad
    b_p = [x_p, y_p, 1]

``gg_x``/``gg_y`` below are :math:`\\bar g_x, \\bar g_y`, the gradient of the loss wrt the
normalised coordinate; each program writes the sum over its pixels (stage one of a fixed-order,
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
def affine_param_grad(p_part, x, y, gg_x, gg_y):
    # p_part: float32 [6], this program's partial dL/dM; gg_x, gg_y: [BLOCK_P], 0 off the image
    tl.store(p_part + 0, tl.sum(gg_x * x, axis=0))
    tl.store(p_part + 1, tl.sum(gg_x * y, axis=0))
    tl.store(p_part + 2, tl.sum(gg_x, axis=0))
    tl.store(p_part + 3, tl.sum(gg_y * x, axis=0))
    tl.store(p_part + 4, tl.sum(gg_y * y, axis=0))
    tl.store(p_part + 5, tl.sum(gg_y, axis=0))
