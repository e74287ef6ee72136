"""Find resumable checkpoints and guard a run directory against mixing different configs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sala_train.config.io import CONFIG_FILE
from sala_train.config.typed import ConfigError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Keys that may change between a run and its resumption without changing what is trained.
RESUME_NEUTRAL = {"train.resume", "launcher.dry_run"}


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints with a trainer state (written last by the Trainer), oldest first."""
    found = []
    for path in run_dir.glob("checkpoint-*"):
        match = CHECKPOINT.match(path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else 0


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in sorted(set(a) | set(b))
        if k not in RESUME_NEUTRAL and a.get(k) != b.get(k)
    ]


def guard_run_dir(run_dir: Path, new_config: dict[str, Any], resume: str) -> None:
    """Refuse to mix a different config into a run directory that already holds checkpoints."""
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        return
    if resume == "never":
        raise ConfigError(
            [
                f"train.resume=never: {run_dir} already holds {checkpoints[-1].name}; "
                "choose a new hydra.run.dir or use train.resume=auto"
            ]
        )
    old_path = run_dir / CONFIG_FILE
    if resume == "auto" and old_path.is_file():
        old = yaml.safe_load(old_path.read_text(encoding="utf-8"))
        diffs = config_differences(old, new_config)
        if diffs:
            raise ConfigError(
                [
                    f"{run_dir} holds checkpoints of a different config; resume it unchanged, "
                    "or choose a new hydra.run.dir. Differences:",
                    *diffs,
                ]
            )
