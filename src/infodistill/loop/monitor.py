"""What a run measures on the way: the set's CMI under the proxy pools (the optimised one and a held-out one,
which must be disjoint from it) and periodic evaluation of the current set."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from infodistill.artefact import DistilledSet
from infodistill.data import RealData
from infodistill.errors import UserInputError
from infodistill.evaluate import EvalResult, evaluate_set
from infodistill.loop.config import DistillConfig
from infodistill.loop.output import current_images
from infodistill.loop.parts import ImageAverage
from infodistill.loop.split import ProcessSplit
from infodistill.parallel import is_main
from infodistill.proxies import ProxyPool
from infodistill.regularizers.cmi import pool_cmi
from infodistill.synthetic import SyntheticSet
from infodistill.training import EvalConfig


def monitored_cmi(pool: ProxyPool, synthetic: SyntheticSet, average: ImageAverage | None, num_classes: int,
                   split: ProcessSplit | None = None) -> float | None:
    """The set's CMI under the whole pool (mean over proxies): logged for runs with and without the term.
    In a split run every process calls this; rank 0 computes it, the others get None."""
    images = current_images(synthetic, average, split)
    if split is not None and not is_main(split.group):
        return None
    with torch.no_grad():
        return float(pool_cmi(pool, images.detach(), synthetic.labels, num_classes).mean())


def evaluate_now(snapshot: DistilledSet, real: RealData, config: DistillConfig,
                  device: torch.device | None = None) -> EvalResult:
    """The current set under the evaluation protocol (periodic evaluation), each run's accuracy. The runs'
    seeds derive from the run seed alone, so two runs of one seed (with and without a term) are scored
    with the same evaluation seeds: a paired comparison."""
    eval_config = EvalConfig(model=config.eval_model, epochs=config.eval_epochs, runs=config.eval_runs,
                             seed=config.seed, device=str(device) if device is not None else config.device)
    return evaluate_set(snapshot, real, eval_config, progress=False)


def check_held_out(pool: ProxyPool | None, held_out: ProxyPool) -> None:
    """Refuse a held-out pool that is not disjoint from the optimised one (a proxy file with the same
    content, or the same training seed and architecture), or that cannot measure the CMI (unpooled)."""
    held_out.require_pooled("the held-out CMI")
    if pool is None:
        return
    optimised = {_file_digest(record.path): record for record in pool.records if record.path is not None}
    for record in held_out.records:
        if record.path is None:
            continue
        twin, same = optimised.get(_file_digest(record.path)), "file"
        if twin is None and held_out.arch == pool.arch:
            twin, same = next((other for other in pool.records if other.seed == record.seed), None), "training seed"
        if twin is not None:
            raise UserInputError(f"the held-out pool shares a proxy with the optimised pool: {record.path} is the "
                                 f"proxy of {twin.path} (same {same}); build the held-out proxies with another --seed")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
