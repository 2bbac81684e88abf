"""Volumetric (5-D) spatial transformers: every 3-D form (affine3d, basis3d, grid3d) on the kernels
(Triton's interpreter on CPU) against PyTorch's ``F.affine_grid`` / ``F.grid_sample`` in float64 on
the same coordinates, forward and every gradient; the op layer (opcheck, torch.compile, autocast,
double backward), determinism, 64-bit indexing, the 3-D families and the errors.

Volumes are tiny (the interpreter is slow); every element of every result is compared (new buffers
are poisoned with NaN, see conftest.py)."""

import zlib

import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
from stn_triton import ops, reference
from stn_triton.kernels import launch
from transforms_registry import get_transform
from _cases import MODES, PADDINGS, assert_close

FORMS3 = ("affine3d", "basis3d", "grid3d")
LAYOUTS3 = ("contiguous", "channels_last_3d", "strided")


def gen_for(request, salt=""):
    return torch.Generator().manual_seed(zlib.crc32((request.node.nodeid + salt).encode()))


def make_input(shape, dtype, layout, device, gen):
    N, C, D, H, W = shape
    if layout == "strided":  # a view with arbitrary strides
        big = torch.randn(N, C + 1, D + 1, 2 * H, W + 2, generator=gen).to(device=device, dtype=dtype)
        x = big[:, 1:, 1:, ::2, 1:W + 1]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last_3d)
        return x
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def make_params(form, N, K, size, align_corners, dtype, device, gen, spread=1.0):
    """Parameters of a 3-D form, (N, K, ...), near the identity with random scale, shear and shift."""
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    theta = torch.eye(3, 4, dtype=torch.float64).expand(N, K, 3, 4) * 1.1 + spread * 0.3 * rnd(N, K, 3, 4)
    if form == "affine3d":
        return (theta.to(device=device, dtype=torch.float32),)
    base = reference.base_grid3d(size, align_corners, torch.float64, "cpu").T  # (4, P)
    P = base.shape[1]
    if form == "basis3d":
        Dm = 6
        basis = torch.cat([base, 0.3 * rnd(Dm - 4, P)], dim=0)
        m = torch.cat([theta, 0.4 * rnd(N, K, 3, Dm - 4)], dim=3)
        return (m.to(device=device, dtype=torch.float32), basis.to(device=device, dtype=torch.float32))
    grid = torch.einsum("nkcj,jp->nkpc", theta, base).reshape(N, K, *size, 3)
    return (grid.to(device=device, dtype=dtype),)


def run(form, x, params, size, **opts):
    if form == "affine3d":
        return st.affine_sample(x, params[0], size, **opts)
    if form == "basis3d":
        return st.basis_sample(x, params[0], params[1], size, **opts)
    return st.grid_sample(x, params[0], **opts)


def oracle(form, x, params, size, mode, padding_mode, align_corners):
    """float64 on CPU through the reference (F.affine_grid / F.grid_sample; non-finite coordinates
    as stn_triton.reference documents)."""
    x64 = x.detach().cpu().double().requires_grad_(x.requires_grad)
    p64 = [p.detach().cpu().double().requires_grad_(p.requires_grad) for p in params]
    return reference.form_sample(form, x64, p64, size, mode, padding_mode, align_corners), x64, p64


def pytorch(form, x, params, size, mode, padding_mode, align_corners):
    """PyTorch itself in float64, for finite coordinates: the law."""
    N, K = params[0].shape[:2]
    xs = x.detach().cpu().double()[:, None].expand(N, K, *x.shape[1:]).reshape(N * K, *x.shape[1:])
    p = [t.detach().cpu().double() for t in params]
    if form == "affine3d":
        grid = F.affine_grid(p[0].reshape(N * K, 3, 4), (N * K, x.shape[1], *size), align_corners=align_corners)
    elif form == "basis3d":
        grid = torch.einsum("nkcd,dp->nkpc", p[0], p[1]).reshape(N * K, *size, 3)
    else:
        grid = p[0].reshape(N * K, *size, 3)
    out = F.grid_sample(xs, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return out.reshape(N, K, x.shape[1], *size)


def check_case(request, device, form, mode, padding_mode, align_corners, dtype, layout,
               shape=(1, 3, 5, 6, 7), K=2, size=(4, 5, 6), spread=1.0, grads=True, tol_scale=1.0, salt=""):
    gen = gen_for(request, salt)
    x = make_input(shape, dtype, layout, device, gen)
    params = make_params(form, shape[0], K, size, align_corners, dtype, device, gen, spread)
    assert st.backend(x) != "reference", "the kernels must be under test, not the reference"
    x.requires_grad_(grads)
    for p in params:
        p.requires_grad_(grads)
    opts = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    out = run(form, x, params, size, **opts)
    ref, x64, p64 = oracle(form, x, params, size, **opts)
    assert out.dtype == dtype and out.shape == ref.shape == (shape[0], K, shape[1], *size)
    assert_close(out, ref, dtype, "output", tol_scale=tol_scale)
    assert_close(out, pytorch(form, x, params, size, **opts), dtype, "output vs F.grid_sample", tol_scale=tol_scale)
    if not grads:
        return out
    grad_out = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    got = torch.autograd.grad(out, (x, *params), grad_out)
    want = torch.autograd.grad(ref, (x64, *p64), grad_out.double().cpu())
    assert got[0].dtype == dtype and got[0].stride() == torch.empty_like(x).stride()
    assert_close(got[0], want[0], dtype, "grad x", tol_scale=tol_scale)
    for name, g, w, p in zip(("grad params", "grad basis"), got[1:], want[1:], params):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert_close(g, w, dtype, name, scale_by_max=True, tol_scale=tol_scale)
    return out


# --- every form x mode x padding x align_corners; dtypes and layouts crossed --------------------------

@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS3)
def test_matrix(request, device, form, mode, padding_mode, align_corners):
    # each padding mode meets another layout, so that every form x mode sees all three layouts
    layout = LAYOUTS3[(PADDINGS.index(padding_mode) + align_corners) % 3]
    check_case(request, device, form, mode, padding_mode, align_corners, torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS3)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("form", FORMS3)
def test_half_precision(request, device, form, dtype, layout):
    """float16/bfloat16 maps (fp32 accumulation): outputs and gradients in the input's dtype."""
    mode = "nearest" if layout == "strided" else "bilinear"
    padding_mode = PADDINGS[LAYOUTS3.index(layout)]
    check_case(request, device, form, mode, padding_mode, layout == "channels_last_3d", dtype, layout,
               shape=(1, 4, 4, 5, 6), K=2, size=(3, 4, 5))


@pytest.mark.parametrize("form", FORMS3)
@pytest.mark.parametrize("shape,size", [((1, 2, 1, 1, 1), (3, 2, 2)), ((2, 1, 1, 5, 4), (2, 3, 3)),
                                        ((1, 3, 7, 1, 5), (5, 1, 3)), ((1, 2, 3, 4, 5), (1, 1, 1))],
                         ids=["1-voxel-input", "1-slice", "1-row", "1-voxel-output"])
def test_odd_and_one_voxel_sizes(request, device, form, shape, size):
    # one padding mode and align_corners per case, rotating so that each size meets several
    combos = [(False, "zeros"), (True, "reflection"), (False, "border"), (True, "zeros"), (False, "reflection")]
    ac, padding_mode = combos[(FORMS3.index(form) + shape[2] + size[0]) % len(combos)]
    check_case(request, device, form, "bilinear", padding_mode, ac, torch.float32, "contiguous",
               shape=shape, K=2, size=size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS3)
def test_zoom_in(request, device, form, mode):
    """~64 contributions per input voxel: the scatter must sum them all."""
    check_case(request, device, form, mode, "border", False, torch.float32, "contiguous",
               shape=(1, 2, 3, 3, 4), K=1, size=(12, 12, 16), spread=0.05)


@pytest.mark.parametrize("form", FORMS3)
def test_downsample(request, device, form):
    check_case(request, device, form, "bilinear", "zeros", True, torch.float32, "channels_last_3d",
               shape=(2, 3, 8, 10, 12), K=2, size=(4, 5, 6), spread=0.2)


@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("form", FORMS3)
def test_far_outside(request, device, form, padding_mode):
    """Coordinates tens of volume widths away (reflection folds them back: float32 rounding of a
    coordinate of ~hundreds of voxels is in the tolerance)."""
    check_case(request, device, form, "bilinear", padding_mode, False, torch.float32, "contiguous",
               spread=40.0, tol_scale=25.0 if padding_mode == "reflection" else 1.0)


def test_parallel_transforms_equal_separate_calls(request, device):
    gen = gen_for(request)
    x = torch.randn(2, 3, 4, 5, 6, generator=gen).to(device)
    (theta,) = make_params("affine3d", 2, 3, (3, 4, 5), False, torch.float32, device, gen)
    out = st.affine_sample(x, theta, (3, 4, 5))
    assert out.shape == (2, 3, 3, 3, 4, 5)
    for k in range(3):
        torch.testing.assert_close(out[:, k], st.affine_sample(x, theta[:, k], (3, 4, 5)), rtol=0, atol=0)
    grid = F.affine_grid(theta[:, 1], (2, 3, 3, 4, 5), align_corners=False)
    torch.testing.assert_close(st.grid_sample(x, grid, align_corners=False), out[:, 1], rtol=1e-5, atol=1e-5)


def test_identity_and_output_layout(device):
    x = torch.randn(2, 3, 4, 5, 6, device=device)
    eye = torch.eye(3, 4, device=device).expand(2, 3, 4)
    for ac in (False, True):
        torch.testing.assert_close(st.affine_sample(x, eye, align_corners=ac), x, rtol=1e-5, atol=1e-5)
    cl = x.contiguous(memory_format=torch.channels_last_3d)
    assert st.affine_sample(cl, eye, (3, 4, 5)).is_contiguous(memory_format=torch.channels_last_3d)
    out_k = st.affine_sample(cl, eye[:, None].expand(2, 2, 3, 4), 3)
    assert out_k.shape == (2, 2, 3, 3, 3, 3) and out_k.stride(2) == 1
    assert st.affine_sample(x, eye, (3, 4, 5)).is_contiguous()


# --- non-finite coordinates -------------------------------------------------------------------------

def _nonfinite_params(form, device, padding_mode):
    gen = torch.Generator().manual_seed(7)
    params = make_params(form, 2, 2, (3, 4, 5), False, torch.float32, device, gen)
    p0 = params[0].clone()
    if form == "grid3d":
        p0[0, 0, 1, 2, 0, 0] = float("nan")
        p0[0, 1, 2, :, 1, 1] = float("inf")
        p0[1, 0, :, 3, 0, 2] = -float("inf")
        p0[1, 1, 0, 2, 4, :] = float("nan")
        if padding_mode != "reflection":  # (reflected, float32 rounding of such a coordinate is all there is)
            p0[1, 1, 1, 1, 1] = torch.tensor([3e38, -1e9, 2e9])  # finite, far past int32 once unnormalised
    else:
        p0[0, 0, 0, 0] = float("nan")
        p0[0, 1, 1, 3] = float("inf")
        p0[1, 0, 2, 1] = -float("inf")
    return (p0, *params[1:])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("form", FORMS3)
def test_nonfinite_coordinates(device, form, padding_mode, mode):
    """NaN/inf never read or write out of bounds; zeros padding reads nothing, border and reflection
    clamp (PyTorch's CUDA kernel, as stn_triton.reference documents); gradients as the reference's."""
    x = torch.randn(2, 3, 4, 5, 6, device=device, requires_grad=True)
    params = [p.requires_grad_() for p in _nonfinite_params(form, device, padding_mode)]
    opts = dict(mode=mode, padding_mode=padding_mode, align_corners=False)
    out = run(form, x, params, (3, 4, 5), **opts)
    ref, x64, p64 = oracle(form, x, params, (3, 4, 5), **opts)
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, "output")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, *params), grad_out)
    want = torch.autograd.grad(ref, (x64, *p64), grad_out.double().cpu())
    assert_close(got[0], want[0], torch.float32, "grad x")
    for g, w in zip(got[1:], want[1:]):
        assert_close(g, w, torch.float32, "grad params", scale_by_max=True, equal_nan=True)


def test_nan_with_zeros_padding_reads_nothing(device):
    x = torch.randn(1, 2, 3, 4, 5, device=device)
    assert (st.affine_sample(x, torch.full((1, 3, 4), float("nan"), device=device)) == 0).all()
    grid = torch.zeros(1, 2, 2, 2, 3, device=device)
    grid[0, 1, 0, 1, 2] = float("nan")
    out = st.grid_sample(x, grid, align_corners=False)
    assert out[0, :, 1, 0, 1].eq(0).all() and out[0, :, 0, 0, 0].ne(0).all()


# --- empty tensors ------------------------------------------------------------------------------------

EMPTY = {"N=0": (0, 3, (2, 3, 4), 2), "C=0": (2, 0, (2, 3, 4), 2), "K=0": (2, 3, (2, 3, 4), 0),
         "Do=0": (2, 3, (0, 3, 4), 2), "Wo=0": (1, 2, (2, 3, 0), 1)}


@pytest.mark.parametrize("case", EMPTY, ids=list(EMPTY))
@pytest.mark.parametrize("form", FORMS3)
def test_empty_launches_nothing(device, monkeypatch, form, case):
    N, C, size, K = EMPTY[case]
    launched = []
    monkeypatch.setattr(launch, "_run", lambda *a, **k: launched.append(a))
    x = torch.randn(N, C, 3, 4, 5, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    P = size[0] * size[1] * size[2]
    if form == "affine3d":
        params = [torch.randn(N, K, 3, 4, generator=gen).to(device)]
    elif form == "basis3d":
        params = [torch.randn(N, K, 3, 4, generator=gen).to(device), torch.randn(4, P, generator=gen).to(device)]
    else:
        params = [torch.rand(N, K, *size, 3, generator=gen).to(device)]
    params = [p.requires_grad_() for p in params]
    for det in (False, True):
        torch.use_deterministic_algorithms(det)
        try:
            out = run(form, x, params, size, align_corners=False)
            assert out.shape == (N, K, C, *size)
            grads = torch.autograd.grad(out.sum(), (x, *params))
        finally:
            torch.use_deterministic_algorithms(False)
        for g, t in zip(grads, (x, *params)):
            assert g.shape == t.shape and not g.any()
    assert launched == []


# --- determinism, 64-bit indexing, launch choices -------------------------------------------------------

@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS3)
def test_deterministic_backward(device, deterministic, form, mode):
    """Bit-identical gradients on repeated runs (zoom-in: tens of contributions per input voxel, 8 per
    output voxel trilinear), through the sorted gather, agreeing with the reference."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 3, 4, 4, generator=gen).to(device).requires_grad_()
    size = (6, 7, 8)
    params = [p.requires_grad_() for p in make_params(form, 2, 1, size, False, torch.float32, device, gen, 0.1)]
    grad_out = torch.randn(2, 1, 3, *size, generator=gen).to(device)

    def grads():
        return torch.autograd.grad(run(form, x, params, size, mode=mode), (x, *params), grad_out)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref, x64, p64 = oracle(form, x, params, size, mode, "zeros", False)
    want = torch.autograd.grad(ref, (x64, *p64), grad_out.double().cpu())
    assert_close(first[0], want[0], torch.float32, "grad x")
    for g, w in zip(first[1:], want[1:]):
        assert_close(g, w, torch.float32, "grad params", scale_by_max=True)


def test_deterministic_channels_last_bf16(request, device, deterministic):
    check_case(request, device, "affine3d", "bilinear", "border", True, torch.bfloat16, "channels_last_3d",
               shape=(1, 4, 3, 4, 5), K=2, size=(5, 6, 7), spread=0.3)


@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS3)
def test_int64_indexing(request, device, monkeypatch, form, mode, deterministic_mode):
    """The 64-bit index path (taken past 2^31 elements), forced on small tensors: the same results."""
    monkeypatch.setattr(launch, "FORCE_INT64", True)
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        check_case(request, device, form, mode, "border", True, torch.float32,
                   "strided" if deterministic_mode else "channels_last_3d", shape=(2, 2, 3, 4, 5), size=(3, 3, 4))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("form", FORMS3)
def test_batch_split_for_grid_limit(request, device, monkeypatch, form, deterministic_mode):
    """A batch past the grid's third dimension is launched in slices (here of 2 of 3 volumes)."""
    monkeypatch.setattr(launch, "MAX_GRID_YZ", 2)
    torch.use_deterministic_algorithms(deterministic_mode)
    try:
        check_case(request, device, form, "bilinear", "reflection", False, torch.float32, "contiguous",
                   shape=(3, 2, 3, 4, 5), K=1, size=(2, 3, 4))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("form", ["affine3d", "grid3d"])
def test_several_tiles_per_program(request, device, monkeypatch, form):
    """Several row tiles per backward program, the last column short: parameter sums over all of them."""
    monkeypatch.setattr(launch, "TPP_MIN_PROGRAMS", 1)
    seen = []
    real = launch.tiles_per_program
    monkeypatch.setattr(launch, "tiles_per_program", lambda *a: seen.append(real(*a)) or seen[-1])
    check_case(request, device, form, "bilinear", "zeros", False, torch.float32, "contiguous",
               shape=(1, 2, 4, 5, 6), K=2, size=(9, 10, 5))  # 90 rows of 5 voxels: 12 row tiles of 8
    assert max(seen) == launch.TPP_MAX


def test_input_grad_skipped_when_not_required(device, monkeypatch):
    from stn_triton.kernels import launch_volume

    seen = {}
    real = launch_volume.sample3d_backward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch_volume, "sample3d_backward", spy)
    x = torch.randn(1, 2, 3, 4, 5, device=device)
    theta = torch.eye(3, 4, device=device)[None].requires_grad_()
    (g,) = torch.autograd.grad(st.affine_sample(x, theta).sum(), theta)
    assert seen["need_x"] is False and seen["need_param"] is True and torch.isfinite(g).all()


# --- the op layer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS3)
def test_gradcheck_float64(form):
    """float64 takes the reference path: gradcheck through the public functions."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    params = [p.double().requires_grad_() for p in make_params(form, 1, 2, (2, 3, 3), False, torch.float32, "cpu", gen)]
    assert st.backend(x) == "reference"
    for padding_mode in PADDINGS:
        fn = lambda x, *p: run(form, x, p, (2, 3, 3), padding_mode=padding_mode, align_corners=False)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("form", FORMS3)
def test_double_backward(device, form):
    """Second derivatives through the kernels' first order, against the float64 reference's."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(1, 2, 3, 4, 5, generator=gen).to(device).requires_grad_()
    size = (2, 3, 4)
    params = [p.requires_grad_() for p in make_params(form, 1, 2, size, False, torch.float32, device, gen)]
    out = run(form, x, params, size, align_corners=False)
    w = torch.randn(out.shape, generator=gen).to(device)
    first = torch.autograd.grad(out, (x, *params), w, create_graph=True)
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = reference.form_sample(form, x64, p64, size, "bilinear", "zeros", False)
    first64 = torch.autograd.grad(ref, (x64, *p64), w.double(), create_graph=True)
    for a, b in zip(first, first64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))
    v = [torch.randn(t.shape, generator=gen).to(device) for t in first]
    second = torch.autograd.grad(first, (x, *params), v, allow_unused=True)
    second64 = torch.autograd.grad(first64, (x64, *p64), [t.double() for t in v], allow_unused=True)
    for a, b in zip(second, second64):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a.double()
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * max(1.0, b.abs().max().item()))


OPCHECK = {"affine3d": ("bilinear", "zeros", False), "basis3d": ("nearest", "reflection", True),
           "grid3d": ("bilinear", "border", True)}


@pytest.mark.parametrize("form", FORMS3)
def test_opcheck(device, form):
    fwd, bwd = ops.OPS[form]
    assert fwd._qualname == f"stn_triton::{form}_sample" and bwd._qualname == f"stn_triton::{form}_sample_backward"
    gen = torch.Generator().manual_seed(11)
    size = (2, 2, 3)
    x = torch.randn(1, 2, 3, 3, 4, generator=gen).to(device).requires_grad_()
    params = [p.requires_grad_() for p in make_params(form, 1, 2, size, False, torch.float32, device, gen)]
    mode, padding_mode, ac = OPCHECK[form]
    torch.library.opcheck(fwd, (x, *params, list(size), mode, padding_mode, ac))
    grad = torch.randn(1, 2, 2, *size, generator=gen).to(device)
    needs = [True] * (1 + len(params))
    torch.library.opcheck(bwd, (grad, x.detach(), *[p.detach() for p in params], list(size), mode, padding_mode,
                                ac, needs),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(device):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Linear(2 * 3 * 4 * 5, 12)
            torch.nn.init.zeros_(self.loc.weight)
            with torch.no_grad():
                self.loc.bias.copy_(torch.tensor([0.9, 0.1, 0.0, 0.05, -0.1, 1.1, 0.0, 0.0, 0.0, 0.1, 0.95, -0.1]))

        def forward(self, x):
            theta = self.loc(x.flatten(1)).view(-1, 3, 4)
            return st.affine_sample(x, theta, (2, 3, 4)).square().mean()

    torch._dynamo.reset()
    net = Net().to(device)
    x = torch.randn(2, 2, 3, 4, 5, device=device, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(x)
    gx, gw = torch.autograd.grad(loss, (x, net.loc.bias))
    loss_e = net(x)
    gx_e, gw_e = torch.autograd.grad(loss_e, (x, net.loc.bias))
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(gx, gx_e)
    torch.testing.assert_close(gw, gw_e)


def test_autocast_samples_in_low_precision_keeps_theta_fp32(device):
    x = torch.randn(2, 3, 3, 4, 5, device=device)
    theta = (torch.eye(3, 4, device=device) * 0.9)[None].repeat(2, 1, 1).requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = st.affine_sample(x, theta, (2, 3, 4))
    assert out.dtype == torch.bfloat16
    (g,) = torch.autograd.grad(out.float().sum(), theta)
    assert g.dtype == torch.float32
    ref, _, _ = oracle("affine3d", x.to(torch.bfloat16), (theta.detach()[:, None],), (2, 3, 4), "bilinear", "zeros",
                       False)
    assert_close(out, ref[:, 0], torch.bfloat16, "autocast output")


@pytest.mark.parametrize("form", FORMS3)
def test_reference_path_agrees(device, monkeypatch, form):
    """The default CPU path (pure PyTorch) and the kernels give the same values and layouts; so do the
    ops forced onto the reference."""
    if device != "cpu":
        pytest.skip("the CPU paths")
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 3, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    params = [p.requires_grad_() for p in make_params(form, 2, 2, (2, 3, 4), False, torch.float32, "cpu", gen)]
    results = {}
    for path in ("reference", "interpreter", "forced-op"):
        monkeypatch.setenv("TRITON_INTERPRET", "0" if path == "reference" else "1")
        monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1" if path == "forced-op" else "0")
        if path == "forced-op":
            out = ops.OPS[form][0](x, *params, [2, 3, 4], "bilinear", "border", False)
        else:
            assert st.backend(x) == path
            out = run(form, x, params, (2, 3, 4), padding_mode="border", align_corners=False)
        assert out.stride(2) == 1, path  # channels innermost
        results[path] = (out, *torch.autograd.grad(out.square().sum(), (x, *params)))
    for a, b in zip(results["reference"], results["interpreter"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(results["reference"], results["forced-op"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- families ---------------------------------------------------------------------------------------

FAMILIES3 = ["affine3d", "attention3d"]


def test_families_registered_and_described():
    aff, att = get_transform("affine3d"), get_transform("attention3d")
    assert (aff.ndim, aff.num_params, att.ndim, att.num_params) == (3, 12, 3, 4)
    torch.testing.assert_close(aff.identity(), torch.eye(3, 4).reshape(12))
    torch.testing.assert_close(att.identity(), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    theta = torch.tensor([[0.5, 0.1, -0.2, 0.3]])
    want = torch.tensor([[[0.5, 0, 0, 0.1], [0, 0.5, 0, -0.2], [0, 0, 0.5, 0.3]]])
    torch.testing.assert_close(att.kernel_form(theta, (2, 3, 4)).m, want)
    for ac in (False, True):
        torch.testing.assert_close(att.grid(theta, (2, 3, 4), ac),
                                   F.affine_grid(want, (1, 1, 2, 3, 4), align_corners=ac))
        m = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(aff.grid(m, (3, 2, 4), ac),
                                   F.affine_grid(m.view(2, 3, 4), (2, 1, 3, 2, 4), align_corners=ac))


@pytest.mark.parametrize("name", FAMILIES3)
def test_spatial_transform_fused_equals_grid_path(device, name):
    gen = torch.Generator().manual_seed(1)
    family = get_transform(name)
    x = torch.randn(2, 3, 4, 5, 6, generator=gen).to(device).requires_grad_()
    theta = (family.identity() + 0.1 * torch.randn(2, 2, family.num_params, generator=gen)).to(device).requires_grad_()
    size = (3, 4, 5)
    fused = st.spatial_transform(x, theta, name, size, padding_mode="border")
    assert fused.shape == (2, 2, 3, *size)
    grid = family.grid(theta.reshape(4, -1), size).view(2, 2, *size, 3)
    unfused = st.grid_sample(x, grid, padding_mode="border", align_corners=False)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    go = torch.randn(fused.shape, generator=gen).to(device)
    for u, v in zip(torch.autograd.grad(fused, (x, theta), go), torch.autograd.grad(unfused, (x, theta), go)):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * max(1.0, v.abs().max().item()))


@pytest.mark.parametrize("name", FAMILIES3)
def test_spatial_transformer_on_a_volume(device, name):
    """The module on 5-D input: starts at the identity (the default 3-D localisation network), K
    parallel transformers, and trains (gradients reach the regression layer and the input)."""
    torch.manual_seed(0)
    stn = st.SpatialTransformer(transform=name, size=(3, 4, 5), num_transforms=2, return_theta=True).to(device)
    x = torch.randn(2, 2, 6, 7, 8, device=device, requires_grad=True)
    out, theta = stn(x)
    assert out.shape == (2, 2, 2, 3, 4, 5) and theta.shape == (2, 2, stn.family.num_params)
    torch.testing.assert_close(theta, stn.family.identity().to(device).expand_as(theta))
    want = F.grid_sample(x.detach(), F.affine_grid(torch.eye(3, 4, device=device).expand(2, 3, 4), (2, 2, 3, 4, 5),
                                                   align_corners=False), align_corners=False)
    torch.testing.assert_close(out[:, 0], want, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    assert stn.head.weight.grad is not None and stn.head.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    single = st.SpatialTransformer(transform=name).to(device)
    assert single(x.detach()).shape == x.shape  # size None: the input's (D, H, W)


# --- bad input ----------------------------------------------------------------------------------------

X5 = torch.randn(2, 3, 4, 5, 6)
X4 = torch.randn(2, 3, 5, 6)
T34 = torch.eye(3, 4).expand(2, 3, 4)
BAD = [
    ("5-D input, 2-D grid", lambda: st.grid_sample(X5, torch.zeros(2, 3, 3, 2), align_corners=False),
     r"grid: expected shape \(N, Do, Ho, Wo, 3\) .* for a 5-D input, got \(2, 3, 3, 2\); that shape is for a 4-D"),
    ("4-D input, 3-D grid", lambda: st.grid_sample(X4, torch.zeros(2, 3, 3, 3, 3), align_corners=False),
     r"grid: expected shape \(N, Ho, Wo, 2\) .*; that shape is for a 5-D input"),
    ("5-D grid last dim", lambda: st.grid_sample(X5, torch.zeros(2, 3, 3, 3, 4), align_corners=False),
     r"grid: expected shape \(N, Do, Ho, Wo, 3\)"),
    ("5-D grid batch", lambda: st.grid_sample(X5, torch.zeros(3, 1, 1, 1, 3), align_corners=False),
     r"grid: batch size 3"),
    ("theta 2x3 on 5-D", lambda: st.affine_sample(X5, torch.eye(2, 3).expand(2, 2, 3)),
     r"theta: expected affine matrices for a 5-D input of shape \(N, 3, 4\) .*; that shape is for a 4-D input"),
    ("theta 3x4 on 4-D", lambda: st.affine_sample(X4, T34),
     r"theta: expected affine matrices of shape \(N, 2, 3\) .*; that shape is for a 5-D input"),
    ("theta batch", lambda: st.affine_sample(X5, T34[:1]), r"theta: batch size 1 does not match .* 2"),
    ("size pair on 5-D", lambda: st.affine_sample(X5, T34, (3, 4)),
     r"size: expected the output size \(Do, Ho, Wo\) as three ints for a 5-D input"),
    ("size triple on 4-D", lambda: st.affine_sample(X4, torch.eye(2, 3).expand(2, 2, 3), (2, 3, 4)),
     r"size: expected the output size \(Ho, Wo\)"),
    ("size negative", lambda: st.affine_sample(X5, T34, (2, -1, 3)), r"size: expected a non-negative output depth"),
    ("bicubic on 5-D", lambda: st.affine_sample(X5, T34, mode="bicubic"), r"mode: 'bicubic' is for 4-D input only"),
    ("bicubic grid_sample 5-D", lambda: st.grid_sample(X5, torch.zeros(2, 1, 1, 1, 3), "bicubic", align_corners=False),
     r"mode: 'bicubic' is for 4-D input only"),
    ("mode", lambda: st.affine_sample(X5, T34, mode="trilinear"), r"mode: expected one of"),
    ("padding", lambda: st.affine_sample(X5, T34, padding_mode="wrap"), r"padding_mode: expected one of"),
    ("6-D input", lambda: st.affine_sample(X5[None], T34), r"x: expected a 4-D input \(N, C, H, W\) or a 5-D input"),
    ("empty depth", lambda: st.affine_sample(torch.randn(2, 3, 0, 5, 6), T34), r"x: expected non-empty depth"),
    ("projective on 5-D", lambda: st.projective_sample(X5, torch.eye(3).expand(2, 3, 3)),
     r"x: expected a 4-D input \(N, C, H, W\) \(projective_sample has no 3-D form\)"),
    ("basis columns", lambda: st.basis_sample(X5, torch.zeros(2, 3, 4), torch.zeros(4, 10), (2, 2, 3)),
     r"basis: expected shape \(D, Do\*Ho\*Wo\) = \(D, 12\)"),
    ("m 2xD on 5-D", lambda: st.basis_sample(X5, torch.zeros(2, 2, 4), torch.zeros(4, 12), (2, 2, 3)),
     r"m: expected coefficient matrices for D=4 and a 5-D input of shape \(N, 3, 4\)"),
    ("basis no size", lambda: st.basis_sample(X5, torch.zeros(2, 3, 4), torch.zeros(4, 12), None),
     r"size: basis_sample needs the output size \(Do, Ho, Wo\)"),
    ("2-D family on 5-D", lambda: st.spatial_transform(X5, torch.zeros(2, 6), "affine"),
     r"transform: family 'affine' is 2-D; a 5-D x"),
    ("3-D family on 4-D", lambda: st.spatial_transform(X4, torch.zeros(2, 12), "affine3d"),
     r"transform: family 'affine3d' is 3-D .* a 4-D x"),
    ("3-D family theta", lambda: st.spatial_transform(X5, torch.zeros(2, 3), "attention3d"),
     r"theta: family 'attention3d' takes 4 parameters"),
    ("module 2-D family on 5-D", lambda: st.SpatialTransformer(transform="attention")(X5),
     r"transform: family 'attention' is 2-D"),
    ("module 3-D bicubic", lambda: st.SpatialTransformer(transform="affine3d", mode="bicubic"),
     r"mode: 'bicubic' is for 4-D input only"),
]


@pytest.mark.parametrize("call,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(monkeypatch, call, match):
    """A clear error naming the argument, before any kernel runs; ValueError and RuntimeError both
    catch it (PyTorch's grid_sample raises RuntimeError for these)."""
    launched = []
    monkeypatch.setattr(launch, "_run", lambda *a, **k: launched.append(a))
    with pytest.raises(st.ArgumentError, match=match) as err:
        call()
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)
    assert launched == []


def test_pytorch_raises_too_for_5d_bicubic():
    with pytest.raises(RuntimeError):
        F.grid_sample(X5, torch.zeros(2, 1, 1, 1, 3), mode="bicubic", align_corners=False)


# --- > 2^31 elements (GPU) ------------------------------------------------------------------------------

@pytest.mark.gpu
def test_more_than_2_31_elements():
    """64-bit offsets: a volume of 2^31 + elements; sample its far corners, forward and backward."""
    D, H, W = 2, 32769, 32769  # D*H*W > 2^31
    x = torch.zeros(1, 1, D, H, W, device="cuda", dtype=torch.float16)
    x[..., :, :8, :8] = 1.0
    x[..., :, -8:, -8:] = 2.0
    x[..., :, :8, -8:] = 3.0
    theta = torch.eye(3, 4, device="cuda")[None]
    grid = F.affine_grid(theta, (1, 1, 2, 9, 9), align_corners=True)
    want = F.grid_sample(x, grid.half(), align_corners=True)
    got = st.affine_sample(x, theta, (2, 9, 9), align_corners=True)
    torch.testing.assert_close(got, want)
    assert got[0, 0, -1, -1, -1] == 2.0 and got[0, 0, 0, 0, -1] == 3.0
    xg = x.requires_grad_()
    (gx,) = torch.autograd.grad(st.affine_sample(xg, theta, (2, 9, 9), align_corners=True).sum(), xg)
    assert gx[0, 0, -1, -1, -1] == 1.0 and gx[0, 0, 0, 0, 0] == 1.0


def test_static_hints():
    from stn_triton.kernels import launch_volume

    args = {"Wo": 64, "Do": 32, "Ho": 64, "LOG2_TW": 5, "LOG2_CT": 1, "BLOCK_P": 256}
    fwd = launch_volume.static_hints3d("sample3d_fwd_kernel", args, [256 << 1, 2, 4])
    assert fwd == {"programs_with_work": 256 * 2 * 2 * 4}
    bwd = launch_volume.static_hints3d("sample3d_bwd_kernel", args, [64 << 1, 2, 4])
    assert bwd["programs_with_work"] == 64 * 2 * 2 * 4 and bwd["trips"]["0, n_here"] == 4
    gather = launch_volume.static_hints3d("gather_grad_input3d_kernel", {"E": 1000, "D": 2, "H": 5, "W": 10}, [1, 1, 1])
    assert gather["trips"]["0, n_max"] == 10
    assert launch_volume.static_hints3d("sample_fwd_kernel", args, [1, 1, 1]) == {}
