"""The distillation loop, one loop for every method x parameterisation x regularizers (:func:`distill`; its
promises are in :mod:`infodistill.loop.run`). Its modules, each importing only those above it:

- :mod:`~infodistill.loop.config`: the settings of a run (:class:`DistillConfig`) and their checks;
- :mod:`~infodistill.loop.split`: a run divided over processes (:func:`plan_split`, :class:`ProcessSplit`);
- :mod:`~infodistill.loop.parts`: what a run is built from: random streams, the set, the method, the optimiser,
  the image average, each iteration's context, the regularizer terms;
- :mod:`~infodistill.loop.step`: one iteration (:func:`run_iteration`) and the stop on a non-finite loss;
- :mod:`~infodistill.loop.calibration`: the CMI weight 'auto';
- :mod:`~infodistill.loop.checkpoint`: checkpoints and exact resume, the metrics log, the run directory's checks
  and lock;
- :mod:`~infodistill.loop.output` and :mod:`~infodistill.loop.monitor`: the artefact; the CMI monitoring and
  periodic evaluation on the way;
- :mod:`~infodistill.loop.run`: :func:`distill`, a run from its directory to its artefact.

The names of a run directory's files (``checkpoint.safetensors``, ``set.safetensors``, ...) are in
:mod:`infodistill.files`, for the readers of run directories.
"""

from infodistill.loop.calibration import (
    CALIBRATION_DRAWS,
    CMI_TARGET_RATIOS,
    PUBLISHED_CMI_WEIGHTS,
    CMICalibration,
    calibrate_cmi_weight,
    cmi_target_ratio,
    initial_gradients,
)
from infodistill.loop.checkpoint import MetricsLog, check_out_dir, load_checkpoint, save_checkpoint
from infodistill.loop.config import (
    LOOP_FIELDS,
    LR_SCHEDULES,
    METHOD_DEFAULT_FIELDS,
    OPTIMIZERS,
    RENAMED_SETTINGS,
    RESUMABLE_CHANGES,
    SETTINGS_GROUPS,
    SETTINGS_OF_OLDER_RUNS,
    DistillConfig,
    ImageSettings,
    RunSettings,
    check_cmi_weight,
    distill_config_from,
    parse_cmi_weight,
    part_fields,
)
from infodistill.loop.monitor import check_held_out
from infodistill.loop.parts import (
    CALIBRATION_STREAM,
    INIT_STREAM,
    ITERATION_STREAM,
    REGULARIZER_STREAM,
    SETUP_STREAM,
    ImageAverage,
    RegularizerTerm,
    RunParts,
    build_method,
    build_run_parts,
    make_context,
    run_precision,
    schedule_factor,
)
from infodistill.loop.run import DistillResult, distill
from infodistill.loop.split import SPLIT_KINDS, ProcessSplit, plan_split
from infodistill.loop.step import LossDiverged, computed_in, run_iteration

__all__ = [
    "CALIBRATION_DRAWS",
    "CALIBRATION_STREAM",
    "CMI_TARGET_RATIOS",
    "INIT_STREAM",
    "ITERATION_STREAM",
    "LOOP_FIELDS",
    "LR_SCHEDULES",
    "METHOD_DEFAULT_FIELDS",
    "REGULARIZER_STREAM",
    "OPTIMIZERS",
    "PUBLISHED_CMI_WEIGHTS",
    "RENAMED_SETTINGS",
    "RESUMABLE_CHANGES",
    "SETTINGS_GROUPS",
    "SETTINGS_OF_OLDER_RUNS",
    "SETUP_STREAM",
    "SPLIT_KINDS",
    "CMICalibration",
    "DistillConfig",
    "DistillResult",
    "ImageAverage",
    "ImageSettings",
    "LossDiverged",
    "MetricsLog",
    "ProcessSplit",
    "RegularizerTerm",
    "RunParts",
    "RunSettings",
    "build_method",
    "build_run_parts",
    "calibrate_cmi_weight",
    "check_cmi_weight",
    "check_held_out",
    "check_out_dir",
    "cmi_target_ratio",
    "computed_in",
    "distill",
    "distill_config_from",
    "initial_gradients",
    "load_checkpoint",
    "make_context",
    "parse_cmi_weight",
    "part_fields",
    "plan_split",
    "run_iteration",
    "run_precision",
    "save_checkpoint",
    "schedule_factor",
]
