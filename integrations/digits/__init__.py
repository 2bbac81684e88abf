"""The paper's distorted-digits experiment (Table 1 in miniature): data, distortions, models, runner.

``python -m stn_triton.integrations.digits`` (or ``stn-digits``) runs it; see :mod:`stn_triton.integrations.digits.cli`.
"""

from .data import Digits, load_idx_dir, load_sklearn_digits, read_idx
from .distortions import DISTORTIONS, distort
from .experiment import Config, run
from .models import MODELS, build

__all__ = ["DISTORTIONS", "MODELS", "Config", "Digits", "build", "distort", "load_idx_dir", "load_sklearn_digits",
           "read_idx", "run"]
