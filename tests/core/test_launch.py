"""The launcher's choices, each run through the kernels and checked against the float64 oracle:
several row tiles per backward program, 64-bit indexing, batches split for the grid's limit,
half-precision gradient accumulation, launch shapes, and the compile-only hints."""

import pytest
import torch

import stn_triton as st
from stn_triton.kernels import launch
from _cases import FORMS, FORMS3, MODES, check_case, make_input, ndim, oracle


@pytest.fixture
def many_tiles_per_program(monkeypatch):
    """Several row tiles per backward program even for tiny cases (normally only for big ones)."""
    monkeypatch.setattr(launch, "TPP_MIN_PROGRAMS", 1)
    seen = []
    real = launch.tiles_per_program
    monkeypatch.setattr(launch, "tiles_per_program", lambda *a: seen.append(real(*a)) or seen[-1])
    return seen


# (form, mode, layout, input shape, K, output size): several row tiles of 8 rows per backward program,
# the last column short, in 2-D (37 rows) and 3-D (Do * Ho = 90 rows of 5 voxels: 12 row tiles)
# (bilinear in each layout for a matrix form, the projective and the grid form; nearest, whose
# coordinates get no gradient, once)
TILES = [(form, "bilinear", layout, (2, 3, 20, 33), 2, (37, 13))
         for layout in ("contiguous", "channels_last") for form in ("affine", "projective", "grid")]
TILES += [("affine", "nearest", "channels_last", (2, 3, 20, 33), 2, (37, 13))]
TILES += [(form, "bilinear", "contiguous", (1, 2, 4, 5, 6), 2, (9, 10, 5)) for form in ("affine3d", "grid3d")]


@pytest.mark.parametrize("form,mode,layout,shape,K,size", TILES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in TILES])
def test_several_tiles_per_program(request, device, many_tiles_per_program, form, mode, layout, shape, K, size):
    """Columns of 4 tiles, the last one short; parameter sums over all of them."""
    check_case(request, device, form, mode, "zeros", False, torch.float32, layout, shape=shape, K=K, size=size)
    assert max(many_tiles_per_program) == launch.TPP_MAX


# (form, input shape, output size, full tiles, one depth slice per tile): outputs whose tiles the
# launcher knows to be whole (no pixel mask) and a volume's tiles to lie in one depth slice (one
# division per tile), in every combination; each asserted of the forward, backward and tap-index plans
WHOLE = [("affine", (2, 3, 11, 17), (16, 32), True, False),
         ("grid", (2, 3, 11, 17), (16, 32), True, False),
         ("affine3d", (1, 2, 5, 7, 9), (3, 16, 32), True, True),
         ("flow3d", (1, 2, 5, 7, 9), (4, 4, 32), True, False),  # 16- and 8-row tiles across 4-row slices
         ("affine_flow3d", (1, 2, 5, 7, 9), (3, 16, 30), False, True)]


@pytest.mark.parametrize("int64", (False, True), ids=("int32", "int64"))
@pytest.mark.parametrize("deterministic", (False, True), ids=("atomic", "deterministic"))
@pytest.mark.parametrize("form,shape,size,full,one_slice", WHOLE, ids=[c[0] for c in WHOLE])
def test_whole_tiles_and_one_slice(request, device, monkeypatch, form, shape, size, full, one_slice, deterministic,
                                   int64):
    """The kernels' unmasked whole tiles and per-tile depth against the float64 oracle, with 32- and
    64-bit indices."""
    monkeypatch.setattr(launch, "FORCE_INT64", int64)
    x = torch.empty(shape, device="meta")
    rows, nd = size[-2] * (size[0] if len(size) == 3 else 1), len(size)
    for backward in (False, True):
        p = launch.plan(x, rows, size[-1], backward=backward, slice_h=size[-2] if nd == 3 else 0)
        assert (p.full_tiles(), p.one_slice()) == (full, one_slice), (backward, p)
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_case(request, device, form, "bilinear", "zeros", False, torch.float32, "contiguous",
                   shape=shape, K=2, size=size)
    finally:
        torch.use_deterministic_algorithms(False)


def test_tiles_per_program_choice():
    x = torch.empty(64, 3, 448, 448, device="meta")
    p = launch.plan(x, 224, 224, backward=True)
    assert (p.tile_w, p.tile_h(), p.n_ctiles, p.log2_ct) == (32, 8, 7, 3)
    assert launch.tiles_per_program("affine", p, 3, 4, 64) == 4  # CUB-like: 14336 programs of 4 tiles
    assert launch.tiles_per_program("basis", p, 3, 4, 64) == 1  # the basis form reduces per tile
    assert launch.tiles_per_program("affine", p, 256, 1, 64) == 1  # many channels: the loop dominates
    assert launch.tiles_per_program("affine", p, 3, 1, 1) == 1  # too few programs to group


# (form, mode, deterministic, layout, input shape, output size; None: check_case's default)
INT64 = [(form, mode, False, "strided", None, None) for form in FORMS for mode in MODES]
INT64 += [(form, mode, det, "strided" if det else "channels_last_3d", (2, 2, 3, 4, 5), (3, 3, 4))
          for form in FORMS3 for mode in MODES for det in (False, True)]


@pytest.mark.parametrize("form,mode,deterministic_mode,layout,shape,size", INT64,
                         ids=[f"{c[0]}-{c[1]}-{'deterministic' if c[2] else 'atomic'}" for c in INT64])
def test_int64_indexing(request, device, monkeypatch, form, mode, deterministic_mode, layout, shape, size):
    """The 64-bit index path (taken past 2^31 elements), forced on small tensors: the same results,
    forward and backward."""
    monkeypatch.setattr(launch, "FORCE_INT64", True)
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        check_case(request, device, form, mode, "border", True, torch.float32, layout, shape=shape, size=size)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("mode", MODES)
def test_int64_deterministic(request, device, monkeypatch, mode):
    monkeypatch.setattr(launch, "FORCE_INT64", True)
    torch.use_deterministic_algorithms(True)
    try:
        check_case(request, device, "affine", mode, "zeros", False, torch.float32, "channels_last")
    finally:
        torch.use_deterministic_algorithms(False)


# per dimension: (input shape, K, output size): slices of 2 of 5 images, of 2 of 3 volumes
BATCH_SPLIT = {2: ((5, 2, 6, 7), 2, (4, 5)), 3: ((3, 2, 3, 4, 5), 1, (2, 3, 4))}


# every form; the atomic and the deterministic backward alternate over them (both in each dimension)
SPLIT = [(form, i % 2 == 1) for i, form in enumerate(FORMS + FORMS3)]


@pytest.mark.parametrize("form,deterministic", SPLIT,
                         ids=[f"{f}-{'deterministic' if d else 'atomic'}" for f, d in SPLIT])
def test_batch_split_for_grid_limit(request, device, monkeypatch, form, deterministic):
    """A batch past the grid's third dimension is launched in slices."""
    shape, K, size = BATCH_SPLIT[ndim(form)]
    monkeypatch.setattr(launch, "MAX_GRID_YZ", 2)
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_case(request, device, form, "bilinear", "reflection", False, torch.float32, "contiguous",
                   shape=shape, K=K, size=size)
    finally:
        torch.use_deterministic_algorithms(False)


def test_too_many_transforms_per_image(device, monkeypatch):
    monkeypatch.setattr(launch, "MAX_GRID_YZ", 2)
    x = torch.randn(1, 1, 4, 4, device=device)
    theta = torch.eye(2, 3, device=device).expand(1, 3, 2, 3)
    with pytest.raises(ValueError, match=r"theta: at most 2 transforms per image \(K\).* got 3"):
        st.affine_sample(x, theta, (2, 2))


# --- half-precision accumulation of the input gradient ---------------------------------------------

HALF = {"f16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_half_accumulation_channels_last(request, device, monkeypatch, dtype, mode):
    """Channels-last half inputs with whole 16-byte channel vectors accumulate dL/dU in their own dtype
    (vector atomics). Each addition rounds to the dtype, so an input pixel's error is up to a rounding
    of its largest partial sum per contribution (~4.5 here), absolute: where contributions cancel the
    relative error of the small result is large. Twice the dtype's tolerance covers that."""
    seen = []
    real = launch.half_accumulation
    monkeypatch.setattr(launch, "half_accumulation", lambda *a: seen.append(real(*a)) or seen[-1])
    check_case(request, device, "affine", mode, "zeros", False, dtype, "channels_last", shape=(2, 16, 9, 11),
               K=2, size=(7, 8), tol_scale=2.0)
    assert seen == [True]


def test_half_accumulation_choice(monkeypatch):
    monkeypatch.setattr(launch, "_target_arch", lambda: 90)  # what a compiled launch on an H100/H200 sees

    def choose(dtype, C, size, layout="channels_last", K=1, mode="bilinear", H=56, W=56):
        x = torch.empty(2, C, H, W, dtype=dtype, device="meta")
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        p = launch.plan(x, *size)
        return launch.half_accumulation(x, K, size, mode, p)

    assert choose(torch.bfloat16, 256, (56, 56))  # 4 contributions per input pixel
    assert choose(torch.bfloat16, 16, (28, 28), K=4)  # down-sampling, 4 transforms
    assert not choose(torch.bfloat16, 8, (28, 28), K=4)  # strides of 8: vectors not provably aligned
    assert not choose(torch.bfloat16, 256, (224, 224), K=2)  # 4 * 2 * 16 = 128 contributions: float32
    assert not choose(torch.float32, 256, (56, 56))  # float32 accumulates in place anyway
    assert not choose(torch.bfloat16, 256, (56, 56), layout="nchw")  # no vectors: never scalar bf16 atomics
    assert not choose(torch.bfloat16, 12, (56, 56))  # a partial vector of channels
    assert choose(torch.float16, 16, (112, 112), mode="nearest")  # 4 contributions of one corner each
    monkeypatch.setattr(launch, "_target_arch", lambda: 80)  # an A100: f16x2 reductions, no bf16 ones
    assert choose(torch.float16, 256, (56, 56)) and not choose(torch.bfloat16, 256, (56, 56))


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_half_accumulation_error_on_zoom_in(device, monkeypatch, dtype):
    """Where many contributions meet one input pixel, accumulating in bf16/fp16 loses accuracy that a
    float32 buffer keeps: measured here against float64 on a 6x zoom-in (~144 contributions per
    pixel). The launcher picks the float32 buffer there; forced to accumulate in half, the error is
    several times larger."""
    gen = torch.Generator().manual_seed(21)
    x = make_input((1, 16, 6, 6), dtype, "channels_last", device, gen).requires_grad_()
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], device=device)
    size = (36, 36)
    grad_out = torch.randn(1, 16, *size, generator=gen).to(device, dtype)
    ref, x64, _ = oracle("affine", x, (theta[:, None],), size, "bilinear", "zeros", False)
    (want,) = torch.autograd.grad(ref, x64, grad_out.double().cpu()[:, None])

    def rel_error():
        (g,) = torch.autograd.grad(st.affine_sample(x, theta, size), x, grad_out)
        return ((g.double().cpu() - want).norm() / want.norm()).item()

    float32_buffer = rel_error()
    monkeypatch.setattr(launch, "HALF_ACCUMULATE_MAX_CONTRIBUTIONS", float("inf"))
    in_half = rel_error()
    eps = torch.finfo(dtype).eps
    assert float32_buffer < eps  # one rounding at the end
    assert in_half > 2 * float32_buffer


# --- launch shapes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("Ho,Wo,block_p,tile_w", [(224, 224, 256, 32), (28, 28, 256, 32), (56, 56, 128, 64),
                                                   (5, 11, 256, 32), (1, 1, 128, 64), (300, 3, 256, 4)])
def test_tile_width_covers_with_least_padding(Ho, Wo, block_p, tile_w):
    assert 1 << launch._tile_width(Ho, Wo, block_p) == tile_w


def test_plan_planar_and_channels_last():
    nchw = torch.empty(2, 3, 9, 9, device="meta")
    assert (launch.plan(nchw, 5, 5).block_c, launch.plan(nchw, 5, 5).block_p) == (1, 512)  # few channels
    assert launch.plan(nchw, 5, 5, backward=True).block_p == 256
    assert launch.plan(torch.empty(2, 64, 9, 9, device="meta"), 5, 5).block_p == 128  # the channel loop dominates
    cl = torch.empty(2, 12, 9, 9, dtype=torch.bfloat16, device="meta").contiguous(memory_format=torch.channels_last)
    p = launch.plan(cl, 5, 5)
    assert (p.block_c, p.block_p, p.even_c) == (8, 128, False)  # a 16-byte vector of bf16; 12 = 8 + 4
    f32 = launch.plan(cl.float(), 5, 5)
    assert f32.block_c == 4 and f32.even_c


def test_plan_of_a_volume():
    vol = torch.empty(2, 3, 5, 9, 9, device="meta")
    shape = lambda p: (p.block_c, p.block_p, p.num_warps)  # noqa: E731
    assert shape(launch.plan(vol, 25, 9)) == (1, 512, 4)  # the forward as in 2-D
    assert shape(launch.plan(vol, 25, 9, backward=True)) == (1, 256, 8)  # trilinear: one voxel per thread
    assert shape(launch.plan(vol, 25, 9, backward=True, per_tile=True)) == (1, 256, 4)  # basis: two per thread
    assert shape(launch.plan(vol, 25, 9, backward=True, mode="bicubic")) == (1, 128, 4)  # tricubic
    # the autotune candidates scale the default's pixels and warps alike
    assert launch._configs(launch.plan(vol, 25, 9, backward=True)) == [(256, 8), (512, 8), (512, 16), (128, 8)]


def test_autotune_only_on_compiled_cuda(monkeypatch):
    p = launch.plan(torch.empty(2, 3, 64, 64, device="meta"), 64, 64)
    assert launch._choices(p, torch.device("cpu")) == [(p.block_p, p.num_warps)]
    configs = launch._configs(p)
    assert configs[0] == (p.block_p, p.num_warps) and len(configs) == len(set(configs)) > 1
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not launch._autotune_enabled(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "0")
    assert not launch._autotune_enabled(torch.device("cuda"))
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "1")
    assert launch._autotune_enabled(torch.device("cuda"))


# (kernel arguments, forward grid, backward grid, gather arguments, expected programs forward, backward)
HINTS = {
    "2d": ({"Wo": 224, "Ho": 224, "LOG2_TW": 5, "LOG2_CT": 3, "BLOCK_P": 256}, [28 << 3, 4, 64], [7 << 3, 4, 64],
           {"E": 1000, "H": 10, "W": 10}, 28 * 7 * 256, 7 * 7 * 256),
    "3d": ({"Wo": 64, "Do": 32, "Ho": 64, "LOG2_TW": 5, "LOG2_CT": 1, "BLOCK_P": 256}, [256 << 1, 2, 4],
           [64 << 1, 2, 4], {"E": 1000, "D": 2, "H": 5, "W": 10}, 256 * 2 * 2 * 4, 64 * 2 * 2 * 4),
}


@pytest.mark.parametrize("case", HINTS)
def test_static_hints(case):
    args, fwd_grid, bwd_grid, gather_args, fwd_programs, bwd_programs = HINTS[case]
    assert launch.static_hints("sample_fwd_kernel", args, fwd_grid) == {"programs_with_work": fwd_programs}
    bwd = launch.static_hints("sample_bwd_kernel", args, bwd_grid)
    assert bwd["programs_with_work"] == bwd_programs and bwd["trips"]["0, n_here"] == 4
    gather = launch.static_hints("gather_grad_input_kernel", gather_args, [1, 1, 1])
    assert gather["trips"]["0, n_max"] == 10
    assert launch.static_hints("no_such_kernel", args, [1, 1, 1]) == {}


def test_int64_decision():
    small = torch.empty(2, 3, 8, 8, device="meta")
    assert not launch._int64(small)
    assert launch._int64(torch.empty(1, 1, 46341, 46341, device="meta"))  # 2^31 + elements
    # a view whose elements are few but whose strides reach far
    assert launch._int64(torch.empty(2**31 + 8, device="meta").as_strided((2, 2), (2**31, 1)))
    assert launch._int64(small, extra=2**31)
