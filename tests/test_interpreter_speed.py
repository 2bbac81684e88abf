"""The test-only interpreter fast paths (``_interpreter_speed``) keep the interpreter's answers:
broadcasting and integer arithmetic as before, an int32 overflow wrapping as before (the interpreter
computes its overflow check but never reports it: its options have ``debug`` off)."""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's fast paths")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


@triton.jit
def _arith(x_ptr, out_ptr, scale, N: tl.constexpr, M: tl.constexpr):
    rows = tl.arange(0, N)
    cols = tl.arange(0, M)
    x = tl.load(x_ptr + rows[:, None] * M + cols[None, :])  # int32 (N, M)
    y = x * scale + rows[:, None] - cols[None, :]  # broadcasts; int32 add, sub and mul
    tl.store(out_ptr + rows[:, None] * M + cols[None, :], y)


@pytest.mark.parametrize("scale", [7, -3, 2 ** 20])  # the last overflows int32 (1 << 12 times it)
def test_arithmetic_broadcasting_and_overflow_as_before(scale):
    x = torch.cat([torch.arange(12, dtype=torch.int32) - 5, torch.full((4,), 1 << 12, dtype=torch.int32)]).view(4, 4)
    out = torch.full_like(x, -1)
    _arith[(1,)](x, out, scale, N=4, M=4)
    r = torch.arange(4, dtype=torch.int64)
    want = x.long() * scale + r[:, None] - r[None, :]
    want = (want + 2 ** 31) % 2 ** 32 - 2 ** 31  # int32 wraps
    assert torch.equal(out, want.int())


def test_the_interpreter_still_has_debug_off():
    """The overflow check is skipped because its report needs ``debug``, which the interpreter's options
    never set: if a Triton release sets it, this fails and the skip must go."""
    assert interpreter.InterpreterOptions().debug is False
