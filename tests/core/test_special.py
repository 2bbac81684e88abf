"""Non-finite coordinates, empty batches, gradcheck, opcheck, torch.compile, determinism, autocast,
bad input, and the >2^31-element case (GPU)."""

import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
from stn_triton import ops
from _cases import (FORMS, FORMS3, MODES, NONFINITE, PADDINGS, TABLE, assert_close, make_params, ndim,
                    nonfinite_params, oracle, run)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("form", FORMS + FORMS3)
def test_nonfinite_parameters(device, form, padding_mode, mode):
    """NaN/inf never read or write out of bounds; the output is PyTorch's (CUDA's): zeros padding
    gives 0, border and reflection clamp, as stn_triton.reference documents; gradients as the
    reference's. In 3-D the grid also holds finite coordinates far past int32 (not under reflection:
    reflected, float32 rounding of such a coordinate is all there is)."""
    shape, _, size = NONFINITE[ndim(form)]
    x = torch.randn(shape, device=device, requires_grad=True)
    huge = ndim(form) == 3 and padding_mode != "reflection"
    params = [p.requires_grad_() for p in nonfinite_params(form, device, huge)]
    opts = dict(mode=mode, padding_mode=padding_mode, align_corners=False)
    out = run(form, x, params, size, **opts)
    ref, x64, p64 = oracle(form, x, params, size, **opts)
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, "output")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, *params), grad_out)
    want = torch.autograd.grad(ref, (x64, *p64), grad_out.double().cpu())
    assert_close(got[0], want[0], torch.float32, "grad x")
    for g, w in zip(got[1:], want[1:]):
        assert_close(g, w, torch.float32, "grad params", scale_by_max=True, equal_nan=True)


def test_reference_skips_sanitizing_ordinary_grids_only():
    """The reference path's shortcut: a CPU grid of finite coordinates within reach is sampled as it is
    (the very tensor); one NaN, inf or coordinate beyond 2^30 pixels anywhere takes the full rules,
    in 2-D and 3-D, and the outputs equal PyTorch's for the ordinary grid."""
    from stn_triton import reference

    g = torch.rand(2, 1, 5, 6, 2) * 8 - 4  # out of range, but finite and near
    assert reference._sanitize(g, (7, 8), "zeros", False) == (g, None)
    assert reference._sanitize(g, (7, 8), "border", True)[0] is g
    for bad in (float("nan"), float("inf"), -float("inf"), 2.0 ** 30):
        h = g.clone()
        h[1, 0, 4, 5, 1] = bad
        s, ok = reference._sanitize(h, (7, 8), "zeros", False)
        assert s is not h and not ok[1, 0, 4, 5] and ok.sum() == ok.numel() - 1
        assert reference._sanitize(h, (7, 8), "reflection", False)[0] is not h
    g3 = torch.rand(1, 1, 2, 3, 4, 3) * 4 - 2
    assert reference._sanitize(g3, (3, 4, 5), "zeros", True) == (g3, None)
    g3[0, 0, 1, 2, 3, 2] = float("nan")
    assert reference._sanitize(g3, (3, 4, 5), "zeros", True)[1] is not None
    assert reference._sanitize(torch.empty(0, 1, 2, 2, 2), (3, 3), "zeros", False)[1] is not None
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    out = reference.sample(x, g.double(), "bilinear", "zeros", False)
    want = F.grid_sample(x, g.double()[:, 0], align_corners=False)
    assert torch.equal(out[:, 0], want)


@pytest.mark.parametrize("form", ["affine", "affine3d"])
def test_zeros_padding_nan_gives_zero(device, form):
    """NaN coordinates with zeros padding read nothing: 0, and only where the NaN is."""
    n = ndim(form)
    x = torch.randn(1, 2, *((4, 5) if n == 2 else (3, 4, 5)), device=device)
    assert (st.affine_sample(x, torch.full((1, n, n + 1), float("nan"), device=device)) == 0).all()
    if n == 2:
        grid = torch.zeros(1, 3, 3, 2, device=device)
        grid[0, 1, 1, 0] = float("nan")
        out = st.grid_sample(x, grid, align_corners=False)
        assert out[0, :, 1, 1].eq(0).all() and out[0, :, 0, 0].ne(0).all()
    else:
        grid = torch.zeros(1, 2, 2, 2, 3, device=device)
        grid[0, 1, 0, 1, 2] = float("nan")
        out = st.grid_sample(x, grid, align_corners=False)
        assert out[0, :, 1, 0, 1].eq(0).all() and out[0, :, 0, 0, 0].ne(0).all()


@pytest.mark.parametrize("form", FORMS)
def test_empty_batch(device, form):
    x = torch.randn(0, 3, 6, 7, device=device, requires_grad=True)
    params = [p.requires_grad_() for p in make_params(form, 0, 2, (4, 5), False, torch.float32, device,
                                                       torch.Generator().manual_seed(0))]
    out = run(form, x, params, (4, 5))
    assert out.shape == (0, 2, 3, 4, 5)
    grads = torch.autograd.grad(out.sum(), (x, *params))
    for g, t in zip(grads, (x, *params)):
        assert g.shape == t.shape


# per dimension: (input shape, output size)
GRADCHECK = {2: ((1, 2, 5, 6), (3, 4)), 3: ((1, 2, 3, 4, 5), (2, 3, 3))}


@pytest.mark.parametrize("form", FORMS + FORMS3)
def test_gradcheck_float64(form):
    """float64 takes the reference path on every device: gradcheck through the public functions."""
    shape, size = GRADCHECK[ndim(form)]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    params = [p.double().requires_grad_() for p in make_params(form, 1, 2, size, False, torch.float32, "cpu", gen)]
    assert st.backend(x) == "reference"
    for padding_mode in PADDINGS:
        fn = lambda x, *p: run(form, x, p, size, padding_mode=padding_mode, align_corners=False)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


# per form: (input shape, K, output size, the (mode, padding_mode, align_corners) checked)
# (the op's registration is one per form; its mode, padding and align_corners are arguments: one
# combination per form, the combinations alternating over the forms)
OPCHECK = {form: ((2, 3, 6, 7), 2, (4, 5), ((("bilinear", "zeros", False), ("nearest", "reflection", True))[i % 2],))
           for i, form in enumerate(FORMS)}
OPCHECK.update({"affine3d": ((1, 2, 3, 3, 4), 2, (2, 2, 3), (("bilinear", "zeros", False),)),
                "basis3d": ((1, 2, 3, 3, 4), 2, (2, 2, 3), (("nearest", "reflection", True),)),
                "grid3d": ((1, 2, 3, 3, 4), 2, (2, 2, 3), (("bilinear", "border", True),))})


@pytest.mark.parametrize("form", OPCHECK)
def test_opcheck(device, form):
    fwd, bwd = ops.OPS[form]
    assert fwd._qualname == f"stn_triton::{form}_sample" and bwd._qualname == f"stn_triton::{form}_sample_backward"
    shape, K, size, combos = OPCHECK[form]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    params = [p.requires_grad_() for p in make_params(form, shape[0], K, size, False, torch.float32, device, gen)]
    for mode, padding_mode, ac in combos:
        torch.library.opcheck(fwd, (x, *params, list(size), mode, padding_mode, ac))
        grad = torch.randn(shape[0], K, shape[1], *size, generator=gen).to(device)
        needs = [True] * (1 + len(params))
        torch.library.opcheck(bwd, (grad, x.detach(), *[p.detach() for p in params], list(size), mode, padding_mode,
                                    ac, needs),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# per dimension: (input shape, output size, the localisation layer's bias: theta at the start)
COMPILE = {
    2: ((2, 3, 8, 9), (5, 6), [0.9, 0.1, 0.05, -0.1, 1.1, 0.0]),
    3: ((2, 2, 3, 4, 5), (2, 3, 4), [0.9, 0.1, 0.0, 0.05, -0.1, 1.1, 0.0, 0.0, 0.0, 0.1, 0.95, -0.1]),
}


@pytest.mark.parametrize("n", COMPILE, ids=["2d", "3d"])
def test_torch_compile_fullgraph(device, n):
    shape, size, bias = COMPILE[n]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Linear(torch.Size(shape[1:]).numel(), n * (n + 1))
            torch.nn.init.zeros_(self.loc.weight)
            with torch.no_grad():
                self.loc.bias.copy_(torch.tensor(bias))

        def forward(self, x):
            theta = self.loc(x.flatten(1)).view(-1, n, n + 1)
            return st.affine_sample(x, theta, size).square().mean()

    torch._dynamo.reset()
    net = Net().to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(x)
    gx, gw = torch.autograd.grad(loss, (x, net.loc.bias))
    loss_e = net(x)
    gx_e, gw_e = torch.autograd.grad(loss_e, (x, net.loc.bias))
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(gx, gx_e)
    torch.testing.assert_close(gw, gw_e)


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


# per dimension: (input shape, K, output size): a zoom-in, ~100 writes per input pixel in 2-D, tens per
# input voxel in 3-D (8 per output voxel trilinear)
DETERMINISTIC = {2: ((2, 3, 6, 7), 2, (32, 36)), 3: ((2, 3, 3, 4, 4), 1, (6, 7, 8))}


# every form bilinear; nearest (the same gather, one tap per pixel) in one form of each dimension
# (the affine forms' bilinear gradient is gathered through the inverse map: tests/core/test_inverse.py)
DETERMINISTIC_CASES = [(form, "bilinear") for form in FORMS + FORMS3 if TABLE[form].kind != "affine"]
DETERMINISTIC_CASES += [("affine", "nearest"), ("basis3d", "nearest")]


@pytest.mark.parametrize("form,mode", DETERMINISTIC_CASES, ids=[f"{f}-{m}" for f, m in DETERMINISTIC_CASES])
def test_deterministic_backward(device, deterministic, form, mode):
    """Bit-identical gradients on repeated runs under deterministic mode, and the sorted-gather path
    agrees with the reference."""
    shape, K, size = DETERMINISTIC[ndim(form)]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    params = [p.requires_grad_() for p in make_params(form, shape[0], K, size, False, torch.float32, device, gen, 0.1)]
    grad_out = torch.randn(shape[0], K, shape[1], *size, generator=gen).to(device)

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


def test_deterministic_channels_last_bf16(device, deterministic):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 5, 6, generator=gen).to(device, torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    (theta,) = make_params("affine", 1, 1, (11, 13), True, torch.float32, device, gen, 0.3)
    out = st.affine_sample(x, theta[:, 0], (11, 13), align_corners=True, padding_mode="border")
    grad_out = torch.randn(out.shape, generator=gen).to(device, torch.bfloat16)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    assert gx.dtype == torch.bfloat16 and gx.is_contiguous(memory_format=torch.channels_last)
    ref, x64, p64 = oracle("affine", x, (theta,), (11, 13), "bilinear", "border", True)
    (want,) = torch.autograd.grad(ref, x64, grad_out.double().cpu()[:, None])
    assert_close(gx, want, torch.bfloat16, "grad x")


@pytest.mark.parametrize("form", ["affine", "affine3d"])
def test_input_grad_skipped_when_not_required(device, monkeypatch, form):
    from stn_triton.kernels import launch

    seen = {}
    real = launch.sample_backward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "sample_backward", spy)
    n = ndim(form)
    x = torch.randn(1, 2, *((5, 6) if n == 2 else (3, 4, 5)), device=device)
    theta = torch.eye(n, n + 1, device=device)[None].requires_grad_()
    (g,) = torch.autograd.grad(st.affine_sample(x, theta).sum(), theta)
    assert seen["need_x"] is False and seen["need_param"] is True
    assert torch.isfinite(g).all()


# per dimension: (input shape, output size)
AUTOCAST = {2: ((2, 3, 6, 7), (4, 5)), 3: ((2, 3, 3, 4, 5), (2, 3, 4))}


@pytest.mark.parametrize("form", ["affine", "affine3d"])
def test_autocast_samples_in_low_precision_keeps_theta_fp32(device, form):
    n = ndim(form)
    shape, size = AUTOCAST[n]
    x = torch.randn(shape, device=device)
    theta = (torch.eye(n, n + 1, device=device) * 0.9)[None].repeat(2, 1, 1).requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = st.affine_sample(x, theta, size)
    assert out.dtype == torch.bfloat16
    (g,) = torch.autograd.grad(out.float().sum(), theta)
    assert g.dtype == torch.float32
    ref, _, _ = oracle(form, x.to(torch.bfloat16), (theta.detach()[:, None],), size, "bilinear", "zeros", False)
    assert_close(out, ref[:, 0], torch.bfloat16, "autocast output")


def test_spatial_transformer_regresses_theta_in_float32_under_autocast(device):
    """Under bfloat16 autocast, and in a bfloat16 model without it, the module's regression layer
    computes theta in float32 from the localisation network's (bfloat16) features, as the ops then
    use it: a bfloat16 theta would be a step of 2**-8 of the output's half-width; the output is
    sampled in bfloat16."""
    loc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 7, 32))
    m = st.SpatialTransformer(loc, size=(4, 5), return_theta=True).to(device)
    x = torch.randn(2, 3, 6, 7, device=device)
    m(x)  # materialise the regression layer
    with torch.no_grad():
        m.head.weight.normal_(0, 1e-2)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out, theta = m(x)
        feats = m.localization(x)
    assert feats.dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and theta.dtype == torch.float32
    want = torch.nn.functional.linear(feats.float(), m.head.weight, m.head.bias)
    torch.testing.assert_close(theta, want, rtol=1e-6, atol=1e-6)
    assert (theta - want.bfloat16().float()).abs().max() > 0  # what a bfloat16 layer would have rounded
    (g,) = torch.autograd.grad(out.float().sum(), m.head.weight)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    for dtype in (torch.bfloat16, torch.float64):  # a model in another dtype: theta in at least float32
        other = m.to(dtype)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out, theta = other(x.to(dtype))
        want = torch.promote_types(dtype, torch.float32)
        assert theta.dtype == want and torch.isfinite(out).all()
        feats = other.localization(x.to(dtype)).to(want)
        torch.testing.assert_close(theta, torch.nn.functional.linear(feats, other.head.weight.to(want),
                                                                     other.head.bias.to(want)))
    half = m.to(torch.bfloat16)  # without autocast too: a bfloat16 model's theta is float32, its output bfloat16
    out, theta = half(x.to(torch.bfloat16))
    assert theta.dtype == torch.float32 and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    feats = half.localization(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(theta, torch.nn.functional.linear(feats, half.head.weight.float(), half.head.bias.float()))


def test_backend_selection(device, monkeypatch):
    x = torch.randn(1, 1, 2, 2, device=device)
    assert st.backend(x) == ("triton" if device == "cuda" else "interpreter")
    assert st.backend(x.double()) == "reference"
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")
    assert st.backend(x) == "reference"
    theta = torch.eye(2, 3, device=device)[None]
    torch.testing.assert_close(st.affine_sample(x, theta), x)


# ----- bad input ------------------------------------------------------------------------------------

X = torch.randn(2, 3, 5, 6)
THETA = torch.eye(2, 3).expand(2, 2, 3)
BAD = [
    ("x not 4-D", lambda: st.affine_sample(X[0], THETA), ValueError, r"x: expected a 4-D input"),
    ("x integer", lambda: st.affine_sample(X.long(), THETA), TypeError, r"x: expected a floating-point"),
    ("input bool", lambda: st.grid_sample(X > 0, torch.zeros(2, 3, 3, 2)), TypeError, r"input: expected a floating-point"),
    ("x not a tensor", lambda: st.affine_sample(X.numpy(), THETA), TypeError, r"x: expected a torch.Tensor"),
    ("theta shape", lambda: st.affine_sample(X, torch.zeros(2, 3, 3)), ValueError, r"theta: expected .*\(N, 2, 3\)"),
    ("theta batch", lambda: st.affine_sample(X, THETA[:1]), ValueError, r"theta: batch size 1 does not match .* 2"),
    ("theta integer", lambda: st.affine_sample(X, THETA.int()), TypeError, r"theta: expected a floating-point"),
    ("h shape", lambda: st.projective_sample(X, THETA), ValueError, r"h: expected homographies of shape \(N, 3, 3\)"),
    ("basis columns", lambda: st.basis_sample(X, torch.zeros(2, 2, 4), torch.zeros(4, 10), (3, 4)), ValueError,
     r"basis: expected shape \(D, Ho\*Wo\) = \(D, 12\)"),
    ("m vs basis", lambda: st.basis_sample(X, torch.zeros(2, 2, 5), torch.zeros(4, 12), (3, 4)), ValueError,
     r"m: expected coefficient matrices for D=4 of shape \(N, 2, 4\)"),
    ("basis no size", lambda: st.basis_sample(X, torch.zeros(2, 2, 4), torch.zeros(4, 12), None), ValueError,
     r"size: basis_sample needs the output size"),
    ("basis integer", lambda: st.basis_sample(X, torch.zeros(2, 2, 4), torch.zeros(4, 12, dtype=torch.int32), (3, 4)),
     TypeError, r"basis: expected a floating-point"),
    ("grid shape", lambda: st.grid_sample(X, torch.zeros(2, 3, 3)), ValueError, r"grid: expected shape \(N, Ho, Wo, 2\)"),
    ("grid batch", lambda: st.grid_sample(X, torch.zeros(3, 3, 3, 2)), ValueError, r"grid: batch size 3"),
    ("size negative", lambda: st.affine_sample(X, THETA, -3), ValueError, r"size: expected a non-negative"),
    ("size triple", lambda: st.affine_sample(X, THETA, (2, 3, 4)), ValueError, r"size: expected the output size"),
    ("mode", lambda: st.affine_sample(X, THETA, mode="bilinearish"), ValueError, r"mode: expected one of"),
    ("padding", lambda: st.affine_sample(X, THETA, padding_mode="wrap"), ValueError, r"padding_mode: expected one of"),
    ("align_corners", lambda: st.affine_sample(X, THETA, align_corners=1), TypeError, r"align_corners: expected a bool"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_devices_must_match():
    if not torch.cuda.is_available():
        theta = torch.eye(2, 3, device="meta").expand(2, 2, 3)
    else:
        theta = THETA.cuda()
    with pytest.raises(ValueError, match=r"theta: expected a tensor on cpu"):
        st.affine_sample(X, theta)


@pytest.mark.gpu
def test_atomic_backward_is_really_nondeterministic():
    """The default backward accumulates the input's gradient with atomics, in whatever order the GPU
    runs them: a heavily contended case (6 x 7 inputs zoomed to 256 x 256, about 1,500 writes per
    input pixel, float32) gives gradients that differ somewhere in the last bits between repeated
    runs. If they never do, either the atomics are not used or the deterministic mode is a no-op
    distinction: both worth knowing."""
    torch.use_deterministic_algorithms(False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 6, 7, generator=gen).cuda().requires_grad_()
    theta = (torch.tensor([[0.9, 0.1, 0.05], [-0.1, 0.9, 0.0]]) + 0.02 * torch.randn(4, 2, 3, generator=gen)).cuda()
    grad_out = torch.randn(4, 8, 256, 256, generator=gen).cuda()
    grads = [torch.autograd.grad(st.affine_sample(x, theta, (256, 256)), x, grad_out)[0] for _ in range(20)]
    assert any(not torch.equal(grads[0], g) for g in grads[1:])
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])  # the same up to summation order


@pytest.mark.gpu
def test_more_than_2_31_elements():
    """64-bit offsets: an input of 2^31 + elements; sample its far corners."""
    H, W = 46341, 46341  # H*W > 2^31
    x = torch.empty(1, 1, H, W, device="cuda", dtype=torch.float16)
    x[..., :8, :8] = 1.0
    x[..., -8:, -8:] = 2.0
    x[..., :8, -8:] = 3.0
    theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], device="cuda").requires_grad_()
    grid = F.affine_grid(theta.detach(), (1, 1, 9, 9), align_corners=True)
    want = F.grid_sample(x, grid.half(), align_corners=True)
    got = st.affine_sample(x, theta, (9, 9), align_corners=True)
    torch.testing.assert_close(got, want)
    assert got[0, 0, -1, -1] == 2.0 and got[0, 0, 0, -1] == 3.0
    xg = x.requires_grad_()
    (gx,) = torch.autograd.grad(st.affine_sample(xg, theta.detach(), (9, 9), align_corners=True).sum(), xg)
    assert gx[0, 0, -1, -1] == 1.0


def test_ops_run_the_reference_when_forced(device, monkeypatch):
    """The ops themselves work on the reference path too, in the layout their fake promises."""
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")
    x = torch.randn(2, 3, 5, 6, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    theta = (torch.eye(2, 3, device=device) * 0.8).expand(2, 1, 2, 3).clone().requires_grad_()
    out = torch.ops.stn_triton.affine_sample(x, theta, [4, 5], "bilinear", "border", False)
    assert out.stride(2) == 1
    ref, x64, p64 = oracle("affine", x, (theta,), (4, 5), "bilinear", "border", False)
    assert_close(out, ref, torch.float32, "output")
    gx, gt = torch.autograd.grad(out.sum(), (x, theta))
    wx, wt = torch.autograd.grad(ref.sum(), (x64, p64[0]))
    assert_close(gx, wx, torch.float32, "grad x")
    assert_close(gt, wt, torch.float32, "grad theta", scale_by_max=True)
