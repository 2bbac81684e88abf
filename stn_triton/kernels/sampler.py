"""The fused sampler: one forward and one backward kernel, specialised per form at compile time.

Forward, for output pixel p of transform (n, k) and channel c:

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

The input gradient is a scatter. By default it uses fp32 atomics. Under
``torch.use_deterministic_algorithms(True)`` it is a gather instead: :func:`corner_index_kernel`
lists each (pixel, corner) contribution's target input pixel and weight, the host sorts them by target
with a stable sort, and :func:`gather_grad_input_kernel` sums each input pixel's contributions in that
fixed order.
"""

import torch
import triton
import triton.language as tl

from .affine import affine_coords, affine_param_grad
from .basis import basis_coords, basis_grad_kernel, basis_param_grad
from .common import (
    MODE_BILINEAR,
    MODE_CODES,
    PADDING_CODES,
    bilinear_corners,
    round_half_even,
    source_index,
)
from .grid import grid_coords
from .projective import projective_coords, projective_param_grad

FORM_AFFINE, FORM_PROJECTIVE, FORM_BASIS, FORM_GRID = 0, 1, 2, 3
FORM_CODES = {"affine": FORM_AFFINE, "projective": FORM_PROJECTIVE, "basis": FORM_BASIS, "grid": FORM_GRID}


@triton.jit
def _form_coords(
    FORM: tl.constexpr, nk, n, k, offs_p, mask_p, Wo, P, D, p_prm, p_aux,
    s_an, s_ak, s_ah, s_aw, s_ac, bsx, box, bsy, boy,
):
    """Normalised sampling coordinate of each pixel, plus what the backward needs of the form."""
    i = offs_p // Wo  # output row, int64 [BLOCK_P]
    j = offs_p % Wo  # output column
    x = j.to(tl.float32) * bsx + box  # affine_grid's base grid
    y = i.to(tl.float32) * bsy + boy
    w = tl.full(x.shape, 1.0, tl.float32)
    if FORM == 0:
        gx, gy = affine_coords(p_prm + nk * 6, x, y)
    elif FORM == 1:
        gx, gy, w = projective_coords(p_prm + nk * 9, x, y)
    elif FORM == 2:
        gx, gy = basis_coords(p_prm + nk * 2 * D, p_aux, offs_p, mask_p, D, P)
    else:
        gx, gy = grid_coords(p_aux + n * s_an + k * s_ak, i, j, mask_p, s_ah, s_aw, s_ac)
    return gx, gy, x, y, w


@triton.jit
def sample_fwd_kernel(
    p_x,    # input U [N, C, H, W], strides s_xn, s_xc, s_xh, s_xw (any layout)
    p_out,  # output V [N, K, C, Ho, Wo], strides s_on, s_ok, s_oc, s_oh, s_ow
    p_prm,  # float32 [N*K, R]: the form's matrix (R = 6 affine, 9 projective, 2*D basis)
    p_aux,  # basis: float32 B [D, Ho*Wo]; grid: grid [N, K, Ho, Wo, 2], strides s_a*
    s_xn, s_xc, s_xh, s_xw,
    s_on, s_ok, s_oc, s_oh, s_ow,
    s_an, s_ak, s_ah, s_aw, s_ac,
    C, H, W, K, Ho, Wo, D,
    bsx, box, bsy, boy,  # base grid x_j = bsx * j + box, y_i = bsy * i + boy
    ax, bx, ay, by,      # unnormalise: i_x = ax * g_x + bx, i_y = ay * g_y + by
    FORM: tl.constexpr, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    P = Ho * Wo
    n_blk = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0).to(tl.int64)
    nk = pid // n_blk
    blk = pid % n_blk
    n = nk // K
    k = nk % K
    offs_p = blk * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # [BP]
    mask_p = offs_p < P
    gx, gy, x, y, w = _form_coords(FORM, nk, n, k, offs_p, mask_p, Wo, P, D, p_prm, p_aux,
                                   s_an, s_ak, s_ah, s_aw, s_ac, bsx, box, bsy, boy)
    ix, _ = source_index(gx, ax, bx, W, PAD, ALIGN)
    iy, _ = source_index(gy, ay, by, H, PAD, ALIGN)

    p_xn = p_x + n * s_xn
    o_out = n * s_on + k * s_ok + (offs_p // Wo) * s_oh + (offs_p % Wo) * s_ow  # [BP]
    if MODE == 0:
        x0, y0, tx, ty, sx, sy, in_x0, in_x1, in_y0, in_y1 = bilinear_corners(ix, iy, W, H)
        o_nw = y0 * s_xh + x0 * s_xw  # [BP]
        m_nw = mask_p & in_y0 & in_x0
        m_ne = mask_p & in_y0 & in_x1
        m_sw = mask_p & in_y1 & in_x0
        m_se = mask_p & in_y1 & in_x1
        w_nw = (sx * sy)[:, None]
        w_ne = (tx * sy)[:, None]
        w_sw = (sx * ty)[:, None]
        w_se = (tx * ty)[:, None]
    else:
        xr = round_half_even(ix).to(tl.int64)
        yr = round_half_even(iy).to(tl.int64)
        o_nn = yr * s_xh + xr * s_xw
        m_nn = mask_p & (xr >= 0) & (xr < W) & (yr >= 0) & (yr < H)

    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)  # [BC]
        mask_c = (offs_c < C)[None, :]
        o_c = (offs_c * s_xc)[None, :]  # [1, BC]
        if MODE == 0:
            v = w_nw * tl.load(p_xn + o_nw[:, None] + o_c, mask=m_nw[:, None] & mask_c, other=0.0).to(tl.float32)
            v += w_ne * tl.load(p_xn + (o_nw + s_xw)[:, None] + o_c, mask=m_ne[:, None] & mask_c, other=0.0).to(tl.float32)
            v += w_sw * tl.load(p_xn + (o_nw + s_xh)[:, None] + o_c, mask=m_sw[:, None] & mask_c, other=0.0).to(tl.float32)
            v += w_se * tl.load(p_xn + (o_nw + s_xh + s_xw)[:, None] + o_c, mask=m_se[:, None] & mask_c, other=0.0).to(tl.float32)
        else:
            v = tl.load(p_xn + o_nn[:, None] + o_c, mask=m_nn[:, None] & mask_c, other=0.0).to(tl.float32)
        tl.store(p_out + o_out[:, None] + (offs_c * s_oc)[None, :], v.to(p_out.dtype.element_ty),
                 mask=mask_p[:, None] & mask_c)


@triton.jit
def sample_bwd_kernel(
    p_x,     # input U [N, C, H, W], strides s_x*
    p_go,    # incoming gradient dL/dV [N, K, C, Ho, Wo], strides s_g*
    p_gx,    # out: float32 dL/dU [N, C, H, W], strides s_d* (zeroed; atomics) -- if NEED_X
    p_prm,   # float32 [N*K, R], as in the forward
    p_aux,   # as in the forward
    p_part,  # out: float32 [N*K, n_blk, R] per-program partial dL/dM -- if NEED_PARAM
    p_gg,    # out: float32 [N*K, Ho*Wo, 2] dL/dg -- if WRITE_GG
    s_xn, s_xc, s_xh, s_xw,
    s_gn, s_gk, s_gc, s_gh, s_gw,
    s_dn, s_dc, s_dh, s_dw,
    s_an, s_ak, s_ah, s_aw, s_ac,
    C, H, W, K, Ho, Wo, D, R,
    bsx, box, bsy, boy, ax, bx, ay, by,
    FORM: tl.constexpr, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr,
    NEED_X: tl.constexpr, NEED_G: tl.constexpr, NEED_PARAM: tl.constexpr, WRITE_GG: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # NEED_G: the coordinate gradient is wanted (bilinear only: nearest is piecewise constant)
    P = Ho * Wo
    n_blk = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0).to(tl.int64)
    nk = pid // n_blk
    blk = pid % n_blk
    n = nk // K
    k = nk % K
    offs_p = blk * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # [BP]
    mask_p = offs_p < P
    gx, gy, x, y, w = _form_coords(FORM, nk, n, k, offs_p, mask_p, Wo, P, D, p_prm, p_aux,
                                   s_an, s_ak, s_ah, s_aw, s_ac, bsx, box, bsy, boy)
    ix, dix = source_index(gx, ax, bx, W, PAD, ALIGN)
    iy, diy = source_index(gy, ay, by, H, PAD, ALIGN)

    p_xn = p_x + n * s_xn
    p_gxn = p_gx + n * s_dn
    o_go = n * s_gn + k * s_gk + (offs_p // Wo) * s_gh + (offs_p % Wo) * s_gw  # [BP]
    if MODE == 0:
        x0, y0, tx, ty, sx, sy, in_x0, in_x1, in_y0, in_y1 = bilinear_corners(ix, iy, W, H)
        m_nw = (mask_p & in_y0 & in_x0)[:, None]
        m_ne = (mask_p & in_y0 & in_x1)[:, None]
        m_sw = (mask_p & in_y1 & in_x0)[:, None]
        m_se = (mask_p & in_y1 & in_x1)[:, None]
        o_nw = (y0 * s_xh + x0 * s_xw)[:, None]
        d_nw = (y0 * s_dh + x0 * s_dw)[:, None]
    else:
        xr = round_half_even(ix).to(tl.int64)
        yr = round_half_even(iy).to(tl.int64)
        m_nn = (mask_p & (xr >= 0) & (xr < W) & (yr >= 0) & (yr < H))[:, None]
        d_nn = (yr * s_dh + xr * s_dw)[:, None]
    g_ix = tl.zeros([BLOCK_P], tl.float32)  # sum_c dL/dV * dV/di_x
    g_iy = tl.zeros([BLOCK_P], tl.float32)

    if NEED_X or NEED_G:  # nearest sampling with only parameter gradients reads no channel
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask_c = (offs_c < C)[None, :]
            go = tl.load(p_go + o_go[:, None] + (offs_c * s_gc)[None, :], mask=mask_p[:, None] & mask_c,
                         other=0.0).to(tl.float32)  # [BP, BC]
            if NEED_X:
                d_c = (offs_c * s_dc)[None, :]
                if MODE == 0:
                    tl.atomic_add(p_gxn + d_nw + d_c, go * (sx * sy)[:, None], mask=m_nw & mask_c)
                    tl.atomic_add(p_gxn + d_nw + s_dw + d_c, go * (tx * sy)[:, None], mask=m_ne & mask_c)
                    tl.atomic_add(p_gxn + d_nw + s_dh + d_c, go * (sx * ty)[:, None], mask=m_sw & mask_c)
                    tl.atomic_add(p_gxn + d_nw + s_dh + s_dw + d_c, go * (tx * ty)[:, None], mask=m_se & mask_c)
                else:
                    tl.atomic_add(p_gxn + d_nn + d_c, go, mask=m_nn & mask_c)
            if NEED_G:
                o_c = (offs_c * s_xc)[None, :]
                v_nw = tl.load(p_xn + o_nw + o_c, mask=m_nw & mask_c, other=0.0).to(tl.float32)
                v_ne = tl.load(p_xn + o_nw + s_xw + o_c, mask=m_ne & mask_c, other=0.0).to(tl.float32)
                v_sw = tl.load(p_xn + o_nw + s_xh + o_c, mask=m_sw & mask_c, other=0.0).to(tl.float32)
                v_se = tl.load(p_xn + o_nw + s_xh + s_xw + o_c, mask=m_se & mask_c, other=0.0).to(tl.float32)
                g_ix += tl.sum(go * (sy[:, None] * (v_ne - v_nw) + ty[:, None] * (v_se - v_sw)), axis=1)
                g_iy += tl.sum(go * (sx[:, None] * (v_sw - v_nw) + tx[:, None] * (v_se - v_ne)), axis=1)

    gg_x = tl.where(mask_p, g_ix * dix, 0.0)  # dL/dg_x [BP]
    gg_y = tl.where(mask_p, g_iy * diy, 0.0)
    if WRITE_GG:
        tl.store(p_gg + (nk * P + offs_p) * 2, gg_x, mask=mask_p)
        tl.store(p_gg + (nk * P + offs_p) * 2 + 1, gg_y, mask=mask_p)
    if NEED_PARAM:
        p_part_i = p_part + (nk * n_blk + blk) * R
        if FORM == 0:
            affine_param_grad(p_part_i, x, y, gg_x, gg_y)
        elif FORM == 1:
            projective_param_grad(p_part_i, x, y, gx, gy, w, gg_x, gg_y, mask_p)
        elif FORM == 2:
            basis_param_grad(p_part_i, p_aux, offs_p, mask_p, D, P, gg_x, gg_y)


@triton.jit
def corner_index_kernel(
    p_idx,  # out: int64 [N, K*Ho*Wo*NCORNER] target input pixel (y * W + x), H*W where none
    p_wt,   # out: float32 [N, K*Ho*Wo*NCORNER] bilinear weight of that contribution
    p_prm, p_aux,
    s_an, s_ak, s_ah, s_aw, s_ac,
    H, W, K, Ho, Wo, D,
    bsx, box, bsy, boy, ax, bx, ay, by,
    FORM: tl.constexpr, MODE: tl.constexpr, PAD: tl.constexpr, ALIGN: tl.constexpr,
    NCORNER: tl.constexpr, BLOCK_P: tl.constexpr,
):
    P = Ho * Wo
    n_blk = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0).to(tl.int64)
    nk = pid // n_blk
    blk = pid % n_blk
    n = nk // K
    k = nk % K
    offs_p = blk * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_p = offs_p < P
    gx, gy, x, y, w = _form_coords(FORM, nk, n, k, offs_p, mask_p, Wo, P, D, p_prm, p_aux,
                                   s_an, s_ak, s_ah, s_aw, s_ac, bsx, box, bsy, boy)
    ix, _ = source_index(gx, ax, bx, W, PAD, ALIGN)
    iy, _ = source_index(gy, ay, by, H, PAD, ALIGN)
    none = H * W
    o_e = (n * K * P + k * P + offs_p) * NCORNER  # entry of corner 0 [BP]
    if MODE == 0:
        x0, y0, tx, ty, sx, sy, in_x0, in_x1, in_y0, in_y1 = bilinear_corners(ix, iy, W, H)
        q = y0 * W + x0
        tl.store(p_idx + o_e, tl.where(in_y0 & in_x0, q, none), mask=mask_p)
        tl.store(p_idx + o_e + 1, tl.where(in_y0 & in_x1, q + 1, none), mask=mask_p)
        tl.store(p_idx + o_e + 2, tl.where(in_y1 & in_x0, q + W, none), mask=mask_p)
        tl.store(p_idx + o_e + 3, tl.where(in_y1 & in_x1, q + W + 1, none), mask=mask_p)
        tl.store(p_wt + o_e, sx * sy, mask=mask_p)
        tl.store(p_wt + o_e + 1, tx * sy, mask=mask_p)
        tl.store(p_wt + o_e + 2, sx * ty, mask=mask_p)
        tl.store(p_wt + o_e + 3, tx * ty, mask=mask_p)
    else:
        xr = round_half_even(ix).to(tl.int64)
        yr = round_half_even(iy).to(tl.int64)
        inside = (xr >= 0) & (xr < W) & (yr >= 0) & (yr < H)
        tl.store(p_idx + o_e, tl.where(inside, yr * W + xr, none), mask=mask_p)
        tl.store(p_wt + o_e, tl.full([BLOCK_P], 1.0, tl.float32), mask=mask_p)


@triton.jit
def gather_grad_input_kernel(
    p_gx,    # out: dL/dU [N, C, H, W] in U's dtype, strides s_d*
    p_go,    # dL/dV [N, K, C, Ho, Wo], strides s_g*
    p_perm,  # int64 [N, E]: entries in order of target pixel (stable sort of corner_index_kernel's idx)
    p_wt,    # float32 [N, E]: weights, indexed by entry
    p_seg,   # int64 [N, H*W + 1]: first sorted position of each target pixel
    s_dn, s_dc, s_dh, s_dw,
    s_gn, s_gk, s_gc, s_gh, s_gw,
    C, H, W, K, Wo, P, E,
    NCORNER: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    HW = H * W
    n_blk = tl.cdiv(HW, BLOCK_Q)
    pid = tl.program_id(0).to(tl.int64)
    n = pid // n_blk
    blk = pid % n_blk
    # Everything per pixel stays [BQ, 1]: Triton 3.6 miscompiles a loop-varying 1-D mask that is
    # also expanded to 2-D inside the loop ("mask type matches ptr type").
    offs_q = (blk * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64))[:, None]  # input pixels [BQ, 1]
    mask_q = offs_q < HW
    start = tl.load(p_seg + n * (HW + 1) + offs_q, mask=mask_q, other=0)
    end = tl.load(p_seg + n * (HW + 1) + offs_q + 1, mask=mask_q, other=0)
    n_max = tl.max(tl.max(end - start, axis=1), axis=0)
    o_d = n * s_dn + (offs_q // W) * s_dh + (offs_q % W) * s_dw  # [BQ, 1]
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C).to(tl.int64))[None, :]  # [1, BC]
        mask_c = offs_c < C
        acc = tl.zeros([BLOCK_Q, BLOCK_C], tl.float32)
        for t in range(0, n_max):
            pos = start + t
            live = mask_q & (pos < end)  # [BQ, 1]
            e = tl.load(p_perm + n * E + pos, mask=live, other=0)
            wt = tl.load(p_wt + n * E + e, mask=live, other=0.0)
            kp = e // NCORNER  # k * P + p
            k = kp // P
            p = kp % P
            o_g = n * s_gn + k * s_gk + (p // Wo) * s_gh + (p % Wo) * s_gw
            go = tl.load(p_go + o_g + offs_c * s_gc, mask=live & mask_c, other=0.0).to(tl.float32)
            acc += wt * go
        tl.store(p_gx + o_d + offs_c * s_dc, acc.to(p_gx.dtype.element_ty), mask=mask_q & mask_c)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

BLOCK_P = 64


def fill_new(t):
    """Every buffer a kernel must fill passes through here; tests replace it to poison with NaN."""
    return t


def _empty(shape, dtype, device):
    return fill_new(torch.empty(shape, dtype=dtype, device=device))


def _empty_like(t):
    return fill_new(torch.empty_like(t))


def _block_c(C):
    return max(1, min(triton.next_power_of_2(max(C, 1)), 16))


def _geometry(H, W, Ho, Wo, align_corners):
    """Host constants: base-grid scale/offset per axis and the unnormalisation a*g + b."""

    def base(n):
        if align_corners:
            return (2.0 / (n - 1), -1.0) if n > 1 else (0.0, 0.0)
        return 2.0 / n, 1.0 / n - 1.0

    def unnorm(size):
        a = (size - 1) / 2.0 if align_corners else size / 2.0
        return a, (size - 1) / 2.0

    (bsx, box), (bsy, boy) = base(Wo), base(Ho)
    (ax, bx), (ay, by) = unnorm(W), unnorm(H)
    return bsx, box, bsy, boy, ax, bx, ay, by


def _is_channels_last(x):
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def new_output(x, K, Ho, Wo):
    """(N, K, C, Ho, Wo) in x's memory format: channels innermost when x is channels-last.

    Shared by the kernels' launcher and the ops' fake implementations, so both agree on strides.
    """
    N, C = x.shape[0], x.shape[1]
    if _is_channels_last(x):
        return _empty((N, K, Ho, Wo, C), x.dtype, x.device).permute(0, 1, 4, 2, 3)
    return _empty((N, K, C, Ho, Wo), x.dtype, x.device)


def _aux_args(form, aux):
    """The aux pointer and its 5 strides (grid form), or B (basis form), or a dummy."""
    if form == "grid":
        return aux, tuple(aux.stride())
    return aux, (0, 0, 0, 0, 0)


def sample_forward(form, x, prm, aux, K, Ho, Wo, D, mode, padding_mode, align_corners):
    """Launch the forward kernel. prm: float32 (N*K, R) contiguous; aux: see the kernel."""
    N, C, H, W = x.shape
    out = new_output(x, K, Ho, Wo)
    if out.numel() == 0:
        return out
    aux, s_a = _aux_args(form, aux)
    grid = (N * K * triton.cdiv(Ho * Wo, BLOCK_P),)
    sample_fwd_kernel[grid](
        x, out, prm, aux, *x.stride(), *out.stride(), *s_a,
        C, H, W, K, Ho, Wo, D, *_geometry(H, W, Ho, Wo, align_corners),
        FORM=FORM_CODES[form], MODE=MODE_CODES[mode], PAD=PADDING_CODES[padding_mode],
        ALIGN=bool(align_corners), BLOCK_P=BLOCK_P, BLOCK_C=_block_c(C),
    )
    return out


def sample_backward(form, grad_out, x, prm, aux, K, Ho, Wo, D, R, mode, padding_mode, align_corners,
                    need_x, need_param, need_gg):
    """Launch the backward kernel(s).

    Returns (dL/dx in x's dtype and layout or None, dL/dprm float32 (N*K, R) or None,
    dL/dg float32 (N*K, Ho*Wo, 2) or None).
    """
    N, C, H, W = x.shape
    NK, P = N * K, Ho * Wo
    dev = x.device
    bilinear = mode == "bilinear"
    deterministic = torch.are_deterministic_algorithms_enabled()
    n_blk = triton.cdiv(P, BLOCK_P)
    geometry = _geometry(H, W, Ho, Wo, align_corners)
    aux, s_a = _aux_args(form, aux)
    consts = dict(FORM=FORM_CODES[form], MODE=MODE_CODES[mode], PAD=PADDING_CODES[padding_mode],
                  ALIGN=bool(align_corners))

    grad_x = None
    if need_x:
        if deterministic:
            grad_x = _grad_input_deterministic(form, grad_out, x, prm, aux, s_a, K, Ho, Wo, D, geometry, consts)
        else:
            grad_x = torch.zeros_like(x, dtype=torch.float32)
    atomics = need_x and not deterministic
    want_g = bilinear and (need_param or need_gg)  # nearest: dL/dg = 0, still pushed through the form
    part = _empty((NK, n_blk, R), torch.float32, dev) if (need_param and NK * P > 0) else None
    gg = _empty((NK, P, 2), torch.float32, dev) if need_gg else None
    if NK * P > 0 and (atomics or need_param or need_gg):
        d_buf = grad_x if atomics else x  # stride source only when NEED_X is off
        sample_bwd_kernel[(NK * n_blk,)](
            x, grad_out, d_buf, prm, aux,
            part if part is not None else prm, gg if gg is not None else prm,
            *x.stride(), *grad_out.stride(), *d_buf.stride(), *s_a,
            C, H, W, K, Ho, Wo, D, R, *geometry, **consts,
            NEED_X=atomics, NEED_G=want_g, NEED_PARAM=part is not None, WRITE_GG=need_gg,
            BLOCK_P=BLOCK_P, BLOCK_C=_block_c(C),
        )
    if atomics:
        grad_x = grad_x.to(x.dtype)
    grad_prm = None
    if need_param:
        grad_prm = part.sum(dim=1) if part is not None else torch.zeros((NK, R), dtype=torch.float32, device=dev)
    return grad_x, grad_prm, gg


def _grad_input_deterministic(form, grad_out, x, prm, aux, s_a, K, Ho, Wo, D, geometry, consts):
    N, C, H, W = x.shape
    P, HW = Ho * Wo, H * W
    ncorner = 4 if consts["MODE"] == MODE_BILINEAR else 1
    E = K * P * ncorner
    grad_x = _empty_like(x)
    if grad_x.numel() == 0:
        return grad_x
    if E == 0:
        return grad_x.zero_()
    idx = _empty((N, E), torch.int64, x.device)
    wt = _empty((N, E), torch.float32, x.device)
    corner_index_kernel[(N * K * triton.cdiv(P, BLOCK_P),)](
        idx, wt, prm, aux, *s_a, H, W, K, Ho, Wo, D, *geometry, **consts,
        NCORNER=ncorner, BLOCK_P=BLOCK_P,
    )
    sorted_idx, perm = torch.sort(idx, dim=1, stable=True)
    targets = torch.arange(HW + 1, device=x.device, dtype=torch.int64).expand(N, HW + 1).contiguous()
    seg = torch.searchsorted(sorted_idx, targets)
    block_q = 64
    gather_grad_input_kernel[(N * triton.cdiv(HW, block_q),)](
        grad_x, grad_out, perm, wt, seg, *grad_x.stride(), *grad_out.stride(),
        C, H, W, K, Wo, P, E, NCORNER=ncorner, BLOCK_Q=block_q, BLOCK_C=_block_c(C),
    )
    return grad_x


def basis_grad(prm, gg, D, P):
    """dL/dB (D, P) float32 from M (N*K, 2*D) and dL/dg (N*K, P, 2), fixed order over (n, k)."""
    NK = prm.shape[0]
    gb = _empty((D, P), torch.float32, prm.device)
    if gb.numel() == 0:
        return gb
    block_p = 64
    basis_grad_kernel[(triton.cdiv(P, block_p),)](
        gb, prm, gg, NK, D, P, BLOCK_D=triton.next_power_of_2(max(D, 1)), BLOCK_P=block_p,
    )
    return gb
