"""The package's public names, and the README's "From Python" example, run as written (at a tiny size)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import infodistill

README = Path(__file__).resolve().parents[1] / "README.md"
PUBLIC = ["distill", "evaluate_set", "load_dataset", "DistillConfig", "EvalConfig", "load_set", "save_set",
          "train_proxy_pool", "ProxyPool", "random_subset"]
TINY = {  # the README's sizes -> a few seconds on the striped data (each must still be in the README)
    "ipc=10": "ipc=2",
    "iterations=100": "iterations=2",
    "batch_real=64": "batch_real=8",
    '"ConvNet-3-32"': '"ConvNet-1-8"',
    "epochs=50": "epochs=1",
}


def readme_python_example() -> str:
    """The first ```python block of the README's "## From Python" section."""
    section = README.read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "README's 'From Python' section has no python block"
    return blocks[0]


def test_the_public_names_are_exported_from_the_package():
    artefact, data, loop, evaluate, proxies, training = (
        importlib.import_module(f"infodistill.{name}")
        for name in ("artefact", "data", "loop", "evaluate", "proxies", "training"))
    homes = {"distill": loop.distill, "evaluate_set": evaluate.evaluate_set, "load_dataset": data.load_dataset,
             "DistillConfig": loop.DistillConfig, "EvalConfig": training.EvalConfig, "load_set": artefact.load_set,
             "save_set": artefact.save_set, "train_proxy_pool": proxies.train_proxy_pool,
             "ProxyPool": proxies.ProxyPool, "random_subset": evaluate.random_subset}
    assert set(PUBLIC) <= set(infodistill.__all__)
    for name in infodistill.__all__:
        assert hasattr(infodistill, name), name
    for name, defined in homes.items():
        assert getattr(infodistill, name) is defined, name


def test_the_readme_python_example_runs(striped_root, tmp_path, monkeypatch, capsys):
    code = readme_python_example()
    for large, tiny in TINY.items():
        assert large in code, f"the README example no longer sets {large}; update TINY"
        code = code.replace(large, tiny)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README) + ":From Python", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["dm", "random"]
    assert all("ConvNet-1-8 on fashion-mnist (100 test images), 1 runs x 1 epochs" in line for line in printed)
    assert (tmp_path / "runs" / "python-dm" / "set.safetensors").is_file()
