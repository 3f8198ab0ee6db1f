"""What a run writes out: the synthetic set as an artefact (:class:`~infodistill.artefact.DistilledSet`), its
images decoded from the (averaged) stored tensors and gathered whole in a split run, with the metadata that
records how it was distilled; never one holding a NaN or an infinity."""

from __future__ import annotations

import torch

from infodistill.artefact import DistilledSet, SetMetadata
from infodistill.data import RealData
from infodistill.files import RunFiles
from infodistill.loop.config import DistillConfig
from infodistill.loop.parts import ImageAverage
from infodistill.loop.split import ProcessSplit
from infodistill.loop.step import LossDiverged
from infodistill.methods import Method
from infodistill.regularizers.base import REGULARIZER_REGISTRY
from infodistill.synthetic import SyntheticSet
from infodistill.synthetic.base import parameterisation_class


def _set_metadata(config: DistillConfig, real: RealData, weights: dict[str, float], iterations: int,
                  synthetic: SyntheticSet, method: Method) -> SetMetadata:
    extra = {"model": config.model, "augment": str(config.augment), "init": str(config.init),
             "storage_floats": str(synthetic.storage_floats()), "budget_floats": str(synthetic.budget_floats()),
             **method.artefact_metadata()}
    extra.update(parameterisation_class(str(config.param)).artefact_metadata(config))  # its own settings
    if config.zca > 0:
        extra["zca"] = repr(config.zca)
    if config.experts is not None:
        extra["experts"] = str(config.experts)
    if config.ema_decay:
        extra["ema_decay"] = repr(config.ema_decay)
    if config.precision != "fp32":  # fp32 artefacts stay as they were before the setting existed
        extra["precision"] = config.precision
    for name in weights:  # each regularizer that was on records its own settings
        extra.update(REGULARIZER_REGISTRY[name].artefact_metadata(config))
    return SetMetadata(dataset=real.info.name, mean=tuple(real.info.mean), std=tuple(real.info.std),
                       classes=tuple(real.info.class_names), method=config.method, ipc=config.ipc, seed=config.seed,
                       parameterisation=str(config.param), regularizers=weights, iterations=iterations, extra=extra)


def _whole_stored(
    synthetic: SyntheticSet, average: ImageAverage | None, split: ProcessSplit
) -> dict[str, torch.Tensor]:
    """The set's (averaged) stored tensors gathered whole from the processes of a split run (a collective)."""
    source = average.shadow if average is not None else dict(synthetic.named_parameters())
    return {name: split.gather(synthetic, value) for name, value in source.items()}


def current_images(synthetic: SyntheticSet, average: ImageAverage | None, split: ProcessSplit | None) -> torch.Tensor:
    """The decoded (averaged) images of the whole set; gathered in a split run (every process calls this)."""
    with torch.no_grad():
        if split is not None:
            return torch.func.functional_call(synthetic, _whole_stored(synthetic, average, split), ())
        return average.images(synthetic) if average is not None else synthetic.images()


def distilled_set(synthetic: SyntheticSet, method: Method, average: ImageAverage | None, config: DistillConfig,
                   real: RealData, weights: dict[str, float], iterations: int,
                   split: ProcessSplit | None = None) -> DistilledSet:
    """The current state as an artefact: decoded (averaged) images, labels, the method's tensors. In a
    split run every process calls this (the set is gathered)."""
    with torch.no_grad():
        if split is None:
            images = average.images(synthetic) if average is not None else synthetic.images()
            stored = average.shadow if average is not None else synthetic.stored_tensors()
        else:
            split.refresh(synthetic)  # the method's tensors (SRe2L's soft labels) read the whole current set
            stored = _whole_stored(synthetic, average, split) if average is not None else \
                dict(synthetic.named_parameters())
            images = torch.func.functional_call(synthetic, stored, ())
        stored = {name: stored[name].detach().cpu().float().clone() for name in synthetic.stored_tensors()}
    extras = {name: value.detach().cpu().float().clone() for name, value in method.artefact_tensors().items()}
    return DistilledSet(images=images.detach().cpu().float().contiguous(), labels=synthetic.labels.cpu().clone(),
                        soft_labels=extras.get("soft_labels"), lr=extras.get("lr"), stored=stored,
                        metadata=_set_metadata(config, real, weights, iterations, synthetic, method))


def check_finite_set(distilled: DistilledSet, files: RunFiles) -> None:
    """Stop (:class:`LossDiverged`) rather than write an artefact holding a NaN or an infinity: every stepped
    tensor was finite, but decoding them (a low-rank product, an average) can still overflow."""
    for name in ("images", "soft_labels", "lr"):
        tensor = getattr(distilled, name)
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            kept = f"'{files.checkpoint}' is kept" if files.checkpoint.exists() else "no checkpoint was written"
            raise LossDiverged(f"the set's {name} are not finite after {distilled.metadata.iterations} iterations; "
                               f"the artefact was not written; {kept}")
