"""Shared test setup.

- Without a CUDA GPU, the Triton kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` is set
  here, before anything imports triton (the README's test command sets it too).
- Every buffer a kernel is supposed to fill is poisoned first (NaN for floats, a huge value for
  integers), so an element a kernel forgets to write fails the comparison.
- Triton's interpreter gets bfloat16 ``atomic_add`` (``_interpreter_atomics``), so the kernels' own
  bfloat16 gradient accumulation runs under it as it does compiled, and skips re-patching
  ``triton.language`` at every helper call inside a launch and runs each launch on a frame-stack chunk
  of its own (``_interpreter_speed``), which changes
  nothing but the time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from stn_triton.kernels import launch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    import _interpreter_atomics  # noqa: E402
    import _interpreter_speed  # noqa: E402

    _interpreter_atomics.install()  # the interpreter has no bf16 atomics; see that module
    _interpreter_speed.install()  # no re-patching of triton.language at each helper call; see that module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _poison(t):
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(2**62 if t.dtype == torch.int64 else -1)


@pytest.fixture(autouse=True)
def poison_new_buffers(monkeypatch):
    monkeypatch.setattr(launch, "fill_new", _poison)


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
