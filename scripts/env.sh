# Sourced by the README's commands: make (once) and activate the project's virtual environment.
# The environment lives outside the checkout, keyed by pyproject.toml, so fresh clones on the same
# machine (CI) reuse it; a new machine or a changed pyproject.toml builds a new one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
PLUGIN="$ROOT/tests/plugins/similarity"  # a tiny plugin distribution the tests need installed
# families published as distributions of their own, fused through their Triton maps (log-polar, lens)
FUSED=("$ROOT/plugins/logpolar" "$ROOT/plugins/lens")
KEY="$(cat "$ROOT/pyproject.toml" "$PLUGIN/pyproject.toml" "${FUSED[@]/%//pyproject.toml}" | sha256sum | cut -c1-16)"
VENV="${STN_TRITON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/stn-triton/venv-$KEY}"
LOG="$VENV.log"
quietly() {  # run a setup step; show its output only if it fails
    if ! "$@" >>"$LOG" 2>&1; then
        echo "[env] failed: $* (log: $LOG)" >&2
        tail -n 40 "$LOG" >&2
        return 1
    fi
}
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # one setup at a time: two commands started together must not build the same environment
if [ ! -f "$VENV/.complete" ]; then
    echo "[env] creating $VENV (first run on this machine: installs torch, several minutes)" >&2
    rm -rf "$VENV"
    : >"$LOG"
    quietly "$PY" -m venv "$VENV"
    quietly "$VENV/bin/python" -m pip install --upgrade pip "setuptools>=77"
    quietly "$VENV/bin/python" -m pip install -e "$ROOT[test]"
    quietly "$VENV/bin/python" -m pip install --no-deps --no-build-isolation -e "$PLUGIN"
    for d in "${FUSED[@]}"; do quietly "$VENV/bin/python" -m pip install --no-deps --no-build-isolation -e "$d"; done
    echo "$ROOT" >"$VENV/.checkout"
    touch "$VENV/.complete"
elif [ "$(cat "$VENV/.checkout" 2>/dev/null)" != "$ROOT" ]; then
    # another checkout of the same pyproject.toml: point the editable installs here (fast, quiet)
    : >"$LOG"
    quietly "$VENV/bin/python" -m pip install --no-deps --no-build-isolation -e "$ROOT" -e "$PLUGIN" \
        "${FUSED[@]/#/-e}"
    echo "$ROOT" >"$VENV/.checkout"
fi
flock -u 9
exec 9>&-
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
