"""infodistill: dataset distillation with the class-aware CMI regularizer.

The public face for use from Python: load a dataset, distil it, score the set, compare with a random subset::

    from infodistill import DistillConfig, EvalConfig, distill, evaluate_set, load_dataset, load_set

The names below are re-exported from the modules that define them (``infodistill.loop``,
``infodistill.evaluate``, ...); importing the package only imports those modules.
"""

from importlib.metadata import PackageNotFoundError, version

__version__: str
try:
    __version__ = version("infodistill")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# After __version__: the modules below read it from this package while it is being imported.
from infodistill.artefact import DistilledSet, load_set, save_set  # noqa: E402
from infodistill.data import RealData, load_dataset  # noqa: E402
from infodistill.evaluate import EvalResult, evaluate_set, random_subset  # noqa: E402
from infodistill.loop import DistillConfig, DistillResult, distill  # noqa: E402
from infodistill.proxies import ProxyPool, load_proxy_pool, train_proxy_pool  # noqa: E402
from infodistill.training import EvalConfig  # noqa: E402

__all__ = [
    "DistillConfig",
    "DistillResult",
    "DistilledSet",
    "EvalConfig",
    "EvalResult",
    "ProxyPool",
    "RealData",
    "__version__",
    "distill",
    "evaluate_set",
    "load_dataset",
    "load_proxy_pool",
    "load_set",
    "random_subset",
    "save_set",
    "train_proxy_pool",
]
