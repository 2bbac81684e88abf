"""Volumetric (5-D) spatial transformers: every 3-D form (affine3d, basis3d, grid3d) on the kernels
(Triton's interpreter on CPU) against PyTorch's ``F.affine_grid`` / ``F.grid_sample`` in float64 on
the same coordinates, forward and every gradient: the 3-D matrix, half precision, odd and one-voxel
sizes, half-voxel rounding, empty tensors, the deterministic bfloat16 backward, double backward, the
CPU paths, the 3-D families and the errors.

Volumes are tiny (the interpreter is slow); every element of every result is compared (new buffers
are poisoned with NaN, see conftest.py). The helpers are tests/core/_cases.py's, shared with 2-D; the
tests that 2-D has too run every form of both dimensions from one case table: zoom-in, down-sampling,
far-outside, K parallel transforms, identity and output layout (test_sampling.py); non-finite
coordinates, gradcheck, opcheck, torch.compile, autocast, the deterministic backward, the skipped input
gradient (test_special.py); several tiles per program, 64-bit indexing, the batch split and the static
hints (test_launch.py)."""

import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
from stn_triton import ops, reference
from stn_triton.kernels import launch
from transforms_registry import get_transform
from _cases import (FORMS3, LAYOUTS3, MODES, PADDINGS, PYTORCH_TRICUBIC, assert_close, check_case,
                    check_double_backward, check_given, make_params, run)


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


@pytest.mark.parametrize("size", [(1, 4, 5), (3, 1, 5), (3, 4, 1)], ids=["Do=1", "Ho=1", "Wo=1"])
def test_one_voxel_output_axis_align_corners(request, device, size):
    """A one-voxel output axis under align_corners=True: affine_grid puts its base at 0 (the centre),
    not at -1 as the formula for more voxels would; the affine form's base grid must too."""
    check_case(request, device, "affine3d", "bilinear", "zeros", True, torch.float32, "contiguous",
               shape=(1, 2, 3, 4, 5), K=2, size=size)


@pytest.mark.parametrize("form", FORMS3)
def test_nearest_rounds_half_voxels_to_even(device, form):
    """Coordinates exactly on half-voxels (k + 0.5 once unnormalised, exact in float32) round to the even
    neighbour, as PyTorch's nearbyint does: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (not up to 1, 2, 3)."""
    gen = torch.Generator().manual_seed(41 + FORMS3.index(form))
    if form == "grid3d":
        # align_corners=False on 4 voxels: g = (2 i + 1) / 4 - 1 puts i at -0.5, 0.5, 1.5, 2.5, 3.5
        x = torch.randn(1, 2, 4, 4, 4, generator=gen).to(device)
        halves = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
        size, ac, padding_mode = (3, 4, 5), False, "zeros"
        params = (halves[torch.randint(0, 5, (1, 2, *size, 3), generator=gen)].to(device),)
    else:
        # align_corners=True, (2, 3, 3) sampled to (3, 5, 5) at the identity and its mirror: every other
        # output voxel lies at k + 0.5 on each axis (the base grid's steps, 1 and 0.5, are exact)
        x = torch.randn(1, 2, 2, 3, 3, generator=gen).to(device)
        size, ac = (3, 5, 5), True
        theta = torch.stack([torch.eye(3, 4), torch.diag(torch.tensor([-1.0, 1.0, -1.0, 1.0]))[:3]])[None]
        padding_mode = "border" if form == "basis3d" else "zeros"
        if form == "affine3d":
            params = (theta.to(device),)
        else:  # the basis is the base grid itself: m @ basis = theta @ base, exactly
            basis = reference.base_grid(size, ac, torch.float64, "cpu").T
            params = (theta.to(device), basis.float().to(device))
    check_given(form, x, params, size, "nearest", padding_mode, ac, gen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_zoom_in(request, device, dtype):
    """Half-precision input, ~500 contributions per input voxel (2x2x2 sampled to 8x8x8): the input
    gradient is summed in float32 and rounded once, within the dtype's tolerance; summed in the input's
    own dtype its rounding error (growing as the square root of the contributions) would not be.
    Channels-last with C = 16: the layout whose few-contribution cases do accumulate in half."""
    check_case(request, device, "affine3d", "bilinear", "border", False, dtype, "channels_last_3d",
               shape=(1, 16, 2, 2, 2), K=1, size=(8, 8, 8), spread=0.05)


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


# --- determinism -----------------------------------------------------------------------------------------

@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_channels_last_bf16(request, device, deterministic):
    check_case(request, device, "affine3d", "bilinear", "border", True, torch.bfloat16, "channels_last_3d",
               shape=(1, 4, 3, 4, 5), K=2, size=(5, 6, 7), spread=0.3)


# --- the op layer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS3)
def test_double_backward(device, form):
    """Trilinear second derivatives through the kernels' first order against the float64 reference's."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(1, 2, 3, 4, 5, generator=gen).to(device).requires_grad_()
    size = (2, 3, 4)
    params = [p.requires_grad_() for p in make_params(form, 1, 2, size, False, torch.float32, device, gen)]
    check_double_backward(form, x, params, size, "bilinear", "zeros", False, gen)


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


def test_5d_bicubic_fills_pytorchs_gap():
    """The installed torch's F.grid_sample raises for bicubic on 5-D input; stn_triton fills that gap:
    it samples it (tricubic, on the kernels; tests/core/test_tricubic.py), equal to the float64 oracle
    written from the definition. (With a torch that has it, the oracle is torch's own and no raise is
    expected.)"""
    x = torch.randn(1, 2, 3, 4, 5, generator=torch.Generator().manual_seed(2))
    grid = torch.tensor([[[[[0.1, -0.3, 0.2], [-0.7, 0.45, 0.9]]]]])  # (1, 1, 1, 2, 3)
    if not PYTORCH_TRICUBIC:
        with pytest.raises(RuntimeError):
            F.grid_sample(x, grid, mode="bicubic", align_corners=False)
    out = st.grid_sample(x, grid, mode="bicubic", align_corners=False)
    assert out.shape == (1, 2, 1, 1, 2)
    assert_close(out, reference.form_sample("grid3d", x.double(), [grid.double()[:, None]], [1, 1, 2], "bicubic",
                                            "zeros", False)[:, 0], torch.float32, "tricubic output")


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

