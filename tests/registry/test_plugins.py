"""Entry points for real.

``tests/plugins/similarity`` is a separate distribution (``stn-triton-similarity``) that publishes the
family ``similarity`` in the group ``stn_triton.transforms``; ``scripts/env.sh`` pip-installs it into
the test environment, and ``scripts/test.sh`` sets ``STN_TRITON_REQUIRE_PLUGIN=1`` so that a missing
install fails instead of skipping. Broken plugins are distributions as pip lays them out on
``sys.path`` (a ``*.dist-info`` folder with ``METADATA`` and ``entry_points.txt``, and a module),
written to a temporary folder and put on the path of a fresh interpreter, so discovery, warnings
and the opt-out run exactly as they would for a user.
"""

import importlib.metadata as md
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import stn_triton as st
from transforms_registry import get_transform, list_transforms, registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plugin_dist():
    try:
        return md.distribution("stn-triton-similarity")
    except md.PackageNotFoundError:
        msg = "the test plugin tests/plugins/similarity is not installed (scripts/env.sh installs it)"
        if os.environ.get("STN_TRITON_REQUIRE_PLUGIN") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def _run(code, extra_path=None, **env):
    """Run ``code`` in a fresh interpreter; it prints one JSON line, which is returned."""
    environ = dict(os.environ, **env)
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path or ""), str(ROOT), environ.get("PYTHONPATH", ""))
                                            if p)
    environ.setdefault("TRITON_INTERPRET", "1")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plugin_found_lazily_and_listed(plugin_dist):
    eps = [ep for ep in plugin_dist.entry_points if ep.group == "stn_triton.transforms"]
    assert [ep.name for ep in eps] == ["similarity"]
    got = _run("""
        import json, sys
        import stn_triton, transforms_registry as tr
        before = "stn_similarity" in sys.modules
        names = tr.list_transforms("s*")
        print(json.dumps({"before": before, "after": "stn_similarity" in sys.modules, "names": names,
                          "all": tr.list_transforms()}))
    """)
    assert got["before"] is False and got["after"] is True  # loaded at the first lookup, not at import
    assert got["names"] == ["similarity"]
    assert got["all"] == ["affine", "affine3d", "attention", "attention3d", "lens", "logpolar", "piecewise_affine",
                          "projective", "similarity", "tps"]  # lens, logpolar: plugins/ (their own distributions)


def test_plugin_family_works_end_to_end(plugin_dist, device):
    from stn_similarity import Similarity

    family = get_transform("similarity")
    assert type(family) is Similarity and family.name == "similarity" and family.num_params == 4
    assert "stn-triton-similarity" in registry._SOURCES["similarity"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 8, generator=gen).to(device)
    theta = torch.tensor([[1.1, 0.3, 0.1, -0.2], [0.8, -math.pi / 5, 0.0, 0.05]], device=device, requires_grad=True)
    out = st.spatial_transform(x, theta, "similarity", (7, 6))
    s, a, tx, ty = theta.detach().double().cpu().unbind(1)
    m = torch.stack([s * a.cos(), -s * a.sin(), tx, s * a.sin(), s * a.cos(), ty], 1).view(2, 2, 3)
    want = torch.nn.functional.grid_sample(
        x.cpu().double(), torch.nn.functional.affine_grid(m, (2, 3, 7, 6), align_corners=False), align_corners=False)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0
    stn = st.SpatialTransformer(transform="similarity", size=(5, 5)).to(device)
    assert stn(x).shape == (2, 3, 5, 5)
    torch.testing.assert_close(stn.head.bias.detach().cpu(), torch.tensor([1.0, 0, 0, 0]))


BROKEN_MODULE = '''
import torch
from transforms_registry import KernelForm, TransformFamily

NOT_A_FAMILY = object()


class Shadow(TransformFamily):
    """Publishes itself as 'affine', which the built-ins already own."""
    num_params = 6

    def identity(self):
        return torch.zeros(6)

    def kernel_form(self, theta, size, align_corners=False):
        return KernelForm("affine", theta.reshape(-1, 2, 3))


class Fine(TransformFamily):
    num_params = 2

    def identity(self):
        return torch.zeros(2)

    def kernel_form(self, theta, size, align_corners=False):
        one, zero = torch.ones_like(theta[:, 0]), torch.zeros_like(theta[:, 0])
        return KernelForm("affine", torch.stack([one, zero, theta[:, 0], zero, one, theta[:, 1]], 1).view(-1, 2, 3))


class Incomplete(TransformFamily):
    """Neither grid() nor kernel_form(): TransformFamily's defaults would call each other forever."""
    num_params = 2

    def identity(self):
        return torch.zeros(2)
'''

BROKEN_ENTRY_POINTS = """\
[stn_triton.transforms]
missing = no_such_module_for_stn_tests:Thing
not_a_family = broken_stn_plugins:NOT_A_FAMILY
affine = broken_stn_plugins:Shadow
fine = broken_stn_plugins:Fine
incomplete = broken_stn_plugins:Incomplete
"""


@pytest.fixture
def broken_plugins(tmp_path):
    info = tmp_path / "broken_stn_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-stn-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(BROKEN_ENTRY_POINTS)
    (tmp_path / "broken_stn_plugins.py").write_text(BROKEN_MODULE)
    return tmp_path


LOOKUP_WITH_WARNINGS = """
    import json, warnings
    import transforms_registry as tr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = tr.list_transforms()
        again = tr.list_transforms()  # discovery runs once: no second round of warnings
        affine = type(tr.get_transform("affine")).__module__
        try:
            tr.get_transform("similarity")
            similarity = True
        except KeyError:
            similarity = False
    print(json.dumps({"names": names, "again": again, "affine": affine, "similarity": similarity,
                      "warnings": [str(w.message) for w in caught if "stn_triton" in str(w.message)]}))
"""


def test_broken_plugins_warn_once_each_and_are_skipped(plugin_dist, broken_plugins):
    got = _run(LOOKUP_WITH_WARNINGS, broken_plugins)
    assert got["names"] == got["again"]
    assert "fine" in got["names"] and "similarity" in got["names"] and got["similarity"]  # the rest keep working
    assert "missing" not in got["names"] and "not_a_family" not in got["names"] and "incomplete" not in got["names"]
    assert got["affine"] == "transforms_registry.families.affine"  # the conflicting plugin did not replace it
    warned = got["warnings"]
    assert len(warned) == 4, warned
    for ep, why in [("missing", "ModuleNotFoundError"), ("not_a_family", "not a TransformFamily subclass"),
                    ("affine", "'affine' is already registered"),
                    ("incomplete", "TypeError: register_transform: Incomplete defines neither grid(theta, size, "
                                   "align_corners) nor kernel_form(theta, size, align_corners)")]:
        (w,) = [w for w in warned if f"entry point {ep!r}" in w]
        assert "distribution 'broken-stn-plugins'" in w and why in w, w
    (clash,) = [w for w in warned if "entry point 'affine'" in w]
    assert "override=True" not in clash  # an entry point cannot pass it: say what can resolve the clash
    assert "rename the entry point" in clash and "STN_TRITON_NO_PLUGINS=1" in clash


def test_opt_out_variable(plugin_dist, broken_plugins):
    got = _run(LOOKUP_WITH_WARNINGS, broken_plugins, STN_TRITON_NO_PLUGINS="1")
    assert got["warnings"] == [] and got["similarity"] is False
    assert got["names"] == ["affine", "affine3d", "attention", "attention3d", "piecewise_affine", "projective", "tps"]
    # any of the usual spellings of "off" keeps discovery on
    got = _run(LOOKUP_WITH_WARNINGS, None, STN_TRITON_NO_PLUGINS="0")
    assert got["similarity"] is True


def test_unknown_name_lists_plugins_too(plugin_dist):
    with pytest.raises(KeyError, match=r"unknown transform 'simlarity' \(did you mean 'similarity'\?\); known: "
                                       r"affine, .*projective, similarity"):
        get_transform("simlarity")
    with pytest.raises(st.ArgumentError, match=r"transform: expected the name of a registered family or a "
                                               r"TransformFamily instance, got 'simlarity' \(did you mean "
                                               r"'similarity'\?\); registered: affine, .*projective, similarity"):
        st.spatial_transform(torch.randn(1, 1, 4, 4), torch.zeros(1, 4), "simlarity")
    assert list_transforms("[st]*") == ["similarity", "tps"]
