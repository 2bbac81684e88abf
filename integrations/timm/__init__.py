"""timm integration: parallel spatial transformers in front of timm backbones (the paper's CUB-200-2011
part-attention model), transformers inside any backbone ("ST-CNN Multi"), the CUB dataset and a DDP
trainer. Importing this package registers the models with ``timm.create_model``.

Without timm the package still imports (so that ``stn-train-cub --help`` works), and using any of its
names raises a ``ModuleNotFoundError`` that says what to install."""

__all__ = ["CUB200", "ParallelSTNet", "STMultiNet", "cub_transforms", "initial_theta", "region_centres"]

NEEDS_TIMM = "stn_triton.integrations.timm (and stn-train-cub) needs timm: pip install 'stn-triton[timm]'"

try:
    import timm  # noqa: F401
except ModuleNotFoundError as e:  # say what to install when a name is used, not deep inside an import
    _missing = e.name
else:
    _missing = None
    from .cub import CUB200, cub_transforms
    from .models import ParallelSTNet, STMultiNet, initial_theta, region_centres


def __getattr__(name):
    if _missing is not None and name in __all__:
        raise ModuleNotFoundError(f"{name}: {NEEDS_TIMM}", name=_missing)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
