"""Tricubic sampling: ``mode="bicubic"`` on 5-D input, in every 3-D form (affine3d, basis3d, grid3d).

The installed torch's ``F.grid_sample`` has no 3-D bicubic (it raises), so the law is its 2-D bicubic
(cubic convolution, A = -0.75, each tap padded on its own: ``get_value_bounded``) on each of three
axes, written from its definition as ``stn_triton.reference.tricubic``. That oracle is itself first
checked against an outside truth: on a volume constant along one axis it must equal torch's own 2-D
bicubic ``F.grid_sample`` over the other two, values and gradients. Then the kernels (float32 and
bfloat16, Triton's interpreter in the suite) are judged against it in float64: forward, the gradients
of the input and of every parameter, the deterministic backward, non-finite coordinates, the public
functions and the module, and the second derivatives.

Volumes are tiny (64 taps per output voxel are slow in the interpreter: one program of 128 voxels per
(n, k) and channel step where possible); every element of every result is compared (new buffers are
poisoned with NaN, see conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
from stn_triton import reference
from _cases import FORMS3, PADDINGS, assert_close, check_case, check_double_backward, make_params, oracle, run

ALIGN = (False, True)


# --- the oracle against torch's own 2-D bicubic --------------------------------------------------------

# A volume constant along one axis is a 2-D image over the other two, and tricubic sampling of it is
# the image's bicubic sampling at the grid's other two components: the constant axis' four weights sum
# to 1 on one value. (grid component of each volume axis: x = W, y = H, z = D.)
CONSTANT_AXIS = {"depth": (2, (0, 1)), "height": (3, (0, 2)), "width": (4, (1, 2))}


@pytest.mark.parametrize("align_corners", ALIGN, ids=["ac0", "ac1"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("axis", CONSTANT_AXIS)
def test_oracle_equals_pytorch_bicubic_on_constant_axis(axis, padding_mode, align_corners):
    """reference.tricubic on a volume constant along ``axis`` equals F.grid_sample(mode="bicubic") on the
    2-D image, float64: output, the image's gradient and the grid's; the constant axis' coordinate gets
    gradient 0. The other two components reach outside the image; the constant axis' one stays where
    all four of its taps are inside (zeros padding: its size is 4 and the coordinate within +-0.2 of
    the centre, so the taps are 0..3 for either align_corners) or goes anywhere (border, reflection)."""
    dim, keep = CONSTANT_AXIS[axis]
    gen = torch.Generator().manual_seed(17 + PADDINGS.index(padding_mode) + 3 * list(CONSTANT_AXIS).index(axis))
    img = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    vol_shape = list(img.shape)
    vol_shape.insert(dim, 4)
    vol = img.unsqueeze(dim).expand(vol_shape)
    out_size = (3, 4, 5)
    g2 = 3.0 * torch.rand(2, *out_size, 2, generator=gen, dtype=torch.float64) - 1.5  # to +-1.5: outside too
    if padding_mode == "zeros":
        gc = 0.4 * torch.rand(2, *out_size, 1, generator=gen, dtype=torch.float64) - 0.2
        gc[0, 0] = 0.0  # the centre itself: voxel 1.5, a half voxel
    else:
        gc = 6.0 * torch.rand(2, *out_size, 1, generator=gen, dtype=torch.float64) - 3.0
    const = 3 - keep[0] - keep[1]  # the grid component of the constant axis
    parts = {keep[0]: g2[..., :1], keep[1]: g2[..., 1:], const: gc}
    grid = torch.cat([parts[a] for a in range(3)], dim=-1).requires_grad_()
    got = reference.tricubic(vol, grid, padding_mode, align_corners)  # (2, 3, 3, 4, 5)
    assert got.shape == (2, 3, *out_size)
    # F.grid_sample on the image, one output slice at a time (its grid is (N, Ho, Wo, 2))
    img2 = img.detach().requires_grad_()
    g2v = grid.detach()[..., list(keep)].requires_grad_()
    want = torch.stack([F.grid_sample(img2, g2v[:, d], mode="bicubic", padding_mode=padding_mode,
                                      align_corners=align_corners) for d in range(out_size[0])], dim=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    gi, gg = torch.autograd.grad(got, (img, grid), w)
    wi, wg = torch.autograd.grad(want, (img2, g2v), w)
    torch.testing.assert_close(gi, wi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gg[..., list(keep)], wg, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(gg[..., const], torch.zeros_like(gg[..., const]), rtol=0, atol=1e-11)


def test_oracle_is_what_form_sample_uses():
    """reference.form_sample's 5-D bicubic is tricubic on the form's grid (the kernels' oracle below)."""
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(2, 2, 3, 4, 5, generator=gen, dtype=torch.float64)
    (theta,) = make_params("affine3d", 2, 2, (2, 3, 4), True, torch.float64, "cpu", gen)
    theta = theta.double()
    got = reference.form_sample("affine3d", x, [theta], [2, 3, 4], "bicubic", "reflection", True)
    grid = F.affine_grid(theta.reshape(4, 3, 4), (4, 2, 2, 3, 4), align_corners=True)
    want = reference.tricubic(x[:, None].expand(2, 2, *x.shape[1:]).reshape(4, *x.shape[1:]), grid, "reflection",
                              True)
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-12, atol=1e-12)


# --- the kernels against the oracle ---------------------------------------------------------------------

# (input shape, output size, transforms K, spread of the random transforms); an output of at most 128
# voxels per tile keeps each (n, k) one program in the interpreter.
GEOMETRY = {
    "odd": ((1, 1, 5, 4, 7), (3, 5, 7), 2, 1.0),  # reaches a little outside the volume
    "zoom-in": ((1, 1, 2, 3, 3), (3, 5, 8), 1, 0.05),  # ~400 contributions per input voxel
    "downsample": ((1, 1, 7, 9, 11), (3, 4, 5), 2, 0.2),
    "far-outside": ((1, 1, 4, 5, 6), (3, 4, 5), 1, 40.0),  # coordinates tens of volume widths away
}
# every (padding, align_corners) pair once, each form meeting two paddings and both align_corners, two
# layouts and two geometries (channels_last_3d with C = 3: one masked vector of channels per step)
MATRIX = [
    ("affine3d", "zeros", False, "contiguous", "odd"),
    ("affine3d", "reflection", True, "channels_last_3d", "zoom-in"),
    ("basis3d", "border", False, "strided", "far-outside"),
    ("basis3d", "zeros", True, "channels_last_3d", "downsample"),
    ("grid3d", "reflection", False, "contiguous", "downsample"),
    ("grid3d", "border", True, "strided", "zoom-in"),
]


def test_matrix_covers_every_padding_and_align_corners():
    assert {(p, a) for _, p, a, _, _ in MATRIX} == {(p, a) for p in PADDINGS for a in ALIGN}
    for form in FORMS3:
        assert {a for f, _, a, _, _ in MATRIX if f == form} == set(ALIGN)
    assert {g for *_, g in MATRIX} == set(GEOMETRY)


@pytest.mark.parametrize("form,padding_mode,align_corners,layout,geometry", MATRIX,
                         ids=[f"{f}-{p}-ac{int(a)}-{lay}-{g}" for f, p, a, lay, g in MATRIX])
def test_matrix(request, device, form, padding_mode, align_corners, layout, geometry):
    """Forward and the gradients of the input and of every parameter (theta; m and the basis; the grid),
    float32 kernels against the float64 oracle."""
    shape, size, K, spread = GEOMETRY[geometry]
    if layout == "channels_last_3d":
        shape = (shape[0], 3, *shape[2:])
    check_case(request, device, form, "bicubic", padding_mode, align_corners, torch.float32, layout,
               shape=shape, K=K, size=size, spread=spread)


def test_bf16(request, device):
    """bfloat16 input (channels-last, C = 4: one vector of channels per step; the input gradient summed in
    float32): output and gradients in bfloat16, within bfloat16's tolerance of the float64 oracle."""
    check_case(request, device, "affine3d", "bicubic", "border", True, torch.bfloat16, "channels_last_3d",
               shape=(1, 4, 4, 5, 6), K=2, size=(3, 4, 5), spread=0.5)


@pytest.mark.parametrize("form", ["affine3d", "grid3d"])
def test_deterministic_backward(device, form):
    """Under torch.use_deterministic_algorithms(True) (the sorted gather, 64 entries per output voxel):
    bit-identical gradients on two runs, equal to the float64 oracle's (~40 contributions per input
    voxel)."""
    gen = torch.Generator().manual_seed(5 + FORMS3.index(form))
    x = torch.randn(1, 1, 3, 3, 4, generator=gen).to(device).requires_grad_()
    size = (2, 3, 4)
    params = [p.requires_grad_() for p in make_params(form, 1, 1, size, False, torch.float32, device, gen, 0.5)]
    padding_mode = {"affine3d": "zeros", "grid3d": "reflection"}[form]
    out = run(form, x, params, size, mode="bicubic", padding_mode=padding_mode, align_corners=False)
    grad_out = torch.randn(out.shape, generator=gen).to(device)
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.autograd.grad(out, (x, *params), grad_out, retain_graph=True)
        second = torch.autograd.grad(out, (x, *params), grad_out)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref, x64, p64 = oracle(form, x, params, size, "bicubic", padding_mode, False)
    assert_close(out, ref, torch.float32, "output")
    want = torch.autograd.grad(ref, (x64, *p64), grad_out.double().cpu())
    assert_close(first[0], want[0], torch.float32, "grad x")
    for g, w in zip(first[1:], want[1:]):
        assert_close(g, w, torch.float32, "grad params", scale_by_max=True)


# --- non-finite and huge coordinates --------------------------------------------------------------------

@pytest.mark.parametrize("padding_mode,align_corners", [("zeros", False), ("border", True), ("reflection", False)],
                         ids=["zeros-ac0", "border-ac1", "reflection-ac0"])
def test_nonfinite_grid(device, padding_mode, align_corners):
    """NaN, +-inf and 1e30 in the grid form never read or write out of bounds, and agree with the oracle,
    which sanitises them as the kernels do (stn_triton.reference: zeros reads nothing; border: pixel 0 or
    the last; reflection: pixel 0), forward and gradients. (1e30 not under reflection: folding back a
    coordinate of ~1e30 voxels is float32's rounding, nothing to compare.)"""
    gen = torch.Generator().manual_seed(7 + PADDINGS.index(padding_mode))
    x = torch.randn(1, 3, 4, 5, 6, generator=gen).to(device).contiguous(memory_format=torch.channels_last_3d)
    (grid,) = make_params("grid3d", 1, 1, (3, 4, 5), align_corners, torch.float32, device, gen)
    grid = grid.clone()
    grid[0, 0, 0, 1, 2, 0] = float("nan")
    grid[0, 0, 1, :, 1, 1] = float("inf")
    grid[0, 0, 2, 3, :, 2] = -float("inf")
    grid[0, 0, 0, 2, 4, :] = float("nan")
    grid[0, 0, 1, 0, 0] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    if padding_mode != "reflection":
        grid[0, 0, 2, 0, 0, 0] = 1e30
        grid[0, 0, 2, 1, 3] = torch.tensor([0.1, -1e30, 0.2])
    x.requires_grad_()
    grid.requires_grad_()
    opts = dict(mode="bicubic", padding_mode=padding_mode, align_corners=align_corners)
    out = run("grid3d", x, [grid], (3, 4, 5), **opts)
    ref, x64, p64 = oracle("grid3d", x, [grid], (3, 4, 5), **opts)
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, "output")
    grad_out = torch.randn(out.shape, generator=gen).to(device)
    gx, gg = torch.autograd.grad(out, (x, grid), grad_out)
    wx, wg = torch.autograd.grad(ref, (x64, *p64), grad_out.double().cpu())
    assert torch.isfinite(gx).all() and torch.isfinite(gg).all()
    assert_close(gx, wx, torch.float32, "grad x")
    assert_close(gg, wg, torch.float32, "grad grid", scale_by_max=True)
    special = ~torch.isfinite(grid.detach()) | (grid.detach().abs() > 1e20)
    assert (gg[special] == 0).all()  # a non-finite or huge component gets no gradient


# --- the public functions and the module ----------------------------------------------------------------

def test_affine_sample_public(device):
    """st.affine_sample(x5, theta (N, 3, 4), size, mode="bicubic") -> (N, C, Do, Ho, Wo), gradients of x and
    theta, against the oracle."""
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(2, 1, 4, 5, 6, generator=gen).to(device).requires_grad_()
    (theta,) = make_params("affine3d", 2, 1, (3, 4, 5), False, torch.float32, device, gen, 0.5)
    theta = theta[:, 0].clone().requires_grad_()
    out = st.affine_sample(x, theta, (3, 4, 5), mode="bicubic", padding_mode="border")
    assert out.shape == (2, 1, 3, 4, 5)
    ref, x64, (t64,) = oracle("affine3d", x, [theta[:, None]], (3, 4, 5), "bicubic", "border", False)
    assert_close(out, ref[:, 0], torch.float32, "output")
    w = torch.randn(out.shape, generator=gen).to(device)
    gx, gt = torch.autograd.grad(out, (x, theta), w)
    wx, wt = torch.autograd.grad(ref[:, 0], (x64, t64), w.double())
    assert_close(gx, wx, torch.float32, "grad x")
    assert_close(gt, wt[:, 0], torch.float32, "grad theta", scale_by_max=True)


def test_grid_sample_dropin(device):
    """st.grid_sample(x5, grid (N, Do, Ho, Wo, 3), mode="bicubic", ...) against reference.tricubic itself."""
    gen = torch.Generator().manual_seed(32)
    x = torch.randn(1, 2, 3, 4, 5, generator=gen).to(device).requires_grad_()
    grid = (2.4 * torch.rand(1, 3, 4, 5, 3, generator=gen) - 1.2).to(device).requires_grad_()
    out = st.grid_sample(x, grid, mode="bicubic", padding_mode="reflection", align_corners=True)
    assert out.shape == (1, 2, 3, 4, 5)
    x64, g64 = x.detach().double().requires_grad_(), grid.detach().double().requires_grad_()
    want = reference.tricubic(x64, g64, "reflection", True)
    assert_close(out, want, torch.float32, "output")
    w = torch.randn(out.shape, generator=gen).to(device)
    gx, gg = torch.autograd.grad(out, (x, grid), w)
    wx, wg = torch.autograd.grad(want, (x64, g64), w.double())
    assert_close(gx, wx, torch.float32, "grad x")
    assert_close(gg, wg, torch.float32, "grad grid", scale_by_max=True)


def test_spatial_transformer_tricubic(device):
    """SpatialTransformer(transform="affine3d", mode="bicubic"): forward equals the oracle at the theta it
    regressed; backward reaches the regression layer and the input."""
    torch.manual_seed(0)
    stn = st.SpatialTransformer(transform="affine3d", size=(3, 4, 5), mode="bicubic", padding_mode="border",
                                return_theta=True).to(device)
    x = torch.randn(1, 2, 4, 5, 6, device=device, requires_grad=True)
    stn.head(stn.localization(x).flatten(1))  # the lazy layers take their shapes
    with torch.no_grad():  # away from the identity, where every voxel would be a whole one
        stn.head.bias.copy_(torch.tensor([0.9, 0.1, 0.0, 0.05, -0.1, 1.1, 0.05, 0.0, 0.02, 0.1, 0.95, -0.1]))
    out, theta = stn(x)
    assert out.shape == (1, 2, 3, 4, 5) and theta.shape == (1, 12)
    ref, _, _ = oracle("affine3d", x, [theta.detach().view(1, 1, 3, 4)], (3, 4, 5), "bicubic", "border", False)
    assert_close(out, ref[:, 0], torch.float32, "output")
    out.square().mean().backward()
    assert stn.head.weight.grad is not None and stn.head.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --- second derivatives ---------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS3)
def test_gradgradcheck_reference(form):
    """float64 takes the reference path (tricubic written in PyTorch ops): gradcheck and gradgradcheck
    through the public functions."""
    gen = torch.Generator().manual_seed(3 + FORMS3.index(form))
    x = torch.randn(1, 2, 3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    size = (2, 2, 3)
    params = [p.double().requires_grad_() for p in make_params(form, 1, 1, size, False, torch.float32, "cpu", gen, 0.5)]
    assert st.backend(x) == "reference"
    padding_mode = {"affine3d": "zeros", "basis3d": "border", "grid3d": "reflection"}[form]

    def fn(x, *p):
        return run(form, x, p, size, mode="bicubic", padding_mode=padding_mode, align_corners=False)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, *params), eps=1e-6, atol=1e-4, fast_mode=True)


@pytest.mark.parametrize("form", FORMS3)
def test_double_backward(device, form):
    """Second derivatives through the kernels' first order (the op's double backward), against the float64
    oracle's: with respect to the incoming gradient, the input and the parameters, weighted by random
    second-order gradients."""
    gen = torch.Generator().manual_seed(41 + FORMS3.index(form))
    x = torch.randn(1, 1, 3, 4, 5, generator=gen).to(device).requires_grad_()
    size = (2, 3, 4)
    params = [p.requires_grad_() for p in make_params(form, 1, 1, size, True, torch.float32, device, gen, 0.5)]
    check_double_backward(form, x, params, size, "bicubic", "border", True, gen)
