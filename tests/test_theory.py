"""The multi-index theory experiment: the student's two training steps against independent references,
the distillation's claims on a small case, the written outputs, determinism and bad input."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from infodistill.cli.parsers import configure_theory_parser
from infodistill.errors import UserInputError
from infodistill.experiments.theory import JSON_NAME, command_theory, m_needed, run_theory
from infodistill.experiments.theory_figures import FIGURE_NAMES
from infodistill.experiments.theory_maths import (
    StudentInit,
    TheoryConfig,
    distill_points,
    first_layer_gradient,
    init_student,
    make_task,
    normalised_error,
    quick_config,
    random_directions,
    ridge_solve,
    student_predict,
    subspace_energy,
    target_function,
    train_student,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def numpy_ridge(Phi: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """argmin (1/m)||Phi a - y||^2 + ridge ||a||^2 as least squares on the augmented system
    [Phi / sqrt(m); sqrt(ridge) I] a = [y / sqrt(m); 0]."""
    m, width = Phi.shape
    A = np.vstack([Phi / math.sqrt(m), math.sqrt(ridge) * np.eye(width)])
    rhs = np.concatenate([y / math.sqrt(m), np.zeros(width)])
    return np.linalg.lstsq(A, rhs, rcond=None)[0]


def numpy_loss(W: np.ndarray, X: np.ndarray, y: np.ndarray, b: np.ndarray, a: np.ndarray) -> float:
    """(1 / 2m) sum_i (a^T relu(W x_i + b) / sqrt(L) - y_i)^2, written from scratch."""
    hidden = np.maximum(X @ W.T + b, 0.0)
    prediction = hidden @ a / math.sqrt(W.shape[0])
    return float(((prediction - y) ** 2).sum() / (2 * X.shape[0]))


# ---------------------------------------------------------------------------------------------- student


@pytest.mark.parametrize("m, width, ridge", [(30, 7, 0.1), (5, 12, 0.01), (9, 9, 2.0)])
def test_ridge_solve_is_the_closed_form_solution(m, width, ridge):
    rng = np.random.default_rng(m * 100 + width)
    Phi, y = rng.normal(size=(m, width)), rng.normal(size=m)
    got = ridge_solve(torch.from_numpy(Phi), torch.from_numpy(y), ridge).numpy()
    np.testing.assert_allclose(got, numpy_ridge(Phi, y, ridge), rtol=1e-9, atol=1e-11)


def test_ridge_zero_is_the_minimum_norm_least_squares_solution():
    rng = np.random.default_rng(3)
    Phi, y = rng.normal(size=(4, 10)), rng.normal(size=4)
    got = ridge_solve(torch.from_numpy(Phi), torch.from_numpy(y), 0.0).numpy()
    np.testing.assert_allclose(got, np.linalg.pinv(Phi) @ y, atol=1e-10)
    np.testing.assert_allclose(Phi @ got, y, atol=1e-10)  # 4 equations, 10 unknowns: interpolates


def test_first_layer_step_is_w0_minus_eta_times_the_finite_difference_gradient():
    rng = np.random.default_rng(7)
    m, d, width, eta = 6, 3, 4, 0.7
    X, y = rng.normal(size=(m, d)), rng.normal(size=m)
    W0, b = rng.normal(size=(width, d)), rng.normal(size=width)
    a0 = rng.normal(size=width)  # not symmetric: the network's own output enters the residual
    assert np.abs(X @ W0.T + b).min() > 1e-3  # no ReLU kink within the finite-difference step
    step = 1e-6
    gradient = np.zeros_like(W0)
    for j in range(width):
        for k in range(d):
            plus, minus = W0.copy(), W0.copy()
            plus[j, k] += step
            minus[j, k] -= step
            gradient[j, k] = (numpy_loss(plus, X, y, b, a0) - numpy_loss(minus, X, y, b, a0)) / (2 * step)
    tensors = [torch.from_numpy(v) for v in (X, y, W0, b, a0)]
    np.testing.assert_allclose(first_layer_gradient(*tensors).numpy(), gradient, rtol=1e-6, atol=1e-9)
    params = train_student(*tensors, eta=eta, ridge=0.1)
    np.testing.assert_allclose(params.W1.numpy(), W0 - eta * gradient, rtol=1e-6, atol=1e-8)
    # and the output layer is the ridge solution on the features of the stepped first layer
    features = np.maximum(X @ params.W1.numpy().T + b, 0.0) / math.sqrt(width)
    np.testing.assert_allclose(params.a.numpy(), numpy_ridge(features, y, 0.1), rtol=1e-8, atol=1e-10)
    hand = np.maximum(X @ params.W1.numpy().T + b, 0.0) @ params.a.numpy() / 2.0  # sqrt(L) = 2
    np.testing.assert_allclose(student_predict(tensors[0], params.W1, params.b, params.a).numpy(), hand, rtol=1e-10)


def test_symmetric_initialisation_outputs_zero_and_the_gradient_is_linear_in_the_labels():
    student = init_student(5, 9, torch.Generator().manual_seed(0))
    assert student.W0.shape == (9, 5) and student.a0.tolist() == [1.0] * 4 + [-1.0] * 4 + [0.0]
    X = torch.randn(20, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randn(20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # paired units cancel; only the matmul's summation order leaves rounding (~1e-17)
    torch.testing.assert_close(student_predict(X, student.W0, student.b, student.a0),
                               torch.zeros(20, dtype=torch.float64), rtol=0, atol=1e-12)
    G = first_layer_gradient(X, y, student.W0, student.b, student.a0)
    torch.testing.assert_close(first_layer_gradient(X, 3.0 * y, student.W0, student.b, student.a0), 3.0 * G)


def test_target_function_hand_values():
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    # (1/sqrt(4)) * ((1 - 1) + (4 - 1)) + tanh(1 * 2) / (2 * sqrt(1))
    expected = torch.tensor([1.5 + math.tanh(2.0) / 2.0, -2.0 / 2.0], dtype=torch.float64)
    torch.testing.assert_close(target_function(z), expected)
    torch.testing.assert_close(target_function(torch.tensor([[2.0]], dtype=torch.float64)),
                               torch.tensor([3.0 / math.sqrt(2.0)], dtype=torch.float64))


def test_directions_are_orthonormal_and_energy_is_the_projected_fraction():
    U = random_directions(3, 10, torch.Generator().manual_seed(4))
    torch.testing.assert_close(U @ U.T, torch.eye(3, dtype=torch.float64))
    e1 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    points = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 4.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(subspace_energy(points, e1), torch.tensor([0.5, 9.0 / 25.0, 0.0], dtype=torch.float64))
    gaussian = torch.randn(20000, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert abs(float(subspace_energy(gaussian, U).mean()) - 0.3) < 0.01  # r / d for random points


def test_make_task_labels_are_g_of_the_projection():
    config = TheoryConfig(d=6, r=2, n_train=50, n_test=20)
    task = make_task(config, torch.Generator().manual_seed(0))
    assert task.U.shape == (2, 6) and task.X_train.shape == (50, 6) and task.X_test.shape == (20, 6)
    torch.testing.assert_close(task.y_train, target_function(task.X_train @ task.U.T))
    # the target only sees span(U): moving x orthogonally to it leaves y unchanged
    orthogonal = torch.randn(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    orthogonal = orthogonal - orthogonal @ task.U.T @ task.U
    torch.testing.assert_close(target_function((task.X_train + orthogonal) @ task.U.T), task.y_train)


def test_m_needed_rule():
    assert m_needed([2, 4, 8], [0.9, 0.16, 0.11], full_mean=0.1, tolerance=0.05) == 8
    assert m_needed([2, 4, 8], [0.9, 0.15, 0.11], full_mean=0.1, tolerance=0.05) == 4
    assert m_needed([2, 4, 8], [0.9, 0.5, 0.3], full_mean=0.1, tolerance=0.05) is None


# ---------------------------------------------------------------------------------------------- distillation


def test_label_rescaling_starts_at_the_full_gradient_norm_and_batched_runs_are_independent():
    config = TheoryConfig(d=6, r=2, n_train=300, n_test=10)
    task = make_task(config, torch.Generator().manual_seed(0))
    students = [init_student(6, 8, torch.Generator().manual_seed(s)) for s in range(2)]
    X0, y0 = task.X_train[:10].reshape(2, 5, 6), task.y_train[:10].reshape(2, 5)
    start = distill_points(X0[0], y0[0], task.X_train, task.y_train, students[0], 3.0, 1e-3, steps=0, lr=0.1)
    full_norm = first_layer_gradient(task.X_train, task.y_train, *dataclasses.astuple(students[0])).norm()
    start_norm = first_layer_gradient(start.X, start.y, *dataclasses.astuple(students[0])).norm()
    assert float(start_norm) == pytest.approx(float(full_norm), rel=1e-12)
    assert torch.equal(start.X, X0[0]) and start.match_history.shape == (0,)

    stacked = StudentInit(*(torch.stack(parts) for parts in zip(*(dataclasses.astuple(s) for s in students))))
    together = distill_points(X0, y0, task.X_train, task.y_train, stacked, 3.0, 1e-3, steps=15, lr=0.05)
    for s in range(2):
        alone = distill_points(X0[s], y0[s], task.X_train, task.y_train, students[s], 3.0, 1e-3, steps=15, lr=0.05)
        torch.testing.assert_close(together.X[s], alone.X, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(together.y[s], alone.y, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(together.match_history[:, s], alone.match_history, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def small_case():
    """d=16, r=2, L=64: three students, random subsets of m=8 and the sets distilled from them."""
    config = TheoryConfig(d=16, r=2, width=64, n_train=4000, n_test=2000)
    task = make_task(config, torch.Generator().manual_seed(11))
    students = [init_student(16, 64, torch.Generator().manual_seed(20 + s)) for s in range(3)]
    stacked = StudentInit(*(torch.stack(parts) for parts in zip(*(dataclasses.astuple(s) for s in students))))
    index = torch.stack([torch.randperm(4000, generator=torch.Generator().manual_seed(30 + s))[:8] for s in range(3)])
    eta = config.step_size
    distilled = distill_points(task.X_train[index], task.y_train[index], task.X_train, task.y_train, stacked, eta,
                               config.ridge, steps=250, lr=0.03, fit_batch=500,
                               generator=torch.Generator().manual_seed(40))

    def error(X, y, s):
        return normalised_error(train_student(X, y, *dataclasses.astuple(students[s]), eta, config.ridge),
                                task.X_test, task.y_test)

    return {
        "task": task, "random_X": task.X_train[index], "distilled": distilled,
        "random_error": [error(task.X_train[index[s]], task.y_train[index[s]], s) for s in range(3)],
        "distilled_error": [error(distilled.X[s], distilled.y[s], s) for s in range(3)],
        "full_error": [error(task.X_train, task.y_train, s) for s in range(3)],
    }


def test_distilled_points_concentrate_in_the_relevant_subspace(small_case):
    U = small_case["task"].U
    distilled = float(subspace_energy(small_case["distilled"].X.reshape(-1, 16), U).mean())
    random_points = float(subspace_energy(small_case["random_X"].reshape(-1, 16), U).mean())
    assert random_points < 0.25  # about r / d = 0.125 for real Gaussian points
    assert distilled > 0.35 and distilled > random_points + 0.2


def test_distilled_points_beat_random_subsets_of_the_same_size(small_case):
    for distilled, random_subset, full in zip(small_case["distilled_error"], small_case["random_error"],
                                              small_case["full_error"]):
        assert distilled < 0.6 * random_subset
        assert distilled < 0.5 and full < distilled + 0.3
    # the objective went down: the gradient-matching term from its rescaled start, the fit term overall
    history = small_case["distilled"]
    assert float(history.fit_history[-20:].mean()) < float(history.fit_history[0].mean())


# ---------------------------------------------------------------------------------------------- outputs


def theory_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_theory_parser(parser)
    return parser.parse_args(list(argv))


def test_quick_command_writes_pngs_and_the_returned_json(tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "theory"
    assert command_theory(theory_args("--out", str(out), "--quick", "--quiet", "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / JSON_NAME).read_text())
    assert written == printed
    for name in FIGURE_NAMES.values():
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(p.name for p in out.iterdir()) == sorted([JSON_NAME, *FIGURE_NAMES.values()])  # no temp files
    settings, main = written["settings"], written["main"]
    assert settings["m_values"] == list(quick_config().m_values) and main["m_values"] == settings["m_values"]
    assert len(main["distilled_error"]["mean"]) == len(settings["m_values"])
    assert len(main["distilled_energy"]["per_point"][0]) == settings["seeds"] * settings["m_values"][0]
    assert set(written["sweeps"]) == {"r", "d", "width"} and written["wall_seconds"] > 0
    for index in range(len(settings["m_values"])):
        per_seed = main["distilled_error"]["per_seed"][index]
        assert main["distilled_error"]["mean"][index] == pytest.approx(sum(per_seed) / len(per_seed))


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not k.endswith("_seconds")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_same_config_gives_identical_numbers(tmp_path):
    config = dataclasses.replace(quick_config(), distill_steps=20, sweep_d=(), sweep_width=(16,))
    first = run_theory(config, tmp_path / "a", progress=False)
    second = run_theory(config, tmp_path / "b", progress=False)
    assert without_timings(first) == without_timings(second)
    assert without_timings(json.loads((tmp_path / "a" / JSON_NAME).read_text())) == without_timings(second)
    assert "d" not in first["sweeps"] and first["sweeps"]["width"]["values"] == [16]
    other = run_theory(dataclasses.replace(config, seed=1), tmp_path / "c", progress=False)
    assert other["main"]["full_error"] != first["main"]["full_error"]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("changes, named", [
    ({"r": 0}, "r"),
    ({"r": 33}, "r"),
    ({"d": 0}, "d"),
    ({"width": 0}, "width"),
    ({"eta": 0.0}, "eta"),
    ({"eta": float("nan")}, "eta"),
    ({"ridge": -1.0}, "ridge"),
    ({"seeds": 0}, "seeds"),
    ({"distill_steps": 0}, "distill_steps"),
    ({"distill_lr": -0.1}, "distill_lr"),
    ({"tolerance": -0.5}, "tolerance"),
    ({"n_train": 0}, "n_train"),
    ({"n_test": 1}, "n_test"),
    ({"m_values": (0, 4)}, "m_values"),
    ({"m_values": (8, 20000)}, "m_values"),
    ({"m_values": ()}, "m_values"),
    ({"m_values": (8, 4)}, "m_values"),
    ({"sweep_r": (1, 40)}, "sweep_r"),
    ({"sweep_d": (1,)}, "sweep_d"),
    ({"sweep_width": (0,)}, "sweep_width"),
])
def test_validate_refuses_out_of_range_values_with_one_line_naming_them(changes, named):
    config = dataclasses.replace(TheoryConfig(), **changes)
    with pytest.raises(UserInputError) as caught:
        config.validate()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(named + " ")
    value = next(iter(changes.values()))
    if value == ():
        shown = ["empty"]
    elif isinstance(value, tuple):
        shown = [str(v) for v in value]
    else:
        shown = [str(value)]
    assert any(text in message for text in shown), message


def test_default_config_is_valid():
    assert TheoryConfig().validate() == TheoryConfig()
    assert quick_config().validate() == quick_config()


@pytest.mark.parametrize("flag, value", [("--m-values", "2,x,8"), ("--m-values", "2;4"), ("--sweep-r", "1,,2"),
                                         ("--sweep-width", "16,32.5")])
def test_command_refuses_comma_lists_that_do_not_parse(tmp_path, flag, value):
    with pytest.raises(UserInputError, match=flag) as caught:
        command_theory(theory_args("--out", str(tmp_path / "o"), "--quick", flag, value))
    assert value in str(caught.value)
    assert not (tmp_path / "o").exists()  # nothing written before the input is checked


def test_command_refuses_out_of_range_flags_and_a_file_as_out(tmp_path):
    with pytest.raises(UserInputError, match="m_values"):
        command_theory(theory_args("--out", str(tmp_path / "o"), "--quick", "--m-values", "4,5000"))
    with pytest.raises(UserInputError, match="r must be"):
        command_theory(theory_args("--out", str(tmp_path / "o"), "--quick", "--r", "9"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UserInputError, match="file.txt"):
        command_theory(theory_args("--out", str(a_file), "--quick", "--quiet", "--sweep-r", "none", "--sweep-d", "",
                                   "--sweep-width", "none", "--distill-steps", "1"))


def test_flags_override_the_quick_base():
    args = theory_args("--out", "x", "--quick", "--d", "10", "--m-values", "3, 6", "--sweep-d", "none", "--seeds", "1")
    from infodistill.experiments.theory import theory_config_from_args

    config = theory_config_from_args(args)
    assert (config.d, config.m_values, config.sweep_d, config.seeds) == (10, (3, 6), (), 1)
    assert config.width == quick_config().width


def test_the_cli_runs_theory_and_refuses_a_bad_rank_with_exit_2(tmp_path, capsys):
    from infodistill.cli import main

    assert main(["theory", "--out", str(tmp_path / "bad"), "--quick", "--r", "0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("infodistill theory: error:") and "got 0" in error and "\n" not in error
    assert not (tmp_path / "bad").exists()
    assert main(["theory", "--out", str(tmp_path / "ok"), "--quick", "--quiet", "--sweep-r", "none",
                 "--sweep-d", "none", "--sweep-width", "none", "--distill-steps", "2"]) == 0
    assert json.loads((tmp_path / "ok" / "theory.json").read_text())["settings"]["r"] == quick_config().r
