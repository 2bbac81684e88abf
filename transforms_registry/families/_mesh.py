"""Regular control meshes shared by the point-based families."""

import numbers

import torch


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
