"""The fused sampler, written once for 2-D and 3-D: forward, backward, deterministic index and gather
kernels, each specialised at compile time by the form (its coordinate map ``COORDS`` and parameter
terms ``TERMS``, :mod:`stn_triton.kernels.forms`), the dimension ``NDIM``, the mode and the padding.

Input U (N, C, [D,] H, W), output V (N, K, C, [Do,] Ho, Wo). For output pixel p of transform (n, k):

.. math::

    g_p = T_\\theta(p) \\quad (\\text{the form}), \\qquad
    i_{a,p} = \\mathrm{pad}(\\mathrm{unnormalize}(g_{a,p})) \\quad (a = x, y[, z])

    V_{n,k,c,p} = \\sum_{\\text{taps } q} \\prod_a w_{a,q_a}(t_a) \\, U_{n,c,q}

Taps per axis (``NT``): linear 2 (``w = 1 - t, t``; PyTorch's bilinear, trilinear on 5-D input),
nearest 1 (the rounded index, halves to even), cubic 4 (PyTorch's cubic convolution, A = -0.75, each
tap padded on its own: :mod:`stn_triton.kernels.common`). A pixel's taps are ``NT ** NDIM``: the
product of its axes' taps, enumerated as rows (every axis but x: ``NT ** (NDIM - 1)`` of them, row
``r`` = y tap ``r % NT``, z tap ``r // NT``) of ``NT`` taps along x. Linear and nearest rows are
unrolled; cubic rows are a loop, so that one row's loads are in flight at a time (fewer registers).

Backward, with :math:`\\bar V` the incoming gradient:

.. math::

    \\bar U_{n,c,q} \\mathrel{+}= \\sum_{k,p} w_q(i_p) \\, \\bar V_{n,k,c,p}, \\qquad
    \\bar g_{a,p} = s_a(i_{a,p}) \\sum_c \\bar V_{c,p} \\sum_q \\frac{\\partial w_q}{\\partial t_a} U_{c,q}

where :math:`s_a` is ``d i / d g`` (the unnormalising scale times the padding's derivative) and
:math:`\\partial w_q / \\partial t_a` replaces axis a's weight by its derivative (``e``: -1, +1 for
linear, the coefficients' derivatives for cubic). In the code, per row: ``sx`` is the row
interpolated along x and ``dx`` its x-derivative; ``h_x += w_row * dx``, ``h_y += e_y w_z * sx``,
``h_z += w_y e_z * sx``; then ``gg_a = s_a * sum_c go * h_a`` (with 8 or more channels per step,
each row's ``dx`` and ``sx`` are weighed by ``go`` and summed over the channels first, so ``h_a`` is one
value per pixel, not one per channel). The form turns :math:`\\bar g` into its
parameters' gradient: a block of per-pixel terms (``TERMS``) summed over the program's pixels in
float32, stage one of a fixed-order two-stage reduction (the host sums the programs' partials).

Launch shape (every kernel here): a 3-D grid ``(tile, k, n)`` over the output's plane of rows
``r = d * Ho + i`` (2-D: ``r = i``) and columns ``j``. A tile is ``TILE_H x TILE_W`` pixels,
``TILE_W = 2**LOG2_TW``, so a pixel's row and column are a shift and a mask of its lane; column tiles
are numbered up to ``2**LOG2_CT`` (the programs past the image return at once). Offsets are int32
unless a tensor reaches past 2^31 elements (``INT64``). Where the launcher knows every tile to be whole
(``FULL``) no pixel is masked; otherwise the forward and the tap-index kernel repeat the plane's last
row and column in a tile's pixels past it (:func:`_repeat_edges`: no mask either) and the backward
masks them. Where a volume's tiles each lie in one depth slice (``ONE_SLICE``) a tile's depth is one
division per tile.

The input gradient is a scatter: relaxed atomics (no fences) into a float32 buffer or, for
channels-last half-precision inputs with few contributions per pixel, the gradient itself with
16-byte vector atomics (the launcher decides: :mod:`stn_triton.kernels.launch`). Under
``torch.use_deterministic_algorithms(True)`` it is a gather instead: :func:`tap_index_kernel` lists
each (pixel, tap) contribution's target input pixel and weight, the host sorts them by target with a
stable sort, and :func:`gather_grad_input_kernel` sums each input pixel's contributions in that
fixed order; the affine forms' linear sampling gathers through the inverse map instead, with no sort
(:mod:`stn_triton.kernels.inverse`), or runs the backward kernel once per class of output pixels whose
taps never meet (``CLS``: pixels ``CLS`` apart on every axis, one map at a time), adding to dL/dU with
plain loads and stores in a fixed order (``launch._class_backward``).
"""

import triton
import triton.language as tl

from .codes import MODE_CUBIC, MODE_LINEAR, MODE_NEAREST
from .common import (cubic_coefficients, cubic_coefficients_grad, cubic_source, cubic_tap, field_frame, round_half_even,
                     source_index)


# From this many channels a step (a 16-byte vector of half-precision channels) the backward sums each row's
# dV/di terms over the channels at once (:func:`_bwd_row`).
ROW_SUMS_C = tl.constexpr(8)


# --------------------------------------------------------------------------------------------------
# Pixels and coordinates
# --------------------------------------------------------------------------------------------------

@triton.jit
def _tile(R_OUT, Wo, INT64: tl.constexpr, LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr, BLOCK_P: tl.constexpr,
          FULL: tl.constexpr):
    """This program's (n, k), tile, and its pixels' plane rows ``r`` (of R_OUT = Do*Ho) and columns ``j``."""
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
    return n, k, tile_r, tile_c, r, j, _inside(r, j, R_OUT, Wo, FULL)


@triton.jit
def _repeat_edges(r, j, R_OUT, Wo, FULL: tl.constexpr):
    """The tile's pixels with those past the output plane moved onto its last row and column (``FULL``:
    none are). The forward computes such a pixel exactly as the edge pixel it repeats and stores the
    same bytes at the same address, so it needs no pixel mask at all: no mask reaches a tap, a load
    or the store (mnist's forward: 37-40 -> 32 registers in the compile-only model, NOTES.md). The
    tap-index kernel likewise writes the edge pixel's entries again (48 -> 40 registers in 2-D). A
    backward must not repeat a contribution, so it masks instead (:func:`_inside`)."""
    if FULL:
        return r, j
    else:
        return tl.minimum(r, R_OUT - 1), tl.minimum(j, Wo - 1)


@triton.jit
def _class_pixels(r, j, SUB_H, Ho, CZ, CY, CX, CLS: tl.constexpr, NDIM: tl.constexpr):
    """A class launch's tile (``CLS`` > 0): rows ``r`` of its subgrid's plane (Do' x SUB_H rows) and
    columns ``j`` -> the plane rows and columns of the output pixels (CZ + CLS d', CY + CLS i',
    CX + CLS j'). ``CLS`` 0: as they are."""
    if CLS > 0:
        if NDIM == 3:
            dd = r // SUB_H
            r = (CZ + CLS * dd) * Ho + CY + CLS * (r - dd * SUB_H)
        else:
            r = CY + CLS * r
        j = CX + CLS * j
    return r, j


@triton.jit
def _inside(r, j, R_OUT, Wo, FULL: tl.constexpr):
    """Which of the tile's pixels lie in the output plane: all when every tile is ``FULL``
    (launch.Plan.full_tiles), which spares every mask that includes them."""
    if FULL:
        return tl.full(r.shape, 1, tl.int1)
    else:
        return (r < R_OUT) & (j < Wo)


@triton.jit
def _offset(d, i, j, s_d, s_h, s_w, NDIM: tl.constexpr):
    """The offset of pixel (d, i, j) under strides (s_d, s_h, s_w); 2-D pixels have no depth."""
    if NDIM == 3:
        return d * s_d + i * s_h + j * s_w
    else:
        return i * s_h + j * s_w


@triton.jit
def _split(q, inner, NDIM: tl.constexpr):
    """A 3-D plane index ``q`` as (``q // inner``, ``q % inner``): a voxel's depth and its row (of a
    plane of ``inner`` rows), or its depth and its pixel within the slice; in 2-D both are ``q``."""
    if NDIM == 3:
        outer = q // inner
        return outer, q - outer * inner
    else:
        return q, q


@triton.jit
def _coords(COORDS: tl.constexpr, p_prm_nk, p_aux, p_aux_nk, s_ad, s_ah, s_aw, s_ac, r, r_tile, j, mask_p, Ho, Wo,
            P, DM, bsx, box, bsy, boy, bsz, boz, frame, FN: tl.constexpr, NDIM: tl.constexpr,
            ONE_SLICE: tl.constexpr):
    """Each pixel's depth ``d`` and row ``i`` (``d`` is a stand-in in 2-D), the base grid ``b`` = (x, y, z)
    (``affine_grid``'s, from the index), and the form's normalised coordinate ``g`` = (gx, gy, gz) and
    extra value ``w`` (the projective denominator; a stand-in elsewhere). 2-D: z and gz are stand-ins.
    ``r_tile``: the tile's first plane row; ``ONE_SLICE``: the tile's rows lie in one depth slice, whose
    depth is then one division per tile (an integer division per voxel is ~23 instructions)."""
    if NDIM == 3 and ONE_SLICE:
        d_tile = r_tile // Ho
        i = r - d_tile * Ho
        d = i * 0 + d_tile
    else:
        d, i = _split(r, Ho, NDIM)
    x = j.to(tl.float32) * bsx + box
    y = i.to(tl.float32) * bsy + boy
    if NDIM == 3:
        z = d.to(tl.float32) * bsz + boz
    else:
        z = x
    b = (x, y, z)
    g, w = COORDS(p_prm_nk, p_aux, p_aux_nk + _offset(d, i, j, s_ad, s_ah, s_aw, NDIM), s_ac, r * Wo + j, b,
                  mask_p, P, DM, frame, FN, NDIM)
    return d, i, b, g, w


@triton.jit
def _source(g, size, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr, FMA: tl.constexpr):
    """Normalised coordinate -> pixel coordinate and ``d i / d g``: padded (linear, nearest), or
    unpadded with each tap padded later (cubic)."""
    if MODE == MODE_CUBIC:
        return cubic_source(g, size, PAD, ALIGN, FMA)
    else:
        return source_index(g, size, PAD, ALIGN, FMA)


@triton.jit
def _axis(i, size, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr,
          TARGETS: tl.constexpr):
    """One axis of each pixel's taps, as NT-tuples of [BP] values: integer coordinates ``q`` (raw: the
    mask says whether it lies in the image), the same clamped into the image ``c`` (scatter targets;
    ``TARGETS``, else a stand-in), masks ``m``, weights ``w`` and their derivatives ``e`` wrt the
    fraction. (Tuples as long as the taps: Triton's interpreter runs every operation it is given.)"""
    if MODE == MODE_CUBIC:
        f = tl.floor(i)
        t = i - f
        q0, m0 = cubic_tap(f - 1.0, size, PAD, ALIGN, INT64)  # padded and clamped already
        q1, m1 = cubic_tap(f, size, PAD, ALIGN, INT64)
        q2, m2 = cubic_tap(f + 1.0, size, PAD, ALIGN, INT64)
        q3, m3 = cubic_tap(f + 2.0, size, PAD, ALIGN, INT64)
        q = (q0, q1, q2, q3)
        return q, q, (m0, m1, m2, m3), cubic_coefficients(t), cubic_coefficients_grad(t)
    elif MODE == MODE_NEAREST:
        fr = round_half_even(i)
        q0 = fr.to(tl.int64) if INT64 else fr.to(tl.int32)
        m0 = (q0 >= 0) & (q0 < size)
        if TARGETS:
            c0 = tl.minimum(tl.maximum(q0, 0), size - 1)
        else:
            c0 = q0
        one = tl.full(i.shape, 1.0, tl.float32)
        return (q0,), (c0,), (m0,), (one,), (one,)  # the derivative is never used (piecewise constant)
    else:
        f = tl.floor(i)
        t = i - f  # i - q0
        q0 = f.to(tl.int64) if INT64 else f.to(tl.int32)  # |i| < 2^30 after source_index
        q1 = q0 + 1
        m0 = (q0 >= 0) & (q0 < size)
        m1 = (q1 >= 0) & (q1 < size)
        if TARGETS:
            c = (tl.minimum(tl.maximum(q0, 0), size - 1), tl.minimum(tl.maximum(q1, 0), size - 1))
        else:
            c = (q0, q1)
        lo = tl.full(i.shape, -1.0, tl.float32)
        hi = tl.full(i.shape, 1.0, tl.float32)
        return (q0, q1), c, (m0, m1), (1.0 - t, t), (lo, hi)


@triton.jit
def _taps(g, mask_p, W, H, D, s_w, s_h, s_d, t_w, t_h, t_d, MODE: tl.constexpr, PAD: tl.constexpr,
          ALIGN: tl.constexpr, FMA: tl.constexpr, INT64: tl.constexpr, NDIM: tl.constexpr, TARGETS: tl.constexpr,
          COL: tl.constexpr):
    """Every axis' taps of each pixel's coordinate ``g``, as NT-tuples of [BP, 1] blocks (``COL``; else
    [BP]): per axis (offsets under the strides ``s_*``, clamped targets under the strides ``t_*``
    (``TARGETS``), masks, weights, weights' derivatives), y's masks with the pixel's own (so every
    row's is); and ``d i / d g`` per axis ([BP]). 2-D: the z axis is a stand-in (y's)."""
    ix, dix = _source(g[0], W, MODE, PAD, ALIGN, FMA)
    iy, diy = _source(g[1], H, MODE, PAD, ALIGN, FMA)
    qx, cx, mx, wx, ex = _axis(ix, W, MODE, PAD, ALIGN, INT64, TARGETS)
    qy, cy, my, wy, ey = _axis(iy, H, MODE, PAD, ALIGN, INT64, TARGETS)
    if MODE == MODE_NEAREST:
        my = (mask_p & my[0],)
    elif MODE == MODE_LINEAR:
        my = (mask_p & my[0], mask_p & my[1])
    else:
        my = (mask_p & my[0], mask_p & my[1], mask_p & my[2], mask_p & my[3])
    ax = (_scaled(qx, s_w, MODE, COL, True), _scaled(cx, t_w, MODE, COL, False), _col(mx, MODE, COL),
          _col(wx, MODE, COL), _col(ex, MODE, COL))
    ay = (_scaled(qy, s_h, MODE, COL, True), _scaled(cy, t_h, MODE, COL, False), _col(my, MODE, COL),
          _col(wy, MODE, COL), _col(ey, MODE, COL))
    if NDIM == 3:
        iz, diz = _source(g[2], D, MODE, PAD, ALIGN, FMA)
        qz, cz, mz, wz, ez = _axis(iz, D, MODE, PAD, ALIGN, INT64, TARGETS)
        az = (_scaled(qz, s_d, MODE, COL, True), _scaled(cz, t_d, MODE, COL, False), _col(mz, MODE, COL),
              _col(wz, MODE, COL), _col(ez, MODE, COL))
    else:
        diz = diy
        az = ay
    return ax, ay, az, (dix, diy, diz)


@triton.jit
def _col(v, MODE: tl.constexpr, COL: tl.constexpr):
    """An NT-tuple of [BP] values as [BP, 1] blocks (``COL``), or as they are."""
    if COL:
        if MODE == MODE_NEAREST:
            return (v[0][:, None],)
        elif MODE == MODE_LINEAR:
            return v[0][:, None], v[1][:, None]
        else:
            return v[0][:, None], v[1][:, None], v[2][:, None], v[3][:, None]
    else:
        return v


@triton.jit
def _scaled(q, s, MODE: tl.constexpr, COL: tl.constexpr, RAW: tl.constexpr):
    """Each tap coordinate times the stride ``s``, as [BP, 1] blocks (``COL``) or [BP]. Raw linear taps
    are neighbours: the second is the first plus ``s`` (not so once clamped into the image)."""
    if MODE == MODE_LINEAR:
        o0 = q[0] * s
        if RAW:
            o = (o0, o0 + s)
        else:
            o = (o0, q[1] * s)
    elif MODE == MODE_NEAREST:
        o = (q[0] * s,)
    else:
        o = (q[0] * s, q[1] * s, q[2] * s, q[3] * s)
    return _col(o, MODE, COL)


@triton.jit
def _pick(r, v, NT: tl.constexpr):
    """``v[r]`` for a loop index ``r`` < NT (a run-time one: a chain of selects)."""
    if NT == 1:
        return v[0]
    elif NT == 2:
        return tl.where(r == 0, v[0], v[1])
    else:
        return tl.where(r == 0, v[0], tl.where(r == 1, v[1], tl.where(r == 2, v[2], v[3])))


@triton.jit
def _row(r, oy, my, wy, ey, oz, mz, wz, ez, NT: tl.constexpr, NDIM: tl.constexpr, STATIC: tl.constexpr):
    """Row ``r``'s offset, mask, weight, and the weight's derivatives along y and z (every axis but x;
    2-D: y alone). ``STATIC``: ``r`` is a compile-time index (unrolled rows)."""
    if NDIM == 2:
        if STATIC:
            return oy[r], my[r], wy[r], ey[r], wy[r]
        else:
            return _pick(r, oy, NT), _pick(r, my, NT), _pick(r, wy, NT), _pick(r, ey, NT), _pick(r, wy, NT)
    else:
        if STATIC:
            a: tl.constexpr = r % NT  # annotated: a plain local would become a tensor, not an index
            c: tl.constexpr = r // NT
            o, m, w_y, e_y, w_z, e_z = oy[a] + oz[c], my[a] & mz[c], wy[a], ey[a], wz[c], ez[c]
        else:
            a = r % NT
            c = r // NT
            w_y, e_y, w_z, e_z = _pick(a, wy, NT), _pick(a, ey, NT), _pick(c, wz, NT), _pick(c, ez, NT)
            o = _pick(a, oy, NT) + _pick(c, oz, NT)
            m = _pick(a, my, NT) & _pick(c, mz, NT)
        return o, m, w_y * w_z, e_y * w_z, w_y * e_z


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _tap(p, o_r, ox, m_r, mx, o_c, mask_c, STATIC: tl.constexpr):
    """U at one tap, [BP, BC] float32 (0 outside the image): ``p`` image n, ``o_r + ox`` the tap's offset,
    ``o_c`` [1, BC] the step's channels. With unrolled rows (``STATIC``) pointer and mask are built tap
    first, channels last, so that everything but the channel step is loop-invariant (hoisted out of
    the channel loop); in a loop over rows, channels first, so that the channel step's part is
    invariant in the row loop (cubic: 72 -> 56 registers in the 2-D forward, NOTES.md)."""
    if STATIC:
        return tl.load(p + o_r + ox + o_c, mask=(m_r & mx) & mask_c, other=0.0).to(tl.float32)
    else:
        return tl.load((p + o_c) + o_r + ox, mask=(m_r & mask_c) & mx, other=0.0).to(tl.float32)


@triton.jit
def _fwd_row(r, v, p_x, o_c, ox, mx, wx, oy, my, wy, ey, oz, mz, wz, ez, mask_c,
             NT: tl.constexpr, NDIM: tl.constexpr, STATIC: tl.constexpr):
    """``v`` plus row ``r`` of the taps: ``w_row * sum_b w_b U_b`` ([BP, BC]; ``p_x``: image n, ``o_c``:
    [1, BC] offsets of the step's channels). Unrolled rows weigh each tap once (its weight is
    loop-invariant in the channel loop); looped rows interpolate along x first."""
    o_r, m_r, w_r, _, _ = _row(r, oy, my, wy, ey, oz, mz, wz, ez, NT, NDIM, STATIC)
    if STATIC:
        for b in tl.static_range(NT):
            v += (w_r * wx[b]) * _tap(p_x, o_r, ox[b], m_r, mx[b], o_c, mask_c, STATIC)
    else:
        s = wx[0] * _tap(p_x, o_r, ox[0], m_r, mx[0], o_c, mask_c, STATIC)
        for b in tl.static_range(1, NT):
            s += wx[b] * _tap(p_x, o_r, ox[b], m_r, mx[b], o_c, mask_c, STATIC)
        v += w_r * s
    return v


@triton.jit
def sample_fwd_kernel(
    p_x,    # input U [N, C, (D,) H, W], strides s_x* (any layout; s_xd unused in 2-D)
    p_out,  # output V [N, K, C, (Do,) Ho, Wo], strides s_o*
    p_prm,  # float32 [N*K, R]: the form's matrix (affine 6 / 12, projective 9, basis NDIM*DM), then a field's
            # frame; R = 0: one row for all (a field's frame; the grid's stand-in)
    p_aux,  # basis: float32 B [DM, P]; grid, flow: the per-pixel tensor [N, K, (Do,) Ho, Wo, NDIM], strides
            # s_a*; else unused
    s_xn, s_xc, s_xd, s_xh, s_xw,
    s_on, s_ok, s_oc, s_od, s_oh, s_ow,
    s_an, s_ak, s_ad, s_ah, s_aw, s_ac,
    C, D, H, W, K, Do, Ho, Wo, DM, R,
    bsx, box, bsy, boy, bsz, boz,  # base grid x_j = bsx * j + box, y_i = bsy * i + boy, z_d = bsz * d + boz
    COORDS: tl.constexpr,   # the form's coordinate map (a @triton.jit function)
    FN: tl.constexpr,       # a plugin family's own coordinate map, which COORDS calls (None for built-in forms)
    FRAME: tl.constexpr,    # where a field's frame starts in the parameter row (-1: none)
    NDIM: tl.constexpr,     # 2 or 3
    MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr,
    NT: tl.constexpr,       # taps per axis: 2 linear, 1 nearest, 4 cubic
    FMA: tl.constexpr,      # a correctly rounded multiply-add is available (compiled; see common.unnormalize)
    INT64: tl.constexpr,    # some offset may pass 2^31: 64-bit index arithmetic
    EVEN_C: tl.constexpr,   # C % BLOCK_C == 0: no channel mask
    LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr,  # tile width 2**LOG2_TW; column tiles numbered to 2**LOG2_CT
    ONE_SLICE: tl.constexpr,  # 3-D: every tile's rows lie in one depth slice (launch.Plan.one_slice)
    FULL: tl.constexpr,     # every tile lies inside the output plane: no pixel mask (launch.Plan.full_tiles)
    BLOCK_P: tl.constexpr,  # pixels per program (a power of two, >= the tile width)
    BLOCK_C: tl.constexpr,  # channels per step: 1 (planar inputs) or a 16-byte vector (channels-last)
):
    n, k, tile_r, tile_c, r, j, _ = _tile(Do * Ho, Wo, INT64, LOG2_TW, LOG2_CT, BLOCK_P, FULL)
    if tile_c * (1 << LOG2_TW) >= Wo:  # a column tile past the image (2**LOG2_CT rounds up)
        return
    P = Do * Ho * Wo
    nk = n * K + k
    frame = field_frame(p_prm + nk * R, FRAME, NDIM)
    r, j = _repeat_edges(r, j, Do * Ho, Wo, FULL)
    every = _inside(r, j, Do * Ho, Wo, True)  # all true: no pixel mask anywhere
    d, i, b, g, w = _coords(COORDS, p_prm + nk * R, p_aux, p_aux + n * s_an + k * s_ak, s_ad, s_ah, s_aw, s_ac,
                            r, tile_r * (BLOCK_P >> LOG2_TW), j, every, Ho, Wo, P, DM, bsx, box, bsy, boy, bsz, boz,
                            frame, FN, NDIM, ONE_SLICE)
    ax, ay, az, _ = _taps(g, every, W, H, D, s_xw, s_xh, s_xd, s_xw, s_xh, s_xd, MODE, PAD, ALIGN, FMA, INT64,
                          NDIM, False, True)
    ox, _, mx, wx, _ = ax
    oy, _, my, wy, ey = ay
    oz, _, mz, wz, ez = az

    p_xn = p_x + n * s_xn
    p_on = p_out + n * s_on + k * s_ok
    o_out = _offset(d, i, j, s_od, s_oh, s_ow, NDIM)[:, None]  # [BP, 1]
    m_out = every[:, None]  # a repeated edge pixel stores its edge pixel's value where that one does
    NR: tl.constexpr = NT ** (NDIM - 1)  # rows of taps
    offs_c = tl.arange(0, BLOCK_C)[None, :]  # [1, BC]
    for c0 in range(0, C, BLOCK_C):
        if EVEN_C:
            mask_c = offs_c < BLOCK_C  # all true, folded away
        else:
            mask_c = (c0 + offs_c) < C
        o_c = (c0 + offs_c) * s_xc  # [1, BC]
        v = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        if MODE == MODE_CUBIC:
            for rr in range(0, NT ** (NDIM - 1)):  # a loop: one row's loads in flight at a time (see the module doc)
                v = _fwd_row(rr, v, p_xn, o_c, ox, mx, wx, oy, my, wy, ey, oz, mz, wz, ez, mask_c, NT, NDIM, False)
        else:
            for rr in tl.static_range(NR):
                v = _fwd_row(rr, v, p_xn, o_c, ox, mx, wx, oy, my, wy, ey, oz, mz, wz, ez, mask_c, NT, NDIM, True)
        tl.store(p_on + o_out + (c0 + offs_c) * s_oc, v.to(p_out.dtype.element_ty), mask=m_out & mask_c)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _scatter_add(ptr, v, m, mask_c, EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr, RMW: tl.constexpr):
    """``*ptr += v`` where ``m``: relaxed atomics (no fence) in ``ptr``'s dtype. ``ptr`` [BP, BC] always
    points inside the gradient (targets are clamped into it).

    One channel per step: every lane adds (an exact 0 where ``m`` is false), because a predicated atomic
    compiles to a branch around it. A vector of channels: one predicate per vector, cheaper than
    selecting each element. ``RMW`` (a class launch, whose pixels' taps never meet): a plain load, add
    and store, only where ``m`` (a clamped target may be another pixel's)."""
    if RMW:
        mm = m & mask_c
        tl.store(ptr, tl.load(ptr, mask=mm, other=0.0) + v.to(ptr.dtype.element_ty), mask=mm)
    elif BLOCK_C == 1:
        v = tl.where(m, v, 0.0).to(ptr.dtype.element_ty)
        if EVEN_C:
            tl.atomic_add(ptr, v, sem="relaxed")
        else:
            tl.atomic_add(ptr, v, mask=mask_c, sem="relaxed")
    else:
        tl.atomic_add(ptr, v.to(ptr.dtype.element_ty), mask=m & mask_c, sem="relaxed")


@triton.jit
def _bwd_row(r, h_x, h_y, h_z, go, p_gc, p_x, o_c, ox, dx, mx, wx, ex, oy, dy, my, wy, ey, oz, dz, mz, wz, ez, mask_c,
             NEED_X: tl.constexpr, NEED_G: tl.constexpr, EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr,
             ROWS_SUMMED: tl.constexpr, NT: tl.constexpr, NDIM: tl.constexpr, STATIC: tl.constexpr,
             FIRST: tl.constexpr, RMW: tl.constexpr):
    """The backward at row ``r`` of the taps (``p_gc``: [1, BC] pointers to the step's channels of image
    n in dL/dU; ``p_x``, ``o_c``: image n of U and the step's channel offsets; ``o*``: U's tap offsets,
    ``d*``: dL/dU's (clamped) ones): dL/dU += dL/dV
    times each tap's weight, and the row's terms of dV/di (``h_x``, ``h_y``, ``h_z``; see the module doc)."""
    o_r, m_r, w_r, e_ry, e_rz = _row(r, oy, my, wy, ey, oz, mz, wz, ez, NT, NDIM, STATIC)
    if NEED_X:
        d_r, _, _, _, _ = _row(r, dy, my, wy, ey, dz, mz, wz, ez, NT, NDIM, STATIC)
        if STATIC:  # the taps' weights are loop-invariant: one product each per channel
            for b in tl.static_range(NT):
                _scatter_add(p_gc + (d_r + dx[b]), go * (w_r * wx[b]), m_r & mx[b], mask_c, EVEN_C, BLOCK_C, RMW)
        else:
            go_r = go * w_r
            for b in tl.static_range(NT):
                _scatter_add(p_gc + (d_r + dx[b]), go_r * wx[b], m_r & mx[b], mask_c, EVEN_C, BLOCK_C, RMW)
    if NEED_G:
        u = _tap(p_x, o_r, ox[0], m_r, mx[0], o_c, mask_c, STATIC)
        sx = wx[0] * u  # the row interpolated along x
        sd = ex[0] * u  # and its derivative along x
        for b in tl.static_range(1, NT):
            u = _tap(p_x, o_r, ox[b], m_r, mx[b], o_c, mask_c, STATIC)
            sx += wx[b] * u
            sd += ex[b] * u
        if ROWS_SUMMED:  # ROW_SUMS_C or more channels a step (half precision, channels-last): each row's weighed
            # by dL/dV and summed over the vector at once, so the sums are [BP, 1], not one per channel (feat-cl
            # bf16 backward 72-79 -> 56-64 registers; with 4 float32 channels it trades registers both ways: NOTES.md)
            t_d = tl.sum(go * sd, axis=1, keep_dims=True)
            t_x = tl.sum(go * sx, axis=1, keep_dims=True)
        else:  # dL/dV multiplies the sums once per channel, after the rows (in the kernel)
            t_d = sd
            t_x = sx
        if FIRST:  # the first of unrolled rows sets the sums (no adding to zeros: fewer instructions)
            h_x = w_r * t_d
            h_y = e_ry * t_x
            if NDIM == 3:
                h_z = e_rz * t_x
        else:
            h_x += w_r * t_d
            h_y += e_ry * t_x
            if NDIM == 3:
                h_z += e_rz * t_x
    return h_x, h_y, h_z


@triton.jit
def _store_gg(p, s_qc, gg, frame, mask_p, NDIM: tl.constexpr):
    """Store dL/dg at ``p`` ([BP] pointers, components ``s_qc`` apart) through a field's frame: axis a's
    gradient times its scale, into the component that holds it (no frame: as it is, in order)."""
    sx, sy, sz, cx, cy, cz = frame
    tl.store(p + cx * s_qc, gg[0] * sx, mask=mask_p)
    tl.store(p + cy * s_qc, gg[1] * sy, mask=mask_p)
    if NDIM == 3:
        tl.store(p + cz * s_qc, gg[2] * sz, mask=mask_p)


@triton.jit
def sample_bwd_kernel(
    p_x,     # input U [N, C, (D,) H, W], strides s_x*
    p_go,    # incoming gradient dL/dV [N, K, C, (Do,) Ho, Wo], strides s_g*
    p_gx,    # out: dL/dU [N, C, (D,) H, W], strides s_d*, zeroed, accumulated with atomics (if NEED_X)
    p_prm,   # float32 [N*K, R], as in the forward
    p_aux,   # as in the forward
    p_part,  # out: float32 [N*K, NPROG, R] dL/dprm summed over each program's pixels (if NEED_PARAM)
    p_gg,    # out: dL/dg [N, K, (Do,) Ho, Wo, NDIM], strides s_q*, any float dtype (if WRITE_GG): a per-pixel
             # parameter's gradient (times its frame's scale, into its components), or dL/dg for dL/dB
    s_xn, s_xc, s_xd, s_xh, s_xw,
    s_gn, s_gk, s_gc, s_gd, s_gh, s_gw,
    s_dn, s_dc, s_dd, s_dh, s_dw,
    s_an, s_ak, s_ad, s_ah, s_aw, s_ac,
    s_qn, s_qk, s_qd, s_qh, s_qw, s_qc,
    C, D, H, W, K, Do, Ho, Wo, DM, R,
    NPROG,  # programs with pixels per (n, k): the partials' row length
    NCT,    # column tiles
    bsx, box, bsy, boy, bsz, boz,
    K0, CZ, CY, CX, SUB_R, SUB_H, SUB_W,  # a class launch (CLS > 0): its map k = K0, its class's first pixel
                                          # (CZ, CY, CX) and subgrid (SUB_R = Do' * SUB_H plane rows, SUB_W
                                          # columns); unused otherwise
    COORDS: tl.constexpr,   # the form's coordinate map
    FN: tl.constexpr,       # a plugin family's own coordinate map, which COORDS calls (None for built-in forms)
    FRAME: tl.constexpr,    # where a field's frame starts in the parameter row (-1: none, dL/dg is stored as is)
    TERMS: tl.constexpr,    # the form's parameter-gradient terms (adds a [BP, NACC] block, or stores per tile)
    GRAD_FN: tl.constexpr,  # a plugin family's own gradient terms, which TERMS calls (None for built-in forms)
    NACC: tl.constexpr,     # the terms block's width (a power of two >= R); 0: the form stores per tile
    NDIM: tl.constexpr, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr, NT: tl.constexpr,
    FMA: tl.constexpr,
    NEED_X: tl.constexpr,   # scatter dL/dU
    NEED_G: tl.constexpr,   # the coordinate gradient is wanted (linear and cubic: nearest is piecewise constant)
    NEED_PARAM: tl.constexpr, WRITE_GG: tl.constexpr,
    INT64: tl.constexpr, EVEN_C: tl.constexpr, LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr,
    ONE_SLICE: tl.constexpr, FULL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    TPP: tl.constexpr,  # tiles per program (a column of TPP row tiles; 1 when the form stores per tile): the
                        # parameter gradient is reduced across the program once, not once per tile
    CLS: tl.constexpr = 0,  # > 0: a class launch (launch._class_backward): one map's output pixels CLS apart on
                            # every axis, whose taps never meet, so dL/dU is added without atomics
):
    tl.static_assert(TPP == 1 or NACC > 0 or not NEED_PARAM,
                     "a form that stores its terms per tile takes one tile per program")
    tl.static_assert(CLS == 0 or not ONE_SLICE, "a class launch's tiles are not split by depth slice")
    R_OUT = Do * Ho
    if CLS > 0:  # the tiles cover the class's subgrid
        R_T = SUB_R
        W_T = SUB_W
    else:
        R_T = R_OUT
        W_T = Wo
    n, k, grp, tile_c, r0, j, _ = _tile(R_T, W_T, INT64, LOG2_TW, LOG2_CT, BLOCK_P, FULL)
    if tile_c * (1 << LOG2_TW) >= W_T:
        return
    if CLS > 0:
        k = k + K0
    TILE_H: tl.constexpr = BLOCK_P >> LOG2_TW
    NR: tl.constexpr = NT ** (NDIM - 1)  # rows of taps
    ROWS_SUMMED: tl.constexpr = BLOCK_C >= ROW_SUMS_C  # each row's terms summed over the channels (_bwd_row)
    P = R_OUT * Wo
    nk = n * K + k
    p_prm_nk = p_prm + nk * R
    frame = field_frame(p_prm_nk, FRAME, NDIM)  # once per program, not once per tile
    p_aux_nk = p_aux + n * s_an + k * s_ak
    p_xn = p_x + n * s_xn
    p_gxn = p_gx + n * s_dn
    p_gon = p_go + n * s_gn + k * s_gk
    p_part_i = p_part + (nk * NPROG + grp * NCT + tile_c) * R
    offs_c = tl.arange(0, BLOCK_C)[None, :]  # [1, BC]
    if NACC > 0:  # the form's per-pixel parameter terms, summed over the program's tiles
        acc = tl.zeros([BLOCK_P, NACC], tl.float32)
    else:
        acc = tl.zeros([BLOCK_P, 1], tl.float32)  # unused
    n_here = tl.minimum(TPP, tl.cdiv(R_T, TILE_H) - grp * TPP)  # the last column of tiles may be short
    for t in range(0, n_here):
        r = r0 + (grp * (TPP - 1) + t) * TILE_H  # tile row grp * TPP + t (r0 is tile row grp's)
        mask_p = _inside(r, j, R_T, W_T, FULL)
        r, j_o = _class_pixels(r, j, SUB_H, Ho, CZ, CY, CX, CLS, NDIM)
        d, i, b, g, w = _coords(COORDS, p_prm_nk, p_aux, p_aux_nk, s_ad, s_ah, s_aw, s_ac, r,
                                (grp * TPP + t) * TILE_H, j_o, mask_p, Ho, Wo, P, DM, bsx, box, bsy, boy, bsz, boz,
                                frame, FN, NDIM, ONE_SLICE)
        ax, ay, az, di = _taps(g, mask_p, W, H, D, s_xw, s_xh, s_xd, s_dw, s_dh, s_dd, MODE, PAD, ALIGN, FMA, INT64,
                               NDIM, NEED_X, True)
        ox, dx, mx, wx, ex = ax
        oy, dy, my, wy, ey = ay
        oz, dz, mz, wz, ez = az
        o_go = _offset(d, i, j_o, s_gd, s_gh, s_gw, NDIM)[:, None]  # [BP, 1]
        m_go = mask_p[:, None]
        g_ix = tl.zeros([BLOCK_P, 1], tl.float32)  # sum_c dL/dV * dV/di_x
        g_iy = tl.zeros([BLOCK_P, 1], tl.float32)
        g_iz = tl.zeros([BLOCK_P, 1], tl.float32)
        if NEED_X or NEED_G:  # nearest sampling with only parameter gradients reads no channel
            for c0 in range(0, C, BLOCK_C):
                if EVEN_C:
                    mask_c = offs_c < BLOCK_C
                else:
                    mask_c = (c0 + offs_c) < C
                go = tl.load(p_gon + o_go + (c0 + offs_c) * s_gc, mask=m_go & mask_c, other=0.0).to(tl.float32)
                p_gc = p_gxn + (c0 + offs_c) * s_dc  # [1, BC] (a stand-in when NEED_X is off)
                o_c = (c0 + offs_c) * s_xc
                HW_C: tl.constexpr = 1 if ROWS_SUMMED else BLOCK_C  # the terms' channels (see _bwd_row)
                h_x = tl.zeros([BLOCK_P, HW_C], tl.float32)  # this step's dV/di terms
                h_y = tl.zeros([BLOCK_P, HW_C], tl.float32)
                h_z = tl.zeros([BLOCK_P, HW_C], tl.float32)
                if MODE == MODE_CUBIC:
                    for rr in range(0, NT ** (NDIM - 1)):  # a loop: one row's taps at a time (see the module doc)
                        h_x, h_y, h_z = _bwd_row(rr, h_x, h_y, h_z, go, p_gc, p_xn, o_c, ox, dx, mx, wx, ex, oy, dy,
                                                 my, wy, ey, oz, dz, mz, wz, ez, mask_c, NEED_X, NEED_G, EVEN_C,
                                                 BLOCK_C, ROWS_SUMMED, NT, NDIM, False, False, CLS > 0)
                else:
                    for rr in tl.static_range(NR):
                        h_x, h_y, h_z = _bwd_row(rr, h_x, h_y, h_z, go, p_gc, p_xn, o_c, ox, dx, mx, wx, ex, oy, dy,
                                                 my, wy, ey, oz, dz, mz, wz, ez, mask_c, NEED_X, NEED_G, EVEN_C,
                                                 BLOCK_C, ROWS_SUMMED, NT, NDIM, True, rr == 0, CLS > 0)
                if NEED_G:
                    if ROWS_SUMMED:  # (weighed and summed over the channels row by row already)
                        g_ix += h_x
                        g_iy += h_y
                        if NDIM == 3:
                            g_iz += h_z
                    else:
                        g_ix += tl.sum(go * h_x, axis=1, keep_dims=True)
                        g_iy += tl.sum(go * h_y, axis=1, keep_dims=True)
                        if NDIM == 3:
                            g_iz += tl.sum(go * h_z, axis=1, keep_dims=True)
        gg = (tl.where(mask_p, tl.sum(g_ix, axis=1) * di[0], 0.0),  # dL/dg [BP] per axis
              tl.where(mask_p, tl.sum(g_iy, axis=1) * di[1], 0.0),
              tl.where(mask_p, tl.sum(g_iz, axis=1) * di[2], 0.0))
        if WRITE_GG:
            _store_gg(p_gg + n * s_qn + k * s_qk + _offset(d, i, j_o, s_qd, s_qh, s_qw, NDIM), s_qc, gg, frame,
                      mask_p, NDIM)
        if NEED_PARAM:
            acc = TERMS(acc, p_part_i, p_prm_nk, p_aux, r * Wo + j_o, mask_p, P, DM, b, g, w, gg, GRAD_FN, NDIM)
    if NEED_PARAM:
        if NACC > 0:
            cols = tl.arange(0, NACC)
            tl.store(p_part_i + cols, tl.sum(acc, axis=0), mask=cols < R)


# --------------------------------------------------------------------------------------------------
# Deterministic input gradient: list the contributions, then gather them in a fixed order
# --------------------------------------------------------------------------------------------------

@triton.jit
def _index_row(r, p_idx, p_wt, base, W, HW, qx, mx, wx, qy, my, wy, ey, qz, mz, wz, ez, none, mask_p,
               MODE: tl.constexpr, NT: tl.constexpr, NDIM: tl.constexpr, STATIC: tl.constexpr,
               TARGETS: tl.constexpr, WEIGHTS: tl.constexpr):
    """Row ``r``'s entries: each tap's target input pixel (``none`` outside the image; ``TARGETS``) and
    weight (``WEIGHTS``); ``q*``: flat offsets of each axis' taps (x: 1, y: W, z: H*W), [BP] each.
    Unrolled linear taps are neighbours: in 3-D each is ``base`` (the first tap's target) plus a
    constant of the row (a scalar), which takes fewer registers (80 against 96) and integer operations
    than per-axis offsets; in 2-D it takes more registers (48 -> 54-56), so 2-D adds the axes' offsets
    (NOTES.md, 2026-12-04)."""
    q_r, m_r, w_r, _, _ = _row(r, qy, my, wy, ey, qz, mz, wz, ez, NT, NDIM, STATIC)
    if STATIC and MODE == MODE_LINEAR and NDIM == 3:
        a: tl.constexpr = r % NT  # the row's y and z taps
        c: tl.constexpr = r // NT
        q_r = base + (a * W + c * HW)
        for b in tl.static_range(NT):
            if TARGETS:
                tl.store(p_idx + (r * NT + b), tl.where(m_r & mx[b], q_r + b, none), mask=mask_p)
            if WEIGHTS:
                tl.store(p_wt + (r * NT + b), w_r * wx[b], mask=mask_p)
    else:
        for b in tl.static_range(NT):
            if TARGETS:
                tl.store(p_idx + (r * NT + b), tl.where(m_r & mx[b], q_r + qx[b], none), mask=mask_p)
            if WEIGHTS:
                tl.store(p_wt + (r * NT + b), w_r * wx[b], mask=mask_p)


@triton.jit
def tap_index_kernel(
    p_idx,  # out: int32 or int64 [N, K*P*NTAPS] target input pixel (flat, row-major), D*H*W where none
    p_wt,   # out: float32 [N, K*P*NTAPS] weight of that contribution
    p_goff, # out: int32 or int64 [N, K*P] offset of the pixel's dL/dV within image n (channel 0)
    p_prm, p_aux,
    s_gk, s_gd, s_gh, s_gw,  # strides of dL/dV [N, K, C, (Do,) Ho, Wo] (k, depth, row, column)
    s_an, s_ak, s_ad, s_ah, s_aw, s_ac,
    D, H, W, K, Do, Ho, Wo, DM, R,
    bsx, box, bsy, boy, bsz, boz,
    COORDS: tl.constexpr, FN: tl.constexpr, FRAME: tl.constexpr, NDIM: tl.constexpr, MODE: tl.constexpr,
    PAD: tl.constexpr,
    ALIGN: tl.constexpr, NT: tl.constexpr, FMA: tl.constexpr, INT64: tl.constexpr,
    LOG2_NC: tl.constexpr,  # log2 of the taps per pixel (NT ** NDIM)
    LOG2_TW: tl.constexpr, LOG2_CT: tl.constexpr, ONE_SLICE: tl.constexpr, FULL: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    n, k, tile_r, tile_c, r, j, _ = _tile(Do * Ho, Wo, INT64, LOG2_TW, LOG2_CT, BLOCK_P, FULL)
    if tile_c * (1 << LOG2_TW) >= Wo:
        return
    P = Do * Ho * Wo
    nk = n * K + k
    frame = field_frame(p_prm + nk * R, FRAME, NDIM)
    # as in the forward: a pixel past the plane repeats its edge pixel, whose entries it writes again with the
    # same values at the same addresses, so nothing here is masked by pixel (fewer predicates and registers)
    r, j = _repeat_edges(r, j, Do * Ho, Wo, FULL)
    mask_p = _inside(r, j, Do * Ho, Wo, True)  # all true
    d, i, b, g, w = _coords(COORDS, p_prm + nk * R, p_aux, p_aux + n * s_an + k * s_ak, s_ad, s_ah, s_aw, s_ac,
                            r, tile_r * (BLOCK_P >> LOG2_TW), j, mask_p, Ho, Wo, P, DM, bsx, box, bsy, boy, bsz, boz,
                            frame, FN, NDIM, ONE_SLICE)
    o_pix = nk * P + r * Wo + j  # [BP] this pixel's entry in p_goff
    o_e = o_pix << LOG2_NC  # entry of tap 0
    # stored before the taps are made, so that d, i and j are dead by then
    tl.store(p_goff + o_pix, k * s_gk + _offset(d, i, j, s_gd, s_gh, s_gw, NDIM), mask=mask_p)
    HW = H * W
    ax, ay, az, _ = _taps(g, mask_p, W, H, D, 1, W, HW, 1, W, HW, MODE, PAD, ALIGN, FMA, INT64, NDIM, False, False)
    qx, _, mx, wx, _ = ax
    qy, _, my, wy, ey = ay
    qz, _, mz, wz, ez = az
    none = D * HW
    NR: tl.constexpr = NT ** (NDIM - 1)
    base = qx[0] + qy[0] + qz[0]  # the first tap's target (3-D; 2-D does not use it)
    if MODE == MODE_CUBIC:
        for rr in range(0, NT ** (NDIM - 1)):
            _index_row(rr, p_idx + o_e, p_wt + o_e, base, W, HW, qx, mx, wx, qy, my, wy, ey, qz, mz, wz, ez, none,
                       mask_p, MODE, NT, NDIM, False, True, True)
    elif NDIM == 2:  # every weight first, then every target: 48 -> 40 registers (3-D: 72 -> 80, so not there)
        for rr in tl.static_range(NR):
            _index_row(rr, p_idx + o_e, p_wt + o_e, base, W, HW, qx, mx, wx, qy, my, wy, ey, qz, mz, wz, ez, none,
                       mask_p, MODE, NT, NDIM, True, False, True)
        for rr in tl.static_range(NR):
            _index_row(rr, p_idx + o_e, p_wt + o_e, base, W, HW, qx, mx, wx, qy, my, wy, ey, qz, mz, wz, ez, none,
                       mask_p, MODE, NT, NDIM, True, True, False)
    else:
        for rr in tl.static_range(NR):
            _index_row(rr, p_idx + o_e, p_wt + o_e, base, W, HW, qx, mx, wx, qy, my, wy, ey, qz, mz, wz, ez, none,
                       mask_p, MODE, NT, NDIM, True, True, True)


@triton.jit
def gather_grad_input_kernel(
    p_gx,    # out: dL/dU [N, C, (D,) H, W] in U's dtype, strides s_d*
    p_go,    # dL/dV [N, K, C, ...], strides s_gn, s_gc (the rest is in p_goff)
    p_perm,  # int64 [N, E]: entries in order of target pixel (stable sort of tap_index_kernel's idx)
    p_wt,    # float32 [N, E]: weights, indexed by entry
    p_goff,  # int32/int64 [N, E >> LOG2_NC]: dL/dV offset of each entry's output pixel within its image
    p_seg,   # int32/int64 [N, D*H*W + 1]: first sorted position of each target pixel
    s_dn, s_dc, s_dd, s_dh, s_dw,
    s_gn, s_gc,
    C, D, H, W, E,
    NDIM: tl.constexpr, INT64: tl.constexpr, EVEN_C: tl.constexpr, LOG2_NC: tl.constexpr,
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
    DHW = D * HW
    # Per-pixel values stay [BQ, 1]: Triton 3.6 miscompiles a loop-varying 1-D mask that is also
    # expanded to 2-D inside the loop ("mask type matches ptr type").
    offs_q = blk * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]  # input pixels [BQ, 1]
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
    zq, rem = _split(offs_q, HW, NDIM)
    yq = rem // W
    o_d = n * s_dn + _offset(zq, yq, rem - yq * W, s_dd, s_dh, s_dw, NDIM)  # [BQ, 1], once per program
    tl.store(p_gx + o_d + offs_c * s_dc, acc.to(p_gx.dtype.element_ty), mask=mask_q & mask_c)
