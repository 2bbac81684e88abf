"""Basis form: the coordinate of pixel p is ``M (2xD) @ B[:, p]``, B a (D, Ho*Wo) tensor.

Serves thin plate splines, piecewise affine meshes, learnable target bases and any family that is
linear in its parameters.

.. math::

    g_{c,p} = \\sum_d m_{c,d} \\, B_{d,p}, \\qquad c \\in \\{x, y\\}

    \\frac{\\partial L}{\\partial m_{c,d}} = \\sum_p \\bar g_{c,p} B_{d,p}, \\qquad
    \\frac{\\partial L}{\\partial B_{d,p}} = \\sum_{n,k} \\sum_c m^{(n,k)}_{c,d} \\, \\bar g^{(n,k)}_{c,p}

The gradient wrt M is reduced in two fixed-order stages like the affine form's; the gradient wrt B
sums over every (n, k) and is computed by :func:`basis_grad_kernel` from the stored
:math:`\\bar g`, looping over (n, k) in order (deterministic, no atomics).
"""

import triton
import triton.language as tl


@triton.jit
def basis_coords(p_m, p_b, offs_p, mask_p, D, P):
    # p_m: float32 [2, D] for this (n, k); p_b: float32 B [D, P] contiguous; offs_p: [BLOCK_P]
    gx = tl.zeros(offs_p.shape, tl.float32)
    gy = tl.zeros(offs_p.shape, tl.float32)
    for d in range(0, D):
        b = tl.load(p_b + d * P + offs_p, mask=mask_p, other=0.0)
        gx += tl.load(p_m + d) * b
        gy += tl.load(p_m + D + d) * b
    return gx, gy


@triton.jit
def basis_param_grad(p_part, p_b, offs_p, mask_p, D, P, gg_x, gg_y):
    # p_part: float32 [2, D], this program's partial dL/dM
    for d in range(0, D):
        b = tl.load(p_b + d * P + offs_p, mask=mask_p, other=0.0)
        tl.store(p_part + d, tl.sum(gg_x * b, axis=0))
        tl.store(p_part + D + d, tl.sum(gg_y * b, axis=0))


@triton.jit
def basis_grad_kernel(
    p_gb,   # out: float32 dL/dB [D, P] contiguous
    p_m,    # float32 M [NK, 2, D] contiguous
    p_gg,   # float32 dL/dg [NK, P, 2] contiguous
    NK, D, P,
    BLOCK_D: tl.constexpr,  # >= D, a power of two
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_p = offs_p < P
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D, BLOCK_P], tl.float32)  # [BD, BP]
    p_gg_nk = p_gg  # advanced by one (n, k) per iteration: 64-bit pointer arithmetic
    p_m_nk = p_m
    for _ in range(0, NK):
        gg_x = tl.load(p_gg_nk + offs_p * 2, mask=mask_p, other=0.0)
        gg_y = tl.load(p_gg_nk + offs_p * 2 + 1, mask=mask_p, other=0.0)
        m_x = tl.load(p_m_nk + offs_d, mask=mask_d, other=0.0)
        m_y = tl.load(p_m_nk + D + offs_d, mask=mask_d, other=0.0)
        acc += m_x[:, None] * gg_x[None, :] + m_y[:, None] * gg_y[None, :]
        p_gg_nk += P * 2
        p_m_nk += D * 2
    tl.store(p_gb + offs_d[:, None] * P + offs_p[None, :], acc, mask=mask_d[:, None] & mask_p[None, :])
