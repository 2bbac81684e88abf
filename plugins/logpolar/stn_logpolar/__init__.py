"""Log-polar sampling about a learnt origin, as the Polar Transformer Network samples (Esteves, Allen-
Blanchette, Zhou and Daniilidis, ICLR 2018): rotation and scale of the input about the origin become
translations of the output.

Output column x (normalised, -1 .. 1) is the log-radius, from ``R_MIN`` to ``R_MAX`` (normalised units:
the image is [-1, 1]^2); output row y is the angle, 0 .. 2 pi. theta = (cx, cy), the origin, is the
transform's only parameter (the identity: the image's centre):

    r = exp(log R_MIN + (x + 1) / 2 * (log R_MAX - log R_MIN)),  phi = pi * (y + 1)
    source = (cx + r cos phi, cy + r sin phi)

so d source / d (cx, cy) is the identity, and the gradient terms are dL/d source itself.
"""

import math

import torch
import triton
import triton.language as tl

from transforms_registry import TransformFamily, base_grid

R_MIN, R_MAX = 0.05, 1.5  # the radii sampled, normalised units
_LOG_R_MIN = tl.constexpr(math.log(R_MIN))
_LOG_SPAN = tl.constexpr(math.log(R_MAX) - math.log(R_MIN))
_PI = tl.constexpr(math.pi)


@triton.jit
def _sincos_pi(u):
    """(sin(pi u), cos(pi u)) in float32 for moderate u: u = q / 2 + r with |r| <= 1/4, polynomials of
    pi r (truncation below 1e-8: float32 rounding, about 1e-7, decides), then the quadrant q. Written out
    rather than tl.sin/tl.cos, whose libdevice versions carry a local-memory path for huge arguments (a
    stack frame in every kernel)."""
    q = tl.floor(u * 2.0 + 0.5)
    t = (u - q * 0.5) * _PI
    t2 = t * t
    s = t * (1.0 + t2 * (-1.0 / 6 + t2 * (1.0 / 120 + t2 * (-1.0 / 5040 + t2 * (1.0 / 362880)))))
    c = 1.0 + t2 * (-0.5 + t2 * (1.0 / 24 + t2 * (-1.0 / 720 + t2 * (1.0 / 40320 + t2 * (-1.0 / 3628800)))))
    k = q.to(tl.int32) & 3
    sin = tl.where(k == 0, s, tl.where(k == 1, c, tl.where(k == 2, -s, -c)))
    cos = tl.where(k == 0, c, tl.where(k == 1, -s, tl.where(k == 2, -c, s)))
    return sin, cos


@triton.jit
def _logpolar_coords(p, x, y):
    r = tl.exp((x + 1.0) * (0.5 * _LOG_SPAN) + _LOG_R_MIN)  # (a block first: constexpr + block is not a block)
    sin, cos = _sincos_pi(y)  # phi = pi (y + 1): cos(phi) = -cos(pi y), sin(phi) = -sin(pi y)
    return tl.load(p + 0) - r * cos, tl.load(p + 1) - r * sin


@triton.jit
def _logpolar_grad(p, x, y, gx_bar, gy_bar):
    return gx_bar, gy_bar  # d source / d origin = I


class LogPolar(TransformFamily):
    """theta (N, 2) = the origin (cx, cy), normalised; output (Ho, Wo): rows are angles, columns log-radii."""

    num_params = 2
    triton_coords = _logpolar_coords
    triton_grad = _logpolar_grad

    def identity(self):
        return torch.zeros(2)

    def grid(self, theta, size, align_corners=False):
        self.check_theta(theta)
        base = base_grid(size, align_corners, theta.dtype, theta.device)[:2].T.reshape(*size, 2)  # affine_grid's
        r = torch.exp(math.log(R_MIN) + (base[..., 0] + 1) * (0.5 * (math.log(R_MAX) - math.log(R_MIN))))
        phi = math.pi * (base[..., 1] + 1)
        return torch.stack([theta[:, 0, None, None] + r * torch.cos(phi), theta[:, 1, None, None] + r * torch.sin(phi)],
                           dim=-1)
