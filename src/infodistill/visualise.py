"""High-CMI vs low-CMI samples: each class's images ordered by their KL divergence to the class centroid.

The CMI of a set is the mean over its samples of KL(P_s || Q_y), where P_s is the softmax of a proxy's
penultimate features of sample s and Q_y the centroid of class y (see
:mod:`infodistill.regularizers.cmi`). Looking at the samples one by one shows what the term measures: a
sample with a low KL looks like the rest of its class, one with a high KL is an outlier the CMI
regularizer pulls in. :func:`save_ordered_grid` draws each class as a row, lowest KL on the left
(the idea of Figure 1 of the CMI paper, Zhong et al., ICLR 2025).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from infodistill.artefact import DistilledSet
from infodistill.errors import UserInputError
from infodistill.files import atomic_path
from infodistill.regularizers.cmi import per_sample_kl

if TYPE_CHECKING:
    from infodistill.proxies import ProxyPool

IMAGE_BATCH = 512
"""Images per forward pass: features do not depend on the batch (proxies are in eval mode)."""


@torch.no_grad()
def per_sample_cmi(pool: ProxyPool, images: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Each sample's KL(P_s || Q_{y(s)}), averaged over the pool's proxies: N values on the CPU.

    Per proxy it is :func:`~infodistill.regularizers.cmi.per_sample_kl` of the proxy's penultimate
    features (``embed``), the quantity whose mean is that proxy's CMI; so the mean of the returned values
    equals the mean of :func:`~infodistill.regularizers.cmi.pool_cmi`. A class with one sample has KL exactly 0.
    """
    if images.dim() != 4 or len(images) != len(labels):
        raise UserInputError(
            f"images must be N x C x H x W with one label each, got images {list(images.shape)} and "
            f"labels {list(labels.shape)}"
        )
    images = images.to(pool.device)
    labels = labels.to(pool.device)
    total: Tensor | None = None
    for position in range(len(pool)):
        proxy = pool[position]
        features = torch.cat([proxy.embed(batch) for batch in images.split(IMAGE_BATCH)])
        kl = per_sample_kl(features, labels, num_classes).to(torch.float64)
        total = kl if total is None else total + kl
    assert total is not None  # a pool holds at least one proxy
    return (total / len(pool)).cpu()


def class_order_by_kl(kl: Tensor, labels: Tensor, num_classes: int) -> list[list[int]]:
    """For each class 0..num_classes-1, the indices of its samples by ascending KL (ties keep index order).

    An empty class gives an empty list.
    """
    kl = torch.as_tensor(kl).detach().cpu()
    labels = torch.as_tensor(labels).detach().cpu()
    if kl.dim() != 1 or labels.dim() != 1 or len(kl) != len(labels):
        raise UserInputError(f"kl and labels must be one value per sample, got shapes {list(kl.shape)} and "
                             f"{list(labels.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserInputError(f"num_classes must be a positive integer, got {num_classes!r}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserInputError(f"labels span {int(labels.min())}..{int(labels.max())}; allowed are 0..{num_classes - 1}")
    values = kl.tolist()
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for index, label in enumerate(labels.tolist()):
        members[label].append(index)
    return [sorted(indices, key=lambda index: values[index]) for indices in members]  # sorted() is stable


def _spread(count: int, limit: int) -> list[int]:
    """``min(count, limit)`` ranks out of ``count``, evenly spaced and always including the first and last."""
    if count <= limit:
        return list(range(count))
    if limit == 1:
        return [0]
    return sorted({round(step * (count - 1) / (limit - 1)) for step in range(limit)})


def save_ordered_grid(distilled: DistilledSet, kl: Tensor, path: str | Path, max_per_class: int = 10,
                      class_names: Sequence[str] | None = None) -> Path:
    """Write a PNG: one row per class (labelled with its name), its samples left to right by ascending
    KL to the class centroid, each titled with its KL (3 significant digits).

    A class with more than ``max_per_class`` samples shows that many, evenly spaced in KL rank so that
    the lowest and the highest are always shown. Rows are labelled with ``class_names`` (the dataset's,
    when the caller has them), else with the names stored in the set. The file is written atomically.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserInputError(f"ordered grid '{path}' must end in .png")
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 1:
        raise UserInputError(f"max_per_class must be a positive integer, got {max_per_class!r}")
    kl = torch.as_tensor(kl).detach().cpu().to(torch.float64)
    if kl.shape != (len(distilled.labels),):
        raise UserInputError(f"kl must hold one value per image of the set ({len(distilled.labels)}), "
                             f"got shape {list(kl.shape)}")
    order = class_order_by_kl(kl, distilled.labels, distilled.num_classes)
    shown = [[indices[rank] for rank in _spread(len(indices), max_per_class)] for indices in order]
    columns = max(1, max(len(row) for row in shown))
    images = distilled.denormalised()

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 1.3 + 1.05 * columns), 0.6 + 1.2 * len(shown)), layout="constrained")
    FigureCanvasAgg(figure)
    try:
        axes = figure.subplots(len(shown), columns, squeeze=False)
        for row, (indices, name) in enumerate(zip(shown, class_names or distilled.metadata.classes)):
            for column in range(columns):
                axis = axes[row][column]
                axis.set_xticks([])
                axis.set_yticks([])
                if column < len(indices):
                    index = indices[column]
                    image = images[index]
                    if image.shape[0] == 1:
                        axis.imshow(image[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
                    else:
                        axis.imshow(image.permute(1, 2, 0).numpy())
                    axis.set_title(f"{float(kl[index]):.3g}", fontsize=7, pad=2)
                else:
                    axis.set_frame_on(False)
                if column == 0:
                    axis.set_ylabel(str(name), fontsize=8, rotation=0, ha="right", va="center")
        figure.suptitle("KL(P_s || Q_y) to the class centroid\nlow (typical) left, high (outlying) right", fontsize=9)
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    except OSError as error:
        raise UserInputError(f"cannot write '{path}': {error.strerror or error}") from None
    finally:
        figure.clear()
    return path
