"""Attention (s, tx, ty) and affine (6 parameters): both the affine kernel form."""

import torch

from ..base import KernelForm, TransformFamily
from ..registry import register_transform


@register_transform
class Affine(TransformFamily):
    """theta = the 2x3 matrix, row-major: [a, b, tx, c, d, ty]."""

    name = "affine"
    num_params = 6

    def identity(self):
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

    def kernel_form(self, theta, size, align_corners=False):
        self.check_theta(theta)
        return KernelForm("affine", theta.reshape(-1, 2, 3))


@register_transform
class Attention(TransformFamily):
    """The paper's attention: isotropic scale and translation, theta = (s, tx, ty) ->
    [[s, 0, tx], [0, s, ty]]."""

    name = "attention"
    num_params = 3

    def identity(self):
        return torch.tensor([1.0, 0.0, 0.0])

    def kernel_form(self, theta, size, align_corners=False):
        self.check_theta(theta)
        s, tx, ty = theta.unbind(1)
        zero = torch.zeros_like(s)
        m = torch.stack([s, zero, tx, zero, s, ty], dim=1).reshape(-1, 2, 3)
        return KernelForm("affine", m)
