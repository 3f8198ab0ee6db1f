"""What a run keeps in its directory while it runs: the checkpoint it resumes from (bit for bit), the metrics
log, and the checks and the lock that give the directory to one run at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from infodistill import __version__
from infodistill.errors import UserInputError
from infodistill.files import RunFiles, atomic_path, directory_in_use, directory_lock
from infodistill.loop.config import RESUMABLE_CHANGES, SETTINGS_OF_OLDER_RUNS, DistillConfig
from infodistill.loop.parts import ImageAverage, run_precision
from infodistill.loop.split import ProcessSplit
from infodistill.methods import method_class
from infodistill.parallel import ProcessGroup, all_gather_objects, is_main
from infodistill.synthetic import SyntheticSet
from infodistill.training import resolve_device


def _learned_groups(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of everything the optimiser steps: ``<group name>.<position>``."""
    for group in optimizer.param_groups:
        for position, parameter in enumerate(group["params"]):
            yield f"{group['name']}.{position}", parameter


def _checkpoint_tensors(synthetic: SyntheticSet, optimizer: torch.optim.Optimizer,
                        average: ImageAverage | None, split: ProcessSplit | None = None) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds; in a split run the set's tensors (and their optimiser state and
    average) are gathered whole from the processes that step each class (every process calls this)."""
    parameters = dict(synthetic.named_parameters())

    def whole(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if split is None else split.gather(synthetic, tensor)

    tensors = {f"synthetic.{name}": (whole(value) if name in parameters else value).detach().cpu().contiguous()
               for name, value in synthetic.state_dict().items()}
    for name, parameter in _learned_groups(optimizer):
        in_set = name.startswith("synthetic.")
        if not in_set:
            tensors[f"learned.{name}"] = parameter.detach().cpu().contiguous()
        for key, value in optimizer.state.get(parameter, {}).items():
            if torch.is_tensor(value):
                value = whole(value) if in_set and value.shape == parameter.shape else value
                tensors[f"{_STATE_PREFIXES.get(key, 'optimizer.' + key)}.{name}"] = value.detach().cpu().contiguous()
    if average is not None:
        tensors.update({f"average.{name}": whole(value).cpu().contiguous() for name, value in average.shadow.items()})
    return tensors


def _stateful(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps state between steps that a checkpoint must carry (SGD with momentum, Adam)."""
    if isinstance(optimizer, torch.optim.SGD):
        return any(group.get("momentum", 0) for group in optimizer.param_groups)
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


_STATE_PREFIXES = {"momentum_buffer": "momentum"}
"""Checkpoint prefix of an optimiser state entry (SGD's momentum; Adam's moments go under ``optimizer.<key>``)."""


def save_checkpoint(files: RunFiles, synthetic: SyntheticSet, optimizer: torch.optim.Optimizer,
                    iteration: int, config: DistillConfig, weights: dict[str, float],
                    average: ImageAverage | None = None, split: ProcessSplit | None = None,
                    calibration: dict[str, float] | None = None) -> None:
    """Write the state after ``iteration`` completed iterations, atomically. In a split run every process
    calls this (the state is gathered) and rank 0 alone writes the file. ``calibration``: how 'auto' chose
    the CMI weight (:class:`CMICalibration`), kept so the artefact of a resumed run records it too."""
    tensors = _checkpoint_tensors(synthetic, optimizer, average, split)
    if split is not None and not is_main(split.group):
        return
    metadata = {"iteration": str(iteration), "config": json.dumps(dataclasses.asdict(config)),
                "regularizer_weights": json.dumps(weights), "version": __version__,
                "random_streams": RANDOM_STREAMS,
                "average_count": str(average.count if average is not None else 0),
                "processes": str(split.group.world_size if split is not None else 1)}
    if calibration is not None:
        metadata["cmi_calibration"] = json.dumps(calibration)
    with atomic_path(files.checkpoint) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


RANDOM_STREAMS = "per-unit"
"""How a run's random draws are organised, recorded in every checkpoint: one stream per unit of work (class,
image position, trajectory, update). Checkpoints written before (without the key) drew every class from one
stream per iteration; their runs cannot continue exactly and are refused on resume."""


def load_checkpoint(files: RunFiles, synthetic: SyntheticSet, optimizer: torch.optim.Optimizer,
                    config: DistillConfig, average: ImageAverage | None = None,
                    processes: int = 1) -> tuple[int, dict[str, float], dict[str, float] | None]:
    """Restore a checkpoint into ``synthetic``, the optimiser's tensors and momentum, and the image
    average; return (iteration, regularizer weights, the CMI weight's calibration or None). A checkpoint
    holds the whole set, so a run may resume with another number of ``processes``, unless its method says otherwise
    (``Method.resumable_with_other_process_count``)."""
    checkpoint = _read_checkpoint(files.checkpoint)
    _check_resumable(checkpoint, files, config, optimizer, processes)
    try:
        _restore(checkpoint, synthetic, optimizer, average)
    except (RuntimeError, KeyError) as error:
        raise UserInputError(f"checkpoint '{files.checkpoint}' does not fit this run: "
                             f"{str(error).splitlines()[0]}") from None
    if checkpoint.iteration > (config.iterations or 0):
        raise UserInputError(f"checkpoint '{files.checkpoint}' is at iteration {checkpoint.iteration}, past the "
                             f"requested {config.iterations}")
    return checkpoint.iteration, checkpoint.weights, checkpoint.calibration


@dataclass(frozen=True)
class _Checkpoint:
    """What a checkpoint file holds: its tensors and the metadata :func:`save_checkpoint` wrote."""

    tensors: dict[str, torch.Tensor]
    iteration: int
    config: dict[str, Any]
    weights: dict[str, float]
    average_count: int
    written_by: int
    calibration: dict[str, float] | None
    random_streams: str = RANDOM_STREAMS


def _read_checkpoint(path: Path) -> _Checkpoint:
    """The checkpoint at ``path``; one that cannot be read is refused in one line."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return _Checkpoint(
            tensors=tensors, iteration=int(metadata["iteration"]), config=json.loads(metadata["config"]),
            weights=json.loads(metadata["regularizer_weights"]),
            average_count=int(metadata.get("average_count", "0")), written_by=int(metadata.get("processes", "1")),
            calibration=json.loads(metadata["cmi_calibration"]) if "cmi_calibration" in metadata else None,
            random_streams=metadata.get("random_streams", "per-iteration"))
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(
            f"checkpoint '{path}' cannot be read ({reason}); it is corrupt or not a checkpoint"
        ) from None


def _check_resumable(checkpoint: _Checkpoint, files: RunFiles, config: DistillConfig,
                     optimizer: torch.optim.Optimizer, processes: int) -> None:
    """Refuse to resume the run of ``checkpoint`` with ``config`` when a setting outside
    :data:`~infodistill.loop.config.RESUMABLE_CHANGES` changed, in another number of ``processes`` where the
    method needs the same, or from a checkpoint without the optimiser state the run needs to continue exactly."""
    current = dataclasses.asdict(config)
    current["precision"] = run_precision(config, resolve_device(config.device))
    stored = {**{key: value for key, value in SETTINGS_OF_OLDER_RUNS.items() if key in current}, **checkpoint.config}
    for key, value in stored.items():
        if key not in RESUMABLE_CHANGES and current.get(key) != value:
            raise UserInputError(
                f"cannot resume '{files.root}': {key} was {value!r} in the run but is {current.get(key)!r} now"
            )
    if checkpoint.random_streams != RANDOM_STREAMS:
        raise UserInputError(f"checkpoint '{files.checkpoint}' was written by an earlier release whose random draws "
                             f"were one stream per iteration ({checkpoint.random_streams}), not one per class, "
                             "image position and update; its run cannot continue exactly: start it afresh in "
                             "another directory")
    written_by = checkpoint.written_by
    if written_by != processes and not method_class(config.method).resumable_with_other_process_count:
        raise UserInputError(f"cannot resume '{files.root}' in {processes} process(es): method '{config.method}' "
                             f"must resume with the {written_by} process(es) that wrote the checkpoint")
    if checkpoint.iteration > 0 and _stateful(optimizer) and not any(
            name.startswith(("momentum.", "optimizer.")) for name in checkpoint.tensors):
        raise UserInputError(f"checkpoint '{files.checkpoint}' holds no optimiser state (momentum or moments) after "
                             f"{checkpoint.iteration} iterations; resuming from it would not continue the run "
                             "exactly: run afresh")


def _restore(checkpoint: _Checkpoint, synthetic: SyntheticSet, optimizer: torch.optim.Optimizer,
             average: ImageAverage | None) -> None:
    """Copy the checkpoint's tensors into the set, the optimiser's other tensors and its state, and the average
    (a RuntimeError or KeyError when they do not fit)."""
    tensors = checkpoint.tensors
    state = {name[len("synthetic."):]: value for name, value in tensors.items() if name.startswith("synthetic.")}
    synthetic.load_state_dict(state, strict=True)
    with torch.no_grad():
        for name, parameter in _learned_groups(optimizer):
            if not name.startswith("synthetic."):
                parameter.copy_(tensors[f"learned.{name}"])
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "step"):
                stored = tensors.get(f"{_STATE_PREFIXES.get(key, 'optimizer.' + key)}.{name}")
                if stored is not None:
                    optimizer.state[parameter][key] = stored.to(parameter.device if key != "step" else "cpu")
        if average is not None:
            for name, shadow in average.shadow.items():
                shadow.copy_(tensors[f"average.{name}"])
            average.count = checkpoint.average_count


class MetricsLog:
    """Per-iteration loss terms to ``metrics.jsonl`` (truncated to the checkpoint on resume) and TensorBoard."""

    def __init__(self, files: RunFiles, start_iteration: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = files.metrics
        if start_iteration > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) < start_iteration]
            with atomic_path(self.path) as temporary:
                temporary.write_text("".join(line + "\n" for line in kept))
        elif start_iteration == 0:
            self.path.write_text("")
        self.handle = self.path.open("a")
        self.writer = SummaryWriter(str(files.tensorboard), purge_step=start_iteration if start_iteration else None)

    def write(self, iteration: int, values: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl``; the scalar values also to TensorBoard (lists, e.g. the accuracy of
        every evaluation run, only to the JSON lines)."""
        self.handle.write(json.dumps({"iteration": iteration, **values}) + "\n")
        self.handle.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        self.handle.close()
        self.writer.close()


RUN_FILE_ATTRIBUTES = ("config", "metrics", "checkpoint", "artefact")
"""The files of a run directory that a fresh run writes, overwriting what is there."""


def check_out_dir(files: RunFiles, resume: bool, config: DistillConfig | None = None,
                  locked_by_me: bool = False) -> None:
    """Refuse, in one line, a run directory this run cannot use (reads only): one that is a file, one another
    run holds (its lock; skipped with ``locked_by_me``), one to resume that has no checkpoint, and for a fresh run
    one holding a run (checkpoint or artefact) or other files it would overwrite (``config.yaml``,
    ``metrics.jsonl``). The exception: the ``config.yaml`` and ``metrics.jsonl`` of this same ``config`` with no
    checkpoint yet, which a run interrupted before its first checkpoint left (a sweep or continual run restarts
    such a cell afresh)."""
    if files.root.exists() and not files.root.is_dir():
        raise UserInputError(f"--out '{files.root}' exists and is not a directory; choose another --out")
    in_use = None if locked_by_me else directory_in_use(files.root)
    if in_use is not None:
        raise UserInputError(in_use)
    if resume:
        if not files.checkpoint.exists():
            raise UserInputError(f"cannot resume: '{files.checkpoint}' does not exist (run without --resume first)")
        return
    present = [getattr(files, name) for name in RUN_FILE_ATTRIBUTES if getattr(files, name).exists()]
    names = ", ".join(path.name for path in present)
    if files.checkpoint.exists() or files.artefact.exists():
        raise UserInputError(f"'{files.root}' already holds a run ({names}); pass --resume to continue it, or choose "
                             "another --out")
    if present and not _interrupted_run_of(files, config):
        raise UserInputError(f"'{files.root}' already holds {names}, which a new run would overwrite; choose another "
                             "--out, or move them away")


def _interrupted_run_of(files: RunFiles, config: DistillConfig | None) -> bool:
    """Whether ``files.config`` is the config.yaml of ``config`` (up to the settings a resumed run may change
    and the resolved precision): the leftovers of this run, interrupted before its first checkpoint."""
    if config is None or not files.config.is_file():
        return False
    try:
        stored = yaml.safe_load(files.config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(stored, dict):
        return False
    ignored = {*RESUMABLE_CHANGES, "precision", "resolved_weights", "cmi_calibration"}
    current = dataclasses.asdict(config.with_method_defaults())
    return ({key: value for key, value in stored.items() if key not in ignored} ==
            {key: value for key, value in current.items() if key not in ignored})


@contextlib.contextmanager
def held_run_directory(files: RunFiles, resume: bool, config: DistillConfig,
                        group: ProcessGroup) -> Iterator[None]:
    """Hold the run directory for the block: rank 0 checks it (:func:`check_out_dir`), takes its lock
    (:func:`~infodistill.files.directory_lock`) and checks it again under the lock; in a split run every process
    learns the outcome (one exchange), so all start, or all refuse with rank 0's line."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if is_main(group):
            try:
                check_out_dir(files, resume, config)  # before the lock creates the directory
                stack.enter_context(directory_lock(files.root))
                check_out_dir(files, resume, config, locked_by_me=True)
            except UserInputError as error:
                stack.close()
                refusal = str(error)
            except OSError as error:  # e.g. a folder that cannot be created
                stack.close()
                refusal = f"cannot use --out '{files.root}': {error.strerror or error}"
        if group.distributed:
            refusal = next((line for line in all_gather_objects(group, refusal) if line is not None), None)
        if refusal is not None:
            raise UserInputError(refusal)
        yield
