"""The console scripts' --help: every option explained, each default stated once, no reStructuredText."""

import argparse
import re

import pytest

from stn_triton._cli import HelpFormatter, plain


def _parsers():
    from stn_triton.benchmarks import cli as bench
    from stn_triton.integrations.digits import cli as digits
    from stn_triton.integrations.timm import train

    return {"stn-digits": digits.parser(), "stn-bench": bench.parser(), "stn-train-cub": train.parser()}


@pytest.mark.parametrize("name", ["stn-digits", "stn-bench", "stn-train-cub"])
def test_help_text(name):
    p = _parsers()[name]
    text = p.format_help()
    assert "``" not in text and ":mod:" not in text and ":func:" not in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in p._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        shown = p._get_formatter()._expand_help(action) if action.help else ""
        assert len(re.findall(r"\bdefault\b", shown)) <= 1, f"{name} {action.option_strings[0]}: {shown!r}"


def test_formatter_and_plain():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--a", default=3, help="a number")
    p.add_argument("--b", default=None, help="maybe")
    p.add_argument("--c", action="store_true", help="a flag")
    p.add_argument("--d", default=[1, 2], nargs="+", type=int, help="several")
    p.add_argument("--e", default=5, help="with its own (default 5)")
    text = " ".join(p.format_help().split())
    assert "a number (default: 3)" in text and "several (default: 1 2)" in text
    assert "maybe (default" not in text and "a flag (default" not in text
    assert text.count("default") == 3
    assert plain("see ``--paper`` and :mod:`stn_triton.ops`") == "see --paper and stn_triton.ops"
