"""Basis form: the coordinate of pixel p is ``M (n x D) @ B[:, p]``, B a (D, P) tensor (P pixels).

Serves thin plate splines, piecewise affine meshes, learnable target bases and any family that is
linear in its parameters, in 2-D (n = 2) and 3-D (n = 3).

.. math::

    g_{r,p} = \\sum_d m_{r,d} \\, B_{d,p}

    \\frac{\\partial L}{\\partial m_{r,d}} = \\sum_p \\bar g_{r,p} B_{d,p}, \\qquad
    \\frac{\\partial L}{\\partial B_{d,p}} = \\sum_{n,k} \\sum_r m^{(n,k)}_{r,d} \\, \\bar g^{(n,k)}_{r,p}

The gradient wrt M is reduced in two fixed-order stages (each tile's sums, then the host's); the
gradient wrt B sums over every (n, k) and is computed by :func:`basis_grad_kernel` from the stored
:math:`\\bar g`, looping over (n, k) in order (deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def basis_coords(p_m, p_b, p_pix, s_ac, q, b, mask_p, P, DM, frame, FN: tl.constexpr, NDIM: tl.constexpr):
    # p_m: float32 [NDIM, DM] for this (n, k); p_b: float32 B [DM, P] contiguous; q: [BP] pixel index
    gx = tl.zeros(q.shape, tl.float32)
    gy = tl.zeros(q.shape, tl.float32)
    gz = tl.zeros(q.shape, tl.float32)
    p_q = p_b + q  # each pixel's column of B, made once: a row is then one scalar step away
    for e in range(0, DM):
        b_e = tl.load(p_q + e * P, mask=mask_p, other=0.0)
        gx += tl.load(p_m + e) * b_e
        gy += tl.load(p_m + DM + e) * b_e
        if NDIM == 3:
            gz += tl.load(p_m + 2 * DM + e) * b_e
    return (gx, gy, gz), gx


@triton.jit
def basis_terms(acc, p_part, p_m, p_b, q, mask_p, P, DM, b, g, w, gg, FN: tl.constexpr, NDIM: tl.constexpr):
    # p_part: float32 [NDIM, DM], this tile's partial dL/dM, written here (one tile per program). The basis
    # rows come four at a time, a [4, BP] block reduced over the pixels once per axis, in 2-D both axes in
    # one reduction ([4, BP, 2]): the reductions' set-up (shuffles, shared memory, barriers) is what the
    # compile-only model charges most here (NOTES.md: rows two at a time, then four with the axes
    # joined; eight cost registers). The step is written as a literal so that the model can count the
    # loop's trips.
    gg_x, gg_y, gg_z = gg
    rows = tl.arange(0, 4)
    p_q = (p_b + q)[None, :]  # each pixel's column of B, made once
    for e0 in range(0, DM, 4):
        m_e = (e0 + rows) < DM
        blk = tl.load(p_q + ((e0 + rows) * P)[:, None], mask=m_e[:, None] & mask_p[None, :], other=0.0)
        if NDIM == 3:
            tl.store(p_part + e0 + rows, tl.sum(blk * gg_x[None, :], axis=1), mask=m_e)
            tl.store(p_part + DM + e0 + rows, tl.sum(blk * gg_y[None, :], axis=1), mask=m_e)
            tl.store(p_part + 2 * DM + e0 + rows, tl.sum(blk * gg_z[None, :], axis=1), mask=m_e)
        else:
            both = tl.sum(tl.join(blk * gg_x[None, :], blk * gg_y[None, :]), axis=1)  # [4 rows, 2 axes]
            axes = tl.arange(0, 2)
            tl.store(p_part + axes[None, :] * DM + (e0 + rows)[:, None], both, mask=m_e[:, None])
    return acc


@triton.jit
def basis_grad_kernel(
    p_gb,   # out: float32 dL/dB [DM, P] contiguous
    p_m,    # float32 M [NK, NDIM, DM] contiguous
    p_gg,   # float32 dL/dg [NK, P, NDIM] contiguous
    NK, DM, P,
    NDIM: tl.constexpr,     # 2 or 3 coordinates per pixel
    BLOCK_D: tl.constexpr,  # >= DM, a power of two
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    mask_p = offs_p < P
    mask_d = offs_d < DM
    acc = tl.zeros([BLOCK_D, BLOCK_P], tl.float32)  # [BD, BP]
    p_gg_nk = p_gg  # advanced by one (n, k) per iteration: 64-bit pointer arithmetic
    p_m_nk = p_m
    for _ in range(0, NK):
        for r in tl.static_range(NDIM):
            gg_r = tl.load(p_gg_nk + offs_p * NDIM + r, mask=mask_p, other=0.0)  # [BP]
            m_r = tl.load(p_m_nk + r * DM + offs_d, mask=mask_d, other=0.0)  # [BD]
            acc += m_r[:, None] * gg_r[None, :]
        p_gg_nk += P * NDIM
        p_m_nk += DM * NDIM
    tl.store(p_gb + offs_d[:, None] * P + offs_p[None, :], acc, mask=mask_d[:, None] & mask_p[None, :])


def basis_grid(params, size, align_corners):
    """m (N, K, n, D), basis (D, P) -> grid (N, K, *size, n)."""
    m, basis = params
    N, K, nd = m.shape[:3]
    return torch.einsum("nkcd,dp->nkpc", m, basis).reshape(N, K, *size, nd)
