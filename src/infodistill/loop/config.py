"""The settings of a distillation run: :class:`DistillConfig`, the union of every part's settings, how it is
built from a mapping (a YAML file plus flags) and checked, and which settings a resumed run may change."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from infodistill.config import check_seed, config_from_mapping
from infodistill.errors import UserInputError
from infodistill.methods import METHOD_REGISTRY, MethodDefaults, method_class, method_fields
from infodistill.methods.base import MatchingSettings
from infodistill.methods.datm import DATMSettings
from infodistill.methods.gradient_matching import GradientMatchingSettings
from infodistill.methods.idc import IDCSettings
from infodistill.methods.mtt import TrajectorySettings
from infodistill.methods.sre2l import DWASettings, RecoverSettings
from infodistill.models import parse_model_name
from infodistill.precision import PRECISIONS
from infodistill.regularizers.base import REGULARIZER_REGISTRY, regularizers_on
from infodistill.regularizers.cmi import CMISettings, cmi_weight_active
from infodistill.regularizers.mim import MIMSettings
from infodistill.settings import AT_LEAST_ONE, POSITIVE, Bounds, check_values, setting
from infodistill.synthetic import INITS, PARAMETERISATION_REGISTRY, parameterisation_settings
from infodistill.synthetic.lowrank import LowRankSettings
from infodistill.synthetic.multi import MultiSettings
from infodistill.training import resolve_device

# Settings that may differ between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "eval_every", "eval_epochs", "eval_runs", "eval_model",
                     "monitor_every", "device", "data_root")


SETTINGS_OF_OLDER_RUNS = {"precision": "fp32"}
"""Settings added after checkpoints were first written, with the value that runs written before them used
(a checkpoint without the key is compared with this value on resume)."""


LOOP_FIELDS = frozenset({
    "dataset", "method", "ipc", "iterations", "param", "init", "model", "lr_images", "momentum_images", "optimizer",
    "lr_schedule", "ema_decay", "zca", "cmi_weight", "mim_weight", "proxies", "held_out_proxies", "seed", "device",
    "precision", "data_root", "checkpoint_every", "eval_every", "monitor_every", "eval_model", "eval_epochs",
    "eval_runs",
})
"""``DistillConfig`` fields the loop reads in every run, whatever the method, parameterisation and regularizers
(``cmi_weight`` and ``mim_weight`` are the switches of their regularizers). Every other field belongs to the
parts that declare it (:func:`part_fields`); validation refuses it when it is set and no chosen part reads it."""


METHOD_DEFAULT_FIELDS = ("iterations", "lr_images", "momentum_images", "batch_real", "augment", "param", "ema_decay",
                         "init", "optimizer", "lr_schedule")
"""The fields :meth:`DistillConfig.with_method_defaults` fills from the method's published settings."""


OPTIMIZERS = ("sgd", "adam")


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class RunSettings:
    """What a run distils, with which network, for how long, and what it logs and evaluates on the way."""

    title: ClassVar[str] = "run"
    dataset: str = setting("fashion-mnist", "dataset name", metavar="NAME")
    data_root: str | None = setting(None, "data root", metavar="DIR",
                                    default_text="$INFODISTILL_DATA or ~/.cache/infodistill/data")
    method: str = setting("dm", "distillation method: dm, dc, dsa, mtt, datm, idc, sre2l, dwa", metavar="NAME")
    ipc: int = setting(10, "synthetic images per class", bounds=AT_LEAST_ONE, metavar="N")
    iterations: int | None = setting(None, "iterations", bounds=AT_LEAST_ONE, metavar="N",
                                     default_text="the method's, DM 20000, DC/DSA 1000")
    param: str | None = setting(None, "parameterisation: pixels, lowrank, multi", metavar="NAME",
                                default_text="the method's; idc: multi")
    init: str | None = setting(None, "start from real images or noise", choices=INITS, default_text="real")
    model: str = setting("ConvNet-3", "matching network architecture", metavar="NAME")
    seed: int = setting(0, "seed of the run, 0..2**63-1")
    device: str = setting("cpu", "device", metavar="cpu|cuda")
    precision: str = setting("auto", "arithmetic of the networks' forward passes: bf16 runs them under autocast, the "
                             "images and the optimiser stay float32; auto is bf16 for DM on CPUs with native bf16, "
                             "else fp32; fixed for a run (docs/precision.md)", choices=PRECISIONS)
    checkpoint_every: int = setting(100, "iterations between checkpoints", bounds=AT_LEAST_ONE, metavar="N")
    monitor_every: int = setting(10, "with --proxies: log the set's CMI under the pool every N iterations, also "
                                 "without the CMI term (pass --cmi-weight 0 to only monitor)",
                                 bounds=Bounds(low=0, note="0 turns CMI monitoring off"), metavar="N",
                                 default_text="10; 0: off")
    eval_every: int = setting(0, "evaluate the set every N iterations",
                              bounds=Bounds(low=0, note="0 turns periodic evaluation off"), metavar="N",
                              default_text="0, off")
    eval_model: str = setting("ConvNet-3", "model of periodic evaluation", metavar="NAME")
    eval_epochs: int = setting(300, "epochs of periodic evaluation", bounds=AT_LEAST_ONE, metavar="E")
    eval_runs: int = setting(1, "runs of periodic evaluation", bounds=AT_LEAST_ONE, metavar="N")


@dataclass(frozen=True)
class ImageSettings:
    """How the images are optimised and stored: the optimiser of the set, its schedule, an average, whitening."""

    title: ClassVar[str] = "image optimisation"
    lr_images: float | None = setting(None, "image learning rate", bounds=POSITIVE, default_text="the method's")
    momentum_images: float | None = setting(None, "image SGD momentum", bounds=Bounds(0, 1, high_open=True),
                                            default_text="0.5")
    optimizer: str | None = setting(None, "image optimiser", choices=OPTIMIZERS,
                                    default_text="the method's; sre2l: adam")
    lr_schedule: str | None = setting(None, "image learning-rate schedule", choices=LR_SCHEDULES,
                                      default_text="the method's; sre2l: cosine")
    ema_decay: float | None = setting(None, "store an exponential moving average of the images",
                                      bounds=Bounds(0, 1, high_open=True, note="0 turns the average off"),
                                      metavar="D", default_text="DATM 0.999, else off")
    zca: float = setting(0.0, "ZCA-whiten the data with this regularisation, as the experts were",
                         bounds=Bounds(low=0, note="0 turns whitening off"), metavar="EPS", default_text="0, off")


SETTINGS_GROUPS: tuple[type, ...] = (RunSettings, ImageSettings, MatchingSettings, GradientMatchingSettings,
                                     IDCSettings, TrajectorySettings, DATMSettings, RecoverSettings, DWASettings,
                                     LowRankSettings, MultiSettings, CMISettings, MIMSettings)
"""Every owner's settings, in the order ``--help`` shows them; :class:`DistillConfig` is their union."""


@dataclass(frozen=True)
class DistillConfig(MIMSettings, CMISettings, MultiSettings, LowRankSettings, DWASettings, RecoverSettings,
                    DATMSettings, TrajectorySettings, IDCSettings, GradientMatchingSettings, MatchingSettings,
                    ImageSettings, RunSettings):
    """Everything that defines a distillation run: the union of the owners' settings (:data:`SETTINGS_GROUPS`),
    each declared once with its help and range by the part that reads it. ``None`` means: the method's
    published default."""

    title: ClassVar[str] = "distillation"

    def validate(self) -> None:
        """Refuse values outside their declared range with one line naming the value and what is allowed,
        then combinations no part can run, then settings no chosen part reads."""
        method_class(self.method)
        check_values(self)
        check_seed(self.seed)
        if self.param is not None and self.param not in PARAMETERISATION_REGISTRY:
            raise UserInputError(f"param '{self.param}' is not one of: {', '.join(sorted(PARAMETERISATION_REGISTRY))}")
        parse_model_name(self.model)
        parse_model_name(self.eval_model)
        check_cmi_weight(self.cmi_weight)
        if self.zca > 0 and method_class(self.method).clips_to_pixel_range:
            raise UserInputError(f"zca {self.zca:g} does not apply to method '{self.method}': it clips images to the "
                                 "pixel range, which whitened images do not have; drop --zca")
        if self.mim_weight > 0 and not method_class(self.method).reads_real_data:
            raise UserInputError(f"mim_weight {self.mim_weight:g} needs real data, but method '{self.method}' distils "
                                 "from its teacher alone; drop --mim-weight or choose a method that reads real data")
        if self.uses_cmi and self.proxies is None:
            raise UserInputError(
                "a CMI weight needs a proxy pool: pass --proxies DIR (build one with `infodistill proxies`)"
            )
        if self.held_out_proxies is not None and self.proxies is None:
            raise UserInputError(
                "held_out_proxies monitors the set's CMI beside the pool of --proxies: pass --proxies DIR too"
            )
        self._check_unused_settings()
        resolve_device(self.device)

    def _check_unused_settings(self) -> None:
        """Refuse a setting that no chosen part reads (a method's ``lr_net`` for DM, ``rank`` for multi-formation
        images, ``mim_temperature`` without MIM), naming the parts that do read it, instead of ignoring it.

        A value equal to the field's default is never refused, nor one equal to the chosen method's published
        setting for a field :meth:`with_method_defaults` fills (presets and the ``config.yaml`` of a finished run
        write such values out)."""
        resolved = self.with_method_defaults()
        published = method_class(self.method).defaults(self.ipc)
        chosen: dict[str, list[str]] = {"method": [self.method], "param": [str(resolved.param)],
                                        "regularizer": regularizers_on(resolved)}
        parts = part_fields()
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if name in LOOP_FIELDS or value == field.default:
                continue
            if name in METHOD_DEFAULT_FIELDS and value == getattr(published, name):
                continue
            if any(name in parts[kind][part] for kind, names in chosen.items() for part in names):
                continue
            kind, users = next((kind, sorted(part for part, fields in by_part.items() if name in fields))
                               for kind, by_part in parts.items() if any(name in f for f in by_part.values()))
            if kind == "method":
                raise UserInputError(f"{name} does not apply to method '{self.method}'; it applies to: "
                                     f"{', '.join(users)}")
            if kind == "param":
                raise UserInputError(f"{name} does not apply to param '{resolved.param}'; it applies to: "
                                     f"{', '.join(users)}")
            on = ", ".join(chosen["regularizer"]) or "none"
            raise UserInputError(f"{name} does not apply to the regularizers on ({on}); it applies to: "
                                 + ", ".join(f"{user} (on with {REGULARIZER_REGISTRY[user].switch})" for user in users))
        if resolved.uses_cmi and resolved.cmi_weight != "auto" and self.cmi_auto_scale != 1.0:
            raise UserInputError(f"cmi_auto_scale does not apply to a fixed cmi_weight {resolved.cmi_weight:g}; "
                                 "it applies to: cmi_weight 'auto'")

    @property
    def uses_cmi(self) -> bool:
        return cmi_weight_active(self.cmi_weight)

    def with_method_defaults(self) -> DistillConfig:
        """The same config with every unset field filled from the method's published settings."""
        defaults: MethodDefaults = method_class(self.method).defaults(self.ipc)
        filled = {name: getattr(defaults, name) for name in METHOD_DEFAULT_FIELDS if getattr(self, name) is None}
        if self.cmi_weight is None and self.proxies is not None and defaults.cmi_weight is not None:
            filled["cmi_weight"] = defaults.cmi_weight
        return dataclasses.replace(self, **filled)


def parse_cmi_weight(value: float | str | None) -> float | str | None:
    """A CMI weight as given (a flag's text, a YAML value): None, ``'auto'`` or a number."""
    if not isinstance(value, str) or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise UserInputError(f"cmi_weight must be a number >= 0 or 'auto', got '{value}'") from None


def check_cmi_weight(weight: float | str | None) -> None:
    """Refuse a CMI weight that is not None, ``'auto'`` or a finite number >= 0."""
    if isinstance(weight, str) and weight != "auto":
        raise UserInputError(f"cmi_weight must be a number >= 0 or 'auto', got '{weight}'")
    if isinstance(weight, (int, float)) and not (weight >= 0 and np.isfinite(weight)):
        raise UserInputError(f"cmi_weight must be a number >= 0 or 'auto', got {weight}")


RENAMED_SETTINGS = {
    "cmi_auto_fraction": "cmi_auto_scale, which scales the gradient-norm ratio instead of the loss fraction "
                         "(docs/cmi.md); the default 1 is the paper's strength",
}
"""Settings of earlier releases that were replaced: old key -> the new key and what changed."""


def distill_config_from(values: dict[str, Any], source: str = "config") -> DistillConfig:
    """Build and check a :class:`DistillConfig` from a mapping (YAML file plus flags); a replaced key is refused
    with a line naming its successor."""
    for old, new in RENAMED_SETTINGS.items():
        if old in values:
            raise UserInputError(f"{source}: '{old}' was replaced by {new}")
    if "cmi_weight" in values:
        values = {**values, "cmi_weight": parse_cmi_weight(values["cmi_weight"])}
    return config_from_mapping(DistillConfig, values, source)


def part_fields() -> dict[str, dict[str, frozenset[str]]]:
    """Per kind of part (method, param, regularizer), the ``DistillConfig`` fields each registered part reads:
    a method's constructor settings and ``reads_from_loop``, a parameterisation's ``initialise`` settings, a
    regularizer's ``config_fields``. Fields outside :data:`LOOP_FIELDS` are valid only for the parts listing them."""
    names = {field.name for field in dataclasses.fields(DistillConfig)}
    return {
        "method": {name: method_fields(method_class(name)) & names for name in METHOD_REGISTRY},
        "param": {name: parameterisation_settings(name) & names for name in PARAMETERISATION_REGISTRY},
        "regularizer": {name: cls.config_fields & names for name, cls in REGULARIZER_REGISTRY.items()},
    }
