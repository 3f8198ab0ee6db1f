"""Coreset baselines: herding and k-center against hand-worked and brute-force references, class balance,
determinism, and the refusals of ``infodistill baseline --select`` (one line, exit 2, nothing written)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from infodistill.artefact import load_set
from infodistill.cli import main
from infodistill.coresets import SELECTION_RULES, herding_class, kcenter_class, select_indices
from infodistill.errors import UserInputError
from infodistill.proxies import ProxyPool, train_proxy_pool

# Five 2-D points of one class; their mean is (10.2 / 5, 3 / 5) = (2.04, 0.6).
POINTS = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 0.0], [3.2, 0.0], [2.0, 3.0]])


def test_herding_matches_the_hand_worked_example():
    # step 1: the point nearest the mean (2.04, 0.6): p2 = (1, 0) at 1.2006 (p3 at 1.2335, p1 at 2.050);
    # step 2: nearest 2 * mean - p2 = (3.08, 1.2): p3 = (3.2, 0) at 1.206 (p1 at 1.512, p4 at 2.099);
    # step 3: nearest 3 * mean - p2 - p3 = (1.92, 1.8): p4 = (2, 3) at 1.203 (p0 at 2.63, p1 at 2.75).
    # The three points nearest the mean would instead be p2, p3, p1: herding is not nearest-to-mean.
    assert herding_class(POINTS, 3) == [2, 3, 4]


def test_kcenter_matches_the_hand_worked_example():
    # start: p2 = (1, 0), nearest the mean; farthest from p2: p4 at sqrt(10) = 3.162 (p1 at 3);
    # distances to the nearest of {p2, p4}: p0 1, p1 min(3, 3.606) = 3, p3 min(2.2, 3.23) = 2.2 -> p1.
    assert kcenter_class(POINTS, 3) == [2, 4, 1]


def reference_herding(points: list[list[float]], k: int) -> list[int]:
    """Herding written out with plain Python lists: try every remaining point at every step."""
    n, d = len(points), len(points[0])
    mean = [sum(point[j] for point in points) / n for j in range(d)]
    chosen: list[int] = []
    for _ in range(k):
        best, best_gap = -1, math.inf
        for candidate in range(n):
            if candidate in chosen:
                continue
            members = [points[i] for i in chosen + [candidate]]
            centre = [sum(point[j] for point in members) / len(members) for j in range(d)]
            gap = math.dist(centre, mean)
            if gap < best_gap:
                best, best_gap = candidate, gap
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_herding_equals_the_brute_force_reference(seed):
    points = torch.randn(12, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert herding_class(points, 7) == reference_herding(points.tolist(), 7)


def reference_kcenter(points: list[list[float]], k: int) -> list[int]:
    """Greedy k-center with plain lists: the point nearest the mean, then the farthest from its nearest centre."""
    n, d = len(points), len(points[0])
    mean = [sum(point[j] for point in points) / n for j in range(d)]
    chosen = [min(range(n), key=lambda i: math.dist(points[i], mean))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(math.dist(points[i], points[c]) for c in chosen)))
    return chosen


def coverage_radius(points: list[list[float]], centres: list[int]) -> float:
    return max(min(math.dist(point, points[c]) for c in centres) for point in points)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kcenter_follows_the_greedy_rule_and_is_within_twice_the_optimal_radius(seed):
    points = torch.randn(9, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    k = 4
    chosen = kcenter_class(torch.tensor(points), k)
    mean = [sum(point[j] for point in points) / len(points) for j in range(2)]
    assert chosen[0] == min(range(len(points)), key=lambda i: math.dist(points[i], mean))
    for step in range(1, k):
        gaps = {i: min(math.dist(points[i], points[c]) for c in chosen[:step])
                for i in range(len(points)) if i not in chosen[:step]}
        assert gaps[chosen[step]] == pytest.approx(max(gaps.values()), rel=1e-12)
    optimal = min(coverage_radius(points, list(subset)) for subset in itertools.combinations(range(len(points)), k))
    assert coverage_radius(points, chosen) <= 2 * optimal + 1e-12  # Gonzalez 1985: greedy is a 2-approximation


@pytest.mark.parametrize("rule", sorted(SELECTION_RULES))
def test_selection_is_class_balanced_distinct_and_deterministic(rule):
    generator = torch.Generator().manual_seed(4)
    labels = torch.randperm(30, generator=generator) % 3
    features = torch.randn(30, 5, generator=generator)
    picks = select_indices(rule, features, labels, 4, 3)
    assert labels[picks].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(picks.tolist())) == 12
    assert torch.equal(picks, select_indices(rule, features.clone(), labels.clone(), 4, 3))


@pytest.mark.parametrize(("labels", "ipc", "message"), [
    ([0, 0, 1, 1], 1, "class 2 has 0 training image"),
    ([0, 0, 1, 1, 2], 2, "class 2 has 1 training image(s), fewer than ipc 2"),
    ([0, 1, 2], 0, "ipc must be a positive integer, got 0"),
])
def test_a_selection_a_class_cannot_serve_is_refused(labels, ipc, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        select_indices("herding", torch.zeros(len(labels), 2), torch.tensor(labels), ipc, 3)


def test_an_unknown_rule_is_refused_by_name():
    with pytest.raises(UserInputError, match="selection rule 'median' is not one of: herding, kcenter"):
        select_indices("median", torch.zeros(3, 2), torch.tensor([0, 1, 2]), 1, 3)


def build_pool(real, directory):
    train_proxy_pool(real, directory, arch="ConvNet-1-8", count=1, epochs=1, seed=3, progress=False, batch_size=64)
    return directory


@pytest.mark.parametrize(("rule", "reference"), [("herding", reference_herding), ("kcenter", reference_kcenter)])
def test_baseline_select_writes_the_reference_selection_with_its_provenance(rule, reference, real, tmp_path, capsys):
    pool_dir = build_pool(real, tmp_path / "pool")
    out = tmp_path / f"{rule}.safetensors"
    assert main(["baseline", "--ipc", "2", "--select", rule, "--proxies", str(pool_dir), "--out", str(out)]) == 0
    written = load_set(out)
    network = ProxyPool.load(pool_dir, real.info)[0]
    with torch.no_grad():
        features = F.normalize(network.embed(real.normalise(real.train_images)), dim=1).double()
    expected = []
    for label in range(10):
        members = torch.nonzero(real.train_labels == label).flatten()
        expected += members[reference(features[members].tolist(), 2)].tolist()
    assert torch.equal(written.images, real.normalise(real.train_images[expected]))
    assert written.labels.tolist() == [label for label in range(10) for _ in range(2)]
    assert written.metadata.method == rule
    assert written.metadata.extra["proxies"] == str(pool_dir)
    assert written.metadata.extra["proxy_arch"] == "ConvNet-1-8-in"  # the canonical name
    assert f"selected by {rule}" in capsys.readouterr().out


def test_baseline_random_is_unchanged_by_the_new_flags(striped_root, tmp_path):
    plain, explicit = tmp_path / "plain.safetensors", tmp_path / "explicit.safetensors"
    assert main(["baseline", "--ipc", "2", "--seed", "5", "--out", str(plain)]) == 0
    assert main(["baseline", "--ipc", "2", "--seed", "5", "--select", "random", "--out", str(explicit)]) == 0
    assert torch.equal(load_set(plain).images, load_set(explicit).images)
    assert load_set(plain).metadata.method == "random"


def refused(argv: list[str], capsys, out) -> str:
    """Run ``argv``; assert exit 2, one line on stderr and nothing written; return the line."""
    with pytest.raises(SystemExit) as exited:
        code = main(argv)
        raise SystemExit(code)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert not out.exists() and not out.with_suffix(".png").exists()
    return err


def test_bad_selections_are_refused_in_one_line_writing_nothing(real, tmp_path, capsys):
    out = tmp_path / "set.safetensors"
    base = ["baseline", "--ipc", "2", "--out", str(out)]
    assert "invalid choice: 'median'" in refused([*base, "--select", "median"], capsys, out)
    assert "give the pool with --proxies DIR" in refused([*base, "--select", "herding"], capsys, out)
    assert "--proxies is only used by" in refused([*base, "--proxies", str(tmp_path)], capsys, out)
    assert "does not exist" in refused([*base, "--select", "kcenter", "--proxies", str(tmp_path / "none")],
                                       capsys, out)
    too_many = ["baseline", "--ipc", "31", "--out", str(out), "--select", "kcenter", "--proxies", str(tmp_path)]
    assert "class 0 has 30 training image(s), fewer than ipc 31" in refused(too_many, capsys, out)
    other = dataclasses.replace(real, info=dataclasses.replace(real.info, mean=(0.5,)))
    pool_dir = build_pool(other, tmp_path / "other-pool")
    line = refused([*base, "--select", "herding", "--proxies", str(pool_dir)], capsys, out)
    assert "does not fit dataset 'fashion-mnist'" in line
