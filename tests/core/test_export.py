"""Deployment: ``torch.export`` keeps the ops, :func:`stn_triton.decompositions` turns them into standard
ATen, and ``torch.onnx.export(..., dynamo=True)`` gives models that pass ``onnx.checker`` and whose
onnxruntime outputs equal PyTorch's (float32 tolerance): every form (2-D and 3-D, flow forms too), K > 1,
every mode and padding and both align_corners across the cases, on the kernel path (Triton's
interpreter) and the reference path; the timm and digits models on the kernel path (the README's
Deploy block exports the digits model on both). Tricubic is refused by name.
"""

import pytest
import torch
import torch.nn as nn

import stn_triton as st
from stn_triton.kernels.forms import FORMS as TABLE
from _cases import make_params, run

onnx = pytest.importorskip("onnx")  # test extras: onnx, onnxscript, onnxruntime
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class Sampler(nn.Module):
    """One op of a form through its public function, its parameters an input of the model."""

    def __init__(self, form, size, mode, padding_mode, align_corners, basis=None):
        super().__init__()
        self.form, self.size = form, size
        self.opts = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
        self.basis = basis

    def forward(self, x, p):
        params = (p,) if self.basis is None else (p, self.basis)  # a basis B, or affine_flow's field
        return run(self.form, x, params, self.size, **self.opts)


def onnx_outputs(model, args, optimize=True):
    """Export with ``torch.onnx.export(dynamo=True)``, check the model, run it in onnxruntime.
    ``optimize=False`` skips onnxscript's graph optimiser (40% of a large model's export time; the
    README's block and the digits model take the default)."""
    program = torch.onnx.export(model.eval(), args, dynamo=True, verbose=False, optimize=optimize)
    onnx.checker.check_model(program.model_proto)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    nodes = {n.op_type for n in program.model_proto.graph.node}
    (opset,) = [o.version for o in program.model_proto.opset_import if o.domain == ""]
    assert opset == 20  # torch.onnx's default here, which the README names
    return [torch.from_numpy(o) for o in session.run(None, feeds)], nodes


# (form, input shape, output size, mode, padding, align_corners): every mode, padding and alignment
# appears in both dimensions' cases (3-D without bicubic, which has no standard form)
CASES = [
    ("affine", (2, 3, 9, 11), (7, 8), "bilinear", "zeros", False),
    ("affine", (2, 3, 9, 11), (7, 8), "nearest", "border", True),
    ("affine", (2, 3, 9, 11), (7, 8), "bicubic", "reflection", False),
    ("projective", (2, 2, 9, 11), (6, 7), "bilinear", "reflection", True),
    ("basis", (2, 2, 9, 11), (6, 7), "bicubic", "border", False),
    ("grid", (2, 2, 9, 11), (6, 7), "nearest", "zeros", True),
    ("flow", (2, 2, 9, 11), (6, 7), "bilinear", "border", False),
    ("affine_flow", (2, 2, 9, 11), (6, 7), "bicubic", "zeros", True),
    ("affine3d", (2, 2, 5, 6, 7), (4, 5, 6), "bilinear", "border", True),
    ("affine3d", (2, 2, 5, 6, 7), (4, 5, 6), "nearest", "reflection", False),
    ("basis3d", (1, 2, 5, 6, 7), (4, 5, 3), "bilinear", "zeros", False),
    ("grid3d", (1, 2, 5, 6, 7), (4, 5, 3), "bilinear", "reflection", True),
    ("flow3d", (1, 2, 5, 6, 7), (4, 5, 3), "nearest", "zeros", True),
    ("affine_flow3d", (1, 2, 5, 6, 7), (4, 5, 3), "bilinear", "border", False),
]
IDS = [f"{c[0]}-{c[3]}-{c[4]}-{'ac' if c[5] else 'noac'}" for c in CASES]


def _case(form, shape, size, mode, padding, align):
    gen = torch.Generator().manual_seed(len(form) * 31 + len(mode) + len(padding))
    x = torch.randn(shape, generator=gen)
    params = make_params(form, shape[0], 2, size, align, torch.float32, "cpu", gen, spread=0.5)
    # the first parameter is the model's input; a second (a basis, affine_flow's field) a constant of the model
    model = Sampler(form, size, mode, padding, align, basis=params[1] if len(params) > 1 else None)
    return model, (x, params[0])


class Several(nn.Module):
    """Several cases in one model (one export each: the exporter's fixed cost paid once), inputs
    (x_0, p_0, x_1, p_1, ...), one output per case."""

    def __init__(self, models):
        super().__init__()
        self.parts = nn.ModuleList(models)

    def forward(self, *args):
        return tuple(m(args[2 * i], args[2 * i + 1]) for i, m in enumerate(self.parts))


def _several(cases):
    made = [_case(*c) for c in cases]
    return Several([m for m, _ in made]), tuple(a for _, args in made for a in args)


@pytest.mark.parametrize("ndim", [2, 3])
def test_onnx_equals_pytorch(ndim):
    """The kernel path (Triton's interpreter under the test command): each op is decomposed by the
    exporter itself, its sampling an ONNX GridSample; every case of the dimension in one model."""
    cases = [(c, i) for c, i in zip(CASES, IDS) if len(c[2]) == ndim]
    model, args = _several([c for c, _ in cases])
    assert st.backend(args[0]) != "reference"
    with torch.no_grad():
        want = model(*args)
    got, nodes = onnx_outputs(model, args, optimize=False)
    assert "GridSample" in nodes and len(got) == len(cases)
    for g, w, (_, name) in zip(got, want, cases):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_onnx_reference_path(monkeypatch):
    """The reference path (what a CPU without the interpreter runs): plain PyTorch, exported as is;
    every padding, both alignments, 2-D and 3-D."""
    monkeypatch.setenv("STN_TRITON_FORCE_REFERENCE", "1")
    picked = (0, 3, 4, 12)
    model, args = _several([CASES[i] for i in picked])
    assert st.backend(args[0]) == "reference"
    with torch.no_grad():
        want = model(*args)
    got, _ = onnx_outputs(model, args, optimize=False)
    for g, w, i in zip(got, want, picked):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{IDS[i]}: {m}")


def test_torch_export_keeps_the_op_and_decomposes_on_request():
    model, args = _case(*CASES[0])
    ep = torch.export.export(model, args)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "stn_triton.affine_sample.default" in targets  # kept whole: compile / AOT users keep the kernels
    kept = ep.run_decompositions()  # torch.export's default table leaves it alone
    assert "stn_triton.affine_sample.default" in [str(n.target) for n in kept.graph.nodes]
    plain = ep.run_decompositions(st.decompositions())
    targets = [str(n.target) for n in plain.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if t.startswith("stn_triton")] and "aten.grid_sampler_2d.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(plain.module()(*args), model(*args), rtol=1e-5, atol=1e-5)
    from torch._inductor.decomposition import select_decomp_table

    assert not [op for op in select_decomp_table() if str(op).startswith("stn_triton")]  # torch.compile keeps it


def test_tricubic_is_refused_by_name():
    model = Sampler("affine3d", (3, 4, 5), "bicubic", "zeros", False).eval()
    x, theta = torch.randn(1, 1, 4, 5, 6), torch.eye(3, 4).expand(1, 2, 3, 4).clone()
    with pytest.raises(Exception) as info:
        torch.onnx.export(model, (x, theta), dynamo=True, verbose=False)
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("stn_triton.affine3d_sample: mode='bicubic' on 5-D input (tricubic) has no standard form" in m
               for m in chain)
    ep = torch.export.export(model, (x, theta))  # the op itself still exports
    with pytest.raises(st.ExportError, match="tricubic"):
        ep.run_decompositions(st.decompositions())


def test_half_precision_decomposes_in_float32():
    """A float16 model's grid is not rounded to half when decomposed (448 px would be off by 0.1 px)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 9, 11, generator=gen).half()
    (theta,) = make_params("affine", 1, 2, (7, 8), False, torch.float32, "cpu", gen)
    ep = torch.export.export(Sampler("affine", (7, 8), "bilinear", "zeros", False), (x, theta))
    plain = ep.run_decompositions(st.decompositions()).module()
    want = torch.nn.functional.grid_sample(
        x.float()[:, None].expand(1, 2, 2, 9, 11).reshape(2, 2, 9, 11),
        torch.nn.functional.affine_grid(theta.reshape(2, 2, 3), (2, 2, 7, 8), align_corners=False),
        align_corners=False).reshape(1, 2, 2, 7, 8).half()
    torch.testing.assert_close(plain(x, theta), want)


def test_digits_tps_model_to_onnx():
    from stn_triton.integrations.digits import models

    torch.manual_seed(0)
    for name in ("ST-CNN-tps",):  # (ST-CNN-aff: the README's Deploy block, both paths)
        model = models._materialise(models.build(name, 42), 42).eval()
        x = torch.randn(2, 1, 42, 42)
        with torch.no_grad():
            want = model(x)
        (got,), nodes = onnx_outputs(model, (x,))
        assert "GridSample" in nodes
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_timm_model_to_onnx():
    """On the kernel path (where the op is in the graph; on the reference path the model is plain
    PyTorch, which test_onnx_reference_path and the README's block export)."""
    timm = pytest.importorskip("timm")
    import stn_triton.integrations.timm  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    model = timm.create_model("stn_mobilenetv3_small_2x", num_classes=5, img_size=64, branch_size=32, loc_size=32)
    with torch.no_grad():
        model.loc_head.weight.normal_(std=0.1)  # transformers away from the identity
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    assert st.backend(x) != "reference"
    with torch.no_grad():
        want = model(x)
    (got,), nodes = onnx_outputs(model, (x,), optimize=False)
    assert "GridSample" in nodes
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
