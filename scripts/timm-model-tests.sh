#!/usr/bin/env bash
# timm's own model tests on the models we register: downloads timm's source distribution at the
# installed timm version (PyPI), takes its tests/test_models.py, and runs it with -k stn_ in a
# temporary folder whose conftest.py registers our models. Also runs timm's feature-API tests that
# select their models by timm's module names (forward_intermediates, FeatureGetterNet, pruning)
# on ours. Exits non-zero if any test fails (or none is selected).
#
# For people and the GPU machine, not CI: it takes minutes (tests/integrations/test_timm_contract.py
# checks the same contract in seconds). The models run on the reference path (CPU tensors,
# TRITON_INTERPRET=0); TORCH_DEVICE=cuda runs timm's forward tests on the GPU (the kernels).
#
#   scripts/timm-model-tests.sh                 # all of it, 2 workers
#   scripts/timm-model-tests.sh -k torchscript  # pytest options are passed on (-k is added to stn_)
#   STN_TRITON_TEST_WORKERS=8 scripts/timm-model-tests.sh
#   STN_TRITON_KEEP_TIMM_TESTS=1 ...            # keep the temporary folder (its path is printed)
source "$(dirname "$0")/env.sh"

VERSION="$(python -c 'import timm; print(timm.__version__)')"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/stn-timm-model-tests.XXXXXX")"
if [ -z "${STN_TRITON_KEEP_TIMM_TESTS:-}" ]; then
    trap 'rm -rf "$WORK"' EXIT
fi
echo "[timm-model-tests] timm $VERSION, in $WORK" >&2

python -m pip download --quiet --no-deps --no-binary :all: --dest "$WORK/sdist" "timm==$VERSION"
SDIST="$(ls "$WORK"/sdist/timm-*.tar.gz)"
mkdir -p "$WORK/src" "$WORK/run"
tar -xzf "$SDIST" -C "$WORK/src"
SRC="$(ls -d "$WORK"/src/timm-*/)"
cp "$SRC/tests/test_models.py" "$WORK/run/"

cat >"$WORK/run/conftest.py" <<'EOF'
import stn_triton.integrations.timm  # noqa: F401  registers the stn_* models with timm before collection
EOF

# timm's test selection by module (FEAT_INTER_FILTERS names timm's own model modules): the same tests on ours
cat >"$WORK/run/test_stn_module_filtered.py" <<'EOF'
"""timm's tests that pick their models by timm's module names, run on every registered stn_* model."""
import pytest
import timm

import test_models as timm_tests

NAMES = timm.list_models("stn_*")


@pytest.mark.features
@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_intermediates_features(model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, 1)


@pytest.mark.features
@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_intermediates(model_name):
    timm_tests.test_model_forward_intermediates(model_name, 1)


@pytest.mark.features
@pytest.mark.parametrize("model_name", NAMES)
def test_prune_intermediate_layers_contract(model_name):
    timm_tests.test_prune_intermediate_layers_contract(model_name)
EOF

# timm's markers (from its pyproject.toml), so that its marks are known
python - "$SRC/pyproject.toml" "$WORK/run/pytest.ini" <<'EOF'
import sys
markers = ["base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features", "fxforward", "fxbackward"]
try:
    import tomllib
    with open(sys.argv[1], "rb") as f:
        markers = [m.split(":")[0].strip() for m in tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]]
except (ImportError, KeyError, OSError):
    pass
lines = ["[pytest]", "markers =", *(f"    {m}" for m in [*markers, "timeout"]), "filterwarnings = ignore"]
with open(sys.argv[2], "w") as f:
    f.write("\n".join(lines) + "\n")
EOF

# -k: stn_ and the caller's expression
ARGS=()
FILTER="stn_"
while [ $# -gt 0 ]; do
    case "$1" in
        -k) FILTER="stn_ and ($2)"; shift 2 ;;
        -k*) FILTER="stn_ and (${1#-k})"; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

cd "$WORK/run"
export TRITON_INTERPRET=0
python -m pytest -q -p no:cacheprovider -n "${STN_TRITON_TEST_WORKERS:-2}" -rfEs -k "$FILTER" \
    test_models.py test_stn_module_filtered.py ${ARGS[@]+"${ARGS[@]}"}
