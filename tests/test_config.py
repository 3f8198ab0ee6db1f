"""Typed configs: defaults, then YAML, then flags; unknown keys and wrong types refused by name."""

from dataclasses import dataclass

import pytest

from infodistill.config import build_config
from infodistill.errors import UserInputError


@dataclass(frozen=True)
class Example:
    name: str = "ConvNet-3"
    runs: int = 5
    lr: float = 0.01
    flag: bool = False
    cmi_weight: float | None = None


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("runs: 3\nlr: 1\nflag: true\n")
    config = build_config(Example, path, {"runs": 7, "name": None})
    assert config == Example(name="ConvNet-3", runs=7, lr=1.0, flag=True)
    assert isinstance(config.lr, float)


def test_optional_field_accepts_none_and_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cmi_weight: 2000\n")
    assert build_config(Example, path).cmi_weight == 2000.0


@pytest.mark.parametrize(
    "text, fragment",
    [("runz: 3\n", "unknown key 'runz'"), ("runs: three\n", "'three' is not an integer"),
     ("flag: 1\n", "is not a boolean"), ("- 1\n- 2\n", "must hold a mapping"), ("a: [1,\n", "not valid YAML")],
)
def test_bad_yaml_is_refused_in_one_line(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserInputError) as caught:
        build_config(Example, path)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_yaml_file_is_named(tmp_path):
    with pytest.raises(UserInputError, match="nope.yaml"):
        build_config(Example, tmp_path / "nope.yaml")


def test_every_preset_is_a_valid_distillation_config():
    from pathlib import Path

    from infodistill.config import load_yaml_mapping
    from infodistill.loop import distill_config_from

    presets = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(presets) >= 24
    for preset in presets:
        config = distill_config_from(load_yaml_mapping(preset), str(preset))
        config.validate()
        assert preset.name.startswith(config.method + "-") and f"-ipc{config.ipc}-" in preset.name
