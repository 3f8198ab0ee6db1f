"""The functional student used by trajectory matching: forward, one SGD step, unrolled gradients."""

import pytest
import torch
import torch.nn.functional as F

from infodistill.errors import UserInputError
from infodistill.methods.student import FunctionalStudent, normalised_distance
from infodistill.models import build_model


def _student(name="ConvNet-2-4", dtype=torch.float64):
    model = build_model(name, channels=1, num_classes=3, image_size=(8, 8), seed=3).to(dtype)
    return model, FunctionalStudent(model)


def test_functional_forward_equals_the_module_forward():
    model, student = _student(dtype=torch.float32)
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    flat = student.flatten(model)
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(student(flat, images), model(images), rtol=0, atol=0)


def test_one_sgd_step_equals_a_torch_optimiser_step():
    model, student = _student()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 1, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (6,), generator=generator)
    stepped = student.sgd_step(student.flatten(model).requires_grad_(True), torch.tensor(0.05, dtype=torch.float64),
                               images, labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    torch.testing.assert_close(stepped.detach(), student.flatten(model))


@pytest.mark.parametrize("memory", ["full", "checkpoint"])
def test_unrolled_gradient_matches_finite_differences(memory):
    model, student = _student()
    generator = torch.Generator().manual_seed(2)
    start = student.flatten(model)
    target = start + 0.05 * torch.randn(start.shape, generator=generator, dtype=torch.float64)
    images = torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1])
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def loss(x, step_size):
        # two steps on the same batch: the second step's gradient depends on the first
        end = student.unroll(start, step_size, [(x, labels), (x, labels)], memory=memory)
        return normalised_distance(end, start, target)

    grad_images, grad_lr = torch.autograd.grad(loss(images, lr), [images, lr])
    direction = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    eps = 1e-5
    numeric = (loss(images.detach() + eps * direction, lr) - loss(images.detach() - eps * direction, lr)) / (2 * eps)
    torch.testing.assert_close((grad_images * direction).sum(), numeric.detach(), rtol=1e-5, atol=1e-9)
    numeric_lr = (loss(images.detach(), lr.detach() + eps) - loss(images.detach(), lr.detach() - eps)) / (2 * eps)
    torch.testing.assert_close(grad_lr, numeric_lr.detach(), rtol=1e-5, atol=1e-9)


def test_recomputed_unroll_gives_the_same_gradients_as_the_full_graph():
    model, student = _student()
    generator = torch.Generator().manual_seed(4)
    start = student.flatten(model)
    images = torch.randn(6, 1, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    label_logits = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    gradients = []
    for memory in ("full", "checkpoint"):
        soft = torch.softmax(label_logits, dim=1)  # learned soft labels (DATM) need gradients too
        batches = [(images[:3], soft[:3]), (images[3:], soft[3:]), (images[:3], soft[:3])]
        end = student.unroll(start, lr, batches, memory=memory)
        gradients.append(torch.autograd.grad(end.pow(2).sum(), [images, lr, label_logits]))
    for full, checkpointed in zip(*gradients):
        torch.testing.assert_close(full, checkpointed)


def test_normalised_distance_is_one_when_the_student_does_not_move_and_zero_on_target():
    start, target = torch.zeros(4), torch.tensor([1.0, 2.0, 0.0, 2.0])
    assert float(normalised_distance(start, start, target)) == pytest.approx(1.0)
    assert float(normalised_distance(target, start, target)) == 0.0
    assert float(normalised_distance(torch.tensor([0.5, 1.0, 0.0, 1.0]), start, target)) == pytest.approx(0.25)


def test_batch_norm_students_and_unknown_memory_modes_are_refused():
    model = build_model("ConvNet-2-4-bn", channels=1, num_classes=3, image_size=(8, 8), seed=0)
    with pytest.raises(UserInputError, match="batch norm"):
        FunctionalStudent(model)
    _, student = _student()
    with pytest.raises(UserInputError, match="memory 'tesla'"):
        student.unroll(torch.zeros(student.size), torch.tensor(0.1), [], memory="tesla")
