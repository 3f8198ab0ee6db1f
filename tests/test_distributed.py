"""Several processes: DM (+ CMI) split by class gives the one-process set, evaluation spread over processes gives
the same runs, a dead process ends the job with one clear line, bad process settings are refused (exit 2).

Runs in several processes start 2 gloo processes on CPU with ``infodistill ... --nproc 2`` (torchrun, standalone).
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from infodistill.cli import main
from infodistill.data import ClassSampler
from infodistill.errors import UserInputError
from infodistill.files import RunFiles
from infodistill.loop import (
    DistillConfig,
    RegularizerTerm,
    build_run_parts,
    distill,
    load_checkpoint,
    make_context,
    plan_split,
    run_iteration,
)
from infodistill.methods import METHOD_REGISTRY, register_method
from infodistill.methods.dm import DistributionMatching
from infodistill.parallel import partition, without_nproc
from infodistill.proxies import ProxyPool, train_proxy_pool
from infodistill.regularizers import CMIRegularizer

# fp32 given: the processes started here resolve 'auto' on this machine's CPU, the tests' own process as on a CPU
# without native bf16 (conftest.py).
TINY = ["--method", "dm", "--ipc", "2", "--iterations", "3", "--model", "ConvNet-1-8", "--batch-real", "8",
        "--checkpoint-every", "2", "--quiet", "--precision", "fp32"]


@pytest.fixture
def pool_dir(real, tmp_path):
    directory = tmp_path / "pool"
    train_proxy_pool(real, directory, arch="ConvNetGAP-1-8", count=2, epochs=1, progress=False)
    return directory


def run_command(*argv, env_extra=None, timeout=120):
    """``python -m infodistill ARGV`` in a subprocess (one thread per process: the tests share 2 cores). A run
    that hangs fails the test through ``timeout`` (subprocess.TimeoutExpired), not through a timing assert."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "infodistill", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def one_process(*argv):
    """The one-process run of a comparison, in a subprocess with one thread like each process of the split run:
    the kernels then sum in the same order (with other thread counts DSA's and MTT's sets differ by rounding,
    benchmarks/README.md)."""
    completed = run_command(*argv)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("classes, processes", [(10, 1), (10, 2), (10, 3), (10, 4), (7, 7), (3, 2)])
def test_partition_gives_contiguous_parts_differing_by_at_most_one(classes, processes):
    parts = partition(classes, processes)
    assert len(parts) == processes and all(parts)
    assert [c for part in parts for c in part] == list(range(classes))  # contiguous, in order, each class once
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("classes, processes, fragment", [(10, 11, "more than the 10 classes"),
                                                          (10, 0, "positive integer")])
def test_partition_refuses_too_many_or_no_processes(classes, processes, fragment):
    with pytest.raises(UserInputError, match=fragment):
        partition(classes, processes)


@pytest.mark.parametrize("method", ["dm", "dsa"])
def test_the_split_loss_and_its_gradients_add_up_to_the_whole_in_one_process(real, pool_dir, method):
    """The decomposition itself, without processes: per part of the classes, the method's loss + the CMI share;
    their sum is the whole loss, and each part's gradient on its own classes' images is the whole loss's gradient
    there (for gradient matching: each class matched with its own label, whatever part it is in)."""
    config = DistillConfig(method=method, ipc=3, iterations=1, model="ConvNet-1-8", batch_real=8, cmi_weight=100.0,
                           proxies=str(pool_dir), outer_loop=1 if method == "dsa" else None).with_method_defaults()
    images, labels = real.train_tensors()
    sampler = ClassSampler(images, labels, 10)
    pool = ProxyPool.load(pool_dir, real.info)

    def one_step(classes):
        parts = build_run_parts(config, real, sampler, torch.device("cpu"))
        parts.optimizer.param_groups[0]["lr"] = 0.0  # keep the images; read the gradient
        terms = [RegularizerTerm("cmi", CMIRegularizer(pool), 100.0)]
        context = make_context(config, 0, parts.synthetic, sampler, real, parts.augment, torch.device("cpu"),
                               classes=classes)
        logged = run_iteration(parts.method, terms, context, parts.optimizer)
        return logged, parts.synthetic.pixels.grad.clone()

    whole, whole_grad = one_step(None)
    split = [one_step(tuple(part)) for part in partition(10, 3)]
    for name in whole:
        assert sum(logged[name] for logged, _ in split) == pytest.approx(whole[name], rel=1e-5)
    for part, (_, grad) in zip(partition(10, 3), split):
        rows = slice(part[0] * 3, (part[-1] + 1) * 3)
        assert torch.equal(grad[rows], whole_grad[rows])
        outside = torch.ones(30, dtype=torch.bool)
        outside[rows] = False
        assert not grad[outside].any()


def test_two_processes_distil_dm_with_cmi_into_the_same_set_as_one(striped_root, pool_dir, tmp_path, capsys):
    argv = ["distill", *TINY, "--cmi-weight", "auto", "--proxies", pool_dir, "--monitor-every", "2"]
    one_process(*argv, "--out", tmp_path / "one")
    capsys.readouterr()
    completed = run_command(*argv, "--out", tmp_path / "two", "--nproc", "2", "--dist-timeout", "60")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("wrote") == 1  # rank 0 alone reports (and writes)

    one, two = RunFiles(tmp_path / "one"), RunFiles(tmp_path / "two")
    # Bit for bit: every class's images see the same network, real batches, DSA draws and proxy in both runs, and the
    # per-sample computations (instance-norm ConvNet, KL of a sample against its own class) do not depend on which
    # other classes share the forward pass; SGD's momentum acts per element. Measured equal on CPU.
    for name in ("artefact", "checkpoint"):
        a, b = load_file(str(getattr(one, name))), load_file(str(getattr(two, name)))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    with safe_open(str(one.artefact), "pt") as first, safe_open(str(two.artefact), "pt") as second:
        assert first.metadata() == second.metadata()
    with safe_open(str(two.checkpoint), "pt") as handle:
        assert handle.metadata()["processes"] == "2"
    assert yaml.safe_load(one.config.read_text()) == yaml.safe_load(two.config.read_text())  # same auto weight
    # Logged terms are sums over the processes: equal up to the order of float summation.
    lines_one = [json.loads(line) for line in one.metrics.read_text().splitlines()]
    lines_two = [json.loads(line) for line in two.metrics.read_text().splitlines()]
    assert [sorted(line) for line in lines_one] == [sorted(line) for line in lines_two]
    for a, b in zip(lines_one, lines_two):
        assert b == {key: pytest.approx(value, rel=1e-5) for key, value in a.items()}


def test_two_processes_evaluate_the_same_runs_as_one(striped_root, tmp_path, capsys):
    subset = tmp_path / "subset.safetensors"
    assert main(["baseline", "--ipc", "2", "--out", str(subset)]) == 0
    capsys.readouterr()
    argv = ["evaluate", str(subset), "--models", "ConvNet-1-8,ConvNet-1-4", "--runs", "2", "--epochs", "1",
            "--precision", "fp32"]
    assert main([*argv, "--out", str(tmp_path / "one.json")]) == 0
    printed_one = capsys.readouterr().out
    completed = run_command(*argv, "--out", tmp_path / "two.json", "--nproc", "2")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.replace("two.json", "X").replace("two.csv", "Y") == \
        printed_one.replace("one.json", "X").replace("one.csv", "Y")
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    for a, b in zip(one["results"], two["results"]):
        assert a["seeds"] == b["seeds"] and a["accuracies"] == b["accuracies"]
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()


DYING_RANK = """
import os
if os.environ.get("RANK") == "1":
    import importlib
    loop = importlib.import_module("infodistill.loop.run")  # where distill() looks run_iteration up
    original = loop.run_iteration

    def run_iteration(method, terms, context, *args, **kwargs):
        if context.iteration >= 2:  # rank 1 dies after iteration 1
            os._exit(1)
        return original(method, terms, context, *args, **kwargs)

    loop.run_iteration = run_iteration
"""


def test_a_process_that_dies_ends_the_run_with_one_clear_line(striped_root, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(DYING_RANK)  # imported by every process started with this PYTHONPATH
    # the others stop at once (torchrun), at worst after the collective timeout: well inside the subprocess timeout
    completed = run_command("distill", *TINY, "--iterations", "5", "--out", tmp_path / "run", "--nproc", "2",
                            "--dist-timeout", "20", env_extra={"PYTHONPATH": str(hooks)}, timeout=90)
    assert completed.returncode != 0
    last = completed.stderr.strip().splitlines()[-1]
    assert "rank 1 of 2 processes exited with status 1" in last and "Traceback" not in completed.stderr
    assert not (tmp_path / "run" / "set.safetensors").exists()
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), "pt") as handle:
        assert handle.metadata()["iteration"] == "2"  # the checkpoint of iteration 2 (both alive) is kept


@pytest.mark.parametrize("extra, environment, fragment", [
    (["--nproc", "11"], {}, "11 processes is more than the 10 classes"),
    (["--nproc", "0"], {}, "--nproc must be a positive integer, got 0"),
    (["--nproc", "2"], {"WORLD_SIZE": "2"}, "cannot be used under torchrun (WORLD_SIZE=2"),
    (["--nproc", "2", "--method", "mtt", "--experts", "x"], {},
     "2 processes is more than the 1 trajectories per iteration (--trajectories)"),
    (["--nproc", "3", "--method", "sre2l", "--teacher", "x"], {}, "3 processes is more than the 2 images per class"),
    (["--nproc", "2", "--method", "sre2l", "--teacher", "x", "--cmi-weight", "1", "--proxies", "x"], {},
     "the CMI regularizer needs every image of a class"),
    (["--nproc", "2", "--method", "sre2l", "--teacher", "x", "--param", "multi"], {}, "needs param 'pixels'"),
    (["--nproc", "2", "--model", "ConvNet-1-8-bn"], {}, "batch-norm network"),
    (["--nproc", "2", "--mim-weight", "1"], {}, "MIM regularizer does not split"),
    (["--nproc", "2", "--dist-timeout", "0"], {}, "--dist-timeout must be a positive number"),
])
def test_bad_process_settings_exit_2_with_one_line_and_write_nothing(striped_root, tmp_path, capsys, monkeypatch,
                                                                     extra, environment, fragment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    base = list(TINY)
    if "--method" in extra and extra[extra.index("--method") + 1] in ("mtt", "sre2l"):  # they read no real batch
        index = base.index("--batch-real")
        del base[index:index + 2]
    assert main(["distill", *base, "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_more_processes_than_jobs(striped_root, tmp_path, capsys):
    subset = tmp_path / "subset.safetensors"
    assert main(["baseline", "--ipc", "2", "--out", str(subset)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(subset), "--runs", "2", "--nproc", "3", "--out", str(tmp_path / "e.json")]) == 2
    assert "3 processes is more than the 2 (model, run) jobs" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_nproc_is_removed_from_the_command_the_processes_rerun():
    assert without_nproc(["distill", "--nproc", "2", "--ipc", "3"]) == ["distill", "--ipc", "3"]
    assert (without_nproc(["evaluate", "s.safetensors", "--nproc=4", "--json"])
            == ["evaluate", "s.safetensors", "--json"])
    assert without_nproc(["distill", "--npr", "2"]) == ["distill"]  # an abbreviation argparse accepts


def test_plan_divides_each_method_by_its_own_unit(striped_root):
    assert plan_split(DistillConfig(method="dm", model="ConvNet-1-8"), 3, 10) == ("classes", [[0, 1, 2, 3], [4, 5, 6],
                                                                                         [7, 8, 9]])
    assert plan_split(DistillConfig(method="dsa"), 2, 10) == ("classes", [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    assert plan_split(DistillConfig(method="sre2l", teacher="t", ipc=5), 2, 10) == ("images", [[0, 1, 2], [3, 4]])
    assert plan_split(DistillConfig(method="datm", experts="e", trajectories=4), 3, 10) == \
        ("trajectories", [[0, 1], [2], [3]])
    assert plan_split(DistillConfig(method="idc"), 4, 10) == ("classes", [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]])

    @register_method("dm-one-process")
    class OneProcess(DistributionMatching):
        process_split = None

    try:
        with pytest.raises(UserInputError, match="method 'dm-one-process' does not split over processes yet; in 2 "
                                                 "processes the supported methods are: datm, dc, dm, dsa, dwa, idc, "
                                                 "mtt, sre2l; run it in one process"):
            plan_split(DistillConfig(method="dm-one-process"), 2, 10)
    finally:
        METHOD_REGISTRY.pop("dm-one-process")


def test_a_method_tied_to_its_process_count_refuses_another_on_resume(real, tmp_path):
    @register_method("dm-fixed-processes")
    class FixedProcesses(DistributionMatching):
        resumable_with_other_process_count = False

    try:
        config = DistillConfig(method="dm-fixed-processes", ipc=2, iterations=2, model="ConvNet-1-8", batch_real=8,
                               checkpoint_every=2)
        distill(config, tmp_path / "run", progress=False, real=real)
        files = RunFiles(tmp_path / "run")
        before = files.checkpoint.read_bytes()
        images, labels = real.train_tensors()
        parts = build_run_parts(config.with_method_defaults(), real, ClassSampler(images, labels, 10),
                                torch.device("cpu"), fresh=False)
        with pytest.raises(UserInputError, match="must resume with the 1 process"):
            load_checkpoint(files, parts.synthetic, parts.optimizer, config.with_method_defaults(), processes=2)
        assert files.checkpoint.read_bytes() == before
    finally:
        METHOD_REGISTRY.pop("dm-fixed-processes")


def _same_files(one, two, names=("artefact", "checkpoint")):
    for name in names:
        a, b = load_file(str(getattr(one, name))), load_file(str(getattr(two, name)))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


def test_two_processes_distil_dsa_with_cmi_into_the_same_set_as_one(striped_root, pool_dir, tmp_path, capsys):
    """DSA split by class: each process matches its classes' gradients; before every network-training phase the
    processes exchange their rows, so each trains the same network on the whole current set."""
    argv = ["distill", "--method", "dsa", "--ipc", "2", "--iterations", "2", "--model", "ConvNet-1-8",
            "--batch-real", "8", "--outer-loop", "3", "--inner-loop", "1", "--checkpoint-every", "1", "--quiet",
            "--cmi-weight", "10", "--proxies", pool_dir]
    one_process(*argv, "--out", tmp_path / "one")
    capsys.readouterr()
    completed = run_command(*argv, "--out", tmp_path / "two", "--nproc", "2", "--dist-timeout", "60")
    assert completed.returncode == 0, completed.stderr
    _same_files(RunFiles(tmp_path / "one"), RunFiles(tmp_path / "two"))  # measured bit for bit on CPU


def test_two_processes_distil_idc_with_cmi_into_the_same_set_as_one(striped_root, pool_dir, tmp_path, capsys):
    """IDC split by class: its per-class updates run in sequence, each an optimiser step over the whole set; a
    process takes the other classes' steps with a zero gradient (so momentum moves its own images as in one
    process) after making their random draws, the CMI term's proxy draw included."""
    argv = ["distill", "--method", "idc", "--ipc", "2", "--iterations", "2", "--model", "ConvNet-1-8",
            "--batch-real", "8", "--outer-loop", "2", "--net-steps", "1", "--batch-net", "16", "--checkpoint-every",
            "1", "--quiet", "--cmi-weight", "10", "--proxies", pool_dir]
    one_process(*argv, "--out", tmp_path / "one")
    capsys.readouterr()
    completed = run_command(*argv, "--out", tmp_path / "two", "--nproc", "2", "--dist-timeout", "60")
    assert completed.returncode == 0, completed.stderr
    one, two = RunFiles(tmp_path / "one"), RunFiles(tmp_path / "two")
    _same_files(one, two)  # measured bit for bit on CPU
    lines_one = [json.loads(line) for line in one.metrics.read_text().splitlines()]
    lines_two = [json.loads(line) for line in two.metrics.read_text().splitlines()]
    for a, b in zip(lines_one, lines_two):
        assert b == {key: pytest.approx(value, rel=1e-5) for key, value in a.items()}


@pytest.fixture
def teacher_dir(real, tmp_path):
    directory = tmp_path / "teacher"
    train_proxy_pool(real, directory, arch="ConvNet-2-8-bn", count=1, epochs=1, progress=False)
    return directory


def test_two_processes_recover_dwa_into_the_same_set_as_one(striped_root, teacher_dir, tmp_path, capsys):
    """DWA split by image position: process r recovers batches parts[r] (the j-th image of every class) against
    their own perturbed teachers, computed only there; rank 0 relabels the gathered set."""
    argv = ["distill", "--method", "dwa", "--teacher", teacher_dir, "--ipc", "3", "--iterations", "3",
            "--dwa-steps", "2", "--checkpoint-every", "2", "--quiet"]
    one_process(*argv, "--out", tmp_path / "one")
    capsys.readouterr()
    completed = run_command(*argv, "--out", tmp_path / "two", "--nproc", "2", "--dist-timeout", "60")
    assert completed.returncode == 0, completed.stderr
    one, two = RunFiles(tmp_path / "one"), RunFiles(tmp_path / "two")
    _same_files(one, two)  # measured bit for bit on CPU (soft labels included)
    assert "soft_labels" in load_file(str(two.artefact))


@pytest.fixture
def experts_dir(real, tmp_path):
    from infodistill.experts import train_experts

    directory = tmp_path / "experts"
    train_experts(real, directory, model="ConvNet-1-8", count=2, epochs=4, batch_size=64, progress=False)
    return directory


def test_mtt_trajectories_average_independent_streams_and_one_is_unchanged(real, experts_dir):
    """T trajectories per iteration: the loss is the mean of T single-trajectory losses, trajectory k drawing from
    its own stream (k = 0: the iteration's generator, so T = 1 is the published one-trajectory MTT)."""
    config = DistillConfig(method="mtt", ipc=2, iterations=1, model="ConvNet-1-8", experts=str(experts_dir),
                           syn_steps=2, expert_epochs=2, max_start_epoch=2, trajectories=3).with_method_defaults()
    images, labels = real.train_tensors()
    sampler = ClassSampler(images, labels, 10)
    parts = build_run_parts(config, real, sampler, torch.device("cpu"))
    context = make_context(config, 5, parts.synthetic, sampler, real, parts.augment, torch.device("cpu"))
    mean = next(parts.method.iteration(context))
    singles = [parts.method.trajectory_distance(context_k, context_k.trajectory_generator(k))
               for k in range(3)
               for context_k in [make_context(config, 5, parts.synthetic, sampler, real, parts.augment,
                                              torch.device("cpu"))]]
    assert float(mean.detach()) == pytest.approx(float(sum(singles).detach() / 3), rel=1e-6)
    assert len({round(float(value.detach()), 8) for value in singles}) == 3  # three different trajectories
    one = dataclasses.replace(config, trajectories=1)
    parts_one = build_run_parts(one, real, sampler, torch.device("cpu"))
    first = next(parts_one.method.iteration(make_context(one, 5, parts_one.synthetic, sampler, real,
                                                         parts_one.augment, torch.device("cpu"))))
    assert torch.equal(first.detach(), singles[0].detach())


def test_two_processes_split_mtt_trajectories_into_the_one_process_set(striped_root, experts_dir, pool_dir,
                                                                        tmp_path, capsys):
    """MTT split by trajectory: each process computes the gradient of its trajectories, the gradients are summed
    (all-reduce), and every process steps the whole set; CMI is added once, by rank 0."""
    argv = ["distill", "--method", "mtt", "--experts", experts_dir, "--ipc", "2", "--iterations", "3",
            "--model", "ConvNet-1-8", "--syn-steps", "2", "--expert-epochs", "2", "--max-start-epoch", "2",
            "--trajectories", "2", "--checkpoint-every", "2", "--cmi-weight", "1", "--proxies", pool_dir, "--quiet"]
    one_process(*argv, "--out", tmp_path / "one")
    capsys.readouterr()
    completed = run_command(*argv, "--out", tmp_path / "two", "--nproc", "2", "--dist-timeout", "60")
    assert completed.returncode == 0, completed.stderr
    one, two = RunFiles(tmp_path / "one"), RunFiles(tmp_path / "two")
    # The one-process gradient is the autograd sum of the two trajectories' gradients, the two-process one their
    # all-reduce sum: the same two numbers added, in an order that may differ; equal within float rounding.
    for name in ("artefact", "checkpoint"):
        a, b = load_file(str(getattr(one, name))), load_file(str(getattr(two, name)))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    lines_one = [json.loads(line) for line in one.metrics.read_text().splitlines()]
    lines_two = [json.loads(line) for line in two.metrics.read_text().splitlines()]
    for a, b in zip(lines_one, lines_two):
        assert b == {key: pytest.approx(value, rel=1e-5) for key, value in a.items()}


def test_a_run_split_by_image_resumes_in_another_process_count(striped_root, teacher_dir, tmp_path, capsys):
    """SRe2L (Adam, split by image): 2 iterations in 2 processes, then resumed to 4 in one process, gives the set of
    4 uninterrupted iterations in one process: the checkpoint holds the whole set and Adam's state."""
    argv = ["distill", "--method", "sre2l", "--teacher", teacher_dir, "--ipc", "2", "--lr-schedule", "constant",
            "--checkpoint-every", "2", "--quiet"]
    one_process(*argv, "--iterations", "4", "--out", tmp_path / "straight")
    completed = run_command(*argv, "--iterations", "2", "--out", tmp_path / "split", "--nproc", "2",
                               "--dist-timeout", "60")
    assert completed.returncode == 0, completed.stderr
    with safe_open(str(tmp_path / "split" / "checkpoint.safetensors"), "pt") as handle:
        assert handle.metadata()["processes"] == "2"
    capsys.readouterr()
    one_process(*argv, "--iterations", "4", "--out", tmp_path / "split", "--resume")
    _same_files(RunFiles(tmp_path / "straight"), RunFiles(tmp_path / "split"), names=("artefact",))
