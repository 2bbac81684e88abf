"""Shared test setup.

- Without a CUDA GPU, the Triton kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` is set
  here, before anything imports triton (the README's test command sets it too).
- Every buffer a kernel is supposed to fill is poisoned first (NaN for floats, a huge value for
  integers), so an element a kernel forgets to write fails the comparison.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from stn_triton.kernels import sampler  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _poison(t):
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(2**62 if t.dtype == torch.int64 else -1)


@pytest.fixture(autouse=True)
def poison_new_buffers(monkeypatch):
    monkeypatch.setattr(sampler, "fill_new", _poison)


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
