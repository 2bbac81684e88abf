"""The host side of :mod:`stn_triton.kernels.sampler`: check, allocate, choose a launch shape, launch.

Launch shapes (:func:`plan`), chosen per case from the compile-only model (``stn-bench --static``,
``benchmarks/NOTES.md``):

- planar inputs (NCHW, any strides): one channel per step (``BLOCK_C = 1``), so the coordinate math
  runs once per pixel and the channel loop is a scalar pointer walk; the forward takes 512 pixels per
  program (4 per thread) when there are at most 4 channels and 128 otherwise, the backward 256, with
  several row tiles per program when there are few channels (:func:`tiles_per_program`);
- channels-last inputs: one 16-byte vector of channels per step (4 float32 or 8 half), one pixel per
  thread, 128 pixels per program;
- bicubic sampling (16 taps per pixel, their offsets and weights kept in registers), planar too: one
  pixel per thread, 128 pixels per program, forward and backward.

Tiles are ``TILE_H x TILE_W`` pixels with ``TILE_W`` the power of two (<= 64) that wastes fewest
pixels on the output's edges. On CUDA the pixels per program and warps per program are autotuned
over a short list whose first entry is the default above (``STN_TRITON_AUTOTUNE=0`` keeps the
default); in Triton's interpreter and in compile-only runs the default is launched.
"""

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .basis import basis_grad_kernel
from .common import LOG2_TAPS, MODE_CODES, PADDING_CODES
from .sampler import FORM_CODES, corner_index_kernel, gather_grad_input_kernel, sample_bwd_kernel, sample_fwd_kernel

INT32_LIMIT = 2**31
MAX_GRID_YZ = 65535  # CUDA's limit on the second and third grid dimensions
VECTOR_BYTES = 16
# Half-precision channels-last input gradients accumulate straight into the gradient (16-byte vector
# atomics) when each input pixel receives at most this many contributions on average at unit scale;
# otherwise in a float32 buffer that is cast once at the end. bf16 rounding per addition grows the
# error as sqrt(contributions): NOTES.md measures it.
HALF_ACCUMULATE_MAX_CONTRIBUTIONS = 16
AUTOTUNE_ENV = "STN_TRITON_AUTOTUNE"


def fill_new(t):
    """Every buffer a kernel must fill passes through here; tests replace it to poison with NaN."""
    return t


def _empty(shape, dtype, device):
    return fill_new(torch.empty(shape, dtype=dtype, device=device))


def _empty_like(t):
    return fill_new(torch.empty_like(t))


# --------------------------------------------------------------------------------------------------
# Geometry, layouts, index width
# --------------------------------------------------------------------------------------------------

def _geometry(H, W, Ho, Wo, align_corners):
    """Host constants of affine_grid's base grid per axis: x_j = bsx * j + box, y_i = bsy * i + boy."""

    def base(n):
        if align_corners:
            return (2.0 / (n - 1), -1.0) if n > 1 else (0.0, 0.0)
        return (2.0 / n, 1.0 / n - 1.0) if n > 0 else (0.0, 0.0)  # an empty output samples nothing

    (bsx, box), (bsy, boy) = base(Wo), base(Ho)
    return bsx, box, bsy, boy


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


def in_layout_of(out, x):
    """``out`` (N, K, C, Ho, Wo) in the memory format :func:`new_output` gives for ``x`` (a copy only when
    it is not already): the layout every path returns."""
    if _is_channels_last(x):
        return out.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return out.contiguous()


def _true_fma(device):
    """Whether ``tl.fma`` rounds once where the kernels run: compiled code, yes; Triton's interpreter
    computes ``a * b + c`` in two roundings (the kernels then use float64 instead)."""
    return device.type != "cpu"


def _extent(t):
    """One past the largest element offset a kernel can form in ``t`` (its strides, its sizes)."""
    if t is None or t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


FORCE_INT64 = False  # tests set this to run the 64-bit index path on small tensors


def _int64(*tensors, extra=0):
    """Whether any offset the kernels form may pass 2^31 - 1 (then they index in 64 bits)."""
    return FORCE_INT64 or max([_extent(t) for t in tensors] + [extra]) >= INT32_LIMIT - 1


# --------------------------------------------------------------------------------------------------
# Launch shapes
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How one sampling problem is cut into programs."""

    block_p: int  # pixels per program
    block_c: int  # channels per step
    log2_tw: int  # tile width 2**log2_tw
    num_warps: int
    even_c: bool  # C % block_c == 0
    Ho: int
    Wo: int

    @property
    def tile_w(self):
        return 1 << self.log2_tw

    def tile_h(self, block_p=None):
        return (block_p or self.block_p) >> self.log2_tw

    @property
    def n_ctiles(self):
        return triton.cdiv(self.Wo, self.tile_w)

    @property
    def log2_ct(self):
        return max(0, (self.n_ctiles - 1).bit_length())

    def n_rtiles(self, block_p=None):
        return triton.cdiv(self.Ho, self.tile_h(block_p))

    def n_programs(self, block_p=None, tpp=1):
        """Programs with pixels, per (n, k): columns of ``tpp`` row tiles, times the column tiles."""
        return triton.cdiv(self.n_rtiles(block_p), tpp) * self.n_ctiles

    def grid0(self, block_p=None, tpp=1):
        return triton.cdiv(self.n_rtiles(block_p), tpp) << self.log2_ct

    def constexprs(self):
        return dict(EVEN_C=self.even_c, LOG2_TW=self.log2_tw, LOG2_CT=self.log2_ct)


def _tile_width(Ho, Wo, block_p, max_w=64):
    """The power-of-two tile width (<= max_w, <= block_p) whose tiles cover Ho x Wo with fewest
    padding pixels; the widest among equals (wider rows coalesce better)."""
    best = None
    w = 1
    while w <= min(max_w, block_p):
        h = block_p // w
        area = triton.cdiv(Ho, h) * h * triton.cdiv(Wo, w) * w
        if best is None or area <= best[0]:
            best = (area, w)
        w *= 2
    return best[1].bit_length() - 1


def plan(x, Ho, Wo, backward=False, mode="bilinear"):
    """The default launch shape for sampling ``x`` (N, C, H, W) to Ho x Wo (see the module doc)."""
    C = x.shape[1]
    if C > 1 and x.stride(1) == 1:  # channels innermost: a 16-byte vector of channels per thread
        block_c = min(triton.next_power_of_2(C), max(1, VECTOR_BYTES // x.element_size()))
        block_p = 128
    elif mode == "bicubic":  # 16 taps per pixel: one pixel per thread keeps their addresses in registers
        block_c = 1
        block_p = 128
    else:
        block_c = 1
        block_p = 256 if backward else (512 if C <= 4 else 128)
    return Plan(block_p, block_c, _tile_width(Ho, Wo, block_p), 4, C % block_c == 0, Ho, Wo)


# The autotuned alternatives: (pixels per program as a multiple of the default, warps). The first is the
# default the compile-only model prefers; a GPU run only has to confirm it.
TUNING = ((1, 4), (2, 4), (2, 8), (0.5, 4))


def _configs(p):
    out = []
    for scale, warps in TUNING:
        bp = int(p.block_p * scale)
        if bp >= p.tile_w and bp >= 32:
            out.append((bp, warps))
    return list(dict.fromkeys(out))


def _autotune_enabled(device):
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
        return False
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


_TUNED = {}  # (kernel, key) -> (block_p, num_warps): one benchmark per problem class


STATIC_CHOICE = None  # the compile-only report sets an index into _configs to look at each candidate


def _choices(p, device):
    """The (pixels per program, warps) candidates: all of :data:`TUNING` when autotuning, else the default."""
    if STATIC_CHOICE is not None:
        configs = _configs(p)
        return [configs[min(STATIC_CHOICE, len(configs) - 1)]]
    return _configs(p) if _autotune_enabled(device) else [(p.block_p, p.num_warps)]


def _launch(kernel, p, grid_yz, args, consts, device, key, reset=None, tpp=None):
    """Launch ``kernel`` over ``p``'s tiles with ``grid_yz`` = (K, N): the default shape, or on CUDA the
    fastest of :data:`TUNING`, benchmarked once per ``key`` (``reset``: tensors to zero between trials;
    ``tpp``: the backward's tiles per program). Returns the (pixels per program, warps) launched."""
    choices = _choices(p, device)
    choice = choices[0]
    if len(choices) > 1:
        tag = (kernel.fn.__name__, key)
        if tag not in _TUNED and not torch.cuda.is_current_stream_capturing():  # no timing inside a graph
            _TUNED[tag] = _tune(kernel, p, choices, grid_yz, args, consts, reset, tpp)
        choice = _TUNED.get(tag, choice)
    _run(kernel, p, choice, grid_yz, args, consts, tpp)
    return choice


def _run(kernel, p, choice, grid_yz, args, consts, tpp):
    bp, warps = choice
    extra = {} if tpp is None else {"TPP": tpp}
    kernel[(p.grid0(bp, tpp or 1), *grid_yz)](*args, **consts, **p.constexprs(), **extra, BLOCK_P=bp,
                                               num_warps=warps)


def _tune(kernel, p, choices, grid_yz, args, consts, reset, tpp):
    from triton.testing import do_bench

    best = None
    for choice in choices:
        def call():
            for t in reset or ():
                t.zero_()
            _run(kernel, p, choice, grid_yz, args, consts, tpp)

        try:
            ms = do_bench(call, warmup=5, rep=20, return_mode="median")
        except Exception:  # a shape that does not fit (resources): not a candidate
            continue
        if best is None or ms < best[0]:
            best = (ms, choice)
    for t in reset or ():
        t.zero_()
    return best[1] if best else choices[0]


TPP_MAX = 4
TPP_MIN_PROGRAMS = 8192  # keep at least this many backward programs (a few waves on 132 SMs)


def tiles_per_program(form, p, C, K, N):
    """Row tiles per backward program: several when there are few channels (the parameter gradient's
    reduction and the program's set-up are then a large share of its work) and programs to spare."""
    if form == "basis" or C > 16:
        return 1
    tpp = TPP_MAX
    while tpp > 1 and p.n_programs(p.block_p, tpp) * K * N < TPP_MIN_PROGRAMS:
        tpp //= 2
    return tpp


def _batches(N):
    """Slices of the batch that fit the grid's third dimension."""
    return [slice(n0, min(N, n0 + MAX_GRID_YZ)) for n0 in range(0, N, MAX_GRID_YZ)]


def _check_k(K):
    if K > MAX_GRID_YZ:
        raise ValueError(f"theta: at most {MAX_GRID_YZ} transforms per image (K) run on the kernels, got {K}")


def _aux_args(form, aux):
    """The aux pointer and its 5 strides (grid form), or B (basis form), or a dummy."""
    if form == "grid":
        return aux, tuple(aux.stride())
    return aux, (0, 0, 0, 0, 0)


def _rows(t, nb, K):
    """The (n, k) rows of a per-transform tensor for the batch slice ``nb``."""
    return t[nb.start * K:nb.stop * K]


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

def sample_forward(form, x, prm, aux, K, Ho, Wo, D, mode, padding_mode, align_corners):
    """Launch the forward kernel. prm: float32 (N*K, R) contiguous; aux: see the kernel."""
    N, C, H, W = x.shape
    out = new_output(x, K, Ho, Wo)
    if out.numel() == 0:
        return out
    _check_k(K)
    p = plan(x, Ho, Wo, mode=mode)
    R = prm.shape[1] if prm.dim() == 2 else 0
    consts = dict(FORM=FORM_CODES[form], MODE=MODE_CODES[mode], PAD=PADDING_CODES[padding_mode],
                  ALIGN=bool(align_corners), FMA=_true_fma(x.device), INT64=_int64(x, out, aux if form == "grid" else None),
                  BLOCK_C=p.block_c)
    key = (form, mode, padding_mode, C, H, W, Ho, Wo, K, x.dtype, p.block_c, x.stride(1) == 1)
    for nb in _batches(N):
        xb, ob = x[nb], out[nb]
        auxb = aux[nb] if form == "grid" else aux
        auxb, s_a = _aux_args(form, auxb)
        args = (xb, ob, _rows(prm, nb, K) if form != "grid" else prm, auxb, *xb.stride(), *ob.stride(), *s_a,
                C, H, W, K, Ho, Wo, D, R, *_geometry(H, W, Ho, Wo, align_corners))
        _launch(sample_fwd_kernel, p, (K, nb.stop - nb.start), args, consts, x.device, key)
    return out


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _interpreter_has_atomic(dtype):
    """Whether Triton's interpreter can ``atomic_add`` in ``dtype`` (it has no bf16 atomics; compiled
    code does, as 16-byte vector reductions on sm_90)."""

    @triton.jit
    def probe(p, q):
        o = tl.arange(0, 2)
        tl.atomic_add(p + o, tl.load(q + o).to(p.dtype.element_ty), sem="relaxed")

    t = torch.zeros(2, dtype=dtype)
    try:
        probe[(1,)](t, torch.ones(2))
    except Exception:
        return False
    return bool((t == 1).all())


def half_accumulation(x, K, Ho, Wo, mode, p):
    """Whether the input gradient of ``x`` accumulates in x's own half dtype (see
    :data:`HALF_ACCUMULATE_MAX_CONTRIBUTIONS`) rather than in a float32 buffer."""
    N, C, H, W = x.shape
    if x.dtype not in (torch.float16, torch.bfloat16) or p.block_c * x.element_size() != VECTOR_BYTES:
        return False
    # whole, aligned 16-byte vectors only: never scalar bf16 atomics (compare-and-swap loops). The compiler
    # proves a vector aligned only when the gradient's strides are multiples of 16 (Triton specialises
    # integer arguments divisible by 16), i.e. C % 16 == 0 for a channels-last gradient.
    if x.stride(1) != 1 or C % 16 != 0:
        return False
    per_pixel = (1 << LOG2_TAPS[mode]) * K * Ho * Wo / max(H * W, 1)  # 4 bilinear, 1 nearest, 16 bicubic taps
    if per_pixel > HALF_ACCUMULATE_MAX_CONTRIBUTIONS:
        return False
    if x.device.type == "cpu":  # Triton's interpreter
        return _interpreter_has_atomic(x.dtype)
    # bf16 vector reductions are sm_90's; before it they compile to compare-and-swap loops (f16x2 exists)
    return x.dtype == torch.float16 or _target_arch() >= 90


def _target_arch():
    """The compute capability Triton compiles for (e.g. 90), 0 when it cannot say."""
    try:
        from triton.runtime import driver

        return int(driver.active.get_current_target().arch)
    except Exception:
        return 0


def sample_backward(form, grad_out, x, prm, aux, K, Ho, Wo, D, R, mode, padding_mode, align_corners,
                    need_x, need_param, need_gg):
    """Launch the backward kernel(s).

    Returns (dL/dx in x's dtype and layout or None, dL/dprm float32 (N*K, R) or None,
    dL/dg float32 (N*K, Ho*Wo, 2) or None).
    """
    N, C, H, W = x.shape
    NK, P = N * K, Ho * Wo
    dev = x.device
    _check_k(K)
    if NK * C * P == 0:  # an empty output: every gradient is zero (or empty), and no kernel runs
        return (torch.zeros_like(x) if need_x else None,
                torch.zeros((NK, R), dtype=torch.float32, device=dev) if need_param else None,
                torch.zeros((NK, P, 2), dtype=torch.float32, device=dev) if need_gg else None)
    deterministic = torch.are_deterministic_algorithms_enabled()
    p = plan(x, Ho, Wo, backward=True, mode=mode)
    geometry = _geometry(H, W, Ho, Wo, align_corners)

    grad_x = None
    half = False
    if need_x:
        if deterministic:
            grad_x = _grad_input_deterministic(form, grad_out, x, prm, aux, K, Ho, Wo, D, R, mode, padding_mode,
                                               align_corners, geometry)
        else:
            half = half_accumulation(x, K, Ho, Wo, mode, p)
            grad_x = torch.zeros_like(x, dtype=x.dtype if half else torch.float32)
    atomics = need_x and not deterministic
    want_g = mode != "nearest" and (need_param or need_gg)  # nearest: dL/dg = 0, still pushed through the form
    # parameter partials: one per program, laid out for the most programs any candidate shape makes
    tpp = tiles_per_program(form, p, C, K, N)
    NPROG = max(p.n_programs(bp, tpp) for bp, _ in _choices(p, dev))
    part = _empty((NK, NPROG, R), torch.float32, dev) if (need_param and NK * P > 0) else None
    gg = _empty((NK, P, 2), torch.float32, dev) if need_gg else None
    bp = p.block_p
    if NK * P > 0 and (atomics or need_param or need_gg):
        consts = dict(FORM=FORM_CODES[form], MODE=MODE_CODES[mode], PAD=PADDING_CODES[padding_mode],
                      ALIGN=bool(align_corners), FMA=_true_fma(x.device), NEED_X=atomics, NEED_G=want_g, NEED_PARAM=part is not None,
                      WRITE_GG=need_gg, INT64=_int64(x, grad_out, grad_x, aux if form == "grid" else None,
                                                      extra=NK * max(2 * P, NPROG * R)),
                      BLOCK_C=p.block_c)
        key = (form, mode, padding_mode, C, H, W, Ho, Wo, K, x.dtype, p.block_c, x.stride(1) == 1, atomics, half,
               need_param, need_gg)
        for nb in _batches(N):
            xb, gob = x[nb], grad_out[nb]
            auxb = aux[nb] if form == "grid" else aux
            auxb, s_a = _aux_args(form, auxb)
            d_buf = grad_x[nb] if atomics else prm[:1]  # a harmless stand-in when NEED_X is off
            d_strides = d_buf.stride() if atomics else x.stride()
            args = (xb, gob, d_buf, _rows(prm, nb, K) if form != "grid" else prm, auxb,
                    _rows(part, nb, K) if part is not None else prm, _rows(gg, nb, K) if gg is not None else prm,
                    *xb.stride(), *gob.stride(), *d_strides, *s_a,
                    C, H, W, K, Ho, Wo, D, R, NPROG, p.n_ctiles, *geometry)
            bp, _ = _launch(sample_bwd_kernel, p, (K, nb.stop - nb.start), args, consts, dev, key,
                            reset=[d_buf] if atomics else None, tpp=tpp)
    if atomics and not half:
        grad_x = grad_x.to(x.dtype)
    grad_prm = None
    if need_param:
        if part is not None:  # the tiles of the shape launched, summed in a fixed order
            grad_prm = part[:, :p.n_programs(bp, tpp)].sum(dim=1)
        else:
            grad_prm = torch.zeros((NK, R), dtype=torch.float32, device=dev)
    return grad_x, grad_prm, gg


def _grad_input_deterministic(form, grad_out, x, prm, aux, K, Ho, Wo, D, R, mode, padding_mode, align_corners,
                              geometry):
    N, C, H, W = x.shape
    P, HW = Ho * Wo, H * W
    log2_nc = LOG2_TAPS[mode]
    E = (K * P) << log2_nc
    grad_x = _empty_like(x)
    if grad_x.numel() == 0:
        return grad_x
    if E == 0:
        return grad_x.zero_()
    int64 = _int64(x, grad_out, aux if form == "grid" else None, extra=max(N * E, N * (HW + 1)))
    itype = torch.int64 if int64 else torch.int32
    idx = _empty((N, E), itype, x.device)
    wt = _empty((N, E), torch.float32, x.device)
    goff = _empty((N, K * P), itype, x.device)
    p = plan(x, Ho, Wo, mode=mode)
    consts = dict(FORM=FORM_CODES[form], MODE=MODE_CODES[mode], PAD=PADDING_CODES[padding_mode],
                  ALIGN=bool(align_corners), FMA=_true_fma(x.device), INT64=int64, LOG2_NC=log2_nc, LOG2_TW=p.log2_tw, LOG2_CT=p.log2_ct,
                  BLOCK_P=p.block_p)
    for nb in _batches(N):
        auxb = aux[nb] if form == "grid" else aux
        auxb, s_a = _aux_args(form, auxb)
        corner_index_kernel[(p.grid0(), K, nb.stop - nb.start)](
            idx[nb], wt[nb], goff[nb], _rows(prm, nb, K) if form != "grid" else prm, auxb,
            grad_out.stride(1), grad_out.stride(3), grad_out.stride(4), *s_a,
            H, W, K, Ho, Wo, D, R, *geometry, **consts, num_warps=p.num_warps)
    sorted_idx, perm = torch.sort(idx, dim=1, stable=True)
    targets = torch.arange(HW + 1, device=x.device, dtype=itype).expand(N, HW + 1).contiguous()
    seg = torch.searchsorted(sorted_idx, targets, out_int32=not int64)
    # [BQ, BC] accumulators: at most 2048 (16 float32 registers per thread of 4 warps)
    block_c = min(triton.next_power_of_2(C), 32)
    block_q = max(16, min(128, 2048 // block_c))
    for nb in _batches(N):
        gather_grad_input_kernel[(triton.cdiv(HW, block_q), triton.cdiv(C, block_c), nb.stop - nb.start)](
            grad_x[nb], grad_out[nb], perm[nb], wt[nb], goff[nb], seg[nb], *grad_x.stride(),
            grad_out.stride(0), grad_out.stride(2), C, H, W, E,
            INT64=int64, EVEN_C=C % block_c == 0, LOG2_NC=log2_nc, BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=4)
    return grad_x


# --------------------------------------------------------------------------------------------------
# dL/dB
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# For the compile-only report (benchmarks/static.py)
# --------------------------------------------------------------------------------------------------

def static_hints(name, args, grid):
    """What the launcher knows and the compiled code does not: how many programs have pixels (the
    others return at once) and the expected trips of data-dependent loops. The volume kernels'
    (:mod:`.launch_volume`) are answered by :func:`.launch_volume.static_hints3d`."""
    if name in ("sample_fwd_kernel", "sample_bwd_kernel", "corner_index_kernel"):
        tw = 1 << args["LOG2_TW"]
        n_ctiles = triton.cdiv(args["Wo"], tw)
        groups = grid[0] >> args["LOG2_CT"]
        hints = {"programs_with_work": groups * n_ctiles * grid[1] * grid[2]}
        if name == "sample_bwd_kernel":  # row tiles per program: TPP, fewer in the last column
            rows = triton.cdiv(args["Ho"], args["BLOCK_P"] >> args["LOG2_TW"])
            hints["trips"] = {"0, n_here": rows / max(groups, 1)}
        return hints
    if name == "gather_grad_input_kernel":
        # contributions per input pixel on average: E / (H * W); the loop runs to the block's maximum
        mean = args["E"] / max(args["H"] * args["W"], 1)
        return {"trips": {"0, n_max": math.ceil(mean)}}
    from .launch_volume import static_hints3d  # imported here: launch_volume imports this module

    return static_hints3d(name, args, grid)
