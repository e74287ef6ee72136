"""From Hydra's composed config to the typed, fully resolved run config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from sala_train.assets import register_resolvers
from sala_train.config.entries import mixed_sources
from sala_train.config.paths import home_expanded
from sala_train.config.schema import DatasetConfig, LoraMethod, RunConfig
from sala_train.config.typed import ConfigError, build
from sala_train.config.validate import check_run

T = TypeVar("T", bound=RunConfig)


def _absolute(paths: list[str] | None, base: Path) -> list[str] | None:
    return None if paths is None else [str((base / home_expanded(p)).resolve()) for p in paths]


def anchor_paths(cfg: T, base: Path) -> T:
    """Make data, local model and checkpoint paths absolute, so ranks can run from any directory."""
    d = cfg.dataset
    mixed = [
        dataclasses.replace(
            s,
            train=_absolute(s.train, base) or [],
            validation=_absolute(s.validation, base),
            test=_absolute(s.test, base),
        )
        for s in d.mixed
    ]
    dataset = dataclasses.replace(
        d,
        train=_absolute(d.train, base) or [],
        validation=_absolute(d.validation, base),
        test=_absolute(d.test, base),
        mixed=mixed,
    )
    assert isinstance(dataset, DatasetConfig)
    model = cfg.model
    local = base / Path(model.name_or_path).expanduser()
    if local.is_dir():
        model = dataclasses.replace(model, name_or_path=str(local.resolve()))
    anchored = dataclasses.replace(cfg, dataset=dataset, model=model)
    if cfg.train.resume not in ("auto", "never"):  # a checkpoint to resume from, read by the runner from anywhere
        resume = str((base / Path(cfg.train.resume).expanduser()).resolve())
        anchored = dataclasses.replace(anchored, train=dataclasses.replace(cfg.train, resume=resume))
    return anchored


def resolve_config(cfg: DictConfig | dict[str, Any], schema: type[T], base: Path, run_dir: Path | None = None) -> T:
    """Typed config with every interpolation resolved and every rule checked, or ConfigError
    (``run_dir``: see ``check_run``)."""
    register_resolvers()
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    typed = build(schema, data)
    problems = check_run(typed, base, run_dir)
    if problems:
        raise ConfigError(problems)
    sources, _ = mixed_sources(typed.dataset)  # config.yaml records what each mixed entry reads
    typed = dataclasses.replace(typed, dataset=dataclasses.replace(typed.dataset, mixed=sources))
    return anchor_paths(_with_alpha_given(typed), base)


def _with_alpha_given(cfg: T) -> T:
    """``method.alpha=null`` as the value it stands for, twice ``method.r``: config.yaml records the
    scale the adapter has, and a run saved with alpha 32 (the default before null meant 2 × r) is
    the same config as one at r 16 now."""
    from sala_train.methods import lora_alpha

    method = cfg.method
    if not isinstance(method, LoraMethod) or method.alpha is not None:
        return cfg
    return dataclasses.replace(cfg, method=dataclasses.replace(method, alpha=lora_alpha(method)))
