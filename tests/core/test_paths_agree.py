"""The default CPU path (PyTorch reference) keeps the README's promises exactly as the kernels do:
outputs in the input's memory format, and under ``torch.autocast`` the map sampled in the autocast
dtype with the parameters in float32. Each case runs on both paths and compares them."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
from _cases import FORMS, make_params, run

PATHS = ("reference", "interpreter")


@pytest.fixture
def on_path(monkeypatch, device):
    """Switch the CPU path: the reference (what a user gets by default) or Triton's interpreter."""
    if device != "cpu":
        pytest.skip("the CPU paths")

    def use(path):
        monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "interpreter" else "0")

    return use


def _inputs(form, K, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 9, 10, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    params = make_params(form, 2, K, (6, 7), False, torch.float32, "cpu", gen)
    if K == 1:
        params = (params[0][:, 0], *params[1:])
    return x, params


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("form", FORMS)
def test_output_keeps_the_input_memory_format(on_path, form, K):
    outs = {}
    for path in PATHS:
        on_path(path)
        x, params = _inputs(form, K, "channels_last")
        assert st.backend(x) == path
        out = run(form, x, params, (6, 7))
        if K == 1:
            assert out.is_contiguous(memory_format=torch.channels_last), path
        else:
            assert out.shape[1] == K and out.stride(2) == 1, path  # channels innermost
        assert run(form, x.contiguous(), params, (6, 7)).is_contiguous(), path
        outs[path] = out
    torch.testing.assert_close(outs["reference"], outs["interpreter"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("form", FORMS)
def test_autocast_the_same_on_every_path(on_path, form):
    """The map in bfloat16, the parameters and their gradients in float32, the input's gradient in
    its own dtype, on both paths, with the same values."""
    results = {}
    for path in PATHS:
        on_path(path)
        x, params = _inputs(form, 2, "contiguous", seed=3)
        x.requires_grad_()
        params = [p.requires_grad_() for p in params]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(form, x, params, (6, 7))
        assert out.dtype == torch.bfloat16, path
        grads = torch.autograd.grad(out.float().square().sum(), (x, *params))
        assert grads[0].dtype == torch.float32
        assert all(g.dtype == torch.float32 for g in grads[1:]), path
        results[path] = (out, grads)
    ref, inter = results["reference"], results["interpreter"]
    torch.testing.assert_close(ref[0].float(), inter[0].float(), rtol=1.6e-2, atol=1.6e-2)
    for a, b in zip(ref[1], inter[1]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * max(1.0, b.abs().max().item()))


def test_autocast_keeps_the_coordinates_in_float32(on_path):
    """The reference path computes its grid with autocast off: a bf16 grid would be off by more than
    a pixel at 448 px. Sampling under autocast equals sampling the bf16 map without it."""
    on_path("reference")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 448, 448, generator=gen)
    h = torch.eye(3)[None] + 0.01 * torch.randn(1, 3, 3, generator=gen)  # an einsum (matmul) makes the grid
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = st.projective_sample(x, h, (224, 224))
    plain = st.projective_sample(x.to(torch.bfloat16), h, (224, 224))
    assert torch.equal(under, plain)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_path_is_differentiable_twice(on_path, dtype):
    """The default CPU path is plain autograd: second derivatives exist there (float32 makes its affine
    grid on its own base grid, float64 with F.affine_grid: both), and agree with PyTorch's."""
    on_path("reference")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 5, 6, dtype=dtype, generator=gen).requires_grad_()
    theta = (torch.eye(2, 3, dtype=dtype) * 0.8 + 0.1 * torch.randn(2, 3, dtype=dtype, generator=gen))[None]
    theta.requires_grad_()
    second = {}
    for name, f in (("ours", lambda: st.affine_sample(x, theta, (4, 4))),
                    ("torch", lambda: F.grid_sample(x, F.affine_grid(theta, (1, 2, 4, 4), align_corners=False),
                                                    align_corners=False))):
        (gx,) = torch.autograd.grad(f().square().sum(), x, create_graph=True)
        second[name] = torch.autograd.grad(gx.square().sum(), theta)[0]
    assert torch.isfinite(second["ours"]).all() and second["ours"].abs().sum() > 0
    torch.testing.assert_close(second["ours"], second["torch"])


@pytest.mark.parametrize("nd", [2, 3])
def test_reference_affine_is_bitwise_pytorchs_in_float32(on_path, nd):
    """On the default CPU path a float32 affine transform makes its grid as ``theta @ base`` (a third of
    ``F.affine_grid``'s time on the CPU), which must round exactly as ``F.affine_grid`` does: output and
    both gradients equal ``F.grid_sample(x, F.affine_grid(theta))`` bit for bit, at odd sizes, one-pixel
    axes, both alignments, zoom-in and down-sampling."""
    on_path("reference")
    gen = torch.Generator().manual_seed(11)
    sizes = [(7, 5), (1, 9), (33, 2), (28, 28)] if nd == 2 else [(3, 5, 4), (1, 2, 7), (6, 6, 6)]
    for i, size in enumerate(sizes):
        for align_corners in (False, True):
            n = 5 if i % 2 else 32
            shape = (n, 2, *[s + 3 * (i % 2) - 1 if s > 1 else 4 for s in size])
            x = torch.randn(shape, generator=gen).requires_grad_()
            eye = torch.eye(nd, nd + 1)
            theta = (eye * (0.5 + 1.5 * torch.rand(n, 1, 1, generator=gen))
                     + 0.3 * torch.randn(n, nd, nd + 1, generator=gen)).requires_grad_()
            with warnings.catch_warnings():  # PyTorch's one-pixel align_corners=True warning, both sides
                warnings.simplefilter("ignore", UserWarning)
                ours = st.affine_sample(x, theta, size, align_corners=align_corners)
                grid = F.affine_grid(theta, (n, 2, *size), align_corners=align_corners)
            want = F.grid_sample(x, grid, align_corners=align_corners)
            g = torch.randn(want.shape, generator=gen)
            assert torch.equal(ours, want), (size, align_corners)
            for a, b in zip(torch.autograd.grad(ours, (x, theta), g), torch.autograd.grad(want, (x, theta), g)):
                assert torch.equal(a, b), (size, align_corners)
