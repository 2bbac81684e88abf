"""The one place that talks to ``torch.library``: the custom ops, their fake (meta) implementations,
autograd and autocast.

Ops (namespace ``stn_triton``), one per kernel form, all with K explicit (params ``(N, K, ...)``,
output ``(N, K, C, Ho, Wo)``):

=====================  ===========================================  =========================
op                     parameters                                   gradients
=====================  ===========================================  =========================
``affine_sample``      ``theta (N, K, 2, 3)``                       x, theta
``projective_sample``  ``h (N, K, 3, 3)``                           x, h
``basis_sample``       ``m (N, K, 2, D)``, ``basis (D, Ho*Wo)``     x, m, basis
``grid_sample``        ``grid (N, K, Ho, Wo, 2)``                   x, grid
``affine3d_sample``    ``theta (N, K, 3, 4)``                       x, theta
``basis3d_sample``     ``m (N, K, 3, D)``, ``basis (D, Do*Ho*Wo)``  x, m, basis
``grid3d_sample``      ``grid (N, K, Do, Ho, Wo, 3)``               x, grid
``flow_sample``        ``flow (N, K, Ho, Wo, 2)``: base grid + flow  x, flow
``flow3d_sample``      ``flow (N, K, Do, Ho, Wo, 3)``               x, flow
=====================  ===========================================  =========================

The 3-D ops take a 5-D input ``x (N, C, D, H, W)``, ``size = [Do, Ho, Wo]``, and return
``(N, K, C, Do, Ho, Wo)`` (``mode="bilinear"`` is trilinear, as in PyTorch).

Each has a ``<name>_backward`` op returning one gradient per tensor input (an empty tensor for one
not asked for), so that ``torch.compile`` traces forward and backward through the fake
implementations. Validation is the public functions' job (:mod:`stn_triton.functional`).
"""

import torch

from . import reference
from ._backend import backend
from .kernels import launch
from .kernels.forms import FORMS

_LIB = torch.library.Library("stn_triton", "FRAGMENT")  # autocast registrations live here
_TAIL = "SymInt[] size, str mode, str padding_mode, bool align_corners"


def _num_k(params):
    return params[0].shape[1]


def _new_output(form, x, K, size):
    """The output buffer (and layout) every path returns: see launch.new_output."""
    return launch.new_output(x, K, *size)


_STAND_IN = {}  # device -> a float32 [1]: the parameter row the per-pixel forms are given and never read


def _stand_in(device):
    """One per device, made once: a fresh one per call would be one more (fill) launch per call."""
    t = _STAND_IN.get(device)
    if t is None:
        t = _STAND_IN[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return t


def _kernel_params(form, params):
    """(prm float32 (N*K, R) contiguous, aux, DM) as the kernels take them."""
    f, p0 = FORMS[form], params[0]
    if f.per_pixel:
        return _stand_in(p0.device), p0, 0
    NK = p0.shape[0] * p0.shape[1]
    prm = p0.reshape(NK, p0.shape[2:].numel()).to(torch.float32).contiguous()
    if f.basis:
        return prm, params[1].to(torch.float32).contiguous(), p0.shape[-1]
    return prm, prm, 0


def _forward(form, x, params, size, mode, padding_mode, align_corners):
    size = [int(s) for s in size]
    if backend(x) == "reference":
        with torch.no_grad():
            ref = reference.form_sample(form, x, params, size, mode, padding_mode, align_corners)
        return _new_output(form, x, ref.shape[1], size).copy_(ref)  # the layout the fake promises
    return _kernel_forward(form, x, params, size, mode, padding_mode, align_corners)


def _kernel_forward(form, x, params, size, mode, padding_mode, align_corners):
    prm, aux, DM = _kernel_params(form, params)
    return launch.sample_forward(form, x, prm, aux, _num_k(params), size, DM, mode, padding_mode, align_corners)


def _backward(form, grad_out, x, params, size, mode, padding_mode, align_corners, needs):
    size = [int(s) for s in size]
    needs = list(needs) + [False] * (1 + len(params) - len(needs))
    if backend(x) == "reference":
        grads = _reference_backward(form, grad_out, x, params, size, mode, padding_mode, align_corners, needs)
    else:
        grads = _kernel_backward(form, grad_out, x, params, size, mode, padding_mode, align_corners, needs)
    return tuple(g if need else t.new_empty(0) for g, t, need in zip(grads, (x, *params), needs))


def _reference_backward(form, grad_out, x, params, size, mode, padding_mode, align_corners, needs):
    # torch.func.vjp, not torch.autograd.grad: inside a custom op the autograd keys are excluded
    def fn(*inputs):
        return reference.form_sample(form, inputs[0], inputs[1:], size, mode, padding_mode, align_corners)

    _, vjp = torch.func.vjp(fn, x, *params)
    grads = []
    for i, (t, g, need) in enumerate(zip((x, *params), vjp(grad_out), needs)):
        # the layouts the kernel path returns and the fake implementation promises
        grads.append((torch.empty_like(t).copy_(g) if i == 0 else g.contiguous()) if need else None)
    return grads


def _kernel_backward(form, grad_out, x, params, size, mode, padding_mode, align_corners, needs):
    """The kernels' gradients of any form, 2-D or 3-D: [dL/dx, dL/dparams[0], (dL/dB)]."""
    f = FORMS[form]
    prm, aux, DM = _kernel_params(form, params)
    need_x, need_p0 = needs[0], needs[1]
    need_basis = f.basis and needs[2]
    grad_x, grad_prm, gg = launch.sample_backward(
        form, grad_out, x, prm, aux, _num_k(params), size, DM, mode, padding_mode, align_corners,
        need_x=need_x, need_param=need_p0 and not f.per_pixel, need_gg=(f.per_pixel and need_p0) or need_basis,
    )
    p0 = params[0]
    g0 = (gg if f.per_pixel else grad_prm).reshape(p0.shape).to(p0.dtype) if need_p0 else None
    grads = [grad_x, g0]
    if f.basis:
        if not need_basis:
            grads.append(None)
        elif x.shape[1] * prm.shape[0] == 0:  # an empty output: dL/dB is zero, no kernel runs
            grads.append(torch.zeros_like(params[1]))
        else:
            grads.append(launch.basis_grad(prm, gg, DM, gg.shape[1]).to(params[1].dtype))
    return grads


def double_backward(form, grad_out, x, params, size, mode, padding_mode, align_corners, needs, ggrads, wanted):
    """The backward of a backward op: the gradients of <dL/dx, dL/dparams> (weighted by ``ggrads``)
    with respect to (grad_out, x, params), for the ``wanted`` ones (None for the others).

    The first derivatives are recomputed by plain autograd through the reference (PyTorch's
    ``grid_sample``, whose backward is differentiable), then differentiated once more: the second
    order is a composition of PyTorch ops; the first order stays the fused kernels'.
    """
    size = [int(s) for s in size]
    needs = list(needs) + [False] * (1 + len(params) - len(needs))
    pairs = [(i, g) for i, (need, g) in enumerate(zip(needs, ggrads)) if need and g is not None]
    if not pairs or not any(wanted):
        return [None] * len(wanted)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in (grad_out, x, *params)]
        go, xs, ps = leaves[0], leaves[1], leaves[2:]
        out = reference.form_sample(form, xs, ps, size, mode, padding_mode, align_corners)
        firsts = torch.autograd.grad(out, [(xs, *ps)[i] for i, _ in pairs], go, create_graph=True, allow_unused=True)
        used = [(f, g) for f, (_, g) in zip(firsts, pairs) if f is not None]
        inputs = [t for t, w in zip(leaves, wanted) if w]
        if not used or not inputs:
            return [None] * len(wanted)
        got = iter(torch.autograd.grad([f for f, _ in used], inputs, [g for _, g in used], allow_unused=True))
    return [next(got) if w else None for w in wanted]


def _fake_forward(form, x, params, size, mode, padding_mode, align_corners):
    return _new_output(form, x, _num_k(params), size)


def _fake_backward(form, grad_out, x, params, size, mode, padding_mode, align_corners, needs):
    needs = list(needs) + [False] * (1 + len(params) - len(needs))
    out = [torch.empty_like(x) if needs[0] else x.new_empty(0)]
    for t, need in zip(params, needs[1:]):
        out.append(t.new_empty(t.shape) if need else t.new_empty(0))
    return tuple(out)


def _define(form, names):
    n = len(names)
    tensors = ", ".join(f"Tensor {name}" for name in names)
    fwd_schema = f"(Tensor x, {tensors}, {_TAIL}) -> Tensor"
    bwd_schema = f"(Tensor grad_out, Tensor x, {tensors}, {_TAIL}, bool[] needs) -> ({', '.join(['Tensor'] * (n + 1))})"

    def fwd(x, *args):
        return _forward(form, x, args[:n], *args[n:])

    def bwd(grad_out, x, *args):
        return _backward(form, grad_out, x, args[:n], *args[n:])

    fwd_op = torch.library.custom_op(f"stn_triton::{form}_sample", fwd, mutates_args=(), schema=fwd_schema)
    bwd_op = torch.library.custom_op(f"stn_triton::{form}_sample_backward", bwd, mutates_args=(), schema=bwd_schema)
    fwd_op.register_fake(lambda x, *args: _fake_forward(form, x, args[:n], *args[n:]))
    bwd_op.register_fake(lambda g, x, *args: _fake_backward(form, g, x, args[:n], *args[n:]))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[: n + 1])
        ctx.tail = inputs[n + 1:]

    def backward(ctx, grad):
        needs = list(ctx.needs_input_grad[: n + 1])
        grads = bwd_op(grad, *ctx.saved_tensors, *ctx.tail, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * len(ctx.tail)

    fwd_op.register_autograd(backward, setup_context=setup_context)

    def setup_context_bwd(ctx, inputs, output):
        ctx.save_for_backward(*inputs[: n + 2])  # grad_out, x, params
        ctx.tail = inputs[n + 2:]  # size, mode, padding_mode, align_corners, needs

    def backward_bwd(ctx, *ggrads):
        grad_out, x, *params = ctx.saved_tensors
        grads = double_backward(form, grad_out, x, params, *ctx.tail, ggrads, ctx.needs_input_grad[: n + 2])
        return (*grads, *(None,) * len(ctx.tail))

    bwd_op.register_autograd(backward_bwd, setup_context=setup_context_bwd)
    for device_type in ("cuda", "cpu"):
        _register_autocast(f"{form}_sample", fwd_op, n, device_type)
    return fwd_op, bwd_op


def autocast_inputs(x, params, device_type):
    """Autocast's rule for every path: the input map in the autocast dtype (half the bytes moved; the
    kernels compute in float32 anyway), the transform parameters in float32 (a bf16 grid would be
    off by more than a pixel at 448 px). float64 tensors and other devices' tensors are left alone."""
    def cast(t, dtype):
        eligible = t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type
        return t.to(dtype) if eligible else t

    return cast(x, torch.get_autocast_dtype(device_type)), [cast(t, torch.float32) for t in params]


def reference_forward(form, x, params, size, mode, padding_mode, align_corners):
    """The reference path as the public functions take it (plain autograd, so differentiable to any
    order), with the ops' autocast rule and output layout: (N, K, C, Ho, Wo) (3-D forms:
    (N, K, C, Do, Ho, Wo)) in x's memory format."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        x, params = autocast_inputs(x, params, device_type)
        with torch.autocast(device_type, enabled=False):  # the ops compute in these dtypes too
            out = reference.form_sample(form, x, params, size, mode, padding_mode, align_corners)
    else:
        out = reference.form_sample(form, x, params, size, mode, padding_mode, align_corners)
    return launch.in_layout_of(out, x)


def _register_autocast(name, op, n, device_type):
    """Under autocast the op runs on :func:`autocast_inputs`' casts, with autocast off inside."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, x, *args):
        x, params = autocast_inputs(x, args[:n], device_type)
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return op(x, *params, *args[n:])

    _LIB.impl(name, kernel, key, with_keyset=True)


OPS = {name: _define(name, f.params) for name, f in FORMS.items()}
affine_sample, affine_sample_backward = OPS["affine"]
projective_sample, projective_sample_backward = OPS["projective"]
basis_sample, basis_sample_backward = OPS["basis"]
grid_sample, grid_sample_backward = OPS["grid"]
affine3d_sample, affine3d_sample_backward = OPS["affine3d"]
basis3d_sample, basis3d_sample_backward = OPS["basis3d"]
grid3d_sample, grid3d_sample_backward = OPS["grid3d"]
flow_sample, flow_sample_backward = OPS["flow"]
flow3d_sample, flow3d_sample_backward = OPS["flow3d"]
