"""The deterministic input gradient by inverse-map gather (affine forms, linear sampling).

Under ``torch.use_deterministic_algorithms(True)`` an affine form's input gradient is gathered through
the inverse map (:mod:`stn_triton.kernels.inverse`): no sort, no index buffer, no atomics. Checked here,
with the kernels running and every new buffer poisoned with NaN: the path is taken where it should be
and not elsewhere, its gradients equal the float64 oracle (downsampling, zoom-in with hundreds of
contributions per input pixel, K > 1, odd sizes, channel groups, both align_corners, border and
reflection padding where the map stays inside the input, 3-D), they are the same bit for bit on every
run, and the cases it does not serve (sources outside the input under border/reflection padding, a
near-singular map, nearest, other forms, many channels) take the sorted gather and are right too.

Where the maps allow (classes of output pixels whose taps never meet, at most ``launch.CLASS_MAX`` per
axis), the class backward takes these cases first: checked on the same cases against the oracle, bit
for bit across runs.
"""

import pytest
import torch
import torch.nn.functional as F

from stn_triton.kernels import inverse, launch
from stn_triton.kernels.forms import FORMS

from _cases import check_given, make_input, make_params, run


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def paths(monkeypatch):
    """Counts the launches of each deterministic path: the inverse-map gather and the sorted one (the
    class backward, which would take most of these cases first, is off: see ``classes`` below)."""
    monkeypatch.setattr(launch, "CLASS_MAX", 0)
    seen = {"inverse": 0, "sorted": 0}
    real_inverse, real_sort = launch._grad_input_inverse, launch.torch.sort

    def inverse_spy(*args, **kwargs):
        seen["inverse"] += 1
        return real_inverse(*args, **kwargs)

    def sort_spy(*args, **kwargs):
        seen["sorted"] += 1
        return real_sort(*args, **kwargs)

    monkeypatch.setattr(launch, "_grad_input_inverse", inverse_spy)
    monkeypatch.setattr(launch.torch, "sort", sort_spy)
    return seen


def _theta(N, K, nd, scale, shear, shift, gen):
    """Affine maps (N, K, nd, nd + 1): ``scale`` times the identity, random shear and shift."""
    theta = torch.eye(nd, nd + 1, dtype=torch.float64).expand(N, K, nd, nd + 1) * scale
    theta = theta + torch.cat([shear * torch.randn(N, K, nd, nd, generator=gen, dtype=torch.float64),
                               shift * torch.randn(N, K, nd, 1, generator=gen, dtype=torch.float64)], dim=3)
    return theta.float()


# (input shape, K, output size, theta scale, shear, shift, padding, align_corners, dtype, layout)
SERVED = {
    "down-odd": ((2, 3, 13, 17), 2, (7, 9), 1.0, 0.2, 0.2, "zeros", False, torch.float32, "contiguous"),
    # 7 x 7 output pixels per input pixel, 4 taps each: about 200 contributions per input pixel
    "zoom-hundreds": ((1, 1, 3, 4), 1, (21, 28), 1.0, 0.05, 0.1, "zeros", True, torch.float32, "contiguous"),
    "rotate-k3": ((1, 3, 9, 11), 3, (12, 10), 0.8, 0.5, 0.3, "zeros", False, torch.float32, "strided"),
    "channel-groups": ((2, 6, 8, 9), 2, (8, 9), 1.1, 0.3, 0.1, "zeros", True, torch.float32, "channels_last"),
    "border-inside": ((2, 3, 13, 17), 2, (11, 9), 0.5, 0.05, 0.05, "border", False, torch.float32, "contiguous"),
    "reflection-inside": ((2, 3, 13, 17), 1, (11, 9), 0.5, 0.05, 0.05, "reflection", True, torch.float32,
                          "contiguous"),
    "bf16-channels-last": ((1, 8, 9, 10), 2, (9, 10), 1.0, 0.2, 0.1, "zeros", False, torch.bfloat16, "channels_last"),
    "3d-down": ((1, 3, 5, 6, 7), 2, (4, 5, 6), 1.0, 0.2, 0.2, "zeros", False, torch.float32, "contiguous"),
    # about 2.1 output voxels per input voxel on each axis, 8 taps each: about 75 contributions per input voxel
    "3d-zoom": ((1, 1, 3, 3, 3), 1, (5, 5, 5), 0.8, 0.03, 0.05, "border", True, torch.float32, "contiguous"),
}


RERUN = ("rotate-k3", "3d-down")  # run twice: the same bits (the order is fixed by construction)


@pytest.mark.parametrize("name", list(SERVED))
def test_inverse_gather_against_oracle(request, device, deterministic, paths, name):
    shape, K, size, scale, shear, shift, padding, align, dtype, layout = SERVED[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    nd = len(size)
    x = make_input(shape, dtype, layout, device, gen)
    theta = _theta(shape[0], K, nd, scale, shear, shift, gen).to(device)
    check_given("affine" if nd == 2 else "affine3d", x, (theta,), size, "bilinear", padding, align, gen)
    assert paths == {"inverse": 1, "sorted": 0}
    if name not in RERUN:
        return
    # the same bits on a second run
    grad_out = torch.randn(shape[0], K, *shape[1:2], *size, generator=gen).to(device, dtype)
    first, second = (torch.autograd.grad(run("affine", x, (theta,), size, padding_mode=padding, align_corners=align),
                                         x, grad_out)[0] for _ in range(2))
    assert torch.equal(first, second)


@pytest.fixture
def classes(monkeypatch):
    """The class backward's classes per axis, one entry per deterministic backward that took it; and
    whether any other deterministic path ran. Small images and many launches allowed (the tests' sizes)."""
    monkeypatch.setattr(launch, "CLASS_MIN_PIXELS", 1)
    monkeypatch.setattr(launch, "CLASS_MAX_LAUNCHES", 256)
    seen = {"classes": [], "other": 0}
    real_class, real_gather = launch._class_backward, launch._grad_input_deterministic

    def class_spy(pb, grad_out, s, need_param):
        seen["classes"].append(s)
        return real_class(pb, grad_out, s, need_param)

    def gather_spy(*args, **kwargs):
        seen["other"] += 1
        return real_gather(*args, **kwargs)

    monkeypatch.setattr(launch, "_class_backward", class_spy)
    monkeypatch.setattr(launch, "_grad_input_deterministic", gather_spy)
    return seen


# the class backward: (input shape, K, output size, theta scale, shear, shift, padding, align_corners, dtype,
# layout, classes per axis expected; None: past CLASS_MAX, so another deterministic path runs)
CLASSES = {
    "down-2x": ((2, 3, 22, 30), 2, (11, 15), 1.0, 0.1, 0.1, "zeros", False, torch.float32, "contiguous", 2),
    "same-size-k3": ((1, 3, 13, 17), 3, (13, 17), 1.0, 0.1, 0.2, "zeros", True, torch.float32, "strided", 4),
    "border-inside": ((2, 3, 13, 17), 2, (6, 8), 0.6, 0.05, 0.05, "border", False, torch.float32, "contiguous", 3),
    "reflection-inside": ((1, 3, 13, 17), 2, (6, 8), 0.6, 0.05, 0.05, "reflection", True, torch.float32,
                          "contiguous", 3),
    "bf16-channels-last": ((1, 8, 18, 20), 2, (9, 10), 1.0, 0.1, 0.1, "zeros", False, torch.bfloat16, "channels_last",
                           2),
    "3d-down": ((1, 3, 9, 10, 11), 2, (4, 5, 6), 1.0, 0.1, 0.1, "zeros", False, torch.float32, "contiguous", 2),
    "3d-same": ((1, 2, 6, 7, 8), 1, (6, 7, 8), 1.0, 0.05, 0.1, "zeros", True, torch.float32, "channels_last_3d", 3),
    "zoom-in": ((1, 2, 5, 6), 1, (15, 18), 1.0, 0.05, 0.1, "zeros", False, torch.float32, "contiguous", None),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_class_backward_against_oracle(request, device, deterministic, classes, name):
    """Each map's pixels in classes whose taps never meet, added without atomics in a fixed order: the
    float64 oracle's gradients (input and theta), the same bits on a second run; maps that would need
    more than CLASS_MAX classes per axis (zoom-in) take another deterministic path."""
    shape, K, size, scale, shear, shift, padding, align, dtype, layout, want = CLASSES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    nd = len(size)
    x = make_input(shape, dtype, layout, device, gen)
    theta = _theta(shape[0], K, nd, scale, shear, shift, gen).to(device)
    form = "affine" if nd == 2 else "affine3d"
    check_given(form, x, (theta,), size, "bilinear", padding, align, gen)
    assert classes == ({"classes": [want], "other": 0} if want else {"classes": [], "other": 1})
    if want:  # the same bits on a second run, input and theta
        grad_out = torch.randn(shape[0], K, *shape[1:2], *size, generator=gen).to(device, dtype)
        x, theta = x.detach().requires_grad_(), theta.detach().requires_grad_()
        first, second = (torch.autograd.grad(run(form, x, (theta,), size, padding_mode=padding, align_corners=align),
                                             (x, theta), grad_out) for _ in range(2))
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_class_stride():
    """s is the smallest integer above CLASS_MARGIN times the spread (the largest row sum of M^-1), at
    least 2; 0 past CLASS_MAX or without a table (an infinite spread)."""
    assert launch.class_stride(0.5) == 2  # 2x down-sampling: every other pixel
    assert launch.class_stride(1.0) == 3
    assert launch.class_stride(1.2) == 4
    assert launch.class_stride(1.3) == 4  # 2.5 * 1.3 = 3.25: 4 is the smallest integer above
    assert launch.class_stride(1.6) == 0  # 2.5 * 1.6 = 4: 5 would be, past CLASS_MAX
    assert launch.class_stride(float("inf")) == 0


@pytest.mark.parametrize("K,size,want", [(4, (224, 224), 2), (2, (224, 224), 2), (5, (224, 224), 0),
                                         (1, (28, 28), 0), (1, (128, 128), 2), (1, (127, 128), 0)])
def test_class_backward_only_where_its_launches_are_few_and_full(K, size, want):
    """At most CLASS_MAX_LAUNCHES launches (classes times maps) and CLASS_MIN_PIXELS pixels per class and
    image: CUB's 224 x 224 with K = 4 maps at every other pixel (16 launches of 12,544 pixels) is served,
    mnist's 28 x 28 and five maps are not."""
    x = torch.empty(2, 3, 448, 448, device="meta")
    pb = launch._Problem("affine", x, torch.empty(2 * K, 6, device="meta"), None, K, size, 0, "bilinear", "zeros",
                         False)
    assert launch.class_stride(0.55, pb) == want


# cases the inverse map does not serve: the sorted gather, as right
FALLBACK = {
    # border padding with sources outside the input: the border pixels gather from outside the box
    "border-outside": ("affine", (2, 3, 9, 11), (7, 8), 1.3, 0.2, 0.2, "border", "bilinear"),
    "reflection-outside": ("affine", (1, 2, 9, 11), (7, 8), 1.3, 0.2, 0.2, "reflection", "bilinear"),
    # a near-singular map: its preimages are thin slivers across the whole output, their boxes huge
    "near-singular": ("affine", (1, 2, 9, 11), (12, 13), 0.0, 0.0, 0.1, "zeros", "bilinear"),
    "nearest": ("affine", (1, 2, 9, 11), (7, 8), 1.0, 0.2, 0.1, "zeros", "nearest"),
    # more channels than the launcher gives the inverse gather (it walks the box once per channel group)
    "many-channels": ("affine", (1, 33, 5, 6), (4, 5), 1.0, 0.2, 0.1, "zeros", "bilinear"),
    # one axis squeezed 24 times more than the other (condition about 46, past MAX_CONDITION): the
    # gather's float32 weights, made from the table's map, drifted 7e-5 from the forward's (a row of
    # pixels receiving about 24 contributions each); the sorted gather uses the forward's coordinates
    "anisotropic": ("affine", (1, 3, 9, 11), (12, 10), 1.0, 0.0, 0.0, "zeros", "bilinear"),
    "projective": ("projective", None, None, None, None, None, "zeros", "bilinear"),
}


@pytest.mark.parametrize("name", list(FALLBACK))
def test_fallback_to_sorted_gather(request, device, deterministic, paths, name):
    form, shape, size, scale, shear, shift, padding, mode = FALLBACK[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if form == "affine":
        x = make_input(shape, torch.float32, "contiguous", device, gen)
        theta = _theta(shape[0], 1, 2, scale, shear, shift, gen)
        if name == "near-singular":  # rank one plus a whisker: the two rows nearly parallel
            theta[..., 0, :2] = torch.tensor([0.9, 0.6])
            theta[..., 1, :2] = torch.tensor([0.6, 0.4 + 1e-3])
        if name == "anisotropic":  # the map that drifted (its pixel-unit rows (1.86, 0.23), (-0.04, 0.04))
            theta[..., :, :] = torch.tensor([[1.695, 0.191, 0.1], [-0.078, 0.1, 0.05]])
        check_given(form, x, (theta.to(device),), size, mode, padding, False, gen)
    else:
        shape, size = (1, 2, 7, 9), (6, 8)
        x = make_input(shape, torch.float32, "contiguous", device, gen)
        check_given(form, x, make_params(form, 1, 2, size, False, torch.float32, device, gen), size, mode, padding,
                    False, gen)
    assert paths["inverse"] == 0 and paths["sorted"] == 1


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("align", [False, True])
def test_table_is_the_forward_map(nd, align):
    """The table's pixel-unit map (s = M o + c) is the forward's: ``affine_grid`` unnormalised, in
    float64; and M^-1, c' invert it."""
    gen = torch.Generator().manual_seed(3 + nd + align)
    shape, size = ((2, 1, 7, 9), (5, 6)) if nd == 2 else ((2, 1, 4, 5, 6), (3, 4, 5))
    K = 2
    x = torch.zeros(shape)
    theta = _theta(shape[0], K, nd, 1.0, 0.1, 0.2, gen)
    pb = launch._Problem(FORMS["affine" if nd == 2 else "affine3d"], x, theta.reshape(shape[0] * K, -1), None, K,
                         size, 0, "bilinear", "zeros", align)
    table = inverse.inverse_table(pb, lambda t: t.fill_(float("nan")))
    assert table is not None
    table = table.double()
    assert torch.isfinite(table).all() and (table[:, inverse.OK] == 1).all()
    m = table[:, :9].reshape(-1, 3, 3)[:, :nd, :nd]
    minv = table[:, 9:18].reshape(-1, 3, 3)[:, :nd, :nd]
    cinv = table[:, 18:18 + nd]
    grid = F.affine_grid(theta.double().reshape(-1, nd, nd + 1), (shape[0] * K, 1, *size), align_corners=align)
    S = torch.tensor(shape[2:][::-1], dtype=torch.float64)  # x, y(, z) sizes
    want = ((grid + 1) * (S - 1) / 2) if align else (((grid + 1) * S - 1) / 2)
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in size], indexing="ij")[::-1],
                      dim=-1)  # (..., (x, y[, z])) output pixel indices
    c = -torch.einsum("nab,nb->na", m, cinv)
    got = torch.einsum("nab,...b->n...a", m, idx) + c.reshape(-1, *[1] * nd, nd)
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=0, atol=2e-5)
    torch.testing.assert_close(torch.einsum("nab,nbc->nac", minv, m), torch.eye(nd, dtype=torch.float64).expand_as(m),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_huge_maps_are_not_served(bad):
    """A map with a NaN, an infinity or an entry whose sums would overflow float32 keeps the sorted
    gather (which follows PyTorch there); so does a batch with one such map among good ones."""
    x = torch.zeros(2, 1, 5, 6)
    theta = torch.eye(2, 3).repeat(2, 1, 1)
    theta[1, 0, 1] = bad
    pb = launch._Problem(FORMS["affine"], x, theta.reshape(2, 6), None, 1, (4, 4), 0, "bilinear", "zeros", False)
    assert inverse.inverse_table(pb, lambda t: t.fill_(float("nan"))) is None
    pb = launch._Problem(FORMS["affine"], x[:1], theta[:1].reshape(1, 6), None, 1, (4, 4), 0, "bilinear", "zeros",
                         False)
    assert inverse.inverse_table(pb, lambda t: t.fill_(float("nan"))) is not None


def test_one_pixel_output_axis_with_align_corners_is_not_served():
    """align_corners with a one-pixel output axis: every output on that axis samples the same source
    (M's column is zero), no inverse; the sorted gather takes it."""
    x = torch.zeros(1, 1, 5, 6)
    theta = torch.eye(2, 3).reshape(1, 6)
    pb = launch._Problem(FORMS["affine"], x, theta, None, 1, (1, 4), 0, "bilinear", "zeros", True)
    assert inverse.inverse_table(pb, lambda t: t.fill_(float("nan"))) is None
