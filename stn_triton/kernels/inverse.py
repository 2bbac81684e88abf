"""Deterministic input gradient of an affine map by inverse-map gather: no sort, no index buffer, no atomics.

For the affine forms the source coordinate of output pixel o (in pixel units, before padding) is an
affine function of o's index: ``s(o) = M o + c`` (M and c fold ``affine_grid``'s base grid, theta and
the unnormalisation; :func:`inverse_table`). Linear sampling gives input pixel q the weight
``prod_a max(0, 1 - |s_a(o) - q_a|)`` in output o, so the outputs that reach q are the integer points of
the preimage of the open box ``(q - 1, q + 1)`` under that map, a parallelogram (parallelepiped in 3-D)
that ``M^-1`` gives at once.

Each lane owns a block of ``B`` x ``B`` (x ``B``) input pixels and walks the integer points of the
bounding box of its block's preimage (``T_x x T_y (x T_z)`` of them, per transform), reading each
candidate's incoming gradient once for all the block's pixels; each program owns ``BLOCK_Q`` such
blocks and ``CB`` channels, and sums over the K maps, the box and the block in a fixed order, so the
result is the same bit for bit on every run. A pixel's sum differs from the atomic backward's only in
the order of the additions (and in weights that differ by rounding near a tap's edge, where they
vanish).

What it serves (:func:`inverse_table` decides on the host, per launch): the affine forms (2-D, 3-D),
linear sampling, zeros padding, or border and reflection padding when every output pixel's source lies
strictly inside the input (where neither padding changes it), finite maps of condition at most
:data:`MAX_CONDITION` whose box is small (:data:`SMALL_BOX`) or at most :data:`MAX_WASTE` times the
preimage it bounds. Everything else keeps the sorted gather (:mod:`stn_triton.kernels.sampler`). The
table also gives the class backward (:func:`stn_triton.kernels.launch.class_stride`) its maps' spread.
"""

import math

import torch
import triton
import triton.language as tl

BLOCKS = {2: (4, 2, 1), 3: (2, 2, 2)}  # input pixels per lane along x, y, z, by dimension
# box points per lane and map: always taken up to SMALL_BOX; beyond it, at most MAX_WASTE times the points
# the block's preimage holds on average (its volume): a thin parallelogram (a near-singular map) has a
# box far larger than itself, and keeps the sorted gather
SMALL_BOX = 16
MAX_WASTE = 8
MAX_CANDIDATES = 1 << 16
MAX_ENTRY = 2.0**24  # every entry of a served map's row below this (float32 sums that cannot overflow)
# a served map's condition number (max-norm bound ||M|| ||M^-1||) at most this: a strongly anisotropic map
# (one axis squeezed many times more than another) gathers many contributions per pixel whose weights, made
# from the table's float32 map rather than the forward's own coordinates, differ by rounding that adds up
# past float32's tolerance (found: 7e-5 on a map of condition 46); such maps keep the sorted gather
MAX_CONDITION = 16.0
# float32 entries per (n, k): M 3x3 at 0, M^-1 3x3 at 9, c' at 18, half-extents at 21, trips at 24, ok at 27,
# M^-1's largest absolute row sum at 28 (how far apart in output pixels sources 1 pixel apart can be)
TABLE = 32
OK = 27
SPREAD = 28


def reach(ndim):
    """Per source axis, how far from the block's centre an output's source can lie and still weigh on
    one of its pixels: 1 (a linear tap's reach) plus half the block's width less one."""
    return [1.0 + (b - 1) / 2 for b in BLOCKS[ndim][:ndim]]


def inverse_table(pb, fill):
    """The per-transform table of :func:`inverse_grad_input_kernel` (float32 (N*K, TABLE), made by
    :func:`inverse_table_kernel`), or None when the inverse-map gather does not serve this problem (see
    the module's docstring). ``fill``: the launcher's allocator hook for new buffers.

    One launch, one reduction and one host synchronisation (whether every map qualifies); on the meta
    device (the compile-only report) the table is made without looking at its values."""
    table, _ = inverse_plan(pb, fill)
    return table


def inverse_plan(pb, fill):
    """:func:`inverse_table`'s table (or None), and the largest absolute row sum of any map's M^-1 (or
    inf when no table serves): what the class backward (:func:`stn_triton.kernels.launch.class_stride`)
    needs. One host synchronisation reads both; on the meta device (the compile-only report), the
    spread is estimated from the sizes (the benchmarks' maps: each axis scaled by output over input size,
    off-diagonal terms a tenth of it)."""
    if pb.form.kind != "affine" or pb.mode != "bilinear":
        return None, math.inf
    nd, NK = pb.ndim, pb.N * pb.K
    table = fill(torch.empty((NK, TABLE), dtype=torch.float32, device=pb.x.device))
    bx, by, bz = BLOCKS[nd]
    block = 128
    inverse_table_kernel[(triton.cdiv(NK, block),)](
        table, pb.prm, NK, pb.W, pb.H, pb.D, pb.Wo, pb.Ho, pb.Do, *pb.geometry,
        NDIM=nd, ALIGN=pb.align_corners, INSIDE=pb.padding_mode != "zeros", BX=bx, BY=by, BZ=bz,
        SMALL=SMALL_BOX, WASTE=MAX_WASTE, MAXC=MAX_CANDIDATES, MAXE=MAX_ENTRY, MAXCOND=MAX_CONDITION,
        BLOCK=block)
    # (the compile-only report records the reductions, and does not read them)
    stats = torch.stack([table[:, OK].amin(), table[:, SPREAD].amax()])
    if pb.x.device.type == "meta":
        ratio = max(o / max(i, 1) for o, i in ((pb.Wo, pb.W), (pb.Ho, pb.H), (pb.Do, pb.D))[:nd])
        return table, ratio * (1.0 + 0.1 * (nd - 1))
    served, spread = stats.tolist()
    if not served > 0:
        return None, math.inf
    return table, spread


@triton.jit
def _det_inv(m, NDIM: tl.constexpr):
    """det(M) and M^-1 (row-major 3x3 tuples; 2-D: the top-left 2x2, the rest zero)."""
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    zero = m00 * 0.0
    if NDIM == 2:
        det = m00 * m11 - m01 * m10
        inv = (m11 / det, -m01 / det, zero, -m10 / det, m00 / det, zero, zero, zero, zero)
    else:
        c00 = m11 * m22 - m12 * m21
        c01 = m12 * m20 - m10 * m22
        c02 = m10 * m21 - m11 * m20
        det = m00 * c00 + m01 * c01 + m02 * c02
        inv = (c00 / det, (m02 * m21 - m01 * m22) / det, (m01 * m12 - m02 * m11) / det,
               c01 / det, (m00 * m22 - m02 * m20) / det, (m02 * m10 - m00 * m12) / det,
               c02 / det, (m01 * m20 - m00 * m21) / det, (m00 * m11 - m01 * m10) / det)
    return det, inv


@triton.jit
def inverse_table_kernel(
    p_tab,  # out: float32 [NK, 32], every entry written
    p_prm,  # float32 [NK, NDIM * (NDIM + 1)]: theta, row-major
    NK, W, H, D, Wo, Ho, Do,
    bsx, box, bsy, boy, bsz, boz,  # affine_grid's base grid: b = index * bs + bo per output axis
    NDIM: tl.constexpr, ALIGN: tl.constexpr,
    INSIDE: tl.constexpr,  # border or reflection padding: serve only maps whose sources stay inside the input
    BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr,
    SMALL: tl.constexpr, WASTE: tl.constexpr, MAXC: tl.constexpr, MAXE: tl.constexpr, MAXCOND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per transform (one lane each), in float64: the pixel-unit map s = M o + c (theta, the base grid
    and the unnormalisation folded), its inverse o = M^-1 s + c', the half-extents of a block's preimage
    box per output axis and the box's trips, and whether the inverse-map gather serves it (ok)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = r < NK
    R: tl.constexpr = NDIM * (NDIM + 1)
    p = p_prm + r * R
    zero = tl.zeros([BLOCK], tl.float64)
    S = (W * 1.0 + zero, H * 1.0 + zero, D * 1.0 + zero)  # input size per source axis
    So = (Wo * 1.0 + zero, Ho * 1.0 + zero, Do * 1.0 + zero)
    bs = (bsx, bsy, bsz)
    bo = (box, boy, boz)
    rch = (1.0 + (BX - 1) * 0.5, 1.0 + (BY - 1) * 0.5, 1.0 + (BZ - 1) * 0.5)
    m = ()
    c = ()
    for a in tl.static_range(3):
        if ALIGN:
            alpha = (S[a] - 1.0) * 0.5
        else:
            alpha = S[a] * 0.5
        if a < NDIM:
            ca = tl.load(p + (a * (NDIM + 1) + NDIM), mask=live, other=0.0).to(tl.float64)
            for b in tl.static_range(3):
                if b < NDIM:
                    t = tl.load(p + (a * (NDIM + 1) + b), mask=live, other=0.0).to(tl.float64)
                    m = m + (alpha * t * bs[b],)
                    ca += t * bo[b]
                else:
                    m = m + (zero,)
            c = c + (alpha * ca + (S[a] - 1.0) * 0.5,)
        else:
            m = m + (zero, zero, zero)
            c = c + (zero,)
    det, inv = _det_inv(m, NDIM)
    ok = live & (det != 0.0)
    box_pts = zero + 1.0
    vol = zero + 1.0
    cinv = ()
    ext = ()
    trips = ()
    for b in tl.static_range(3):
        cb = -(inv[3 * b] * c[0] + inv[3 * b + 1] * c[1] + inv[3 * b + 2] * c[2])
        eb = tl.abs(inv[3 * b]) * rch[0] + tl.abs(inv[3 * b + 1]) * rch[1]
        if NDIM == 3:
            eb += tl.abs(inv[3 * b + 2]) * rch[2]
        if b < NDIM:
            tb = tl.maximum(tl.ceil(2.0 * eb - 1e-6), 1.0)
            box_pts = box_pts * tb
            vol = vol * (2.0 * rch[b])
            ok = ok & (tl.abs(cb) < MAXE) & (eb < MAXE)
            if INSIDE:  # the extreme sources over the output's corners, strictly inside (0, S - 1)
                lo = c[b]
                hi = c[b]
                for a in tl.static_range(NDIM):
                    span = m[3 * b + a] * (So[a] - 1.0)
                    lo += tl.minimum(span, 0.0)
                    hi += tl.maximum(span, 0.0)
                ok = ok & (lo > 0.0) & (hi < S[b] - 1.0)
        else:
            tb = zero
            cb = zero
            eb = zero
        cinv = cinv + (cb,)
        ext = ext + (eb,)
        trips = trips + (tb,)
    for e in tl.static_range(9):
        ok = ok & (tl.abs(m[e]) < MAXE) & (tl.abs(inv[e]) < MAXE)
    ok = ok & ((box_pts <= SMALL) | ((box_pts <= WASTE * vol / tl.abs(det)) & (box_pts <= MAXC)))
    norm = zero  # the largest absolute row sums of M and of M^-1 (the spread), and their product's bound
    spread = zero
    for a in tl.static_range(NDIM):
        rs = zero
        rs_inv = zero
        for b in tl.static_range(NDIM):
            rs += tl.abs(m[3 * a + b])
            rs_inv += tl.abs(inv[3 * a + b])
        norm = tl.maximum(norm, rs)
        spread = tl.maximum(spread, rs_inv)
    ok = ok & (norm * spread <= MAXCOND)
    row = p_tab + r * 32
    for e in tl.static_range(9):
        tl.store(row + e, m[e].to(tl.float32), mask=live)
        tl.store(row + (9 + e), tl.where(ok, inv[e], 0.0).to(tl.float32), mask=live)
    for b in tl.static_range(3):
        tl.store(row + (18 + b), tl.where(ok, cinv[b], 0.0).to(tl.float32), mask=live)
        tl.store(row + (21 + b), tl.where(ok, ext[b], 0.0).to(tl.float32), mask=live)
        tl.store(row + (24 + b), tl.where(ok, trips[b], 0.0).to(tl.float32), mask=live)
    tl.store(row + 27, tl.where(ok, 1.0, 0.0).to(tl.float32), mask=live)
    tl.store(row + 28, tl.where(ok, spread, float("inf")).to(tl.float32), mask=live)
    for e in tl.static_range(3):
        tl.store(row + (29 + e), zero.to(tl.float32), mask=live)


@triton.jit
def _entry(row, a: tl.constexpr, b: tl.constexpr, AT: tl.constexpr):
    return tl.load(row + (AT + 3 * a + b))


@triton.jit
def _apply(row, v, AT: tl.constexpr, a: tl.constexpr, NDIM: tl.constexpr):
    """Row ``a`` of the 3x3 matrix at ``AT`` applied to the vector ``v`` = (x, y, z)."""
    x, y, z = v
    r = _entry(row, a, 0, AT) * x + _entry(row, a, 1, AT) * y
    if NDIM == 3:
        r += _entry(row, a, 2, AT) * z
    return r


@triton.jit
def _weights(d, B: tl.constexpr):
    """Linear weights of the block's B pixels along one axis (``d``: the source minus the first pixel;
    pixel i is d - i away), and whether any is non-zero."""
    w = ()
    for i in tl.static_range(B):
        w = w + (tl.maximum(1.0 - tl.abs(d - i), 0.0),)
    return w, tl.abs(d - (B - 1) * 0.5) < 1.0 + (B - 1) * 0.5


@triton.jit
def _candidate(acc, p_g, offs, valid, dx, dy, dz, s_gc, mask_cs, CB: tl.constexpr, BX: tl.constexpr,
               BY: tl.constexpr, BZ: tl.constexpr, NDIM: tl.constexpr):
    """Adds one candidate output pixel's incoming gradient (CB channels at ``p_g + offs``) to the block's
    pixels with their weights (``d*``: its source minus the block's first pixel, per source axis)."""
    wx, ax = _weights(dx, BX)
    wy, ay = _weights(dy, BY)
    live = valid & ax & ay
    if NDIM == 3:
        wz, az = _weights(dz, BZ)
        live = live & az
    g = ()
    for c in tl.static_range(CB):
        g = g + (tl.load(p_g + (c * s_gc + offs), mask=live & mask_cs[c], other=0.0).to(tl.float32),)
    new = ()
    for l in tl.static_range(BZ):
        for j in tl.static_range(BY):
            if NDIM == 3:
                wyz = wy[j] * wz[l]
            else:
                wyz = wy[j]
            for i in tl.static_range(BX):
                w = wx[i] * wyz
                for c in tl.static_range(CB):
                    new = new + (acc[((l * BY + j) * BX + i) * CB + c] + w * g[c],)
    return new


@triton.jit
def _plane(acc, col_x, col_y, p_g, o_z, vz, d, j, t_x, t_y, Ho, Wo, s_gh, s_gw, s_gc, mask_cs, CB: tl.constexpr,
           BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr, NDIM: tl.constexpr):
    """One plane of the box (fixed z): its rows, each ``t_x`` candidates, walked from ``d`` (the
    first point's source minus the block's first pixel) by M's columns ``col_x``, ``col_y``."""
    ry = d
    for ty in range(0, t_y):
        jy = j[1] + ty
        vy = vz & (jy >= 0) & (jy < Ho)
        o_y = o_z + jy * s_gh
        cur = ry
        for tx in range(0, t_x):
            jx = j[0] + tx
            acc = _candidate(acc, p_g, o_y + jx * s_gw, vy & (jx >= 0) & (jx < Wo), cur[0], cur[1], cur[2], s_gc,
                             mask_cs, CB, BX, BY, BZ, NDIM)
            cur = (cur[0] + col_x[0], cur[1] + col_x[1], cur[2] + col_x[2])
        ry = (ry[0] + col_y[0], ry[1] + col_y[1], ry[2] + col_y[2])
    return acc


@triton.jit
def inverse_grad_input_kernel(
    p_gx,   # out: dL/dU [N, C, (D,) H, W] in U's dtype, strides s_d*
    p_go,   # dL/dV [N, K, C, (Do,) Ho, Wo], strides s_g*
    p_map,  # float32 [N*K, TABLE]: inverse_table
    s_dn, s_dc, s_dd, s_dh, s_dw,
    s_gn, s_gk, s_gc, s_gd, s_gh, s_gw,
    C, D, H, W, K, Do, Ho, Wo,
    NBX, NBY, NBZ,  # blocks per axis: cdiv(W, BX), cdiv(H, BY), cdiv(D, BZ) (1 in 2-D)
    NDIM: tl.constexpr, INT64: tl.constexpr, EVEN_C: tl.constexpr,
    CB: tl.constexpr,       # channels per program (grid axis 1 walks the channel groups), unrolled
    BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr,  # input pixels per lane along x, y, z (BLOCKS)
    BLOCK_Q: tl.constexpr,  # lanes (blocks) per program
):
    """dL/dU at BLOCK_Q blocks of BX x BY (x BZ) input pixels x CB channels: for each map k, the candidates of
    each block's preimage box in a fixed order (z, y, x), each read once."""
    pid = tl.program_id(0)
    cg = tl.program_id(1)
    n = tl.program_id(2)
    if INT64:
        pid = pid.to(tl.int64)
        cg = cg.to(tl.int64)
        n = n.to(tl.int64)
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    plane = NBX * NBY
    bz = q // plane
    rem = q - bz * plane
    by = rem // NBX
    bx = rem - by * NBX
    mask_q = bz < NBZ
    x0 = bx * BX
    y0 = by * BY
    z0 = bz * BZ
    half = ((BX - 1) * 0.5, (BY - 1) * 0.5, (BZ - 1) * 0.5)  # the block's centre, from its first pixel
    centre = (x0.to(tl.float32) + half[0], y0.to(tl.float32) + half[1], z0.to(tl.float32) + half[2])
    c0 = cg * CB
    mask_cs = ()
    for c in tl.static_range(CB):
        if EVEN_C:
            mask_cs = mask_cs + (True,)
        else:
            mask_cs = mask_cs + (c0 + c < C,)
    acc = ()
    for e in tl.static_range(CB * BX * BY * BZ):
        acc = acc + (tl.zeros([BLOCK_Q], tl.float32),)
    p_gn = p_go + n * s_gn + c0 * s_gc
    for k in range(0, K):
        row = p_map + (n * K + k) * 32  # TABLE entries: M at 0, M^-1 at 9, c' at 18, half-extents 21, trips 24
        # o* = M^-1 centre + c' (the block centre's preimage); the box starts at the smallest integer past
        # o* minus the half-extent, along each output axis
        sx = _apply(row, centre, 9, 0, NDIM) + tl.load(row + 18)
        sy = _apply(row, centre, 9, 1, NDIM) + tl.load(row + 19)
        ox = tl.floor(sx - tl.load(row + 21)) + 1.0
        oy = tl.floor(sy - tl.load(row + 22)) + 1.0
        if NDIM == 3:
            sz = _apply(row, centre, 9, 2, NDIM) + tl.load(row + 20)
            oz = tl.floor(sz - tl.load(row + 23)) + 1.0
            rel = (ox - sx, oy - sy, oz - sz)
        else:
            oz = ox
            rel = (ox - sx, oy - sy, ox)
        # the first box point's source minus the block's first pixel: M (o - o*) + half, per source axis
        if NDIM == 3:
            d = (_apply(row, rel, 0, 0, NDIM) + half[0], _apply(row, rel, 0, 1, NDIM) + half[1],
                 _apply(row, rel, 0, 2, NDIM) + half[2])
        else:
            d = (_apply(row, rel, 0, 0, NDIM) + half[0], _apply(row, rel, 0, 1, NDIM) + half[1], ox)
        if INT64:
            j = (ox.to(tl.int64), oy.to(tl.int64), oz.to(tl.int64))
        else:
            j = (ox.to(tl.int32), oy.to(tl.int32), oz.to(tl.int32))
        t_x = tl.load(row + 24).to(tl.int32)
        t_y = tl.load(row + 25).to(tl.int32)
        p_gk = p_gn + k * s_gk
        if NDIM == 3:
            col_x = (_entry(row, 0, 0, 0), _entry(row, 1, 0, 0), _entry(row, 2, 0, 0))
            col_y = (_entry(row, 0, 1, 0), _entry(row, 1, 1, 0), _entry(row, 2, 1, 0))
            col_z = (_entry(row, 0, 2, 0), _entry(row, 1, 2, 0), _entry(row, 2, 2, 0))
            t_z = tl.load(row + 26).to(tl.int32)
            for tz in range(0, t_z):
                jz = j[2] + tz
                acc = _plane(acc, col_x, col_y, p_gk, jz * s_gd, mask_q & (jz >= 0) & (jz < Do), d, j, t_x, t_y, Ho, Wo,
                             s_gh, s_gw, s_gc, mask_cs, CB, BX, BY, BZ, NDIM)
                d = (d[0] + col_z[0], d[1] + col_z[1], d[2] + col_z[2])
        else:
            col_x = (_entry(row, 0, 0, 0), _entry(row, 1, 0, 0), 0.0)
            col_y = (_entry(row, 0, 1, 0), _entry(row, 1, 1, 0), 0.0)
            acc = _plane(acc, col_x, col_y, p_gk, 0, mask_q, d, j, t_x, t_y, Ho, Wo, s_gh, s_gw, s_gc, mask_cs, CB, BX, BY,
                         BZ, NDIM)
    # the block's pixels, each CB channels
    p_dn = p_gx + n * s_dn + c0 * s_dc
    for l in tl.static_range(BZ):
        for jj in tl.static_range(BY):
            for i in tl.static_range(BX):
                inside = mask_q & (x0 + i < W) & (y0 + jj < H)
                o_d = (x0 + i) * s_dw + (y0 + jj) * s_dh
                if NDIM == 3:
                    inside = inside & (z0 + l < D)
                    o_d += (z0 + l) * s_dd
                for c in tl.static_range(CB):
                    tl.store(p_dn + (c * s_dc + o_d), acc[((l * BY + jj) * BX + i) * CB + c].to(p_gx.dtype.element_ty),
                             mask=inside & mask_cs[c])
