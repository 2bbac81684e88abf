"""Radial lens distortion about a centre (Brown's model, radial terms k1 and k2): the output pixel at
normalised position b samples the input at

    d = b - c,  r2 = |d|^2,  f = 1 + k1 r2 + k2 r2^2,  source = c + f d

theta = (k1, k2, cx, cy); the identity is zeros (f = 1). The gradient terms, with gbar = dL/d source:

    dL/dk1 = (gbar . d) r2,  dL/dk2 = (gbar . d) r2^2,
    dL/dc = (1 - f) gbar - 2 (k1 + 2 k2 r2) (gbar . d) d
"""

import torch
import triton
import triton.language as tl

from transforms_registry import TransformFamily, base_grid


@triton.jit
def _lens_coords(p, x, y):
    k1 = tl.load(p + 0)
    k2 = tl.load(p + 1)
    cx = tl.load(p + 2)
    cy = tl.load(p + 3)
    dx = x - cx
    dy = y - cy
    r2 = dx * dx + dy * dy
    f = 1.0 + (k1 + k2 * r2) * r2
    return cx + f * dx, cy + f * dy


@triton.jit
def _lens_grad(p, x, y, gx_bar, gy_bar):
    k1 = tl.load(p + 0)
    k2 = tl.load(p + 1)
    dx = x - tl.load(p + 2)
    dy = y - tl.load(p + 3)
    r2 = dx * dx + dy * dy
    f = 1.0 + (k1 + k2 * r2) * r2
    gd = gx_bar * dx + gy_bar * dy
    s = -2.0 * (k1 + 2.0 * k2 * r2) * gd
    return gd * r2, gd * r2 * r2, (1.0 - f) * gx_bar + s * dx, (1.0 - f) * gy_bar + s * dy


class RadialDistortion(TransformFamily):
    """theta (N, 4) = (k1, k2, cx, cy): radial distortion coefficients and the centre (normalised)."""

    num_params = 4
    triton_coords = _lens_coords
    triton_grad = _lens_grad

    def identity(self):
        return torch.zeros(4)

    def grid(self, theta, size, align_corners=False):
        self.check_theta(theta)
        base = base_grid(size, align_corners, theta.dtype, theta.device)[:2].T.reshape(*size, 2)  # affine_grid's
        k1, k2, c = theta[:, 0, None, None], theta[:, 1, None, None], theta[:, None, None, 2:]
        d = base[None] - c
        r2 = (d * d).sum(-1)
        f = 1 + (k1 + k2 * r2) * r2
        return c + f[..., None] * d
