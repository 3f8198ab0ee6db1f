"""The experiments: grids of runs (``sweep``), reports with confidence intervals and paired differences
(``report``, ``arms``, ``comparison``), class-incremental learning (``continual``) and the multi-index theory
experiment (``theory_task``, ``theory``), with their shared figure set-up (``figures``).

They sit between evaluation and the command line (docs/architecture.md). Importing this package imports none
of them; import the module you need, e.g. ``from infodistill.experiments.sweep import parse_sweep``.
"""
