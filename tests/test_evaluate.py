"""The evaluation protocol: the SGD recipe step by step, batched == sequential, accuracy, baseline."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infodistill.artefact import DistilledSet, SetMetadata
from infodistill.data import DatasetInfo, load_dataset
from infodistill.errors import UserInputError
from infodistill.evaluate import check_set_fits, evaluate_set, random_subset
from infodistill.models import build_model
from infodistill.seeds import run_seeds
from infodistill.training import EvalConfig, lr_at_epoch, top1_accuracy, train_from_scratch


def test_lr_schedule_drops_tenfold_for_the_second_half():
    assert [lr_at_epoch(0.01, epoch, 1000) for epoch in (0, 499)] == [0.01, 0.01]
    assert lr_at_epoch(0.01, 500, 1000) == pytest.approx(0.001)
    assert lr_at_epoch(0.01, 999, 1000) == pytest.approx(0.001)
    assert [lr_at_epoch(1.0, epoch, 3) for epoch in range(3)] == [1.0, 1.0, pytest.approx(0.1)]
    assert lr_at_epoch(1.0, 0, 1) == 1.0
    assert [lr_at_epoch(0.5, epoch, 4, "constant") for epoch in range(4)] == [0.5] * 4


def test_run_seeds_are_reproducible_and_distinct():
    assert run_seeds(0, 5) == run_seeds(0, 5)
    assert len(set(run_seeds(0, 5))) == 5
    assert set(run_seeds(0, 5)).isdisjoint(run_seeds(1, 5))


def test_two_full_batch_epochs_follow_sgd_with_momentum_weight_decay_and_the_schedule_by_hand():
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(8, 1, 28, 28, generator=generator)
    labels = torch.arange(8) % 4
    config = EvalConfig(model="ConvNet-1-8", epochs=2, lr=0.1, momentum=0.9, weight_decay=0.01,
                        batch_size=8, augment="none", runs=1)
    seed = run_seeds(0, 1)[0]
    (trained,), _ = train_from_scratch(images, labels, 4, config, [seed], progress=False)

    reference = build_model("ConvNet-1-8", channels=1, num_classes=4, image_size=(28, 28), seed=seed)
    weights = [p.detach().clone() for p in reference.parameters()]
    velocity = None
    for step_lr in (0.1, 0.01):  # epoch 0 at lr, epoch 1 (second half) at lr x 0.1
        with torch.no_grad():
            for parameter, value in zip(reference.parameters(), weights):
                parameter.copy_(value)
        loss = F.cross_entropy(reference(images), labels)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        steps = [g + 0.01 * w for g, w in zip(grads, weights)]
        velocity = steps if velocity is None else [0.9 * v + s for v, s in zip(velocity, steps)]
        weights = [w - step_lr * v for w, v in zip(weights, velocity)]
    for parameter, expected in zip(trained.parameters(), weights):
        torch.testing.assert_close(parameter.detach(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_name, soft", [("ConvNet-2-8", False), ("ConvNet-2-8-bn", True)])
def test_batched_runs_train_the_same_networks_as_sequential_runs(model_name, soft):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(40, 1, 28, 28, generator=generator)
    labels = torch.arange(40) % 10
    targets = torch.softmax(torch.randn(40, 10, generator=generator), 1) if soft else labels
    config = EvalConfig(model=model_name, epochs=3, batch_size=16, augment="dsa", runs=3)
    seeds = run_seeds(7, 3)
    sequential, together_a = train_from_scratch(images, targets, 10,
                                                EvalConfig(**{**config.__dict__, "batched": "off"}), seeds,
                                                progress=False)
    batched, together_b = train_from_scratch(images, targets, 10, EvalConfig(**{**config.__dict__, "batched": "on"}),
                                             seeds, progress=False)
    assert (together_a, together_b) == (False, True)
    for one, other in zip(sequential, batched):
        for (name, a), (_, b) in zip(one.state_dict().items(), other.state_dict().items()):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-4, rtol=1e-3, msg=name)
    # the runs differ from each other: different seeds give different networks
    assert not torch.allclose(sequential[0].classifier.weight, sequential[1].classifier.weight)


class FixedPredictor(nn.Module):
    """Predicts the class given in the first input value; a hand-checkable model."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.one_hot(x.flatten(1)[:, 0].long(), 10).float() + self.dummy


def test_accuracy_counts_correct_predictions():
    predicted = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    images = predicted.float().view(8, 1, 1, 1)
    labels = torch.tensor([0, 1, 2, 0, 0, 5, 0, 7])  # 5 of 8 right
    assert top1_accuracy(FixedPredictor(), images, labels, batch_size=3) == pytest.approx(62.5)


def make_distilled(shape=(1, 28, 28), classes=10, per_class=2):
    labels = torch.arange(classes).repeat_interleave(per_class)
    metadata = SetMetadata(dataset="fashion-mnist", mean=(0.2861,) * shape[0], std=(0.353,) * shape[0],
                           classes=tuple(map(str, range(classes))), method="test", ipc=per_class, seed=0)
    return DistilledSet(images=torch.zeros(len(labels), *shape), labels=labels, metadata=metadata)


def test_sets_that_do_not_fit_the_dataset_are_refused():
    info = DatasetInfo(name="fashion-mnist", channels=1, image_size=(28, 28), num_classes=10,
                       class_names=tuple(map(str, range(10))), mean=(0.2861,), std=(0.353,))
    check_set_fits(make_distilled(), info)
    with pytest.raises(UserInputError, match="3x32x32 but dataset 'fashion-mnist' has 1x28x28"):
        check_set_fits(make_distilled(shape=(3, 32, 32)), info)
    with pytest.raises(UserInputError, match="100 classes but dataset 'fashion-mnist' has 10"):
        check_set_fits(make_distilled(classes=100), info)


def test_random_subset_is_balanced_seeded_and_made_of_real_training_images(striped_root):
    real = load_dataset("fashion-mnist")
    subset = random_subset(real, ipc=3, seed=5)
    assert torch.bincount(subset.labels).tolist() == [3] * 10
    assert torch.equal(random_subset(real, 3, seed=5).images, subset.images)
    assert not torch.equal(random_subset(real, 3, seed=6).images, subset.images)
    train_images, train_labels = real.train_tensors()
    for image, label in zip(subset.images, subset.labels):
        matches = (train_images - image).flatten(1).abs().amax(1) == 0
        assert matches.any() and set(train_labels[matches].tolist()) == {int(label)}
    with pytest.raises(UserInputError, match="31"):
        random_subset(real, ipc=31, seed=0)


def test_evaluation_learns_a_learnable_set_and_uses_stored_lr_and_soft_labels(striped_root):
    real = load_dataset("fashion-mnist")
    subset = random_subset(real, ipc=5, seed=0)
    config = EvalConfig(model="ConvNet-2-16", epochs=40, runs=2, seed=1)
    result = evaluate_set(subset, real, config, progress=False)
    assert result.labels == "hard" and result.lr == 0.01 and result.test_size == 100
    assert len(result.accuracies) == 2 and result.mean > 90.0
    soft = copy.copy(subset)
    soft.soft_labels = F.one_hot(subset.labels, 10).float()
    soft.lr = torch.tensor([0.02])
    soft_result = evaluate_set(soft, real, EvalConfig(model="ConvNet-2-16", epochs=1, runs=1), progress=False)
    assert (soft_result.labels, soft_result.lr) == ("soft", pytest.approx(0.02))


def test_after_epoch_sees_every_epoch_of_every_run_with_the_weights_of_that_moment():
    images = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 3
    config = EvalConfig(model="ConvNet-1-8", epochs=3, runs=2, batch_size=12, augment="none", batched="on")
    seen = []
    models, together = train_from_scratch(
        images, labels, 3, config, run_seeds(0, 2), progress=False,
        after_epoch=lambda run, epoch, model: seen.append((run, epoch, model.classifier.weight.detach().clone())))
    assert not together  # recording epochs trains the runs one after another
    assert [(run, epoch) for run, epoch, _ in seen] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert torch.equal(seen[2][2], models[0].classifier.weight) and torch.equal(seen[5][2], models[1].classifier.weight)
    assert not torch.equal(seen[0][2], seen[1][2])


def test_cosine_schedule_follows_half_a_cosine_per_epoch():
    import math

    assert lr_at_epoch(0.2, 0, 4, "cosine") == pytest.approx(0.2)
    assert lr_at_epoch(0.2, 2, 4, "cosine") == pytest.approx(0.1)
    assert lr_at_epoch(0.2, 3, 4, "cosine") == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_the_temperature_loss_has_the_gradient_of_kl_to_soft_labels_at_that_temperature():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 5, generator=generator, requires_grad=True)
    soft = torch.softmax(torch.randn(6, 5, generator=generator) / 20.0, dim=1)
    from infodistill.training import _run_loss

    (ours,) = torch.autograd.grad(_run_loss(logits, soft, temperature=20.0), logits)
    kl = F.kl_div(F.log_softmax(logits / 20.0, dim=1), soft, reduction="batchmean")
    (reference,) = torch.autograd.grad(kl, logits)
    torch.testing.assert_close(ours, reference)


def test_two_full_batch_epochs_of_the_kd_recipe_follow_adamw_and_the_cosine_schedule_by_hand():
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(6, 1, 28, 28, generator=generator)
    soft = torch.softmax(torch.randn(6, 3, generator=generator), dim=1)
    config = EvalConfig(model="ConvNet-1-8-none", epochs=2, lr=0.01, weight_decay=0.1, batch_size=6, augment="none",
                        runs=1, optimizer="adamw", lr_schedule="cosine", temperature=4.0)
    seed = run_seeds(0, 1)[0]  # no norm layer: instance norm would make the conv bias's gradient round-off noise
    (trained,), _ = train_from_scratch(images, soft, 3, config, [seed], progress=False)

    reference = build_model("ConvNet-1-8-none", channels=1, num_classes=3, image_size=(28, 28), seed=seed)
    weights = [p.detach().clone() for p in reference.parameters()]
    first = [torch.zeros_like(w) for w in weights]
    second = [torch.zeros_like(w) for w in weights]
    for step, step_lr in enumerate((0.01, 0.005), start=1):  # cosine over 2 epochs: lr, then lr * 0.5
        with torch.no_grad():
            for parameter, value in zip(reference.parameters(), weights):
                parameter.copy_(value)
        kl = F.kl_div(F.log_softmax(reference(images) / 4.0, dim=1), soft, reduction="batchmean")
        grads = torch.autograd.grad(kl, list(reference.parameters()))
        first = [0.9 * m + 0.1 * g for m, g in zip(first, grads)]
        second = [0.999 * v + 0.001 * g * g for v, g in zip(second, grads)]
        weights = [w * (1 - step_lr * 0.1) - step_lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
                   for w, m, v in zip(weights, first, second)]
    for parameter, expected in zip(trained.parameters(), weights):
        torch.testing.assert_close(parameter.detach(), expected, atol=1e-6, rtol=1e-5)


def test_relabelled_sets_are_scored_with_the_kd_recipe_unless_the_protocol_is_asked_for(striped_root):
    real = load_dataset("fashion-mnist")
    subset = random_subset(real, ipc=2, seed=0)
    subset.soft_labels = F.one_hot(subset.labels, 10).float() * 0.9 + 0.01
    subset.metadata.extra["relabel_temperature"] = "20.0"
    result = evaluate_set(subset, real, EvalConfig(model="ConvNet-1-8", epochs=1, runs=1), progress=False)
    assert (result.recipe, result.lr, result.temperature, result.labels) == ("kd", 0.001, 20.0, "soft")
    assert "KD recipe (AdamW lr 0.001, cosine, temperature 20)" in result.summary()
    protocol = evaluate_set(subset, real, EvalConfig(model="ConvNet-1-8", epochs=1, runs=1, recipe="protocol"),
                            progress=False)
    assert (protocol.recipe, protocol.lr, protocol.temperature) == ("protocol", 0.01, 1.0)
    hard = evaluate_set(subset, real, EvalConfig(model="ConvNet-1-8", epochs=1, runs=1, use_soft_labels=False),
                        progress=False)
    assert (hard.recipe, hard.labels) == ("protocol", "hard")
