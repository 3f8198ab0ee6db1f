"""MTT and DATM through the shared loop: experts, learned step size, soft labels, resume, bad input."""

import dataclasses

import pytest
import torch

from infodistill.artefact import load_set
from infodistill.cli import main as cli_main
from infodistill.errors import UserInputError
from infodistill.evaluate import evaluate_set
from infodistill.experts import ExpertTrajectories, train_experts
from infodistill.loop import DistillConfig, distill
from infodistill.methods import DifficultyAlignedMatching, MethodSetup
from infodistill.models import build_model
from infodistill.synthetic import build_synthetic
from infodistill.training import EvalConfig

MODEL = "ConvNet-1-8"


@pytest.fixture
def experts_dir(real, tmp_path):
    directory = tmp_path / "experts"
    train_experts(real, directory, model=MODEL, count=2, epochs=4, batch_size=64, progress=False)
    return directory


def _config(method, experts_dir, **overrides):
    settings = dict(method=method, ipc=2, iterations=3, model=MODEL, experts=experts_dir and str(experts_dir),
                    syn_steps=2, expert_epochs=2, max_start_epoch=2, lr_images=100.0, checkpoint_every=2)
    return DistillConfig(**{**settings, **overrides})


def test_mtt_learns_the_images_and_a_step_size_that_evaluation_uses(real, experts_dir, tmp_path):
    result = distill(_config("mtt", experts_dir), tmp_path / "mtt", progress=False, real=real)
    distilled = load_set(result.artefact)
    assert distilled.soft_labels is None
    assert distilled.lr is not None and float(distilled.lr) > 0
    assert float(distilled.lr) != pytest.approx(0.01, abs=1e-9)  # it moved from the experts' rate
    evaluation = evaluate_set(distilled, real, EvalConfig(model=MODEL, runs=1, epochs=1), progress=False)
    assert evaluation.learned_lr and evaluation.lr == pytest.approx(float(distilled.lr))
    assert "learned lr" in evaluation.summary()


def test_datm_soft_labels_stay_normalised_and_are_used_by_evaluation(real, experts_dir, tmp_path):
    result = distill(_config("datm", experts_dir, lr_labels=50.0), tmp_path / "datm", progress=False, real=real)
    distilled = load_set(result.artefact)
    soft = distilled.soft_labels
    assert soft.shape == (20, 10)
    assert bool((soft >= 0).all())
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(20))
    assert distilled.metadata.extra["ema_decay"] == "0.999"
    evaluation = evaluate_set(distilled, real, EvalConfig(model=MODEL, runs=1, epochs=1), progress=False)
    assert evaluation.labels == "soft" and "soft labels" in evaluation.summary()


def test_datm_initial_labels_are_the_mean_logits_of_the_experts_that_are_right(real, experts_dir):
    images, labels = real.train_tensors()
    from infodistill.data import ClassSampler

    sampler = ClassSampler(images, labels, 10)
    synthetic = build_synthetic("pixels", sampler, 2, "noise", torch.Generator().manual_seed(0))
    method = DifficultyAlignedMatching(experts=str(experts_dir), ipc=2, max_start_epoch=2, expert_epochs=2)
    method.prepare(MethodSetup(synthetic, sampler, real.info, torch.device("cpu"), MODEL,
                               torch.Generator().manual_seed(1), fresh=True, init="noise"))
    trajectories = ExpertTrajectories.load(experts_dir, real.info)
    per_expert = []
    for expert in range(len(trajectories)):
        network = build_model(MODEL, 1, 10, (28, 28), seed=0)
        torch.nn.utils.vector_to_parameters(trajectories.weights(expert, trajectories.epochs), network.parameters())
        with torch.no_grad():
            per_expert.append(network(synthetic.images()))
    expected = []
    for position, label in enumerate(synthetic.labels.tolist()):
        right = [logits[position] for logits in per_expert if int(logits[position].argmax()) == label]
        chosen = right or [logits[position] for logits in per_expert]
        expected.append(torch.stack(chosen).mean(dim=0))
    torch.testing.assert_close(method.label_logits.detach(), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_datm_window_grows_from_its_start_bound_to_the_maximum():
    method = DifficultyAlignedMatching(ipc=10, min_start_epoch=0, max_start_epoch=40, window_start_max=20,
                                       window_growth_iterations=100)
    assert [method.start_epoch_bound(it) for it in (0, 50, 99, 100, 500)] == [20, 30, 39, 40, 40]


def test_a_killed_datm_run_resumes_bit_identical(real, experts_dir, tmp_path):
    config = _config("datm", experts_dir, iterations=4)
    whole = load_set(distill(config, tmp_path / "whole", progress=False, real=real).artefact)
    distill(dataclasses.replace(config, iterations=2), tmp_path / "split", progress=False, real=real)
    resumed = load_set(distill(config, tmp_path / "split", resume=True, progress=False, real=real).artefact)
    assert torch.equal(whole.images, resumed.images)
    assert torch.equal(whole.soft_labels, resumed.soft_labels)
    assert torch.equal(whole.lr, resumed.lr)


@pytest.mark.parametrize("memory", ["full", "checkpoint"])
def test_memory_modes_give_the_same_run(real, experts_dir, tmp_path, memory):
    result = distill(_config("mtt", experts_dir, iterations=2, memory=memory), tmp_path / memory, progress=False,
                     real=real)
    reference = distill(_config("mtt", experts_dir, iterations=2), tmp_path / f"{memory}-ref", progress=False,
                        real=real)
    torch.testing.assert_close(load_set(result.artefact).images, load_set(reference.artefact).images)


def test_bad_trajectory_settings_are_refused_by_name(real, experts_dir, tmp_path):
    with pytest.raises(UserInputError, match="model"):
        distill(_config("mtt", experts_dir, model="ConvNet-2-8"), tmp_path / "a", progress=False, real=real)
    with pytest.raises(UserInputError, match="trained for 4 epochs"):
        distill(_config("mtt", experts_dir, max_start_epoch=4), tmp_path / "b", progress=False, real=real)
    with pytest.raises(UserInputError, match="lr_labels does not apply to method 'mtt'; it applies to: datm"):
        _config("mtt", experts_dir, lr_labels=1.0).validate()
    with pytest.raises(UserInputError, match="needs expert trajectories"):
        distill(_config("mtt", None), tmp_path / "c", progress=False, real=real)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_cli_refuses_bad_trajectory_input_with_exit_2(striped_root, experts_dir, tmp_path, capsys):
    base = ["distill", "--method", "mtt", "--ipc", "2", "--model", MODEL, "--iterations", "1", "--quiet"]
    assert cli_main(base + ["--experts", str(experts_dir), "--lr-labels", "1", "--out", str(tmp_path / "x")]) == 2
    assert cli_main(base + ["--experts", str(experts_dir), "--max-start-epoch", "9", "--out", str(tmp_path / "y")]) == 2
    assert cli_main(base + ["--out", str(tmp_path / "z")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    assert "lr_labels" in errors[0] and "max_start_epoch 9" in errors[1] and "--experts" in errors[2]
    assert not any((tmp_path / name).exists() for name in "xyz")


def test_the_learned_step_size_is_projected_onto_positive_values(real, experts_dir):
    from infodistill.data import ClassSampler
    from infodistill.loop import build_method, make_context

    config = _config("mtt", experts_dir).with_method_defaults()
    images, labels = real.train_tensors()
    sampler = ClassSampler(images, labels, 10)
    synthetic = build_synthetic("pixels", sampler, 2, "real", torch.Generator().manual_seed(0))
    method = build_method(config)
    method.prepare(MethodSetup(synthetic, sampler, real.info, torch.device("cpu"), MODEL,
                               torch.Generator().manual_seed(1), fresh=True))
    with torch.no_grad():
        method.lr.fill_(-0.5)  # where a large step-size update can throw it
    assert float(method.artefact_tensors()["lr"]) == pytest.approx(method.MIN_LR)
    context = make_context(config, 0, synthetic, sampler, real, None, torch.device("cpu"))
    loss = next(method.iteration(context))
    assert float(method.lr.detach()) == pytest.approx(method.MIN_LR) and bool(torch.isfinite(loss.detach()))
    assert float(loss.detach()) == pytest.approx(1.0, abs=1e-3)  # a step of 1e-6 leaves the student where it started


def test_mtt_and_dsa_learn_low_rank_factors_through_the_same_loop(real, experts_dir, tmp_path):
    runs = {"mtt": _config("mtt", experts_dir, ipc=1, param="lowrank", rank=2),
            "dsa": DistillConfig(method="dsa", ipc=1, iterations=2, model=MODEL, param="lowrank", rank=2,
                                 outer_loop=2, inner_loop=1, batch_real=8)}
    for name, config in runs.items():
        distilled = load_set(distill(config, tmp_path / name, progress=False, real=real).artefact)
        assert distilled.images.shape[0] == 70  # 7 rank-2 images per class in the storage of one 28x28 image
        initial = build_synthetic("lowrank", _sampler(real), 1, "real", _init_generator(config), rank=2)
        assert not torch.equal(distilled.stored["factor_a"], initial.factor_a.detach())
        torch.testing.assert_close(distilled.images, distilled.stored["factor_a"] @ distilled.stored["factor_b"])


def _sampler(real):
    from infodistill.data import ClassSampler

    images, labels = real.train_tensors()
    return ClassSampler(images, labels, real.info.num_classes)


def _init_generator(config):
    from infodistill.loop import INIT_STREAM
    from infodistill.seeds import stream_generator

    return stream_generator(config.seed, INIT_STREAM)
