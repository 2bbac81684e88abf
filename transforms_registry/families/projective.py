"""Projective: 8 parameters, the 3x3 homography row-major with its last entry fixed to 1."""

import torch

from ..base import KernelForm, TransformFamily
from ..registry import register_transform


@register_transform
class Projective(TransformFamily):
    name = "projective"
    num_params = 8

    def identity(self):
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])

    def kernel_form(self, theta, size, align_corners=False):
        self.check_theta(theta)
        h = torch.cat([theta, torch.ones_like(theta[:, :1])], dim=1).reshape(-1, 3, 3)
        return KernelForm("projective", h)
