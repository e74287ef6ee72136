"""Save and load the resolved run config: the only thing ranks read (no Hydra in ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml

from sala_train.atomic import write_text_atomic
from sala_train.config.typed import build, to_plain

T = TypeVar("T")

CONFIG_FILE = "config.yaml"


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_plain(cfg), sort_keys=False, allow_unicode=True)


def save(cfg: Any, run_dir: Path) -> Path:
    """Write ``config.yaml`` atomically so a reader never sees half a file."""
    path = run_dir / CONFIG_FILE
    write_text_atomic(path, dump(cfg))  # every node of a multi-node job writes it
    return path


def load(cls: type[T], run_dir: Path) -> T:
    data = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    return build(cls, data)
