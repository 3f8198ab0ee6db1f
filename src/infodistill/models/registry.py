"""Model names are parsed, not enumerated: each family registers a builder and its grammar.

A name is ``-``-separated tokens. The first token is the family, with the depth glued on for
families like ``VGG11``/``ResNet18``; ``ConvNet`` takes depth and width as separate numeric tokens
(``ConvNet-4-128``). An optional last token picks the norm (``in``, ``bn``, ``none``). Family and
norm are matched case-insensitively; ``ModelSpec.canonical_name`` gives the canonical spelling.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from infodistill.errors import UserInputError
from infodistill.models.base import DistillModel
from infodistill.models.norm import NORM_BUILDERS

DepthStyle = Literal["glued", "token", "none"]
"""How a family takes its depth: glued to the family (``VGG11``), as a token (``ConvNet-3``), or not at all."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: canonical family spelling and the architecture knobs it sets.

    ``depth`` is None for families without a depth (AlexNet); ``width`` is None for families
    without a width knob (everything except ConvNet).
    """

    family: str
    depth: int | None
    width: int | None
    norm: str

    @property
    def canonical_name(self) -> str:
        """The fully explicit canonical spelling, e.g. ``ConvNet-3-128-in`` or ``ResNet18-bn``."""
        return _family_entry(self.family).format_name(self)

    def __str__(self) -> str:
        return self.canonical_name


ModelBuilder = Callable[[ModelSpec, int, int, tuple[int, int]], DistillModel]
"""``builder(spec, channels, num_classes, image_size) -> model``."""


@dataclass(frozen=True)
class ModelFamily:
    """A registered family: how to parse its names and how to build it."""

    name: str
    builder: ModelBuilder
    depth_style: DepthStyle
    allowed_depths: tuple[int, ...] | None
    default_depth: int | None
    default_width: int | None
    default_norm: str

    def grammar(self) -> str:
        """The name pattern for help text, e.g. ``VGG<11|13|16|19>[-norm] (default norm in)``."""
        pattern = self.name
        if self.depth_style == "glued":
            pattern += "<" + "|".join(str(depth) for depth in self.allowed_depths or ()) + ">"
        elif self.depth_style == "token":
            depth_and_width = "-D" + ("[-W]" if self.default_width is not None else "")
            pattern += depth_and_width if self.default_depth is None else f"[{depth_and_width}]"
        pattern += "[-norm]"
        if self.depth_style == "token" and self.default_depth is not None:
            default = ModelSpec(self.name, self.default_depth, self.default_width, self.default_norm)
            return f"{pattern} (default {self.format_name(default)})"
        return f"{pattern} (default norm {self.default_norm})"

    def format_name(self, spec: ModelSpec) -> str:
        """Canonical, fully explicit name of ``spec`` (round-trips through ``parse_model_name``)."""
        if self.depth_style == "glued":
            tokens = [f"{self.name}{spec.depth}"]
        elif self.depth_style == "token":
            tokens = [self.name, str(spec.depth)]
        else:
            tokens = [self.name]
        if spec.width is not None:
            tokens.append(str(spec.width))
        tokens.append(spec.norm)
        return "-".join(tokens)

    def parse(self, name: str, glued_digits: str, tokens: list[str]) -> ModelSpec:
        """Parse the tokens after the family head; raise ``UserInputError`` naming ``name`` if malformed."""
        depth = self.default_depth
        width = self.default_width
        remaining = list(tokens)
        if self.depth_style == "glued":
            if not glued_digits:
                raise _bad_name(name, f"{self.name} needs a depth glued to it, like {self.name}{self._example_depth()}")
            depth = int(glued_digits)
        elif glued_digits:
            raise _bad_name(name, f"{self.name} takes no digits glued to its name")
        if self.depth_style == "token":
            if remaining and _is_number(remaining[0]):
                depth = int(remaining.pop(0))
            elif depth is None:
                raise _bad_name(name, f"{self.name} needs a depth token, like {self.name}-3")
            if self.default_width is not None and remaining and _is_number(remaining[0]):
                width = int(remaining.pop(0))
        norm = self.default_norm
        if remaining and remaining[0].lower() in NORM_BUILDERS:
            norm = remaining.pop(0).lower()
        if remaining:
            raise _bad_name(name, f"unexpected token {remaining[0]!r}")
        if depth is not None:
            if self.allowed_depths is not None and depth not in self.allowed_depths:
                allowed = ", ".join(str(value) for value in self.allowed_depths)
                raise _bad_name(name, f"depth {depth} is not one of {allowed}")
            if depth < 1:
                raise _bad_name(name, f"depth {depth} must be at least 1")
        if width is not None and width < 1:
            raise _bad_name(name, f"width {width} must be at least 1")
        return ModelSpec(family=self.name, depth=depth, width=width, norm=norm)

    def _example_depth(self) -> int:
        if self.allowed_depths:
            return self.allowed_depths[0]
        return self.default_depth or 3


_FAMILIES: dict[str, ModelFamily] = {}
"""Lower-cased family name -> family. Filled by ``register_family`` when the family modules are imported."""

_HEAD_PATTERN = re.compile(r"([A-Za-z]+)([0-9]*)")
_NUMBER_PATTERN = re.compile(r"[0-9]+")


def _is_number(token: str) -> bool:
    return _NUMBER_PATTERN.fullmatch(token) is not None


def _bad_name(name: str, reason: str) -> UserInputError:
    return UserInputError(f"bad model name {name!r}: {reason}; {model_names_help()}")


def _family_entry(family: str) -> ModelFamily:
    try:
        return _FAMILIES[family.lower()]
    except KeyError:
        raise UserInputError(f"unknown model family {family!r}; {model_names_help()}") from None


def register_family(
    name: str,
    *,
    depth_style: DepthStyle,
    allowed_depths: tuple[int, ...] | None = None,
    default_depth: int | None = None,
    default_width: int | None = None,
    default_norm: str = "in",
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder(spec, channels, num_classes, image_size)`` for family ``name``.

    ``name`` is the canonical spelling (letters only); lookup is case-insensitive. ``allowed_depths``
    None means any positive depth (checked against the image size when building).
    """
    if not re.fullmatch(r"[A-Za-z]+", name):
        raise ValueError(f"family name {name!r} must consist of ASCII letters only")
    if default_norm not in NORM_BUILDERS:
        raise ValueError(f"default norm {default_norm!r} of family {name!r} is not one of {list(NORM_BUILDERS)}")
    if default_width is not None and depth_style != "token":
        raise ValueError(f"family {name!r}: a width knob needs depth_style='token'")
    if depth_style == "glued" and not allowed_depths:
        raise ValueError(f"family {name!r} takes a glued depth and needs allowed_depths")

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        key = name.lower()
        if key in _FAMILIES:
            raise ValueError(f"model family {name!r} is already registered")
        _FAMILIES[key] = ModelFamily(
            name=name,
            builder=builder,
            depth_style=depth_style,
            allowed_depths=allowed_depths,
            default_depth=default_depth,
            default_width=default_width,
            default_norm=default_norm,
        )
        return builder

    return decorator


def model_names_help() -> str:
    """One line describing the model-name grammar, for error messages and ``--help``."""
    families = "; ".join(family.grammar() for family in _FAMILIES.values())
    norms = "|".join(NORM_BUILDERS)
    return f"model names: {families}; norm is one of {norms}; case-insensitive"


def parse_model_name(name: str) -> ModelSpec:
    """Parse a model name like ``ConvNet-4-128-bn`` or ``resnet18`` into a ``ModelSpec``.

    Raises ``UserInputError`` naming ``name`` and the grammar if the name is malformed.
    """
    if not isinstance(name, str):
        raise UserInputError(f"model name must be a string, got {name!r}; {model_names_help()}")
    head, *tokens = name.strip().split("-")
    match = _HEAD_PATTERN.fullmatch(head)
    if match is None:
        raise _bad_name(name, f"{head!r} is not a family name")
    family_text, glued_digits = match.groups()
    family = _FAMILIES.get(family_text.lower())
    if family is None:
        raise _bad_name(name, f"unknown family {family_text!r}")
    return family.parse(name, glued_digits, tokens)


def _check_build_arguments(channels: int, num_classes: int, image_size: tuple[int, int] | int) -> tuple[int, int]:
    """Validate the data-dependent arguments of ``build_model``; return ``image_size`` as (H, W)."""
    for label, value in (("channels", channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{label} must be a positive integer, got {value!r}")
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or any(isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in image_size)
    ):
        raise UserInputError(f"image_size must be two positive integers (height, width), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def build_model(
    name: str,
    channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    seed: int | None = None,
) -> DistillModel:
    """Build the model named ``name`` for ``channels`` x ``image_size`` inputs and ``num_classes`` classes.

    With ``seed`` the weights are initialised from that seed on a forked CPU RNG, so the same seed
    gives the same weights and the global RNG state is left untouched. With ``seed=None`` the
    global RNG is used (and advanced) as usual.
    """
    spec = parse_model_name(name)
    size = _check_build_arguments(channels, num_classes, image_size)
    builder = _FAMILIES[spec.family.lower()].builder
    if seed is None:
        return builder(spec, channels, num_classes, size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserInputError(f"seed must be an integer or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        # Seed only the CPU generator: torch.manual_seed would also reseed (and not restore) CUDA.
        torch.default_generator.manual_seed(seed)
        return builder(spec, channels, num_classes, size)


def pooled_variant(name: str) -> str:
    """The canonical name of ``name`` with a globally pooled embedding: ``ConvNet-D-W-norm`` becomes
    ``ConvNetGAP-D-W-norm``; a name of any other family is returned canonical and unchanged."""
    spec = parse_model_name(name)
    if spec.family == "ConvNet":
        spec = ModelSpec("ConvNetGAP", spec.depth, spec.width, spec.norm)
    return spec.canonical_name


def registered_families() -> tuple[str, ...]:
    """Canonical names of all registered families, in registration order."""
    return tuple(family.name for family in _FAMILIES.values())
