"""Test-only fused families without their own gradient terms (``triton_grad``): their dL/dtheta is the
vector-Jacobian product of their PyTorch grid with the kernels' dL/dg. 2-D and 3-D, so that the
plugin form's 3-D path runs; and broken ones: a map that returns one value too few, one that does
not compile, one that returns a scalar for an axis, gradient terms one short."""

import math

import torch
import triton
import triton.language as tl

from transforms_registry import TransformFamily, base_grid

_PI = tl.constexpr(math.pi)


@triton.jit
def _wave_coords(p, x, y):
    return x + tl.load(p + 0) * tl.sin(y * _PI), y + tl.load(p + 1) * tl.sin(x * _PI) + tl.load(p + 2)


@triton.jit
def _wave3d_coords(p, x, y, z):
    a = tl.load(p + 0)
    return x + a * tl.sin(z * _PI), y + a * tl.sin(x * _PI), z + tl.load(p + 1) * tl.cos(y * _PI)


@triton.jit
def _broken_coords(p, x, y):
    return x + tl.load(p + 0)  # one axis only


def _base(theta, size, align_corners):
    """affine_grid's identity grid (*size, nd)."""
    return base_grid(size, align_corners, theta.dtype, theta.device)[:-1].T.reshape(*size, len(size))


class Wave(TransformFamily):
    """theta (N, 3) = (a, b, t): x + a sin(pi y), y + b sin(pi x) + t."""

    num_params = 3
    triton_coords = _wave_coords

    def identity(self):
        return torch.zeros(3)

    def grid(self, theta, size, align_corners=False):
        b = _base(theta, size, align_corners)
        x, y = b[..., 0], b[..., 1]
        a, c, t = (theta[:, i, None, None] for i in range(3))
        return torch.stack([x + a * torch.sin(math.pi * y), y + c * torch.sin(math.pi * x) + t], dim=-1)


class Wave3d(TransformFamily):
    """theta (N, 2) = (a, c): (x + a sin(pi z), y + a sin(pi x), z + c cos(pi y)), for 5-D input."""

    num_params = 2
    ndim = 3
    triton_coords = _wave3d_coords

    def identity(self):
        return torch.zeros(2)

    def grid(self, theta, size, align_corners=False):
        b = _base(theta, size, align_corners)
        x, y, z = b[..., 0], b[..., 1], b[..., 2]
        a, c = theta[:, 0, None, None, None], theta[:, 1, None, None, None]
        return torch.stack([x + a * torch.sin(math.pi * z), y + a * torch.sin(math.pi * x), z + c * torch.cos(math.pi * y)],
                           dim=-1)


@triton.jit
def _undefined_coords(p, x, y):
    return tl.no_such_function(x), y  # Triton has no such function: it does not compile


@triton.jit
def _wave_grad_short(p, x, y, gx_bar, gy_bar):
    return gx_bar * tl.sin(y * _PI), gy_bar * tl.sin(x * _PI)  # the third parameter's term is missing


@triton.jit
def _scalar_coords(p, x, y):
    return x, tl.load(p + 1)  # a scalar for y, not a block of the coordinates' shape


class Scalar(Wave):
    triton_coords = _scalar_coords


class ShortGrad(Wave):
    triton_grad = _wave_grad_short


class Broken(Wave):
    triton_coords = _broken_coords


class Undefined(Wave):
    triton_coords = _undefined_coords
