"""Several processes for one command: a small layer over ``torch.distributed``.

A command runs in several processes when it is started by ``torchrun`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``), or with ``--nproc N``, which
re-runs the same command under ``torch.distributed.run`` (:func:`launch`). Each process then calls
:func:`init_from_environment` and receives a :class:`ProcessGroup`: its rank, the number of processes
and the backend (gloo on CPU, nccl on CUDA, where rank r uses ``cuda:LOCAL_RANK``). The helpers below
take the group explicitly and do nothing in a one-process run, so the single-process code path calls
no collective at all.

Every collective runs under the group's timeout (``--dist-timeout``). A process that dies or stops
answering makes the collectives of the others fail with :class:`ProcessGroupError`, a one-line
message; under torchrun the launcher also stops the remaining processes as soon as one exits with
an error. See ``docs/distributed.md``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from infodistill.errors import UserInputError

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective (or the start-up rendezvous) may wait for the other processes."""
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
"""torch.distributed backend per device type."""
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Environment variables that torchrun sets for every process it starts."""
NPROC_FLAG = "--nproc"


class ProcessGroupError(RuntimeError):
    """A collective or the start-up failed: another process died, or did not answer within the timeout."""


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a run: ``rank`` of ``world_size`` processes (``local_rank`` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part (collectives then communicate)."""
        return self.world_size > 1


SINGLE_PROCESS = ProcessGroup()
"""The group of a run in one process: every helper is the identity."""


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by torchrun (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in (os.environ if environ is None else environ)


def _environment_int(environ: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = environ.get(name, default)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserInputError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def check_timeout(timeout_s: float) -> float:
    """``timeout_s`` if it is a finite positive number of seconds, else a one-line error."""
    if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < float("inf")):
        raise UserInputError(f"--dist-timeout must be a positive number of seconds, got {timeout_s}")
    return float(timeout_s)


def init_from_environment(timeout_s: float = DEFAULT_TIMEOUT_S, device_type: str = "cpu",
                          environ: Mapping[str, str] | None = None) -> ProcessGroup:
    """Join the process group that torchrun described in the environment; :data:`SINGLE_PROCESS` when
    this process was not started by torchrun. The backend follows ``device_type`` (gloo / nccl); the
    start-up rendezvous and every later collective wait at most ``timeout_s`` seconds."""
    environ = os.environ if environ is None else environ
    timeout_s = check_timeout(timeout_s)
    if not launched_by_torchrun(environ):
        return SINGLE_PROCESS
    if device_type not in BACKENDS:
        raise UserInputError(f"device type '{device_type}' cannot run in several processes; use one of: "
                             f"{', '.join(BACKENDS)}")
    world_size = _environment_int(environ, "WORLD_SIZE")
    rank = _environment_int(environ, "RANK", "0")
    local_rank = _environment_int(environ, "LOCAL_RANK", str(rank))
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserInputError(f"environment RANK={rank} WORLD_SIZE={world_size} is inconsistent; "
                             "RANK must be in 0..WORLD_SIZE-1")
    group = ProcessGroup(rank=rank, world_size=world_size, local_rank=local_rank, backend=BACKENDS[device_type],
                         timeout_s=timeout_s)
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserInputError(f"LOCAL_RANK {local_rank} needs cuda:{local_rank}, but this machine has {count} "
                                 f"CUDA device(s); start at most {count} processes per machine")
        torch.cuda.set_device(local_rank)
    if not group.distributed:
        return group
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in environ]
    if missing:
        raise UserInputError(f"WORLD_SIZE is set but {', '.join(missing)} is not; start the command with torchrun "
                             "or with --nproc N")
    try:
        torch.distributed.init_process_group(group.backend, rank=rank, world_size=world_size,
                                             timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as error:
        raise ProcessGroupError(f"could not join the other {world_size - 1} process(es) within {timeout_s:g} s: "
                                f"{_first_line(error)}") from None
    return group


def shutdown(group: ProcessGroup) -> None:
    """Leave the process group (no-op in a one-process run)."""
    if group.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main(group: ProcessGroup) -> bool:
    """True on rank 0, the process that writes files and prints results."""
    return group.rank == 0


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _failed(group: ProcessGroup, what: str, error: BaseException) -> ProcessGroupError:
    return ProcessGroupError(f"{what} failed: another process stopped or did not answer within "
                             f"{group.timeout_s:g} s ({_first_line(error)})")


def _transport_device(group: ProcessGroup) -> torch.device:
    """Where tensors must be for the backend: the rank's GPU for nccl, else the CPU."""
    return torch.device("cuda", group.local_rank) if group.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(group: ProcessGroup, tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes (a new tensor; ``tensor`` itself unchanged)."""
    if not group.distributed:
        return tensor
    buffer = tensor.detach().to(_transport_device(group), copy=True)
    try:
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
    except RuntimeError as error:
        raise _failed(group, "all_reduce", error) from None
    return buffer.to(tensor.device)


def all_gather_tensors(group: ProcessGroup, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor``, in rank order. The leading dimension may differ between processes
    (the other dimensions and the dtype must agree); each tensor comes back on ``tensor``'s device."""
    if not group.distributed:
        return [tensor]
    device = _transport_device(group)
    local = tensor.detach().to(device).contiguous()
    try:
        size = torch.tensor([local.shape[0] if local.dim() else 1], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(group.world_size)]
        torch.distributed.all_gather(sizes, size)
        lengths = [int(value.item()) for value in sizes]
        if local.dim() == 0:
            local = local.reshape(1)
        longest = max(lengths)
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
        padded[: local.shape[0]] = local
        gathered = [torch.empty_like(padded) for _ in range(group.world_size)]
        torch.distributed.all_gather(gathered, padded)
    except RuntimeError as error:
        raise _failed(group, "all_gather", error) from None
    parts = [part[:length].to(tensor.device) for part, length in zip(gathered, lengths)]
    return [part.reshape(tensor.shape) for part in parts] if tensor.dim() == 0 else parts


def all_gather_objects(group: ProcessGroup, value: Any) -> list[Any]:
    """Every process's picklable ``value``, in rank order."""
    if not group.distributed:
        return [value]
    gathered: list[Any] = [None] * group.world_size
    try:
        torch.distributed.all_gather_object(gathered, value)
    except RuntimeError as error:
        raise _failed(group, "all_gather_object", error) from None
    return gathered


def partition(count: int, world_size: int, what: str = "classes") -> list[list[int]]:
    """``0..count-1`` (classes, image positions, trajectories: ``what``) split into ``world_size`` contiguous
    runs whose sizes differ by at most 1 (the first ``count % world_size`` runs hold one more); every
    process gets at least one."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UserInputError(f"the number of processes must be a positive integer, got {world_size!r}")
    if world_size > count:
        raise UserInputError(f"{world_size} processes is more than the {count} {what}; every process needs "
                             f"at least one, so use at most {count}")
    base, extra = divmod(count, world_size)
    parts, start = [], 0
    for rank in range(world_size):
        size = base + (1 if rank < extra else 0)
        parts.append(list(range(start, start + size)))
        start += size
    return parts


def check_nproc(nproc: int, environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``--nproc`` below 1, or given to a command that torchrun already started."""
    if nproc < 1:
        raise UserInputError(f"--nproc must be a positive integer, got {nproc}")
    environ = os.environ if environ is None else environ
    if launched_by_torchrun(environ):
        raise UserInputError(f"--nproc {nproc} cannot be used under torchrun (WORLD_SIZE={environ['WORLD_SIZE']} is "
                             "set); give either --nproc or a torchrun launch, not both")


def check_cuda_processes(nproc: int, device: torch.device) -> None:
    """Refuse more processes than CUDA devices when the run is on CUDA (each rank takes one device)."""
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if nproc > count:
            raise UserInputError(f"--nproc {nproc} needs {nproc} CUDA devices (one per process), but this machine "
                                 f"has {count}; use --nproc {count} or fewer")


def rank_device(group: ProcessGroup, device: torch.device) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for a CUDA run in several processes."""
    if device.type != "cuda" or not group.distributed:
        return device
    if device.index is not None and device.index != group.local_rank:
        raise UserInputError(f"device '{device}' names one GPU, but each of several processes uses its own "
                             "(cuda:LOCAL_RANK); pass --device cuda")
    return torch.device("cuda", group.local_rank)


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` (or ``--nproc=N``, or an abbreviation argparse accepted)."""
    result: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if len(name) > 3 and NPROC_FLAG.startswith(name):
            skip = "=" not in token
            continue
        result.append(token)
    return result


def launch(argv: Sequence[str], nproc: int, command: str = "infodistill") -> int:
    """Run ``python -m infodistill ARGV`` (``argv`` without ``--nproc``) in ``nproc`` processes under
    ``torch.distributed.run`` (standalone: one machine, a free port), in a subprocess; return its exit
    status. The subprocess is this module's ``__main__``: torchrun's launcher with its failure report
    reduced to one line and the failing rank's own exit status passed on (2: bad input)."""
    import subprocess

    arguments = [sys.executable, "-m", "infodistill.parallel", "--nproc_per_node", str(nproc), "--standalone",
                 "-m", "infodistill", *without_nproc(argv)]
    try:
        return subprocess.run(arguments, check=False).returncode
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def _run_torchrun(torchrun_argv: Sequence[str]) -> int:
    """torchrun's launcher (``torch.distributed.run``) on ``torchrun_argv``; a failed process gives one line
    naming the first rank that failed and its exit status, which becomes the exit status (at least 1)."""
    # torchrun's own log lines are silenced (its failure summary is the one line below); its loggers read
    # LOGLEVEL when they are created, at import, and the processes it starts get the user's value back.
    user_level = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "CRITICAL"
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if user_level is None:
        os.environ.pop("LOGLEVEL")
    else:
        os.environ["LOGLEVEL"] = user_level
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    arguments = parse_args(list(torchrun_argv))
    try:
        run(arguments)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        how = (f"was stopped by signal {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        sys.stderr.write(f"infodistill: error: rank {rank} of {arguments.nproc_per_node} processes {how}; "
                         "the others were stopped (its own message, if any, is above)\n")
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as error:
        print(f"infodistill: stopped by signal {error.sigval.name}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_run_torchrun(sys.argv[1:]))
