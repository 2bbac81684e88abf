"""The default CPU path (PyTorch reference) keeps the README's promises exactly as the kernels do:
outputs in the input's memory format, and under ``torch.autocast`` the map sampled in the autocast
dtype with the parameters in float32. Each case runs on both paths and compares them."""

import pytest
import torch

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


def test_reference_path_is_differentiable_twice(on_path):
    """The default CPU path is plain autograd: second derivatives exist there."""
    on_path("reference")
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    theta = (torch.eye(2, 3, dtype=torch.float64) * 0.8)[None].requires_grad_()
    (gx,) = torch.autograd.grad(st.affine_sample(x, theta, (4, 4)).square().sum(), x, create_graph=True)
    (gt,) = torch.autograd.grad(gx.sum(), theta)
    assert torch.isfinite(gt).all()
