"""Plugin families' own coordinate maps, fused: the form through which a family brings its Triton code
into the kernels.

A family (:class:`transforms_registry.TransformFamily`) may give its map as Triton code:

- ``triton_coords``: a ``@triton.jit`` function ``(p, x, y) -> (gx, gy)`` (a 3-D family: ``(p, x, y, z)
  -> (gx, gy, gz)``): from ``p``, a pointer to this transform's parameters (theta's row, float32,
  ``num_params`` values: ``tl.load(p + i)``), and the output pixel's normalised base coordinate
  ``x, y[, z]`` (``affine_grid``'s identity grid; float32 blocks), the normalised source coordinate;
- ``triton_grad`` (optional): a ``@triton.jit`` function ``(p, x, y, gx_bar, gy_bar) -> (t_0, ...,
  t_{num_params - 1})`` (3-D: ``(p, x, y, z, gx_bar, gy_bar, gz_bar)``): the pixel's terms of dL/dtheta
  from dL/d(source coordinate), ``t_i = sum_a gbar_a * d g_a / d theta_i``; the kernels sum them over
  the pixels in float32.

The kernels take both as compile-time arguments (``FN``, ``GRAD_FN``): one compiled kernel per family
and variant. Without ``triton_grad`` the backward writes dL/dg per pixel and dL/dtheta is the
vector-Jacobian product of the family's PyTorch ``grid`` with it (:mod:`stn_triton.ops`); the forward
never makes the grid.

Constraints: pure functions of the parameter row and the coordinates (no global state; module-level
constants as ``tl.constexpr``, with a block first in an expression, ``(x + 1.0) * C``: ``C * block`` is
not a block in Triton's interpreter), float32 math, Triton 3.6's language; the map depends on theta
only (one compiled kernel serves every instance of the class). ``tl.sin``/``tl.cos``/``tl.exp`` work;
the first two compile with libdevice's local-memory path for huge arguments (a stack frame in the
kernel), which a family may avoid with its own polynomial (``stn_logpolar`` does).

Testing a family: its fused output and gradients (to the input and to theta) must equal
``grid_sample`` on its PyTorch ``grid`` in float64 (``tests/core/test_plugin_forms.py`` does this for
every mode and padding). A function that fails to compile or returns the wrong number of values is an
:class:`stn_triton.FamilyKernelError` naming it.
"""

import triton
import triton.language as tl


@triton.jit
def plugin_coords(p_m, p_aux, p_pix, s_ac, q, b, mask_p, P, DM, frame, FN: tl.constexpr, NDIM: tl.constexpr):
    # p_m: theta's row (float32); FN: the family's triton_coords
    x, y, z = b
    if NDIM == 3:
        gx, gy, gz = FN(p_m, x, y, z)
    else:
        gx, gy = FN(p_m, x, y)
        gz = gx
    tl.static_assert(len(gx.shape) == 1 and len(gy.shape) == 1 and len(gz.shape) == 1,
                     "a family's triton_coords must return one block per axis, of the coordinates' shape")
    return (gx.to(tl.float32), gy.to(tl.float32), gz.to(tl.float32)), x


@triton.jit
def plugin_terms(acc, p_part, p_m, p_aux, q, mask_p, P, DM, b, g, w, gg, FN: tl.constexpr, NDIM: tl.constexpr):
    # acc: [BP, NACC] running sums of dL/dtheta's per-pixel terms; FN: the family's triton_grad
    x, y, z = b
    gg_x, gg_y, gg_z = gg
    if NDIM == 3:
        terms = FN(p_m, x, y, z, gg_x, gg_y, gg_z)
    else:
        terms = FN(p_m, x, y, gg_x, gg_y)
    tl.static_assert(len(terms) <= acc.shape[1], "a family's triton_grad returned more terms than it has parameters")
    cols = tl.arange(0, acc.shape[1])[None, :]
    for i in tl.static_range(len(terms)):  # column i of the block: the i-th parameter's terms
        acc += tl.where(cols == i, tl.where(mask_p, terms[i], 0.0)[:, None], 0.0)
    return acc


@triton.jit
def count_probe(p, out, FN: tl.constexpr, GRAD_FN: tl.constexpr, HAS_GRAD: tl.constexpr, NDIM: tl.constexpr):
    """Stores how many values a family's ``triton_coords`` and ``triton_grad`` return (a one-program
    launch, once per family class and device, before its first real launch: a count that does not match
    would otherwise be dropped or padded silently)."""
    v = tl.zeros([16], tl.float32)
    if NDIM == 3:
        g = FN(p, v, v, v)
    else:
        g = FN(p, v, v)
    tl.store(out, len(g))
    if HAS_GRAD:
        if NDIM == 3:
            t = GRAD_FN(p, v, v, v, v, v, v)
        else:
            t = GRAD_FN(p, v, v, v, v)
        tl.store(out + 1, len(t))


@triton.jit
def vjp_terms(acc, p_part, p_m, p_aux, q, mask_p, P, DM, b, g, w, gg, FN: tl.constexpr, NDIM: tl.constexpr):
    # a family without triton_grad: no terms (its dL/dtheta is the host's vector-Jacobian product)
    return acc


