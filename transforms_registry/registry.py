"""The registry: a module-level dict plus a decorator (timm's style), and lazy entry points.

Third-party distributions publish families in the entry-point group ``stn_triton.transforms``
(``name = "module:Class"``); they are loaded at the first lookup. ``STN_TRITON_NO_PLUGINS=1``
turns discovery off.
"""

import difflib
import fnmatch
import inspect
import os
import re
import warnings
from importlib.metadata import entry_points

import torch

from .base import TransformFamily, incomplete_family

ENTRY_POINT_GROUP = "stn_triton.transforms"
_REGISTRY: dict = {}
_SOURCES: dict = {}  # name -> where it came from, for error messages
_plugins_loaded = False


def register_transform(cls=None, *, name=None, override=False):
    """Class decorator: ``@register_transform`` or ``@register_transform(name="x", override=True)``."""

    def wrap(c):
        _register(c, name or getattr(c, "name", ""), override, source=f"{c.__module__}.{c.__qualname__}")
        return c

    return wrap(cls) if cls is not None else wrap


_CODE_CLASH = "pass register_transform(override=True) to replace it"
_ENTRY_POINT_CLASH = ("rename the entry point in its distribution, uninstall one of the two, or set "
                      "STN_TRITON_NO_PLUGINS=1 to turn plugin discovery off")


def _register(cls, name, override, source, resolve=_CODE_CLASH):
    if not (isinstance(cls, type) and issubclass(cls, TransformFamily)):
        raise TypeError(f"register_transform: expected a TransformFamily subclass, got {cls!r}")
    incomplete = incomplete_family(cls)
    if incomplete:
        raise TypeError(f"register_transform: {incomplete}")
    if not name or not isinstance(name, str):
        raise ValueError(f"register_transform: {cls.__qualname__} needs a non-empty string `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls and not override:
        raise ValueError(f"transform {name!r} is already registered (by {_SOURCES[name]}); {resolve}")
    cls.name = name
    _REGISTRY[name] = cls
    _SOURCES[name] = source


def _no_plugins():
    return os.environ.get("STN_TRITON_NO_PLUGINS", "").strip().lower() not in ("", "0", "false", "no", "off")


def load_plugins(force=False):
    """Load families published under the entry-point group (once). A plugin that fails to import
    or is not a family is skipped with one warning naming its distribution and entry point."""
    global _plugins_loaded
    if (_plugins_loaded and not force) or _no_plugins():
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", "?")
        where = f"entry point {ep.name!r} = {ep.value!r} of distribution {dist!r}"
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, TransformFamily)):
                raise TypeError(f"{cls!r} is not a TransformFamily subclass")
            if _REGISTRY.get(ep.name) is cls:
                continue
            _register(cls, ep.name, override=False, source=where, resolve=_ENTRY_POINT_CLASH)
        except Exception as e:  # a broken plugin must not break the others
            warnings.warn(f"stn_triton: skipping {where}: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


def _natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def list_transforms(pattern="*"):
    """Registered family names matching a shell-style wildcard, naturally sorted."""
    load_plugins()
    return sorted((n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern)), key=_natural_key)


def did_you_mean(name):
    """`` (did you mean 'x'?)`` for the registered name closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list_transforms(), n=1) if isinstance(name, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_transform(name, **options):
    """A new instance of family ``name`` with ``options`` (constructor arguments)."""
    if isinstance(name, TransformFamily):
        if options:
            raise ValueError("get_transform: options are for a family name, not an instance")
        return name
    load_plugins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown transform {name!r}{did_you_mean(name)}; known: {', '.join(list_transforms())}")
    cls = _REGISTRY[name]
    _check_options(name, cls, options)
    return cls(**options)


def family_options(cls):
    """The options (constructor arguments) of a family class: {name: default or inspect.Parameter.empty};
    None when it takes any keyword (``**kwargs``)."""
    if cls.__init__ in (torch.nn.Module.__init__, object.__init__):  # no constructor of its own
        return {}
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name: p.default for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def _check_options(name, cls, options):
    known = family_options(cls)
    if known is None:
        return
    unknown = [k for k in options if k not in known]
    if not unknown:
        return
    bad = unknown[0]
    close = difflib.get_close_matches(bad, list(known), n=1)
    valid = ", ".join(k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in known.items()) or "none"
    raise TypeError(f"transform {name!r} has no option {bad!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; its options: {valid}")
