"""Every Python block of the README runs as printed, on a user's default CPU path (the reference,
not the interpreter), from an empty folder; some blocks' results are checked too."""

import os
import re
import runpy
from pathlib import Path

import pytest
import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks():
    """(heading, code) of each ```python block, the heading being the nearest one above it."""
    out = []
    for m in re.finditer(r"```python\n(.*?)```", README, re.S):
        heading = re.findall(r"^#+ (.+)$", README[:m.start()], re.M)[-1]
        out.append((heading, m.group(1)))
    return out


BLOCKS = _python_blocks()


def _functions(scope):
    import torch.nn.functional as F

    assert scope["y"].shape == (2, 4, 3, 32, 32)
    x, theta, grid = scope["x"], scope["theta"], scope["grid"]
    st = scope["st"]
    torch.testing.assert_close(st.grid_sample(x, grid), F.grid_sample(x, grid, align_corners=False))
    torch.testing.assert_close(st.affine_sample(x, theta, (32, 32)), st.grid_sample(x, grid), rtol=1e-5, atol=1e-5)


def _families(scope):
    assert scope["y"].shape == (2, 1, 28, 28) and scope["parts"].shape == (2, 4, 1, 24, 24)
    assert {"affine", "attention", "piecewise_affine", "projective", "tps"} <= set(scope["list_transforms"]())


def _own_transform(scope):
    from transforms_registry import registry

    assert scope["out"].shape == (8, 3, 32, 32)
    assert registry._REGISTRY["similarity"] is scope["Similarity"]
    x = torch.randn(1, 2, 5, 6)
    identity = scope["st"].spatial_transform(x, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), "similarity")
    torch.testing.assert_close(identity, x, rtol=1e-5, atol=1e-5)


def _fused_family(scope):
    """The swirl family: on the CPU path as printed; then the same file again, decorated in Triton's
    interpreter, through the fused kernels, against its own grid (values and dL/dtheta)."""
    import runpy

    import torch.nn.functional as F
    from transforms_registry import registry

    import stn_triton as st

    Swirl = scope["Swirl"]
    theta = torch.tensor([[0.5], [-1.0]], dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    want = F.grid_sample(x, Swirl().grid(theta, (9, 11)), align_corners=False)
    torch.testing.assert_close(st.spatial_transform(x, theta, "swirl"), want)
    registry._REGISTRY.pop("swirl")
    os.environ["TRITON_INTERPRET"] = "1"
    fused = runpy.run_path(scope["__file__"])["Swirl"]()
    t32 = theta.detach().float().requires_grad_()
    out = st.spatial_transform(x.float(), t32, fused)
    assert st.backend(x.float()) == "interpreter"
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    g = torch.randn(out.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad(out, t32, g.float())
    (ref,) = torch.autograd.grad(want, theta, g)
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3)


def _timm(scope):
    assert scope["logits"].shape == (1, 200) and scope["theta"].shape == (1, 4, 3)
    assert torch.isfinite(scope["logits"]).all()


def _saved_digits_model(tmp_path):
    """What ``./scripts/main.sh --save-models`` writes (an untrained model of the same build)."""
    from stn_triton.integrations.digits.models import _materialise, build, save_model

    model = _materialise(build("ST-CNN-aff", 28, 28), 28)
    save_model(tmp_path / "runs/digits/models/R-ST-CNN-aff-seed0.pt", model, "ST-CNN-aff", 28, 28, distortion="R",
               seed=0, error=2.9)


def _reuse(scope):
    assert scope["upright"].shape == (8, 1, 28, 28) and scope["logits"].shape == (8, 10)
    assert scope["model"].checkpoint_info["distortion"] == "R"


def _volumetric(scope):
    import torch.nn.functional as F

    x, theta, grid = scope["x"], scope["theta"], scope["grid"]
    assert scope["y"].shape == scope["z"].shape == scope["out"].shape == (2, 3, 6, 8, 10)
    expected = F.grid_sample(x, grid, align_corners=False)
    torch.testing.assert_close(scope["z"], expected)
    torch.testing.assert_close(scope["y"], expected, rtol=1e-5, atol=1e-5)
    identity = F.grid_sample(x, F.affine_grid(torch.eye(3, 4).expand(2, 3, 4), (2, 3, 6, 8, 10), align_corners=False),
                             align_corners=False)
    torch.testing.assert_close(scope["out"], identity, rtol=1e-5, atol=1e-5)


def _displacement(scope):
    import torch.nn.functional as F

    moving, flow = scope["moving"], scope["flow"].detach()
    assert scope["moved"].shape == moving.shape and scope["flow"].grad.shape == flow.shape
    # the voxel grid plus the flow, rescaled to [-1, 1] (align_corners=True), in (x, y, z) order
    size = moving.shape[2:]
    loc = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=flow.dtype) for s in size], indexing="ij"))[None] + flow
    loc = torch.stack([2 * loc[:, i] / (s - 1) - 1 for i, s in enumerate(size)], -1).flip(-1)
    expected = F.grid_sample(moving, loc, align_corners=True)
    torch.testing.assert_close(scope["moved"].detach(), expected, rtol=1e-4, atol=1e-4)  # float32, another order


def _deploy(scope):
    """As printed (the CPU path: plain PyTorch); then the same model on the kernel path (Triton's
    interpreter), where torch.export keeps the op and the decompositions remove it."""
    import onnxruntime as ort

    import stn_triton as st

    model, x, logits = scope["model"], scope["x"], scope["logits"]
    torch.testing.assert_close(torch.from_numpy(scope["ort_logits"]), logits, rtol=1e-4, atol=1e-5)
    os.environ["TRITON_INTERPRET"] = "1"  # restored by the test's monkeypatch
    assert st.backend(x) == "interpreter"
    ep = torch.export.export(model, (x,))
    assert "stn_triton.affine_sample.default" in [str(n.target) for n in ep.graph.nodes]
    plain = ep.run_decompositions(st.decompositions())
    assert not [n for n in plain.graph.nodes if str(n.target).startswith("stn_triton")]
    with torch.no_grad():
        torch.testing.assert_close(plain.module()(x), logits, rtol=1e-4, atol=1e-5)
    session = ort.InferenceSession(torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
                                   .SerializeToString())
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), logits, rtol=1e-4, atol=1e-5)


CHECKS = {"Reuse what was learnt": _reuse, "The functions": _functions, "Volumetric (5-D) transformers": _volumetric,
          "Displacement fields (image registration)": _displacement, "Deploy: torch.export and ONNX": _deploy,
          "Transformation families": _families,
          "Write your own transform": _own_transform, "Bring your own map into the kernels": _fused_family,
          "timm: the CUB-200-2011 part-attention model": _timm}
SETUP = {"Reuse what was learnt": _saved_digits_model}


def test_every_python_block_is_checked():
    assert [h for h, _ in BLOCKS] == list(CHECKS)


@pytest.mark.parametrize("heading,code", BLOCKS, ids=[h.split(":")[0].lower().replace(" ", "-") for h, _ in BLOCKS])
def test_python_block_runs_as_printed(heading, code, monkeypatch, tmp_path):
    from transforms_registry import registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # what a user's CPU runs: the reference path
    registry.load_plugins()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # blocks register families: undo after
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    registry._REGISTRY.pop("similarity", None)  # the test environment's plugin publishes the README's name
    if heading in SETUP:
        SETUP[heading](tmp_path)
    torch.manual_seed(0)
    block = tmp_path / "readme_block.py"  # a file, as a user's would be (Triton reads @jit functions' source)
    block.write_text(code)
    scope = runpy.run_path(str(block), run_name="__main__")
    CHECKS[heading](scope)
