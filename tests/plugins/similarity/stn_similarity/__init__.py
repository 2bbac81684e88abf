"""A similarity transform (isotropic scale s, rotation angle a in radians, translation tx, ty),
published as a plugin. It is not decorated: stn_triton finds it through the entry point."""

import torch

from transforms_registry import KernelForm, TransformFamily


class Similarity(TransformFamily):
    num_params = 4

    def identity(self):
        return torch.tensor([1.0, 0.0, 0.0, 0.0])

    def kernel_form(self, theta, size, align_corners=False):
        self.check_theta(theta)
        s, a, tx, ty = theta.unbind(1)
        c, d = s * torch.cos(a), s * torch.sin(a)
        return KernelForm("affine", torch.stack([c, -d, tx, d, c, ty], dim=1).view(-1, 2, 3))
