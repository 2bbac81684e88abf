"""The form table: every kernel form, 2-D and 3-D, in one place.

A form is how the sampling coordinate of output pixel p is made (see each form's module for its
math). Its row says what the kernels, the launchers, the ops (:mod:`stn_triton.ops`: op names,
schemas, fakes, autograd), the reference (:mod:`stn_triton.reference`), the public functions and the
compile-only report need to know:

- ``coords``: the ``@triton.jit`` coordinate map, ``coords(p_prm, p_aux, p_pix, s_ac, q, b, mask_p, P,
  DM, frame, FN, NDIM) -> ((gx, gy, gz), w)``: from this transform's parameter row ``p_prm``, the auxiliary
  tensor (``p_aux``: B for basis forms; ``p_pix``: pointers to each pixel's entry in a per-pixel
  tensor, its components ``s_ac`` apart), the flat pixel index ``q``, the base grid ``b = (x, y, z)``
  and, for a form with a frame, the frame's values (``frame``, loaded once per program:
  :func:`~stn_triton.kernels.common.field_frame`), the normalised coordinate (gz a stand-in in 2-D)
  and one extra value the terms may use (``w``); ``FN`` is a plugin family's own map (the row's ``fn``),
  which only the plugin form's coordinate map calls;
- ``terms``: the ``@triton.jit`` parameter-gradient terms, ``terms(acc, p_part, p_prm, p_aux, q, mask_p,
  P, DM, b, g, w, gg, FN, NDIM) -> acc`` (``FN``: the row's ``grad_fn``): adds this tile's per-pixel terms of dL/dparams (row-major, padded) to the
  ``[BLOCK_P, nacc]`` block ``acc``, or, with ``nacc = 0``, writes the tile's sums to ``p_part`` itself;
- ``params``: the op's parameter tensors; with ``rows`` > 0 (or a basis) the first is the transform's
  (N, K, ...) parameter, a float32 matrix of ``rows x cols`` per transform (``cols`` 0: the basis
  dimension): the kernels' parameter row, whose gradient the terms sum;
- ``field``: the index of a parameter that is itself per pixel (the grid, a displacement field), or
  -1: its gradient is dL/dg (times the frame's scale), written per pixel in its own layout;
- ``frame``: the last parameter is the field's frame (:mod:`~stn_triton.kernels.flow`), appended to
  the parameter row (a row shared by every transform when the form has no matrix);
- ``grid``: the reference, ``grid(params, size, align_corners) -> (N, K, *size, ndim)``.

Adding a form is one module for its math (its ``coords``, ``terms`` and ``grid``) plus one row here.
"""

import functools
import re
from dataclasses import dataclass
from typing import Callable

import triton

from .affine import affine_coords, affine_grid, affine_terms
from .basis import basis_coords, basis_grid, basis_terms
from .flow import affine_flow_coords, affine_flow_grid, flow_coords, flow_grid
from .grid import explicit_grid, grid_coords, no_terms
from .plugin import plugin_coords, plugin_terms, vjp_terms
from .projective import projective_coords, projective_grid, projective_terms


@dataclass(frozen=True)
class Form:
    name: str  # the op is stn_triton::<name>_sample
    ndim: int  # 2: input (N, C, H, W); 3: input (N, C, D, H, W)
    params: tuple  # names of the op's parameter tensors
    rows: int  # the transform's matrix: rows x cols per (n, k) (cols 0: the basis dimension, D)
    cols: int
    coords: object  # @triton.jit coordinate map
    terms: object  # @triton.jit parameter-gradient terms
    nacc: int  # width of the terms block (a power of two >= rows * cols); 0: the terms store per tile
    grid: Callable  # pure-PyTorch grid: the reference and the test oracle
    field: int = -1  # which parameter is per pixel (a grid, a displacement field): dL/dg is its gradient
    frame: bool = False  # the last parameter is the field's frame, appended to the parameter row
    basis: bool = False  # the second parameter is a basis B (D, P), with its own gradient kernel
    fn: object = None  # a plugin family's own coordinate map (@triton.jit), which ``coords`` calls
    grad_fn: object = None  # its own gradient terms, which ``terms`` calls (None: a vector-Jacobian product)

    @property
    def kind(self):
        """The form without its dimension: affine, projective, basis, grid (a family's kernel_form kind),
        flow or affine_flow."""
        return self.name[:-2] if self.name.endswith("3d") else self.name

    @property
    def vjp(self):
        """dL/dtheta is the host's vector-Jacobian product of ``grid`` with the kernels' dL/dg (a plugin
        family without its own gradient terms)."""
        return self.fn is not None and self.grad_fn is None

    @property
    def per_pixel(self):
        """A parameter is per pixel: the kernels read it at each output pixel (the ``aux`` tensor)."""
        return self.field >= 0

    @property
    def shared_row(self):
        """One parameter row serves every transform: no matrix (a stand-in for the grid, the frame
        for a field)."""
        return self.rows == 0 and not self.basis

    @property
    def frame_at(self):
        """Where the frame starts in the parameter row (after the matrix), or -1 without one."""
        return self.rows * self.cols if self.frame else -1

    @property
    def per_tile(self):
        """The terms write each tile's sums themselves (one tile per backward program)."""
        return self.nacc == 0 and not self.per_pixel


FORMS = {f.name: f for f in (
    Form("affine", 2, ("theta",), 2, 3, affine_coords, affine_terms, 8, affine_grid),
    Form("projective", 2, ("h",), 3, 3, projective_coords, projective_terms, 16, projective_grid),
    Form("basis", 2, ("m", "basis"), 2, 0, basis_coords, basis_terms, 0, basis_grid, basis=True),
    Form("grid", 2, ("grid",), 0, 0, grid_coords, no_terms, 0, explicit_grid, field=0),
    Form("flow", 2, ("flow", "frame"), 0, 0, flow_coords, no_terms, 0, flow_grid, field=0, frame=True),
    Form("affine_flow", 2, ("theta", "flow", "frame"), 2, 3, affine_flow_coords, affine_terms, 8, affine_flow_grid,
         field=1, frame=True),
    Form("affine3d", 3, ("theta",), 3, 4, affine_coords, affine_terms, 16, affine_grid),
    Form("basis3d", 3, ("m", "basis"), 3, 0, basis_coords, basis_terms, 0, basis_grid, basis=True),
    Form("grid3d", 3, ("grid",), 0, 0, grid_coords, no_terms, 0, explicit_grid, field=0),
    Form("flow3d", 3, ("flow", "frame"), 0, 0, flow_coords, no_terms, 0, flow_grid, field=0, frame=True),
    Form("affine_flow3d", 3, ("theta", "flow", "frame"), 3, 4, affine_flow_coords, affine_terms, 16, affine_flow_grid,
         field=1, frame=True),
)}


_PLUGINS = {}  # family class -> its form


def plugin_form(family):
    """The form that fuses ``family``'s own Triton map (:mod:`~stn_triton.kernels.plugin`), made and
    added to the table at its first use: one per family class (its map may depend on theta only)."""
    cls = type(family)
    form = _PLUGINS.get(cls)
    if form is None:
        base = "plugin_" + re.sub(r"[^0-9a-z]+", "_", f"{cls.__module__}_{cls.__qualname__}".lower()).strip("_")
        name, i = base, 1
        while name in FORMS:  # another class of the same name (redefined): a name of its own
            i += 1
            name = f"{base}_{i}"
        n = family.num_params
        grad = getattr(cls, "triton_grad", None)
        form = Form(name, family.ndim, ("theta",), 1, n, plugin_coords, plugin_terms if grad is not None else vjp_terms,
                    triton.next_power_of_2(n), functools.partial(_family_grid, family), fn=cls.triton_coords,
                    grad_fn=grad)
        _PLUGINS[cls] = FORMS[name] = form
    return form


def _family_grid(family, params, size, align_corners):
    """theta (N, K, num_params) -> (N, K, *size, ndim): the family's PyTorch ``grid``, the reference and
    test oracle of its fused form."""
    theta = params[0]
    N, K = theta.shape[:2]
    g = family.grid(theta.reshape(N * K, theta.shape[-1]), list(size), align_corners)
    return g.reshape(N, K, *size, len(size))


def find(kind, ndim):
    """The row of form ``kind`` (affine, projective, basis, grid, flow, affine_flow) for ``ndim`` (2 or 3) spatial
    dimensions, or None when the form has no such version (projective in 3-D)."""
    return next((f for f in FORMS.values() if f.kind == kind and f.ndim == ndim), None)
