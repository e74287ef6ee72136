"""The option files of each config group, read directly: for compose-time checks of a command line,
and for ``dataset.mix``, whose entries are named in config rather than chosen by Hydra."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sala_train.assets import register_resolvers
from sala_train.config.schema import DatasetConfig, DatasetSource
from sala_train.config.typed import build_lenient

CONFIG_MODULE = "sala_train.conf"


def conf_dir() -> Path:
    return Path(str(resources.files(CONFIG_MODULE)))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def config_groups() -> list[str]:
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith("_"))


def _entry(group: str, name: str) -> Any:
    register_resolvers()  # bundled entries name their files with ${sala_asset:...}
    return OmegaConf.to_container(OmegaConf.load(conf_dir() / group / f"{name}.yaml"), resolve=True)


def mixed_sources(dataset: DatasetConfig) -> tuple[list[DatasetSource], list[str]]:
    """The entries ``dataset.mix`` names, as sources, and every problem with them."""
    sources: list[DatasetSource] = []
    problems: list[str] = []
    options = group_options("dataset")
    seen = {dataset.name}
    for i, name in enumerate(dataset.mix):
        key = f"dataset.mix[{i}]"
        if name not in options:
            problems.append(f"{key}: no data set entry {name!r}; choose from {', '.join(options)}")
            continue
        if name in seen:
            problems.append(f"{key}: {name} is already in this run's data")
            continue
        seen.add(name)
        entry, errors = build_lenient(DatasetConfig, _entry("dataset", name))
        if entry is None or errors:
            problems += [f"{key} ({name}): {e}" for e in errors]
            continue
        if entry.mix:
            problems.append(f"{key}: {name} mixes in {', '.join(entry.mix)} itself; list every entry in dataset.mix")
            continue
        shared = {f.name: getattr(entry, f.name) for f in dataclasses.fields(DatasetSource)}
        sources.append(DatasetSource(**{**shared, "name": name}))
    return sources, problems
