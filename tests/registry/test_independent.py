"""Each built-in family against an implementation nobody here wrote.

- affine, attention: ``torch.nn.functional.affine_grid``.
- projective: kornia's ``warp_perspective``. Kornia takes the 3x3 homography that maps *source
  pixels to output pixels* and normalises pixels with the ``align_corners=True`` convention
  (pixel 0 -> -1, pixel W-1 -> +1) whatever ``align_corners`` says, so we compare with
  ``align_corners=True``. Our theta is the map from normalised *output* coordinates to normalised
  *source* coordinates, h. With ``N_W = [[2/(W-1), 0, -1], [0, 2/(H-1), -1], [0, 0, 1]]`` (pixels ->
  normalised), the pixel homography source <- output is ``N_src^-1 h N_out``, and kornia's matrix is
  its inverse, ``N_out^-1 h^-1 N_src``.
- tps: SciPy's ``RBFInterpolator(kernel="thin_plate_spline", degree=1)``, fitted on the control
  points (targets -> theta) and evaluated on the output grid. SciPy's kernel is r^2 log r, ours
  r^2 log r^2 = 2 r^2 log r: the same interpolant (the factor moves into the weights).
- piecewise_affine: scikit-image's ``PiecewiseAffineTransform``. It triangulates the control points
  by Delaunay, which is ambiguous on a regular mesh (every cell's four corners are co-circular).
  Barycentric weights are invariant under any affine map, so we give scikit-image the mesh and the
  query points both sheared by ``x -> x - 0.3 y``: each cell becomes a parallelogram whose shorter
  diagonal, the one Delaunay must pick, is ours ((i, j)-(i+1, j+1)), and the answer is unchanged.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stn_triton as st
from transforms_registry import base_grid, get_transform

kornia = pytest.importorskip("kornia", reason="test extra 'kornia' (pip install -e .[test])")
scipy_interpolate = pytest.importorskip("scipy.interpolate")
skimage_transform = pytest.importorskip("skimage.transform")


def _points(size, align_corners):
    return base_grid(size, align_corners, torch.float64)[:2].T.numpy()  # (P, 2) normalised (x, y), row-major


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_and_attention_vs_affine_grid(align_corners):
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    got = get_transform("affine").grid(theta, (5, 7), align_corners)
    torch.testing.assert_close(got, F.affine_grid(theta.view(3, 2, 3), (3, 1, 5, 7), align_corners=align_corners))
    s, tx, ty = torch.randn(3, 3, generator=gen, dtype=torch.float64).unbind(1)
    z = torch.zeros_like(s)
    m = torch.stack([s, z, tx, z, s, ty], 1).view(3, 2, 3)
    got = get_transform("attention").grid(torch.stack([s, tx, ty], 1), (5, 7), align_corners)
    torch.testing.assert_close(got, F.affine_grid(m, (3, 1, 5, 7), align_corners=align_corners))


def _normaliser(h, w):
    return torch.tensor([[2 / (w - 1), 0, -1], [0, 2 / (h - 1), -1], [0, 0, 1]], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projective_vs_kornia_warp_perspective(device, dtype):
    gen = torch.Generator().manual_seed(1)
    N, C, H, W, Ho, Wo = 3, 2, 13, 17, 11, 9
    theta = get_transform("projective").identity().double() + 0.15 * torch.randn(N, 8, generator=gen,
                                                                                   dtype=torch.float64)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    h = torch.cat([theta, torch.ones(N, 1, dtype=torch.float64)], 1).view(N, 3, 3)
    M = _normaliser(Ho, Wo).inverse() @ torch.linalg.inv(h) @ _normaliser(H, W)  # source pixels -> output pixels
    want = kornia.geometry.transform.warp_perspective(x, M, (Ho, Wo), mode="bilinear", padding_mode="zeros",
                                                      align_corners=True)
    got = st.spatial_transform(x.to(device, dtype), theta.to(device, dtype), "projective", (Ho, Wo),
                               align_corners=True)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
    assert want.abs().sum() > 0.5 * x.abs().sum() * Ho * Wo / (H * W)  # the warp keeps most of the image in view


@pytest.mark.parametrize("grid_size", [(4, 4), (3, 5)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_tps_vs_scipy_rbf(grid_size, align_corners):
    family = get_transform("tps", grid_size=grid_size).double()
    gen = torch.Generator().manual_seed(2)
    theta = family.ctrl64.flatten() + 0.2 * torch.randn(family.num_params, generator=gen, dtype=torch.float64)
    size = (7, 10)
    ctrl = family.ctrl64.numpy()
    rbf = scipy_interpolate.RBFInterpolator(ctrl, theta.view(-1, 2).numpy(), kernel="thin_plate_spline", degree=1,
                                            smoothing=0.0)
    want = rbf(_points(size, align_corners)).reshape(1, *size, 2)
    got = family.grid(theta[None], size, align_corners)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("grid_size", [(4, 4), (3, 5), (2, 2)])
def test_piecewise_affine_vs_skimage(grid_size):
    family = get_transform("piecewise_affine", grid_size=grid_size).double()
    gen = torch.Generator().manual_seed(3)
    theta = family.ctrl64.flatten() + 0.15 * torch.randn(family.num_params, generator=gen, dtype=torch.float64)
    size = (9, 11)  # align_corners=False: every pixel centre lies strictly inside the mesh
    shear = np.array([[1.0, -0.3], [0.0, 1.0]])  # (x, y) -> (x - 0.3 y, y)
    ctrl = family.ctrl64.numpy() @ shear.T
    cls, dst = skimage_transform.PiecewiseAffineTransform, theta.view(-1, 2).numpy()
    if hasattr(cls, "from_estimate"):  # scikit-image >= 0.26
        tform = cls.from_estimate(ctrl, dst)
    else:
        tform = cls()
        tform.estimate(ctrl, dst)
    assert tform
    rows, cols = grid_size
    assert len(tform.affines) == 2 * (rows - 1) * (cols - 1)
    want = tform(_points(size, False) @ shear.T).reshape(1, *size, 2)
    got = family.grid(theta[None], size, False)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    # the fused kernel path agrees with the independent grid too
    x = torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64)
    out = st.spatial_transform(x.float(), theta[None].float(), family.float(), size)
    ref = F.grid_sample(x, torch.from_numpy(want), align_corners=False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
