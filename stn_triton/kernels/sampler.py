"""The fused sampler: one forward and one backward kernel, specialised per form at compile time.

Forward, for output pixel p = (i, j) of transform (n, k) and channel c:

.. math::

    g_p = T_\\theta(p) \\quad (\\text{form: affine, projective, basis or grid}), \\qquad
    i_p = \\mathrm{pad}(a \\odot g_p + b)

    V_{n,k,c,p} = \\sum_{q \\in \\text{corners}(i_p)} w_{q}(i_p) \\, U_{n,c,q}

Backward, with :math:`\\bar V` the incoming gradient:

.. math::

    \\bar U_{n,c,q} \\mathrel{+}= \\sum_{k,p} w_q(i_p) \\, \\bar V_{n,k,c,p}

    \\bar g_{x,p} = a_x \\mathrm{pad}'(i_x) \\sum_c \\bar V_{c,p}
        \\left[(1-t_y)(U_{ne} - U_{nw}) + t_y (U_{se} - U_{sw})\\right]

(and the same for y), then the form turns :math:`\\bar g` into its parameters' gradient (see each
form's module). In the code, ``gg_x, gg_y`` are :math:`\\bar g`, ``tx, ty`` are
:math:`i - \\lfloor i \\rfloor`, ``sx, sy`` are :math:`1 - t`.

Bicubic (``MODE == 2``, PyTorch's cubic convolution, :mod:`stn_triton.kernels.common`): 4 x 4 taps
whose integer coordinates are padded one by one, weights :math:`c_j(t_y) c_i(t_x)` computed once per
pixel (``cx*``, ``cy*``; their derivatives ``ex*``, ``ey*``), then for each step of channels a loop
over the four rows of taps (a loop, so that one row's loads are in flight at a time rather than all
16: fewer registers). The backward scatters 16 contributions per pixel and

.. math::

    \\bar g_{x,p} = a_x \\sum_c \\bar V_{c,p} \\sum_{j} c_j(t_y) \\sum_i c_i'(t_x)\\, U_{c,j,i}, \\qquad
    \\bar g_{y,p} = a_y \\sum_c \\bar V_{c,p} \\sum_{j} c_j'(t_y) \\sum_i c_i(t_x)\\, U_{c,j,i}

Launch shape (every kernel here): a 3-D grid ``(pixel tile, k, n)``. A pixel tile is
``TILE_H x TILE_W`` output pixels, ``TILE_W = 2**LOG2_TW``, so a pixel's row and column are a shift
and a mask of its lane, never a division. Column tiles are numbered up to the power of two
``2**LOG2_CT`` (row tile ``pid >> LOG2_CT``, column tile ``pid & (2**LOG2_CT - 1)``); the few
programs whose column tile lies past the image return at once. Offsets are int32 unless a tensor
reaches past 2^31 elements (``INT64``).

The input gradient is a scatter: relaxed atomics (no fences) into either a float32 buffer or, for
channels-last half-precision inputs with few contributions per pixel, the gradient itself with
16-byte vector atomics (the launcher decides: :mod:`stn_triton.kernels.launch`). Under
``torch.use_deterministic_algorithms(True)`` it is a gather instead: :func:`corner_index_kernel` lists
each (pixel, corner) contribution's target input pixel and weight (4 corners bilinear, 1 nearest, 16
taps bicubic), the host sorts them by target with
a stable sort, and :func:`gather_grad_input_kernel` sums each input pixel's contributions in that
fixed order.
"""

import triton
import triton.language as tl

from .affine import affine_coords, affine_param_terms
from .basis import basis_coords, basis_param_grad
from .common import (bilinear_corners, cubic_coefficients, cubic_coefficients_grad, cubic_source, cubic_tap,
                     round_half_even, source_index, store_sums)
from .grid import grid_coords
from .projective import projective_coords, projective_param_terms

FORM_AFFINE, FORM_PROJECTIVE, FORM_BASIS, FORM_GRID = 0, 1, 2, 3
FORM_CODES = {"affine": FORM_AFFINE, "projective": FORM_PROJECTIVE, "basis": FORM_BASIS, "grid": FORM_GRID}


@triton.jit
def _tile(Ho, Wo, INT64: tl.constexpr, LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's (n, k), tile, and its pixels' rows ``i`` and columns ``j`` ([BLOCK_P] each)."""
    pid_p = tl.program_id(0)
    k = tl.program_id(1)
    n = tl.program_id(2)
    tile_r = pid_p >> LOG2_CT
    tile_c = pid_p & ((1 << LOG2_CT) - 1)
    r = tl.arange(0, BLOCK_P)
    i = tile_r * (BLOCK_P >> LOG2_TW) + (r >> LOG2_TW)  # [BP]
    j = tile_c * (1 << LOG2_TW) + (r & ((1 << LOG2_TW) - 1))  # [BP]
    if INT64:
        n = n.to(tl.int64)
        k = k.to(tl.int64)
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    mask_p = (i < Ho) & (j < Wo)
    return n, k, tile_r, tile_c, i, j, mask_p


@triton.jit
def _form_coords(
    FORM: tl.constexpr, p_prm_nk, p_aux, p_aux_nk, i, j, mask_p, Wo, P, D,
    s_ah, s_aw, s_ac, bsx, box, bsy, boy,
):
    """Normalised sampling coordinate of each pixel, plus what the backward needs of the form."""
    x = j.to(tl.float32) * bsx + box  # affine_grid's base grid
    y = i.to(tl.float32) * bsy + boy
    w = tl.full(x.shape, 1.0, tl.float32)
    if FORM == 0:
        gx, gy = affine_coords(p_prm_nk, x, y)
    elif FORM == 1:
        gx, gy, w = projective_coords(p_prm_nk, x, y)
    elif FORM == 2:
        gx, gy = basis_coords(p_prm_nk, p_aux, i * Wo + j, mask_p, D, P)
    else:
        gx, gy = grid_coords(p_aux_nk, i, j, mask_p, s_ah, s_aw, s_ac)
    return gx, gy, x, y, w


@triton.jit
def _corners(ix, iy, W, H, mask_p, s_h, s_w, INT64: tl.constexpr):
    """The four bilinear neighbours of each pixel's source point, as [BP, 1] blocks: the offset of the
    north-west one (strides ``s_h``, ``s_w``), each one's mask (the pixel exists and the neighbour lies
    inside the image) and weight; also the corners and fractions the backward needs."""
    x0, y0, tx, ty, sx, sy, in_x0, in_x1, in_y0, in_y1 = bilinear_corners(ix, iy, W, H, INT64)
    o_nw = (y0 * s_h + x0 * s_w)[:, None]
    m_nw = (mask_p & in_y0 & in_x0)[:, None]
    m_ne = (mask_p & in_y0 & in_x1)[:, None]
    m_sw = (mask_p & in_y1 & in_x0)[:, None]
    m_se = (mask_p & in_y1 & in_x1)[:, None]
    w_nw = (sx * sy)[:, None]
    w_ne = (tx * sy)[:, None]
    w_sw = (sx * ty)[:, None]
    w_se = (tx * ty)[:, None]
    return x0, y0, tx, ty, sx, sy, o_nw, m_nw, m_ne, m_sw, m_se, w_nw, w_ne, w_sw, w_se


@triton.jit
def _load_corners(p, o_nw, o_c, s_h, s_w, m_nw, m_ne, m_sw, m_se, mask_c):
    """U at the four neighbours, [BP, BC] float32 each (0 outside the image)."""
    v_nw = tl.load(p + o_nw + o_c, mask=m_nw & mask_c, other=0.0).to(tl.float32)
    v_ne = tl.load(p + (o_nw + s_w) + o_c, mask=m_ne & mask_c, other=0.0).to(tl.float32)
    v_sw = tl.load(p + (o_nw + s_h) + o_c, mask=m_sw & mask_c, other=0.0).to(tl.float32)
    v_se = tl.load(p + (o_nw + s_h + s_w) + o_c, mask=m_se & mask_c, other=0.0).to(tl.float32)
    return v_nw, v_ne, v_sw, v_se


@triton.jit
def _nearest(ix, iy, W, H, INT64: tl.constexpr):
    """The nearest pixel (halves to even, as ``nearbyint``) and whether it lies inside the image."""
    xr = round_half_even(ix)
    yr = round_half_even(iy)
    xr = xr.to(tl.int64) if INT64 else xr.to(tl.int32)
    yr = yr.to(tl.int64) if INT64 else yr.to(tl.int32)
    return xr, yr, (xr >= 0) & (xr < W) & (yr >= 0) & (yr < H)


@triton.jit
def _scatter_add(ptr, v, m, mask_c, EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """``*ptr += v`` where ``m``: relaxed atomics (no fence) in ``ptr``'s dtype. ``ptr`` [BP, BC] always
    points inside the gradient (corners are clamped into it).

    One channel per step: every lane adds (an exact 0 where ``m`` is false), because a predicated atomic
    compiles to a branch around it. A vector of channels: one predicate per vector, cheaper than
    selecting each element."""
    if BLOCK_C == 1:
        v = tl.where(m, v, 0.0).to(ptr.dtype.element_ty)
        if EVEN_C:
            tl.atomic_add(ptr, v, sem="relaxed")
        else:
            tl.atomic_add(ptr, v, mask=mask_c, sem="relaxed")
    else:
        tl.atomic_add(ptr, v.to(ptr.dtype.element_ty), mask=m & mask_c, sem="relaxed")


@triton.jit
def _cubic_axis(i, size, PAD: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    """One axis of each pixel's 4 x 4 bicubic taps ([BP] each): the four taps' integer coordinates
    (padded, clamped into the image), whether each lies inside, and the fraction ``t``."""
    f = tl.floor(i)
    t = i - f
    q0, m0 = cubic_tap(f - 1.0, size, PAD, ALIGN, INT64)
    q1, m1 = cubic_tap(f, size, PAD, ALIGN, INT64)
    q2, m2 = cubic_tap(f + 1.0, size, PAD, ALIGN, INT64)
    q3, m3 = cubic_tap(f + 2.0, size, PAD, ALIGN, INT64)
    return q0, q1, q2, q3, m0, m1, m2, m3, t


@triton.jit
def _offsets4(q0, q1, q2, q3, s):
    """Four taps' coordinates times the stride ``s``, as [BP, 1] blocks."""
    return (q0 * s)[:, None], (q1 * s)[:, None], (q2 * s)[:, None], (q3 * s)[:, None]


@triton.jit
def _cubic_row(p, o_y, m_y, ox0, ox1, ox2, ox3, mx0, mx1, mx2, mx3, mask_c):
    """U at one row of four taps, [BP, BC] float32 each (0 outside the image). ``p``: [1, BC] pointers
    (image n, the step's channels); ``o_y``, ``m_y``: the row's offset and mask; ``ox*``, ``mx*``: the
    columns'."""
    m = m_y & mask_c
    v0 = tl.load(p + o_y + ox0, mask=m & mx0, other=0.0).to(tl.float32)
    v1 = tl.load(p + o_y + ox1, mask=m & mx1, other=0.0).to(tl.float32)
    v2 = tl.load(p + o_y + ox2, mask=m & mx2, other=0.0).to(tl.float32)
    v3 = tl.load(p + o_y + ox3, mask=m & mx3, other=0.0).to(tl.float32)
    return v0, v1, v2, v3


@triton.jit
def _cubic_scatter_row(p, w_y, m_y, ox0, ox1, ox2, ox3, mx0, mx1, mx2, mx3, cx0, cx1, cx2, cx3, mask_c,
                       EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dL/dU += w_y * c_i`` at one row of four taps (``p``: [BP, BC] pointers at the row;
    ``w_y``: dL/dV times the row's coefficient)."""
    _scatter_add(p + ox0, w_y * cx0, m_y & mx0, mask_c, EVEN_C, BLOCK_C)
    _scatter_add(p + ox1, w_y * cx1, m_y & mx1, mask_c, EVEN_C, BLOCK_C)
    _scatter_add(p + ox2, w_y * cx2, m_y & mx2, mask_c, EVEN_C, BLOCK_C)
    _scatter_add(p + ox3, w_y * cx3, m_y & mx3, mask_c, EVEN_C, BLOCK_C)


@triton.jit
def _pick4(r, v0, v1, v2, v3):
    """``v_r`` for a loop index ``r`` in 0..3."""
    return tl.where(r == 0, v0, tl.where(r == 1, v1, tl.where(r == 2, v2, v3)))


@triton.jit
def _cubic_fwd_row(r, v, p_x, oy0, oy1, oy2, oy3, my0, my1, my2, my3, cy0, cy1, cy2, cy3,
                   ox0, ox1, ox2, ox3, mx0, mx1, mx2, mx3, cx0, cx1, cx2, cx3, mask_c):
    """``v`` plus row ``r`` of the taps interpolated along x, times its weight: ``c_r sum_i c_i U_ri``
    ([BP, BC]; ``p_x``: [1, BC] pointers to the step's channels of image n). (The loop over ``r`` in
    the kernel holds nothing but this call, so that the compile-only report, which names a SASS
    loop by the ``for`` most of its instructions come from, names the channel loop when the
    compiler unrolls this one.)"""
    v0, v1, v2, v3 = _cubic_row(p_x, _pick4(r, oy0, oy1, oy2, oy3), _pick4(r, my0, my1, my2, my3),
                                ox0, ox1, ox2, ox3, mx0, mx1, mx2, mx3, mask_c)
    return v + _pick4(r, cy0, cy1, cy2, cy3) * (cx0 * v0 + cx1 * v1 + cx2 * v2 + cx3 * v3)


@triton.jit
def _cubic_bwd_row(r, p_gx, p_x, go, dy0, dy1, dy2, dy3, oy0, oy1, oy2, oy3, my0, my1, my2, my3,
                   cy0, cy1, cy2, cy3, ey0, ey1, ey2, ey3, dx0, dx1, dx2, dx3, ox0, ox1, ox2, ox3,
                   mx0, mx1, mx2, mx3, cx0, cx1, cx2, cx3, ex0, ex1, ex2, ex3, mask_c, h_x, h_y,
                   NEED_X: tl.constexpr, NEED_G: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """The backward at row ``r`` of the four rows of taps (``p_gx``, ``p_x``: [1, BC] pointers to the
    step's channels of image n in dL/dU and U; ``*y*``: the rows' offsets, masks, weights and the
    weights' derivatives, ``*x*``: the columns'): dL/dU += dL/dV c_r c_i (PyTorch's
    add_value_bounded), and the row's terms of dV/di_x (``h_x += c_r sum_i c_i' U_i``) and dV/di_y
    (``h_y += c_r' sum_i c_i U_i``)."""
    m_y = _pick4(r, my0, my1, my2, my3)
    c_y = _pick4(r, cy0, cy1, cy2, cy3)
    if NEED_X:
        _cubic_scatter_row(p_gx + _pick4(r, dy0, dy1, dy2, dy3), go * c_y, m_y, dx0, dx1, dx2, dx3,
                           mx0, mx1, mx2, mx3, cx0, cx1, cx2, cx3, mask_c, EVEN_C, BLOCK_C)
    if NEED_G:
        v0, v1, v2, v3 = _cubic_row(p_x, _pick4(r, oy0, oy1, oy2, oy3), m_y, ox0, ox1, ox2, ox3,
                                    mx0, mx1, mx2, mx3, mask_c)
        h_x += c_y * (ex0 * v0 + ex1 * v1 + ex2 * v2 + ex3 * v3)
        h_y += _pick4(r, ey0, ey1, ey2, ey3) * (cx0 * v0 + cx1 * v1 + cx2 * v2 + cx3 * v3)
    return h_x, h_y


@triton.jit
def _cubic_index_row(p_idx, p_wt, q_y, m_y, qx0, qx1, qx2, qx3, mx0, mx1, mx2, mx3, c_y, cx0, cx1, cx2, cx3,
                     none, mask_p):
    """The deterministic backward's entries of one row of four taps: target pixel (``none`` outside the
    image) and weight. ``q_y``: the row's ``y * W``."""
    tl.store(p_idx + 0, tl.where(m_y & mx0, q_y + qx0, none), mask=mask_p)
    tl.store(p_idx + 1, tl.where(m_y & mx1, q_y + qx1, none), mask=mask_p)
    tl.store(p_idx + 2, tl.where(m_y & mx2, q_y + qx2, none), mask=mask_p)
    tl.store(p_idx + 3, tl.where(m_y & mx3, q_y + qx3, none), mask=mask_p)
    tl.store(p_wt + 0, c_y * cx0, mask=mask_p)
    tl.store(p_wt + 1, c_y * cx1, mask=mask_p)
    tl.store(p_wt + 2, c_y * cx2, mask=mask_p)
    tl.store(p_wt + 3, c_y * cx3, mask=mask_p)


@triton.jit
def sample_fwd_kernel(
    p_x,    # input U [N, C, H, W], strides s_xn, s_xc, s_xh, s_xw (any layout)
    p_out,  # output V [N, K, C, Ho, Wo], strides s_on, s_ok, s_oc, s_oh, s_ow
    p_prm,  # float32 [N*K, R]: the form's matrix (R = 6 affine, 9 projective, 2*D basis)
    p_aux,  # basis: float32 B [D, Ho*Wo]; grid: grid [N, K, Ho, Wo, 2], strides s_a*
    s_xn, s_xc, s_xh, s_xw,
    s_on, s_ok, s_oc, s_oh, s_ow,
    s_an, s_ak, s_ah, s_aw, s_ac,
    C, H, W, K, Ho, Wo, D, R,
    bsx, box, bsy, boy,  # base grid x_j = bsx * j + box, y_i = bsy * i + boy
    FORM: tl.constexpr, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr,
    FMA: tl.constexpr,      # a correctly rounded multiply-add is available (compiled; see common.source_index)
    INT64: tl.constexpr,    # some offset may pass 2^31: 64-bit index arithmetic
    EVEN_C: tl.constexpr,   # C % BLOCK_C == 0: no channel mask
    LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr,  # tile width 2**LOG2_TW; column tiles numbered to 2**LOG2_CT
    BLOCK_P: tl.constexpr,  # pixels per program (a power of two, >= the tile width)
    BLOCK_C: tl.constexpr,  # channels per step: 1 (planar inputs) or a 16-byte vector (channels-last)
):
    n, k, tile_r, tile_c, i, j, mask_p = _tile(Ho, Wo, INT64, LOG2_TW, LOG2_CT, BLOCK_P)
    if tile_c * (1 << LOG2_TW) >= Wo:  # a column tile past the image (2**LOG2_CT rounds up)
        return
    P = Ho * Wo
    nk = n * K + k
    gx, gy, x, y, w = _form_coords(FORM, p_prm + nk * R, p_aux, p_aux + n * s_an + k * s_ak, i, j, mask_p,
                                   Wo, P, D, s_ah, s_aw, s_ac, bsx, box, bsy, boy)
    if MODE == 2:  # bicubic pads each tap, not the coordinate
        ix, _ = cubic_source(gx, W, PAD, ALIGN, FMA)
        iy, _ = cubic_source(gy, H, PAD, ALIGN, FMA)
    else:
        ix, _ = source_index(gx, W, PAD, ALIGN, FMA)
        iy, _ = source_index(gy, H, PAD, ALIGN, FMA)

    p_xn = p_x + n * s_xn
    p_on = p_out + n * s_on + k * s_ok
    o_out = (i * s_oh + j * s_ow)[:, None]  # [BP, 1]
    m_out = mask_p[:, None]
    if MODE == 0:
        x0, y0, tx, ty, sx, sy, o_nw, m_nw, m_ne, m_sw, m_se, w_nw, w_ne, w_sw, w_se = _corners(
            ix, iy, W, H, mask_p, s_xh, s_xw, INT64)
    elif MODE == 1:
        xr, yr, inside = _nearest(ix, iy, W, H, INT64)
        o_nn = (yr * s_xh + xr * s_xw)[:, None]
        m_nn = (mask_p & inside)[:, None]
    else:
        # the 4 x 4 taps as [BP, 1] blocks: column offsets/masks/weights, row offsets/masks/weights
        qx0, qx1, qx2, qx3, mx0, mx1, mx2, mx3, tx = _cubic_axis(ix, W, PAD, ALIGN, INT64)
        qy0, qy1, qy2, qy3, my0, my1, my2, my3, ty = _cubic_axis(iy, H, PAD, ALIGN, INT64)
        cx0, cx1, cx2, cx3 = cubic_coefficients(tx[:, None])
        cy0, cy1, cy2, cy3 = cubic_coefficients(ty[:, None])
        ox0, ox1, ox2, ox3 = _offsets4(qx0, qx1, qx2, qx3, s_xw)
        oy0, oy1, oy2, oy3 = _offsets4(qy0, qy1, qy2, qy3, s_xh)
        mx0, mx1, mx2, mx3 = mx0[:, None], mx1[:, None], mx2[:, None], mx3[:, None]
        my0, my1 = (mask_p & my0)[:, None], (mask_p & my1)[:, None]
        my2, my3 = (mask_p & my2)[:, None], (mask_p & my3)[:, None]

    offs_c = tl.arange(0, BLOCK_C)[None, :]  # [1, BC]
    for c0 in range(0, C, BLOCK_C):
        if EVEN_C:
            mask_c = offs_c < BLOCK_C  # all true, folded away
        else:
            mask_c = (c0 + offs_c) < C
        o_c = (c0 + offs_c) * s_xc  # [1, BC]
        if MODE == 0:
            v_nw, v_ne, v_sw, v_se = _load_corners(p_xn, o_nw, o_c, s_xh, s_xw, m_nw, m_ne, m_sw, m_se, mask_c)
            v = w_nw * v_nw + w_ne * v_ne + w_sw * v_sw + w_se * v_se
        elif MODE == 1:
            v = tl.load(p_xn + o_nn + o_c, mask=m_nn & mask_c, other=0.0).to(tl.float32)
        else:  # a row of taps at a time, interpolated along x, then the rows along y
            v = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
            for r in range(0, 4):  # a loop: one row's 4 loads in flight at a time (see the module doc)
                v = _cubic_fwd_row(r, v, p_xn + o_c, oy0, oy1, oy2, oy3, my0, my1, my2, my3, cy0, cy1, cy2, cy3,
                                   ox0, ox1, ox2, ox3, mx0, mx1, mx2, mx3, cx0, cx1, cx2, cx3, mask_c)
        tl.store(p_on + o_out + (c0 + offs_c) * s_oc, v.to(p_out.dtype.element_ty), mask=m_out & mask_c)


@triton.jit
def sample_bwd_kernel(
    p_x,     # input U [N, C, H, W], strides s_x*
    p_go,    # incoming gradient dL/dV [N, K, C, Ho, Wo], strides s_g*
    p_gx,    # out: dL/dU [N, C, H, W], strides s_d*, zeroed, accumulated with atomics (if NEED_X): float32,
             #      or U's own half dtype (16-byte vector atomics, channels-last only)
    p_prm,   # float32 [N*K, R], as in the forward
    p_aux,   # as in the forward
    p_part,  # out: float32 [N*K, NPROG, R] dL/dM summed over each program's pixels (if NEED_PARAM)
    p_gg,    # out: float32 [N*K, Ho*Wo, 2] dL/dg (if WRITE_GG)
    s_xn, s_xc, s_xh, s_xw,
    s_gn, s_gk, s_gc, s_gh, s_gw,
    s_dn, s_dc, s_dh, s_dw,
    s_an, s_ak, s_ah, s_aw, s_ac,
    C, H, W, K, Ho, Wo, D, R,
    NPROG,  # programs with pixels per (n, k): the partials' row length
    NCT,    # column tiles
    bsx, box, bsy, boy,
    FORM: tl.constexpr, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr, FMA: tl.constexpr,
    NEED_X: tl.constexpr, NEED_G: tl.constexpr, NEED_PARAM: tl.constexpr, WRITE_GG: tl.constexpr,
    INT64: tl.constexpr, EVEN_C: tl.constexpr, LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    TPP: tl.constexpr,  # tiles per program (a column of TPP row tiles; 1 for the basis form): the
                        # parameter gradient is reduced across the program once, not once per tile
):
    # NEED_G: the coordinate gradient is wanted (bilinear and bicubic: nearest is piecewise constant)
    tl.static_assert(TPP == 1 or FORM != 2, "the basis form reduces per tile")
    n, k, grp, tile_c, i0, j, _ = _tile(Ho, Wo, INT64, LOG2_TW, LOG2_CT, BLOCK_P)
    if tile_c * (1 << LOG2_TW) >= Wo:
        return
    TILE_H: tl.constexpr = BLOCK_P >> LOG2_TW
    P = Ho * Wo
    nk = n * K + k
    p_prm_nk = p_prm + nk * R
    p_aux_nk = p_aux + n * s_an + k * s_ak
    p_xn = p_x + n * s_xn
    p_gxn = p_gx + n * s_dn
    p_gon = p_go + n * s_gn + k * s_gk
    p_part_i = p_part + (nk * NPROG + grp * NCT + tile_c) * R
    offs_c = tl.arange(0, BLOCK_C)[None, :]  # [1, BC]
    # the parameter gradient's per-pixel terms, summed over the program's tiles (affine: 6, projective: 9)
    a0 = tl.zeros([BLOCK_P], tl.float32)
    a1 = tl.zeros([BLOCK_P], tl.float32)
    a2 = tl.zeros([BLOCK_P], tl.float32)
    a3 = tl.zeros([BLOCK_P], tl.float32)
    a4 = tl.zeros([BLOCK_P], tl.float32)
    a5 = tl.zeros([BLOCK_P], tl.float32)
    a6 = tl.zeros([BLOCK_P], tl.float32)
    a7 = tl.zeros([BLOCK_P], tl.float32)
    a8 = tl.zeros([BLOCK_P], tl.float32)
    n_here = tl.minimum(TPP, tl.cdiv(Ho, TILE_H) - grp * TPP)  # the last column of tiles may be short
    for t in range(0, n_here):
        i = i0 + (grp * (TPP - 1) + t) * TILE_H  # tile row grp * TPP + t (i0 is tile row grp's)
        mask_p = (i < Ho) & (j < Wo)
        gx, gy, x, y, w = _form_coords(FORM, p_prm_nk, p_aux, p_aux_nk, i, j, mask_p,
                                       Wo, P, D, s_ah, s_aw, s_ac, bsx, box, bsy, boy)
        if MODE == 2:
            ix, dix = cubic_source(gx, W, PAD, ALIGN, FMA)
            iy, diy = cubic_source(gy, H, PAD, ALIGN, FMA)
        else:
            ix, dix = source_index(gx, W, PAD, ALIGN, FMA)
            iy, diy = source_index(gy, H, PAD, ALIGN, FMA)
        o_go = (i * s_gh + j * s_gw)[:, None]  # [BP, 1]
        m_go = mask_p[:, None]
        if MODE == 2:
            qx0, qx1, qx2, qx3, mx0, mx1, mx2, mx3, tx = _cubic_axis(ix, W, PAD, ALIGN, INT64)
            qy0, qy1, qy2, qy3, my0, my1, my2, my3, ty = _cubic_axis(iy, H, PAD, ALIGN, INT64)
            cx0, cx1, cx2, cx3 = cubic_coefficients(tx[:, None])
            cy0, cy1, cy2, cy3 = cubic_coefficients(ty[:, None])
            mx0, mx1, mx2, mx3 = mx0[:, None], mx1[:, None], mx2[:, None], mx3[:, None]
            my0, my1 = (mask_p & my0)[:, None], (mask_p & my1)[:, None]
            my2, my3 = (mask_p & my2)[:, None], (mask_p & my3)[:, None]
            # the scatter's targets (the gradient's strides; unused without NEED_X), the taps to read (U's
            # strides) and the weights' derivatives (unused without NEED_G)
            dx0, dx1, dx2, dx3 = _offsets4(qx0, qx1, qx2, qx3, s_dw)
            dy0, dy1, dy2, dy3 = _offsets4(qy0, qy1, qy2, qy3, s_dh)
            ox0, ox1, ox2, ox3 = _offsets4(qx0, qx1, qx2, qx3, s_xw)
            oy0, oy1, oy2, oy3 = _offsets4(qy0, qy1, qy2, qy3, s_xh)
            ex0, ex1, ex2, ex3 = cubic_coefficients_grad(tx[:, None])
            ey0, ey1, ey2, ey3 = cubic_coefficients_grad(ty[:, None])
        elif MODE == 0:
            x0, y0, tx, ty, sx, sy, o_nw, m_nw, m_ne, m_sw, m_se, w_nw, w_ne, w_sw, w_se = _corners(
                ix, iy, W, H, mask_p, s_xh, s_xw, INT64)
            # the scatter's targets, clamped into the image (see _scatter_add)
            cx0 = tl.minimum(tl.maximum(x0, 0), W - 1)
            cx1 = tl.minimum(tl.maximum(x0 + 1, 0), W - 1)
            cy0 = tl.minimum(tl.maximum(y0, 0), H - 1) * s_dh
            cy1 = tl.minimum(tl.maximum(y0 + 1, 0), H - 1) * s_dh
            d_nw = (cy0 + cx0 * s_dw)[:, None]
            d_ne = (cy0 + cx1 * s_dw)[:, None]
            d_sw = (cy1 + cx0 * s_dw)[:, None]
            d_se = (cy1 + cx1 * s_dw)[:, None]
        else:
            xr, yr, inside = _nearest(ix, iy, W, H, INT64)
            m_nn = (mask_p & inside)[:, None]
            d_nn = (tl.minimum(tl.maximum(yr, 0), H - 1) * s_dh
                    + tl.minimum(tl.maximum(xr, 0), W - 1) * s_dw)[:, None]
        g_ix = tl.zeros([BLOCK_P], tl.float32)  # sum_c dL/dV * dV/di_x
        g_iy = tl.zeros([BLOCK_P], tl.float32)
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
                        _scatter_add(p_gxc + d_nw, go * w_nw, m_nw, mask_c, EVEN_C, BLOCK_C)
                        _scatter_add(p_gxc + d_ne, go * w_ne, m_ne, mask_c, EVEN_C, BLOCK_C)
                        _scatter_add(p_gxc + d_sw, go * w_sw, m_sw, mask_c, EVEN_C, BLOCK_C)
                        _scatter_add(p_gxc + d_se, go * w_se, m_se, mask_c, EVEN_C, BLOCK_C)
                    elif MODE == 1:
                        _scatter_add(p_gxc + d_nn, go, m_nn, mask_c, EVEN_C, BLOCK_C)
                if MODE == 2:
                    # row by row (each row's scatter, then its loads: 4 taps' values live at a time)
                    p_gxc = p_gxn + (c0 + offs_c) * s_dc  # [1, BC] (a stand-in when NEED_X is off)
                    p_c = p_xn + (c0 + offs_c) * s_xc
                    h_x = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
                    h_y = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
                    for r in range(0, 4):  # a loop: one row's taps at a time (see the module doc)
                        h_x, h_y = _cubic_bwd_row(r, p_gxc, p_c, go, dy0, dy1, dy2, dy3, oy0, oy1, oy2, oy3,
                                                  my0, my1, my2, my3, cy0, cy1, cy2, cy3, ey0, ey1, ey2, ey3,
                                                  dx0, dx1, dx2, dx3, ox0, ox1, ox2, ox3, mx0, mx1, mx2, mx3,
                                                  cx0, cx1, cx2, cx3, ex0, ex1, ex2, ex3, mask_c, h_x, h_y,
                                                  NEED_X, NEED_G, EVEN_C, BLOCK_C)
                    if NEED_G:
                        g_ix += tl.sum(go * h_x, axis=1)
                        g_iy += tl.sum(go * h_y, axis=1)
                elif NEED_G:
                    v_nw, v_ne, v_sw, v_se = _load_corners(p_xn, o_nw, (c0 + offs_c) * s_xc, s_xh, s_xw,
                                                           m_nw, m_ne, m_sw, m_se, mask_c)
                    g_ix += tl.sum(go * (sy[:, None] * (v_ne - v_nw) + ty[:, None] * (v_se - v_sw)), axis=1)
                    g_iy += tl.sum(go * (sx[:, None] * (v_sw - v_nw) + tx[:, None] * (v_se - v_ne)), axis=1)

        gg_x = tl.where(mask_p, g_ix * dix, 0.0)  # dL/dg_x [BP]
        gg_y = tl.where(mask_p, g_iy * diy, 0.0)
        if WRITE_GG:
            o_p = (nk * P + i * Wo + j) * 2
            tl.store(p_gg + o_p, gg_x, mask=mask_p)
            tl.store(p_gg + o_p + 1, gg_y, mask=mask_p)
        if NEED_PARAM:
            if FORM == 0:
                a0, a1, a2, a3, a4, a5 = affine_param_terms(a0, a1, a2, a3, a4, a5, x, y, gg_x, gg_y)
            elif FORM == 1:
                a0, a1, a2, a3, a4, a5, a6, a7, a8 = projective_param_terms(
                    a0, a1, a2, a3, a4, a5, a6, a7, a8, x, y, gx, gy, w, gg_x, gg_y, mask_p)
            elif FORM == 2:
                basis_param_grad(p_part_i, p_aux, i * Wo + j, mask_p, D, P, gg_x, gg_y)
    if NEED_PARAM:
        if FORM == 0:
            store_sums(p_part_i, a0, a1, a2, a3, a4, a5)
        elif FORM == 1:
            store_sums(p_part_i, a0, a1, a2, a3, a4, a5)
            store_sums(p_part_i + 6, a6, a7, a8, a8, a8, a8, N_SUMS=3)


@triton.jit
def corner_index_kernel(
    p_idx,  # out: int32 or int64 [N, K*Ho*Wo*NCORNER] target input pixel (y * W + x), H*W where none
    p_wt,   # out: float32 [N, K*Ho*Wo*NCORNER] weight of that contribution
    p_goff, # out: int32 or int64 [N, K*Ho*Wo] offset of the pixel's dL/dV within image n (channel 0)
    p_prm, p_aux,
    s_gk, s_gh, s_gw,  # strides of dL/dV [N, K, C, Ho, Wo] (k, row, column)
    s_an, s_ak, s_ah, s_aw, s_ac,
    H, W, K, Ho, Wo, D, R,
    bsx, box, bsy, boy,
    FORM: tl.constexpr, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr, FMA: tl.constexpr,
    INT64: tl.constexpr,
    LOG2_NC: tl.constexpr,  # log2 of the contributions per pixel: 2 (bilinear), 0 (nearest), 4 (bicubic)
    LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n, k, tile_r, tile_c, i, j, mask_p = _tile(Ho, Wo, INT64, LOG2_TW, LOG2_CT, BLOCK_P)
    if tile_c * (1 << LOG2_TW) >= Wo:
        return
    P = Ho * Wo
    nk = n * K + k
    gx, gy, x, y, w = _form_coords(FORM, p_prm + nk * R, p_aux, p_aux + n * s_an + k * s_ak, i, j, mask_p,
                                   Wo, P, D, s_ah, s_aw, s_ac, bsx, box, bsy, boy)
    if MODE == 2:
        ix, _ = cubic_source(gx, W, PAD, ALIGN, FMA)
        iy, _ = cubic_source(gy, H, PAD, ALIGN, FMA)
    else:
        ix, _ = source_index(gx, W, PAD, ALIGN, FMA)
        iy, _ = source_index(gy, H, PAD, ALIGN, FMA)
    none = H * W
    o_pix = n * K * P + k * P + i * Wo + j  # [BP] this pixel's entry in p_goff
    o_e = o_pix << LOG2_NC  # entry of corner 0
    tl.store(p_goff + o_pix, k * s_gk + i * s_gh + j * s_gw, mask=mask_p)
    if MODE == 0:
        x0, y0, tx, ty, sx, sy, in_x0, in_x1, in_y0, in_y1 = bilinear_corners(ix, iy, W, H, INT64)
        q = y0 * W + x0
        tl.store(p_idx + o_e, tl.where(in_y0 & in_x0, q, none), mask=mask_p)
        tl.store(p_idx + o_e + 1, tl.where(in_y0 & in_x1, q + 1, none), mask=mask_p)
        tl.store(p_idx + o_e + 2, tl.where(in_y1 & in_x0, q + W, none), mask=mask_p)
        tl.store(p_idx + o_e + 3, tl.where(in_y1 & in_x1, q + W + 1, none), mask=mask_p)
        tl.store(p_wt + o_e, sx * sy, mask=mask_p)
        tl.store(p_wt + o_e + 1, tx * sy, mask=mask_p)
        tl.store(p_wt + o_e + 2, sx * ty, mask=mask_p)
        tl.store(p_wt + o_e + 3, tx * ty, mask=mask_p)
    elif MODE == 1:
        xr, yr, inside = _nearest(ix, iy, W, H, INT64)
        tl.store(p_idx + o_e, tl.where(inside, yr * W + xr, none), mask=mask_p)
        tl.store(p_wt + o_e, tl.full([BLOCK_P], 1.0, tl.float32), mask=mask_p)
    else:  # 16 taps, entry 4 * row + column; border and reflection may send several to one pixel
        qx0, qx1, qx2, qx3, mx0, mx1, mx2, mx3, tx = _cubic_axis(ix, W, PAD, ALIGN, INT64)
        qy0, qy1, qy2, qy3, my0, my1, my2, my3, ty = _cubic_axis(iy, H, PAD, ALIGN, INT64)
        cx0, cx1, cx2, cx3 = cubic_coefficients(tx)
        cy0, cy1, cy2, cy3 = cubic_coefficients(ty)
        _cubic_index_row(p_idx + o_e, p_wt + o_e, qy0 * W, my0, qx0, qx1, qx2, qx3, mx0, mx1, mx2, mx3,
                         cy0, cx0, cx1, cx2, cx3, none, mask_p)
        _cubic_index_row(p_idx + o_e + 4, p_wt + o_e + 4, qy1 * W, my1, qx0, qx1, qx2, qx3, mx0, mx1, mx2, mx3,
                         cy1, cx0, cx1, cx2, cx3, none, mask_p)
        _cubic_index_row(p_idx + o_e + 8, p_wt + o_e + 8, qy2 * W, my2, qx0, qx1, qx2, qx3, mx0, mx1, mx2, mx3,
                         cy2, cx0, cx1, cx2, cx3, none, mask_p)
        _cubic_index_row(p_idx + o_e + 12, p_wt + o_e + 12, qy3 * W, my3, qx0, qx1, qx2, qx3, mx0, mx1, mx2, mx3,
                         cy3, cx0, cx1, cx2, cx3, none, mask_p)


@triton.jit
def gather_grad_input_kernel(
    p_gx,    # out: dL/dU [N, C, H, W] in U's dtype, strides s_d*
    p_go,    # dL/dV [N, K, C, Ho, Wo], strides s_gn, s_gc (the rest is in p_goff)
    p_perm,  # int64 [N, E]: entries in order of target pixel (stable sort of corner_index_kernel's idx)
    p_wt,    # float32 [N, E]: weights, indexed by entry
    p_goff,  # int32/int64 [N, E >> LOG2_NC]: dL/dV offset of each entry's output pixel within its image
    p_seg,   # int32/int64 [N, H*W + 1]: first sorted position of each target pixel
    s_dn, s_dc, s_dh, s_dw,
    s_gn, s_gc,
    C, H, W, E,
    INT64: tl.constexpr, EVEN_C: tl.constexpr, LOG2_NC: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # input pixels per program
    BLOCK_C: tl.constexpr,  # channels per program (grid axis 1 walks the channel blocks)
):
    """dL/dU at BLOCK_Q input pixels x BLOCK_C channels: their contributions summed in sorted order.

    The contribution loop is outermost: each contribution's entry, weight and dL/dV offset are loaded
    once per program, and its channels are read as one [BQ, BC] block.
    """
    blk = tl.program_id(0)
    cb = tl.program_id(1)
    n = tl.program_id(2)
    if INT64:
        blk = blk.to(tl.int64)
        cb = cb.to(tl.int64)
        n = n.to(tl.int64)
    HW = H * W
    # Per-pixel values stay [BQ, 1]: Triton 3.6 miscompiles a loop-varying 1-D mask that is also
    # expanded to 2-D inside the loop ("mask type matches ptr type").
    offs_q = blk * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]  # input pixels [BQ, 1]
    mask_q = offs_q < HW
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]  # [1, BC]
    if EVEN_C:
        mask_c = offs_c >= 0
    else:
        mask_c = offs_c < C
    p_seg_n = p_seg + n * (HW + 1)
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
    o_d = n * s_dn + (offs_q // W) * s_dh + (offs_q % W) * s_dw  # [BQ, 1], once per program
    tl.store(p_gx + o_d + offs_c * s_dc, acc.to(p_gx.dtype.element_ty), mask=mask_q & mask_c)
