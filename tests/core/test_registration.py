"""The registration helpers (stn_triton.registration), kernels running, against MONAI's Warp and
DVF2DDF layers and VoxelMorph's SpatialTransformer and IntegrateVelocityField layers (each run, float64;
test extras), VoxelMorph's older ``SpatialTransformer(size)`` as its source defined it (voxel grid plus
flow, rescaled, ``grid_sample`` with align_corners=True), and the inverse consistency of integrated
velocities."""

import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
from _cases import assert_close


def _vm_transform(src, flow):
    """VoxelMorph's SpatialTransformer(size)(src, flow), float64."""
    size = src.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=flow.dtype) for s in size], indexing="ij"))
    loc = grid[None] + flow
    loc = torch.stack([2 * (loc[:, i] / (s - 1) - 0.5) for i, s in enumerate(size)], 1)
    return F.grid_sample(src, loc.movedim(1, -1).flip(-1), mode="bilinear", align_corners=True)


@pytest.fixture(scope="module")
def vxm_modules():
    return pytest.importorskip("voxelmorph.nn.modules", reason="VoxelMorph is a test extra")


def _smooth(shape, gen, amplitude, device):
    """A smooth random field (N, nd, *size) in pixels: coarse noise, upsampled."""
    nd = len(shape) - 2
    coarse = torch.randn(shape[0], nd, *[max(2, s // 4) for s in shape[2:]], generator=gen, dtype=torch.float64)
    up = F.interpolate(coarse, size=shape[2:], mode="bilinear" if nd == 2 else "trilinear", align_corners=True)
    return (amplitude * up).float().to(device)


SHAPES = [(2, 1, 12, 14), (1, 1, 6, 7, 8)]
IDS = ["2d", "3d"]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_integrate_velocity_is_voxelmorphs(device, vxm_modules, shape):
    """VoxelMorph's IntegrateVelocityField(steps=5), run in float64: values and the gradient."""
    gen = torch.Generator().manual_seed(len(shape))
    v = _smooth(shape, gen, 2.0, device).requires_grad_()
    u = st.integrate_velocity(v, steps=5)
    v64 = v.detach().cpu().double().requires_grad_()
    want = vxm_modules.IntegrateVelocityField(steps=5)(v64)
    assert_close(u, want, torch.float32, "displacement", tol_scale=5)
    g = torch.randn(u.shape, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(u, v, g.float().to(device))
    (ref,) = torch.autograd.grad(want, v64, g)
    assert_close(got, ref, torch.float32, "grad velocity", scale_by_max=True, tol_scale=5)


@pytest.mark.parametrize("shape", [(2, 1, 16, 18), (1, 1, 10, 12, 12)], ids=IDS)
def test_compose_is_warping_twice(device, shape):
    """compose_flows(first, second): second plus first warped by second, the definition; and warping
    once by it is warping by first, then by second, up to interpolation: at least twice as close as
    warping once by the sum of the fields."""
    gen = torch.Generator().manual_seed(10 + len(shape))
    first, second = _smooth(shape, gen, 1.5, device), _smooth(shape, gen, 1.5, device)
    both = st.compose_flows(first, second)
    f64, s64 = first.double().cpu(), second.double().cpu()
    assert_close(both, s64 + _vm_transform(f64, s64), torch.float32, "composition")
    img = _smooth((shape[0], 2, *shape[2:]), gen, 1.0, device)  # a smooth image
    twice = st.flow_sample(st.flow_sample(img, first, align_corners=True), second, align_corners=True)
    once = st.flow_sample(img, both, align_corners=True)
    summed = st.flow_sample(img, first + second, align_corners=True)
    inside = tuple([slice(None), slice(None)] + [slice(2, -2)] * (len(shape) - 2))  # away from the zeros padding
    err = (once - twice)[inside].abs().mean()
    assert err < 0.5 * (summed - twice)[inside].abs().mean(), err
    # the grid layout, normalised units: the same composition
    scale = torch.tensor([2.0 / (s - 1) for s in shape[2:]][::-1], device=device)
    norm = lambda u: u.movedim(1, -1).flip(-1) * scale  # noqa: E731  pixels (index order) -> normalised (x, y[, z])
    got = st.compose_flows(norm(first), norm(second), layout="grid", units="normalized")
    assert_close(got, norm(both), torch.float32, "composition, grid layout")


def test_integrated_velocity_and_its_negative_are_inverses(device):
    """exp(v) then exp(-v) is close to the identity for a smooth v (the point of scaling and squaring):
    several times closer than exp(v) then its negative."""
    gen = torch.Generator().manual_seed(3)
    v = _smooth((1, 1, 24, 24), gen, 2.0, device)
    forth, back = st.integrate_velocity(v), st.integrate_velocity(-v)
    inside = (slice(None), slice(None), slice(5, -5), slice(5, -5))
    residual = st.compose_flows(forth, back)[inside].abs().mean()
    naive = st.compose_flows(forth, -forth)[inside].abs().mean()
    assert forth.abs().max() > 2.0  # a real deformation, of a few pixels
    assert residual < 0.25 * naive and residual < 0.1 * forth[inside].abs().mean(), (residual, naive)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_flow_warp_is_voxelmorphs_layer(device, vxm_modules, shape):
    """VoxelMorph's SpatialTransformer (today's, run in float64, linear and nearest; and its older
    ``SpatialTransformer(size)`` from its source's definition) against ``st.FlowWarp``; values and the
    gradients to the image and the field."""
    gen = torch.Generator().manual_seed(20 + len(shape))
    src = torch.randn(shape, generator=gen).to(device).requires_grad_()
    flow = _smooth(shape, gen, 2.0, device).requires_grad_()
    layer = st.FlowWarp(shape[2:])
    out = layer(src, flow)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (src, flow)]
    want = vxm_modules.SpatialTransformer()(*leaves)
    assert_close(out, want, torch.float32, "warp")
    assert_close(out, _vm_transform(*[t.detach() for t in leaves]), torch.float32, "warp, VoxelMorph's older layer")
    g = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (src, flow), g.to(device))
    ref = torch.autograd.grad(want, leaves, g.double())
    assert_close(got[0], ref[0], torch.float32, "grad image")
    assert_close(got[1], ref[1], torch.float32, "grad flow", scale_by_max=True)
    near = st.FlowWarp(mode="nearest")(src, flow)
    assert_close(near, vxm_modules.SpatialTransformer("nearest")(*leaves), torch.float32, "nearest")
    nd = len(shape) - 2
    theta = (torch.eye(nd, nd + 1) + 0.1 * torch.randn(shape[0], nd, nd + 1, generator=gen)).to(device)
    assert torch.equal(layer(src, flow, theta), st.flow_sample(src, flow, theta, align_corners=True))
    with pytest.raises(st.ArgumentError, match=r"flow: expected the spatial size .* got \(5, 5"):
        layer(src, flow[..., :5, :5] if len(shape) == 4 else flow[..., :5, :5, :5])


@pytest.mark.parametrize("call, words", [
    (lambda: st.compose_flows(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5)), ["second", "(1, 2, 4, 4)"]),
    (lambda: st.compose_flows(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)), ["first", "one field per image"]),
    (lambda: st.integrate_velocity(torch.zeros(1, 2, 4, 4), steps=-1), ["steps", "-1"]),
    (lambda: st.FlowWarp(size=8), ["size", "8"]),
], ids=["shapes-differ", "not-a-field", "steps", "size"])
def test_bad_arguments(call, words):
    with pytest.raises(st.ArgumentError) as e:
        call()
    for w in words:
        assert w in str(e.value)


@pytest.fixture
def monai_blocks():
    return pytest.importorskip("monai.networks.blocks", reason="MONAI is a test extra")


_MONAI_NATIVE = "ignore:monai.networks.blocks.Warp. Using PyTorch native grid_sample"


@pytest.mark.filterwarnings(_MONAI_NATIVE)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("mode,padding_mode", [("bilinear", "border"), ("nearest", "zeros"), ("bilinear", "reflection")])
def test_flow_warp_is_monais_warp(device, monai_blocks, shape, mode, padding_mode):
    """MONAI's Warp (pixel displacements, index order, channels first, align_corners=True; border
    padding by default), run in float64, against our layer with the same options; values and
    gradients."""
    gen = torch.Generator().manual_seed(30 + len(shape))
    src = torch.randn(shape, generator=gen).to(device).requires_grad_()
    ddf = _smooth(shape, gen, 2.5, device).requires_grad_()
    ours = st.FlowWarp(mode=mode, padding_mode=padding_mode)(src, ddf)
    s64, d64 = (t.detach().cpu().double().requires_grad_() for t in (src, ddf))
    theirs = monai_blocks.Warp(mode=mode, padding_mode=padding_mode)(s64, d64)
    assert_close(ours, theirs, torch.float32, "warp vs MONAI")
    g = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(ours, (src, ddf), g.float().to(device))
    want = torch.autograd.grad(theirs, (s64, d64), g, allow_unused=True)
    assert_close(got[0], want[0], torch.float32, "grad source vs MONAI")
    if mode == "bilinear":  # nearest is piecewise constant in the field
        assert_close(got[1], want[1], torch.float32, "grad ddf vs MONAI", scale_by_max=True)


@pytest.mark.filterwarnings(_MONAI_NATIVE)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_integrate_velocity_is_monais_dvf2ddf(device, monai_blocks, shape):
    gen = torch.Generator().manual_seed(40 + len(shape))
    v = _smooth(shape, gen, 2.0, device)
    theirs = monai_blocks.DVF2DDF(num_steps=7)(v.double().cpu())
    assert_close(st.integrate_velocity(v, steps=7), theirs, torch.float32, "DVF2DDF", tol_scale=5)
