"""Settings no chosen part reads are refused by name, and every shipped config file still loads and validates."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
from pathlib import Path

import pytest
import yaml

from infodistill.cli import main
from infodistill.config import load_yaml_mapping
from infodistill.errors import UserInputError
from infodistill.experiments.sweep import parse_sweep
from infodistill.loop import LOOP_FIELDS, SETTINGS_GROUPS, DistillConfig, distill_config_from, part_fields
from infodistill.methods import METHOD_REGISTRY
from infodistill.settings import Bounds

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
GRADIENT_METHODS = "it applies to: dc, dsa, idc"
REAL_BATCH_METHODS = "it applies to: dc, dm, dsa, idc"
DSA_METHODS = "it applies to: datm, dc, dm, dsa, idc, mtt"
CMI_ON = "it applies to: cmi (on with cmi_weight > 0 or 'auto')"
MIM_ON = "it applies to: mim (on with mim_weight > 0)"

# Each setting was accepted and silently ignored before; the expected line is written by hand from the methods'
# constructors, the parameterisations' initialise() and the regularizers' options.
FORMERLY_IGNORED = [
    (["--method", "dm", "--lr-net", "0.5"], f"lr_net does not apply to method 'dm'; {GRADIENT_METHODS}"),
    (["--method", "mtt", "--batch-real", "64"], f"batch_real does not apply to method 'mtt'; {REAL_BATCH_METHODS}"),
    (["--method", "datm", "--batch-real", "64"], f"batch_real does not apply to method 'datm'; {REAL_BATCH_METHODS}"),
    (["--method", "sre2l", "--teacher", "t", "--batch-real", "64"],
     f"batch_real does not apply to method 'sre2l'; {REAL_BATCH_METHODS}"),
    (["--method", "dwa", "--teacher", "t", "--batch-real", "64"],
     f"batch_real does not apply to method 'dwa'; {REAL_BATCH_METHODS}"),
    (["--method", "sre2l", "--teacher", "t", "--augment"], f"augment does not apply to method 'sre2l'; {DSA_METHODS}"),
    (["--method", "dwa", "--teacher", "t", "--augment"], f"augment does not apply to method 'dwa'; {DSA_METHODS}"),
    (["--param", "multi", "--rank", "3"], "rank does not apply to param 'multi'; it applies to: lowrank"),
    (["--rank", "3"], "rank does not apply to param 'pixels'; it applies to: lowrank"),
    (["--param", "lowrank", "--factor", "3"], "factor does not apply to param 'lowrank'; it applies to: multi"),
    (["--upsample", "nearest"], "upsample does not apply to param 'pixels'; it applies to: multi"),
    (["--method", "idc", "--param", "pixels", "--factor", "3"],
     "factor does not apply to param 'pixels'; it applies to: multi"),
    (["--mim-temperature", "0.2"], f"mim_temperature does not apply to the regularizers on (none); {MIM_ON}"),
    (["--mim-layers", "2"], f"mim_layers does not apply to the regularizers on (none); {MIM_ON}"),
    (["--mim-real-per-class", "4"], f"mim_real_per_class does not apply to the regularizers on (none); {MIM_ON}"),
    (["--mim-lr", "0.1"], f"mim_lr does not apply to the regularizers on (none); {MIM_ON}"),
    (["--cmi-every", "2"], f"cmi_every does not apply to the regularizers on (none); {CMI_ON}"),
    (["--cmi-proxies-per-step", "2"], f"cmi_proxies_per_step does not apply to the regularizers on (none); {CMI_ON}"),
    (["--cmi-auto-scale", "2"], f"cmi_auto_scale does not apply to the regularizers on (none); {CMI_ON}"),
    (["--proxies", "p", "--cmi-weight", "0", "--cmi-every", "2"],
     f"cmi_every does not apply to the regularizers on (none); {CMI_ON}"),
    (["--proxies", "p", "--cmi-weight", "5", "--cmi-auto-scale", "2"],
     "cmi_auto_scale does not apply to a fixed cmi_weight 5; it applies to: cmi_weight 'auto'"),
    (["--proxies", "p", "--mim-weight", "1", "--cmi-every", "2"],
     f"cmi_every does not apply to the regularizers on (mim); {CMI_ON}"),
]


@pytest.mark.parametrize("argv, line", FORMERLY_IGNORED, ids=[" ".join(argv) for argv, _ in FORMERLY_IGNORED])
def test_a_setting_no_chosen_part_reads_is_refused_by_name(tmp_path, capsys, argv, line):
    out = tmp_path / "run"
    code = main(["distill", *argv, "--ipc", "2", "--iterations", "1", "--quiet", "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [f"infodistill distill: error: {line}"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_setting_from_the_config_file_is_refused_like_a_flag(tmp_path, capsys):
    config = tmp_path / "dm.yaml"
    config.write_text("method: dm\nlr_net: 0.5\n")
    code = main(["distill", "--config", str(config), "--iterations", "1", "--out", str(tmp_path / "run")])
    assert code == 2 and f"lr_net does not apply to method 'dm'; {GRADIENT_METHODS}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("settings", [
    {"method": "dm", "lr_net": 0.01, "factor": 2, "upsample": "bilinear", "rank": 2, "cmi_every": 1,
     "mim_temperature": 0.1, "cmi_auto_scale": 1.0},  # every one equal to its default
    {"method": "mtt", "batch_real": 256, "augment": True},  # MTT's published values, as its config.yaml records
    {"method": "sre2l", "teacher": "t", "augment": False},  # SRe2L's published value: no DSA
    {"proxies": "p"},  # a pool alone monitors the CMI
    {"proxies": "p", "held_out_proxies": "q"},  # a held-out pool monitors beside it
    {"method": "mtt", "proxies": "p", "cmi_every": 2},  # MTT turns CMI on ('auto') when given a pool
    {"proxies": "p", "cmi_weight": "auto", "cmi_auto_scale": 2.0, "cmi_proxies_per_step": 2},
    {"mim_weight": 1.0, "mim_temperature": 0.2, "mim_lr": 0.1},
    {"method": "idc", "factor": 3, "upsample": "nearest"},
    {"param": "lowrank", "rank": 3},
])
def test_a_setting_a_chosen_part_reads_or_at_its_default_is_accepted(settings):
    DistillConfig(**settings).validate()


@pytest.mark.parametrize("method", sorted(METHOD_REGISTRY))
@pytest.mark.parametrize("proxies", [None, "p"])
def test_the_resolved_config_a_run_records_validates_again(method, proxies):
    """``config.yaml`` (read back by --resume) holds the config with the method's published settings filled."""
    teacher = "t" if method in ("sre2l", "dwa") else None
    config = DistillConfig(method=method, teacher=teacher, proxies=proxies)
    config.validate()
    resolved = config.with_method_defaults()
    distill_config_from(dataclasses.asdict(resolved)).validate()


def test_every_setting_is_read_by_the_loop_or_declared_by_a_part():
    """A new DistillConfig field must be in LOOP_FIELDS or read by some method, parameterisation or
    regularizer; otherwise validation could not tell when it is unused."""
    declared = set().union(*(fields for by_part in part_fields().values() for fields in by_part.values()))
    names = {field.name for field in dataclasses.fields(DistillConfig)}
    assert names - LOOP_FIELDS - declared == set()
    assert LOOP_FIELDS <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.name)
def test_every_preset_parses_and_validates(path):
    """As `infodistill distill --config FILE` reads it."""
    config = distill_config_from(load_yaml_mapping(path), f"config file '{path.name}'")
    config.validate()
    assert config.method in METHOD_REGISTRY


@pytest.mark.parametrize("path", SWEEPS, ids=lambda path: path.name)
def test_every_sweep_file_parses_and_validates(path, tmp_path, monkeypatch):
    """As `infodistill sweep FILE` reads it: every cell validates (the folders it names are made empty here)."""
    mapping = load_yaml_mapping(path)
    monkeypatch.chdir(tmp_path)
    base, grid = mapping.get("distill") or {}, mapping.get("grid") or {}
    for values in [base, *(dict(zip(grid, combo)) for combo in itertools.product(*grid.values()))]:
        for name in ("proxies", "experts", "teacher"):
            if values.get(name) is not None:
                Path(values[name]).mkdir(parents=True, exist_ok=True)
    spec = parse_sweep(mapping, source=path.name)
    assert len(spec.cells()) == max(1, len(list(itertools.product(*grid.values()))))


def test_the_config_files_are_yaml_mappings():
    assert PRESETS and SWEEPS
    for path in [*PRESETS, *SWEEPS]:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path.name


def test_distill_help_says_flags_win(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "flags win" in text and "refused by name" in text


def test_an_unused_setting_refused_by_validate_raises_user_input_error():
    with pytest.raises(UserInputError, match="^lr_net does not apply to method 'dm'"):
        DistillConfig(method="dm", lr_net=0.5).validate()


def _distill_parser_flags() -> dict[str, list[str]]:
    """dest -> option strings of every flag of `infodistill distill`."""
    from infodistill.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    flags: dict[str, list[str]] = {}
    for action in commands.choices["distill"]._actions:
        flags.setdefault(action.dest, []).extend(action.option_strings)
    return flags


def test_every_declared_setting_has_exactly_one_flag_and_one_yaml_key():
    flags = _distill_parser_flags()
    for field in dataclasses.fields(DistillConfig):
        spelled = "--" + field.name.replace("_", "-")
        expected = [spelled, "--no-" + field.name.replace("_", "-")] if field.name == "augment" else [spelled]
        assert flags.get(field.name) == expected, field.name
        # the YAML key is the field's name: a file setting only it builds a config holding it
        value = getattr(DistillConfig(), field.name)
        assert getattr(distill_config_from({field.name: value}), field.name) == value


def test_each_setting_is_declared_by_exactly_one_owner():
    owners = [{field.name for field in dataclasses.fields(group)} for group in SETTINGS_GROUPS]
    assert sum(len(names) for names in owners) == len(set().union(*owners)), "a setting declared twice"
    assert set().union(*owners) == {field.name for field in dataclasses.fields(DistillConfig)}
    for group in SETTINGS_GROUPS:
        for field in dataclasses.fields(group):
            assert field.metadata.get("help"), f"{group.__name__}.{field.name} has no help"


@pytest.mark.parametrize("bounds, value, admitted", [
    (Bounds(low=1), 1, True), (Bounds(low=1), 0, False),
    (Bounds(low=0, low_open=True), 0.0, False), (Bounds(low=0, low_open=True), 1e-300, True),
    (Bounds(0, 1, high_open=True), 0.0, True), (Bounds(0, 1, high_open=True), 1.0, False),
    (Bounds(0, 1, high_open=True), 0.999, True), (Bounds(low=0), float("inf"), False),
    (Bounds(low=0), float("nan"), False), (Bounds(), -5.0, True),
])
def test_bounds_admit_exactly_their_interval(bounds, value, admitted):
    assert bounds.admits(value) is admitted


@pytest.mark.parametrize("values, line", [
    ({"ipc": 0}, "ipc must be a positive integer, got 0"),
    ({"eval_every": -1}, "eval_every must be >= 0 (0 turns periodic evaluation off), got -1"),
    ({"lr_images": 0.0}, "lr_images must be positive and finite, got 0.0"),
    ({"momentum_images": 1.0}, "momentum_images must be in [0, 1), got 1.0"),
    ({"ema_decay": 1.0}, "ema_decay must be in [0, 1) (0 turns the average off), got 1.0"),
    ({"zca": -0.5}, "zca must be a finite number >= 0 (0 turns whitening off), got -0.5"),
    ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' is not one of: sgd, adam"),
    ({"method": "idc", "match_metric": "l2"}, "match_metric 'l2' is not one of: mse, l1, cos"),
    ({"method": "mtt", "memory": "disk"}, "memory 'disk' is not one of: full, checkpoint"),
])
def test_a_value_outside_its_declared_range_is_refused_in_one_line(values, line):
    with pytest.raises(UserInputError) as error:
        DistillConfig(**values).validate()
    assert str(error.value).startswith(line)


def test_a_replaced_yaml_key_names_its_successor(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text("proxies: p\ncmi_weight: auto\ncmi_auto_fraction: 0.1\n")
    code = main(["distill", "--config", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "'cmi_auto_fraction' was replaced by cmi_auto_scale" in err
    assert not (tmp_path / "run").exists()


def test_a_flag_wins_over_the_same_setting_in_the_yaml_file(tmp_path, monkeypatch):
    """Given in both with different values, the flag's value is the one the run records."""
    import infodistill.cli as cli

    seen = {}

    def stop_before_running(config, *args, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(importlib.import_module("infodistill.loop"), "distill", stop_before_running)
    config = tmp_path / "run.yaml"
    config.write_text("ipc: 3\niterations: 7\n")
    with pytest.raises(SystemExit):
        cli.main(["distill", "--config", str(config), "--ipc", "2", "--quiet", "--out", str(tmp_path / "run")])
    assert seen["config"].ipc == 2 and seen["config"].iterations == 7
