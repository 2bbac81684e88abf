"""Displacement-field form: the coordinate of output pixel p is its base grid point plus the field's
vector there, ``g_p = b_p + u_p`` (normalised units, (x, y[, z]) order, as ``grid_sample``'s grid).

The warp of image registration (VoxelMorph's and MONAI's ``base + u`` then ``grid_sample``), with ``u``
read at the output pixel, in any layout its strides describe (PyTorch's (N, K, Ho, Wo, 2) grid layout,
or a convolution's channels-first (N, K, 2, Ho, Wo) as a permuted view): no grid tensor is made. The
base grid ``b`` is ``affine_grid``'s identity, computed in the kernel from the pixel index.

.. math::

    g_p = b_p + u_p, \\qquad \\frac{\\partial L}{\\partial u_p} = \\bar g_p

so, as for the explicit grid, the gradient wrt the field is :math:`\\bar g_p` itself, stored per pixel
(the kernels' ``WRITE_GG``), and the form has no parameter terms.
"""

import triton
import triton.language as tl

import transforms_registry


@triton.jit
def flow_coords(p_m, p_aux, p_pix, s_ac, q, b, mask_p, P, DM, NDIM: tl.constexpr):
    # p_pix: [BP] pointers to each pixel's (u_x, u_y[, u_z]) in the field (any float dtype), s_ac apart
    x, y, z = b
    gx = x + tl.load(p_pix, mask=mask_p, other=0.0).to(tl.float32)
    gy = y + tl.load(p_pix + s_ac, mask=mask_p, other=0.0).to(tl.float32)
    if NDIM == 3:
        gz = z + tl.load(p_pix + 2 * s_ac, mask=mask_p, other=0.0).to(tl.float32)
    else:
        gz = gx
    return (gx, gy, gz), gx


def flow_grid(params, size, align_corners):
    """u (N, K, *size, n) -> grid (N, K, *size, n): ``affine_grid``'s identity grid plus u."""
    u = params[0]
    nd = len(size)
    base = transforms_registry.base_grid(size, align_corners, u.dtype, u.device)[:nd].T  # (P, n)
    return u + base.reshape(*size, nd)
