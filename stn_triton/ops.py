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
``flow_sample``        ``flow (N, K, Ho, Wo, 2)``, ``frame (4,)``   x, flow
``affine_flow_sample`` ``theta (N, K, 2, 3)``, ``flow``, ``frame``  x, theta, flow
``flow3d_sample``      ``flow (N, K, Do, Ho, Wo, 3)``, ``frame (6,)``  x, flow
``affine_flow3d_sample``  ``theta (N, K, 3, 4)``, ``flow``, ``frame``  x, theta, flow
=====================  ===========================================  =========================

The flow forms sample at the base grid (or ``theta``'s affine grid) plus the field ``flow`` read through
its ``frame`` (per axis a scale and the component holding it: :mod:`stn_triton.kernels.flow`); the
field's gradient comes back in the field's own layout (strides) and dtype.

The 3-D ops take a 5-D input ``x (N, C, D, H, W)``, ``size = [Do, Ho, Wo]``, and return
``(N, K, C, Do, Ho, Wo)`` (``mode="bilinear"`` is trilinear, as in PyTorch).

Each has a ``<name>_backward`` op returning one gradient per tensor input (an empty tensor for one
not asked for), so that ``torch.compile`` traces forward and backward through the fake
implementations. Validation is the public functions' job (:mod:`stn_triton.functional`).
"""

import torch

from . import export, reference
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


_CONSTANTS = {}  # (device, values) -> a float32 tensor of those values, made once


def constant(values, device):
    """A small float32 tensor of ``values`` on ``device``, made once: the per-pixel forms' parameter row
    (the grid's never-read stand-in, a field's frame). A fresh one per call would be a copy from the
    host (waiting for the device) or a fill launch per call; under ``torch.compile`` it is a constant."""
    values = tuple(float(v) for v in values)
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32, device=device)
    key = (torch.device(device), values)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= 256:  # frames depend on input sizes: keep the table small
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return t


def _stand_in(device):
    """The parameter row of the grid forms (never read)."""
    return constant((0.0,), device)


def _kernel_params(form, params):
    """(prm float32 (N*K, R) contiguous, or one row (1, R) shared by every transform; aux; DM) as the
    kernels take them: the matrix's row, then the frame (if any); aux is B (basis forms) or the
    per-pixel parameter."""
    f, p0 = FORMS[form], params[0]
    aux = params[f.field] if f.per_pixel else None
    frm = params[-1].reshape(1, -1).to(torch.float32) if f.frame else None
    if f.shared_row:
        return (frm.contiguous() if frm is not None else _stand_in(p0.device)), aux, 0
    NK = p0.shape[0] * p0.shape[1]
    prm = p0.reshape(NK, p0.shape[2:].numel()).to(torch.float32)
    if frm is not None:
        prm = torch.cat([prm, frm.expand(NK, frm.shape[1])], dim=1)
    prm = prm.contiguous()
    if f.basis:
        return prm, params[1].to(torch.float32).contiguous(), p0.shape[-1]
    return prm, (aux if aux is not None else prm), 0


class FamilyKernelError(RuntimeError):
    """A plugin family's Triton code (its ``triton_coords`` or ``triton_grad``) failed in the kernels: it
    did not compile, or it returned the wrong number or shape of values."""


def _code_errors():
    """What a kernel's Triton code failing raises: a compilation error (compiled), an interpreter error
    (Triton's interpreter). Other failures (memory, launch limits) are not the family's code's."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import InterpreterError

    return CompilationError, InterpreterError


def _family_code(form, step, call):
    """Run ``call`` (a kernel launch); a failure of a plugin family's own Triton code is named as such."""
    f = FORMS[form]
    if f.fn is None:
        return call()
    try:
        return call()
    except _code_errors() as e:
        fns = [f.fn] + ([f.grad_fn] if step == "backward" and f.grad_fn is not None else [])
        names = " or ".join(f"{fn.fn.__module__}.{fn.fn.__qualname__}" if hasattr(fn, "fn") else repr(fn) for fn in fns)
        inner = e  # the interpreter wraps the error at each call level: the innermost one says what happened
        while isinstance(e, _code_errors()[1]) and inner.__cause__ is not None:  # (a compilation error: its own
            inner = inner.__cause__                                             # message has the source line)
        why = str(inner)
        why = why if len(why) <= 600 else why[:300] + " ... " + why[-200:]  # values, not pages of them
        raise FamilyKernelError(
            f"transform: the fused {step} kernel of plugin form {form!r} failed in the family's Triton code ({names}): "
            f"{type(inner).__name__}: {why}\nThe contract (stn_triton.kernels.plugin): triton_coords(p, x, y) -> (gx, gy) "
            "(3-D: (p, x, y, z) -> (gx, gy, gz)), one float32 block per axis; triton_grad(p, x, y, gx_bar, gy_bar) "
            "-> one block per parameter") from e


_COUNTED = set()  # (form, device type): the family's functions' return counts were checked


def check_family_counts(form, device):
    """Before a plugin form's first kernel launch on a device type: its ``triton_coords`` must return one
    block per axis and its ``triton_grad`` one per parameter (a one-program probe launch), else an error
    naming the function; a wrong count would otherwise be padded or dropped without a word."""
    f = FORMS[form]
    key = (form, torch.device(device).type)
    if f.fn is None or key in _COUNTED:
        return
    from .kernels.plugin import count_probe

    out = torch.full((2,), -1, dtype=torch.int32, device=device)
    theta = torch.zeros(f.cols, dtype=torch.float32, device=device)
    _family_code(form, "forward", lambda: count_probe[(1,)](
        theta, out, FN=f.fn, GRAD_FN=f.grad_fn if f.grad_fn is not None else f.fn, HAS_GRAD=f.grad_fn is not None,
        NDIM=f.ndim))
    got = out.tolist()
    for name, fn, n, want, what in (("triton_coords", f.fn, got[0], f.ndim, "one block per axis"),
                                    ("triton_grad", f.grad_fn, got[1], f.cols, "one term per parameter")):
        if fn is not None and n != want:
            label = f"{fn.fn.__module__}.{fn.fn.__qualname__}" if hasattr(fn, "fn") else repr(fn)
            raise FamilyKernelError(f"transform: plugin form {form!r}: {name} ({label}) returns {n} values; expected "
                                    f"{want}, {what}")
    _COUNTED.add(key)


def _forward(form, x, params, size, mode, padding_mode, align_corners):
    size = [int(s) for s in size]
    if backend(x) == "reference":
        with torch.no_grad():
            ref = reference.form_sample(form, x, params, size, mode, padding_mode, align_corners)
        return _new_output(form, x, ref.shape[1], size).copy_(ref)  # the layout the fake promises
    return _kernel_forward(form, x, params, size, mode, padding_mode, align_corners)


def _kernel_forward(form, x, params, size, mode, padding_mode, align_corners):
    prm, aux, DM = _kernel_params(form, params)
    return _family_code(form, "forward", lambda: launch.sample_forward(
        form, x, prm, aux, _num_k(params), size, DM, mode, padding_mode, align_corners))


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
    like = _like(form, len(params))
    for t, g, need, same in zip((x, *params), vjp(grad_out), needs, like):
        # the layouts the kernel path returns and the fake implementation promises
        grads.append((torch.empty_like(t).copy_(g) if same else g.contiguous()) if need else None)
    return grads


def _kernel_backward(form, grad_out, x, params, size, mode, padding_mode, align_corners, needs):
    """The kernels' gradients of any form, 2-D or 3-D: one per tensor in (x, *params), None for the
    frame."""
    f = FORMS[form]
    prm, aux, DM = _kernel_params(form, params)
    need_x = needs[0]
    need_m = not f.shared_row and needs[1]  # the matrix (theta, h, m)
    need_field = f.per_pixel and needs[1 + f.field]
    need_basis = f.basis and needs[2]
    need_vjp = f.vjp and need_m  # a plugin family's dL/dtheta from dL/dg, through its PyTorch grid
    if f.frame and needs[len(params)]:
        raise NotImplementedError(f"{form}_sample: the kernels compute no gradient for the frame; pass a frame "
                                  "that does not require grad")
    grad_x, grad_prm, gg = _family_code(form, "backward", lambda: launch.sample_backward(
        form, grad_out, x, prm, aux, _num_k(params), size, DM, mode, padding_mode, align_corners,
        need_x=need_x, need_param=need_m and not f.vjp, need_gg=need_field or need_basis or need_vjp,
    ))
    grads = [grad_x] + [None] * len(params)
    if need_vjp:
        _, vjp = torch.func.vjp(lambda t: f.grid((t,), size, align_corners), params[0])
        (g,) = vjp(gg.reshape(*params[0].shape[:2], *size, len(size)).to(params[0].dtype))
        grads[1] = g.contiguous()
    elif need_m:
        grads[1] = grad_prm.reshape(params[0].shape).to(params[0].dtype)
    if need_field:
        grads[1 + f.field] = gg  # in the field's dtype and layout (see launch.sample_backward)
    if need_basis:
        if x.shape[1] * prm.shape[0] == 0:  # an empty output: dL/dB is zero, no kernel runs
            grads[2] = torch.zeros_like(params[1])
        else:
            grads[2] = launch.basis_grad(prm, gg, DM, gg.shape[1]).to(params[1].dtype)
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


def _like(form, n):
    """Which of (x, *params) get their gradient in their own layout (``torch.empty_like``): x, and a
    per-pixel parameter; the others' are contiguous."""
    f = FORMS[form]
    return [True] + [i == f.field for i in range(n)]


def _fake_backward(form, grad_out, x, params, size, mode, padding_mode, align_corners, needs):
    needs = list(needs) + [False] * (1 + len(params) - len(needs))
    out = []
    for t, need, same in zip((x, *params), needs, _like(form, len(params))):
        out.append((torch.empty_like(t) if same else t.new_empty(t.shape)) if need else t.new_empty(0))
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
    export.register(form, fwd_op, n)  # standard ATen on request (stn_triton.decompositions), and for ONNX
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


def ops_for(form):
    """The (forward, backward) ops of ``form`` (a row's name), defined at first use for a form added
    to the table later (a plugin family's)."""
    got = OPS.get(form)
    if got is None:
        got = OPS[form] = _define(form, FORMS[form].params)
    return got
affine_sample, affine_sample_backward = OPS["affine"]
projective_sample, projective_sample_backward = OPS["projective"]
basis_sample, basis_sample_backward = OPS["basis"]
grid_sample, grid_sample_backward = OPS["grid"]
affine3d_sample, affine3d_sample_backward = OPS["affine3d"]
basis3d_sample, basis3d_sample_backward = OPS["basis3d"]
grid3d_sample, grid3d_sample_backward = OPS["grid3d"]
flow_sample, flow_sample_backward = OPS["flow"]
flow3d_sample, flow3d_sample_backward = OPS["flow3d"]
affine_flow_sample, affine_flow_sample_backward = OPS["affine_flow"]
affine_flow3d_sample, affine_flow3d_sample_backward = OPS["affine_flow3d"]
