"""Affine form: the sampling coordinate of output pixel p is ``M @ [x_p, y_p, (z_p,) 1]``.

Serves the ``attention`` and ``affine`` families (M 2x3) and ``affine3d``/``attention3d`` (M 3x4). The
base grid ``b_p = (x_p, y_p[, z_p], 1)`` is PyTorch's ``affine_grid`` base, computed in the kernel from
the pixel index (never read from memory).

.. math::

    g_{r,p} = \\sum_c m_{rc} \\, b_{c,p}, \\qquad
    \\frac{\\partial L}{\\partial m_{rc}} = \\sum_p \\bar g_{r,p} \\, b_{c,p}

``gg`` below is :math:`\\bar g`, the gradient of the loss wrt the normalised coordinate; each program
adds its pixels' terms ``gg_r * b_c`` (row-major in (r, c), one block column each) and writes their
sums (stage one of a fixed-order, two-stage reduction; the host sums the partials).
"""

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import transforms_registry

from .common import stack8, stack16


@triton.jit
def affine_coords(p_m, p_aux, p_pix, s_ac, q, b, mask_p, P, DM, frame, FN: tl.constexpr, NDIM: tl.constexpr):
    # p_m: float32 [NDIM * (NDIM + 1)], M row-major for this (n, k); b: (x, y, z) [BP] base grid
    x, y, z = b
    if NDIM == 2:
        gx = tl.load(p_m + 0) * x + tl.load(p_m + 1) * y + tl.load(p_m + 2)
        gy = tl.load(p_m + 3) * x + tl.load(p_m + 4) * y + tl.load(p_m + 5)
        gz = gx  # no third axis
    else:
        gx = tl.load(p_m + 0) * x + tl.load(p_m + 1) * y + tl.load(p_m + 2) * z + tl.load(p_m + 3)
        gy = tl.load(p_m + 4) * x + tl.load(p_m + 5) * y + tl.load(p_m + 6) * z + tl.load(p_m + 7)
        gz = tl.load(p_m + 8) * x + tl.load(p_m + 9) * y + tl.load(p_m + 10) * z + tl.load(p_m + 11)
    return (gx, gy, gz), x


@triton.jit
def affine_terms(acc, p_part, p_m, p_aux, q, mask_p, P, DM, b, g, w, gg, FN: tl.constexpr, NDIM: tl.constexpr):
    # acc: [BP, 8] (2-D) or [BP, 16] (3-D) running sums of dL/dM's per-pixel terms, row-major;
    # gg: (gg_x, gg_y, gg_z) [BP], 0 off the image
    x, y, z = b
    gg_x, gg_y, gg_z = gg
    zero = tl.zeros_like(x)
    if NDIM == 2:
        acc += stack8(gg_x * x, gg_x * y, gg_x, gg_y * x, gg_y * y, gg_y, zero, zero)
    else:
        acc += stack16(gg_x * x, gg_x * y, gg_x * z, gg_x, gg_y * x, gg_y * y, gg_y * z, gg_y,
                       gg_z * x, gg_z * y, gg_z * z, gg_z, zero, zero, zero, zero)
    return acc


def affine_grid(params, size, align_corners):
    """theta (N, K, n, n+1) -> grid (N, K, *size, n): ``F.affine_grid`` (n = len(size))."""
    theta = params[0]
    N, K = theta.shape[:2]
    nd = len(size)
    if N * K * math.prod(size) == 0:  # F.affine_grid refuses empty sizes
        base = transforms_registry.base_grid(size, align_corners, theta.dtype, theta.device).T
        return torch.einsum("nkij,pj->nkpi", theta, base).reshape(N, K, *size, nd)
    theta = theta.reshape(N * K, nd, nd + 1)
    if _bmm_is_affine_grid(theta):
        # (N K, n, P) -> (N K, *size, n), a strided view: grid_sample reads it as it is, sooner than copied
        g = torch.bmm(theta, _cpu_base(tuple(size), align_corners).expand(N * K, -1, -1))
        g = g.view(N * K, nd, *size).movedim(1, -1)
    else:
        g = F.affine_grid(theta, (N * K, 1, *size), align_corners=align_corners)
    return g.reshape(N, K, *size, nd)


def _bmm_is_affine_grid(theta):
    """Whether ``theta @ base`` (a batched (n, n+1) x (n+1, P) product on a cached base grid) gives
    ``F.affine_grid``'s grid and gradients bit for bit, at a third of its time or less: eager float32 CPU
    tensors. PyTorch's CPU ``affine_grid`` fills an (N, P, n+1) base and multiplies (N, P, n+1) x
    (N, n+1, n), a shape its float32 ``bmm`` runs slowly; the same sums in the other orientation run
    fast and round the same (``test_reference_affine_is_bitwise_pytorchs_in_float32`` holds it to that).
    float64 rounds differently that way, so it, tracing and other devices keep ``F.affine_grid``."""
    return (type(theta) is torch.Tensor and theta.dtype == torch.float32 and theta.device.type == "cpu"
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


@functools.lru_cache(maxsize=16)
def _cpu_base(size, align_corners):
    """(1, n + 1, P) float32 CPU base grid of an output ``size`` (``F.affine_grid``'s own values; 16 sizes
    kept: a 128^3 volume's is 34 MB)."""
    return transforms_registry.base_grid(size, align_corners, torch.float32, "cpu").contiguous()[None]
