"""Atomic file writes: a file is either its old self or complete, never half-written.

A written file gets the permissions a plain ``open(path, "w")`` would give it: a new file ``0o666`` less the
umask (so a shared results folder stays readable to colleagues), a replaced file its previous mode.

A run directory is held by one process at a time (:func:`directory_lock`, an OS file lock); the names of the
files it holds are here too (:class:`RunFiles`), for the loop that writes them and the readers of run directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from infodistill.errors import UserInputError

NEW_FILE_MODE = 0o666
"""The mode a new file is created with before the umask applies (what ``open()`` uses)."""


def _create_temporary(final_path: Path) -> Path:
    """A new empty file beside ``final_path`` with a fresh random name, created with :data:`NEW_FILE_MODE` so
    that the kernel applies the umask (and any default ACL) exactly as for ``open()``; ``tempfile.mkstemp``
    would create it 0600 whatever the umask."""
    for _ in range(100):
        temporary = final_path.parent / f".{final_path.name}.{secrets.token_hex(6)}.tmp"
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
        except FileExistsError:
            continue
        os.close(handle)
        return temporary
    raise FileExistsError(f"no free temporary name beside '{final_path}'")


@contextlib.contextmanager
def atomic_path(final_path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it into place only if the block succeeds. A file
    that replaces an existing one keeps that file's mode; a new one has the mode the umask allows."""
    with atomic_paths(final_path) as (temporary,):
        yield temporary


@contextlib.contextmanager
def atomic_paths(*final_paths: str | Path) -> Iterator[list[Path]]:
    """:func:`atomic_path` for a result made of several files (an artefact and its PNG, evaluation.json and
    its CSV): one temporary path per file; only once the block has written every one are they renamed into
    place (in the order given, each rename atomic), so a failure while writing any of them leaves every old
    file as it was and no new one beside it."""
    finals = [Path(path) for path in final_paths]
    temporaries: list[Path] = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            temporaries.append(_create_temporary(final))
        # the mode open() gives a new file here, read before the block: writers such as safetensors may
        # recreate the file 0600
        modes = [stat.S_IMODE(os.stat(temporary).st_mode) for temporary in temporaries]
        yield list(temporaries)
        for final, temporary, mode in zip(finals, temporaries, modes):
            try:
                mode = stat.S_IMODE(os.stat(final).st_mode)
            except FileNotFoundError:
                pass  # a new file
            os.chmod(temporary, mode)
        for final, temporary in zip(finals, temporaries):
            os.replace(temporary, final)
    finally:
        for temporary in temporaries:
            if os.path.exists(temporary):
                os.unlink(temporary)


CHECKPOINT_NAME = "checkpoint.safetensors"
ARTEFACT_NAME = "set.safetensors"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"


class RunFiles:
    """The files of one run directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        self.checkpoint = self.root / CHECKPOINT_NAME
        self.artefact = self.root / ARTEFACT_NAME
        self.config = self.root / CONFIG_NAME
        self.metrics = self.root / METRICS_NAME
        self.tensorboard = self.root / "tb"


LOCK_NAME = ".infodistill.lock"
"""The lock file inside a run directory, held (``flock``) by the process that writes the directory."""


def _lock_refusal(root: Path, holder: str) -> str:
    who = f" ({holder})" if holder else ""
    return (f"'{root}' is in use by another run{who}: it holds the lock '{LOCK_NAME}'; wait for that run to end, or "
            "choose another --out")


def directory_in_use(root: str | Path) -> str | None:
    """The refusal line when another process holds ``root``'s lock, else None. Only reads: the lock file is
    neither created nor changed."""
    path = Path(root) / LOCK_NAME
    try:
        handle = open(path)
    except OSError:
        return None  # no lock file (or none readable): no run has held this directory
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_refusal(Path(root), handle.read(200).strip())
    return None


@contextlib.contextmanager
def directory_lock(root: str | Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``root`` (created if missing) for the block, so that no second run writes
    into it meanwhile. The lock is ``flock`` on :data:`LOCK_NAME`: the OS releases it when the process ends, even
    killed, so a stale lock cannot block a later run. A directory the lock created and nothing else was written
    to is removed afterwards. Another holder: a one-line :class:`UserInputError`."""
    root = Path(root)
    created = [folder for folder in (root, *root.parents) if not folder.exists()]  # deepest first
    root.mkdir(parents=True, exist_ok=True)
    handle = _acquire(root)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        if created and [entry.name for entry in root.iterdir()] == [LOCK_NAME]:
            os.unlink(root / LOCK_NAME)  # still held: a process that opened it meanwhile re-checks it (_acquire)
            with contextlib.suppress(OSError):  # up to the first folder that is not empty
                for folder in created:
                    folder.rmdir()
        handle.close()


def _acquire(root: Path) -> IO[str]:
    """The lock file of ``root``, opened and locked exclusively; re-opened if a holder removed it meanwhile."""
    path = root / LOCK_NAME
    for _ in range(10):
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, NEW_FILE_MODE)
        handle = os.fdopen(descriptor, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read(200).strip()
            handle.close()
            raise UserInputError(_lock_refusal(root, holder)) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            return handle
        handle.close()  # the file we locked was removed by its last holder: lock the one now in place
    raise UserInputError(f"cannot lock '{root}': its lock file '{LOCK_NAME}' keeps being replaced")


def check_output_path(path: str | Path, directory: bool, flag: str = "--out") -> Path:
    """Refuse, in one line and before any work, an output that cannot be written: a folder (``directory``) that
    is an existing file, a file that is an existing folder, a path that lies under a file, or one whose nearest
    existing folder does not let this user create entries. Reads only; returns ``path``."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        kind = "a file" if directory else "a folder"
        raise UserInputError(f"{flag} '{path}' exists and is {kind}; give {'a folder' if directory else 'a file'} "
                             "path")
    existing = path if path.exists() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"{flag} '{path}' lies under '{existing}', which is a file, not a folder")
    target = path if path.exists() and directory else existing
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserInputError(f"{flag} '{path}' is not writable: this user cannot create files in '{target}'")
    return path  # a file is replaced by renaming (atomic_path): its folder's permission is what counts
