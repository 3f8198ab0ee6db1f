"""The distillation loop: every method runs through it, resume is exact, NaN keeps the checkpoint, CMI works."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from conftest import initial_pixel_images, run_killed_after_iteration
from infodistill.artefact import load_set
from infodistill.data import ClassSampler, DatasetInfo
from infodistill.errors import UserInputError
from infodistill.loop import (
    DistillConfig,
    LossDiverged,
    calibrate_cmi_weight,
    distill,
)
from infodistill.methods import METHOD_REGISTRY, DistillContext, Method, register_method
from infodistill.methods.dm import DistributionMatching
from infodistill.models import build_model
from infodistill.proxies import ProxyPool, train_proxy_pool
from infodistill.regularizers import CMIRegularizer, cmi_from_features, pool_cmi
from infodistill.synthetic import PixelSet

TINY = dict(model="ConvNet-2-16", batch_real=16, ipc=3, checkpoint_every=2)


@pytest.fixture
def pool_dir(real, tmp_path):
    directory = tmp_path / "pool"
    train_proxy_pool(real, directory, arch="ConvNetGAP-1-8", count=3, epochs=1, progress=False)
    return directory


@pytest.mark.parametrize("method", ["dm", "dc", "dsa"])
def test_every_method_runs_through_the_loop_and_writes_the_artefact(method, real, tmp_path):
    loops = {} if method == "dm" else {"outer_loop": 2, "inner_loop": 1}
    config = DistillConfig(method=method, iterations=2, **loops, **TINY)
    result = distill(config, tmp_path / method, progress=False, real=real)
    distilled = load_set(result.artefact)
    assert distilled.images.shape == (30, 1, 28, 28)
    assert torch.bincount(distilled.labels).tolist() == [3] * 10
    assert (distilled.metadata.method, distilled.metadata.ipc, distilled.metadata.iterations) == (method, 3, 2)
    lines = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1]
    assert all(f"loss/{method}" in line and "loss/total" in line for line in lines)
    assert not torch.equal(distilled.images, initial_pixel_images(config, real))


def test_a_killed_run_resumed_ends_bit_identical_to_an_uninterrupted_one(real, pool_dir, tmp_path, monkeypatch):
    config = DistillConfig(method="dm", iterations=6, cmi_weight=50.0, proxies=str(pool_dir), **TINY)
    whole = distill(config, tmp_path / "whole", progress=False, real=real)

    run_killed_after_iteration(2, config, tmp_path / "killed", real, monkeypatch)
    with safe_open(str(tmp_path / "killed" / "checkpoint.safetensors"), framework="pt") as handle:
        assert handle.metadata()["iteration"] == "2"
    # Iteration 3 (index 2) done, its checkpoint (every 2) not yet due: the checkpoint is at 2.
    resumed = distill(config, tmp_path / "killed", resume=True, progress=False, real=real)

    a, b = load_set(whole.artefact), load_set(resumed.artefact)
    assert torch.equal(a.images, b.images) and a.metadata == b.metadata
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(real, tmp_path):
    @register_method("nan-after-2")
    class NanAfterTwo(DistributionMatching):
        def iteration(self, context):
            for loss in super().iteration(context):
                yield loss * float("nan") if context.iteration == 2 else loss

    try:
        config = DistillConfig(method="nan-after-2", iterations=5, **TINY)
        with pytest.raises(LossDiverged, match="iteration 2.*iteration 2"):
            distill(config, tmp_path / "run", progress=False, real=real)
    finally:
        METHOD_REGISTRY.pop("nan-after-2")
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert handle.metadata()["iteration"] == "2"
        assert torch.isfinite(handle.get_tensor("synthetic.pixels")).all()
    assert not (tmp_path / "run" / "set.safetensors").exists()


def test_cmi_regularizer_lowers_the_sets_cmi(real, pool_dir, tmp_path):
    pool = ProxyPool.load(pool_dir, real.info)
    # a step small enough that the term does not overshoot the tiny CMI of this toy set (a weight 20x larger
    # does: the CMI then grows)
    base = DistillConfig(method="dm", iterations=8, lr_images=0.1, **{**TINY, "checkpoint_every": 8})
    plain = distill(base, tmp_path / "plain", progress=False, real=real)
    regularized = distill(dataclasses.replace(base, cmi_weight="auto", cmi_auto_scale=0.25, proxies=str(pool_dir)),
                          tmp_path / "cmi", progress=False, real=real)
    cmi_plain = pool_cmi(pool, *(lambda s: (s.images, s.labels))(load_set(plain.artefact)), 10).mean()
    cmi_regularized = pool_cmi(pool, *(lambda s: (s.images, s.labels))(load_set(regularized.artefact)), 10).mean()
    assert cmi_regularized < cmi_plain
    metadata = load_set(regularized.artefact).metadata
    assert metadata.regularizers == {"cmi": regularized.regularizer_weights["cmi"]}
    calibration = json.loads(metadata.extra["cmi_calibration"])
    assert calibration["weight"] == regularized.regularizer_weights["cmi"] and calibration["scale"] == 0.25


class _QuadraticPull(Method):
    """A matching loss with a closed-form gradient: 0.5 * ||S - T||^2 has gradient S - T."""

    name = "quadratic-pull"

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    @staticmethod
    def defaults(ipc):
        raise NotImplementedError

    def iteration(self, context):
        yield 0.5 * (context.synthetic.images() - self.target).pow(2).sum()


def _pool_mean_cmi(pool, images, labels):
    return torch.stack([cmi_from_features(pool[k].embed(images), labels, pool.num_classes)
                        for k in range(len(pool))]).mean()


def test_auto_weight_sets_the_gradient_ratio_on_the_initial_set():
    """'auto' picks lambda with ||lambda grad CMI(S_0)|| = scale * target * ||grad L(S_0)||; the matching
    gradient is known in closed form (S - T) and the CMI gradient is taken by central finite differences."""
    info = DatasetInfo(name="tiny", channels=1, image_size=(4, 4), num_classes=2, class_names=("a", "b"),
                       mean=(0.0,), std=(1.0,))
    models = [build_model("ConvNetGAP-1-6", 1, 2, (4, 4), seed=10 + k).double().eval() for k in range(2)]
    pool = ProxyPool(models, "ConvNetGAP-1-6", info)
    generator = torch.Generator().manual_seed(0)
    real_images = torch.randn(8, 1, 4, 4, generator=generator, dtype=torch.float64)
    sampler = ClassSampler(real_images, torch.tensor([0, 1] * 4), 2)
    synthetic = PixelSet.initialise(sampler, 2, "real", generator).double()
    target = torch.randn(synthetic.images().shape, generator=generator, dtype=torch.float64)
    context = DistillContext(iteration=0, generator=generator, synthetic=synthetic, sampler=sampler, info=info,
                             augment=None, device=torch.device("cpu"), model_name="ConvNet-1-4")
    calibration = calibrate_cmi_weight(_QuadraticPull(target), CMIRegularizer(pool), [context], target_ratio=1.5,
                                       scale=2.0)

    images = synthetic.images().detach()
    labels = synthetic.labels
    method_norm = float((images - target).norm())  # closed form
    step, finite_difference = 1e-6, torch.zeros_like(images)
    with torch.no_grad():
        for index in range(images.numel()):
            offset = torch.zeros(images.numel(), dtype=torch.float64)
            offset[index] = step
            offset = offset.view_as(images)
            finite_difference.view(-1)[index] = (_pool_mean_cmi(pool, images + offset, labels)
                                                 - _pool_mean_cmi(pool, images - offset, labels)) / (2 * step)
    cmi_norm = float(finite_difference.norm())
    assert cmi_norm > 0
    assert calibration.method_grad_norm == pytest.approx(method_norm, rel=1e-9)
    assert calibration.cmi_grad_norm == pytest.approx(cmi_norm, rel=1e-4)
    assert calibration.weight == pytest.approx(2.0 * 1.5 * method_norm / cmi_norm, rel=1e-4)
    assert calibration.ratio == pytest.approx(3.0, rel=1e-9)


def test_auto_weight_refuses_a_cmi_without_gradient():
    """At IPC 1 with pixel images every class is its own centroid: CMI is 0 with zero gradient, so 'auto'
    has nothing to calibrate and says so."""
    info = DatasetInfo(name="tiny", channels=1, image_size=(4, 4), num_classes=2, class_names=("a", "b"),
                       mean=(0.0,), std=(1.0,))
    pool = ProxyPool([build_model("ConvNetGAP-1-6", 1, 2, (4, 4), seed=1).eval()], "ConvNetGAP-1-6", info)
    generator = torch.Generator().manual_seed(0)
    sampler = ClassSampler(torch.randn(4, 1, 4, 4, generator=generator), torch.tensor([0, 1, 0, 1]), 2)
    synthetic = PixelSet.initialise(sampler, 1, "real", generator)
    context = DistillContext(iteration=0, generator=generator, synthetic=synthetic, sampler=sampler, info=info,
                             augment=None, device=torch.device("cpu"), model_name="ConvNet-1-4")
    with pytest.raises(UserInputError, match="cannot calibrate: the CMI term's gradient on the initial set is 0"):
        calibrate_cmi_weight(_QuadraticPull(torch.zeros(2, 1, 4, 4)), CMIRegularizer(pool), [context], 1.0)


def test_run_directories_are_protected(real, tmp_path):
    config = DistillConfig(method="dm", iterations=2, **TINY)
    distill(config, tmp_path / "run", progress=False, real=real)
    before = (tmp_path / "run" / "set.safetensors").read_bytes()
    with pytest.raises(UserInputError, match="already holds a run"):
        distill(config, tmp_path / "run", progress=False, real=real)
    with pytest.raises(UserInputError, match="ipc was 3 in the run but is 4 now"):
        distill(dataclasses.replace(config, ipc=4), tmp_path / "run", resume=True, progress=False, real=real)
    (tmp_path / "run" / "checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserInputError, match="corrupt"):
        distill(config, tmp_path / "run", resume=True, progress=False, real=real)
    with pytest.raises(UserInputError, match="does not exist"):
        distill(config, tmp_path / "other", resume=True, progress=False, real=real)
    assert (tmp_path / "run" / "set.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "changes, fragment",
    [({"cmi_weight": -1.0, "proxies": "p"}, "cmi_weight must be a number >= 0"),
     ({"cmi_weight": "lots", "proxies": "p"}, "'lots'"),
     ({"cmi_weight": 10.0}, "needs a proxy pool"),
     ({"method": "dd"}, "unknown method 'dd'"),
     ({"ipc": 0}, "ipc must be a positive integer"),
     ({"param": "wavelets"}, "param 'wavelets'")],
)
def test_bad_settings_are_refused(changes, fragment):
    with pytest.raises(UserInputError, match=fragment):
        dataclasses.replace(DistillConfig(), **changes).validate()


def test_a_pool_for_another_dataset_is_refused(real, tmp_path):
    other = dataclasses.replace(real, info=dataclasses.replace(real.info, name="mnist", mean=(0.1307,), std=(0.3081,)))
    train_proxy_pool(other, tmp_path / "mnist-pool", arch="ConvNetGAP-1-8", count=1, epochs=1, progress=False)
    config = DistillConfig(method="dm", iterations=1, cmi_weight=1.0, proxies=str(tmp_path / "mnist-pool"), **TINY)
    with pytest.raises(UserInputError, match="mnist"):
        distill(config, tmp_path / "run", progress=False, real=real)


def test_periodic_evaluation_logs_the_accuracy_of_the_current_set(real, tmp_path):
    config = DistillConfig(method="dm", iterations=2, eval_every=2, eval_epochs=2, eval_runs=1,
                           eval_model="ConvNet-1-8", **TINY)
    distill(config, tmp_path / "run", progress=False, real=real)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/accuracy" not in lines[0] and 0.0 <= lines[1]["eval/accuracy"] <= 100.0


def test_a_run_with_a_pool_logs_its_sets_cmi_with_and_without_the_term(real, pool_dir, tmp_path):
    pool = ProxyPool.load(pool_dir, real.info)
    for name, weight in (("plain", 0.0), ("cmi", 50.0)):
        config = DistillConfig(method="dm", iterations=5, monitor_every=2, cmi_weight=weight, proxies=str(pool_dir),
                               **TINY)
        result = distill(config, tmp_path / name, progress=False, real=real)
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        # every 2 iterations and at the end
        assert [line["iteration"] for line in lines if "monitor/cmi" in line] == [1, 3, 4]
        assert ("loss/cmi" in lines[0]) == (weight > 0)
        distilled = load_set(result.artefact)
        expected = float(pool_cmi(pool, distilled.images, distilled.labels, 10).mean())
        assert lines[-1]["monitor/cmi"] == pytest.approx(expected, rel=1e-5)


def test_runs_sharing_a_load_cache_read_the_pool_once_and_compute_the_same(real, pool_dir, tmp_path):
    from infodistill.trained import LoadCache

    config = DistillConfig(method="dm", iterations=2, cmi_weight=50.0, proxies=str(pool_dir), **TINY)
    alone = load_set(distill(config, tmp_path / "alone", progress=False, real=real).artefact)
    cache = LoadCache()
    shared = [load_set(distill(dataclasses.replace(config, seed=seed), tmp_path / f"shared{seed}", progress=False,
                               real=real, cache=cache).artefact) for seed in (0, 1)]
    assert cache.reads == 1
    assert torch.equal(shared[0].images, alone.images)
    assert not torch.equal(shared[1].images, alone.images)


def test_image_average_follows_the_warmed_up_decay():
    from infodistill.loop import ImageAverage

    synthetic = PixelSet(2, 1, (1, 2, 2))
    average = ImageAverage(synthetic, decay=0.9)
    # Warmed-up decays 2/11, 3/12, 4/13 (all below 0.9), computed by hand from the average's starting zeros:
    # 9/11 * 1 = 9/11; 1/4 * 9/11 + 3/4 * 3 = 27/11; 4/13 * 27/11 + 9/13 * (-2) = -90/143.
    seen = []
    for value in (1.0, 3.0, -2.0):
        with torch.no_grad():
            synthetic.pixels.fill_(value)
        average.update(synthetic)
        seen.append(float(average.images(synthetic)[0, 0, 0, 0]))
    assert seen == pytest.approx([9 / 11, 27 / 11, -90 / 143], rel=1e-6)
    assert float(synthetic.pixels.detach()[0, 0, 0, 0]) == -2.0  # the live set is untouched


def test_a_per_class_update_shows_the_regularizers_that_class_only():
    from infodistill.loop import RegularizerTerm, run_iteration
    from infodistill.methods import ClassUpdate, Method
    from infodistill.regularizers import Regularizer

    class OneClass(Method):
        name = "one-class"

        @staticmethod
        def defaults(ipc):
            raise NotImplementedError

        def iteration(self, context):
            yield ClassUpdate(context.synthetic.class_images(1).pow(2).sum(), 1)

    class Recorder(Regularizer):
        def loss(self, images, labels, generator):
            self.seen = (images.detach().clone(), labels.clone())
            return images.sum() * 0

    synthetic = PixelSet(3, 2, (1, 2, 2))
    with torch.no_grad():
        synthetic.pixels.copy_(torch.arange(24, dtype=torch.float32).view(6, 1, 2, 2))
    before = synthetic.pixels.detach().clone()
    recorder = Recorder()
    context = type("Context", (), {"synthetic": synthetic, "iteration": 0, "generator": torch.Generator(),
                                   "regularizer_generator": lambda self, update: torch.Generator()})()
    optimizer = torch.optim.SGD([{"params": [synthetic.pixels], "name": "synthetic"}], lr=0.1)
    run_iteration(OneClass(), [RegularizerTerm("rec", recorder, 1.0)], context, optimizer)
    images, labels = recorder.seen
    torch.testing.assert_close(images, before[2:4])
    assert labels.tolist() == [1, 1]
    # d/dx sum x^2 = 2x: only class 1's images move, by lr * 2x
    torch.testing.assert_close(synthetic.pixels.detach()[2:4], before[2:4] * (1 - 0.2))
    torch.testing.assert_close(synthetic.pixels.detach()[[0, 1, 4, 5]], before[[0, 1, 4, 5]])


def test_an_adam_run_with_cosine_schedule_resumes_bit_identically_and_follows_the_schedule(real, tmp_path,
                                                                                          monkeypatch):
    import math

    from infodistill.loop import schedule_factor

    assert [schedule_factor("cosine", t, 4) for t in (0, 2)] == [1.0, pytest.approx(0.5)]
    assert schedule_factor("cosine", 3, 4) == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))
    assert schedule_factor("constant", 3, 4) == 1.0
    config = DistillConfig(method="dm", iterations=5, optimizer="adam", lr_schedule="cosine", lr_images=0.05, **TINY)
    seen_rates = []
    original_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen_rates.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    whole = distill(config, tmp_path / "whole", progress=False, real=real)
    assert seen_rates == [pytest.approx(0.05 * schedule_factor("cosine", t, 5)) for t in range(5)]

    run_killed_after_iteration(2, config, tmp_path / "killed", real, monkeypatch)
    with safe_open(str(tmp_path / "killed" / "checkpoint.safetensors"), framework="pt") as handle:
        assert {"optimizer.exp_avg.synthetic.0", "optimizer.exp_avg_sq.synthetic.0"} <= set(handle.keys())
    resumed = distill(config, tmp_path / "killed", resume=True, progress=False, real=real)
    assert torch.equal(load_set(whole.artefact).images, load_set(resumed.artefact).images)


def test_mim_runs_through_the_loop_learns_its_heads_and_resumes_bit_identically(real, pool_dir, tmp_path,
                                                                               monkeypatch):
    config = DistillConfig(method="dm", iterations=4, mim_weight=0.5, mim_real_per_class=4, proxies=str(pool_dir),
                           **TINY)
    whole = distill(config, tmp_path / "whole", progress=False, real=real)
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/mim" in line for line in lines)
    distilled = load_set(whole.artefact)
    assert distilled.metadata.regularizers == {"mim": 0.5} and distilled.metadata.extra["mim_layers"] == "1"

    run_killed_after_iteration(2, config, tmp_path / "killed", real, monkeypatch)
    with safe_open(str(tmp_path / "killed" / "checkpoint.safetensors"), framework="pt") as handle:
        heads = handle.get_tensor("learned.mim.0")
    from infodistill.regularizers import MIMRegularizer

    assert heads.shape[1] == ProxyPool.load(pool_dir, real.info)[0].feature_dim
    resumed = distill(config, tmp_path / "killed", resume=True, progress=False, real=real)
    assert torch.equal(distilled.images, load_set(resumed.artefact).images)
    assert MIMRegularizer.name == "mim"


def test_mim_is_refused_for_a_method_that_does_not_read_real_data(real, tmp_path):
    @register_method("teacher-only")
    class TeacherOnly(DistributionMatching):
        reads_real_data = False

    try:
        with pytest.raises(UserInputError, match="mim_weight 0.5 needs real data, but method 'teacher-only'"):
            distill(DistillConfig(method="teacher-only", iterations=1, mim_weight=0.5, **TINY), tmp_path / "run",
                    progress=False, real=real)
    finally:
        METHOD_REGISTRY.pop("teacher-only")
    assert not (tmp_path / "run").exists()
