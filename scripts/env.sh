# Sourced by the README's commands: make (once) and activate the project's virtual environment.
# The environment lives outside the checkout, keyed by pyproject.toml, so fresh clones on the same
# machine (CI) reuse it; a new machine or a changed pyproject.toml builds a new one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
PLUGIN="$ROOT/tests/plugins/similarity"  # a tiny plugin distribution the tests need installed
KEY="$(cat "$ROOT/pyproject.toml" "$PLUGIN/pyproject.toml" | sha256sum | cut -c1-16)"
VENV="${STN_TRITON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/stn-triton/venv-$KEY}"
if [ ! -f "$VENV/.complete" ]; then
    echo "[env] creating $VENV (first run on this machine: installs torch, several minutes)" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip "setuptools>=77"
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
    "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$PLUGIN"
    touch "$VENV/.complete"
else
    # point the editable installs at this checkout (fast: dependencies are already there)
    "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT" -e "$PLUGIN" 2>/dev/null \
        || "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT" -e "$PLUGIN"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
