"""scripts/gpu-check.sh, issue 10's one-call GPU check, exercised on the CPU with a tiny selection:
it writes the machine's description, the test log and the benchmark's files where it is told, keeps
going after a failed step, and exits with that step's status."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# the smallest run that still writes every results file: one tiny eager row, timed once
_BENCH = ("--case-spec N=1,C=1,H=8,W=8,name=tiny --device cpu --modes fwd --providers eager --dtypes float32"
          " --warmup 1 --rep 1")


def _run(out, tests, bench=_BENCH):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WORKERS="0", GPU_CHECK_TESTS=tests,
               GPU_CHECK_BENCH=bench, STN_TRITON_COMMIT="0123456789abcdef")
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=300, cwd="/")


def test_gpu_check_writes_what_it_says(tmp_path):
    # one cheap test is enough to show the step runs pytest and logs its summary
    done = _run(tmp_path / "ok", "tests/test_cli_help.py::test_formatter_and_plain")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "ok"
    assert "commit 0123456789abcdef" in (out / "machine.txt").read_text()
    assert "== tests: exit 0" in (out / "pytest.log").read_text() and " passed" in (out / "pytest.log").read_text()
    files = sorted(p.suffix for p in (out / "bench").iterdir())
    assert files == [".csv", ".json", ".md", ".png", ".png"]
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # what the device tool brings back
    # the bench step only has to run (and succeed) after the failed one: its --help is enough
    failed = _run(tmp_path / "bad", "tests/no_such_test_file.py", bench="--help")
    assert failed.returncode != 0
    assert re.search(r"== tests: exit [1-9]", (tmp_path / "bad" / "pytest.log").read_text())
    assert "== bench: exit 0" in (tmp_path / "bad" / "bench.log").read_text()  # the next step still ran
