"""The option files of each config group, read directly: for compose-time checks of a command line,
and for ``dataset.mix``, whose entries are named in config rather than chosen by Hydra. Options come
from the package's ``conf`` and from any config directories the user adds."""

from __future__ import annotations

import contextlib
import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from sala_train.assets import register_resolvers
from sala_train.config.schema import DatasetConfig, DatasetSource
from sala_train.config.typed import build_lenient

CONFIG_MODULE = "sala_train.conf"


# Config sources a user adds (``--config-dir``, ``hydra.searchpath``) hold their own group options:
# their data set entries, experiments, models. Hydra searches them after the package's own.
USER_SOURCE_PROVIDERS = ("command-line", "hydra.searchpath in command-line", "hydra.searchpath in main")
_user_dirs: list[Path] = []


def conf_dir() -> Path:
    return Path(str(resources.files(CONFIG_MODULE)))


def source_dir(schema: str, path: str) -> Path | None:
    """The directory of one Hydra config source (``file`` or ``pkg``); None for other kinds."""
    if schema == "file":
        return Path(path).resolve()
    if schema == "pkg":
        try:
            return Path(str(resources.files(path)))
        except ModuleNotFoundError:
            return None
    return None


def use_user_config_dirs(dirs: list[Path]) -> None:
    """Set the user's config directories for this process (the command line's, or Hydra's record
    of them inside a task); every group option and ``dataset.mix`` lookup then sees their files."""
    _user_dirs[:] = dirs


def conf_dirs() -> list[Path]:
    """Where group options are looked up, in Hydra's order: the package's, then the user's."""
    return [conf_dir(), *_user_dirs]


def group_options(group: str) -> list[str]:
    return sorted({p.stem for d in conf_dirs() for p in (d / group).glob("*.yaml")})


def entry_file(group: str, name: str) -> Path:
    return next(d / group / f"{name}.yaml" for d in conf_dirs() if (d / group / f"{name}.yaml").is_file())


def config_groups() -> list[str]:
    # ``hydra/``: sala-train's own options of Hydra's groups (job logging), not a group of its own.
    names = (p.name for p in conf_dir().iterdir() if p.is_dir() and p.name != "hydra")
    return sorted(name for name in names if not name.startswith("_"))


def _entry(group: str, name: str) -> Any:
    register_resolvers()  # bundled entries name their files with ${sala_asset:...}
    return OmegaConf.to_container(OmegaConf.load(entry_file(group, name)), resolve=True)


def undecodable_problem(exc: UnicodeDecodeError) -> str:
    """A config file that is not UTF-8, named: Hydra's and OmegaConf's error names no file, so the
    config directories are searched for the one that does not decode."""
    for directory in conf_dirs():
        for path in sorted(directory.rglob("*.yaml")):
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError as found:
                return f"{path}: not UTF-8 text (byte {found.start}); save it as UTF-8"
            except OSError:
                continue
    return f"a config file is not UTF-8 text ({exc})"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML syntax error as FILE:LINE and what is wrong (Hydra would show a parser traceback)."""
    mark = getattr(exc, "problem_mark", None)
    where = "a config file"
    if mark is not None:
        line = mark.line + 1
        with contextlib.suppress(OSError):  # an unclosed bracket is found one line past the last
            line = min(line, len(Path(mark.name).read_text(encoding="utf-8").splitlines()) or 1)
        where = f"{mark.name}:{line}"
    what = getattr(exc, "problem", None) or str(exc)
    context, started = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and started is not None and mark is not None and started.line != mark.line:
        context = f"{context} that starts on line {started.line + 1}"
    return f"{where}: not valid YAML: {what}" + (f" ({context})" if context else "")


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
        try:
            raw = _entry("dataset", name)
        except yaml.YAMLError as exc:
            problems.append(f"{key} ({name}): {yaml_problem(exc)}")
            continue
        except UnicodeDecodeError as exc:
            problems.append(f"{key} ({name}): {undecodable_problem(exc)}")
            continue
        entry, errors = build_lenient(DatasetConfig, raw)
        if entry is None or errors:
            problems += [f"{key} ({name}): {e}" for e in errors]
            continue
        if entry.mix:
            problems.append(f"{key}: {name} mixes in {', '.join(entry.mix)} itself; list every entry in dataset.mix")
            continue
        if entry.max_samples is not None and entry.max_samples < 1:  # (as dataset.max_samples is checked)
            problems.append(f"{key} ({name}): max_samples: must be >= 1 or null, got {entry.max_samples}")
            continue
        shared = {f.name: getattr(entry, f.name) for f in dataclasses.fields(DatasetSource)}
        if shared["max_samples"] is None:  # LLaMA-Factory's max_samples caps each data set of a mix
            shared["max_samples"] = dataset.max_samples
        sources.append(DatasetSource(**{**shared, "name": name}))
    return sources, problems


# What a mixed entry sets that gives way to the run's own dataset keys (they apply to every entry
# of the mix, as LLaMA-Factory's do): said when an entry sets one otherwise, so it is not lost unseen.
MIX_SHARED_KEYS = ("template", "tool_format", "default_system", "train_on_prompt", "mask_history", "on_error",
                   "cutoff_len")  # fmt: skip


def mixed_settings_warning(dataset: DatasetConfig) -> str | None:
    """The settings of ``dataset.mix`` entries that this run does not use, or None."""
    defaults = DatasetConfig(name="", train=[])
    unused = []
    for name in dataset.mix:
        try:
            entry, errors = build_lenient(DatasetConfig, _entry("dataset", name))
        except (StopIteration, yaml.YAMLError, UnicodeDecodeError):
            continue  # (refused by mixed_sources already)
        if entry is None or errors:
            continue
        for key in MIX_SHARED_KEYS:
            own, used = getattr(entry, key), getattr(dataset, key)
            if own != getattr(defaults, key) and own != used:
                unused.append(f"{name}'s {key}={_shown(own)} (dataset.{key}={_shown(used)} applies)")
    if not unused:
        return None
    return (f"WARNING: dataset.mix: {'; '.join(unused)}: the run's own {', '.join(MIX_SHARED_KEYS)} apply to every "
            "entry of a mix; set them for the run, or train the entries apart")  # fmt: skip


def _shown(value: Any) -> str:
    value = getattr(value, "value", value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
