"""``mode="bicubic"`` (4-D input) in every kernel form, run on the kernels (Triton's interpreter in the
suite) and judged against PyTorch's ``F.grid_sample`` in float64: forward, the input's gradient
(atomic scatter and the deterministic gather), the parameters' and the grid's gradients, odd and
one-pixel sizes, zoom-in and down-sampling, far-outside and non-finite coordinates, K > 1, the
64-bit index path, half-precision accumulation, empty tensors, opcheck and torch.compile."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
from stn_triton import ops, reference
from stn_triton.kernels import launch
from _cases import (DTYPES, FORMS, LAYOUTS, PADDINGS, assert_close, check_case, make_params, nonfinite_params, oracle,
                    run)

ALIGN = (False, True)
MATRIX = list(itertools.product(FORMS, PADDINGS, ALIGN))


def _dtype_layout(idx):
    """A (dtype, layout) for the idx-th case of MATRIX: the 24 cases cover all 9 pairs, each form
    meeting every dtype and every layout."""
    dtypes = list(DTYPES)
    return dtypes[idx % 3], LAYOUTS[(idx + idx // 3) % 3]


@pytest.mark.parametrize("form,padding_mode,align_corners", MATRIX,
                         ids=[f"{f}-{p}-ac{int(a)}-{'-'.join(_dtype_layout(i))}" for i, (f, p, a) in enumerate(MATRIX)])
def test_matrix(request, device, form, padding_mode, align_corners):
    """Every form x padding x align_corners, forward and every gradient against float64, with the
    dtypes and layouts crossed over the cases (K = 2, 6x9 sampled to 5x7; N > 1 in the tests below)."""
    dtype, layout = _dtype_layout(MATRIX.index((form, padding_mode, align_corners)))
    check_case(request, device, form, "bicubic", padding_mode, align_corners, DTYPES[dtype], layout,
               shape=(1, 2, 6, 9), K=2, size=(5, 7))


def test_matrix_covers_every_dtype_and_layout():
    pairs = {_dtype_layout(i) for i in range(len(MATRIX))}
    assert pairs == set(itertools.product(DTYPES, LAYOUTS))
    for form in FORMS:
        seen = [_dtype_layout(i) for i, c in enumerate(MATRIX) if c[0] == form]
        assert {d for d, _ in seen} == set(DTYPES) and {lay for _, lay in seen} == set(LAYOUTS)


@pytest.mark.parametrize("form", FORMS)
def test_against_pytorch_directly(device, form):
    """The kernels' float32 output and gradients against ``F.grid_sample`` itself in float64 on the
    same grid (not through our reference): two (padding, align_corners) pairs per form, every pair
    over the forms."""
    gen = torch.Generator().manual_seed(100 + FORMS.index(form))
    pairs = list(itertools.product(PADDINGS, ALIGN))
    for padding_mode, ac in (pairs[2 * FORMS.index(form) % 6], pairs[(2 * FORMS.index(form) + 1) % 6]):
        x = torch.randn(2, 2, 6, 9, generator=gen).to(device).requires_grad_()
        params = [p.requires_grad_() for p in make_params(form, 2, 1, (5, 7), ac, torch.float32, device, gen)]
        opts = dict(mode="bicubic", padding_mode=padding_mode, align_corners=ac)
        out = run(form, x, params, (5, 7), **opts)[:, 0]
        grid = reference.form_grid(form, [p.detach().double().cpu() for p in params], [5, 7], ac)[:, 0]
        x64, g64 = x.detach().double().cpu().requires_grad_(), grid.requires_grad_()
        want = F.grid_sample(x64, g64, **opts)
        assert_close(out, want, torch.float32, f"{padding_mode} ac={ac} output")
        w = torch.randn(out.shape, generator=gen).to(device)
        (gx,) = torch.autograd.grad(out, x, w)
        wx, _ = torch.autograd.grad(want, (x64, g64), w.double().cpu())
        assert_close(gx, wx, torch.float32, f"{padding_mode} ac={ac} grad x")
        if form == "grid":  # the grid's own gradient, element by element
            (gg,) = torch.autograd.grad(run(form, x.detach(), params, (5, 7), **opts), params[0], w[:, None])
            (wg,) = torch.autograd.grad(F.grid_sample(x64.detach(), g64, **opts), g64, w.double().cpu())
            assert_close(gg[:, 0], wg, torch.float32, f"{padding_mode} ac={ac} grad grid", scale_by_max=True)


SHAPES = {"odd-to-13x7": ((1, 2, 11, 17), (13, 7)), "1x1-input": ((3, 1, 1, 1), (3, 2)),
          "1-row": ((1, 2, 1, 9), (1, 5)), "1-column": ((1, 1, 6, 1), (4, 3))}
PAD_AC = (("zeros", False), ("border", True), ("reflection", False), ("reflection", True), ("border", False),
          ("zeros", True))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_odd_and_one_pixel_sizes(request, device, form, shape):
    """One-pixel axes: every tap pads to pixel 0 (border, reflection) or falls outside (zeros). One
    (padding, align_corners) pair per case, each pair over the shapes and forms."""
    (shape, size), s = SHAPES[shape], list(SHAPES).index(shape)
    padding_mode, ac = PAD_AC[(FORMS.index(form) + 2 * s) % 6]
    check_case(request, device, form, "bicubic", padding_mode, ac, torch.float32, "contiguous",
               shape=shape, K=2, size=size)


@pytest.mark.parametrize("form", FORMS)
def test_zoom_in(request, device, form):
    """~4x zoom-in: each input pixel receives ~250 contributions (16 taps per output pixel)."""
    check_case(request, device, form, "bicubic", "reflection", False, torch.float32, "contiguous",
               shape=(1, 1, 5, 6), K=1, size=(20, 24), spread=0.05)


@pytest.mark.parametrize("form", FORMS)
def test_downsample_2x(request, device, form):
    check_case(request, device, form, "bicubic", "zeros", True, torch.float32, "channels_last",
               shape=(1, 3, 24, 26), K=2, size=(12, 13), spread=0.2)


@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("form", ["affine", "grid"])
def test_far_outside(request, device, form, padding_mode):
    """Coordinates tens of image widths away: zeros reads nothing, border the edges, reflection folds
    them back (float32's rounding of a ~500-pixel coordinate: the tolerance says so)."""
    check_case(request, device, form, "bicubic", padding_mode, False, torch.float32, "contiguous",
               shape=(1, 2, 7, 13), K=2, size=(5, 11), spread=40.0,
               tol_scale=25.0 if padding_mode == "reflection" else 1.0)


# --- non-finite and huge coordinates ----------------------------------------------------------------

# every padding for the affine and grid forms (coordinates from a matrix, and as given); one other
# padding each for projective and basis
NONFINITE_CASES = [(form, p) for form in ("affine", "grid") for p in PADDINGS]
NONFINITE_CASES += [("projective", "border"), ("basis", "reflection")]


@pytest.mark.parametrize("form,padding_mode", NONFINITE_CASES, ids=[f"{f}-{p}" for f, p in NONFINITE_CASES])
def test_nonfinite_parameters(device, form, padding_mode):
    """NaN/inf coordinates never read or write out of bounds; kernels and reference agree on the
    documented rule (stn_triton.reference), forward and gradients, and everything is finite."""
    x = torch.randn(2, 2, 7, 8, device=device, requires_grad=True)
    params = [p.requires_grad_() for p in nonfinite_params(form, device, huge=True)]
    for ac in [ALIGN[(FORMS.index(form) + PADDINGS.index(padding_mode)) % 2]]:  # both over the cases
        opts = dict(mode="bicubic", padding_mode=padding_mode, align_corners=ac)
        out = run(form, x, params, (5, 6), **opts)
        ref, x64, p64 = oracle(form, x, params, (5, 6), **opts)
        assert torch.isfinite(out).all()
        assert_close(out, ref, torch.float32, "output")
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, *params), grad_out)
        want = torch.autograd.grad(ref, (x64, *p64), grad_out.double().cpu())
        assert torch.isfinite(got[0]).all()
        assert_close(got[0], want[0], torch.float32, "grad x")
        for g, w in zip(got[1:], want[1:]):
            assert_close(g, w, torch.float32, "grad params", scale_by_max=True, equal_nan=True)


@pytest.mark.parametrize("align_corners", ALIGN, ids=["ac0", "ac1"])
def test_nonfinite_rule(device, align_corners):
    """The rule itself, on the kernels: a non-finite x at a row's centre reads nothing (zeros), pixel
    0 or the last pixel (border: NaN and -inf, +inf) or pixel 0 (reflection), with weight 1, and
    sends its gradient there; the coordinate's gradient is 0."""
    x = torch.randn(1, 2, 4, 6, device=device, requires_grad=True)
    rows = (-1.0, 1.0) if align_corners else (-0.75, 0.75)  # the centres of rows 0 and 3, exactly
    special = (float("nan"), float("inf"), -float("inf"))
    grid = torch.tensor([[[[v, r] for v in special] for r in rows]], device=device).requires_grad_()
    for padding_mode in PADDINGS:
        out = st.grid_sample(x, grid, mode="bicubic", padding_mode=padding_mode, align_corners=align_corners)
        for (a, r), (b, v) in itertools.product(enumerate((0, 3)), enumerate(special)):
            if padding_mode == "zeros":
                want = torch.zeros(2)
            else:
                col = 5 if (padding_mode == "border" and v == float("inf")) else 0
                want = x[0, :, r, col].detach()
            torch.testing.assert_close(out[0, :, a, b], want, rtol=1e-6, atol=1e-6)
        gx, gg = torch.autograd.grad(out.sum(), (x, grid))
        assert torch.isfinite(gx).all() and (gg[..., 0] == 0).all()
        assert gx.sum().item() == pytest.approx(0.0 if padding_mode == "zeros" else 2 * 6, abs=1e-5)


@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_huge_finite_coordinates_match_pytorch(device, padding_mode):
    """Finite coordinates far past int32 once unnormalised (PyTorch's issue 35202) behave as
    PyTorch's: nothing (zeros) or the border pixels, all taps together."""
    x = torch.rand(1, 2, 12, 16, device=device)
    g = torch.tensor([[[[-10059144.0, 67680944.0], [67680944.0, 0.3], [-3e9, -0.2]]]], device=device)
    ours = st.grid_sample(x, g, "bicubic", padding_mode, False)
    assert torch.isfinite(ours).all()
    if padding_mode != "reflection":  # reflection folds them back at float32's resolution of ~1e8
        torch.testing.assert_close(ours.double(), F.grid_sample(x.double(), g.double(), "bicubic", padding_mode, False),
                                   rtol=1e-5, atol=1e-5)


# --- the launcher's paths ---------------------------------------------------------------------------

@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("form", ["affine", "projective"])
def test_deterministic_backward(device, form):
    """Under deterministic mode (the sorted gather, 16 entries per pixel): bit-identical gradients on
    repeated runs, equal to the atomic path's within tolerance and to float64's. (The grid and basis
    forms' deterministic paths: test_int64_indexing, test_batch_split_and_tiles_per_program.)"""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 6, 7, generator=gen).to(device).requires_grad_()
    size = (10, 12)
    params = [p.requires_grad_() for p in make_params(form, 1, 2, size, False, torch.float32, device, gen, 0.3)]
    grad_out = torch.randn(1, 2, 2, *size, generator=gen).to(device)
    padding_mode = {"affine": "zeros", "projective": "reflection"}[form]

    def grads():
        out = run(form, x, params, size, mode="bicubic", padding_mode=padding_mode, align_corners=False)
        return torch.autograd.grad(out, (x, *params), grad_out)

    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = grads()
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    ref, x64, p64 = oracle(form, x, params, size, "bicubic", padding_mode, False)
    want = torch.autograd.grad(ref, (x64, *p64), grad_out.double().cpu())
    assert_close(first[0], want[0], torch.float32, "grad x")
    for g, w in zip(first[1:], want[1:]):
        assert_close(g, w, torch.float32, "grad params", scale_by_max=True)


def test_deterministic_entries_per_pixel(device, monkeypatch, deterministic):
    """The gather reads 16 entries per output pixel (LOG2_NC = 4)."""
    seen = []
    real = launch.gather_grad_input_kernel

    class Spy:
        def __getitem__(self, grid):
            def call(*args, **kwargs):
                seen.append((kwargs["LOG2_NC"], args[-1]))  # E, the entries
                return real[grid](*args, **kwargs)
            return call

    monkeypatch.setattr(launch, "gather_grad_input_kernel", Spy())
    x = torch.randn(1, 2, 5, 6, device=device, requires_grad=True)
    theta = torch.eye(2, 3, device=device)[None]
    (gx,) = torch.autograd.grad(st.affine_sample(x, theta, (3, 4), mode="bicubic").sum(), x)
    assert seen == [(4, 16 * 3 * 4)]


def test_deterministic_channels_last_bf16(device, deterministic):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 5, 6, generator=gen).to(device, torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    (theta,) = make_params("affine", 1, 1, (11, 13), True, torch.float32, device, gen, 0.3)
    out = st.affine_sample(x, theta[:, 0], (11, 13), mode="bicubic", align_corners=True, padding_mode="border")
    grad_out = torch.randn(out.shape, generator=gen).to(device, torch.bfloat16)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    assert gx.dtype == torch.bfloat16 and gx.is_contiguous(memory_format=torch.channels_last)
    ref, x64, _ = oracle("affine", x, (theta,), (11, 13), "bicubic", "border", True)
    (want,) = torch.autograd.grad(ref, x64, grad_out.double().cpu()[:, None])
    assert_close(gx, want, torch.bfloat16, "grad x")


@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("form", ["affine", "basis"])
def test_int64_indexing(request, device, monkeypatch, form, deterministic_mode):
    """The 64-bit index path computes the same, forward and backward, both scatters."""
    monkeypatch.setattr(launch, "FORCE_INT64", True)
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        check_case(request, device, form, "bicubic", "border", True, torch.float32, "strided")
    finally:
        torch.use_deterministic_algorithms(False)


def test_batch_split_and_tiles_per_program(request, device, monkeypatch):
    """Batches past the grid's limit (slices of 2 of 3 images) and several row tiles per backward
    program (37 rows), deterministic and not."""
    monkeypatch.setattr(launch, "MAX_GRID_YZ", 2)
    monkeypatch.setattr(launch, "TPP_MIN_PROGRAMS", 1)
    check_case(request, device, "projective", "bicubic", "reflection", False, torch.float32, "contiguous",
               shape=(3, 1, 9, 7), K=1, size=(37, 5))
    torch.use_deterministic_algorithms(True)
    try:
        check_case(request, device, "grid", "bicubic", "zeros", True, torch.float32, "channels_last",
                   shape=(3, 2, 9, 7), K=1, size=(4, 5))
    finally:
        torch.use_deterministic_algorithms(False)


HALF = {"f16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_half_accumulation_channels_last(request, device, monkeypatch, dtype):
    """Channels-last half inputs with whole 16-byte channel vectors and few contributions per input
    pixel accumulate dL/dU in their own dtype (16 per output pixel counted)."""
    seen = []
    real = launch.half_accumulation
    monkeypatch.setattr(launch, "half_accumulation", lambda *a: seen.append(real(*a)) or seen[-1])
    check_case(request, device, "affine", "bicubic", "zeros", False, dtype, "channels_last", shape=(1, 16, 9, 11),
               K=1, size=(7, 8), tol_scale=2.0)
    assert seen == [True]


def test_half_accumulation_counts_16_contributions(monkeypatch):
    monkeypatch.setattr(launch, "_target_arch", lambda: 90)

    def choose(size, K=1, mode="bicubic"):
        x = torch.empty(2, 256, 56, 56, dtype=torch.bfloat16, device="meta").contiguous(
            memory_format=torch.channels_last)
        return launch.half_accumulation(x, K, size, mode, launch.plan(x, *size))

    assert choose((56, 56))  # 16 contributions per input pixel: still in bf16
    assert not choose((56, 56), K=2)  # 32: a float32 buffer
    assert choose((56, 56), K=4, mode="bilinear")  # bilinear's 16 with 4 transforms
    assert not choose((80, 80))


# --- empty tensors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_empty(device, monkeypatch, form):
    """An empty batch runs (zero-size gradients); an empty output launches nothing."""
    x = torch.randn(0, 3, 6, 7, device=device, requires_grad=True)
    params = [p.requires_grad_() for p in make_params(form, 0, 2, (4, 5), False, torch.float32, device,
                                                       torch.Generator().manual_seed(0))]
    out = run(form, x, params, (4, 5), mode="bicubic", align_corners=False)
    assert out.shape == (0, 2, 3, 4, 5)
    grads = torch.autograd.grad(out.sum(), (x, *params))
    assert all(g.shape == t.shape for g, t in zip(grads, (x, *params)))
    launched = []
    monkeypatch.setattr(launch, "_run", lambda *a, **k: launched.append(a))
    x = torch.randn(2, 3, 6, 7, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    if form == "grid":
        params = [torch.rand(2, 1, 0, 4, 2, generator=gen).to(device).requires_grad_()]
        size = (0, 4)
    else:
        params = [p.requires_grad_() for p in make_params(form, 2, 1, (1, 4), False, torch.float32, device, gen)]
        size = (0, 4)
        if form == "basis":
            params[1] = torch.zeros(params[1].shape[0], 0, device=device, requires_grad=True)
    out = run(form, x, params, size, mode="bicubic", align_corners=False)
    assert out.shape == (2, 1, 3, 0, 4)
    grads = torch.autograd.grad(out.sum(), (x, *params))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (x, *params)))
    assert launched == []


# --- the reference, the ops, compile, the module ----------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_float64(form):
    """float64 takes the reference path: gradcheck through the public functions."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    params = [p.double().requires_grad_() for p in make_params(form, 1, 2, (3, 4), False, torch.float32, "cpu", gen)]
    assert st.backend(x) == "reference"
    padding_mode = ("zeros", "border", "reflection", "border")[FORMS.index(form)]
    def fn(x, *p):
        return run(form, x, p, (3, 4), mode="bicubic", padding_mode=padding_mode, align_corners=False)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


# one op per form with the mode an argument: two forms here (one and two parameter tensors); every
# form's op in test_special.py
@pytest.mark.parametrize("form", ["affine", "basis"])
def test_opcheck(device, form):
    fwd, bwd = ops.OPS[form]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 2, 6, 7, generator=gen).to(device).requires_grad_()
    params = [p.requires_grad_() for p in make_params(form, 1, 1, (4, 5), False, torch.float32, device, gen)]
    padding_mode, ac = (("zeros", False), ("border", True), ("reflection", False), ("reflection", True))[
        FORMS.index(form)]
    torch.library.opcheck(fwd, (x, *params, [4, 5], "bicubic", padding_mode, ac))
    grad = torch.randn(1, 1, 2, 4, 5, generator=gen).to(device)
    needs = [True] * (1 + len(params))
    torch.library.opcheck(bwd, (grad, x.detach(), *[p.detach() for p in params], [4, 5], "bicubic", padding_mode, ac,
                                needs), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(device):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Linear(3 * 8 * 9, 6)
            torch.nn.init.zeros_(self.loc.weight)
            with torch.no_grad():
                self.loc.bias.copy_(torch.tensor([0.9, 0.1, 0.05, -0.1, 1.1, 0.0]))

        def forward(self, x):
            theta = self.loc(x.flatten(1)).view(-1, 2, 3)
            return st.affine_sample(x, theta, (5, 6), mode="bicubic", padding_mode="border").square().mean()

    torch._dynamo.reset()
    net = Net().to(device)
    x = torch.randn(2, 3, 8, 9, device=device, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(x)
    gx, gw = torch.autograd.grad(loss, (x, net.loc.bias))
    loss_e = net(x)
    gx_e, gw_e = torch.autograd.grad(loss_e, (x, net.loc.bias))
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(gx, gx_e)
    torch.testing.assert_close(gw, gw_e)


def test_double_backward(device):
    """Second derivatives (composed of PyTorch ops through the reference) exist for bicubic too."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(1, 2, 5, 6, generator=gen).to(device).requires_grad_()
    (theta,) = make_params("affine", 1, 1, (4, 5), False, torch.float32, device, gen)  # (N, K, 2, 3)
    theta.requires_grad_()
    out = st.affine_sample(x, theta, (4, 5), mode="bicubic")
    (gt,) = torch.autograd.grad(out.square().sum(), theta, create_graph=True)
    (gx,) = torch.autograd.grad(gt.sum(), x)
    x64, t64 = x.detach().double().requires_grad_(), theta.detach().double().requires_grad_()
    ref = reference.form_sample("affine", x64, [t64], [4, 5], "bicubic", "zeros", False)
    (gt64,) = torch.autograd.grad(ref.square().sum(), t64, create_graph=True)
    (gx64,) = torch.autograd.grad(gt64.sum(), x64)
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-3, atol=1e-3 * max(1.0, gx64.abs().max().item()))


def test_spatial_transformer_passes_bicubic_through(device):
    net = st.SpatialTransformer(torch.nn.Flatten(), "affine", size=(4, 5), mode="bicubic", padding_mode="border",
                                return_theta=True).to(device)
    x = torch.randn(2, 3, 7, 8, device=device)
    net(x)  # the lazy head takes its shape
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.9, 0.1, 0.05, -0.1, 1.1, 0.0]))
    out, theta = net(x)
    want = F.grid_sample(x.double(), F.affine_grid(theta.detach().double().view(-1, 2, 3), (2, 3, 4, 5),
                                                   align_corners=False), "bicubic", "border", align_corners=False)
    assert_close(out, want, torch.float32, "SpatialTransformer output")
    out2 = st.spatial_transform(x, theta.detach(), "affine", (4, 5), mode="bicubic", padding_mode="border")
    torch.testing.assert_close(out2, out.detach(), rtol=0, atol=0)


def test_bad_mode_is_an_argument_error():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(st.ArgumentError, match=r"mode: expected one of \('bilinear', 'nearest', 'bicubic'\)"):
        st.grid_sample(x, torch.zeros(1, 2, 2, 2), mode="cubic", align_corners=False)
    with pytest.raises(st.ArgumentError, match=r"mode: expected one of"):
        st.affine_sample(x, torch.eye(2, 3)[None], mode=None)


def test_coefficients_sum_to_one_and_match_pytorch_at_taps():
    """PyTorch's cubic weights, read off F.grid_sample on unit impulses: a 1-D sanity check of the
    A = -0.75 convolution at a few fractions (the kernels and PyTorch, float64 vs float32)."""
    W = 8
    x = torch.eye(W)[:, None, None, :]  # W impulse images (W, 1, 1, W)
    for t in (0.0, 0.25, 0.5, 0.8125):
        ix = 3.0 + t
        g = torch.tensor([(2 * ix + 1) / W - 1, 0.0]).view(1, 1, 1, 2).expand(W, 1, 1, 2)
        ours = st.grid_sample(x, g, mode="bicubic", align_corners=False).flatten()
        theirs = F.grid_sample(x.double(), g.double(), mode="bicubic", align_corners=False).flatten()
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-6)
        assert ours.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert math.isclose(theirs[2].item(), ((-0.75 * (t + 1) + 3.75) * (t + 1) - 6) * (t + 1) + 3, abs_tol=1e-12)
