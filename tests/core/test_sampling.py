"""Every form x mode x padding x align_corners, across dtypes and layouts pairwise, against the float64 reference,
forward and every gradient; zoom-in, down-sampling, far-outside coordinates and K parallel
transforms in every form of both dimensions (the 3-D matrix: test_volume.py)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
from _cases import DTYPES, FORMS, FORMS3, LAYOUTS, MODES, PADDINGS, check_case, gen_for, make_params, ndim


def _matrix():
    """Every form x mode x padding x align_corners, each with one of the nine dtype x layout pairs,
    rotated so that every pair of values of any two of the six factors meets: 48
    cases instead of the full 432, no interaction of two factors left out
    (test_matrix_covers_every_pair)."""
    base = list(itertools.product(FORMS, MODES, PADDINGS, (False, True)))
    pairs = list(itertools.product(DTYPES, LAYOUTS))
    return [(*b, *pairs[(i + i // 9) % len(pairs)]) for i, b in enumerate(base)]


MATRIX = _matrix()


def test_matrix_covers_every_pair():
    factors = [FORMS, MODES, PADDINGS, (False, True), tuple(DTYPES), LAYOUTS]
    for a, b in itertools.combinations(range(len(factors)), 2):
        seen = {(r[a], r[b]) for r in MATRIX}
        assert seen == set(itertools.product(factors[a], factors[b])), (a, b)


@pytest.mark.parametrize("form,mode,padding_mode,align_corners,dtype,layout", MATRIX,
                         ids=[f"{f}-{m}-{p}-ac{int(a)}-{d}-{lay}" for f, m, p, a, d, lay in MATRIX])
def test_matrix(request, device, form, mode, padding_mode, align_corners, dtype, layout):
    check_case(request, device, form, mode, padding_mode, align_corners, DTYPES[dtype], layout)


ODD = {"1x3x7x13": ((1, 3, 7, 13), (7, 13)), "2x5x11x17-to-13x7": ((2, 5, 11, 17), (13, 7)),
       "1x1-input": ((3, 1, 1, 1), (3, 2)), "1-row": ((1, 2, 1, 9), (1, 5))}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", ODD)
@pytest.mark.parametrize("align_corners", [False, True], ids=["ac0", "ac1"])
def test_odd_shapes(request, device, form, shape, align_corners):
    """Odd and one-pixel sizes, every form x shape x align_corners; the padding rotates over the cases
    so that each meets every form, shape and align_corners."""
    i = FORMS.index(form) + list(ODD).index(shape) + align_corners
    (shape, size), padding_mode = ODD[shape], PADDINGS[i % len(PADDINGS)]
    check_case(request, device, form, "bilinear", padding_mode, align_corners, torch.float32, "contiguous",
               shape=shape, K=3, size=size)


# per dimension: (input shape, output size): 10x zoom-in in 2-D (~100 contributions per input pixel),
# 4x in 3-D (~64 per input voxel)
ZOOM = {2: ((1, 2, 6, 7), (60, 70)), 3: ((1, 2, 3, 3, 4), (12, 12, 16))}


# every form bilinear; nearest (the same scatter, one tap) in one form of each dimension
ZOOM_CASES = [(form, "bilinear") for form in FORMS + FORMS3] + [("affine", "nearest"), ("grid3d", "nearest")]


@pytest.mark.parametrize("form,mode", ZOOM_CASES, ids=[f"{f}-{m}" for f, m in ZOOM_CASES])
def test_zoom_in(request, device, form, mode):
    """Each input pixel receives many contributions: the scatter (atomic or sorted) must sum them all."""
    shape, size = ZOOM[ndim(form)]
    check_case(request, device, form, mode, "border", False, torch.float32, "contiguous",
               shape=shape, K=1, size=size, spread=0.05)


# (form, mode, layout, input shape, output size): 2x down-sampling, both modes in 2-D, trilinear in 3-D
DOWNSAMPLE = [(form, mode, "channels_last", (2, 3, 30, 34), (15, 17)) for form in FORMS for mode in MODES]
DOWNSAMPLE += [(form, "bilinear", "channels_last_3d", (2, 3, 8, 10, 12), (4, 5, 6)) for form in FORMS3]


@pytest.mark.parametrize("form,mode,layout,shape,size", DOWNSAMPLE, ids=[f"{c[0]}-{c[1]}" for c in DOWNSAMPLE])
def test_downsample_2x(request, device, form, mode, layout, shape, size):
    check_case(request, device, form, mode, "zeros", True, torch.float32, layout, shape=shape, K=2, size=size,
               spread=0.2)


# every padding for the forms whose coordinates differ most (affine from a matrix, grid read as given,
# in both dimensions); one padding each, rotated, for the others
FAR = [(form, p) for form in ("affine", "grid", "affine3d", "grid3d") for p in PADDINGS]
FAR += [(form, PADDINGS[i % 3]) for i, form in enumerate(("projective", "basis", "basis3d"))]


@pytest.mark.parametrize("form,padding_mode", FAR, ids=[f"{f}-{p}" for f, p in FAR])
def test_far_outside(request, device, form, padding_mode):
    """Coordinates tens of image (volume) widths away. Reflection folds them back into the image, where
    a float32 coordinate of ~500 pixels carries ~3e-5 pixels of rounding: the tolerance says so."""
    check_case(request, device, form, "bilinear", padding_mode, False, torch.float32, "contiguous",
               spread=40.0, tol_scale=25.0 if padding_mode == "reflection" else 1.0)


# per dimension: (input shape, K, output size)
PARALLEL = {2: ((2, 3, 10, 12), 4, (6, 7)), 3: ((2, 3, 4, 5, 6), 3, (3, 4, 5))}


@pytest.mark.parametrize("form", ["affine", "affine3d"])
def test_parallel_transforms_equal_separate_calls(request, device, form):
    """K transforms in one call equal K calls of one, bit for bit; and one of them equals st.grid_sample
    on F.affine_grid's grid."""
    shape, K, size = PARALLEL[ndim(form)]
    gen = gen_for(request)
    x = torch.randn(shape, generator=gen).to(device)
    (theta,) = make_params(form, shape[0], K, size, False, torch.float32, device, gen)
    out = st.affine_sample(x, theta, size)
    assert out.shape == (shape[0], K, shape[1], *size)
    for k in range(K):
        torch.testing.assert_close(out[:, k], st.affine_sample(x, theta[:, k], size), rtol=0, atol=0)
    grid = F.affine_grid(theta[:, 1], (shape[0], shape[1], *size), align_corners=False)
    torch.testing.assert_close(st.grid_sample(x, grid, align_corners=False), out[:, 1], rtol=1e-5, atol=1e-5)


# per dimension: (input shape, output size, K and output size of the K-transform call)
IDENTITY = {2: ((2, 3, 9, 11), (5, 4), 3, (5, 4)), 3: ((2, 3, 4, 5, 6), (3, 4, 5), 2, 3)}


@pytest.mark.parametrize("form", ["affine", "affine3d"])
def test_identity_and_output_layout(device, form):
    """The identity reproduces the input, up to float32 rounding of the source index, which PyTorch's
    grid_sample shares (a few 1e-6); outputs keep the input's memory format (channels innermost for K
    transforms)."""
    n = ndim(form)
    shape, size, K, size_k = IDENTITY[n]
    x = torch.randn(shape, device=device)
    eye = torch.eye(n, n + 1, device=device).expand(2, n, n + 1)
    for ac in (False, True):
        torch.testing.assert_close(st.affine_sample(x, eye, align_corners=ac), x, rtol=1e-5, atol=1e-5)
    last = torch.channels_last if n == 2 else torch.channels_last_3d
    cl = x.contiguous(memory_format=last)
    assert st.affine_sample(cl, eye, size).is_contiguous(memory_format=last)
    out_k = st.affine_sample(cl, eye[:, None].expand(2, K, n, n + 1), size_k)
    assert out_k.shape == (2, K, 3, *(size_k if isinstance(size_k, tuple) else (size_k,) * n))
    assert out_k.stride(2) == 1
    assert st.affine_sample(x, eye, size).is_contiguous()
