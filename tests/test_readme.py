"""The README's code runs as written."""

import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(after):
    """The first python block after the heading ``after``."""
    return re.search(r"```python\n(.*?)```", README[README.index(after):], re.S).group(1)


def test_write_your_own_transform(monkeypatch):
    from transforms_registry import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    registry.load_plugins()
    registry._REGISTRY.pop("similarity", None)  # the test plugin publishes the same name
    scope = {}
    exec(compile(_block("### Write your own transform"), "README.md", "exec"), scope)
    assert scope["out"].shape == (8, 3, 32, 32)
    assert registry._REGISTRY["similarity"] is scope["Similarity"]
    theta = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    x = torch.randn(1, 2, 5, 6)
    torch.testing.assert_close(scope["st"].spatial_transform(x, theta, "similarity"), x, rtol=1e-5, atol=1e-5)


def test_families_overview():
    x, theta = torch.randn(2, 1, 40, 40), None
    from transforms_registry import get_transform

    theta = get_transform("tps").identity().repeat(2, 1)
    scope = {"x": x, "theta": theta, "torch": torch}
    exec(compile(_block("## Transformation families"), "README.md", "exec"), scope)
    assert scope["y"].shape == (2, 1, 28, 28)
    assert {"affine", "attention", "piecewise_affine", "projective", "tps"} <= set(scope["list_transforms"]())
