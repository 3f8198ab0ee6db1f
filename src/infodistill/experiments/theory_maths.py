"""The maths of the multi-index theory experiment: its settings, task, student and distillation.

The experiment, run by :mod:`infodistill.experiments.theory`, shows that distilled data encode the
low-dimensional structure of the task. It reproduces, at CPU scale, the claim of Kinoshita, Nishikawa and
Toyoizumi (arXiv 2603.14830): when a two-layer network of width L is trained by gradient steps on a
multi-index task (the target depends on ``x`` in R^d only through ``r`` directions), distilled data
concentrate on that r-dimensional subspace, and the memory they need grows like ``r^2 d + L`` rather than
with the training set.

Task
    ``x ~ N(0, I_d)``, ``y = g(U x)`` with ``U`` an ``r x d`` matrix with orthonormal rows and

        g(z) = (1 / sqrt(2 r)) * sum_i (z_i^2 - 1)  +  (1 / (2 sqrt(r - 1))) * sum_{i<r} tanh(z_i z_{i+1})

    (the second sum is empty for r = 1). The first sum is the second Hermite polynomial of every
    direction (so one large gradient step on the first layer finds span(U)); the tanh terms couple
    neighbouring directions, so the target is not a sum of single-index functions. ``E[g] = 0`` and the
    first sum has unit variance whatever r is.

Student
    ``f(x) = a^T relu(W x + b) / sqrt(L)``. Initialisation (:func:`init_student`): rows of ``W0`` are
    ``N(0, I_d / d)``, ``b ~ N(0, 1)`` (fixed, never trained), and the output weights are symmetric:
    neurons come in pairs with the same ``(w, b)`` and opposite ``a0 = +1 / -1`` (an unpaired last
    neuron has ``a0 = 0``), so the network outputs exactly zero at initialisation.
    Training (:func:`train_student`) on points ``(X, y)`` of size m:

    1. one gradient step on the first layer, ``W1 = W0 - eta * grad_W l(W0, a0)`` with
       ``l = (1 / (2 m)) * sum_i (f(x_i) - y_i)^2``;
    2. ridge regression of the output layer on the features ``phi(x) = relu(W1 x + b) / sqrt(L)``:
       ``a = argmin (1 / m) * ||Phi a - y||^2 + ridge * ||a||^2`` (float64, ``torch.linalg.solve``).

    The experiment applies the step size ``eta = config.eta * sqrt(L)`` (the ``Theta(sqrt(L))`` step of
    Ba et al., 2022, which keeps the per-neuron update independent of the width).

Distillation (:func:`distill_points`)
    ``m`` free points ``(X_s, y_s)``, initialised at a random real subset, minimise with Adam

        J(X_s, y_s) = ||G(X_s, y_s) - G(X, y)||_F^2 / ||G(X, y)||_F^2
                      + fit_weight * mean_i (f_s(x_i) - y_i)^2 / Var(y)

    where ``G(., .) = grad_W l`` at ``(W0, a0)`` is the first-step gradient (on the distilled points and
    on all n real training points), ``f_s`` is the student trained on ``(X_s, y_s)`` by the same
    two-step procedure (differentiated end to end through the step and the ridge solve), and the mean
    runs over the real training points (a fresh random batch of ``fit_batch`` of them per Adam step,
    all of them when ``fit_batch`` is 0).

Every random draw comes from a ``torch.Generator`` seeded from ``config.seed`` and a tag naming the
draw, so a run is a deterministic function of its config.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from infodistill.errors import UserInputError

DTYPE = torch.float64
SWEEP_FIELDS = {"r": "sweep_r", "d": "sweep_d", "width": "sweep_width"}
"""The sweeps of the m-needed figure: the swept parameter and the :class:`TheoryConfig` field holding its values."""


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class TheoryConfig:
    """Settings of the experiment. ``eta`` is per sqrt(width): the step applied is ``eta * sqrt(width)``.

    ``m_values`` is the grid of distilled-set sizes; ``seeds`` the number of student initialisations
    (and subset draws, and distillations) averaged at every point; ``sweep_r``, ``sweep_d`` and
    ``sweep_width`` the values of r, d and L swept (the others fixed at ``r``, ``d``, ``width``) for the
    m-needed figure, an empty tuple skipping that sweep. The m needed at a setting is the smallest m of
    the grid whose mean distilled test error is at most the mean full-data test error plus
    ``tolerance`` (errors are normalised: test MSE / test variance of y, so 0.05 is 5% of Var(y)).
    """

    d: int = 32
    r: int = 2
    width: int = 128
    n_train: int = 16000
    n_test: int = 4000
    m_values: tuple[int, ...] = (2, 4, 8, 12, 16, 24, 32, 64)
    eta: float = 30.0
    ridge: float = 1e-3
    distill_steps: int = 400
    distill_lr: float = 0.03
    fit_weight: float = 1.0
    fit_batch: int = 500
    seeds: int = 3
    sweep_r: tuple[int, ...] = (1, 2, 3, 4)
    sweep_d: tuple[int, ...] = (16, 32, 64)
    sweep_width: tuple[int, ...] = (32, 64, 128, 256)
    tolerance: float = 0.05
    seed: int = 0

    def validate(self) -> TheoryConfig:
        """Raise :class:`UserInputError` (one line naming the value and the allowed range) on bad input."""
        _check_int("d", self.d, 1)
        if not _is_int(self.r) or not 1 <= self.r <= self.d:
            raise UserInputError(f"r must be an integer with 1 <= r <= d = {self.d}, got {self.r!r}")
        _check_int("width", self.width, 1)
        _check_int("n_train", self.n_train, 2)
        _check_int("n_test", self.n_test, 2)
        _check_int("distill_steps", self.distill_steps, 1)
        _check_int("seeds", self.seeds, 1)
        _check_int("fit_batch", self.fit_batch, 0, note=" (0 = all training points)")
        _check_int("seed", self.seed, 0)
        _check_float("eta", self.eta, positive=True)
        _check_float("ridge", self.ridge, positive=False)
        _check_float("distill_lr", self.distill_lr, positive=True)
        _check_float("fit_weight", self.fit_weight, positive=False)
        _check_float("tolerance", self.tolerance, positive=False)
        _check_grid("m_values", self.m_values, 1, self.n_train, "n_train", allow_empty=False)
        _check_grid("sweep_r", self.sweep_r, 1, self.d, "d", allow_empty=True)
        for value in self.sweep_d:
            if isinstance(value, int) and not isinstance(value, bool) and value < self.r:
                raise UserInputError(f"sweep_d values must be >= r = {self.r}, got {value}")
        _check_grid("sweep_d", self.sweep_d, 1, None, None, allow_empty=True)
        _check_grid("sweep_width", self.sweep_width, 1, None, None, allow_empty=True)
        return self

    @property
    def step_size(self) -> float:
        """The first-layer step actually applied at this config's width."""
        return self.eta * math.sqrt(self.width)


def quick_config(seed: int = 0) -> TheoryConfig:
    """A tiny setting that runs all three figures in seconds (for smoke tests and ``--quick``)."""
    return TheoryConfig(d=8, r=2, width=32, n_train=2000, n_test=1000, m_values=(2, 4, 8), distill_steps=100,
                        fit_batch=250, seeds=2, sweep_r=(1, 2), sweep_d=(8, 12), sweep_width=(16, 32), seed=seed)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, note: str = "") -> None:
    if not _is_int(value) or value < low:
        raise UserInputError(f"{name} must be an integer >= {low}{note}, got {value!r}")


def _check_float(name: str, value, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise UserInputError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_grid(name: str, values, low: int, high: int | None, high_name: str | None, allow_empty: bool) -> None:
    if not isinstance(values, tuple):
        raise UserInputError(f"{name} must be a tuple of integers, got {values!r}")
    if not values and not allow_empty:
        raise UserInputError(f"{name} must hold at least one value, got an empty list")
    allowed = f"{low} <= value <= {high_name} = {high}" if high is not None else f"value >= {low}"
    for value in values:
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise UserInputError(f"{name} values must be integers with {allowed}, got {value!r}")
    if list(values) != sorted(set(values)):
        raise UserInputError(f"{name} must be strictly increasing, got {','.join(str(v) for v in values)}")


def tagged_generator(seed: int, *tags) -> torch.Generator:
    """A generator seeded from ``seed`` and the tags naming one draw (stable across processes)."""
    text = ":".join(str(part) for part in (seed, *tags))
    digest = hashlib.sha256(text.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


# --------------------------------------------------------------------------------------------------
# task and student


@dataclass(frozen=True)
class Task:
    """A multi-index regression task: the directions ``U`` (r x d, orthonormal rows) and its data."""

    U: torch.Tensor
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class StudentInit:
    """The random initialisation of the student: ``W0`` (L x d), ``b`` (L) and ``a0`` (L)."""

    W0: torch.Tensor
    b: torch.Tensor
    a0: torch.Tensor


@dataclass(frozen=True)
class StudentParams:
    """A trained student: the first layer after the step, the fixed bias, the ridge output layer."""

    W1: torch.Tensor
    b: torch.Tensor
    a: torch.Tensor


def target_function(Z: torch.Tensor) -> torch.Tensor:
    """``g(z)`` of the module docstring for the rows of ``Z`` (n x r): a vector of n targets."""
    r = Z.shape[1]
    value = (Z * Z - 1.0).sum(dim=1) / math.sqrt(2.0 * r)
    if r > 1:
        value = value + torch.tanh(Z[:, :-1] * Z[:, 1:]).sum(dim=1) / (2.0 * math.sqrt(r - 1))
    return value


def random_directions(r: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """An ``r x d`` matrix with orthonormal rows, uniformly random (QR of a Gaussian matrix)."""
    gaussian = torch.randn(d, r, generator=generator, dtype=DTYPE)
    q, upper = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(upper))).T.contiguous()


def make_task(config: TheoryConfig, generator: torch.Generator) -> Task:
    """Draw ``U`` and ``n_train`` + ``n_test`` Gaussian inputs with their targets ``g(U x)``."""
    U = random_directions(config.r, config.d, generator)
    X_train = torch.randn(config.n_train, config.d, generator=generator, dtype=DTYPE)
    X_test = torch.randn(config.n_test, config.d, generator=generator, dtype=DTYPE)
    return Task(U, X_train, target_function(X_train @ U.T), X_test, target_function(X_test @ U.T))


def init_student(d: int, width: int, generator: torch.Generator) -> StudentInit:
    """Symmetric initialisation: pairs of neurons share ``(w, b)`` and have ``a0 = +1, -1``, so f = 0."""
    half = width // 2
    W_half = torch.randn(half, d, generator=generator, dtype=DTYPE) / math.sqrt(d)
    b_half = torch.randn(half, generator=generator, dtype=DTYPE)
    W_extra = torch.randn(width - 2 * half, d, generator=generator, dtype=DTYPE) / math.sqrt(d)
    b_extra = torch.randn(width - 2 * half, generator=generator, dtype=DTYPE)
    W0 = torch.cat([W_half, W_half, W_extra])
    b = torch.cat([b_half, b_half, b_extra])
    a0 = torch.cat([torch.ones(half, dtype=DTYPE), -torch.ones(half, dtype=DTYPE),
                    torch.zeros(width - 2 * half, dtype=DTYPE)])
    return StudentInit(W0, b, a0)


def features(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(X W^T + b) / sqrt(L)``: the n x L feature matrix of the output layer.

    Every function of the student takes optional leading batch dimensions (several students at once).
    """
    return torch.relu(X @ W.mT + b.unsqueeze(-2)) / math.sqrt(W.shape[-2])


def student_predict(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``f(x) = a^T relu(W x + b) / sqrt(L)`` for the rows of ``X``."""
    return (features(X, W, b) @ a.unsqueeze(-1)).squeeze(-1)


def first_layer_gradient(X: torch.Tensor, y: torch.Tensor, W0: torch.Tensor, b: torch.Tensor,
                         a0: torch.Tensor) -> torch.Tensor:
    """``grad_W (1 / (2 m)) sum_i (f(x_i) - y_i)^2`` at ``(W0, b, a0)``, an L x d matrix.

    Written out, ``(1 / m) sum_i (f(x_i) - y_i) * (a0 / sqrt(L)) * 1[W0 x_i + b > 0] x_i^T``; it is a
    differentiable function of ``X`` and ``y`` (the step mask is locally constant).
    """
    scale = math.sqrt(W0.shape[-2])
    pre = X @ W0.mT + b.unsqueeze(-2)
    residual = (torch.relu(pre) @ a0.unsqueeze(-1)).squeeze(-1) / scale - y
    gates = (pre > 0).to(X.dtype) * (a0 / scale).unsqueeze(-2)
    return (gates * residual.unsqueeze(-1)).mT @ X / X.shape[-2]


def ridge_solve(Phi: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_a (1 / m) ||Phi a - y||^2 + ridge ||a||^2`` (min-norm least squares when ridge is 0).

    Solves the smaller of the primal (L x L) and dual (m x m) systems, in float64.
    """
    m, width = Phi.shape[-2:]
    Phi64, y64 = Phi.to(DTYPE), y.to(DTYPE).unsqueeze(-1)
    if ridge == 0:
        a = torch.linalg.pinv(Phi64) @ y64
    elif m >= width:
        gram = Phi64.mT @ Phi64 / m + ridge * torch.eye(width, dtype=DTYPE)
        a = torch.linalg.solve(gram, Phi64.mT @ y64 / m)
    else:
        kernel = Phi64 @ Phi64.mT / m + ridge * torch.eye(m, dtype=DTYPE)
        a = Phi64.mT @ torch.linalg.solve(kernel, y64) / m
    return a.squeeze(-1).to(Phi.dtype)


def train_student(X: torch.Tensor, y: torch.Tensor, W0: torch.Tensor, b: torch.Tensor, a0: torch.Tensor,
                  eta: float, ridge: float) -> StudentParams:
    """One gradient step ``W1 = W0 - eta * grad_W l`` then ridge regression of the output layer.

    ``eta`` is the step applied as given (the experiment passes ``config.eta * sqrt(L)``). Differentiable
    with respect to ``X`` and ``y``.
    """
    W1 = W0 - eta * first_layer_gradient(X, y, W0, b, a0)
    a = ridge_solve(features(X, W1, b), y, ridge)
    return StudentParams(W1, b, a)


def normalised_error(params: StudentParams, X: torch.Tensor, y: torch.Tensor) -> float:
    """Test MSE divided by the variance of ``y`` (0 = perfect, 1 = predicting the mean)."""
    prediction = student_predict(X, params.W1, params.b, params.a)
    return float(((prediction - y) ** 2).mean() / y.var(unbiased=False))


def subspace_energy(points: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Per point, the fraction of its squared norm in span(U): ``||U x||^2 / ||x||^2`` (U orthonormal rows)."""
    points = points.to(U.dtype)
    return (points @ U.T).pow(2).sum(dim=1) / points.pow(2).sum(dim=1).clamp_min(torch.finfo(U.dtype).tiny)


# --------------------------------------------------------------------------------------------------
# distillation


@dataclass(frozen=True)
class DistillResult:
    """Distilled points and the two terms of the objective before every Adam step (steps x batch)."""

    X: torch.Tensor
    y: torch.Tensor
    match_history: torch.Tensor
    fit_history: torch.Tensor


def _label_scale(X_init: torch.Tensor, y_start: torch.Tensor, student: StudentInit,
                 target_norm: torch.Tensor) -> torch.Tensor:
    """``sqrt(target_norm) / ||G(X_init, y_start)||_F`` per set, trailing axis of size 1 (:func:`distill_points`)."""
    start = first_layer_gradient(X_init.to(DTYPE), y_start, student.W0, student.b, student.a0)
    start_norm = start.pow(2).sum(dim=(-2, -1))
    return (target_norm / start_norm.clamp_min(torch.finfo(DTYPE).tiny)).sqrt().unsqueeze(-1)


def distill_points(X_init: torch.Tensor, y_init: torch.Tensor, X_real: torch.Tensor, y_real: torch.Tensor,
                   student: StudentInit, eta: float, ridge: float, steps: int, lr: float,
                   fit_weight: float = 1.0, fit_batch: int = 0,
                   generator: torch.Generator | None = None, rescale_labels: bool = True) -> DistillResult:
    """Learn ``(X_s, y_s)`` from ``(X_init, y_init)`` by ``steps`` Adam steps (constant ``lr``) on

        J = ||G(X_s, y_s) - G(X, y)||_F^2 / ||G(X, y)||_F^2 + fit_weight * mean_i (f_s(x_i) - y_i)^2 / Var(y)

    (module docstring): ``G`` is :func:`first_layer_gradient` at the student's initialisation, ``f_s``
    the student trained on ``(X_s, y_s)`` by :func:`train_student` with step ``eta`` (the step applied)
    and ``ridge``, and the mean runs over ``fit_batch`` real points drawn afresh from ``generator`` at
    every step (all n of them when ``fit_batch`` is 0 or >= n).

    With ``rescale_labels`` (the default) the initial labels are first multiplied by
    ``||G(X, y)||_F / ||G(X_init, y_init)||_F``, so that the distilled first-step gradient starts at the
    size of the full-data one (with the symmetric initialisation ``G`` is linear in the labels). A few
    random points have a first-step gradient far larger than n points (its noise does not average
    out); without the rescaling the first Adam steps shrink the labels towards zero, where the student
    predicts nothing and the gradients with respect to the points vanish.

    Several independent distillations run at once when ``student`` and ``X_init`` / ``y_init`` carry a
    leading batch dimension (S x L x d, S x m x d, S x m): the objective is summed over the batch, so
    each set follows exactly its own Adam trajectory; the real data are shared.
    """
    W0, b, a0 = student.W0, student.b, student.a0
    tiny = torch.finfo(DTYPE).tiny
    with torch.no_grad():
        target_gradient = first_layer_gradient(X_real, y_real, W0, b, a0)
        target_norm = target_gradient.pow(2).sum(dim=(-2, -1)).clamp_min(tiny)
        variance = y_real.var(unbiased=False).clamp_min(tiny)
        y_start = y_init.detach().to(DTYPE)
        if rescale_labels:
            y_start = y_start * _label_scale(X_init, y_start, student, target_norm)
    X_s = X_init.detach().clone().to(DTYPE).requires_grad_(True)
    y_s = y_start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([X_s, y_s], lr=lr)
    n = X_real.shape[0]
    use_batch = 0 < fit_batch < n
    if use_batch and generator is None:
        generator = torch.Generator().manual_seed(0)
    match_history, fit_history = [], []
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        gradient = first_layer_gradient(X_s, y_s, W0, b, a0)
        match = (gradient - target_gradient).pow(2).sum(dim=(-2, -1)) / target_norm
        W1 = W0 - eta * gradient
        a = ridge_solve(features(X_s, W1, b), y_s, ridge)
        if use_batch:
            index = torch.randperm(n, generator=generator)[:fit_batch]
            X_fit, y_fit = X_real[index], y_real[index]
        else:
            X_fit, y_fit = X_real, y_real
        fit = (student_predict(X_fit, W1, b, a) - y_fit).pow(2).mean(dim=-1) / variance
        (match + fit_weight * fit).sum().backward()
        optimiser.step()
        match_history.append(match.detach())
        fit_history.append(fit.detach())
    empty = torch.zeros((0, *X_init.shape[:-2]), dtype=DTYPE)
    return DistillResult(X_s.detach(), y_s.detach(),
                         torch.stack(match_history) if match_history else empty,
                         torch.stack(fit_history) if fit_history else empty)
