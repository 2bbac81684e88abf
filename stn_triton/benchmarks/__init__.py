"""``stn_triton.benchmarks``: in the source tree its code lives in the repository's top-level ``benchmarks/``
folder, which this package points at; an installed wheel holds the code here instead (pyproject.toml
maps the package to that folder). Either way it is imported as ``stn_triton.benchmarks``, a name that a
folder of the user's cannot shadow."""

from pathlib import Path as _Path

_SOURCE = _Path(__file__).resolve().parents[2] / "benchmarks"
__path__ = [str(_SOURCE)]  # noqa: F811  (submodules are found there)
exec(compile((_SOURCE / "__init__.py").read_text(), str(_SOURCE / "__init__.py"), "exec"))
