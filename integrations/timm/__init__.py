"""timm integration: parallel spatial transformers in front of timm backbones (the paper's CUB-200-2011
part-attention model), transformers inside any backbone ("ST-CNN Multi"), the CUB dataset and a DDP
trainer. Importing this package registers the models with ``timm.create_model``."""

try:
    import timm  # noqa: F401
except ModuleNotFoundError as e:  # say what to install rather than fail deep inside an import
    raise ModuleNotFoundError("stn_triton.integrations.timm (and stn-train-cub) needs timm: "
                              "pip install 'stn-triton[timm]'", name=e.name) from None

from .cub import CUB200, cub_transforms
from .models import ParallelSTNet, STMultiNet, initial_theta, region_centres

__all__ = ["CUB200", "ParallelSTNet", "STMultiNet", "cub_transforms", "initial_theta", "region_centres"]
