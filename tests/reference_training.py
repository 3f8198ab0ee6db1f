"""An independent reference for the networks the library trains on real data (proxies, experts): the published
recipe written out as a plain loop, without the library's trainer (no batching of runs, no autocast, no jobs).

The recipe, as documented in docs/cmi.md (proxies) and docs/trajectory.md (experts): a network initialised from the
run's seed; per epoch a permutation of the training images drawn from a generator seeded with the same seed,
cut into minibatches; DSA (when used) drawn from that generator per minibatch, after the permutation; SGD with
momentum and weight decay on the cross-entropy, at a constant learning rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infodistill.augment import DSA
from infodistill.models import build_model


def sgd_reference(model_name: str, images: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int, lr: float,
                  momentum: float, weight_decay: float, batch_size: int, dsa: bool = False,
                  num_classes: int = 10) -> torch.nn.Module:
    """The network trained by the recipe above."""
    model = build_model(model_name, channels=images.shape[1], num_classes=num_classes,
                        image_size=tuple(images.shape[-2:]), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    augment = DSA() if dsa else None
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(batch_size):
            batch = images[index]
            if augment is not None:
                batch = augment(batch, generator)
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model
