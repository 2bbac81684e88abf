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
    # a test file of one passing and one failing test: the step runs pytest and logs its summary, and
    # fails; the bench step still runs after it and writes every file; the exit status is the failure's
    tests = tmp_path / "selection" / "test_two.py"
    tests.parent.mkdir()
    tests.write_text("def test_passes():\n    pass\n\n\ndef test_fails():\n    assert False\n")
    out = tmp_path / "out"
    done = _run(out, str(tests))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "commit 0123456789abcdef" in (out / "machine.txt").read_text()
    log = (out / "pytest.log").read_text()
    assert "1 failed, 1 passed" in log and "== tests: exit 1 after" in log
    assert "== bench: exit 0" in (out / "bench.log").read_text()  # the next step still ran
    files = sorted(p.suffix for p in (out / "bench").iterdir())
    assert files == [".csv", ".json", ".md", ".png", ".png"]
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # what the device tool brings back
