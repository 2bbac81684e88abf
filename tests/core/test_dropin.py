"""``st.grid_sample`` as a drop-in for ``F.grid_sample`` (4-D, bilinear and nearest), judged the way
PyTorch's own tests judge ``grid_sample`` (test/test_nn.py and the OpInfo samples), written in our
words and run on the kernels (Triton's interpreter in the suite), not only on the float64 reference:
signature, error types, empty tensors, ground truth against a direct computation, pixel-centre
gradients, non-finite and huge coordinates, rotations against SciPy, OpInfo-style samples with
gradients and second derivatives."""

import inspect
import itertools
import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
from stn_triton.kernels import launch
from _cases import FORMS, MODES, PADDINGS, assert_second, make_params, run

ALIGN = (False, True)


# --- signature -----------------------------------------------------------------------------------------

def test_signature_is_pytorchs():
    ours, theirs = inspect.signature(st.grid_sample), inspect.signature(F.grid_sample)
    assert list(ours.parameters) == list(theirs.parameters)
    for name, p in theirs.parameters.items():
        assert ours.parameters[name].default == p.default, name


def test_keywords_and_align_corners_none(device):
    x = torch.randn(2, 3, 5, 6, device=device)
    g = torch.rand(2, 4, 3, 2, device=device) * 2 - 1
    with pytest.warns(UserWarning, match="Default grid_sample and affine_grid behavior has changed") as ours:
        a = st.grid_sample(input=x, grid=g)
    with pytest.warns(UserWarning) as theirs:
        F.grid_sample(input=x, grid=g)
    assert str(ours[0].message) == str(theirs[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit align_corners does not warn
        b = st.grid_sample(x, g, "bilinear", "zeros", False)
        st.affine_sample(x, torch.eye(2, 3, device=device).expand(2, 2, 3), align_corners=None)  # ours: None is False
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- errors: the types PyTorch's checks raise catch ours -------------------------------------------------

X, G = torch.randn(2, 3, 5, 6), torch.zeros(2, 4, 3, 2)
BAD = {
    "batch": (X, torch.zeros(3, 4, 3, 2), {}),
    "grid last dim": (X, torch.zeros(2, 4, 3, 3), {}),
    "input 3-D": (X[0], G, {}),
    "empty spatial": (torch.randn(2, 3, 0, 6), G, {}),
    "mode": (X, G, {"mode": "garbage"}),
    "padding": (X, G, {"padding_mode": "garbage"}),
    "integer input": (X.long(), G.long(), {}),
    "align_corners int": (X, G, {"align_corners": 1}),
    "input not a tensor": ([1.0], G, {}),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_errors_are_caught_as_pytorchs_are(case):
    x, g, kw = BAD[case]
    kw = {"align_corners": False, **kw}
    with pytest.raises(Exception) as theirs:
        F.grid_sample(x, g, **kw)
    with pytest.raises(Exception) as ours:
        st.grid_sample(x, g, **kw)
    # whatever PyTorch raises (RuntimeError, its NotImplementedError, ValueError, TypeError), the
    # except clause written for it catches ours; and ours is always both a ValueError and a RuntimeError
    base = next(t for t in (TypeError, ValueError, RuntimeError) if isinstance(theirs.value, t))
    assert isinstance(ours.value, base), (type(theirs.value), type(ours.value))
    assert isinstance(ours.value, ValueError) and isinstance(ours.value, RuntimeError)
    assert isinstance(ours.value, (st.ArgumentError, st.ArgumentTypeError))


def test_other_functions_raise_the_same_types():
    with pytest.raises(RuntimeError, match=r"theta: batch size 1"):
        st.affine_sample(X, torch.eye(2, 3)[None])
    with pytest.raises(RuntimeError, match=r"size: expected a non-negative"):
        st.affine_sample(X, torch.eye(2, 3).expand(2, 2, 3), (-1, 3))
    with pytest.raises(RuntimeError, match=r"theta: family 'tps' takes 32 parameters"):
        st.spatial_transform(X, torch.zeros(2, 6), "tps")


def test_grid_of_another_dtype_is_accepted(device):
    """PyTorch wants the grid in the input's dtype; ours samples a bf16 map at float32 coordinates."""
    x = torch.randn(2, 3, 9, 10, device=device).to(torch.bfloat16)
    g = torch.rand(2, 4, 5, 2, device=device) * 2 - 1
    want = F.grid_sample(x.double(), g.double(), align_corners=False)
    torch.testing.assert_close(st.grid_sample(x, g, align_corners=False).double(), want, rtol=1.6e-2, atol=1.6e-2)


# --- empty tensors -----------------------------------------------------------------------------------------

EMPTY = {"Ho=0": (2, 3, 0, 4, 2), "Wo=0": (2, 3, 4, 0, 1), "N=0": (0, 3, 4, 4, 2), "C=0": (2, 0, 4, 4, 2),
         "K=0": (2, 3, 4, 4, 0)}


@pytest.mark.parametrize("case", EMPTY, ids=list(EMPTY))
@pytest.mark.parametrize("form", FORMS)
def test_empty_outputs_launch_nothing(device, monkeypatch, form, case):
    N, C, Ho, Wo, K = EMPTY[case]
    launched = []
    monkeypatch.setattr(launch, "_run", lambda *a, **k: launched.append(a))
    x = torch.randn(N, C, 5, 6, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    if form == "basis":
        params = [torch.randn(N, K, 2, 4, generator=gen).to(device), torch.randn(4, Ho * Wo, generator=gen).to(device)]
    elif form == "grid":
        params = [torch.rand(N, K, Ho, Wo, 2, generator=gen).to(device)]
    else:
        params = list(make_params(form, N, K, (max(Ho, 1), max(Wo, 1)), False, torch.float32, device, gen)[:1])
    params = [p.requires_grad_() for p in params]
    out = run(form, x, params, (Ho, Wo), align_corners=False)
    assert out.shape == (N, K, C, Ho, Wo)
    grads = torch.autograd.grad(out.sum(), (x, *params))
    for g, t in zip(grads, (x, *params)):
        assert g.shape == t.shape and not g.any()
    assert launched == []


def test_empty_grid_like_pytorch(device):
    x = torch.randn(2, 3, 5, 6, device=device, requires_grad=True)
    g = torch.zeros(2, 0, 4, 2, device=device, requires_grad=True)
    out = st.grid_sample(x, g, align_corners=False)
    assert out.shape == F.grid_sample(x, g, align_corners=False).shape == (2, 3, 0, 4)
    gx, gg = torch.autograd.grad(out.sum(), (x, g))
    assert gx.shape == x.shape and gg.shape == g.shape and not gx.any()


# --- ground truth against a direct computation ------------------------------------------------------------

def _direct(x, grid, mode, padding_mode, align_corners):
    """grid_sample by the book, one output pixel at a time, in float64 Python arithmetic."""
    x = x.double()
    N, C, H, W = x.shape
    Ho, Wo = grid.shape[1:3]
    out = torch.zeros(N, C, Ho, Wo, dtype=torch.float64)

    def unnormalize(g, size):
        return (g + 1) / 2 * (size - 1) if align_corners else ((g + 1) * size - 1) / 2

    def pad(i, size):
        if padding_mode == "border":
            return min(max(i, 0.0), size - 1.0)
        if padding_mode == "reflection":
            lo, span = (0.0, size - 1.0) if align_corners else (-0.5, float(size))
            if span <= 0:
                return 0.0
            t = abs(i - lo)
            flips, extra = math.floor(t / span), math.fmod(t, span)
            r = extra + lo if flips % 2 == 0 else span - extra + lo
            return min(max(r, 0.0), size - 1.0)
        return i

    def at(n, c, yy, xx):
        return x[n, c, yy, xx].item() if 0 <= yy < H and 0 <= xx < W else 0.0

    for n, i, j in itertools.product(range(N), range(Ho), range(Wo)):
        gx, gy = (float(v) for v in grid[n, i, j])
        ix, iy = pad(unnormalize(gx, W), W), pad(unnormalize(gy, H), H)
        for c in range(C):
            if mode == "nearest":
                out[n, c, i, j] = at(n, c, round(iy), round(ix))  # Python's round: halves to even
            else:
                x0, y0 = math.floor(ix), math.floor(iy)
                tx, ty = ix - x0, iy - y0
                out[n, c, i, j] = ((1 - tx) * (1 - ty) * at(n, c, y0, x0) + tx * (1 - ty) * at(n, c, y0, x0 + 1)
                                   + (1 - tx) * ty * at(n, c, y0 + 1, x0) + tx * ty * at(n, c, y0 + 1, x0 + 1))
    return out


@pytest.mark.parametrize("align_corners", ALIGN, ids=["ac0", "ac1"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_against_a_direct_computation(device, mode, padding_mode, align_corners):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{mode}{padding_mode}{align_corners}".encode()))
    x = torch.randn(2, 2, 4, 5, generator=gen)
    grid = torch.rand(2, 3, 6, 2, generator=gen) * 3 - 1.5  # a third outside the image
    ours = st.grid_sample(x.to(device), grid.to(device), mode, padding_mode, align_corners)
    torch.testing.assert_close(ours.double().cpu(), _direct(x, grid.double(), mode, padding_mode, align_corners),
                               rtol=1e-5, atol=1e-5)


# --- pixel centres: the grids users make most -------------------------------------------------------------

@pytest.mark.parametrize("align_corners", ALIGN, ids=["ac0", "ac1"])
@pytest.mark.parametrize("sizes", [(5, 5, 5, 5), (7, 9, 7, 9), (8, 8, 16, 16), (16, 12, 8, 6), (31, 29, 31, 29)],
                         ids=lambda s: "x".join(map(str, s)))
def test_pixel_centre_gradients_match_pytorch(device, sizes, align_corners):
    """Identity and zoom-by-2 grids put sampling points on pixel centres, where the gradient of the
    grid jumps: the source index must round as PyTorch's does to pick the same pair of neighbours
    (e.g. W=5, g=-0.8: ((g + 1) * W - 1) / 2 is just below 0, a fused g * 2.5 + 2 exactly 0)."""
    H, W, Ho, Wo = sizes
    gen = torch.Generator().manual_seed(H * 100 + W)
    x = torch.randn(1, 2, H, W, generator=gen).to(device)
    grid = F.affine_grid(torch.eye(2, 3, device=device)[None], (1, 2, Ho, Wo), align_corners=align_corners)
    for padding_mode in PADDINGS:
        ours_g, theirs_g = grid.clone().requires_grad_(), grid.clone().requires_grad_()
        ours = st.grid_sample(x, ours_g, padding_mode=padding_mode, align_corners=align_corners)
        theirs = F.grid_sample(x, theirs_g, padding_mode=padding_mode, align_corners=align_corners)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        gout = torch.randn(ours.shape, generator=gen).to(device)
        (a,) = torch.autograd.grad(ours, ours_g, gout)
        (b,) = torch.autograd.grad(theirs, theirs_g, gout)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{padding_mode}: {m}")


def test_the_reported_case(device):
    x = torch.ones(1, 1, 1, 5, device=device)
    for g in (torch.tensor([[[[-0.8, 0.0]]]], device=device), torch.tensor([[[[-0.4, 0.0]]]], device=device)):
        a, b = g.clone().requires_grad_(), g.clone().requires_grad_()
        (ga,) = torch.autograd.grad(st.grid_sample(x, a, align_corners=False).sum(), a)
        (gb,) = torch.autograd.grad(F.grid_sample(x, b, align_corners=False).sum(), b)
        assert torch.equal(ga, gb)


# --- non-finite and huge coordinates ------------------------------------------------------------------------

@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_nan_inf_and_huge_coordinates(device, mode, padding_mode):
    """Nothing is read or written out of bounds and the result is finite; huge but finite
    coordinates (far past int32 once unnormalised) behave as PyTorch's."""
    x = torch.rand(1, 2, 48, 64, device=device, requires_grad=True)
    special = torch.tensor([[float("nan"), 0.0], [0.0, float("inf")], [-float("inf"), float("nan")],
                            [-10059144.0, 67680944.0], [67680944.0, 67680944.0], [3e38, -3e38]], device=device)
    grid = special.view(1, 2, 3, 2).requires_grad_()
    out = st.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    assert torch.isfinite(out).all()
    gx, gg = torch.autograd.grad(out.sum(), (x, grid))
    assert torch.isfinite(gx).all() and torch.isfinite(gg).all()
    huge = special[3:5].view(1, 1, 2, 2)  # the finite huge ones (PyTorch's issue 35202)
    torch.testing.assert_close(st.grid_sample(x.detach(), huge, mode, padding_mode, False),
                               F.grid_sample(x.detach(), huge, mode, padding_mode, False))


# --- rotations against SciPy ----------------------------------------------------------------------------

@pytest.mark.parametrize("angle", [0.0, 90.0, 45.0, 137.5])
def test_rotations_against_scipy(device, angle):
    """affine_sample with a rotation about the centre, align_corners=True (normalised +-1 at the
    corner pixels' centres), equals scipy.ndimage.affine_transform with linear interpolation and
    zeros outside, on a square image."""
    ndimage = pytest.importorskip("scipy.ndimage")
    S = 9
    gen = torch.Generator().manual_seed(int(angle * 10))
    img = torch.rand(S, S, generator=gen, dtype=torch.float64)
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])
    ours = st.affine_sample(img.float()[None, None].to(device), theta.to(device), (S, S), align_corners=True)
    # scipy maps output (row, col) to input matrix @ (row, col) + offset; rows are y, columns x
    c = (S - 1) / 2
    matrix = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64)
    offset = torch.tensor([c, c], dtype=torch.float64) - matrix @ torch.tensor([c, c], dtype=torch.float64)
    # "grid-constant": zeros beyond the edge take part in the interpolation, as zeros padding does
    want = ndimage.affine_transform(img.numpy(), matrix.numpy(), offset=offset.numpy(), order=1,
                                    mode="grid-constant", cval=0.0)
    torch.testing.assert_close(ours[0, 0].double().cpu(), torch.from_numpy(want), rtol=1e-5, atol=1e-5)


# --- OpInfo-style samples: dtypes, layouts, gradients, second derivatives -------------------------------

def _sample(gen, device, dtype, non_contiguous):
    x = (torch.rand(2, 3, 5, 5, generator=gen) * 4 - 2).to(device)
    g = (torch.rand(2, 5, 5, 2, generator=gen) * 4 - 2).to(device)
    if non_contiguous:  # a transposed input and a strided grid, as OpInfo's noncontiguous variants
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        g = torch.cat([g, g], dim=2)[:, :, ::2]
        assert not x.is_contiguous() and not g.is_contiguous()
    return x.to(dtype), g.to(dtype)


@pytest.mark.parametrize("align_corners", ALIGN, ids=["ac0", "ac1"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_opinfo_samples(device, mode, padding_mode, align_corners):
    """Forward in each kernel dtype against PyTorch in float64; the first and second derivatives
    (input and grid) against PyTorch's, with the kernels running the first order."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"opinfo{mode}{padding_mode}{align_corners}".encode()))
    opts = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        for nc in (False, True):
            x, g = _sample(gen, device, dtype, nc)
            want = F.grid_sample(x.double(), g.double(), **opts)
            # tolerance relative to the values (inputs in [-2, 2]); the grid's own rounding in half precision too
            scale = 4 if dtype != torch.float32 else 1
            torch.testing.assert_close(st.grid_sample(x, g, **opts).double(), want, rtol=tol * scale, atol=tol * scale)
    x, g = _sample(gen, device, torch.float32, True)
    x.requires_grad_(), g.requires_grad_()
    out = st.grid_sample(x, g, **opts)
    x64, g64 = x.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    ref = F.grid_sample(x64, g64, **opts)
    w = torch.randn(out.shape, generator=gen).to(device)
    first = torch.autograd.grad(out, (x, g), w, create_graph=True)
    first64 = torch.autograd.grad(ref, (x64, g64), w.double(), create_graph=True)
    for a, b in zip(first, first64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))
    v = [torch.randn(t.shape, generator=gen).to(device) for t in first]
    second = torch.autograd.grad(first, (x, g), v, allow_unused=True)
    second64 = torch.autograd.grad(first64, (x64, g64), [t.double() for t in v], allow_unused=True)
    assert_second(second, second64)


@pytest.mark.parametrize("form", FORMS)
def test_double_backward_every_form(device, form):
    """Second derivatives through the kernels for x and every transform's parameters, against the
    float64 reference's (plain autograd)."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(2, 3, 6, 7, generator=gen).to(device).requires_grad_()
    params = [p.requires_grad_() for p in make_params(form, 2, 2, (4, 5), False, torch.float32, device, gen)]
    out = run(form, x, params, (4, 5), align_corners=False)
    w = torch.randn(out.shape, generator=gen).to(device)
    first = torch.autograd.grad(out, (x, *params), w, create_graph=True)
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    from stn_triton import reference

    ref = reference.form_sample(form, x64, p64, (4, 5), "bilinear", "zeros", False)
    first64 = torch.autograd.grad(ref, (x64, *p64), w.double(), create_graph=True)
    v = [torch.randn(t.shape, generator=gen).to(device) for t in first]
    second = torch.autograd.grad(first, (x, *params), v, allow_unused=True)
    second64 = torch.autograd.grad(first64, (x64, *p64), [t.double() for t in v], allow_unused=True)
    assert_second(second, second64)


def test_gradgradcheck_reference():
    """On the float64 reference path: gradgradcheck through the public function."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    g = (torch.rand(1, 3, 3, 2, dtype=torch.float64, generator=gen) * 2.2 - 1.1).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: st.grid_sample(a, b, align_corners=False), (x, g))
