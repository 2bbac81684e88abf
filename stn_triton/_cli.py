"""What the command-line tools (``stn-digits``, ``stn-train-cub``, ``stn-bench``) share: help text
that states each default exactly once and shows no reStructuredText markup."""

import argparse
import re

_ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain(text):
    """reStructuredText markup out of a docstring: ``x`` and :mod:`x` become x."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def _show(value):
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to an option's help unless its text already speaks of its default, or the
    default is None or False (an absent option); keeps the description's paragraphs as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: {_show(default)})"


def description(doc, paragraph=1):
    """One paragraph of a module docstring, as --help shows it."""
    return plain(doc.split("\n\n")[paragraph]).strip()
