"""Displacement-field forms: the coordinate of output pixel p is its base grid point plus the field's
vector there, ``g_p = b_p + S u_p`` (``flow``), or an affine map of it plus the vector,
``g_p = M b_p + S u_p`` (``affine_flow``: an affine pre-alignment and a deformation in one warp).

The warp of image registration (VoxelMorph's and MONAI's ``base + u`` then ``grid_sample``; FireANTs'
affine-plus-deformation), with ``u`` read at the output pixel, in any layout its strides describe
(PyTorch's (N, K, Ho, Wo, 2) grid layout, or a convolution's channels-first (N, K, 2, Ho, Wo) as a
permuted view): no grid tensor is made. The base grid ``b`` is ``affine_grid``'s identity, computed in
the kernel from the pixel index.

The field's *frame* says how its vectors become normalised displacements, so that fields in pixel
units and index order (VoxelMorph's and MONAI's (dy, dx) / (dz, dy, dx) in input pixels) are read as
they are, unconverted: for each grid axis a (x, y[, z]) a scale :math:`s_a` and the field component
:math:`c_a` that holds that axis, :math:`(S u)_a = s_a u_{c_a}`. It is the op's last parameter, a
float32 tensor ``[s_x, s_y(, s_z), c_x, c_y(, c_z)]`` (:func:`frame`), appended to each transform's
parameter row for the kernels.

.. math::

    g_{a,p} = (M b_p)_a + s_a u_{c_a,p}, \\qquad
    \\frac{\\partial L}{\\partial u_{c_a,p}} = s_a \\bar g_{a,p}, \\qquad
    \\frac{\\partial L}{\\partial m_{rc}} = \\sum_p \\bar g_{r,p} \\, b_{c,p}

so the gradient wrt the field is :math:`s_a \\bar g_p`, stored per pixel in the field's own layout
(the kernels' ``WRITE_GG`` with the frame), and ``affine_flow``'s matrix takes the affine form's terms.
"""

import torch
import triton
import triton.language as tl

import transforms_registry

from .affine import affine_coords, affine_grid


@triton.jit
def _displace(g, frame, p_pix, s_ac, mask_p, NDIM: tl.constexpr):
    # g: (gx, gy, gz) [BP]; frame: (sx, sy, sz, cx, cy, cz); p_pix: [BP] pointers to each pixel's vector
    gx, gy, gz = g
    sx, sy, sz, cx, cy, cz = frame
    gx += sx * tl.load(p_pix + cx * s_ac, mask=mask_p, other=0.0).to(tl.float32)
    gy += sy * tl.load(p_pix + cy * s_ac, mask=mask_p, other=0.0).to(tl.float32)
    if NDIM == 3:
        gz += sz * tl.load(p_pix + cz * s_ac, mask=mask_p, other=0.0).to(tl.float32)
    return gx, gy, gz


@triton.jit
def flow_coords(p_m, p_aux, p_pix, s_ac, q, b, mask_p, P, DM, frame, FN: tl.constexpr, NDIM: tl.constexpr):
    # p_pix: [BP] pointers to each pixel's vector; frame: the field's (from the parameter row)
    return _displace(b, frame, p_pix, s_ac, mask_p, NDIM), b[0]


@triton.jit
def affine_flow_coords(p_m, p_aux, p_pix, s_ac, q, b, mask_p, P, DM, frame, FN: tl.constexpr, NDIM: tl.constexpr):
    # p_m: M row-major (NDIM * (NDIM + 1) floats), then the frame (handed over as ``frame``)
    g, w = affine_coords(p_m, p_aux, p_pix, s_ac, q, b, mask_p, P, DM, frame, FN, NDIM)
    return _displace(g, frame, p_pix, s_ac, mask_p, NDIM), w


def frame(ndim, scale=None, index_order=False):
    """The frame values (a tuple of floats) of a field of ``ndim`` components: ``scale`` per grid axis
    (x, y[, z]) from its units to normalised ones (None: 1, normalised already); ``index_order``: the
    components are (dy, dx) / (dz, dy, dx) rather than (x, y[, z])."""
    scale = tuple(float(s) for s in scale) if scale is not None else (1.0,) * ndim
    comps = tuple(float(ndim - 1 - a) if index_order else float(a) for a in range(ndim))
    return scale + comps


def displacement(u, frm):
    """u (N, K, *size, n) and its frame (2n,) -> the normalised displacement (x, y[, z] order)."""
    nd = u.shape[-1]
    comps = frm[nd:2 * nd].to(torch.long)
    return u.index_select(-1, comps) * frm[:nd].to(u.dtype)


def flow_grid(params, size, align_corners):
    """u (N, K, *size, n), frame -> grid (N, K, *size, n): ``affine_grid``'s identity grid plus S u."""
    u, frm = params
    nd = len(size)
    base = transforms_registry.base_grid(size, align_corners, u.dtype, u.device)[:nd].T  # (P, n)
    return displacement(u, frm) + base.reshape(*size, nd)


def affine_flow_grid(params, size, align_corners):
    """theta (N, K, n, n+1), u (N, K, *size, n), frame -> ``F.affine_grid`` of theta plus S u."""
    theta, u, frm = params
    return affine_grid((theta,), size, align_corners) + displacement(u, frm)
