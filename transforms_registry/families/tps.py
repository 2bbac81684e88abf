"""Thin plate spline: K control points on a regular grid (default 4 x 4, as in the paper).

theta are the source positions of the control points (normalised (x, y), row-major, flattened to
2K). With target control points c_k and radial function U(r) = r^2 log r^2, the spline is

.. math::

    T(p) = a_0 + a_1 x + a_2 y + \\sum_k w_k U(\\lVert p - c_k \\rVert)
         = M_\\theta B(p), \\qquad B(p) = [1, x, y, U(r_1), \\dots, U(r_K)]

where the coefficients ``[a; w] = L^{-1} [0; theta]`` solve the TPS system
``L = [[0, P^T], [P, K]]``, ``P_k = [1, x_k, y_k]``, ``K_{jk} = U(|c_j - c_k|)``, once per grid size.
``learnable_basis=True`` makes B a trainable parameter (the paper's "learnt B"); it is then tied
to the output ``size`` given at construction.
"""

import torch
from torch import nn

from ..base import KernelForm, base_grid
from ..registry import register_transform
from ._mesh import ControlMeshFamily


def _u(r2):
    return torch.where(r2 > 0, r2 * torch.log(r2.clamp_min(1e-300)), torch.zeros_like(r2))


@register_transform
class ThinPlateSpline(ControlMeshFamily):
    name = "tps"

    def __init__(self, grid_size=(4, 4), learnable_basis=False, size=None, align_corners=False):
        super().__init__(grid_size)
        ctrl = self.ctrl64  # (K, 2)
        K = ctrl.shape[0]
        P = torch.cat([torch.ones(K, 1, dtype=torch.float64), ctrl], dim=1)  # (K, 3)
        L = torch.zeros(K + 3, K + 3, dtype=torch.float64)
        L[:3, 3:] = P.T
        L[3:, :3] = P
        L[3:, 3:] = _u(torch.cdist(ctrl, ctrl).square())
        # coefficients [a; w] = L^-1 [0; theta]: only the columns for theta are needed
        self.solve64 = torch.linalg.inv(L)[:, 3:]  # (K+3, K) float64
        self.learnable_basis = bool(learnable_basis)
        self.align_corners = align_corners
        self.size = None
        if self.learnable_basis:
            if size is None:
                raise ValueError("size: tps with learnable_basis=True needs the output size (Ho, Wo)")
            self.size = (int(size[0]), int(size[1]))
            self.basis = nn.Parameter(self.make_basis(self.size, align_corners))

    def make_basis(self, size, align_corners, dtype=torch.float32, device=None):
        """B = [1, x, y, U(r_1..K)] on the output grid: (K+3, Ho*Wo)."""
        base = base_grid(size, align_corners, torch.float64, device)  # (3, P): x, y, 1
        r2 = torch.cdist(self.ctrl64.to(base.device), base[:2].T).square()  # (K, P)
        return torch.cat([base[2:], base[:2], _u(r2)], dim=0).to(dtype)

    def kernel_form(self, theta, size, align_corners=False):
        self.check_theta(theta)
        size = (int(size[0]), int(size[1]))
        if self.learnable_basis:
            if size != self.size or align_corners != self.align_corners:
                raise ValueError(f"size: this tps has a learnable basis for size {self.size} and align_corners="
                                 f"{self.align_corners}; got {size} and {align_corners}")
            basis = self.basis
        else:
            basis = self.cached_basis(size, align_corners, theta.dtype, theta.device)
        src = theta.reshape(theta.shape[0], self.num_params // 2, 2)  # (N, K, 2)
        m = torch.einsum("ak,nkc->nca", self.cached_cast("solve", self.solve64, theta.dtype, theta.device), src)  # (N, 2, K+3)
        return KernelForm("basis", m, basis)
