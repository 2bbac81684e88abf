"""Displacement fields (``st.flow_sample``: the flow, flow3d, affine_flow and affine_flow3d forms), kernels
running: against PyTorch's identity grid (or ``F.affine_grid`` of theta) plus the field through
``F.grid_sample`` in float64, and against VoxelMorph's warp layer (its ``SpatialTransformer``: voxel grid
plus the flow, rescaled to [-1, 1], ``align_corners=True``, written here from its definition) for
fields in pixel units, channels first; values and every gradient, 2-D and 3-D; no sampling grid, and
no converted copy of the field, made on the fused path."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import stn_triton as st
from stn_triton import ops
from stn_triton.kernels import flow as flow_form
from _cases import PADDINGS, assert_close, check_case, make_input, make_params, oracle, run

MODES3 = ("bilinear", "nearest", "bicubic")
# every mode and padding in each dimension, align_corners and the input's layout alternating
MATRIX = [(form, mode, pad, i % 2 == 1, ("contiguous", "channels_last", "strided")[i % 3])
          for form in ("flow", "flow3d") for i, (mode, pad) in enumerate(itertools.product(MODES3, PADDINGS))]
# affine + field: the flow forms' coordinate code after the affine form's (both tested in full): each
# mode, padding, align_corners and input layout once per dimension
MATRIX += [(form, mode, pad, ac, layout) for form in ("affine_flow", "affine_flow3d") for mode, pad, ac, layout in
           zip(MODES3, PADDINGS, (False, True, form == "affine_flow"), ("strided", "channels_last", "contiguous"))]
SMALL3 = ((1, 2, 3, 4, 5), (2, 3, 4))  # tricubic reads 64 taps a voxel: a small volume


@pytest.mark.parametrize("form,mode,padding_mode,align_corners,layout", MATRIX,
                         ids=[f"{f}-{m}-{p}-ac{int(a)}-{lay}" for f, m, p, a, lay in MATRIX])
def test_matrix(request, device, form, mode, padding_mode, align_corners, layout):
    shape, size = SMALL3 if (form.endswith("3d") and mode == "bicubic") else (None, None)
    if form.endswith("3d") and layout == "channels_last":
        layout = "channels_last_3d"
    check_case(request, device, form, mode, padding_mode, align_corners, torch.float32, layout, shape=shape, size=size)


@pytest.mark.parametrize("form", ["flow", "flow3d", "affine_flow", "affine_flow3d"])
def test_half_precision_k_fields(request, device, form):
    """bfloat16 input (channels-last, float32 accumulation), three fields per input in bfloat16 (the
    field's gradient written in bfloat16 too)."""
    nd = 3 if form.endswith("3d") else 2
    layout = "channels_last" if nd == 2 else "channels_last_3d"
    shape = (2, 16, 6, 7) if nd == 2 else (1, 16, 4, 5, 6)
    size = (9, 8) if nd == 2 else (5, 4, 6)  # zoom-in: several contributions per input pixel
    check_case(request, device, form, "bilinear", "border", False, torch.bfloat16, layout, shape=shape, K=3,
               size=size)


def _voxelmorph(src, flow):
    """VoxelMorph's SpatialTransformer (voxelmorph/torch/layers.py) from its definition: the voxel
    grid (index order) plus the flow, each axis rescaled to [-1, 1] by 2 * (loc / (size - 1) - 0.5),
    the components reversed to (x, y[, z]), then grid_sample with align_corners=True."""
    size = src.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=flow.dtype) for s in size], indexing="ij"))
    loc = grid[None] + flow
    loc = torch.stack([2 * (loc[:, i] / (s - 1) - 0.5) for i, s in enumerate(size)], 1)
    loc = loc.movedim(1, -1).flip(-1)
    return F.grid_sample(src, loc, mode="bilinear", align_corners=True)


@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 2, 5, 6, 7)], ids=["2d", "3d"])
def test_pixel_units_channels_first_equal_voxelmorph(device, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    nd = len(shape) - 2
    x = make_input(shape, torch.float32, "contiguous", device, gen).requires_grad_()
    flow = (2.0 * torch.randn(shape[0], nd, *shape[2:], generator=gen)).to(device).requires_grad_()  # pixels
    out = st.flow_sample(x, flow, align_corners=True)  # the defaults: channels first, pixels
    x64 = x.detach().cpu().double().requires_grad_()
    f64 = flow.detach().cpu().double().requires_grad_()
    want = _voxelmorph(x64, f64)
    assert_close(out, want, torch.float32, "output vs VoxelMorph")
    g = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (x, flow), g.to(device))
    ref = torch.autograd.grad(want, (x64, f64), g.double())
    assert_close(got[0], ref[0], torch.float32, "grad input")
    assert_close(got[1], ref[1], torch.float32, "grad flow", scale_by_max=True)
    assert got[1].shape == flow.shape


@pytest.mark.parametrize("nd", [2, 3])
def test_layouts_and_units_are_the_same_warp(device, nd):
    """A field given channels first or in the grid layout, in pixels or normalised, samples the same."""
    gen = torch.Generator().manual_seed(nd)
    shape = (2, 3, 7, 9) if nd == 2 else (1, 2, 4, 5, 6)
    x = make_input(shape, torch.float32, "contiguous", device, gen)
    (u,) = make_params("flow" if nd == 2 else "flow3d", shape[0], 2, shape[2:], False, torch.float32, device, gen)
    want = run("flow" if nd == 2 else "flow3d", x, (u,), shape[2:])  # (N, K, *size, nd), normalised (x, y[, z])
    first = u.movedim(-1, 2)  # (N, K, nd, *size)
    assert_close(st.flow_sample(x, first.contiguous(), layout="channels_first", units="normalized"), want,
                 torch.float32, "channels first")
    pixels = u.flip(-1) * torch.tensor([s / 2.0 for s in shape[2:]], device=device)  # index order, input pixels
    assert_close(st.flow_sample(x, pixels, layout="grid", units="pixels"), want, torch.float32, "pixels")
    assert_close(st.flow_sample(x, pixels.movedim(-1, 2).contiguous()), want, torch.float32, "pixels, channels first")


@pytest.mark.parametrize("form", ["flow", "flow3d", "affine_flow3d"])
def test_deterministic_backward(device, form):
    shape, size = ((2, 3, 6, 7), (12, 13)) if form == "flow" else ((1, 2, 3, 4, 4), (5, 6, 7))
    gen = torch.Generator().manual_seed(5)
    x = make_input(shape, torch.float32, "contiguous", device, gen).requires_grad_()
    params = make_params(form, shape[0], 2, size, False, torch.float32, device, gen, 0.3)
    for p in params:
        p.requires_grad_()
    out = run(form, x, params, size)
    g = torch.randn(out.shape, generator=gen).to(device)
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.autograd.grad(run(form, x, params, size), (x, *params), g)
        second = torch.autograd.grad(run(form, x, params, size), (x, *params), g)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    ref, x64, p64 = oracle(form, x, params, size, "bilinear", "zeros", False)
    want = torch.autograd.grad(ref, (x64, *p64), g.double().cpu())
    assert_close(first[0], want[0], torch.float32, "grad x")
    for i, (a, b) in enumerate(zip(first[1:], want[1:])):
        assert_close(a, b, torch.float32, f"grad params[{i}]", scale_by_max=True)


def _affine_pixels_oracle(x, flow, theta):
    """An affine map then a field in pixels (index order, channels first), align_corners=True, from the
    definitions: F.affine_grid(theta) plus the field rescaled to [-1, 1] units and reversed to (x, y[, z])."""
    size = x.shape[2:]
    scale = torch.tensor([2.0 / (s - 1) for s in size], dtype=flow.dtype)
    grid = F.affine_grid(theta, (x.shape[0], 1, *size), align_corners=True) + (flow.movedim(1, -1) * scale).flip(-1)
    return F.grid_sample(x, grid, mode="bilinear", align_corners=True)


@pytest.mark.parametrize("nd", [2, 3])
def test_affine_then_field_in_pixels(device, nd):
    """``flow_sample(x, u, theta)`` with a VoxelMorph-style field (pixels, index order, channels first):
    A x + u(x), values and the gradients to the input, the field and theta."""
    shape = (2, 3, 9, 11) if nd == 2 else (1, 2, 5, 6, 7)
    gen = torch.Generator().manual_seed(20 + nd)
    x = make_input(shape, torch.float32, "contiguous", device, gen).requires_grad_()
    flow = (1.5 * torch.randn(shape[0], nd, *shape[2:], generator=gen)).to(device).requires_grad_()
    theta = torch.eye(nd, nd + 1) + 0.1 * torch.randn(shape[0], nd, nd + 1, generator=gen)
    theta = theta.to(device).requires_grad_()
    out = st.flow_sample(x, flow, theta, align_corners=True)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, flow, theta)]
    want = _affine_pixels_oracle(*leaves)
    assert_close(out, want, torch.float32, "output")
    g = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (x, flow, theta), g.to(device))
    ref = torch.autograd.grad(want, leaves, g.double())
    for name, a, b in zip(("input", "flow", "theta"), got, ref):
        assert_close(a, b, torch.float32, f"grad {name}", scale_by_max=name != "input")
    assert got[1].stride() == flow.stride()  # channels first, as the field came


def test_k_maps_share_one_field(device):
    """theta with K = 3 and one field: the field is read in place for every k (a zero stride) and its
    gradient sums over the K warps; the same as the field repeated K times."""
    gen = torch.Generator().manual_seed(31)
    x = make_input((2, 3, 6, 7), torch.float32, "contiguous", device, gen)
    flow = (0.8 * torch.randn(2, 2, 6, 7, generator=gen)).to(device).requires_grad_()
    theta = (torch.eye(2, 3) + 0.1 * torch.randn(2, 3, 2, 3, generator=gen)).to(device).requires_grad_()
    out = st.flow_sample(x, flow, theta)
    assert out.shape == (2, 3, 3, 6, 7)
    rep = flow.detach()[:, None].repeat(1, 3, 1, 1, 1).requires_grad_()
    want = st.flow_sample(x, rep, theta)
    assert_close(out, want, torch.float32, "output")
    g = torch.randn(out.shape, generator=gen).to(device)
    (gf,) = torch.autograd.grad(out, flow, g)
    (gr,) = torch.autograd.grad(want, rep, g)
    assert_close(gf, gr.sum(1), torch.float32, "grad flow", scale_by_max=True)


class _Sizes(TorchDispatchMode):
    """The element counts of the tensors the dispatched ops return in new memory (not views of
    ``known`` tensors' storage)."""

    def __init__(self, *known):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.numels = {}  # storage -> its tensors' largest element count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                ptr = t.untyped_storage().data_ptr()
                self.numels[ptr] = max(self.numels.get(ptr, 0), t.numel())
        return out


@pytest.mark.parametrize("nd,units,affine", [(2, "pixels", False), (2, "normalized", True), (3, "pixels", True)])
def test_no_sampling_grid_is_made(device, nd, units, affine):
    """The field is read in place, in pixels or normalised units, with or without theta: no new tensor of
    a grid's size in the forward (no grid, no converted field); in the backward one, the field's own
    gradient, in the field's layout (channels first here)."""
    shape = (2, 3, 6, 7) if nd == 2 else (1, 2, 4, 5, 6)
    gen = torch.Generator().manual_seed(9)
    x = make_input(shape, torch.float32, "contiguous", device, gen).requires_grad_()
    u = (0.1 * torch.randn(shape[0], nd, *shape[2:], generator=gen)).to(device).requires_grad_()
    theta = (torch.eye(nd, nd + 1) + 0.05 * torch.randn(shape[0], nd, nd + 1, generator=gen)).to(device)
    theta = theta.requires_grad_() if affine else None
    field = u.numel()
    with _Sizes(x, u) as seen:
        out = st.flow_sample(x, u, theta, units=units)
    assert field not in seen.numels.values()
    with _Sizes(x, u) as seen:
        grads = torch.autograd.grad(out, (x, u) + ((theta,) if affine else ()), torch.ones_like(out))
    assert list(seen.numels.values()).count(field) == 1  # the field's gradient, written once
    assert grads[1].shape == u.shape and grads[1].stride() == u.stride()


@pytest.mark.parametrize("args, kwargs, words", [
    ((torch.zeros(1, 1, 5, 6), torch.zeros(1, 5, 6, 2)), {}, ["flow", "(N, 2, Ho, Wo)", "pass layout='grid'"]),
    ((torch.zeros(1, 1, 5, 6), torch.zeros(1, 2, 5, 6)), {"layout": "grid"}, ["pass layout='channels_first'"]),
    ((torch.zeros(1, 1, 5, 6), torch.zeros(1, 3, 5, 6)), {}, ["flow", "(N, 2, Ho, Wo)", "(1, 3, 5, 6)"]),
    ((torch.zeros(1, 1, 4, 5, 6), torch.zeros(1, 2, 4, 5, 6)), {}, ["flow", "(N, 3, Do, Ho, Wo)", "5-D input"]),
    ((torch.zeros(2, 1, 5, 6), torch.zeros(1, 2, 5, 6)), {}, ["flow: batch size 1", "input, 2"]),
    ((torch.zeros(1, 1, 5, 6), torch.zeros(1, 2, 5, 6)), {"units": "voxels"}, ["units", "'pixels'", "'voxels'"]),
    ((torch.zeros(1, 1, 5, 6), torch.zeros(1, 2, 5, 6)), {"layout": "nhwc"}, ["layout", "'channels_first'", "'nhwc'"]),
    ((torch.zeros(1, 1, 1, 6), torch.zeros(1, 2, 5, 6)), {"align_corners": True}, ["units", "size 1", "normalized"]),
    ((torch.zeros(1, 1, 5, 6), torch.zeros(1, 2, 5, 6), torch.zeros(1, 3, 4)), {},
     ["theta", "(N, 2, 3)", "(1, 3, 4)", "5-D input"]),
    ((torch.zeros(1, 1, 5, 6), torch.zeros(1, 2, 2, 5, 6), torch.zeros(1, 3, 2, 3)), {},
     ["theta: 3 affine maps", "2 fields"]),
    ((torch.zeros(2, 1, 5, 6), torch.zeros(2, 2, 5, 6), torch.zeros(1, 2, 3)), {}, ["theta: batch size 1"]),
], ids=["grid-given-as-channels-first", "channels-first-given-as-grid", "components", "2d-field-3d-input", "batch",
        "units", "layout", "size-one-axis", "theta-shape", "theta-k", "theta-batch"])
def test_bad_arguments(args, kwargs, words):
    with pytest.raises(st.ArgumentError) as e:
        st.flow_sample(*args, **kwargs)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("form", ["flow", "affine_flow"])
def test_opcheck(device, form):
    """The ops' schema, fake implementation, autograd registration and dynamic-shape tracing, on a
    channels-first field in pixels (a view, its frame reversed and scaled)."""
    fwd, bwd = ops.OPS[form]
    assert fwd._qualname == f"stn_triton::{form}_sample"
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 6, 7, generator=gen).to(device).requires_grad_()
    (u,) = make_params("flow", 2, 2, (4, 5), True, torch.float32, device, gen)
    u = u.movedim(-1, 2).contiguous().movedim(2, -1).requires_grad_()  # a channels-first field, as a view
    frame = ops.constant(flow_form.frame(2, (2 / 6, 2 / 5), index_order=True), device)
    theta = (torch.eye(2, 3) + 0.1 * torch.randn(2, 2, 2, 3, generator=gen)).to(device).requires_grad_()
    params = (u, frame) if form == "flow" else (theta, u, frame)
    torch.library.opcheck(fwd, (x, *params, [4, 5], "bilinear", "border", True))
    grad = torch.randn(2, 2, 3, 4, 5, generator=gen).to(device)
    needs = [True] * len(params) + [False]
    torch.library.opcheck(bwd, (grad, x.detach(), *[p.detach() for p in params], [4, 5], "bilinear", "border", True,
                                needs), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(device):
    """A registration step as a network writes it: a convolution outputs the field (pixels, channels
    first) and a learnt affine goes with it; ``torch.compile(fullgraph=True)`` traces ``flow_sample``
    (the frame a constant) and gives eager's loss and gradients."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
            self.theta = torch.nn.Parameter(torch.eye(2, 3)[None] + 0.05)

        def forward(self, moving, fixed):
            flow = self.conv(torch.cat([moving, fixed], 1))
            moved = st.flow_sample(moving, flow, self.theta.expand(moving.shape[0], 2, 3), align_corners=True)
            return (moved - fixed).square().mean()

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(40)
    moving, fixed = (torch.randn(2, 1, 9, 11, generator=gen).to(device) for _ in range(2))
    net = Net().to(device)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(moving, fixed)
    got = torch.autograd.grad(loss, (net.conv.weight, net.theta))
    loss_e = net(moving, fixed)
    want = torch.autograd.grad(loss_e, (net.conv.weight, net.theta))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
