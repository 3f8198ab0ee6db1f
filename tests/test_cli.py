"""The command line: the baseline -> evaluate flow, and one clear line with exit status 2 for bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import needs_real_fashion_mnist
from infodistill.artefact import load_set
from infodistill.cli import main

FAST = ["--model", "ConvNet-1-8", "--runs", "2", "--epochs", "2"]


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_baseline_then_evaluate(striped_root, tmp_path, capsys):
    out = tmp_path / "runs" / "set.safetensors"
    code, stdout, _ = run(capsys, "baseline", "--ipc", "4", "--seed", "3", "--out", str(out), "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["images"] == 40 and (tmp_path / "runs" / "set.png").is_file()
    distilled = load_set(out)
    assert torch.bincount(distilled.labels).tolist() == [4] * 10
    assert distilled.metadata.method == "random" and distilled.metadata.seed == 3

    code, stdout, _ = run(capsys, "evaluate", str(out), *FAST, "--json")
    assert code == 0
    result = json.loads(stdout)
    assert len(result["accuracies"]) == 2 and result["test_size"] == 100
    assert result["labels"] == "hard" and result["augmentation"] == "dsa" and result["epochs"] == 2
    assert result["mean"] == pytest.approx(sum(result["accuracies"]) / 2)

    code, stdout, _ = run(capsys, "evaluate", str(out), *FAST)
    assert code == 0 and "+-" in stdout and "per run:" in stdout


@needs_real_fashion_mnist
def test_real_fashion_mnist_is_found_without_configuration(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INFODISTILL_DATA", str(tmp_path / "empty-root"))
    out = tmp_path / "real.safetensors"
    assert run(capsys, "baseline", "--dataset", "fashion-mnist", "--ipc", "2", "--out", str(out))[0] == 0
    code, stdout, _ = run(capsys, "evaluate", str(out), "--model", "ConvNet-1-8", "--runs", "1", "--epochs", "1",
                          "--json")
    assert code == 0 and json.loads(stdout)["test_size"] == 10000


@pytest.fixture
def good_set(striped_root, tmp_path, capsys):
    path = tmp_path / "good.safetensors"
    assert main(["baseline", "--ipc", "2", "--out", str(path)]) == 0
    capsys.readouterr()
    return path


def wrong_shape_set(path):
    save_file({"images": torch.zeros(10, 3, 32, 32), "labels": torch.arange(10)}, str(path),
              metadata={"dataset": "fashion-mnist", "mean": "[0.5, 0.5, 0.5]", "std": "[0.2, 0.2, 0.2]",
                        "classes": json.dumps([str(i) for i in range(10)]), "method": "x", "ipc": "1", "seed": "0"})
    return path


@pytest.mark.parametrize(
    "make_argv, fragment",
    [
        (lambda d, g: ["baseline", "--dataset", "imagenet-22k", "--ipc", "1", "--out", str(d / "o.safetensors")],
         "imagenet-22k"),
        (lambda d, g: ["baseline", "--ipc", "0", "--out", str(d / "o.safetensors")], "--ipc"),
        (lambda d, g: ["baseline", "--ipc", "31", "--out", str(d / "o.safetensors")], "31"),
        (lambda d, g: ["evaluate", str(d / "absent.safetensors")], "does not exist"),
        (lambda d, g: ["evaluate", str(g), "--model", "ConvNet-x"], "ConvNet-x"),
        (lambda d, g: ["evaluate", str(g), "--model", "ConvNet-6"], "28x28"),
        (lambda d, g: ["evaluate", str(g), "--runs", "0"], "runs must be a positive integer, got 0"),
        (lambda d, g: ["evaluate", str(g), "--epochs", "-3"], "got -3"),
        (lambda d, g: ["evaluate", str(g), "--device", "tpu"], "tpu"),
        (lambda d, g: ["evaluate", str(wrong_shape_set(d / "rgb.safetensors"))], "3x32x32"),
        (lambda d, g: ["evaluate", str(g), "--dataset", "cifar10"], "cifar10"),
    ],
)
def test_bad_input_gives_one_line_and_status_2(good_set, tmp_path, capsys, make_argv, fragment):
    code, stdout, stderr = run(capsys, *make_argv(tmp_path, good_set))
    assert code == 2
    assert fragment in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_truncated_and_foreign_artefacts(good_set, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good_set.read_bytes()[:100])
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_text("not a tensor file at all")
    for path in (truncated, foreign):
        code, _, stderr = run(capsys, "evaluate", str(path))
        assert code == 2 and str(path) in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["evaluate", "X", "--augment", "mixup"],
                                  ["baseline", "--ipc", "x", "--out", "a.safetensors"],
                                  ["baseline", "--ipc", "1", "--out", "a.pt"], ["frobnicate"],
                                  ["evaluate", "X", "--bogus"]])
def test_flag_errors_are_one_line_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bad_input_leaves_existing_files_untouched(good_set, capsys):
    before = good_set.read_bytes(), good_set.with_suffix(".png").read_bytes()
    for argv in (["--ipc", "0"], ["--ipc", "31"], ["--dataset", "nope", "--ipc", "1"]):
        assert main(["baseline", *argv, "--out", str(good_set)]) == 2
    assert (good_set.read_bytes(), good_set.with_suffix(".png").read_bytes()) == before
    assert sorted(p.name for p in good_set.parent.iterdir() if p.name.startswith(".")) == []


def test_console_entry_point_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "INFODISTILL_DATA": str(tmp_path)}
    completed = subprocess.run([sys.executable, "-m", "infodistill", "evaluate", str(tmp_path / "none.safetensors")],
                               capture_output=True, text=True, env=env)
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0 and "does not exist" in completed.stderr
    helped = subprocess.run([sys.executable, "-m", "infodistill", "evaluate", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--epochs" in helped.stdout


DISTILL_FAST = ["--model", "ConvNet-2-16", "--batch-real", "16", "--ipc", "2", "--checkpoint-every", "2"]


def test_proxies_distill_with_cmi_resume_and_cmi_report(striped_root, tmp_path, capsys):
    pool = tmp_path / "pool"
    code, stdout, _ = run(capsys, "proxies", "--arch", "ConvNetGAP-1-8", "--count", "2", "--epochs", "1",
                          "--out", str(pool), "--json")
    assert code == 0 and len(json.loads(stdout)["proxies"]) == 2
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "distill", "--method", "dm", *DISTILL_FAST, "--iterations", "2",
                          "--cmi-weight", "auto", "--proxies", str(pool), "--out", str(out), "--quiet", "--json")
    assert code == 0
    first = json.loads(stdout)
    assert first["regularizer_weights"]["cmi"] > 0 and first["config"]["cmi_weight"] == "auto"
    # extend the finished run by two iterations: only the flag that changes is needed
    code, stdout, _ = run(capsys, "distill", "--out", str(out), "--resume", "--iterations", "4", "--quiet", "--json")
    assert code == 0 and json.loads(stdout)["iterations"] == 4
    assert json.loads(stdout)["regularizer_weights"] == first["regularizer_weights"]
    code, stdout, _ = run(capsys, "cmi", str(out / "set.safetensors"), "--proxies", str(pool), "--json")
    report = json.loads(stdout)
    assert code == 0 and report["pool_size"] == 2 and report["mean"] > 0
    assert report["mean"] == pytest.approx(sum(report["per_proxy"]) / 2)


def test_ipc_1_with_cmi_warns_that_the_term_is_zero(striped_root, tmp_path, capsys, caplog):
    pool = tmp_path / "pool"
    assert main(["proxies", "--arch", "ConvNetGAP-1-8", "--count", "1", "--epochs", "1", "--out", str(pool)]) == 0
    code, _, _ = run(capsys, "distill", "--method", "dm", "--model", "ConvNet-2-16", "--batch-real", "8",
                     "--ipc", "1", "--iterations", "1", "--cmi-weight", "5", "--proxies", str(pool),
                     "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0 and "identically 0 at ipc 1" in caplog.text


@pytest.mark.parametrize(
    "argv, fragment",
    [(["--cmi-weight", "-2", "--proxies", "p"], "got -2.0"),
     (["--cmi-weight", "much", "--proxies", "p"], "'much'"),
     (["--cmi-weight", "100"], "needs a proxy pool"),
     (["--method", "sorcery"], "unknown method 'sorcery'"),
     (["--proxies", "absent-pool", "--cmi-weight", "1"], "absent-pool"),
     (["--ipc", "31"], "31")],
)
def test_distill_bad_input(striped_root, tmp_path, capsys, argv, fragment):
    code, _, stderr = run(capsys, "distill", "--method", "dm", "--iterations", "1", "--out", str(tmp_path / "run"),
                          "--quiet", *argv)
    assert code == 2 and fragment in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text, fragment", [("ipc: 2\nlearning_rate: 3\n", "unknown key 'learning_rate'"),
                                            ("ipc: two\n", "'two' is not an integer")])
def test_distill_config_file_errors(striped_root, tmp_path, capsys, text, fragment):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    code, _, stderr = run(capsys, "distill", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2 and fragment in stderr


def test_teacher_relabel_flow_sre2l_then_evaluate_with_the_kd_recipe(striped_root, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    code, _, _ = run(capsys, "proxies", "--arch", "ConvNet-1-8-bn", "--count", "1", "--epochs", "1",
                     "--out", str(teacher), "--json")
    assert code == 0
    code, _, stderr = run(capsys, "distill", "--method", "dwa", "--ipc", "2", "--iterations", "2", "--teacher",
                          str(teacher), "--out", str(tmp_path / "dwa"), "--quiet")
    assert code == 0, stderr
    distilled = load_set(tmp_path / "dwa" / "set.safetensors")
    assert distilled.soft_labels is not None and distilled.metadata.extra["relabel_temperature"] == "30.0"
    code, stdout, _ = run(capsys, "evaluate", str(tmp_path / "dwa" / "set.safetensors"), *FAST)
    assert code == 0 and "KD recipe (AdamW lr 0.001, cosine, temperature 30)" in stdout


@pytest.mark.parametrize(
    "argv, fragment",
    [(["--method", "sre2l"], "method 'sre2l' needs a teacher: pass --teacher DIR"),
     (["--method", "sre2l", "--teacher", "{plain}"], "needs a teacher with batch-norm layers, but the teacher"),
     (["--method", "sre2l", "--teacher", "{plain}", "--mim-weight", "1"], "mim_weight 1 needs real data"),
     (["--method", "dwa", "--teacher", "{plain}", "--init", "noise"], "needs init 'real'"),
     (["--method", "sre2l", "--teacher", "{plain}", "--zca", "0.1"], "zca 0.1 does not apply to method 'sre2l'"),
     (["--method", "dm", "--teacher", "{plain}"], "teacher does not apply to method 'dm'; it applies to: dwa, sre2l"),
     (["--method", "dm", "--mim-weight", "-1"], "mim_weight must be a finite number >= 0"),
     (["--method", "dm", "--mim-weight", "1", "--mim-temperature", "0"], "mim_temperature must be positive")],
)
def test_seed_method_bad_input_is_one_line_with_status_2_and_writes_nothing(striped_root, tmp_path, capsys, argv,
                                                                            fragment):
    plain = tmp_path / "plain"
    if "{plain}" in argv:
        run(capsys, "proxies", "--arch", "ConvNetGAP-1-8", "--count", "1", "--epochs", "1", "--out", str(plain),
            "--json")
    argv = [str(plain) if value == "{plain}" else value for value in argv]
    code, _, stderr = run(capsys, "distill", *argv, "--ipc", "2", "--iterations", "1", "--quiet",
                          "--out", str(tmp_path / "run"))
    assert code == 2 and fragment in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run").exists()


def test_a_random_subset_relabelled_by_the_teacher_is_the_fair_baseline_of_a_relabelled_set(striped_root, tmp_path,
                                                                                            capsys):
    from infodistill.data import load_dataset
    from infodistill.evaluate import random_subset
    from infodistill.proxies import ProxyPool

    teacher = tmp_path / "teacher"
    run(capsys, "proxies", "--arch", "ConvNet-1-8-bn", "--count", "1", "--epochs", "1", "--out", str(teacher), "--json")
    out = tmp_path / "random-kd.safetensors"
    code, _, _ = run(capsys, "baseline", "--ipc", "2", "--teacher", str(teacher), "--relabel-temperature", "4",
                     "--out", str(out))
    assert code == 0
    relabelled = load_set(out)
    real = load_dataset("fashion-mnist")
    subset = random_subset(real, 2, 0)
    assert torch.equal(relabelled.images, subset.images) and torch.equal(relabelled.labels, subset.labels)
    network = ProxyPool.load(teacher, real.info)[0]
    with torch.no_grad():
        expected = torch.softmax(network(subset.images) / 4.0, dim=1)  # written independently of the library
    torch.testing.assert_close(relabelled.soft_labels, expected)
    assert relabelled.metadata.extra["relabel_temperature"] == "4.0"
    code, stdout, _ = run(capsys, "evaluate", str(out), *FAST)
    assert code == 0 and "KD recipe" in stdout and "temperature 4" in stdout
    code, _, stderr = run(capsys, "baseline", "--ipc", "2", "--teacher", str(teacher), "--relabel-temperature", "0",
                          "--out", str(tmp_path / "bad.safetensors"))
    assert code == 2 and "--relabel-temperature must be positive, got 0.0" in stderr
    assert not (tmp_path / "bad.safetensors").exists()
