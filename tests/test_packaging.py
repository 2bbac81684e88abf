"""Installed import names: ``stn_triton.integrations`` and ``stn_triton.benchmarks``, never a bare
``integrations`` or ``benchmarks`` that a folder in the user's working directory could shadow."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _source_packages():
    """Every package of the source tree under its installed name."""
    names = set()
    for top, installed in (("stn_triton", "stn_triton"), ("transforms_registry", "transforms_registry"),
                           ("integrations", "stn_triton.integrations"), ("benchmarks", "stn_triton.benchmarks")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            names.add(".".join([installed, *rel.parts]))
    return names


def test_every_package_is_listed_under_its_installed_name():
    tool = PYPROJECT["tool"]["setuptools"]
    assert set(tool["packages"]) == _source_packages()
    assert tool["package-dir"] == {"stn_triton.integrations": "integrations", "stn_triton.benchmarks": "benchmarks"}
    assert not any(p.split(".")[0] in ("integrations", "benchmarks") for p in tool["packages"])
    for script, target in PYPROJECT["project"]["scripts"].items():
        assert target.startswith("stn_triton."), script


def test_folders_named_alike_in_the_working_directory_do_not_shadow(tmp_path):
    """``python -m stn_triton.benchmarks`` and the timm models import from a folder holding
    ``benchmarks/`` and ``integrations/`` packages of the user's own."""
    for name in ("benchmarks", "integrations"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise SystemExit('the user\\'s own folder was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # one interpreter for both (torch and timm load once): the timm models and digits imported, then
    # ``python -m stn_triton.benchmarks --list`` as ``-m`` runs it (runpy with alter_sys); the user's
    # folders, if imported, exit with their message, which the assertion on the exit code catches
    code = ("import runpy, sys, timm, stn_triton.integrations.timm as t, stn_triton.integrations.digits as d; "
            "assert 'stn_mobilenetv3_small_2x' in timm.list_models('stn_*'); print(t.__name__, d.__name__); "
            "sys.argv = ['stn-bench', '--list']; runpy.run_module('stn_triton.benchmarks', run_name='__main__', "
            "alter_sys=True)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    first, listed = run.stdout.split("\n", 1)
    assert first.split() == ["stn_triton.integrations.timm", "stn_triton.integrations.digits"]
    assert "cub-k4" in listed


def test_source_tree_and_installed_names_agree():
    import stn_triton.benchmarks
    import stn_triton.integrations

    assert Path(stn_triton.benchmarks.__path__[0]).name == "benchmarks"
    assert Path(stn_triton.integrations.__path__[0]).name == "integrations"
    assert "stn-bench" in stn_triton.benchmarks.__doc__
