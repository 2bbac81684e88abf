"""Benchmarks for stn-triton: ``stn-bench`` / ``python -m stn_triton.benchmarks``.

``cases`` (the named shapes and ``--case-spec``), ``providers`` (ours and the PyTorch, torch.compile
and kornia baselines), ``timing`` (device-event timing, peak memory, kernel counts, copy bandwidth),
``runner`` (the rows), ``report`` (JSON, CSV, markdown, plots), ``cli``. ``NOTES.md`` is the
roofline notebook; ``results/`` keeps the runs.
"""
