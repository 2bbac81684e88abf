"""Every form x mode x padding x align_corners x dtype x layout against the float64 reference,
forward and every gradient."""

import zlib

import pytest
import torch

import stn_triton as st
from _cases import (DTYPES, FORMS, LAYOUTS, MODES, PADDINGS, assert_close, affine_oracle, make_input,
                    make_params, oracle, run)


def gen_for(request):
    """A generator seeded from the test id: fresh random inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def check_case(request, device, form, mode, padding_mode, align_corners, dtype, layout,
               shape=(2, 3, 7, 13), K=2, size=(5, 11), spread=1.0, grads=True, tol_scale=1.0):
    gen = gen_for(request)
    x = make_input(shape, dtype, layout, device, gen)
    params = make_params(form, shape[0], K, size, align_corners, dtype, device, gen, spread)
    assert st.backend(x) != "reference", "the kernels must be under test, not the reference"
    x.requires_grad_(grads)
    for p in params:
        p.requires_grad_(grads)
    opts = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    out = run(form, x, params, size, **opts)
    ref, x64, p64 = oracle(form, x, params, size, **opts)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "output", tol_scale=tol_scale)
    if form == "affine":  # and against PyTorch itself, not only our reference
        assert_close(out, affine_oracle(x.detach(), params[0].detach(), size, mode, padding_mode, align_corners),
                     dtype, "output vs F.grid_sample", tol_scale=tol_scale)
    if not grads:
        return out
    grad_out = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    got = torch.autograd.grad(out, (x, *params), grad_out)
    want = torch.autograd.grad(ref, (x64, *p64), grad_out.double().cpu())
    assert_close(got[0], want[0], dtype, "grad x", tol_scale=tol_scale)
    for name, g, w in zip(("grad params", "grad basis"), got[1:], want[1:]):
        assert g.dtype == params[0].dtype or name == "grad basis"
        assert_close(g, w, dtype, name, scale_by_max=True, tol_scale=tol_scale)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_matrix(request, device, form, mode, padding_mode, align_corners, dtype, layout):
    check_case(request, device, form, mode, padding_mode, align_corners, dtype, layout)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape,size", [((1, 3, 7, 13), (7, 13)), ((2, 5, 11, 17), (13, 7)),
                                        ((3, 1, 1, 1), (3, 2)), ((1, 2, 1, 9), (1, 5))],
                         ids=["1x3x7x13", "2x5x11x17-to-13x7", "1x1-input", "1-row"])
@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
def test_odd_shapes(request, device, form, shape, size, align_corners):
    for padding_mode in ("zeros", "reflection"):
        check_case(request, device, form, "bilinear", padding_mode, align_corners, torch.float32, "contiguous",
                   shape=shape, K=3, size=size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_zoom_in_10x(request, device, form, mode):
    """Each input pixel receives ~100 contributions: the scatter (atomic or sorted) must sum them all."""
    check_case(request, device, form, mode, "border", False, torch.float32, "contiguous",
               shape=(1, 2, 6, 7), K=1, size=(60, 70), spread=0.05)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_downsample_2x(request, device, form, mode):
    check_case(request, device, form, mode, "zeros", True, torch.float32, "channels_last",
               shape=(2, 3, 30, 34), K=2, size=(15, 17), spread=0.2)


@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("form", FORMS)
def test_far_outside(request, device, form, padding_mode):
    """Coordinates tens of image widths away. Reflection folds them back into the image, where a
    float32 coordinate of ~500 pixels carries ~3e-5 pixels of rounding: the tolerance says so."""
    check_case(request, device, form, "bilinear", padding_mode, False, torch.float32, "contiguous",
               spread=40.0, tol_scale=25.0 if padding_mode == "reflection" else 1.0)


def test_output_memory_format(device):
    x = torch.randn(2, 3, 9, 8, device=device).contiguous(memory_format=torch.channels_last)
    theta = torch.eye(2, 3, device=device).expand(2, 2, 3)
    assert st.affine_sample(x, theta, (5, 4)).is_contiguous(memory_format=torch.channels_last)
    out_k = st.affine_sample(x, theta[:, None].expand(2, 3, 2, 3), (5, 4))
    assert out_k.shape == (2, 3, 3, 5, 4) and out_k.stride(2) == 1
    assert st.affine_sample(x.contiguous(), theta, (5, 4)).is_contiguous()


def test_parallel_transforms_equal_separate_calls(request, device):
    gen = gen_for(request)
    x = torch.randn(2, 3, 10, 12, generator=gen).to(device)
    (theta,) = make_params("affine", 2, 4, (6, 7), False, torch.float32, device, gen)
    out = st.affine_sample(x, theta, (6, 7))
    for k in range(4):
        torch.testing.assert_close(out[:, k], st.affine_sample(x, theta[:, k], (6, 7)), rtol=0, atol=0)


def test_identity_reproduces_input(device):
    """Up to float32 rounding of the source index, which PyTorch's grid_sample shares (a few 1e-6)."""
    x = torch.randn(2, 3, 9, 11, device=device)
    for ac in (False, True):
        eye = torch.eye(2, 3, device=device).expand(2, 2, 3)
        torch.testing.assert_close(st.affine_sample(x, eye, align_corners=ac), x, rtol=1e-5, atol=1e-5)
