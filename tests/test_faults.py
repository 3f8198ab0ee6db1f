"""The README's promises under faults (issue 18), one test (or group) per promise; docs/faults.md lists them.

1. A NaN stops the run with the last good checkpoint kept: an update that makes a stepped tensor non-finite
   (the images, a per-class update's images, a learned tensor) stops the run at that iteration, in every
   process of a split run; the checkpoint on disk is the last finite one and no artefact is written.
2. Loading refuses non-finite or out-of-range data in one line (exit 2) naming the file and the field.
3. Written files get the mode the umask allows, as a plain ``open()`` gives them.
4. Two runs cannot share one run directory, and a fresh run does not overwrite files already there.
5. One boundary for user input: seeds in 0..2**63-1, finite rates and epsilons, a usable ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from infodistill.cli import main
from infodistill.errors import UserInputError
from infodistill.loop import DistillConfig, LossDiverged, distill
from infodistill.methods import METHOD_REGISTRY, ClassUpdate, Method, MethodDefaults, register_method

TINY = dict(model="ConvNet-1-8", batch_real=8, ipc=2, checkpoint_every=2, precision="fp32")


class _InfiniteGradient(torch.autograd.Function):
    """The identity, whose backward pass returns an infinite gradient: a loss built on it stays finite, while
    the step it drives makes the tensor it was applied to infinite."""

    @staticmethod
    def forward(ctx, value):  # noqa: D102
        return value.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return torch.full_like(grad, float("inf"))


class _Pull(Method):
    """A network-free method: pulls each image towards zero (0.5 * ||S||^2), one update per iteration, or one
    per class (``per_class``), and optionally learns a scale beside the set. The update at ``POISONED``
    (iteration, class) gets an infinite gradient on the tensor named by ``poison``."""

    per_class = False
    poison = "images"
    POISONED: tuple[int, int] = (3, 0)

    @staticmethod
    def defaults(ipc):
        return MethodDefaults(iterations=5, lr_images=0.1, momentum_images=0.5, batch_real=8, augment=False)

    def prepare(self, setup):
        self.scale = torch.ones((), requires_grad=True)

    def parameter_groups(self):
        return [{"params": [self.scale], "name": "scale", "lr": 0.1, "momentum": 0.0}]

    def iteration(self, context):
        synthetic = context.synthetic
        labels = range(synthetic.num_classes) if self.per_class else [None]
        for label in labels:
            images = synthetic.images() if label is None else synthetic.class_images(label)
            loss = 0.5 * images.pow(2).sum() + 0.5 * (self.scale - 1).pow(2)
            if (context.iteration, label or 0) == self.POISONED:
                poisoned = _InfiniteGradient.apply(self.scale if self.poison == "learned" else images)
                loss = loss + 0.0 * poisoned.sum()
            yield loss if label is None else ClassUpdate(loss, label)


@pytest.fixture
def pull_method():
    """Register the poisoned methods for one test: ``pull`` (whole set), ``pull-per-class`` (one update per
    class, poisoned at class 1), ``pull-learned`` (the learned scale poisoned)."""
    variants = {"pull": {}, "pull-per-class": {"per_class": True, "POISONED": (3, 1)},
                "pull-learned": {"poison": "learned"}}
    for name, attributes in variants.items():
        register_method(name)(type(name, (_Pull,), dict(attributes)))
    yield
    for name in variants:
        METHOD_REGISTRY.pop(name)


def _checkpoint(run_dir) -> tuple[int, dict[str, torch.Tensor]]:
    with safe_open(str(run_dir / "checkpoint.safetensors"), framework="pt") as handle:
        return int(handle.metadata()["iteration"]), {key: handle.get_tensor(key) for key in handle.keys()}


# --- 1. A NaN stops the run at the update that made it, with the last good (finite) checkpoint kept ----------

@pytest.mark.parametrize("method, named", [("pull", "synthetic.0"), ("pull-per-class", "synthetic.0"),
                                           ("pull-learned", "scale.0")])
def test_an_update_that_makes_a_stepped_tensor_non_finite_stops_the_run_at_that_iteration(
        method, named, pull_method, real, tmp_path):
    """Promise: a NaN stops the run with the last good checkpoint kept. The loss of iteration 3 is finite but
    its update makes the images (or, per class, class 1's images; or the learned scale) infinite. The run
    must stop in iteration 3 naming the tensor, keep the checkpoint of iteration 2 with every tensor finite,
    log iterations 0-2 only, and write no artefact. (Checked one iteration late, the checkpoint of iteration 4
    held the non-finite images; per class, the other classes' losses stayed finite.)"""
    config = DistillConfig(method=method, **TINY)
    with pytest.raises(LossDiverged, match=rf"iteration 3 made '{named}' non-finite.*checkpoint \(iteration 2\)"):
        distill(config, tmp_path / "run", progress=False, real=real)
    iteration, tensors = _checkpoint(tmp_path / "run")
    assert iteration == 2 and all(bool(torch.isfinite(value).all()) for value in tensors.values())
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2]
    assert not (tmp_path / "run" / "set.safetensors").exists()


def test_a_divergent_last_update_exits_1_and_writes_no_artefact(pull_method, striped_root, tmp_path, capsys):
    """Promise: a NaN stops the run (exit status 1). The very last update (iteration 3 of 4) diverges: before the
    check this run exited 0 and wrote an artefact (and a final checkpoint) of non-finite pixels. Now: exit 1, one
    line naming the iteration, the checkpoint of iteration 2 kept, no artefact."""
    status = main(["distill", "--method", "pull", "--iterations", "4", "--ipc", "2", "--model", "ConvNet-1-8",
                   "--checkpoint-every", "2", "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "iteration 3" in err and "Traceback" not in err
    iteration, tensors = _checkpoint(tmp_path / "run")
    assert iteration == 2 and bool(torch.isfinite(tensors["synthetic.pixels"]).all())
    assert not (tmp_path / "run" / "set.safetensors").exists()


SPLIT_DIVERGENCE = """
import os
if os.environ.get("RANK") == "1":
    import torch
    import importlib
    loop = importlib.import_module("infodistill.loop.step")  # where run_iteration looks _step up
    original = loop._step

    def _step(optimizer, method, synthetic, average, iteration=0, group=loop.SINGLE_PROCESS):
        if iteration == 3:  # rank 1's update of iteration 3 gets a NaN gradient; rank 0's stays finite
            for parameter in synthetic.parameters():
                parameter.grad = torch.full_like(parameter, float("nan"))
        return original(optimizer, method, synthetic, average, iteration, group)

    loop._step = _step
"""


def test_a_split_run_stops_on_every_process_at_the_iteration_one_of_them_diverged(striped_root, tmp_path):
    """Promise: a NaN stops the run with the last good checkpoint kept, in a run split over processes too. Rank 1's
    update of iteration 3 makes its images NaN while rank 0's stay finite: both processes must stop after
    iteration 3 (exit 1, not a hang until the timeout), each naming iteration 3, with the checkpoint of
    iteration 2 finite and no artefact."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SPLIT_DIVERGENCE)  # imported by every process of this PYTHONPATH
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hooks)}
    completed = subprocess.run([sys.executable, "-m", "infodistill", "distill", "--method", "dm", "--ipc", "2",
                                "--iterations", "6", "--model", "ConvNet-1-8", "--batch-real", "8",
                                "--checkpoint-every", "2", "--quiet", "--precision", "fp32", "--nproc", "2",
                                "--dist-timeout", "60", "--out", str(tmp_path / "run")],
                               capture_output=True, text=True, env=env, timeout=180, check=False)
    assert completed.returncode == 1, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert any("rank 0 of 2" in line and "iteration 3" in line for line in lines), completed.stderr
    assert any("rank 1 of 2" in line and "iteration 3" in line for line in lines), completed.stderr
    assert "Traceback" not in completed.stderr
    iteration, tensors = _checkpoint(tmp_path / "run")
    assert iteration == 2 and all(bool(torch.isfinite(value).all()) for value in tensors.values())
    assert not (tmp_path / "run" / "set.safetensors").exists()


# --- 2. Readers refuse non-finite or out-of-range data in one line (exit 2) naming the file and the field -----

def _tampered_set(real, run_dir, change) -> os.PathLike:
    """A valid random-subset artefact (1 image per class, with an lr and soft labels) in ``run_dir``, rewritten
    with ``change(tensors, metadata)`` applied; written with safetensors directly, as a hostile user could."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    from infodistill.artefact import save_set
    from infodistill.evaluate import random_subset

    subset = random_subset(real, 1, 0)
    subset = dataclasses.replace(subset, lr=torch.tensor([0.01]),
                                 soft_labels=torch.nn.functional.one_hot(subset.labels, 10).float())
    path = save_set(subset, run_dir / "set.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _set_item(name, index, value):
    def change(tensors, metadata):
        tensors[name].view(-1)[index] = value
    return change


def _relabel_temperature(text):
    def change(tensors, metadata):
        metadata["extra"] = json.dumps({**json.loads(metadata["extra"]), "relabel_temperature": text})
    return change


TAMPERED = [
    ("nan image", _set_item("images", 5, float("nan")), "'images' holds NaN or infinite values"),
    ("infinite image", _set_item("images", 0, float("-inf")), "'images' holds NaN or infinite values"),
    ("nan lr", _set_item("lr", 0, float("nan")), "'lr' must be a finite float > 0"),
    ("infinite lr", _set_item("lr", 0, float("inf")), "'lr' must be a finite float > 0"),
    ("negative lr", _set_item("lr", 0, -0.01), "'lr' must be a finite float > 0"),
    ("negative soft label", _set_item("soft_labels", 1, -0.5), "'soft_labels' must be float32 probabilities"),
    ("nan soft label", _set_item("soft_labels", 1, float("nan")), "'soft_labels' must be float32 probabilities"),
    ("soft labels not summing to 1", _set_item("soft_labels", 3, 4.0), "row 0 summing to 5"),
    ("integer soft labels", lambda tensors, metadata: tensors.update(soft_labels=tensors["soft_labels"].long()),
     "'soft_labels' must be float32 probabilities (finite, >= 0, each row summing to 1), got dtype torch.int64"),
    ("temperature 0", _relabel_temperature("0.0"), "metadata 'relabel_temperature' must be a finite number > 0"),
    ("temperature nan", _relabel_temperature("nan"), "metadata 'relabel_temperature' must be a finite number > 0"),
    ("std 0", lambda tensors, metadata: metadata.update(std="[0.0]"), "metadata 'std' must hold finite numbers > 0"),
]


@pytest.mark.parametrize("name, change, fragment", TAMPERED, ids=[case[0] for case in TAMPERED])
def test_evaluate_refuses_an_artefact_with_unusable_values_in_one_line(name, change, fragment, real, tmp_path,
                                                                      capsys):
    """Promise: bad input gets one line on stderr and exit status 2. An artefact with a NaN or infinite pixel, a
    learned lr that is not a finite number > 0, soft labels that are not probabilities, a relabelling
    temperature of 0 or a zero std trained and printed garbage with exit 0; now the loader refuses it, naming
    the file, the field and what is allowed."""
    path = _tampered_set(real, tmp_path, change)
    assert main(["evaluate", str(path), "--epochs", "1", "--runs", "1", "--model", "ConvNet-1-8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and f"artefact '{path}'" in err


def test_cmi_and_report_refuse_an_artefact_with_non_finite_images(real, tmp_path, capsys):
    """Promise: bad input gets one line on stderr and exit status 2, in every reader of an artefact: ``cmi`` and
    ``report`` refuse the set with a NaN pixel as ``evaluate`` does, before any work and writing nothing."""
    run = tmp_path / "run"
    path = _tampered_set(real, run, _set_item("images", 5, float("nan")))
    for argv in (["cmi", str(path), "--proxies", str(tmp_path / "pool")],
                 ["report", str(run), "--out", str(tmp_path / "report")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'images' holds NaN or infinite values" in err and str(path) in err, argv
    assert not (tmp_path / "report").exists()


# --- 3. Written files get the mode the umask allows, as open() gives them ----------------------------------------

@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(value)``), restoring the previous one afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_files_a_run_writes_have_the_mode_the_umask_allows(mask, umask, pull_method, real, tmp_path):
    """Promise: written files are as readable as a plain open() makes them (0666 less the umask). The temporary
    files behind atomic writes were created 0600 whatever the umask, so a shared results folder was unreadable
    to colleagues. Every file of a run (config, metrics, checkpoint, artefact, grid) must be 0666 & ~umask."""
    umask(mask)
    distill(DistillConfig(method="pull", iterations=2, **TINY), tmp_path / "run", progress=False, real=real)
    written = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "run").rglob("*") if path.is_file()}
    assert {"config.yaml", "metrics.jsonl", "checkpoint.safetensors", "set.safetensors", "set.png"} <= set(written)
    assert written == {name: 0o666 & ~mask for name in written}


def test_a_rewritten_file_keeps_its_mode(umask, real, tmp_path):
    """Promise: rewriting a file changes its content, not who may read it: a file the user made 0640 stays 0640
    when an atomic write replaces it (as open() for writing would leave it)."""
    from infodistill.artefact import save_set
    from infodistill.evaluate import random_subset

    umask(0o022)
    path = save_set(random_subset(real, 1, 0), tmp_path / "set.safetensors")
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o640)
    save_set(random_subset(real, 1, 1), path)
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- 4. One run per run directory; a fresh run does not overwrite files already there ---------------------------

PAUSE_AT_ITERATION_2 = """
import os, pathlib, time
gate = os.environ.get("FAULTS_GATE")
if gate:
    import importlib
    loop = importlib.import_module("infodistill.loop.checkpoint")
    original = loop.MetricsLog.write

    def write(self, iteration, values):
        original(self, iteration, values)
        if iteration == 2:  # after the checkpoint of iteration 2: say so, then wait for the test's go
            pathlib.Path(gate, "paused").write_text(str(os.getpid()))
            while not pathlib.Path(gate, "go").exists():
                time.sleep(0.05)

    loop.MetricsLog.write = write
"""
RUN = ["distill", "--method", "dm", "--ipc", "2", "--iterations", "4", "--model", "ConvNet-1-8", "--batch-real", "8",
       "--checkpoint-every", "2", "--quiet", "--precision", "fp32"]


def _files(run_dir) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}


def test_a_second_run_on_a_held_directory_is_refused_until_the_first_dies(striped_root, tmp_path, capsys):
    """Promise: nothing on disk is lost. While a run writes its directory (here paused after its checkpoint of
    iteration 2), a second ``distill`` on the same --out, fresh or --resume, must be refused in one line
    (exit 2) naming the holder, and leave every file of the first byte for byte. The lock is the OS's: once
    the first process is killed (SIGKILL, no clean-up of its own) the directory is free and --resume works."""
    gate, hooks, run = tmp_path / "gate", tmp_path / "hooks", tmp_path / "run"
    gate.mkdir()
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(PAUSE_AT_ITERATION_2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hooks), "FAULTS_GATE": str(gate)}
    first = subprocess.Popen([sys.executable, "-m", "infodistill", *RUN, "--out", str(run)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (gate / "paused").exists():  # no time limit of ours: pytest's own, or the run ending, stops it
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        before = _files(run)
        for extra in ([], ["--resume"]):
            assert main([*RUN, "--out", str(run), *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "in use by another run" in err and f"process {first.pid}" in err, err
        assert _files(run) == before
    finally:
        first.kill()
        first.wait()
    assert main([*RUN, "--out", str(run), "--resume"]) == 0
    assert (run / "set.safetensors").is_file()


@pytest.mark.parametrize("existing, fragment", [
    (["config.yaml"], "already holds config.yaml, which a new run would overwrite"),
    (["metrics.jsonl"], "already holds metrics.jsonl, which a new run would overwrite"),
    (["config.yaml", "metrics.jsonl"], "already holds config.yaml, metrics.jsonl, which"),
    (["set.safetensors"], "already holds a run (set.safetensors); pass --resume"),
    (["checkpoint.safetensors", "config.yaml"], "already holds a run (config.yaml, checkpoint.safetensors)"),
])
def test_a_fresh_run_refuses_a_directory_holding_files_it_would_overwrite(existing, fragment, striped_root,
                                                                          tmp_path, capsys):
    """Promise: nothing on disk is lost. A fresh (not --resume) run into a folder that holds a user's
    config.yaml or metrics.jsonl overwrote them with exit 0; now it is refused in one line naming the files,
    and they stay as they were."""
    run = tmp_path / "run"
    run.mkdir()
    for name in existing:
        (run / name).write_text(f"the user's own {name}\n")
    before = _files(run)
    assert main([*RUN, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and str(run) in err, err
    assert _files(run) == before


def test_a_run_interrupted_before_its_first_checkpoint_restarts_with_the_same_settings_only(real, tmp_path,
                                                                                            monkeypatch):
    """Promise kept for sweeps and continual runs, which restart a cell that has no checkpoint yet as a fresh run:
    the config.yaml and metrics.jsonl left by the same settings are the run's own and are replaced (the restarted
    run ends as an uninterrupted one), while a run with other settings is refused."""
    from conftest import run_killed_after_iteration

    config = DistillConfig(method="dm", iterations=3, **{**TINY, "checkpoint_every": 10})
    run_killed_after_iteration(1, config, tmp_path / "run", real, monkeypatch)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    with pytest.raises(UserInputError, match="already holds config.yaml, metrics.jsonl"):
        distill(DistillConfig(method="dm", iterations=3, seed=1, **{**TINY, "checkpoint_every": 10}),
                tmp_path / "run", progress=False, real=real)
    restarted = distill(config, tmp_path / "run", progress=False, real=real)
    whole = distill(config, tmp_path / "whole", progress=False, real=real)
    from infodistill.artefact import load_set

    assert torch.equal(load_set(restarted.artefact).images, load_set(whole.artefact).images)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()


def test_a_run_refused_after_the_lock_leaves_no_directory_behind(real, tmp_path):
    """Promise: bad input writes nothing. The lock creates the run directory; a run refused after taking it (here a
    proxy pool that does not exist) removes the folders it created, as before there was a lock."""
    config = DistillConfig(method="dm", iterations=2, cmi_weight=1.0, proxies=str(tmp_path / "no-pool"), **TINY)
    with pytest.raises(UserInputError):
        distill(config, tmp_path / "runs" / "run", progress=False, real=real)
    assert not (tmp_path / "runs").exists()


# --- 5. One boundary for user input: seeds, finite settings, a writable --out -----------------------------------

SEED_COMMANDS = {
    "baseline": ["baseline", "--ipc", "1", "--out", "{tmp}/b.safetensors"],
    "evaluate": ["evaluate", "{tmp}/s.safetensors", "--epochs", "1", "--runs", "1", "--model", "ConvNet-1-8"],
    "distill": ["distill", "--ipc", "1", "--iterations", "1", "--model", "ConvNet-1-8", "--out", "{tmp}/d"],
    "proxies": ["proxies", "--arch", "ConvNet-1-8", "--count", "1", "--epochs", "1", "--out", "{tmp}/p"],
    "experts": ["experts", "--model", "ConvNet-1-8", "--count", "1", "--epochs", "1", "--out", "{tmp}/e"],
    "continual": ["continual", "--ipc", "1", "--iterations", "1", "--epochs", "1", "--steps", "2", "--orders", "1",
                  "--model", "ConvNet-1-8", "--out", "{tmp}/c"],
    "theory": ["theory", "--quick", "--out", "{tmp}/t"],
}


@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**64)])
@pytest.mark.parametrize("command", sorted(SEED_COMMANDS))
def test_every_command_takes_seeds_in_0_to_2_63_minus_1_only(command, seed, striped_root, tmp_path, capsys):
    """Promise: bad input gets one line on stderr and exit status 2. A seed outside 0..2**63-1 gave a traceback
    (baseline 2**64, evaluate and continual -1) or was taken (distill, proxies, experts 2**63): every command now
    refuses it in the same line, before any work, writing nothing."""
    from infodistill.artefact import save_set
    from infodistill.data import load_dataset
    from infodistill.evaluate import random_subset

    save_set(random_subset(load_dataset("fashion-mnist"), 1, 0), tmp_path / "s.safetensors")
    before = sorted(path.name for path in tmp_path.iterdir())
    argv = [part.format(tmp=tmp_path) for part in SEED_COMMANDS[command]]
    assert main([*argv, "--seed", seed]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--seed must be an integer in 0..{2**63 - 1} (2**63-1), got {seed}" in err, err
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_the_largest_seed_is_taken(striped_root, tmp_path):
    """The boundary itself: seed 2**63-1 is a valid seed (a run with it writes its set)."""
    assert main(["baseline", "--ipc", "1", "--seed", str(2**63 - 1), "--out", str(tmp_path / "b.safetensors")]) == 0
    assert (tmp_path / "b.safetensors").is_file()


@pytest.mark.parametrize("argv, fragment", [
    (["distill", "--lr-images", "inf"], "config key 'lr_images': inf is not a finite number"),
    (["distill", "--lr-net", "nan"], "config key 'lr_net': nan is not a finite number"),
    (["distill", "--method", "mtt", "--experts", "x", "--zca", "inf"], "config key 'zca': inf is not a finite number"),
    (["distill", "--cmi-weight", "inf", "--proxies", "x"], "config key 'cmi_weight': inf is not a finite number"),
    (["evaluate", "{tmp}/s.safetensors", "--lr", "inf"], "config key 'lr': inf is not a finite number"),
])
def test_infinite_or_nan_rates_and_epsilons_are_refused(argv, fragment, striped_root, tmp_path, capsys):
    """Promise: bad input gets one line and exit status 2. An infinite or NaN learning rate, weight or ZCA
    epsilon was taken (and ran to garbage); every float setting must now be finite, from a flag or a YAML file."""
    argv = [part.format(tmp=tmp_path) for part in argv]
    out = tmp_path / "out" / ("e.json" if argv[0] == "evaluate" else "run")
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, fragment", [
    ("lr_images", float("inf"), "lr_images must be positive and finite, got inf"),
    ("lr_net", float("nan"), "lr_net must be positive and finite, got nan"),
    ("zca", float("inf"), "zca must be a finite number >= 0"),
    ("zca", float("nan"), "zca must be a finite number >= 0"),
    ("seed", 2**63, "seed must be an integer in 0.."),
])
def test_distill_config_validate_refuses_non_finite_settings_and_seeds(field, value, fragment):
    """The same boundary for the Python API (DistillConfig built directly, as sweeps and notebooks do)."""
    with pytest.raises(UserInputError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        DistillConfig(**{field: value}).validate()


@pytest.mark.parametrize("field, value, fragment", [
    ("lr", float("inf"), "lr must be positive and finite"), ("weight_decay", float("inf"), "weight_decay must be a"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number >= 0"), ("seed", -1, "seed must be an"),
])
def test_eval_config_validate_refuses_non_finite_settings_and_seeds(field, value, fragment):
    """The same boundary for evaluation settings given to the Python API."""
    from infodistill.training import EvalConfig

    with pytest.raises(UserInputError, match=fragment):
        EvalConfig(**{field: value}).validate()


def test_a_yaml_config_with_an_infinite_value_is_refused(tmp_path):
    """YAML spells infinity ``.inf`` and NaN ``.nan``: a config file cannot smuggle them in either."""
    from infodistill.config import build_config
    from infodistill.training import EvalConfig

    (tmp_path / "eval.yaml").write_text("lr: .inf\n")
    with pytest.raises(UserInputError, match="config key 'lr': inf is not a finite number"):
        build_config(EvalConfig, tmp_path / "eval.yaml")


OUT_COMMANDS = {
    "distill": (["distill", "--ipc", "1", "--iterations", "1", "--model", "ConvNet-1-8"], "folder"),
    "proxies": (["proxies", "--arch", "ConvNet-1-8", "--count", "1", "--epochs", "1"], "folder"),
    "experts": (["experts", "--model", "ConvNet-1-8", "--count", "1", "--epochs", "1"], "folder"),
    "theory": (["theory", "--quick"], "folder"),
    "report": (["report", "{tmp}/nowhere"], "folder"),
    "baseline": (["baseline", "--ipc", "1"], "file"),
}


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_an_out_that_is_a_file_or_lies_under_one_is_refused_before_any_work(command, striped_root, tmp_path, capsys):
    """Promise: bad input gets one line and exit status 2, before any work. An --out folder that is an existing file,
    or any --out under a file, gave a traceback after the work (or overwrote nothing but wasted it); now it is
    refused first, and the file stays as it was."""
    argv, kind = OUT_COMMANDS[command]
    argv = [part.format(tmp=tmp_path) for part in argv]
    blocker = tmp_path / "notes.txt"
    blocker.write_text("the user's notes\n")
    targets = [(blocker / ("x.safetensors" if kind == "file" else "run"), "which is a file, not a folder")]
    if kind == "folder":
        targets.append((blocker, "exists and is a file"))
    else:
        targets.append((tmp_path / "folder.safetensors", "exists and is a folder"))
        (tmp_path / "folder.safetensors").mkdir()
    for target, fragment in targets:
        assert main([*argv, "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err
    assert blocker.read_text() == "the user's notes\n"


def test_an_out_in_a_folder_this_user_cannot_write_is_refused(striped_root, tmp_path, capsys, monkeypatch):
    """Promise: one line and exit status 2 before any work, for an --out where no file can be created (a folder
    of mode 0500; run as root, which may write anywhere, the permission check is made to answer as for a user)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr("infodistill.files.os.access",
                            lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    try:
        for argv in (["distill", "--ipc", "1", "--iterations", "1", "--out", str(locked / "run")],
                     ["baseline", "--ipc", "1", "--out", str(locked / "set.safetensors")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"is not writable: this user cannot create files in '{locked}'" in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_a_checkpoint_without_its_optimiser_state_is_refused_on_resume(real, tmp_path, monkeypatch, capsys):
    """Promise: a resume continues the run exactly or is refused. DM steps the images with SGD momentum 0.5,
    so a checkpoint after two iterations must carry the momentum; one stripped of it would resume inexactly."""
    from safetensors.torch import save_file

    from conftest import run_killed_after_iteration

    config = DistillConfig(method="dm", model="ConvNet-1-8", batch_real=4, ipc=2, iterations=4, checkpoint_every=2)
    run_dir = tmp_path / "run"
    run_killed_after_iteration(2, config, run_dir, real, monkeypatch)
    checkpoint = run_dir / "checkpoint.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert any(key.startswith("momentum.") for key in tensors)  # what the stripped file lacks
    save_file({key: value for key, value in tensors.items() if not key.startswith(("momentum.", "optimizer."))},
              str(checkpoint), metadata=metadata)
    before = checkpoint.read_bytes()
    with pytest.raises(UserInputError, match="holds no optimiser state .* after 2 iterations"):
        distill(config, run_dir, resume=True, progress=False, real=real)
    assert checkpoint.read_bytes() == before and not (run_dir / "set.safetensors").exists()
