"""Shared output of the benchmark scripts: one JSON object on stdout, and optionally in a file."""

from __future__ import annotations

import json
from pathlib import Path


def emit_json(report: dict, out: str | None) -> None:
    """Print ``report`` as indented JSON; also write it to ``out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
