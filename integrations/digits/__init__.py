"""The paper's distorted-digits experiment (Table 1 in miniature): data, distortions, models, runner;
and three more of its appendix A's experiments as tasks of the same command, :mod:`.addition`,
:mod:`.colocalisation` and :mod:`.threed`.

``python -m stn_triton.integrations.digits`` (or ``stn-digits``) runs it (``--task classify``, the
default; ``--task addition``, ``--task colocalisation``, ``--task 3d``); see
:mod:`stn_triton.integrations.digits.cli`.
:func:`load_model` reads back what ``--save-models`` wrote.
"""

from .data import Digits, load_idx_dir, load_sklearn_digits, object_radius, read_idx
from .distortions import DISTORTIONS, applied_angles, distort
from .experiment import Config, rotation_report, run
from .models import MODELS, build, load_model, save_model

__all__ = ["DISTORTIONS", "MODELS", "Config", "Digits", "applied_angles", "build", "distort", "load_idx_dir",
           "load_model", "load_sklearn_digits", "object_radius", "read_idx", "rotation_report", "run", "save_model"]
