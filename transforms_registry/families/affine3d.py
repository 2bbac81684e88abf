"""Volumetric attention (s, tx, ty, tz) and affine (12 parameters): the 3-D affine kernel form.

For 5-D input (N, C, D, H, W): the sampling coordinate of output voxel (x, y, z) (``affine_grid``'s
normalised base grid) is ``M (3x4) @ [x, y, z, 1]``, as ``F.affine_grid(M, (N, C, Do, Ho, Wo))``.
"""

import torch

from ..base import KernelForm, TransformFamily
from ..registry import register_transform


@register_transform
class Affine3d(TransformFamily):
    """theta = the 3x4 matrix, row-major: [a, b, c, tx, d, e, f, ty, g, h, i, tz]."""

    name = "affine3d"
    ndim = 3
    num_params = 12

    def identity(self):
        return torch.eye(3, 4).reshape(12)

    def kernel_form(self, theta, size, align_corners=False):
        self.check_theta(theta)
        return KernelForm("affine", theta.reshape(-1, 3, 4))


@register_transform
class Attention3d(TransformFamily):
    """Isotropic scale and translation in 3-D, theta = (s, tx, ty, tz) ->
    [[s, 0, 0, tx], [0, s, 0, ty], [0, 0, s, tz]]."""

    name = "attention3d"
    ndim = 3
    num_params = 4

    def identity(self):
        return torch.tensor([1.0, 0.0, 0.0, 0.0])

    def kernel_form(self, theta, size, align_corners=False):
        self.check_theta(theta)
        s, tx, ty, tz = theta.unbind(1)
        zero = torch.zeros_like(s)
        m = torch.stack([s, zero, zero, tx, zero, s, zero, ty, zero, zero, s, tz], dim=1).reshape(-1, 3, 4)
        return KernelForm("affine", m)
