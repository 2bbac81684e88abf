"""Piecewise affine: a regular rows x cols control mesh over the output, two triangles per cell.

theta are the source positions of the mesh vertices (normalised (x, y), row-major, flattened).
Each output pixel lies in one triangle; its barycentric weights over the vertices are a column of
the basis B (V, Ho*Wo), so the sampling coordinate is ``M_theta B`` with ``M_theta = theta^T``
(2, V): the basis kernel form. Each cell (i, j) is split along its diagonal from vertex (i, j) to
vertex (i+1, j+1).
"""

import torch

from ..base import KernelForm, base_grid
from ..registry import register_transform
from ._mesh import ControlMeshFamily


@register_transform
class PiecewiseAffine(ControlMeshFamily):
    name = "piecewise_affine"

    def __init__(self, grid_size=(4, 4)):
        super().__init__(grid_size)

    def make_basis(self, size, align_corners, dtype=torch.float32, device=None):
        """Barycentric weights (V, Ho*Wo): three non-zeros per pixel."""
        rows, cols = self.grid_size
        x, y = base_grid(size, align_corners, torch.float64, device)[:2]
        fx = (x + 1) / 2 * (cols - 1)  # mesh coordinates
        fy = (y + 1) / 2 * (rows - 1)
        j = fx.floor().clamp(0, cols - 2)
        i = fy.floor().clamp(0, rows - 2)
        u, v = fx - j, fy - i  # position inside the cell (extrapolates outside the mesh)
        upper = u >= v  # triangle (i,j), (i,j+1), (i+1,j+1); else (i,j), (i+1,j), (i+1,j+1)
        v00 = (i * cols + j).long()
        B = torch.zeros(rows * cols, x.numel(), dtype=torch.float64, device=device)
        p = torch.arange(x.numel(), device=device)
        B[v00, p] = torch.where(upper, 1 - u, 1 - v)
        B[v00 + 1, p] += torch.where(upper, u - v, torch.zeros_like(u))
        B[v00 + cols, p] += torch.where(upper, torch.zeros_like(u), v - u)
        B[v00 + cols + 1, p] += torch.where(upper, v, u)
        return B.to(dtype)

    def kernel_form(self, theta, size, align_corners=False):
        self.check_theta(theta)
        m = theta.reshape(theta.shape[0], self.num_params // 2, 2).transpose(1, 2)  # (N, 2, V)
        return KernelForm("basis", m, self.cached_basis(size, align_corners, theta.dtype, theta.device))
