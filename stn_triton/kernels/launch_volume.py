"""The host side of :mod:`stn_triton.kernels.volume` (5-D input): allocate, choose a launch shape, launch.

Everything the 2-D launcher (:mod:`stn_triton.kernels.launch`) decides, it decides here too, through
its own helpers: the output voxels are the 2-D plane (Do*Ho, Wo) to :func:`launch.plan` (16-byte
channel vectors for channels-last-3d inputs, one channel per step otherwise), autotuned on CUDA by
:func:`launch._launch`, batches split for the grid's limit, 64-bit indexing past 2^31 elements
(:data:`launch.FORCE_INT64` forces it), every buffer a kernel fills made by :func:`launch.fill_new`.
Differences: the input gradient's scatter always accumulates in a float32 buffer (no in-place
half-precision vector atomics), and the deterministic gather has 8 contributions per voxel
(trilinear).
"""

import math

import torch
import triton

from . import launch
from .common import MODE_CODES, PADDING_CODES
from .volume import (FORM3_CODES, basis3d_grad_kernel, corner_index3d_kernel, gather_grad_input3d_kernel,
                     sample3d_bwd_kernel, sample3d_fwd_kernel)


def _is_channels_last_3d(x):
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def new_output3d(x, K, Do, Ho, Wo):
    """(N, K, C, Do, Ho, Wo) in x's memory format: channels innermost when x is channels-last-3d.
    Shared by the launcher and the ops' fake implementations, so both agree on strides."""
    N, C = x.shape[0], x.shape[1]
    if _is_channels_last_3d(x):
        return launch._empty((N, K, Do, Ho, Wo, C), x.dtype, x.device).permute(0, 1, 5, 2, 3, 4)
    return launch._empty((N, K, C, Do, Ho, Wo), x.dtype, x.device)


def in_layout_of3d(out, x):
    """``out`` (N, K, C, Do, Ho, Wo) in the memory format :func:`new_output3d` gives for ``x``."""
    if _is_channels_last_3d(x):
        return out.permute(0, 1, 3, 4, 5, 2).contiguous().permute(0, 1, 5, 2, 3, 4)
    return out.contiguous()


def geometry3d(Do, Ho, Wo, align_corners):
    """affine_grid's base grid per axis: x_j = bsx * j + box, y_i = bsy * i + boy, z_d = bsz * d + boz."""

    def base(n):
        if align_corners:
            return (2.0 / (n - 1), -1.0) if n > 1 else (0.0, 0.0)
        return (2.0 / n, 1.0 / n - 1.0) if n > 0 else (0.0, 0.0)

    return (*base(Wo), *base(Ho), *base(Do))


def _aux_args(form, aux):
    """The aux pointer and its 6 strides (grid form), or B (basis form), or a dummy."""
    if form == "grid3d":
        return aux, tuple(aux.stride())
    return aux, (0, 0, 0, 0, 0, 0)


_MODES_3D = ("bilinear", "nearest")  # trilinear and nearest: PyTorch has no bicubic for 5-D input either


def _consts(form, x, mode, padding_mode, align_corners):
    if mode not in _MODES_3D:
        raise ValueError(f"mode: 5-D input takes {_MODES_3D} ('bilinear' is trilinear), got {mode!r}")
    return dict(FORM=FORM3_CODES[form], MODE=MODE_CODES[mode], PAD=PADDING_CODES[padding_mode],
                ALIGN=bool(align_corners), FMA=launch._true_fma(x.device))


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

def sample3d_forward(form, x, prm, aux, K, size, DM, mode, padding_mode, align_corners):
    """Launch the 3-D forward kernel. x (N, C, D, H, W); prm: float32 (N*K, R) contiguous (a dummy for
    the grid form); aux: B (DM, P) float32 (basis form) or the grid (N, K, Do, Ho, Wo, 3) (grid form)."""
    N, C, D, H, W = x.shape
    Do, Ho, Wo = size
    out = new_output3d(x, K, Do, Ho, Wo)
    if out.numel() == 0:
        return out
    launch._check_k(K)
    p = launch.plan(x, Do * Ho, Wo)
    R = prm.shape[1] if form != "grid3d" else 0
    grid = form == "grid3d"
    consts = dict(_consts(form, x, mode, padding_mode, align_corners),
                  INT64=launch._int64(x, out, aux if grid else None), BLOCK_C=p.block_c)
    key = ("3d", form, mode, padding_mode, C, D, H, W, Do, Ho, Wo, K, x.dtype, p.block_c, x.stride(1) == 1)
    geometry = geometry3d(Do, Ho, Wo, align_corners)
    for nb in launch._batches(N):
        xb, ob = x[nb], out[nb]
        auxb, s_a = _aux_args(form, aux[nb] if grid else aux)
        args = (xb, ob, prm if grid else launch._rows(prm, nb, K), auxb, *xb.stride(), *ob.stride(), *s_a,
                C, D, H, W, K, Do, Ho, Wo, DM, R, *geometry)
        launch._launch(sample3d_fwd_kernel, p, (K, nb.stop - nb.start), args, consts, x.device, key)
    return out


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

def sample3d_backward(form, grad_out, x, prm, aux, K, size, DM, R, mode, padding_mode, align_corners,
                      need_x, need_param, need_gg):
    """Launch the 3-D backward kernel(s).

    Returns (dL/dx in x's dtype and layout or None, dL/dprm float32 (N*K, R) or None,
    dL/dg float32 (N*K, Do*Ho*Wo, 3) or None).
    """
    N, C, D, H, W = x.shape
    Do, Ho, Wo = size
    NK, P = N * K, Do * Ho * Wo
    dev = x.device
    launch._check_k(K)
    if NK * C * P == 0:  # an empty output: every gradient is zero (or empty), and no kernel runs
        return (torch.zeros_like(x) if need_x else None,
                torch.zeros((NK, R), dtype=torch.float32, device=dev) if need_param else None,
                torch.zeros((NK, P, 3), dtype=torch.float32, device=dev) if need_gg else None)
    grid = form == "grid3d"
    deterministic = torch.are_deterministic_algorithms_enabled()
    p = launch.plan(x, Do * Ho, Wo, backward=True)
    geometry = geometry3d(Do, Ho, Wo, align_corners)

    grad_x = None
    if need_x:
        if deterministic:
            grad_x = _grad_input_deterministic(form, grad_out, x, prm, aux, K, size, DM, R, mode, padding_mode,
                                               align_corners, geometry)
        else:
            grad_x = torch.zeros_like(x, dtype=torch.float32)
    atomics = need_x and not deterministic
    want_g = mode == "bilinear" and (need_param or need_gg)  # nearest: dL/dg = 0
    tpp = launch.tiles_per_program("basis" if form == "basis3d" else form, p, C, K, N)
    NPROG = max(p.n_programs(bp, tpp) for bp, _ in launch._choices(p, dev))
    part = launch._empty((NK, NPROG, R), torch.float32, dev) if need_param else None
    gg = launch._empty((NK, P, 3), torch.float32, dev) if need_gg else None
    bp = p.block_p
    if atomics or need_param or need_gg:
        consts = dict(_consts(form, x, mode, padding_mode, align_corners),
                      NEED_X=atomics, NEED_G=want_g, NEED_PARAM=need_param, WRITE_GG=need_gg,
                      INT64=launch._int64(x, grad_out, grad_x, aux if grid else None,
                                          extra=NK * max(3 * P, NPROG * R)),
                      BLOCK_C=p.block_c)
        key = ("3d", form, mode, padding_mode, C, D, H, W, Do, Ho, Wo, K, x.dtype, p.block_c, x.stride(1) == 1,
               atomics, need_param, need_gg)
        for nb in launch._batches(N):
            xb, gob = x[nb], grad_out[nb]
            auxb, s_a = _aux_args(form, aux[nb] if grid else aux)
            d_buf = grad_x[nb] if atomics else prm[:1]  # a harmless stand-in when NEED_X is off
            d_strides = d_buf.stride() if atomics else x.stride()
            args = (xb, gob, d_buf, prm if grid else launch._rows(prm, nb, K), auxb,
                    launch._rows(part, nb, K) if part is not None else prm,
                    launch._rows(gg, nb, K) if gg is not None else prm,
                    *xb.stride(), *gob.stride(), *d_strides, *s_a,
                    C, D, H, W, K, Do, Ho, Wo, DM, R, NPROG, p.n_ctiles, *geometry)
            bp, _ = launch._launch(sample3d_bwd_kernel, p, (K, nb.stop - nb.start), args, consts, dev, key,
                                   reset=[d_buf] if atomics else None, tpp=tpp)
    if atomics:
        grad_x = grad_x.to(x.dtype)
    grad_prm = None
    if need_param:  # the programs of the shape launched, summed in a fixed order
        grad_prm = part[:, :p.n_programs(bp, tpp)].sum(dim=1)
    return grad_x, grad_prm, gg


def _grad_input_deterministic(form, grad_out, x, prm, aux, K, size, DM, R, mode, padding_mode, align_corners,
                              geometry):
    """dL/dx as a gather: list the contributions, sort them by target voxel (stable), sum in order."""
    N, C, D, H, W = x.shape
    Do, Ho, Wo = size
    P, DHW = Do * Ho * Wo, D * H * W
    log2_nc = 3 if mode == "bilinear" else 0
    E = (K * P) << log2_nc
    grad_x = launch._empty_like(x)
    if grad_x.numel() == 0:
        return grad_x
    if E == 0:
        return grad_x.zero_()
    grid = form == "grid3d"
    int64 = launch._int64(x, grad_out, aux if grid else None, extra=max(N * E, N * (DHW + 1)))
    itype = torch.int64 if int64 else torch.int32
    idx = launch._empty((N, E), itype, x.device)
    wt = launch._empty((N, E), torch.float32, x.device)
    goff = launch._empty((N, K * P), itype, x.device)
    p = launch.plan(x, Do * Ho, Wo)
    consts = dict(_consts(form, x, mode, padding_mode, align_corners), INT64=int64, LOG2_NC=log2_nc,
                  LOG2_TW=p.log2_tw, LOG2_CT=p.log2_ct, BLOCK_P=p.block_p)
    for nb in launch._batches(N):
        auxb, s_a = _aux_args(form, aux[nb] if grid else aux)
        corner_index3d_kernel[(p.grid0(), K, nb.stop - nb.start)](
            idx[nb], wt[nb], goff[nb], prm if grid else launch._rows(prm, nb, K), auxb,
            grad_out.stride(1), grad_out.stride(3), grad_out.stride(4), grad_out.stride(5), *s_a,
            D, H, W, K, Do, Ho, Wo, DM, R, *geometry, **consts, num_warps=p.num_warps)
    sorted_idx, perm = torch.sort(idx, dim=1, stable=True)
    targets = torch.arange(DHW + 1, device=x.device, dtype=itype).expand(N, DHW + 1).contiguous()
    seg = torch.searchsorted(sorted_idx, targets, out_int32=not int64)
    # [BQ, BC] accumulators: at most 2048 (16 float32 registers per thread of 4 warps)
    block_c = min(triton.next_power_of_2(C), 32)
    block_q = max(16, min(128, 2048 // block_c))
    for nb in launch._batches(N):
        gather_grad_input3d_kernel[(triton.cdiv(DHW, block_q), triton.cdiv(C, block_c), nb.stop - nb.start)](
            grad_x[nb], grad_out[nb], perm[nb], wt[nb], goff[nb], seg[nb], *grad_x.stride(),
            grad_out.stride(0), grad_out.stride(2), C, D, H, W, E,
            INT64=int64, EVEN_C=C % block_c == 0, LOG2_NC=log2_nc, BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=4)
    return grad_x


def basis3d_grad(prm, gg, DM, P):
    """dL/dB (DM, P) float32 from M (N*K, 3*DM) and dL/dg (N*K, P, 3), fixed order over (n, k)."""
    NK = prm.shape[0]
    gb = launch._empty((DM, P), torch.float32, prm.device)
    if gb.numel() == 0:
        return gb
    block_p = 64
    basis3d_grad_kernel[(triton.cdiv(P, block_p),)](
        gb, prm, gg, NK, DM, P, BLOCK_D=triton.next_power_of_2(max(DM, 1)), BLOCK_P=block_p,
    )
    return gb


# --------------------------------------------------------------------------------------------------
# For the compile-only report (benchmarks/static.py)
# --------------------------------------------------------------------------------------------------

def static_hints3d(name, args, grid):
    """:func:`launch.static_hints` for the 3-D kernels (the output plane is (Do*Ho, Wo)): programs
    with voxels, and the expected trips of data-dependent loops. {} for any other kernel."""
    if name in ("sample3d_fwd_kernel", "sample3d_bwd_kernel", "corner_index3d_kernel"):
        tw = 1 << args["LOG2_TW"]
        n_ctiles = triton.cdiv(args["Wo"], tw)
        groups = grid[0] >> args["LOG2_CT"]
        hints = {"programs_with_work": groups * n_ctiles * grid[1] * grid[2]}
        if name == "sample3d_bwd_kernel":  # row tiles per program: TPP, fewer in the last column
            rows = triton.cdiv(args["Do"] * args["Ho"], args["BLOCK_P"] >> args["LOG2_TW"])
            hints["trips"] = {"0, n_here": rows / max(groups, 1)}
        return hints
    if name == "gather_grad_input3d_kernel":  # contributions per input voxel on average
        mean = args["E"] / max(args["D"] * args["H"] * args["W"], 1)
        return {"trips": {"0, n_max": math.ceil(mean)}}
    return {}
