"""Volumetric (5-D) sampling: the 3-D forms' forward and backward kernels (launchers:
:mod:`stn_triton.kernels.launch_volume`).

Input U (N, C, D, H, W), output V (N, K, C, Do, Ho, Wo). Output voxel p = (d, i, j) of transform
(n, k) samples U at the normalised coordinate g_p = (g_x, g_y, g_z), made by one of three forms:

.. math::

    \\text{affine3d:}\\; g_p = M_{3 \\times 4} [x_j, y_i, z_d, 1]^T \\qquad
    \\text{basis3d:}\\; g_p = M_{3 \\times D_m} B[:, p] \\qquad
    \\text{grid3d:}\\; g_p = \\mathrm{grid}[n, k, d, i, j]

with ``(x_j, y_i, z_d)`` the 5-D ``affine_grid`` base (computed from the voxel index, never read).
Each axis goes through :func:`~stn_triton.kernels.common.source_index` exactly as in 2-D (x with W,
y with H, z with D); trilinear sampling (PyTorch's ``mode="bilinear"`` on 5-D input) weighs the eight
neighbours,

.. math::

    V = \\sum_{a,b,c \\in \\{0,1\\}} w^x_a w^y_b w^z_c \\, U[z_0 + c, y_0 + b, x_0 + a], \\qquad
    w_0 = 1 - t,\\; w_1 = t,\\; t = i - \\lfloor i \\rfloor

and nearest sampling reads the voxel at the rounded index (halves to even). Backward:

.. math::

    \\bar U_q \\mathrel{+}= \\sum_{k,p} w_q(i_p) \\bar V_p, \\qquad
    \\bar g_x = a_x \\mathrm{pad}'(i_x) \\sum_c \\bar V_c \\sum_{b,c'} w^y_b w^z_{c'}
        (U[z_{c'}, y_b, x_1] - U[z_{c'}, y_b, x_0])

(and the same for y, z); the affine form's parameter gradient is
:math:`\\partial L / \\partial m_{rc} = \\sum_p \\bar g_{r,p} b_{c,p}` with :math:`b_p = [x, y, z, 1]`,
reduced in two fixed-order stages (per program here, then on the host); the basis form's is
:math:`\\sum_p \\bar g_{r,p} B_{d,p}` per tile, and :math:`\\partial L/\\partial B` sums
:math:`m^{(n,k)}_{r,d} \\bar g^{(n,k)}_{r,p}` over (n, k) in order (:func:`basis3d_grad_kernel`).

Launch shape: the output's voxels are the (Do*Ho) x Wo plane of rows ``r = d * Ho + i`` (so voxel
p = r * Wo + j, row-major), cut into 2-D tiles exactly as the 2-D kernels cut (Ho, Wo)
(:mod:`stn_triton.kernels.sampler`): a grid ``(tile, k, n)``, tiles ``TILE_H x 2**LOG2_TW``, column
tiles numbered up to ``2**LOG2_CT``. A lane's depth and row are one division of its row by Ho.

The input gradient is a scatter (relaxed float32 atomics) or, under
``torch.use_deterministic_algorithms(True)``, a gather: :func:`corner_index3d_kernel` lists each
(voxel, corner) contribution's target input voxel and weight (8 per voxel trilinear, 1 nearest), the
host sorts them by target (stable), and :func:`gather_grad_input3d_kernel` sums each input voxel's
contributions in that fixed order.
"""

import triton
import triton.language as tl

from .common import bilinear_corners, round_half_even, source_index, store_sums

FORM3_AFFINE, FORM3_BASIS, FORM3_GRID = 0, 1, 2
FORM3_CODES = {"affine3d": FORM3_AFFINE, "basis3d": FORM3_BASIS, "grid3d": FORM3_GRID}


@triton.jit
def _tile3(DoHo, Wo, INT64: tl.constexpr, LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's (n, k), tile, and its voxels' rows ``r`` (of Do*Ho) and columns ``j``."""
    pid_p = tl.program_id(0)
    k = tl.program_id(1)
    n = tl.program_id(2)
    tile_r = pid_p >> LOG2_CT
    tile_c = pid_p & ((1 << LOG2_CT) - 1)
    lane = tl.arange(0, BLOCK_P)
    r = tile_r * (BLOCK_P >> LOG2_TW) + (lane >> LOG2_TW)  # [BP]
    j = tile_c * (1 << LOG2_TW) + (lane & ((1 << LOG2_TW) - 1))  # [BP]
    if INT64:
        n = n.to(tl.int64)
        k = k.to(tl.int64)
        r = r.to(tl.int64)
        j = j.to(tl.int64)
    mask_p = (r < DoHo) & (j < Wo)
    return n, k, tile_r, tile_c, r, j, mask_p


@triton.jit
def _coords3(
    FORM: tl.constexpr, p_m, p_b, p_g, r, j, mask_p, Ho, Wo, DM, P,
    s_gd, s_gh, s_gw, s_gc, bsx, box, bsy, boy, bsz, boz,
):
    """Each voxel's depth ``d`` and row ``i``, and its normalised sampling coordinate (gx, gy, gz);
    also the base grid (x, y, z) the affine form's gradient needs."""
    d = r // Ho
    i = r - d * Ho
    x = j.to(tl.float32) * bsx + box  # affine_grid's base grid
    y = i.to(tl.float32) * bsy + boy
    z = d.to(tl.float32) * bsz + boz
    if FORM == 0:  # p_m: float32 [12], M (3x4) row-major for this (n, k)
        gx = tl.load(p_m + 0) * x + tl.load(p_m + 1) * y + tl.load(p_m + 2) * z + tl.load(p_m + 3)
        gy = tl.load(p_m + 4) * x + tl.load(p_m + 5) * y + tl.load(p_m + 6) * z + tl.load(p_m + 7)
        gz = tl.load(p_m + 8) * x + tl.load(p_m + 9) * y + tl.load(p_m + 10) * z + tl.load(p_m + 11)
    elif FORM == 1:  # p_m: float32 [3, DM]; p_b: float32 B [DM, P] contiguous
        q = r * Wo + j
        gx = tl.zeros(x.shape, tl.float32)
        gy = tl.zeros(x.shape, tl.float32)
        gz = tl.zeros(x.shape, tl.float32)
        for e in range(0, DM):
            b = tl.load(p_b + e * P + q, mask=mask_p, other=0.0)
            gx += tl.load(p_m + e) * b
            gy += tl.load(p_m + DM + e) * b
            gz += tl.load(p_m + 2 * DM + e) * b
    else:  # p_g: the grid at (n, k), any float dtype, strides s_g*
        off = d * s_gd + i * s_gh + j * s_gw
        gx = tl.load(p_g + off, mask=mask_p, other=0.0).to(tl.float32)
        gy = tl.load(p_g + off + s_gc, mask=mask_p, other=0.0).to(tl.float32)
        gz = tl.load(p_g + off + 2 * s_gc, mask=mask_p, other=0.0).to(tl.float32)
    return d, i, gx, gy, gz, x, y, z


@triton.jit
def _source3(gx, gy, gz, W, H, D, PAD: tl.constexpr, ALIGN: tl.constexpr, FMA: tl.constexpr):
    ix, dix = source_index(gx, W, PAD, ALIGN, FMA)
    iy, diy = source_index(gy, H, PAD, ALIGN, FMA)
    iz, diz = source_index(gz, D, PAD, ALIGN, FMA)
    return ix, iy, iz, dix, diy, diz


@triton.jit
def _trilinear(ix, iy, iz, W, H, D, INT64: tl.constexpr):
    """The eight neighbours: lower corner (x0, y0, z0), fractions t and 1 - t per axis, and whether
    each neighbour's coordinate on each axis lies inside the volume."""
    x0, y0, tx, ty, sx, sy, in_x0, in_x1, in_y0, in_y1 = bilinear_corners(ix, iy, W, H, INT64)
    fz0 = tl.floor(iz)
    tz = iz - fz0
    sz = 1.0 - tz
    z0 = fz0.to(tl.int64) if INT64 else fz0.to(tl.int32)
    in_z0 = (z0 >= 0) & (z0 < D)
    in_z1 = (z0 + 1 >= 0) & (z0 + 1 < D)
    return x0, y0, z0, tx, ty, tz, sx, sy, sz, in_x0, in_x1, in_y0, in_y1, in_z0, in_z1


@triton.jit
def _nearest3(ix, iy, iz, W, H, D, INT64: tl.constexpr):
    """The nearest voxel (halves to even, as ``nearbyint``) and whether it lies inside the volume."""
    xr = round_half_even(ix)
    yr = round_half_even(iy)
    zr = round_half_even(iz)
    xr = xr.to(tl.int64) if INT64 else xr.to(tl.int32)
    yr = yr.to(tl.int64) if INT64 else yr.to(tl.int32)
    zr = zr.to(tl.int64) if INT64 else zr.to(tl.int32)
    inside = (xr >= 0) & (xr < W) & (yr >= 0) & (yr < H) & (zr >= 0) & (zr < D)
    return xr, yr, zr, inside


@triton.jit
def _masks8(mask_p, in_x0, in_x1, in_y0, in_y1, in_z0, in_z1):
    """Whether each of the eight neighbours is read: the voxel exists and the neighbour lies inside
    the volume, [BP, 1] each. Names: m<z><y><x>, 0 the lower and 1 the upper neighbour."""
    m00 = mask_p & in_z0 & in_y0
    m01 = mask_p & in_z0 & in_y1
    m10 = mask_p & in_z1 & in_y0
    m11 = mask_p & in_z1 & in_y1
    return ((m00 & in_x0)[:, None], (m00 & in_x1)[:, None], (m01 & in_x0)[:, None], (m01 & in_x1)[:, None],
            (m10 & in_x0)[:, None], (m10 & in_x1)[:, None], (m11 & in_x0)[:, None], (m11 & in_x1)[:, None])


@triton.jit
def _weights8(tx, ty, tz, sx, sy, sz):
    """The eight trilinear weights, [BP, 1] each, in PyTorch's order of the corners (top z0 before
    bottom, north y0 before south, west x0 before east)."""
    w00 = sy * sz
    w01 = ty * sz
    w10 = sy * tz
    w11 = ty * tz
    return ((sx * w00)[:, None], (tx * w00)[:, None], (sx * w01)[:, None], (tx * w01)[:, None],
            (sx * w10)[:, None], (tx * w10)[:, None], (sx * w11)[:, None], (tx * w11)[:, None])


@triton.jit
def _load8(p, o, s_d, s_h, s_w, m000, m001, m010, m011, m100, m101, m110, m111, mask_c):
    """U at the eight neighbours, [BP, BC] float32 each (0 outside the volume); ``o`` [BP, 1] the lower
    corner's offset, ``p`` [1, BC] the channels' pointers. Names: v<z><y><x>."""
    v000 = tl.load(p + o, mask=m000 & mask_c, other=0.0).to(tl.float32)
    v001 = tl.load(p + (o + s_w), mask=m001 & mask_c, other=0.0).to(tl.float32)
    v010 = tl.load(p + (o + s_h), mask=m010 & mask_c, other=0.0).to(tl.float32)
    v011 = tl.load(p + (o + s_h + s_w), mask=m011 & mask_c, other=0.0).to(tl.float32)
    v100 = tl.load(p + (o + s_d), mask=m100 & mask_c, other=0.0).to(tl.float32)
    v101 = tl.load(p + (o + s_d + s_w), mask=m101 & mask_c, other=0.0).to(tl.float32)
    v110 = tl.load(p + (o + s_d + s_h), mask=m110 & mask_c, other=0.0).to(tl.float32)
    v111 = tl.load(p + (o + s_d + s_h + s_w), mask=m111 & mask_c, other=0.0).to(tl.float32)
    return v000, v001, v010, v011, v100, v101, v110, v111


@triton.jit
def sample3d_fwd_kernel(
    p_x,    # input U [N, C, D, H, W], strides s_x* (any layout)
    p_out,  # output V [N, K, C, Do, Ho, Wo], strides s_o*
    p_prm,  # float32 [N*K, R]: the form's matrix (R = 12 affine3d, 3*DM basis3d)
    p_aux,  # basis3d: float32 B [DM, Do*Ho*Wo]; grid3d: grid [N, K, Do, Ho, Wo, 3], strides s_a*
    s_xn, s_xc, s_xd, s_xh, s_xw,
    s_on, s_ok, s_oc, s_od, s_oh, s_ow,
    s_an, s_ak, s_ad, s_ah, s_aw, s_ac,
    C, D, H, W, K, Do, Ho, Wo, DM, R,
    bsx, box, bsy, boy, bsz, boz,  # base grid x_j = bsx * j + box, y_i = bsy * i + boy, z_d = bsz * d + boz
    FORM: tl.constexpr, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr,
    FMA: tl.constexpr,      # a correctly rounded multiply-add is available (compiled; see common.source_index)
    INT64: tl.constexpr,    # some offset may pass 2^31: 64-bit index arithmetic
    EVEN_C: tl.constexpr,   # C % BLOCK_C == 0: no channel mask
    LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr,
    BLOCK_P: tl.constexpr,  # voxels per program (a power of two, >= the tile width)
    BLOCK_C: tl.constexpr,  # channels per step: 1 (planar inputs) or a 16-byte vector (channels-last)
):
    n, k, tile_r, tile_c, r, j, mask_p = _tile3(Do * Ho, Wo, INT64, LOG2_TW, LOG2_CT, BLOCK_P)
    if tile_c * (1 << LOG2_TW) >= Wo:  # a column tile past the volume (2**LOG2_CT rounds up)
        return
    P = Do * Ho * Wo
    nk = n * K + k
    d, i, gx, gy, gz, x, y, z = _coords3(FORM, p_prm + nk * R, p_aux, p_aux + n * s_an + k * s_ak, r, j, mask_p,
                                         Ho, Wo, DM, P, s_ad, s_ah, s_aw, s_ac, bsx, box, bsy, boy, bsz, boz)
    ix, iy, iz, _, _, _ = _source3(gx, gy, gz, W, H, D, PAD, ALIGN, FMA)

    p_xn = p_x + n * s_xn
    p_on = p_out + n * s_on + k * s_ok
    o_out = (d * s_od + i * s_oh + j * s_ow)[:, None]  # [BP, 1]
    m_out = mask_p[:, None]
    if MODE == 0:
        x0, y0, z0, tx, ty, tz, sx, sy, sz, in_x0, in_x1, in_y0, in_y1, in_z0, in_z1 = _trilinear(
            ix, iy, iz, W, H, D, INT64)
        o_lo = (z0 * s_xd + y0 * s_xh + x0 * s_xw)[:, None]
        m000, m001, m010, m011, m100, m101, m110, m111 = _masks8(mask_p, in_x0, in_x1, in_y0, in_y1, in_z0, in_z1)
        w000, w001, w010, w011, w100, w101, w110, w111 = _weights8(tx, ty, tz, sx, sy, sz)
    else:
        xr, yr, zr, inside = _nearest3(ix, iy, iz, W, H, D, INT64)
        o_nn = (zr * s_xd + yr * s_xh + xr * s_xw)[:, None]
        m_nn = (mask_p & inside)[:, None]

    offs_c = tl.arange(0, BLOCK_C)[None, :]  # [1, BC]
    for c0 in range(0, C, BLOCK_C):
        if EVEN_C:
            mask_c = offs_c < BLOCK_C  # all true, folded away
        else:
            mask_c = (c0 + offs_c) < C
        p_c = p_xn + (c0 + offs_c) * s_xc  # [1, BC]
        if MODE == 0:
            v000, v001, v010, v011, v100, v101, v110, v111 = _load8(
                p_c, o_lo, s_xd, s_xh, s_xw, m000, m001, m010, m011, m100, m101, m110, m111, mask_c)
            v = (w000 * v000 + w001 * v001 + w010 * v010 + w011 * v011
                 + w100 * v100 + w101 * v101 + w110 * v110 + w111 * v111)
        else:
            v = tl.load(p_c + o_nn, mask=m_nn & mask_c, other=0.0).to(tl.float32)
        tl.store(p_on + o_out + (c0 + offs_c) * s_oc, v.to(p_out.dtype.element_ty), mask=m_out & mask_c)


@triton.jit
def _scatter_add(ptr, v, m, mask_c, EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """``*ptr += v`` where ``m`` (float32 relaxed atomics; ``ptr`` always points inside the gradient:
    the targets are clamped into it). One channel per step: every lane adds (0 where ``m`` is false),
    as a predicated atomic compiles to a branch around it; a vector of channels: one predicate."""
    if BLOCK_C == 1:
        v = tl.where(m, v, 0.0).to(ptr.dtype.element_ty)
        if EVEN_C:
            tl.atomic_add(ptr, v, sem="relaxed")
        else:
            tl.atomic_add(ptr, v, mask=mask_c, sem="relaxed")
    else:
        tl.atomic_add(ptr, v.to(ptr.dtype.element_ty), mask=m & mask_c, sem="relaxed")


@triton.jit
def sample3d_bwd_kernel(
    p_x,     # input U [N, C, D, H, W], strides s_x*
    p_go,    # incoming gradient dL/dV [N, K, C, Do, Ho, Wo], strides s_g*
    p_gx,    # out: float32 dL/dU [N, C, D, H, W], strides s_d*, zeroed, accumulated with atomics (if NEED_X)
    p_prm,   # float32 [N*K, R], as in the forward
    p_aux,   # as in the forward
    p_part,  # out: float32 [N*K, NPROG, R] dL/dM summed over each program's voxels (if NEED_PARAM)
    p_gg,    # out: float32 [N*K, Do*Ho*Wo, 3] dL/dg (if WRITE_GG)
    s_xn, s_xc, s_xd, s_xh, s_xw,
    s_gn, s_gk, s_gc, s_gd, s_gh, s_gw,
    s_dn, s_dc, s_dd, s_dh, s_dw,
    s_an, s_ak, s_ad, s_ah, s_aw, s_ac,
    C, D, H, W, K, Do, Ho, Wo, DM, R,
    NPROG,  # programs with voxels per (n, k): the partials' row length
    NCT,    # column tiles
    bsx, box, bsy, boy, bsz, boz,
    FORM: tl.constexpr, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr, FMA: tl.constexpr,
    NEED_X: tl.constexpr, NEED_G: tl.constexpr, NEED_PARAM: tl.constexpr, WRITE_GG: tl.constexpr,
    INT64: tl.constexpr, EVEN_C: tl.constexpr, LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    TPP: tl.constexpr,  # tiles per program (a column of TPP row tiles; 1 for the basis form)
):
    # NEED_G: the coordinate gradient is wanted (trilinear only: nearest is piecewise constant)
    tl.static_assert(TPP == 1 or FORM != 1, "the basis form reduces per tile")
    DoHo = Do * Ho
    n, k, grp, tile_c, r0, j, _ = _tile3(DoHo, Wo, INT64, LOG2_TW, LOG2_CT, BLOCK_P)
    if tile_c * (1 << LOG2_TW) >= Wo:
        return
    TILE_H: tl.constexpr = BLOCK_P >> LOG2_TW
    P = DoHo * Wo
    nk = n * K + k
    p_prm_nk = p_prm + nk * R
    p_aux_nk = p_aux + n * s_an + k * s_ak
    p_xn = p_x + n * s_xn
    p_gxn = p_gx + n * s_dn
    p_gon = p_go + n * s_gn + k * s_gk
    p_part_i = p_part + (nk * NPROG + grp * NCT + tile_c) * R
    offs_c = tl.arange(0, BLOCK_C)[None, :]  # [1, BC]
    # the affine form's 12 per-voxel terms of dL/dM, summed over the program's tiles
    a0 = tl.zeros([BLOCK_P], tl.float32)
    a1 = tl.zeros([BLOCK_P], tl.float32)
    a2 = tl.zeros([BLOCK_P], tl.float32)
    a3 = tl.zeros([BLOCK_P], tl.float32)
    a4 = tl.zeros([BLOCK_P], tl.float32)
    a5 = tl.zeros([BLOCK_P], tl.float32)
    a6 = tl.zeros([BLOCK_P], tl.float32)
    a7 = tl.zeros([BLOCK_P], tl.float32)
    a8 = tl.zeros([BLOCK_P], tl.float32)
    a9 = tl.zeros([BLOCK_P], tl.float32)
    a10 = tl.zeros([BLOCK_P], tl.float32)
    a11 = tl.zeros([BLOCK_P], tl.float32)
    n_here = tl.minimum(TPP, tl.cdiv(DoHo, TILE_H) - grp * TPP)  # the last column of tiles may be short
    for t in range(0, n_here):
        r = r0 + (grp * (TPP - 1) + t) * TILE_H  # tile row grp * TPP + t (r0 is tile row grp's)
        mask_p = (r < DoHo) & (j < Wo)
        d, i, gx, gy, gz, x, y, z = _coords3(FORM, p_prm_nk, p_aux, p_aux_nk, r, j, mask_p, Ho, Wo, DM, P,
                                             s_ad, s_ah, s_aw, s_ac, bsx, box, bsy, boy, bsz, boz)
        ix, iy, iz, dix, diy, diz = _source3(gx, gy, gz, W, H, D, PAD, ALIGN, FMA)
        o_go = (d * s_gd + i * s_gh + j * s_gw)[:, None]  # [BP, 1]
        m_go = mask_p[:, None]
        if MODE == 0:
            x0, y0, z0, tx, ty, tz, sx, sy, sz, in_x0, in_x1, in_y0, in_y1, in_z0, in_z1 = _trilinear(
                ix, iy, iz, W, H, D, INT64)
            o_lo = (z0 * s_xd + y0 * s_xh + x0 * s_xw)[:, None]
            # the scatter's targets, clamped into the volume (see _scatter_add)
            cx0 = tl.minimum(tl.maximum(x0, 0), W - 1) * s_dw
            cx1 = tl.minimum(tl.maximum(x0 + 1, 0), W - 1) * s_dw
            cy0 = tl.minimum(tl.maximum(y0, 0), H - 1) * s_dh
            cy1 = tl.minimum(tl.maximum(y0 + 1, 0), H - 1) * s_dh
            cz0 = tl.minimum(tl.maximum(z0, 0), D - 1) * s_dd
            cz1 = tl.minimum(tl.maximum(z0 + 1, 0), D - 1) * s_dd
            d000 = (cz0 + cy0 + cx0)[:, None]
            d001 = (cz0 + cy0 + cx1)[:, None]
            d010 = (cz0 + cy1 + cx0)[:, None]
            d011 = (cz0 + cy1 + cx1)[:, None]
            d100 = (cz1 + cy0 + cx0)[:, None]
            d101 = (cz1 + cy0 + cx1)[:, None]
            d110 = (cz1 + cy1 + cx0)[:, None]
            d111 = (cz1 + cy1 + cx1)[:, None]
            m000, m001, m010, m011, m100, m101, m110, m111 = _masks8(mask_p, in_x0, in_x1, in_y0, in_y1, in_z0, in_z1)
            w000, w001, w010, w011, w100, w101, w110, w111 = _weights8(tx, ty, tz, sx, sy, sz)
        else:
            xr, yr, zr, inside = _nearest3(ix, iy, iz, W, H, D, INT64)
            m_nn = (mask_p & inside)[:, None]
            d_nn = (tl.minimum(tl.maximum(zr, 0), D - 1) * s_dd + tl.minimum(tl.maximum(yr, 0), H - 1) * s_dh
                    + tl.minimum(tl.maximum(xr, 0), W - 1) * s_dw)[:, None]
        g_ix = tl.zeros([BLOCK_P], tl.float32)  # sum_c dL/dV * dV/di_x
        g_iy = tl.zeros([BLOCK_P], tl.float32)
        g_iz = tl.zeros([BLOCK_P], tl.float32)
        if NEED_X or NEED_G:  # nearest sampling with only parameter gradients reads no channel
            for c0 in range(0, C, BLOCK_C):
                if EVEN_C:
                    mask_c = offs_c < BLOCK_C
                else:
                    mask_c = (c0 + offs_c) < C
                go = tl.load(p_gon + o_go + (c0 + offs_c) * s_gc, mask=m_go & mask_c, other=0.0).to(tl.float32)
                if NEED_X:
                    p_gxc = p_gxn + (c0 + offs_c) * s_dc  # [1, BC]
                    if MODE == 0:
                        _scatter_add(p_gxc + d000, go * w000, m000, mask_c, EVEN_C, BLOCK_C)
                        _scatter_add(p_gxc + d001, go * w001, m001, mask_c, EVEN_C, BLOCK_C)
                        _scatter_add(p_gxc + d010, go * w010, m010, mask_c, EVEN_C, BLOCK_C)
                        _scatter_add(p_gxc + d011, go * w011, m011, mask_c, EVEN_C, BLOCK_C)
                        _scatter_add(p_gxc + d100, go * w100, m100, mask_c, EVEN_C, BLOCK_C)
                        _scatter_add(p_gxc + d101, go * w101, m101, mask_c, EVEN_C, BLOCK_C)
                        _scatter_add(p_gxc + d110, go * w110, m110, mask_c, EVEN_C, BLOCK_C)
                        _scatter_add(p_gxc + d111, go * w111, m111, mask_c, EVEN_C, BLOCK_C)
                    else:
                        _scatter_add(p_gxc + d_nn, go, m_nn, mask_c, EVEN_C, BLOCK_C)
                if NEED_G:
                    v000, v001, v010, v011, v100, v101, v110, v111 = _load8(
                        p_xn + (c0 + offs_c) * s_xc, o_lo, s_xd, s_xh, s_xw,
                        m000, m001, m010, m011, m100, m101, m110, m111, mask_c)
                    g_ix += tl.sum(go * ((sy * sz)[:, None] * (v001 - v000) + (ty * sz)[:, None] * (v011 - v010)
                                         + (sy * tz)[:, None] * (v101 - v100) + (ty * tz)[:, None] * (v111 - v110)),
                                   axis=1)
                    g_iy += tl.sum(go * ((sx * sz)[:, None] * (v010 - v000) + (tx * sz)[:, None] * (v011 - v001)
                                         + (sx * tz)[:, None] * (v110 - v100) + (tx * tz)[:, None] * (v111 - v101)),
                                   axis=1)
                    g_iz += tl.sum(go * ((sx * sy)[:, None] * (v100 - v000) + (tx * sy)[:, None] * (v101 - v001)
                                         + (sx * ty)[:, None] * (v110 - v010) + (tx * ty)[:, None] * (v111 - v011)),
                                   axis=1)

        gg_x = tl.where(mask_p, g_ix * dix, 0.0)  # dL/dg_x [BP]
        gg_y = tl.where(mask_p, g_iy * diy, 0.0)
        gg_z = tl.where(mask_p, g_iz * diz, 0.0)
        if WRITE_GG:
            o_p = (nk * P + r * Wo + j) * 3
            tl.store(p_gg + o_p, gg_x, mask=mask_p)
            tl.store(p_gg + o_p + 1, gg_y, mask=mask_p)
            tl.store(p_gg + o_p + 2, gg_z, mask=mask_p)
        if NEED_PARAM:
            if FORM == 0:
                a0 += gg_x * x
                a1 += gg_x * y
                a2 += gg_x * z
                a3 += gg_x
                a4 += gg_y * x
                a5 += gg_y * y
                a6 += gg_y * z
                a7 += gg_y
                a8 += gg_z * x
                a9 += gg_z * y
                a10 += gg_z * z
                a11 += gg_z
            elif FORM == 1:
                q = r * Wo + j
                for e in range(0, DM):
                    b = tl.load(p_aux + e * P + q, mask=mask_p, other=0.0)
                    tl.store(p_part_i + e, tl.sum(gg_x * b, axis=0))
                    tl.store(p_part_i + DM + e, tl.sum(gg_y * b, axis=0))
                    tl.store(p_part_i + 2 * DM + e, tl.sum(gg_z * b, axis=0))
    if NEED_PARAM:
        if FORM == 0:
            store_sums(p_part_i, a0, a1, a2, a3, a4, a5)
            store_sums(p_part_i + 6, a6, a7, a8, a9, a10, a11)


@triton.jit
def corner_index3d_kernel(
    p_idx,  # out: int32 or int64 [N, K*P*NCORNER] target input voxel ((z * H + y) * W + x), D*H*W where none
    p_wt,   # out: float32 [N, K*P*NCORNER] weight of that contribution
    p_goff, # out: int32 or int64 [N, K*P] offset of the voxel's dL/dV within image n (channel 0)
    p_prm, p_aux,
    s_gk, s_gd, s_gh, s_gw,  # strides of dL/dV [N, K, C, Do, Ho, Wo] (k, depth, row, column)
    s_an, s_ak, s_ad, s_ah, s_aw, s_ac,
    D, H, W, K, Do, Ho, Wo, DM, R,
    bsx, box, bsy, boy, bsz, boz,
    FORM: tl.constexpr, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr, FMA: tl.constexpr,
    INT64: tl.constexpr,
    LOG2_NC: tl.constexpr,  # contributions per voxel: 8 (trilinear) = 1 << 3, or 1 (nearest)
    LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n, k, tile_r, tile_c, r, j, mask_p = _tile3(Do * Ho, Wo, INT64, LOG2_TW, LOG2_CT, BLOCK_P)
    if tile_c * (1 << LOG2_TW) >= Wo:
        return
    P = Do * Ho * Wo
    nk = n * K + k
    d, i, gx, gy, gz, x, y, z = _coords3(FORM, p_prm + nk * R, p_aux, p_aux + n * s_an + k * s_ak, r, j, mask_p,
                                         Ho, Wo, DM, P, s_ad, s_ah, s_aw, s_ac, bsx, box, bsy, boy, bsz, boz)
    ix, iy, iz, _, _, _ = _source3(gx, gy, gz, W, H, D, PAD, ALIGN, FMA)
    HW = H * W
    none = D * HW
    o_pix = n * K * P + k * P + r * Wo + j  # [BP] this voxel's entry in p_goff
    o_e = o_pix << LOG2_NC  # entry of corner 0
    tl.store(p_goff + o_pix, k * s_gk + d * s_gd + i * s_gh + j * s_gw, mask=mask_p)
    if MODE == 0:
        x0, y0, z0, tx, ty, tz, sx, sy, sz, in_x0, in_x1, in_y0, in_y1, in_z0, in_z1 = _trilinear(
            ix, iy, iz, W, H, D, INT64)
        q = (z0 * H + y0) * W + x0
        tl.store(p_idx + o_e, tl.where(in_z0 & in_y0 & in_x0, q, none), mask=mask_p)
        tl.store(p_idx + o_e + 1, tl.where(in_z0 & in_y0 & in_x1, q + 1, none), mask=mask_p)
        tl.store(p_idx + o_e + 2, tl.where(in_z0 & in_y1 & in_x0, q + W, none), mask=mask_p)
        tl.store(p_idx + o_e + 3, tl.where(in_z0 & in_y1 & in_x1, q + W + 1, none), mask=mask_p)
        tl.store(p_idx + o_e + 4, tl.where(in_z1 & in_y0 & in_x0, q + HW, none), mask=mask_p)
        tl.store(p_idx + o_e + 5, tl.where(in_z1 & in_y0 & in_x1, q + HW + 1, none), mask=mask_p)
        tl.store(p_idx + o_e + 6, tl.where(in_z1 & in_y1 & in_x0, q + HW + W, none), mask=mask_p)
        tl.store(p_idx + o_e + 7, tl.where(in_z1 & in_y1 & in_x1, q + HW + W + 1, none), mask=mask_p)
        tl.store(p_wt + o_e, sx * sy * sz, mask=mask_p)
        tl.store(p_wt + o_e + 1, tx * sy * sz, mask=mask_p)
        tl.store(p_wt + o_e + 2, sx * ty * sz, mask=mask_p)
        tl.store(p_wt + o_e + 3, tx * ty * sz, mask=mask_p)
        tl.store(p_wt + o_e + 4, sx * sy * tz, mask=mask_p)
        tl.store(p_wt + o_e + 5, tx * sy * tz, mask=mask_p)
        tl.store(p_wt + o_e + 6, sx * ty * tz, mask=mask_p)
        tl.store(p_wt + o_e + 7, tx * ty * tz, mask=mask_p)
    else:
        xr, yr, zr, inside = _nearest3(ix, iy, iz, W, H, D, INT64)
        tl.store(p_idx + o_e, tl.where(inside, (zr * H + yr) * W + xr, none), mask=mask_p)
        tl.store(p_wt + o_e, tl.full([BLOCK_P], 1.0, tl.float32), mask=mask_p)


@triton.jit
def gather_grad_input3d_kernel(
    p_gx,    # out: dL/dU [N, C, D, H, W] in U's dtype, strides s_d*
    p_go,    # dL/dV [N, K, C, Do, Ho, Wo], strides s_gn, s_gc (the rest is in p_goff)
    p_perm,  # int64 [N, E]: entries in order of target voxel (stable sort of corner_index3d_kernel's idx)
    p_wt,    # float32 [N, E]: weights, indexed by entry
    p_goff,  # int32/int64 [N, E >> LOG2_NC]: dL/dV offset of each entry's output voxel within its image
    p_seg,   # int32/int64 [N, D*H*W + 1]: first sorted position of each target voxel
    s_dn, s_dc, s_dd, s_dh, s_dw,
    s_gn, s_gc,
    C, D, H, W, E,
    INT64: tl.constexpr, EVEN_C: tl.constexpr, LOG2_NC: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # input voxels per program
    BLOCK_C: tl.constexpr,  # channels per program (grid axis 1 walks the channel blocks)
):
    """dL/dU at BLOCK_Q input voxels x BLOCK_C channels: their contributions summed in sorted order
    (the 2-D ``gather_grad_input_kernel`` with a voxel index)."""
    blk = tl.program_id(0)
    cb = tl.program_id(1)
    n = tl.program_id(2)
    if INT64:
        blk = blk.to(tl.int64)
        cb = cb.to(tl.int64)
        n = n.to(tl.int64)
    HW = H * W
    DHW = D * HW
    # Per-voxel values stay [BQ, 1]: Triton 3.6 miscompiles a loop-varying 1-D mask that is also
    # expanded to 2-D inside the loop ("mask type matches ptr type").
    offs_q = blk * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]  # input voxels [BQ, 1]
    mask_q = offs_q < DHW
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]  # [1, BC]
    if EVEN_C:
        mask_c = offs_c >= 0
    else:
        mask_c = offs_c < C
    p_seg_n = p_seg + n * (DHW + 1)
    start = tl.load(p_seg_n + offs_q, mask=mask_q, other=0)
    end = tl.load(p_seg_n + offs_q + 1, mask=mask_q, other=0)
    if not INT64:
        start = start.to(tl.int32)
        end = end.to(tl.int32)
    n_max = tl.max(tl.max(end - start, axis=1), axis=0)
    p_perm_n = p_perm + n * E
    p_wt_n = p_wt + n * E
    p_goff_n = p_goff + n * (E >> LOG2_NC)
    p_gon = p_go + n * s_gn + offs_c * s_gc  # [1, BC]
    acc = tl.zeros([BLOCK_Q, BLOCK_C], tl.float32)
    for t in range(0, n_max):
        pos = start + t
        live = mask_q & (pos < end)  # [BQ, 1]
        e = tl.load(p_perm_n + pos, mask=live, other=0)
        if not INT64:
            e = e.to(tl.int32)
        wt = tl.load(p_wt_n + e, mask=live, other=0.0)
        o_g = tl.load(p_goff_n + (e >> LOG2_NC), mask=live, other=0)
        go = tl.load(p_gon + o_g, mask=live & mask_c, other=0.0).to(tl.float32)
        acc += wt * go
    zq = offs_q // HW
    rem = offs_q - zq * HW
    yq = rem // W
    o_d = n * s_dn + zq * s_dd + yq * s_dh + (rem - yq * W) * s_dw  # [BQ, 1], once per program
    tl.store(p_gx + o_d + offs_c * s_dc, acc.to(p_gx.dtype.element_ty), mask=mask_q & mask_c)


@triton.jit
def basis3d_grad_kernel(
    p_gb,   # out: float32 dL/dB [DM, P] contiguous
    p_m,    # float32 M [NK, 3, DM] contiguous
    p_gg,   # float32 dL/dg [NK, P, 3] contiguous
    NK, DM, P,
    BLOCK_D: tl.constexpr,  # >= DM, a power of two
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_p = offs_p < P
    mask_d = offs_d < DM
    acc = tl.zeros([BLOCK_D, BLOCK_P], tl.float32)  # [BD, BP]
    p_gg_nk = p_gg  # advanced by one (n, k) per iteration: 64-bit pointer arithmetic
    p_m_nk = p_m
    for _ in range(0, NK):
        gg_x = tl.load(p_gg_nk + offs_p * 3, mask=mask_p, other=0.0)
        gg_y = tl.load(p_gg_nk + offs_p * 3 + 1, mask=mask_p, other=0.0)
        gg_z = tl.load(p_gg_nk + offs_p * 3 + 2, mask=mask_p, other=0.0)
        m_x = tl.load(p_m_nk + offs_d, mask=mask_d, other=0.0)
        m_y = tl.load(p_m_nk + DM + offs_d, mask=mask_d, other=0.0)
        m_z = tl.load(p_m_nk + 2 * DM + offs_d, mask=mask_d, other=0.0)
        acc += m_x[:, None] * gg_x[None, :] + m_y[:, None] * gg_y[None, :] + m_z[:, None] * gg_z[None, :]
        p_gg_nk += P * 3
        p_m_nk += DM * 3
    tl.store(p_gb + offs_d[:, None] * P + offs_p[None, :], acc, mask=mask_d[:, None] & mask_p[None, :])
