"""Plugin families fused (stn_triton.kernels.plugin): a family's own Triton map in the kernels, against
its own explicit-grid path (its PyTorch ``grid``, then ``grid_sample``, float64, kernels in the
interpreter), in value and in the gradients to the input and to theta, every mode and padding; with
its own gradient terms (log-polar and lens distortion, each published by a distribution of its own
through an entry point) and without (a test-only family, 2-D and 3-D, through the grid's
vector-Jacobian product); no grid tensor made by the fused forward; clear errors for broken families."""

import importlib
import itertools
import os
import sys
from pathlib import Path

import pytest
import torch

import stn_triton as st
from stn_triton.kernels import forms
from transforms_registry import TransformFamily, get_transform, list_transforms, register_transform
from _cases import PADDINGS, assert_close, make_input, oracle
from _wave import Broken, Scalar, ShortGrad, Undefined, Wave, Wave3d

PLUGINS = {"logpolar": ("stn_logpolar", "LogPolar"), "lens": ("stn_lens", "RadialDistortion")}


@pytest.fixture(scope="module", autouse=True)
def plugin_families():
    """log-polar and lens come from their distributions (installed by scripts/env.sh: required there).
    Where they are not installed (a bare GPU machine running the source tree), they are registered
    from plugins/ in the source tree, so that the kernels are still tested."""
    missing = [n for n in PLUGINS if n not in list_transforms()]
    if missing and os.environ.get("STN_TRITON_REQUIRE_PLUGIN") == "1":
        pytest.fail(f"plugin families {missing} are not installed (scripts/env.sh installs plugins/)")
    root = Path(__file__).resolve().parents[2] / "plugins"
    for name in missing:
        sys.path.insert(0, str(root / name))
        module, cls = PLUGINS[name]
        register_transform(getattr(importlib.import_module(module), cls), name=name)


MODES = ("bilinear", "nearest", "bicubic")
# per family: theta near its identity, (N, K, P); every mode and padding over the families' cases
THETAS = {
    "logpolar": lambda g: 0.2 * torch.randn(2, 2, 2, generator=g),
    "lens": lambda g: torch.tensor([0.3, -0.1, 0.0, 0.0]) + 0.1 * torch.randn(2, 2, 4, generator=g),
    "wave": lambda g: 0.15 * torch.randn(2, 2, 3, generator=g),
    "wave3d": lambda g: 0.15 * torch.randn(1, 2, 2, generator=g),
}
FAMILIES = {"logpolar": lambda: get_transform("logpolar"), "lens": lambda: get_transform("lens"), "wave": Wave,
            "wave3d": Wave3d}
PAIRS = list(itertools.product(MODES, PADDINGS))
CASES = ([("logpolar", m, p, i % 2 == 0) for i, (m, p) in enumerate(PAIRS)]
         + [("lens", m, p, i % 2 == 1) for i, (m, p) in enumerate(PAIRS)]
         + [("wave", m, p, ac) for m, p, ac in zip(MODES, PADDINGS, (False, True, False))]
         + [("wave3d", m, p, ac) for m, p, ac in zip(MODES, PADDINGS[::-1], (True, False, False))])


@pytest.mark.parametrize("name,mode,padding_mode,align_corners", CASES,
                         ids=[f"{n}-{m}-{p}-ac{int(a)}" for n, m, p, a in CASES])
def test_fused_family_equals_its_grid(device, name, mode, padding_mode, align_corners):
    family = FAMILIES[name]()
    gen = torch.Generator().manual_seed(sum(map(ord, name + mode + padding_mode)))
    three = family.ndim == 3
    shape, size = ((1, 2, 4, 5, 6), (3, 4, 5)) if three else ((2, 3, 9, 11), (7, 8))
    x = make_input(shape, torch.float32, "channels_last" if name == "lens" else "contiguous", device, gen)
    x.requires_grad_()
    theta = THETAS[name](gen).to(device).requires_grad_()
    out = st.spatial_transform(x, theta, family, size, mode=mode, padding_mode=padding_mode,
                               align_corners=align_corners)
    assert st.backend(x) != "reference" and out.shape == (theta.shape[0], theta.shape[1], shape[1], *size)
    form = forms.plugin_form(family)
    ref, x64, (t64,) = oracle(form.name, x, (theta,), size, mode, padding_mode, align_corners)
    assert_close(out, ref, torch.float32, "output")
    g = torch.randn(out.shape, generator=gen).to(device)
    got = torch.autograd.grad(out, (x, theta), g)
    want = torch.autograd.grad(ref, (x64, t64), g.double().cpu())
    assert_close(got[0], want[0], torch.float32, "grad x")
    assert_close(got[1], want[1], torch.float32, "grad theta", scale_by_max=True)


def test_published_by_distributions_of_their_own():
    """log-polar and lens distortion come from distributions of their own (entry points); nothing of
    theirs is in this project's package."""
    import stn_lens
    import stn_logpolar

    assert {"logpolar", "lens"} <= set(list_transforms())
    for module in (stn_logpolar, stn_lens):
        assert "stn_triton" not in module.__file__.replace("stn-triton", "")
    assert forms.plugin_form(get_transform("lens")).grad_fn is not None
    assert forms.plugin_form(Wave()).vjp


def test_no_grid_is_made(device):
    """The fused forward makes no tensor of a grid's size (the family's map runs in the kernel)."""
    from test_flow import _Sizes

    gen = torch.Generator().manual_seed(3)
    x = make_input((2, 3, 9, 11), torch.float32, "contiguous", device, gen)
    theta = (0.2 * torch.randn(2, 2, generator=gen)).to(device)
    grid = 2 * 7 * 8 * 2
    with _Sizes(x, theta) as seen:
        out = st.spatial_transform(x, theta, "logpolar", (7, 8))
    assert grid not in seen.numels.values() and out.shape == (2, 3, 7, 8)


@pytest.mark.parametrize("family,words", [
    (Broken, r"(?s)_broken_coords.*triton_coords\(p, x, y\) -> \(gx, gy\)"),
    (Undefined, r"(?s)_undefined_coords.*triton_coords\(p, x, y\) -> \(gx, gy\)"),
    (Scalar, r"(?s)_scalar_coords.*one block per axis, of the coordinates' shape"),
    (ShortGrad, r"triton_grad .*_wave_grad_short.*returns 2 values; expected 3, one term per parameter"),
], ids=["one-value-too-few", "does-not-compile", "a-scalar", "one-term-too-few"])
def test_broken_family_is_named(device, family, words):
    """A family's Triton code that returns the wrong number of values (checked before its first launch),
    or calls what Triton lacks: a FamilyKernelError naming the function, not an interpreter's traceback
    nor a silently dropped gradient."""
    x = torch.randn(1, 1, 5, 6, device=device)
    with pytest.raises(st.FamilyKernelError, match=words):
        st.spatial_transform(x, torch.zeros(1, 3, device=device), family(), (4, 4))


def test_family_contract_errors():
    x = torch.randn(1, 1, 5, 6)

    class NoGrid(TransformFamily):
        num_params = 3
        triton_coords = Wave.triton_coords

        def identity(self):
            return torch.zeros(3)

    with pytest.raises(st.ArgumentTypeError, match=r"defines triton_coords but not grid\(theta, size, align_corners\)"):
        st.spatial_transform(x, torch.zeros(1, 3), NoGrid(), (4, 4))

    class NotJit(Wave):
        triton_coords = staticmethod(lambda p, x, y: (x, y))

    with pytest.raises(st.ArgumentTypeError, match="triton_coords must be a @triton.jit function"):
        st.spatial_transform(x, torch.zeros(1, 3), NotJit(), (4, 4))
    with pytest.raises(st.ArgumentError, match=r"takes 3 parameters"):
        st.spatial_transform(x, torch.zeros(1, 2), Wave(), (4, 4))
    with pytest.raises(st.ArgumentError, match=r"3-D and takes a 5-D x"):
        st.spatial_transform(x, torch.zeros(1, 2), Wave3d(), (4, 4))


def _blobs(n, gen, size=24):
    """Gaussian blobs (sigma 0.15) centred at random points of [-0.4, 0.4]^2 (x, y), and the centres."""
    c = (torch.rand(n, 2, generator=gen) - 0.5) * 0.8
    lin = (torch.arange(size) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    d2 = (xx[None] - c[:, 0, None, None]) ** 2 + (yy[None] - c[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * 0.15 ** 2))[:, None], c


def test_logpolar_transformer_learns_the_origin(monkeypatch, device):
    """A SpatialTransformer with the log-polar family, trained on blobs so that its output is the same
    at every angle and bright near the origin (no labels, no supervision of theta): the origin it
    predicts moves onto the blob's centre (measured: mean distance on held-out blobs). Trained on the
    CPU's reference path (seconds); the trained model's fused output then equals it."""
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    stn = st.SpatialTransformer(transform="logpolar", size=(16, 16), return_theta=True)
    held, centres = _blobs(256, gen)
    with torch.no_grad():
        before = (stn(held)[1] - centres).norm(dim=1).mean().item()
    opt = torch.optim.Adam(stn.parameters(), lr=3e-3)
    for _ in range(150):
        x, _ = _blobs(32, gen)
        out, _ = stn(x)
        loss = out.var(dim=2).mean() - out[..., :4].mean()  # rows are angles, the first columns small radii
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = (stn(held)[1] - centres).norm(dim=1).mean().item()
    assert before > 0.25 and after < 0.05 * before, (before, after)  # 0.31 -> 0.0065 here
    monkeypatch.delenv("STN_TRITON_FORCE_REFERENCE")
    x = held[:4].to(device)
    fused, theta = stn.to(device)(x)
    assert st.backend(x) != "reference"
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")
    assert_close(fused, st.spatial_transform(x, theta, "logpolar", (16, 16)), torch.float32, "fused after training")


def test_deterministic_half_precision_and_op(device):
    """The plugin form through the deterministic backward (bit-identical runs, equal to the oracle),
    in bfloat16 channels-last (float32 accumulation), and its op's schema, fake and autograd."""
    from stn_triton import ops

    family = get_transform("lens")
    form = forms.plugin_form(family)
    gen = torch.Generator().manual_seed(8)
    x = make_input((2, 16, 9, 11), torch.bfloat16, "channels_last", device, gen).requires_grad_()
    theta = (torch.tensor([0.3, -0.1, 0.0, 0.0]) + 0.1 * torch.randn(2, 2, 4, generator=gen)).to(device)
    theta.requires_grad_()
    out = st.spatial_transform(x, theta, family, (12, 10))
    g = torch.randn(out.shape, generator=gen).to(device, torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.autograd.grad(st.spatial_transform(x, theta, family, (12, 10)), (x, theta), g)
        second = torch.autograd.grad(st.spatial_transform(x, theta, family, (12, 10)), (x, theta), g)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    ref, x64, (t64,) = oracle(form.name, x, (theta,), (12, 10), "bilinear", "zeros", False)
    assert_close(out, ref, torch.bfloat16, "output")
    want = torch.autograd.grad(ref, (x64, t64), g.double().cpu())
    assert_close(first[0], want[0], torch.bfloat16, "grad x")
    assert_close(first[1], want[1], torch.bfloat16, "grad theta", scale_by_max=True)
    fwd, bwd = ops.ops_for(form.name)
    x32, t32 = x.detach().float(), theta.detach()
    torch.library.opcheck(fwd, (x32, t32, [12, 10], "bilinear", "border", True))
    grad = torch.randn(2, 2, 16, 12, 10, generator=gen).to(device)
    torch.library.opcheck(bwd, (grad, x32, t32, [12, 10], "bilinear", "border", True, [True, True]),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(device):
    """A SpatialTransformer with a plugin family (its form and ops made when the module is built)
    traces with ``torch.compile(fullgraph=True)`` and gives eager's output and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    stn = st.SpatialTransformer(transform="lens", size=(12, 12)).to(device)
    x = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    compiled = torch.compile(stn, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out = compiled(x)
    got = torch.autograd.grad(out.square().mean(), (x, stn.head.bias))
    want = torch.autograd.grad(stn(x).square().mean(), (x, stn.head.bias))
    torch.testing.assert_close(out, stn(x))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
