"""The host side of :mod:`stn_triton.kernels.sampler`: check, allocate, choose a launch shape, launch.

Launch shapes (:func:`plan`), chosen per case from the compile-only model (``stn-bench --static``,
``benchmarks/NOTES.md``):

- planar inputs (NCHW, any strides): one channel per step (``BLOCK_C = 1``), so the coordinate math
  runs once per pixel and the channel loop is a scalar pointer walk; the forward takes 512 pixels per
  program (4 per thread) when there are at most 4 channels and 128 otherwise, the backward 256, with
  several row tiles per program when there are few channels (:func:`tiles_per_program`);
- channels-last inputs: one 16-byte vector of channels per step (4 float32 or 8 half), one pixel per
  thread, 128 pixels per program;
- bicubic sampling (16 taps per pixel in 2-D, 64 in 3-D, a row of 4 in flight at a time), planar
  too: one pixel per thread, 128 pixels per program, forward and backward;
- the trilinear backward (8 taps' scatter targets and weights per voxel): one voxel per thread too,
  but 256 per program (8 warps), which halves the programs' parameter-gradient reductions (the
  model: vol-reg grid3d 293 -> 281 us, 96 registers); forms that reduce their parameter terms per
  tile (basis) take 256-voxel tiles on 4 warps instead (two voxels per thread).

Volumes are cut the same way: their output is the plane (Do * Ho, Wo), and every choice above
(tiles, channel vectors, batch splitting, 64-bit indexing, autotuning, half-precision accumulation)
is made once for 2-D and 3-D alike.

Tiles are ``TILE_H x TILE_W`` pixels with ``TILE_W`` the power of two (<= 64) that wastes fewest
pixels on the output's edges. On CUDA the pixels per program and warps per program are autotuned
over a short list whose first entry is the default above (``STN_TRITON_AUTOTUNE=0`` keeps the
default); in Triton's interpreter and in compile-only runs the default is launched.
"""

import functools
import itertools
import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .basis import basis_grad_kernel
from .codes import MODE_CODES, PADDING_CODES, TAPS_PER_AXIS, log2_taps, taps
from .forms import FORMS
from .inverse import BLOCKS as INVERSE_BLOCKS, inverse_grad_input_kernel, inverse_plan, reach as inverse_reach
from .sampler import gather_grad_input_kernel, sample_bwd_kernel, sample_fwd_kernel, tap_index_kernel

INT32_LIMIT = 2**31
MAX_GRID_YZ = 65535  # CUDA's limit on the second and third grid dimensions
VECTOR_BYTES = 16
# Half-precision channels-last input gradients accumulate straight into the gradient (16-byte vector
# atomics) when each input pixel receives at most this many contributions on average at unit scale;
# otherwise in a float32 buffer that is cast once at the end. bf16 rounding per addition grows the
# error as sqrt(contributions): NOTES.md measures it.
HALF_ACCUMULATE_MAX_CONTRIBUTIONS = 16
AUTOTUNE_ENV = "STN_TRITON_AUTOTUNE"
INVERSE_CHANNELS = 4  # channels per program of the inverse-map gather (each lane holds them for its block)
# Past this many channels the deterministic input gradient keeps the sorted gather even where the inverse
# map serves: the inverse gather walks each block's candidates once per group of INVERSE_CHANNELS, the
# sorted one lists and sorts the contributions once for all channels (the model, 64 x C x 56^2
# channels-last float32 at scale 1: the inverse gather 11.5 us at C = 16, 22.9 at 32, 45.8 at 64; the
# sorted gather's kernels 5.1, 10.5, 20.1 plus a sort of 46 MB of keys, about 14 us at the DRAM
# floor; benchmarks/NOTES.md)
INVERSE_MAX_CHANNELS = 32
# The class backward (deterministic, affine forms, linear sampling): a map's output pixels are split into
# s**ndim classes (s apart on every axis) whose 2 x 2 (x 2) taps never meet, one launch per class and map in
# a fixed order, plain read-modify-write instead of atomics. Served when s <= CLASS_MAX; s is the smallest
# integer above CLASS_MARGIN times the largest absolute row sum of M^-1 (2 would do in exact arithmetic:
# sources 2 input pixels apart share no tap; the margin covers rounding in the kernel's coordinates).
CLASS_MAX = 4
CLASS_MARGIN = 2.5
# ... and only where its launches are few and full: at most CLASS_MAX_LAUNCHES (classes times maps; each is a
# Triton launch, whose host-side cost the compile-only model does not see) and at least CLASS_MIN_PIXELS
# output pixels per class and image (a small image's classes leave most of every tile's lanes idle: mnist's
# 28 x 28 in 9 classes models 35% slower than the inverse gather)
CLASS_MAX_LAUNCHES = 16
CLASS_MIN_PIXELS = 4096


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

def _geometry(size, align_corners):
    """Host constants of affine_grid's base grid per axis, for an output of ``size`` (Ho, Wo) or
    (Do, Ho, Wo): x_j = bsx * j + box, y_i = bsy * i + boy, z_d = bsz * d + boz (2-D: z unused)."""

    def base(n):
        if align_corners:
            return (2.0 / (n - 1), -1.0) if n > 1 else (0.0, 0.0)
        return (2.0 / n, 1.0 / n - 1.0) if n > 0 else (0.0, 0.0)  # an empty output samples nothing

    size = list(size)
    return (*base(size[-1]), *base(size[-2]), *(base(size[0]) if len(size) == 3 else (0.0, 0.0)))


def _is_channels_last(x):
    """Channels innermost (and more than one layout possible): channels_last or channels_last_3d."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def new_output(x, K, *size):
    """(N, K, C, *size) in x's memory format: channels innermost when x is channels-last (2-D or 3-D).

    Shared by the kernels' launcher and the ops' fake implementations, so both agree on strides.
    """
    N, C = x.shape[0], x.shape[1]
    if _is_channels_last(x):
        nd = len(size)
        return _empty((N, K, *size, C), x.dtype, x.device).permute(0, 1, nd + 2, *range(2, nd + 2))
    return _empty((N, K, C, *size), x.dtype, x.device)


def in_layout_of(out, x):
    """``out`` (N, K, C, *size) in the memory format :func:`new_output` gives for ``x`` (a copy only when
    it is not already): the layout every path returns."""
    if _is_channels_last(x):
        nd = out.dim() - 3
        last = out.permute(0, 1, *range(3, nd + 3), 2).contiguous()
        return last.permute(0, 1, nd + 2, *range(2, nd + 2))
    return out.contiguous()


def _with_depth(strides, at):
    """A 2-D tensor's strides with a 0 depth stride inserted at ``at`` (the kernels' 3-D argument list)."""
    strides = list(strides)
    return tuple(strides[:at] + [0] + strides[at:])


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
    slice_h: int = 0  # a volume's rows per depth slice (its output plane is Do slices of them); 0 in 2-D
    masked: bool = False  # mask every tile (the class backward's subgrids differ in size by class)

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

    def one_slice(self, block_p=None):
        """Every tile's rows lie in one depth slice of a volume (the slice's rows a multiple of the tile's),
        so the kernels split a voxel's plane row into depth and row once per tile, not per voxel."""
        return self.slice_h > 0 and self.slice_h % self.tile_h(block_p) == 0

    def full_tiles(self, block_p=None):
        """Every tile lies inside the output plane (its rows and columns multiples of the tile's): the
        kernels then mask no pixel."""
        return not self.masked and self.Ho % self.tile_h(block_p) == 0 and self.Wo % self.tile_w == 0

    def constexprs(self, block_p=None):
        return dict(EVEN_C=self.even_c, LOG2_TW=self.log2_tw, LOG2_CT=self.log2_ct,
                    ONE_SLICE=self.one_slice(block_p), FULL=self.full_tiles(block_p))


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


def plan(x, Ho, Wo, backward=False, mode="bilinear", per_tile=False, slice_h=0):
    """The default launch shape for sampling ``x`` (N, C, [D,] H, W) to an output plane of Ho rows
    (Do * Ho for a volume, whose slices have ``slice_h`` rows) and Wo columns (see the module doc).
    ``per_tile``: the form reduces its parameter terms per tile (basis), so fewer, larger backward
    tiles pay fewer reductions."""
    C = x.shape[1]
    ndim = x.dim() - 2
    if C > 1 and x.stride(1) == 1:  # channels innermost: a 16-byte vector of channels per thread
        block_c = min(triton.next_power_of_2(C), max(1, VECTOR_BYTES // x.element_size()))
        block_p = 128
    elif mode == "bicubic":
        # many taps per pixel: one pixel per thread keeps their addresses and weights in registers
        block_c = 1
        block_p = 128
    elif backward and taps(mode, ndim) > 4 and not per_tile:  # trilinear: one voxel per thread, 8 warps
        return Plan(256, 1, _tile_width(Ho, Wo, 256), 8, True, Ho, Wo, slice_h)
    else:
        block_c = 1
        block_p = 256 if backward else (512 if C <= 4 else 128)
    return Plan(block_p, block_c, _tile_width(Ho, Wo, block_p), 4, C % block_c == 0, Ho, Wo, slice_h)


# The autotuned alternatives: (pixels per program, warps per program), each a multiple of the default's.
# The first is the default the compile-only model prefers; a GPU run only has to confirm it.
TUNING = ((1, 1), (2, 1), (2, 2), (0.5, 1))


def _configs(p):
    out = []
    for scale, times in TUNING:
        bp, warps = int(p.block_p * scale), p.num_warps * times
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
    kernel[(p.grid0(bp, tpp or 1), *grid_yz)](*args, **consts, **p.constexprs(bp), **extra, BLOCK_P=bp,
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
    reduction and the program's set-up are then a large share of its work) and programs to spare.
    One for a form whose terms are stored per tile (basis). ``form``: a row of the form table or its name."""
    form = FORMS[form] if isinstance(form, str) else form
    if form.per_tile or C > 16:
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


def _rows(t, nb, K):
    """The (n, k) rows of a per-transform tensor for the batch slice ``nb``."""
    return t[nb.start * K:nb.stop * K]


class _Problem:
    """One sampling problem as every kernel takes it: 2-D and 3-D alike, the 2-D one with a depth of 1
    (``D = Do = 1``, zero depth strides). ``form``: a row of :data:`~.forms.FORMS`; ``prm``: float32
    (N*K, R) contiguous, or one row for every transform (forms without a matrix: a stand-in, or a
    field's frame); ``aux``: B (DM, P) float32 (basis forms) or the per-pixel parameter
    (N, K, *size, ndim), any strides (grid and flow forms)."""

    def __init__(self, form, x, prm, aux, K, size, DM, mode, padding_mode, align_corners):
        if isinstance(form, str):
            form = FORMS[form]
        self.form, self.x, self.prm, self.aux, self.K, self.DM = form, x, prm, aux, K, DM
        self.ndim = nd = x.dim() - 2
        if nd != form.ndim:
            raise ValueError(f"x: the {form.name} form samples {form.ndim + 2}-D input, got {x.dim()}-D")
        if mode not in MODE_CODES:
            raise ValueError(f"mode: expected one of {tuple(MODE_CODES)}, got {mode!r}")
        self.size = [int(s) for s in size]
        self.N, self.C = x.shape[:2]
        self.D, self.H, self.W = ([1] + list(x.shape[2:]))[-3:]
        self.Do, self.Ho, self.Wo = ([1] + self.size)[-3:]
        self.P = self.Do * self.Ho * self.Wo
        self.slice_h = self.Ho if self.ndim == 3 else 0  # a volume's output rows per depth slice
        self.R = 0 if form.shared_row else prm.shape[1]  # the row stride: 0 when one row serves all
        # the parameter-gradient columns: the matrix (the frame after it has none)
        self.n_terms = form.frame_at if form.frame else self.R
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, bool(align_corners)
        self.geometry = _geometry(self.size, align_corners)

    def x_strides(self, t):
        """(n, c, d, h, w) strides of an input-shaped tensor."""
        return tuple(t.stride()) if self.ndim == 3 else _with_depth(t.stride(), 2)

    def out_strides(self, t):
        """(n, k, c, d, h, w) strides of an output-shaped tensor."""
        return tuple(t.stride()) if self.ndim == 3 else _with_depth(t.stride(), 3)

    def aux_args(self, nb):
        """The aux tensor for the batch slice ``nb`` and its (n, k, d, h, w, component) strides."""
        if self.form.per_pixel:
            a = self.aux[nb]
            return a, self.grid_strides(a)
        return self.aux, (0, 0, 0, 0, 0, 0)

    def prm_rows(self, nb):
        return self.prm if self.form.shared_row else _rows(self.prm, nb, self.K)

    def field_grad(self):
        """dL/dg's buffer: the per-pixel parameter's gradient in its dtype and layout (``empty_like``:
        its strides when they are dense, else contiguous), or (N, K, *size, ndim) float32 for dL/dB."""
        if self.form.per_pixel:
            return _empty_like(self.aux)
        return _empty((self.N, self.K, *self.size, self.ndim), torch.float32, self.x.device)

    def grid_strides(self, t):
        """(n, k, d, h, w, component) strides of a per-pixel tensor (N, K, *size, ndim)."""
        return tuple(t.stride()) if self.ndim == 3 else _with_depth(t.stride(), 2)

    def consts(self):
        return dict(COORDS=self.form.coords, FN=self.form.fn, FRAME=self.form.frame_at, NDIM=self.ndim,
                    MODE=MODE_CODES[self.mode],
                    PAD=PADDING_CODES[self.padding_mode], ALIGN=self.align_corners,
                    NT=TAPS_PER_AXIS[self.mode], FMA=_true_fma(self.x.device))

    def sizes(self):
        return (self.D, self.H, self.W, self.K, self.Do, self.Ho, self.Wo, self.DM, self.R)

    def key(self, *more):
        x = self.x
        return (self.form.name, self.mode, self.padding_mode, self.C, self.D, self.H, self.W, self.Do, self.Ho,
                self.Wo, self.K, x.dtype, x.stride(1) == 1) + more


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

def sample_forward(form, x, prm, aux, K, size, DM, mode, padding_mode, align_corners):
    """Launch the forward kernel: x (N, C, *in_size) sampled to (N, K, C, *size) in x's layout."""
    pb = _Problem(form, x, prm, aux, K, size, DM, mode, padding_mode, align_corners)
    out = new_output(x, K, *pb.size)
    if out.numel() == 0:
        return out
    _check_k(K)
    p = plan(x, pb.Do * pb.Ho, pb.Wo, mode=mode, slice_h=pb.slice_h)
    consts = dict(pb.consts(), INT64=_int64(x, out, aux if pb.form.per_pixel else None), BLOCK_C=p.block_c)
    key = pb.key(p.block_c)
    for nb in _batches(pb.N):
        xb, ob = x[nb], out[nb]
        auxb, s_a = pb.aux_args(nb)
        args = (xb, ob, pb.prm_rows(nb), auxb, *pb.x_strides(xb), *pb.out_strides(ob), *s_a,
                pb.C, *pb.sizes(), *pb.geometry)
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


def half_accumulation(x, K, size, mode, p):
    """Whether the input gradient of ``x`` (N, C, *in_size) accumulates in x's own half dtype (see
    :data:`HALF_ACCUMULATE_MAX_CONTRIBUTIONS`) rather than in a float32 buffer; 2-D and 3-D alike."""
    C = x.shape[1]
    if x.dtype not in (torch.float16, torch.bfloat16) or p.block_c * x.element_size() != VECTOR_BYTES:
        return False
    # whole, aligned 16-byte vectors only: never scalar bf16 atomics (compare-and-swap loops). The compiler
    # proves a vector aligned only when the gradient's strides are multiples of 16 (Triton specialises
    # integer arguments divisible by 16), i.e. C % 16 == 0 for a channels-last gradient.
    if x.stride(1) != 1 or C % 16 != 0:
        return False
    per_pixel = taps(mode, x.dim() - 2) * K * math.prod(size) / max(math.prod(x.shape[2:]), 1)
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


def sample_backward(form, grad_out, x, prm, aux, K, size, DM, mode, padding_mode, align_corners,
                    need_x, need_param, need_gg):
    """Launch the backward kernel(s), 2-D or 3-D.

    Returns (dL/dx in x's dtype and layout or None, dL/dprm float32 (N*K, R') or None (R': the
    matrix's columns), and, if ``need_gg``, the per-pixel parameter's gradient (dL/dg times the frame's
    scale, in that parameter's dtype and layout) or, for basis forms, dL/dg float32 (N*K, P, ndim)).
    """
    pb = _Problem(form, x, prm, aux, K, size, DM, mode, padding_mode, align_corners)
    N, C, R, nd = pb.N, pb.C, pb.R, pb.ndim
    NK, P = N * K, pb.P
    dev = x.device
    _check_k(K)
    if NK * C * P == 0:  # an empty output: every gradient is zero (or empty), and no kernel runs
        gg = pb.field_grad().zero_() if need_gg else None
        return (torch.zeros_like(x) if need_x else None,
                torch.zeros((NK, pb.n_terms), dtype=torch.float32, device=dev) if need_param else None,
                gg if pb.form.per_pixel or gg is None else gg.reshape(NK, P, nd))
    deterministic = torch.are_deterministic_algorithms_enabled()
    p = plan(x, pb.Do * pb.Ho, pb.Wo, backward=True, mode=mode, per_tile=pb.form.per_tile, slice_h=pb.slice_h)

    grad_x = None
    half = False
    if need_x:
        if deterministic:
            gather = C <= INVERSE_MAX_CHANNELS  # the inverse gather serves this many channels
            # the table only where a path without a sort may serve (class_stride(0.0): the fewest classes)
            table, spread = inverse_plan(pb, fill_new) if gather or class_stride(0.0, pb) else (None, math.inf)
            s = class_stride(spread, pb)
            if s:
                return _class_backward(pb, grad_out, s, need_param)
            grad_x = _grad_input_deterministic(pb, grad_out, table if gather else None)
        else:
            half = half_accumulation(x, K, pb.size, mode, p)
            grad_x = torch.zeros_like(x, dtype=x.dtype if half else torch.float32)
    atomics = need_x and not deterministic
    want_g = mode != "nearest" and (need_param or need_gg)  # nearest: dL/dg = 0, still pushed through the form
    # parameter partials: one per program, laid out for the most programs any candidate shape makes
    tpp = tiles_per_program(pb.form, p, C, K, N)
    NPROG = max(p.n_programs(bp, tpp) for bp, _ in _choices(p, dev))
    part = _empty((NK, NPROG, R), torch.float32, dev) if need_param else None
    gg = pb.field_grad() if need_gg else None
    bp = p.block_p
    if atomics or need_param or need_gg:
        nacc = pb.form.nacc
        consts = dict(pb.consts(), TERMS=pb.form.terms, GRAD_FN=pb.form.grad_fn, NACC=nacc, NEED_X=atomics,
                      NEED_G=want_g,
                      NEED_PARAM=part is not None, WRITE_GG=need_gg,
                      INT64=_int64(x, grad_out, grad_x, aux if pb.form.per_pixel else None, gg,
                                   extra=NK * NPROG * R),
                      BLOCK_C=p.block_c)
        key = pb.key(p.block_c, atomics, half, need_param, need_gg)
        for nb in _batches(N):
            xb, gob = x[nb], grad_out[nb]
            auxb, s_a = pb.aux_args(nb)
            d_buf = grad_x[nb] if atomics else prm[:1]  # a harmless stand-in when NEED_X is off
            d_strides = pb.x_strides(d_buf if atomics else xb)
            ggb = gg[nb] if gg is not None else None
            args = (xb, gob, d_buf, pb.prm_rows(nb), auxb,
                    _rows(part, nb, K) if part is not None else prm, ggb if ggb is not None else prm,
                    *pb.x_strides(xb), *pb.out_strides(gob), *d_strides, *s_a,
                    *(pb.grid_strides(ggb) if ggb is not None else (0,) * 6),
                    C, *pb.sizes(), NPROG, p.n_ctiles, *pb.geometry, 0, 0, 0, 0, 0, 0, 0)  # not a class launch
            bp, _ = _launch(sample_bwd_kernel, p, (K, nb.stop - nb.start), args, consts, dev, key,
                            reset=[d_buf] if atomics else None, tpp=tpp)
    if atomics and not half:
        grad_x = grad_x.to(x.dtype)
    grad_prm = None
    if need_param:  # the tiles of the shape launched, summed in a fixed order
        grad_prm = part[:, :p.n_programs(bp, tpp), :pb.n_terms].sum(dim=1)
    if gg is not None and not pb.form.per_pixel:
        gg = gg.reshape(NK, P, nd)
    return grad_x, grad_prm, gg


def class_stride(spread, pb=None):
    """Classes per axis of the class backward for maps whose M^-1 has largest absolute row sum
    ``spread`` (two outputs of a class, s * (a, b[, c]) apart, have sources at least
    s / spread > CLASS_MARGIN input pixels apart on some axis), or 0 past :data:`CLASS_MAX`; with the
    problem ``pb``, also 0 past :data:`CLASS_MAX_LAUNCHES` or under :data:`CLASS_MIN_PIXELS`."""
    if not math.isfinite(spread) or CLASS_MAX < 2:
        return 0
    s = max(2, math.floor(CLASS_MARGIN * spread) + 1)
    if s > CLASS_MAX:
        return 0
    if pb is not None:
        classes = s ** pb.ndim
        if classes * pb.K > CLASS_MAX_LAUNCHES or pb.P < classes * CLASS_MIN_PIXELS:
            return 0
    return s


def _class_backward(pb, grad_out, s, need_param):
    """The deterministic backward of an affine map with linear sampling, without atomics: every map's
    output pixels in s**ndim classes (pixels s apart on every axis: their taps never meet), one launch of
    the backward kernel per (class, map) in a fixed order, each adding its pixels' contributions to
    dL/dx with plain loads and stores (so every input pixel's sum is taken in that order, the same on
    every run) and writing its parameter partials, summed in a fixed order at the end."""
    x, N, K, C, R, nd = pb.x, pb.N, pb.K, pb.C, pb.R, pb.ndim
    NK, dev = N * K, x.device
    grad_x = torch.zeros_like(x, dtype=torch.float32)
    offsets = list(itertools.product(*[range(s) if a >= 3 - nd else [0] for a in range(3)]))  # (z, y, x)

    def subgrid(cz, cy, cx):  # a class's output pixels per axis (depth 1 in 2-D)
        return triton.cdiv(pb.Do - cz, s) if nd == 3 else 1, triton.cdiv(pb.Ho - cy, s), triton.cdiv(pb.Wo - cx, s)

    d0, h0, w0 = subgrid(0, 0, 0)  # class 0's, the largest
    p = replace(plan(x, d0 * h0, w0, backward=True, mode=pb.mode, per_tile=pb.form.per_tile),
                masked=True)  # subgrids of several sizes share the plan: masked tiles
    tpp = tiles_per_program(pb.form, p, C, 1, N)
    NPROG = max(p.n_programs(bp, tpp) for bp, _ in _choices(p, dev))
    part = torch.zeros((len(offsets), NK, NPROG, R), dtype=torch.float32, device=dev) if need_param else None
    consts = dict(pb.consts(), TERMS=pb.form.terms, GRAD_FN=pb.form.grad_fn, NACC=pb.form.nacc, NEED_X=True,
                  NEED_G=need_param, NEED_PARAM=need_param, WRITE_GG=False,
                  INT64=_int64(x, grad_out, grad_x, extra=len(offsets) * NK * NPROG * R), BLOCK_C=p.block_c,
                  CLS=s)
    key = pb.key(p.block_c, "class", s, need_param)
    bp = p.block_p
    for nb in _batches(N):
        xb, gob, gxb = x[nb], grad_out[nb], grad_x[nb]
        auxb, s_a = pb.aux_args(nb)
        for c, (cz, cy, cx) in enumerate(offsets):
            dc, hc, wc = subgrid(cz, cy, cx)
            if dc * hc * wc == 0:
                continue
            for k in range(K):
                args = (xb, gob, gxb, pb.prm_rows(nb), auxb, _rows(part[c], nb, K) if part is not None else pb.prm,
                        pb.prm, *pb.x_strides(xb), *pb.out_strides(gob), *pb.x_strides(gxb), *s_a, *(0,) * 6,
                        C, *pb.sizes(), NPROG, p.n_ctiles, *pb.geometry, k, cz, cy, cx, dc * hc, hc, wc)
                bp, _ = _launch(sample_bwd_kernel, p, (1, nb.stop - nb.start), args, consts, dev, key,
                                reset=[gxb], tpp=tpp)
    grad_prm = None
    if need_param:  # every class's programs, summed in a fixed order
        grad_prm = part[:, :, :p.n_programs(bp, tpp), :pb.n_terms].sum(dim=(0, 2))
    return grad_x.to(x.dtype), grad_prm, None


def _grad_input_deterministic(pb, grad_out, table):
    """dL/dx as a gather in a fixed order: by the inverse map where it serves (``table``, from
    :func:`.inverse.inverse_plan`, or None), else list the contributions, sort them by target pixel
    (stable), sum in order."""
    x, K, N, C, P = pb.x, pb.K, pb.N, pb.C, pb.P
    DHW = pb.D * pb.H * pb.W
    log2_nc = log2_taps(pb.mode, pb.ndim)
    E = (K * P) << log2_nc
    grad_x = _empty_like(x)
    if grad_x.numel() == 0:
        return grad_x
    if E == 0:
        return grad_x.zero_()
    if table is not None:
        return _grad_input_inverse(pb, grad_out, grad_x, table)
    int64 = _int64(x, grad_out, pb.aux if pb.form.per_pixel else None, extra=max(N * E, N * (DHW + 1)))
    itype = torch.int64 if int64 else torch.int32
    idx = _empty((N, E), itype, x.device)
    wt = _empty((N, E), torch.float32, x.device)
    goff = _empty((N, K * P), itype, x.device)
    p = plan(x, pb.Do * pb.Ho, pb.Wo, mode=pb.mode, slice_h=pb.slice_h)
    consts = dict(pb.consts(), INT64=int64, LOG2_NC=log2_nc, LOG2_TW=p.log2_tw, LOG2_CT=p.log2_ct,
                  ONE_SLICE=p.one_slice(), FULL=p.full_tiles(),
                  BLOCK_P=p.block_p)
    s_g = pb.out_strides(grad_out)
    for nb in _batches(N):
        auxb, s_a = pb.aux_args(nb)
        tap_index_kernel[(p.grid0(), K, nb.stop - nb.start)](
            idx[nb], wt[nb], goff[nb], pb.prm_rows(nb), auxb, s_g[1], *s_g[3:], *s_a,
            *pb.sizes(), *pb.geometry, **consts, num_warps=p.num_warps)
    sorted_idx, perm = torch.sort(idx, dim=1, stable=True)
    targets = torch.arange(DHW + 1, device=x.device, dtype=itype).expand(N, DHW + 1).contiguous()
    seg = torch.searchsorted(sorted_idx, targets, out_int32=not int64)
    # [BQ, BC] accumulators: at most 2048 (16 float32 registers per thread of 4 warps)
    block_c = min(triton.next_power_of_2(C), 32)
    block_q = max(16, min(128, 2048 // block_c))
    for nb in _batches(N):
        gather_grad_input_kernel[(triton.cdiv(DHW, block_q), triton.cdiv(C, block_c), nb.stop - nb.start)](
            grad_x[nb], grad_out[nb], perm[nb], wt[nb], goff[nb], seg[nb], *pb.x_strides(grad_x),
            grad_out.stride(0), grad_out.stride(2), C, pb.D, pb.H, pb.W, E,
            NDIM=pb.ndim, INT64=int64, EVEN_C=C % block_c == 0, LOG2_NC=log2_nc, BLOCK_Q=block_q,
            BLOCK_C=block_c, num_warps=4)
    return grad_x


def _grad_input_inverse(pb, grad_out, grad_x, table):
    """dL/dx by :func:`~.inverse.inverse_grad_input_kernel`: every input pixel written, in a fixed order."""
    (bx, by, bz), K, C = INVERSE_BLOCKS[pb.ndim], pb.K, pb.C
    nbx, nby, nbz = triton.cdiv(pb.W, bx), triton.cdiv(pb.H, by), triton.cdiv(pb.D, bz)
    cb = min(C, INVERSE_CHANNELS)
    block_q = 128
    int64 = _int64(pb.x, grad_out, extra=nbx * nby * nbz * bx * by * bz)
    for nb in _batches(pb.N):
        inverse_grad_input_kernel[(triton.cdiv(nbx * nby * nbz, block_q), triton.cdiv(C, cb), nb.stop - nb.start)](
            grad_x[nb], grad_out[nb], _rows(table, nb, K), *pb.x_strides(grad_x), *pb.out_strides(grad_out),
            C, pb.D, pb.H, pb.W, K, pb.Do, pb.Ho, pb.Wo, nbx, nby, nbz,
            NDIM=pb.ndim, INT64=int64, EVEN_C=C % cb == 0, CB=cb, BX=bx, BY=by, BZ=bz, BLOCK_Q=block_q,
            num_warps=4)
    return grad_x


# --------------------------------------------------------------------------------------------------
# dL/dB
# --------------------------------------------------------------------------------------------------

def basis_grad(prm, gg, DM, P):
    """dL/dB (DM, P) float32 from M (N*K, ndim*DM) and dL/dg (N*K, P, ndim), fixed order over (n, k)."""
    NK, nd = prm.shape[0], gg.shape[-1]
    gb = _empty((DM, P), torch.float32, prm.device)
    if gb.numel() == 0:
        return gb
    block_p = 64
    basis_grad_kernel[(triton.cdiv(P, block_p),)](
        gb, prm, gg, NK, DM, P, NDIM=nd, BLOCK_D=triton.next_power_of_2(max(DM, 1)), BLOCK_P=block_p,
    )
    return gb


# --------------------------------------------------------------------------------------------------
# For the compile-only report (benchmarks/static.py)
# --------------------------------------------------------------------------------------------------

def static_hints(name, args, grid):
    """What the launcher knows and the compiled code does not: how many programs have pixels (the
    others return at once) and the expected trips of data-dependent loops; {} for other kernels."""
    if name in ("sample_fwd_kernel", "sample_bwd_kernel", "tap_index_kernel"):
        tw = 1 << args["LOG2_TW"]
        cls = args.get("CLS", 0)  # a class launch tiles its class's subgrid
        n_ctiles = triton.cdiv(args["SUB_W"] if cls else args["Wo"], tw)
        groups = grid[0] >> args["LOG2_CT"]
        hints = {"programs_with_work": groups * n_ctiles * grid[1] * grid[2]}
        if name == "sample_bwd_kernel":  # row tiles per program: TPP, fewer in the last column
            plane = args["SUB_R"] if cls else args.get("Do", 1) * args["Ho"]
            rows = triton.cdiv(plane, args["BLOCK_P"] >> args["LOG2_TW"])
            hints["trips"] = {"0, n_here": rows / max(groups, 1)}
        return hints
    if name == "inverse_grad_input_kernel":
        # the box per output axis for a near-identity map (theta = I + 0.1 noise, the benchmarks'): M^-1
        # about diag(So / S), each row's other entries about a tenth of its diagonal
        nd = args.get("NDIM", 2)
        r = inverse_reach(nd)
        trips = {}
        for a, (key, so, s) in enumerate((("0, t_x", "Wo", "W"), ("0, t_y", "Ho", "H"), ("0, t_z", "Do", "D"))[:nd]):
            scale = args.get(so, 1) / max(args.get(s, 1), 1)
            ext = scale * (r[a] + 0.1 * (sum(r) - r[a]))
            trips[key] = max(1, math.ceil(2 * ext - 1e-6))
        return {"trips": trips}
    if name == "gather_grad_input_kernel":
        # contributions per input pixel on average: E / (D * H * W); the loop runs to the block's maximum
        mean = args["E"] / max(args.get("D", 1) * args["H"] * args["W"], 1)
        return {"trips": {"0, n_max": math.ceil(mean)}}
    return {}
