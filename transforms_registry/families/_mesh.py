"""Regular control meshes shared by the point-based families (tps, piecewise_affine)."""

import numbers

import torch

from ..base import TransformFamily


def check_grid_size(family, grid_size):
    if isinstance(grid_size, numbers.Integral):
        grid_size = (grid_size, grid_size)
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) for g in grid_size)):
        raise ValueError(f"grid_size: {family} expects (rows, cols) as two ints, got {grid_size!r}")
    if min(grid_size) < 2:
        raise ValueError(f"grid_size: {family} needs at least 2 x 2 control points, got {tuple(grid_size)}")
    return int(grid_size[0]), int(grid_size[1])


def control_points(rows, cols):
    """(rows*cols, 2) normalised (x, y) of a regular mesh over [-1, 1]^2, row-major."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, rows, dtype=torch.float64),
                          torch.linspace(-1, 1, cols, dtype=torch.float64), indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


class ControlMeshFamily(TransformFamily):
    """A family whose theta are the source positions of a regular rows x cols control mesh, with a
    basis B that depends only on the output size (built once per size and cached).

    Fixed tables (the control points, and what subclasses derive from them) are kept in float64
    and cast, once per dtype and device, to theta's: a family has no dtype of its own, so float64
    theta get float64 accuracy and ``.half()`` on a model cannot round them.
    """

    def __init__(self, grid_size):
        super().__init__()
        self.grid_size = check_grid_size(self.name, grid_size)
        self.ctrl64 = control_points(*self.grid_size)  # (K, 2) float64, CPU
        self._cache = {}

    @property
    def num_params(self):
        return 2 * self.grid_size[0] * self.grid_size[1]

    def identity(self):
        return self.ctrl64.flatten().float()

    def make_basis(self, size, align_corners, dtype=torch.float32, device=None):
        raise NotImplementedError

    def cached_basis(self, size, align_corners, dtype, device):
        key = ("basis", (int(size[0]), int(size[1])), align_corners, dtype, device)
        if key not in self._cache:
            self._cache[key] = self.make_basis(key[1], align_corners, dtype, device)
        return self._cache[key]

    def cached_cast(self, name, table, dtype, device):
        """A float64 table cast to (dtype, device), once."""
        key = (name, dtype, device)
        if key not in self._cache:
            self._cache[key] = table.to(device=device, dtype=dtype)
        return self._cache[key]
