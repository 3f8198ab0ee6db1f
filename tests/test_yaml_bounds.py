"""Settings files are read with bounds: aliases (the 'billion laughs' file) and oversized files are refused
in one line, and a bad value is shown cut short, so no input can produce a huge error line."""

from __future__ import annotations

import pytest

from infodistill.config import MAX_CONFIG_BYTES, build_config, load_yaml_mapping
from infodistill.errors import UserInputError
from infodistill.training import EvalConfig


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]")
    lines.append("epochs: *i")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError) as error:
        load_yaml_mapping(path)
    message = str(error.value)
    assert "aliases" in message and "\n" not in message and len(message) < 300


def test_an_oversized_settings_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("epochs: 3\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(UserInputError, match=f"at most {MAX_CONFIG_BYTES}"):
        load_yaml_mapping(path)


def test_a_long_bad_value_is_shown_cut_short(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("epochs: " + "x" * 50_000 + "\n")
    with pytest.raises(UserInputError) as error:
        build_config(EvalConfig, path)
    message = str(error.value)
    assert "is not an integer" in message and "(50002 characters)" in message and len(message) < 200
