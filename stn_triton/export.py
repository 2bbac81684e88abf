"""Deployment: this library's ops under ``torch.export`` and ``torch.onnx.export``.

``torch.export`` keeps each op whole (``stn_triton.affine_sample`` and the rest stay one node), so that
``torch.compile`` and AOT users keep the fused kernels. On request each op becomes standard ATen: the
grid its form makes (``affine_grid``, a matmul for basis forms, the base grid plus the field for flow
forms) and ``grid_sampler``:

    ep = torch.export.export(model, args)
    ep = ep.run_decompositions(stn_triton.decompositions())   # no stn_triton op left

``torch.onnx.export(model, args, dynamo=True)`` applies the same decompositions by itself (they are
registered in PyTorch's decomposition table, which the ONNX exporter reads; ``torch.export``'s default
and inductor's tables do not include them), and the sampling becomes ONNX ``GridSample``. What has no
standard form is refused with an error naming the op: bicubic sampling of 5-D input (tricubic), which
PyTorch's ``grid_sampler_3d`` lacks (ONNX ``GridSample`` defines N-cubic from opset 20, but no ATen op
leads there).
"""

import torch
import torch.nn.functional as F

from .kernels.forms import FORMS

_TABLE = {}  # forward op overload -> its decomposition


class ExportError(NotImplementedError):
    """An op of this library whose arguments have no standard ATen / ONNX form."""


def decompose(form, x, params, size, mode, padding_mode, align_corners):
    """The op ``stn_triton::<form>_sample`` in standard ATen: (N, K, C, *size), the op's values (for
    finite coordinates; non-finite ones follow ``grid_sampler``). Half-precision input is sampled in
    float32 (as the kernels compute), the grid never rounded to half."""
    f = FORMS[form]
    if mode == "bicubic" and f.ndim == 3:
        raise ExportError(f"stn_triton.{form}_sample: mode='bicubic' on 5-D input (tricubic) has no standard "
                          "form: PyTorch's grid_sampler_3d samples volumes with 'bilinear' (trilinear) or "
                          "'nearest' only, so there is no ATen op to decompose into, and none that torch.onnx "
                          "translates to ONNX GridSample's N-cubic mode (opset 20). Export the model with one of "
                          "those modes, or keep the op (torch.export without these decompositions).")
    size = [int(s) for s in size]
    grid = f.grid(list(params), size, align_corners)
    N, C, *S = x.shape
    K = grid.shape[1]
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xs = x.to(compute)[:, None].expand(N, K, C, *S).reshape(N * K, C, *S)
    g = grid.to(compute).reshape(N * K, *size, f.ndim)
    out = F.grid_sample(xs, g, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return out.reshape(N, K, C, *size).to(x.dtype)


def register(form, op, n_params):
    """Called once per forward op (:func:`stn_triton.ops._define`): its decomposition, in this module's
    table and in PyTorch's (which ``torch.onnx.export`` reads)."""

    def fn(x, *args):
        return decompose(form, x, args[:n_params], *args[n_params:])

    overload = op._opoverload
    _TABLE[overload] = fn
    torch._decomp.register_decomposition(overload)(fn)


def decompositions():
    """A decomposition table for ``ExportedProgram.run_decompositions``: ``torch.export``'s default
    (core ATen) plus every op of this library (its grid and ``grid_sampler``)."""
    table = torch.export.default_decompositions()
    for op, fn in _TABLE.items():
        table[op] = fn
    return table
