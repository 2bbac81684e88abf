"""The README's API reference is the code's: every public name of ``stn_triton``,
``transforms_registry`` and ``stn_triton.integrations.timm`` (and the methods a user calls or writes)
has a row, every row names something that exists, and each row's arguments and defaults are the
signature's."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MODULES = {"st": "stn_triton", "transforms_registry": "transforms_registry",
           "stn_triton.integrations.timm": "stn_triton.integrations.timm"}
METHODS = ["st.SpatialTransformer.forward", "st.SpatialTransformer.parameter_groups",
           "transforms_registry.TransformFamily.identity", "transforms_registry.TransformFamily.grid",
           "transforms_registry.TransformFamily.kernel_form", "transforms_registry.TransformFamily.check_theta"]
NO_SIGNATURE = {"st.ArgumentError", "st.ArgumentTypeError", "st.ExportError", "st.FamilyKernelError",
                "transforms_registry.TransformFamily", "transforms_registry.ENTRY_POINT_GROUP"}  # exceptions, a base
# class, a constant


def _table():
    text = README.read_text()
    body = text.split("## API reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        m = re.match(r"\| `([\w.]+)` \| (`\((.*)\)`)? *\|", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} has two rows"
            rows[m.group(1)] = None if m.group(2) is None else f"({m.group(3)})"
    return rows


def _resolve(name):
    for prefix in sorted(MODULES, key=len, reverse=True):
        if name.startswith(prefix + "."):
            obj = importlib.import_module(MODULES[prefix])
            for part in name[len(prefix) + 1:].split("."):
                obj = getattr(obj, part)
            return obj
    raise AssertionError(f"{name}: not under {', '.join(MODULES)}")


def _arguments(obj):
    """The signature as the table writes it: names, defaults (repr), *args and **kwargs, no annotations."""
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        elif p.default is p.empty:
            out.append(p.name)
        else:
            out.append(f"{p.name}={p.default!r}")
    return f"({', '.join(out)})"


def test_every_public_name_has_a_row():
    rows = _table()
    public = [f"{prefix}.{n}" for prefix, mod in MODULES.items() for n in importlib.import_module(mod).__all__]
    assert [n for n in public + METHODS if n not in rows] == []
    assert [n for n in rows if n not in public + METHODS] == []  # nothing the code does not have


@pytest.mark.parametrize("name", sorted(_table()))
def test_row_arguments_are_the_signature(name):
    obj = _resolve(name)  # exists
    written = _table()[name]
    if name in NO_SIGNATURE:
        assert written is None, f"{name}: no arguments column expected"
        return
    assert written == _arguments(obj), name


def test_the_table_would_catch_a_drift(monkeypatch):
    """A default changed in the code no longer matches its row."""
    import stn_triton

    def affine_sample(x, theta, size=None, mode="bilinear", padding_mode="zeros", align_corners=True):
        pass

    monkeypatch.setattr(stn_triton, "affine_sample", affine_sample)
    assert _table()["st.affine_sample"] != _arguments(_resolve("st.affine_sample"))


def test_what_the_readme_says_beside_the_table(monkeypatch):
    """The lazy regression layer (counting parameters before the first forward raises, after it works),
    and the CPU path being plain PyTorch: torch.export shows ATen's grid_sampler there and the custom op
    under the kernels (the interpreter)."""
    import torch

    import stn_triton as st

    stn = st.SpatialTransformer(size=(8, 8))
    with pytest.raises(ValueError):
        sum(p.numel() for p in stn.parameters())
    stn(torch.randn(1, 1, 12, 12))
    assert sum(p.numel() for p in stn.parameters()) > 0

    class Warp(torch.nn.Module):
        def forward(self, x, theta):
            return st.affine_sample(x, theta, (4, 4))

    args = (torch.randn(1, 2, 8, 8), torch.eye(2, 3)[None])
    for interpret, op in (("0", "aten.grid_sampler.default"), ("1", "stn_triton.affine_sample.default")):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        graph = torch.export.export(Warp(), args).graph
        assert op in {str(n.target) for n in graph.nodes if n.op == "call_function"}, interpret
