"""Compose-time validation of a command line, before Hydra runs and before anything loads.

Hydra stops at the first bad override and exits 1 with its own wording. We want ONE message with
every problem and exit code 2, so the command line is checked here first: group choices against
the option files, then every resulting config (each sweep combination in multirun) against the
typed schemas and the cross-field rules. Hydra then composes the same config for real.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf, open_dict

from sala_train.assets import register_resolvers
from sala_train.atomic import cannot_make_directory_in
from sala_train.config.entries import (
    CONFIG_MODULE,
    conf_dir,
    conf_dirs,
    config_groups,
    entry_file,
    group_options,
    source_dir,
    undecodable_problem,
    use_user_config_dirs,
    yaml_problem,
)
from sala_train.config.io import CONFIG_FILE
from sala_train.config.schema import SlurmLauncher
from sala_train.config.typed import ConfigError, build_lenient
from sala_train.config.validate import check_run
from sala_train.console import say
from sala_train.errors import first_line

MAX_SWEEP_COMBINATIONS = 64
MAX_EXTRA_VALUES = 192  # (a value left out of the first combinations, checked once each)


def _combinations_to_check(
    group_choices: list[list[str]], value_choices: list[list[Any]]
) -> tuple[list[tuple[Any, Any]], int]:
    """The sweep's first ``MAX_SWEEP_COMBINATIONS`` jobs, then one job for each option or value
    they leave out (with every other key's first), up to ``MAX_EXTRA_VALUES``: a bad value late in a
    large sweep (``lr=1e-3,-1 seed=range(0,64)``: the -1 jobs come after the 64th) is found before
    any job runs, not by its own jobs one after another. Also: how many values are left unchecked."""
    choices = [*group_choices, *value_choices]
    first = list(itertools.islice(itertools.product(*(range(len(c)) for c in choices)), MAX_SWEEP_COMBINATIONS))
    covered = {(key, index) for combo in first for key, index in enumerate(combo)}
    extra = [
        tuple(index if k == key else 0 for k in range(len(choices)))
        for key, options in enumerate(choices)
        for index in range(len(options))
        if (key, index) not in covered
    ]
    split = len(group_choices)
    picked = [[choices[key][index] for key, index in enumerate(combo)] for combo in [*first, *extra[:MAX_EXTRA_VALUES]]]
    return [(tuple(job[:split]), tuple(job[split:])) for job in picked], max(0, len(extra) - MAX_EXTRA_VALUES)


def override_values(override: Any, range_end_drawn: bool = False) -> list[Any] | None:
    """Every value an override takes (an interval's two ends); None for sweeps that cannot be
    enumerated. ``range_end_drawn``: a ``range(a,b)`` is drawn by Hydra's own Optuna sweeper,
    which draws ``b`` too (sala-train's presets read it as ``-m`` does: ``b`` left out)."""
    if not override.is_sweep_override():
        return [override.value()]
    try:
        return _as_jobs_read_them(override, range_end_drawn)
    except ValueError as exc:  # range(1,5,0): Hydra's sweeper would end in a traceback (exit 1)
        raise ConfigError([f"{override.input_line}: {exc}"]) from exc
    except Exception:  # Hydra raises its base exception for interval sweeps
        pass
    from hydra.core.override_parser.types import IntervalSweep

    sweep = override.value()
    if isinstance(sweep, IntervalSweep):  # an Optuna search range: both ends must be values the key takes
        return [sweep.start, sweep.end]
    return None


def _as_jobs_read_them(override: Any, range_end_drawn: bool) -> list[Any]:
    """A discrete sweep's values as its jobs get them: Hydra gives each job its value as text
    (``sweep_string_iterator``) that the job's own override parser reads, so a quoted element
    (``lr="1e-3",2e-3``, ``dataset.train=["a b.json"],[c.json]``) reaches it unquoted, where
    ``sweep_iterator`` keeps the parser's QuotedString objects."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import RangeSweep

    parser = OverridesParser.create()
    key = override.get_key_element()
    values = [parser.parse_override(f"{key}={text}").value() for text in override.sweep_string_iterator()]
    sweep = override.value()
    if range_end_drawn and isinstance(sweep, RangeSweep) and not sweep.shuffle and values:
        start, stop, step = sweep.start, sweep.stop, sweep.step
        assert start is not None and stop is not None  # (a range with values has both ends)
        last = start + math.floor((stop - start) / step) * step  # (Optuna's high end: the last step to stop)
        if all(isinstance(end, int) for end in (sweep.start, sweep.stop, sweep.step)):
            last = int(last)
        if last not in values:
            values.append(last)
    return values


def _swept_value(override: Any, value: Any) -> str:
    """How a job's value is named: ``lr=1e-3``, or for a search range, which end."""
    if override.is_sweep_override() and not override.is_discrete_sweep():
        return f"{override.input_line} at {value}"
    return f"{override.key_or_group}={value}"


def _set_path(data: dict[str, Any], dotted: str, value: Any, delete: bool) -> str | None:
    """Applies one override to the plain composed config as Hydra will (a number indexes a list:
    ``dataset.mix.0=x``); a problem where Hydra would refuse the index."""
    *parents, leaf = dotted.split(".")
    node: Any = data
    for depth, key in enumerate([*parents, leaf]):
        last = depth == len(parents)
        if isinstance(node, list):
            where = ".".join(dotted.split(".")[:depth])
            index = _list_index(node, key)
            if index is None:
                span = f"indices 0 to {len(node) - 1}" if node else "no items"
                return (f"{dotted}: {where} is a list ({span}); set it whole: {where}=[...]")  # fmt: skip
            if last and delete:
                del node[index]
            elif last:
                node[index] = value
            elif not isinstance(node[index], dict | list):
                item = f"{where}[{index}]"
                return f"{dotted}: {item} is {_described(node[index])}, with no keys to set; set {where} whole"
            else:
                node = node[index]
            continue
        if last:
            if delete:
                node.pop(key, None)
            else:
                node[key] = value
            return None
        child = node.get(key)
        following = dotted.split(".")[depth + 1]
        if child is None and key in node and following.lstrip("-").isdigit():
            where = ".".join(dotted.split(".")[: depth + 1])  # (OmegaConf would make it a mapping)
            return f"{dotted}: {where} is null, no list to index; set it whole: {where}=[...]"
        if not isinstance(child, dict | list):
            child = node[key] = {}
        node = child
    return None


def _described(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _list_index(items: list[Any], key: str) -> int | None:
    """``key`` as an index into ``items`` as OmegaConf reads it (negative from the end), or None
    when it is not one."""
    try:
        index = int(key)
    except ValueError:
        return None
    return index if -len(items) <= index < len(items) else None


def _user_config_dirs(config_dir: str | None, overrides: list[Any]) -> tuple[list[Path], list[str]]:
    """The directories ``--config-dir`` and ``hydra.searchpath`` add, in Hydra's order, and problems."""
    dirs: list[Path] = []
    problems: list[str] = []
    if config_dir is not None:
        dirs.append(Path(config_dir).resolve())
    for o in overrides:
        if o.key_or_group != "hydra.searchpath":
            continue
        entries = o.value()
        for entry in entries if isinstance(entries, list) else [entries]:
            schema, _, path = str(entry).rpartition("://")
            found = source_dir(schema or "file", path)
            if found is None:
                problems.append(f"hydra.searchpath: cannot find {entry} (use file://DIR or pkg://MODULE)")
            else:
                dirs.append(found)
    for d in dirs:
        if d.is_file():
            problems.append(f"config directory {d}: a file; --config-dir takes the directory that holds your "
                            "group folders (experiment/, dataset/, ...)")  # fmt: skip
            continue
        if not d.is_dir():
            problems.append(f"config directory {d}: no such directory")
            continue
        for group in config_groups():  # Hydra would silently take the package's file of the same name
            own = {p.stem for p in (conf_dir() / group).glob("*.yaml")}
            for name in sorted({p.stem for p in (d / group).glob("*.yaml")} & own):
                problems.append(f"{d / group / name}.yaml: hidden by sala-train's own {group}={name}; rename it")
    return dirs, problems


def _composed(config_name: str, group_overrides: list[str], with_hydra: bool) -> Any:
    """Hydra's composition (a DictConfig, its ``hydra`` node typed as Hydra's own when asked for)."""
    from hydra import compose, initialize_config_module

    user_dirs = conf_dirs()[1:]
    if user_dirs:  # the sources Hydra will search, so user options compose here as they will there
        group_overrides = [*group_overrides, "hydra.searchpath=[" + ",".join(f"'file://{d}'" for d in user_dirs) + "]"]
    # (job_name: the one Hydra gives the commands' task, from sala_train/cli.py, for ${hydra:job.name})
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3", job_name="cli"):
        return compose(config_name=config_name, overrides=group_overrides, return_hydra_config=with_hydra)


def compose_config(config_name: str, group_overrides: list[str], with_hydra: bool = False) -> dict[str, Any]:
    cfg = _composed(config_name, group_overrides, with_hydra)
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}


def _composing_once() -> Callable[[str, list[str]], dict[str, Any]]:
    """``compose_config`` for one command line's checks: each set of group choices is composed once
    (Hydra's composition is most of a check's time), and every caller gets its own copy."""
    done: dict[tuple[str, tuple[str, ...]], dict[str, Any] | Exception] = {}

    def compose(config_name: str, groups: list[str]) -> dict[str, Any]:
        key = (config_name, tuple(groups))
        if key not in done:
            try:
                done[key] = compose_config(config_name, groups)
            except Exception as exc:  # the same failure for every job with these choices
                done[key] = exc
        found = done[key]
        if isinstance(found, Exception):
            raise found
        return copy.deepcopy(found)

    return compose


def check_combination(
    config_name: str,
    schema: type,
    groups: list[str],
    values: list[tuple[Any, Any]],
    cross_field: bool,
    compose: Callable[[str, list[str]], dict[str, Any]] = compose_config,
    run_dir: Path | None = None,
    trackers: bool = False,
    hydra_lines: tuple[str, ...] = (),
) -> list[str]:
    """The problems of one combination of group choices and values (``run_dir``: the run
    directory the command line names, when it names one; see ``check_run``; ``trackers``: the
    jobs run on this machine, so its W&B key is theirs; ``hydra_lines``: the command line's own
    ``hydra.*`` settings, for a ``${hydra:...}`` in the config)."""
    from hydra.errors import HydraException, MissingConfigException

    if (problem := _experiment_without_package(groups)) is not None:
        return [problem]  # (what Hydra says then names neither the file nor the cause)
    try:
        data = compose(config_name, groups)
    except yaml.YAMLError as exc:
        return [yaml_problem(exc)]
    except UnicodeDecodeError as exc:
        return [undecodable_problem(exc)]
    except MissingConfigException as exc:  # an option a defaults list asks for (Hydra's: many lines)
        return [_missing_option(exc)]
    except OSError as exc:  # a config file of the user's own that cannot be read (permissions); after
        # MissingConfigException, which Hydra makes an OSError too
        return [f"{exc.filename or 'a config file'}: cannot be read ({exc.strerror or exc})"]
    except (HydraException, ValueError) as exc:
        chosen = re.match(r"Multiple values for (\S+)\. To override a value use 'override \1: (.*)'", str(exc))
        if chosen and f"+{chosen[1]}={chosen[2]}" in groups:  # (Hydra's words tell a command-line user to write YAML)
            return [f"+{chosen[1]}={chosen[2]}: {chosen[1]} is chosen already (the defaults list has it): drop the "
                    f"'+', {chosen[1]}={chosen[2]}"]  # fmt: skip
        if chosen:  # (an experiment's defaults list that chooses a group without 'override')
            experiment = next(
                (g.split("=", 1)[1] for g in groups if g.split("=")[0].lstrip("+~") == "experiment"), None
            )
            where = f"{entry_file('experiment', experiment)}: " if experiment in group_options("experiment") else ""
            return [f"{where}its defaults list chooses {chosen[1]}, which the main config chooses already: write "
                    f"'- override /{chosen[1]}: {chosen[2]}'"]  # fmt: skip
        return [str(exc)]
    problems = []
    absent = []
    for override, value in values:
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add() or override.is_delete()) and _absent(data, key):
            absent.append(override)  # (as it stands when this override applies: a '+' before may add it)
        if override.is_add() and _set_already(data, key) and not isinstance(value, dict | list):
            problems.append(f"{override.input_line}: {key} is in the config already: drop the '+' "
                            f"({override.input_line[1:]}), or write '++' to set it, there or not")  # fmt: skip
        if (problem := _set_path(data, key, value, delete=override.is_delete())) is not None:
            problems.append(problem)
    if problems:
        return problems
    try:
        with _hydra_config_set(config_name, [*groups, *hydra_lines], values, "${hydra:" in str(data)):
            resolved = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except Exception as exc:  # OmegaConf interpolation errors name the key
        if "RecursionError" in str(exc) and "override_dirname" in str(exc):
            return [_names_its_own_directory(values)]
        return [f"cannot resolve the config: {exc}"]
    typed, problems = build_lenient(schema, resolved)
    problems += _not_in_the_entry(absent, problems, groups)
    if not any(p.startswith("train.num_train_epochs") for p in problems):  # (a bad value: that first)
        problems += _epochs_without_effect(config_name, groups, values, resolved)
    if typed is None or not cross_field:
        return problems  # a required part is absent: cross-field rules have nothing to check
    problems += [p for p in check_run(typed, Path.cwd(), run_dir) if p not in problems]
    if trackers and not typed.launcher.dry_run and not isinstance(typed.launcher, SlurmLauncher):
        from sala_train.trackers import check_trackers

        try:
            check_trackers(typed)  # (W&B online without a key: said once, not by every job of a sweep)
        except ConfigError as exc:
            problems += exc.problems
    return problems


def _epochs_without_effect(config_name: str, groups: list[str], values: list[tuple[Any, Any]], resolved: Any
                           ) -> list[str]:  # fmt: skip
    """``train.num_train_epochs`` given, on the command line or in the chosen experiment, without
    ``train.max_steps`` there while the config's step limit is positive (train.yaml's 3000, the tiny
    model's 300): the Trainer stops at the steps whatever the epochs, so the epochs a user asked for
    (LLaMA-Factory's way to set a run's length) had no effect."""
    train = resolved.get("train") if isinstance(resolved, dict) and config_name == "train" else None
    steps = train.get("max_steps") if isinstance(train, dict) else None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        return []
    given = {override.key_or_group.lstrip("+~") for override, _ in values if not override.is_delete()}
    if "train.max_steps" in given:
        return []
    epochs = train.get("num_train_epochs")  # type: ignore[union-attr]
    if "train.num_train_epochs" in given:
        return [f"train.num_train_epochs={epochs}: has no effect while train.max_steps={steps} (the config's) "
                "ends the run whatever the epochs; add train.max_steps=-1 to train by epochs, or give the steps "
                "instead"]  # fmt: skip
    experiment = next((g.split("=", 1)[1] for g in groups if g.split("=")[0].lstrip("+") == "experiment"), None)
    if experiment is None or experiment not in group_options("experiment"):
        return []
    path = entry_file("experiment", experiment)
    try:
        own = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("train") or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return []  # (its own problem is said where it is composed)
    if isinstance(own, dict) and "num_train_epochs" in own and "max_steps" not in own:
        return [f"{path}: its train.num_train_epochs={epochs} has no effect while train.max_steps={steps} (the "
                "config's) ends the run whatever the epochs; add max_steps: -1 to its train block (or "
                "train.max_steps=-1 to the command line) to train by epochs"]  # fmt: skip
    return []


def _not_in_the_entry(absent: list[Any], problems: list[str], groups: list[str]) -> list[str]:
    """Keys the schema has, set on the command line, that the chosen entry does not list (one
    written before sala-train added them, or by hand): Hydra refuses to set them ("Key ... is not in
    struct", exit 1) after these checks passed. (Keys the schema lacks are its "unknown key".)"""
    chosen = {g.split("=")[0]: g.split("=", 1)[1] for g in groups if "=" in g and not g.startswith(("+", "~"))}
    out = []
    for override in absent:
        key = override.key_or_group
        parts = key.split(".")
        unknown = {f"{'.'.join(parts[:n])}: unknown key" for n in range(1, len(parts) + 1)}  # (it, or one above)
        if any(p.startswith(tuple(unknown)) for p in problems):
            continue
        group, _, rest = key.partition(".")
        choice = chosen.get(group)
        try:
            where = f"{group}={choice} ({entry_file(group, choice)})" if choice else f"the {group} entry"
        except StopIteration:
            where = f"{group}={choice}"
        out.append(f"{override.input_line}: {where} does not list {rest} (an entry written for an earlier "
                   f"sala-train, or by hand): add it there, or write +{override.input_line}")  # fmt: skip
    return out


@contextmanager
def _hydra_config_set(
    config_name: str, groups: list[str], values: list[tuple[Any, Any]], needed: bool
) -> Iterator[None]:
    """Hydra's config as a job of this command line sees it, for a ``${hydra:...}`` in its keys
    (``train.seed=${hydra:job.num}``, ``logger.run_name=${hydra:job.override_dirname}``), which
    resolve only while one is set: the first job's number, and the directory it would run in."""
    if not needed:
        yield
        return
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.hydra_config import HydraConfig

    held = HydraConfig.instance().cfg  # (put back after: Hydra's own callbacks read it)
    try:
        cfg = _composed(config_name, groups, with_hydra=True)
        naming = cfg.hydra.job.config.override_dirname
        job = [o if not o.is_sweep_override() else _job_override(o, value) for o, value in values]
        with open_dict(cfg):
            cfg.hydra.job.num, cfg.hydra.job.id = 0, "0"  # (set per job as a sweep runs)
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                [o for o in job if o is not None], exclude_keys=list(naming.exclude_keys),
                item_sep=naming.item_sep, kv_sep=naming.kv_sep
            )  # fmt: skip
            if OmegaConf.is_missing(cfg.hydra.runtime, "output_dir"):  # (set as the job starts)
                cfg.hydra.runtime.output_dir = str(Path.cwd())
        HydraConfig.instance().set_config(cfg)
    except Exception:  # (a composition problem: the other checks name it; the resolution says what is unset)
        HydraConfig.instance().cfg = held
        yield
        return
    try:
        yield
    finally:
        HydraConfig.instance().cfg = held


def _set_already(data: dict[str, Any], dotted: str) -> bool:
    """Whether ``+KEY=VALUE`` finds a value at KEY, which Hydra refuses to add over ("Could not
    append to config"; a null there, or a list or mapping given, it takes)."""
    found, value = lookup(data, dotted.split("."))  # (an item of a list too: ``+dataset.mix.0=x``)
    return found and value is not None


def _names_its_own_directory(values: list[tuple[Any, Any]]) -> str:
    """``logger.run_name=${hydra:job.override_dirname}``: that name is made of the job's overrides,
    this one among them, so it never resolves (Hydra's RecursionError) unless left out of it."""
    keys = [o.key_or_group for o, value in values if "hydra:job.override_dirname" in str(value)] or ["KEY"]
    return (f"{keys[0]}=${{hydra:job.override_dirname}}: the override_dirname is made of the job's overrides, this "
            f"one too, so it would name itself without end; leave it out of the name: "
            f"hydra.job.config.override_dirname.exclude_keys=[{keys[0]}]")  # fmt: skip


def _job_override(override: Any, value: Any) -> Any:
    """A sweep job's own override for ``value`` of ``override`` (for its override_dirname), or
    None when the value does not read back as one (the name checked is then only shorter)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(f"{override.get_key_element()}={value}")
    except HydraException:
        return None


def _experiment_without_package(groups: list[str]) -> str | None:
    """An experiment file sets keys across the whole config, which Hydra allows only under the
    header ``# @package _global_``. Without it, its keys land under ``experiment.`` and Hydra says
    ``Could not override 'method@experiment.method'`` or the schema ``experiment: unknown key``."""
    from hydra.plugins.config_source import ConfigSource  # (Hydra's own reading of the header)

    for choice in groups:
        group, _, option = choice.partition("=")
        if group.lstrip("+~") != "experiment" or option not in group_options("experiment"):
            continue
        path = entry_file("experiment", option)
        try:
            package = ConfigSource._get_header_dict(path.read_text(encoding="utf-8"))["package"]
        except (OSError, UnicodeDecodeError):  # (the composition names it)
            continue
        if package is None:
            return (f"experiment={option}: {path} does not start with the line '# @package _global_', which an "
                    "experiment file needs (it sets keys of the whole config; without it Hydra puts them under "
                    "'experiment.')")  # fmt: skip
    return None


def _missing_option(exc: Any) -> str:
    """``…/experiment/x.yaml: method: ful: no such method; choose from full, lora``: Hydra names
    only the primary config and lists its search path; the file that asks is the user's."""
    group, _, option = str(exc.missing_cfg_file or "").rpartition("/")
    if not group or exc.options is None:
        return first_line(exc)
    asking = _asking_for(group, option)
    where = f"{asking}: {group}: {option}" if asking else f"a defaults list asks for {group}/{option}"
    return f"{where}: no such {group}; choose from {', '.join(exc.options)}"


def _missing_in_base(config_name: str, groups: list[str]) -> list[str]:
    from hydra.errors import MissingConfigException

    try:
        compose_config(config_name, groups)
    except MissingConfigException as exc:
        return [_missing_option(exc)]
    except Exception:  # any other problem is the jobs' own, and their checks name it
        return []
    return []


def _asking_for(group: str, option: str) -> str | None:
    """The user's config file whose defaults list picks ``option`` for ``group``, if one does."""
    for base in conf_dirs()[1:]:  # the package's own files ask only for options that exist
        for path in sorted(base.rglob("*.yaml")):
            try:
                defaults = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("defaults") or []
            except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):  # (its own check names it)
                continue
            for entry in defaults if isinstance(defaults, list) else []:
                for key, value in entry.items() if isinstance(entry, dict) else []:
                    picked = str(key).removeprefix("override ").strip().lstrip("/").split("@")[0]
                    if picked == group and str(value) == option:
                        return str(path)
    return None


def _hydra_problem(config_name: str, overrides: list[str], last: str) -> str | None:
    """What Hydra says, in one line, when it composes these overrides (``last``: the group of the
    last one, named when its option does not exist)."""
    from hydra.errors import HydraException, MissingConfigException

    try:
        compose_config(config_name, overrides, with_hydra=True)
    except MissingConfigException as exc:
        listed = str(exc).split("Available options", 1)[-1].splitlines()[1:]
        options = [line.strip() for line in itertools.takewhile(lambda line: line.startswith("\t"), listed)]
        return f"no such {last}; choose from {', '.join(options)}"
    except HydraException as exc:
        return first_line(exc.__cause__ or exc)
    except AssertionError:  # Hydra's own, for a dotted name under a dict it does not expect
        return "Hydra cannot apply this override"
    except Exception as exc:  # Hydra or OmegaConf failing on a value it did not expect
        return f"Hydra cannot apply this override ({type(exc).__name__}: {first_line(exc)})"
    return None


def _nearest_existing(path: Path) -> Path | None:
    """``path`` itself when it exists, else its nearest ancestor that does (None: none does)."""
    return next((p for p in (path, *path.parents) if p.exists()), None)


def _dangling(path: Path) -> bool:
    """A symbolic link whose target is gone or loops: ``exists()`` is False for it, and Hydra's
    mkdir fails on it with a FileExistsError traceback."""
    return path.is_symlink() and not path.exists()


def _broken_link(path: Path) -> str | None:
    """Why ``path`` cannot be made because it, or a directory above it, is ``_dangling``, or None."""
    for part in (path, *path.parents):
        if _dangling(part):
            return f"{part} is a symbolic link to {os.readlink(part)}, which does not exist (or loops back)"
    return None


def _holds_a_broken_link(directory: Path) -> bool:
    """Whether ``directory`` holds a ``_dangling`` link (the default ``outputs`` may be one, into
    scratch space since purged)."""
    try:
        return any(_dangling(entry) for entry in directory.iterdir())
    except OSError:
        return False


def _overlong_name(path: Path) -> str | None:
    """Why ``path`` cannot be made because a name in it is too long for its file system (or the
    whole path is), or None: Hydra's OSError traceback (ENAMETOOLONG) otherwise, and ``exists()``
    raises it too, so this is asked before anything stats the path."""
    absolute = Path(os.path.abspath(path))
    existing, descending = Path(absolute.anchor), True
    for part in absolute.parts[1:]:
        limit = _path_limit(existing, "PC_NAME_MAX", 255)
        if (size := len(os.fsencode(part))) > limit:
            shown = part if len(part) <= 60 else f"{part[:57]}..."
            return f"the name '{shown}' is {size} bytes long, and the file system takes at most {limit}"
        # (the names from the first one that does not exist are made on its parent's file system)
        descending = descending and (existing / part).is_dir()
        existing = existing / part if descending else existing
    limit = _path_limit(existing, "PC_PATH_MAX", 4096)
    if (size := len(os.fsencode(str(absolute)))) >= limit:
        return f"the path is {size} bytes long, and the file system takes less than {limit}"
    return None


def _path_limit(directory: Path, name: str, usual: int) -> int:
    """The file system's limit ``name`` (``os.pathconf``) where ``directory`` is, or the usual one
    (also where it answers no limit: -1)."""
    try:
        limit = int(os.pathconf(directory, name))
    except (OSError, ValueError):
        return usual
    return limit if limit > 0 else usual


def _not_a_directory(override: Any, written: bool, resolved: dict[str, Any] | None = None) -> str | None:
    """``hydra.run.dir`` / ``hydra.sweep.dir`` (or a sweep job's ``hydra.sweep.subdir``) at or under a
    file, or where no directory can be made: Hydra would fail creating it (FileExistsError,
    PermissionError: a traceback) before any check of ours ran. ``written``: this command writes in
    the directory (a training run, a sweep's jobs), so an existing one must take new entries too.
    ``resolved``: the values of those keys as Hydra resolves them (for ``${...}``), or the error
    resolving one gives."""
    key = override.key_or_group
    if key not in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir") or not isinstance(override.value(), str):
        return None
    value = override.value()
    if _interpolates(override):  # its path is known once it is resolved as Hydra will
        found = (resolved or {}).get(key)
        if isinstance(found, Exception):
            return f"{override.input_line}: cannot be resolved ({type(found).__name__}: {first_line(found)})"
        if not isinstance(found, str):
            return None
        value = found
    if key == "hydra.sweep.subdir":  # (a sweep job's directory, under the sweep's unless absolute)
        sweep_dir = (resolved or {}).get(JOB_SWEEP_DIR, (resolved or {}).get("hydra.sweep.dir"))
        if not written or not isinstance(sweep_dir, str):
            return None
        value = str(Path(sweep_dir) / value)
    if not value.strip():  # (Hydra would use the current directory)
        return f"{override.input_line}: empty; give a directory ('.' for the current one)"
    if value.startswith("~"):  # (quoted, the shell left it: Hydra makes a directory named '~' here)
        return (f"{override.input_line}: Hydra does not expand '~' (it would make a directory named '~' here); "
                "give the whole path, or leave the ~ unquoted for the shell to expand")  # fmt: skip
    path = Path(value).expanduser()
    if (too_long := _overlong_name(path)) is not None:
        return f"{override.input_line}: {too_long}; choose a shorter name"
    if (broken := _broken_link(path)) is not None:
        return f"{override.input_line}: {broken}; make its target, or choose another directory"
    existing = _nearest_existing(path)
    if existing is None or (existing == path and existing.is_dir() and not written):
        return None  # (sala-data's: an existing directory gets nothing)
    if key == "hydra.sweep.dir" and written and (path / CONFIG_FILE).is_file():
        # (each job would refuse it as it started; sala-report then showed the run alone)
        return (f"{override.input_line}: {path} holds a run ({CONFIG_FILE}); a sweep's jobs would be made inside it; "
                "choose another hydra.sweep.dir")  # fmt: skip
    if existing.is_dir():
        # (an existing run directory too: Hydra makes .hydra/ in it, or a sweep its jobs' directories)
        if (why := cannot_make_directory_in(existing)) is None:
            return None
        if existing == path:
            return f"{override.input_line}: cannot write in {path}: making a directory in it failed ({why})"
        return f"{override.input_line}: cannot create {path}: making a directory in {existing} failed ({why})"
    where = "is a file" if existing == path else f"is under {existing}, a file"
    return f"{override.input_line}: {path} {where}; choose a directory"


def _interpolates(override: Any) -> bool:
    value = override.value()
    return isinstance(value, str) and "${" in value


def _first_job_overrides(overrides: list[Any], multirun: bool) -> list[Any]:
    """The first job's own overrides as Hydra hands them to it (what its
    ``hydra.job.override_dirname`` is made of): the command line's in a single run; in a sweep,
    ``key=value`` for each key (its last override, as Hydra's sweeper keeps), at its first value. A
    value not known before the sweep starts (an Optuna range's draw, a ``shuffle``, a ``glob`` of
    group options) is left out: the name checked is then shorter than the real one, never longer."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not multirun:
        return [o for o in overrides if not o.is_hydra_override()]
    by_key: dict[str, str] = {}
    for o in overrides:
        if o.is_hydra_override():
            continue
        key = o.get_key_element()
        value = o.get_value_element_as_str() if not o.is_sweep_override() else _first_swept_value(o)
        if value is None:
            by_key.pop(key, None)
        else:
            by_key[key] = f"{key}={value}"
    return list(OverridesParser.create().parse_overrides(list(by_key.values())))


def _first_swept_value(override: Any) -> str | None:
    """The first value a sweep override gives its first job, as Hydra writes it; None when that is
    not known before the sweep starts."""
    if not override.is_discrete_sweep() or getattr(override.value(), "shuffle", False):
        return None
    try:
        return next(iter(override.sweep_string_iterator()), None)
    except Exception:  # (a glob needs the config loader of a running Hydra)
        return None


# The sweep directory each job's own config names: Hydra's launcher makes ``hydra.sweep.dir`` as the
# whole command line names it, and each job writes in ``hydra.sweep.dir`` as its own overrides name
# it (``${hydra.job.override_dirname}`` differs), joined with ``hydra.sweep.subdir``.
JOB_SWEEP_DIR = "hydra.sweep.dir (as a job names it)"


def _resolved_hydra_dirs(config_name: str, groups: list[str], values: list[tuple[Any, Any]],
                         hydra_overrides: list[Any], command: list[Any],
                         first_job: list[Any]) -> dict[str, Any]:  # fmt: skip
    """``hydra.run.dir``, ``hydra.sweep.dir`` and ``hydra.sweep.subdir`` as Hydra resolves them for
    the first job (its group choices and ``values``; ``${now:...}``, ``${hydra:...}``, ...), or the
    exception resolving one raises (``${oops}``: Hydra's InterpolationKeyError traceback, exit 1).
    ``${hydra.job.override_dirname}`` is named from the ``command`` line's overrides for the
    directories made for the whole command, from the ``first_job``'s for that job's (``JOB_SWEEP_DIR``
    and the subdir). A value known only as the job runs is left out, and nothing when the config
    does not compose (the other checks name why)."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    held = HydraConfig.instance().cfg  # (put back after: Hydra's own callbacks read it)
    resolved: dict[str, Any] = {}
    try:
        cfg = _composed(config_name, [*groups, *(o.input_line for o in hydra_overrides)], with_hydra=True)
        naming = cfg.hydra.job.config.override_dirname
        with open_dict(cfg):
            for o, value in values:
                if not o.is_delete():
                    OmegaConf.update(cfg, o.key_or_group, value, force_add=True)
            cfg.hydra.job.num, cfg.hydra.job.id = 0, "0"  # (set per job as a sweep runs)
        for overrides, keys in ((command, {"hydra.run.dir": "hydra.run.dir", "hydra.sweep.dir": "hydra.sweep.dir"}),
                                (first_job, {"hydra.sweep.dir": JOB_SWEEP_DIR,
                                             "hydra.sweep.subdir": "hydra.sweep.subdir"})):  # fmt: skip
            named = copy.deepcopy(cfg)  # (set_config below makes its config read-only)
            with open_dict(named):
                named.hydra.job.override_dirname = get_overrides_dirname(
                    overrides, exclude_keys=list(naming.exclude_keys), item_sep=naming.item_sep,
                    kv_sep=naming.kv_sep
                )  # fmt: skip
            HydraConfig.instance().set_config(named)  # for ${hydra:...}, as Hydra sets it before a job
            for key, name in keys.items():
                try:
                    resolved[name] = str(OmegaConf.select(named, key, throw_on_missing=True))
                except (MissingMandatoryValue, InterpolationToMissingValueError):
                    continue  # (filled in as the job starts, as hydra.runtime's are)
                except Exception as exc:
                    resolved[name] = exc
    except Exception:
        return {}
    finally:
        HydraConfig.instance().cfg = held
    return resolved


def _swept_but_not_named(subdir: str, swept: tuple[str, ...], per_job: tuple[str, ...] = ()) -> list[str]:
    """The swept keys and groups (``swept``) that a ``hydra.sweep.subdir`` naming jobs by some of
    their values (``s${train.seed}`` in a sweep of learning rates) leaves out: jobs differing only
    in those get one directory. Nothing when it names jobs by their number or overrides, which
    differ for every job."""
    named = re.findall(r"\$\{([^}]+)\}", subdir)
    if any(re.search(r"job\.(num|id|override_dirname)\b", ref) for ref in named):
        return []
    refs = [ref.removeprefix("hydra:") for ref in named]
    if any(ref in per_job for ref in refs):
        return []  # (a key given a value that differs for every job, such as train.seed=${hydra:job.num})
    known = {*config_groups(), "train", "hydra"}
    if any(ref.split(".")[0] not in known and not ref.startswith("runtime.") for ref in refs):
        return []  # (a resolver such as ${now:...}, or a key that does not exist: its own check says so)
    return [key for key in swept if not any(ref == key or ref.startswith(f"{key}.")
                                            or ref == f"runtime.choices.{key}" for ref in refs)]  # fmt: skip


def _directory_naming_problems(config_name: str, group_sets: list[list[str]], checked: list[Any],
                               several_jobs: bool, swept: tuple[str, ...] = (),
                               per_job: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """Directory names Hydra makes without a word that go wrong: a ``${hydra:KEY}`` naming no Hydra
    setting resolves to ``None`` (``out/None``), and a ``hydra.sweep.subdir`` without any ``${...}``
    puts every job of a sweep in one directory (the first trained there, the next refused after it,
    with the first one's records rewritten)."""
    problems = []
    named: list[tuple[Any, str]] = []
    for o in checked:
        value = o.value()
        if not isinstance(value, str):
            continue
        if o.key_or_group == "hydra.sweep.subdir" and "${" not in value and several_jobs:
            problems.append(f"{o.input_line}: every job of the sweep would share this one directory; name "
                            "each job's, as the default ${hydra.job.num} does")  # fmt: skip
        elif o.key_or_group == "hydra.sweep.subdir" and (unnamed := _swept_but_not_named(value, swept, per_job)):
            problems.append(f"{o.input_line}: jobs that differ only in {', '.join(unnamed)} would share a "
                            f"directory (the first trained there, the next refused after it); name "
                            f"{'them' if len(unnamed) > 1 else 'it'} in the subdir too, or use "
                            "${hydra.job.num}")  # fmt: skip
        named += [(o, key) for key in re.findall(r"\$\{hydra:([^}]+)\}", value)]
    if not named or not group_sets:
        return problems
    try:
        cfg = compose_config(config_name, group_sets[0], with_hydra=True)
    except Exception:  # (a composition problem: the other checks name it)
        return problems
    for o, key in named:
        if not _has_key(cfg.get("hydra"), key.strip().split(".")):
            problems.append(f"{o.input_line}: ${{hydra:{key}}} names no Hydra setting (it would resolve to "
                            "None); such as ${hydra:job.num} or ${hydra:runtime.choices.method}")  # fmt: skip
    return problems


def lookup(node: Any, path: list[str]) -> tuple[bool, Any]:
    """(whether the plain config ``node`` has the key ``path``, its value): one set as a job starts,
    "???" until then, such as ``job.num``, counts (OmegaConf.select reads those as absent); a number
    indexes a list, as OmegaConf reads ``dataset.mix.0``."""
    for part in path:
        if isinstance(node, list) and (index := _list_index(node, part)) is not None:
            node = node[index]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _has_key(node: Any, path: list[str]) -> bool:
    return lookup(node, path)[0]


def _absent(data: dict[str, Any], dotted: str) -> bool:
    """Whether the key ``dotted`` is missing from the composed config: not where a list holds it
    (``dataset.mix.0=x`` indexes the list, which Hydra allows)."""
    node: Any = data
    for part in dotted.split("."):
        if isinstance(node, list):
            return False
        if not isinstance(node, dict) or part not in node:
            return True
        node = node[part]
    return False


def _default_directory_problem(config_name: str, groups: list[str], hydra_overrides: list[Any],
                               multirun: bool) -> list[str]:  # fmt: skip
    """The run (or sweep) directory the config chooses, when the command line gives none: made
    under the current directory, which may be read-only (Hydra's PermissionError traceback)."""
    if cannot_make_directory_in(Path.cwd()) is None and not _holds_a_broken_link(Path.cwd()):
        return []  # (the usual case, settled by one probe and one listing: no composition)
    lines = [o.input_line for o in hydra_overrides]
    try:
        hydra = compose_config(config_name, [*groups, *lines], with_hydra=True)["hydra"]
    except Exception:  # (a composition problem: the other checks name it)
        return []
    multirun = multirun or str(hydra.get("mode")).endswith("MULTIRUN")  # (RunMode; an experiment may set it)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if any(o.key_or_group == key for o in hydra_overrides):
        return []  # (checked as given)
    template = str(hydra["sweep" if multirun else "run"]["dir"])
    # The directories Hydra's ${now:...} (or any interpolation) cannot change: those before the
    # name that holds the first one.
    head, interpolated, _ = template.partition("${")
    fixed = Path(os.path.dirname(head) if interpolated else head or ".").expanduser()
    path = fixed if fixed.is_absolute() else Path.cwd() / fixed
    if (broken := _broken_link(path)) is not None:
        return [f"{key}={template}: {broken}; make its target, or set {key}"]
    existing = _nearest_existing(path)
    if existing in (None, path) or not existing.is_dir() or (why := cannot_make_directory_in(existing)) is None:
        return []  # (one that exists needs nothing made: sala-data's '.' writes nothing in it)
    return [f"{key}={template}: cannot make it in {existing} ({why}); run from a directory you can write in, "
            f"or set {key}"]  # fmt: skip


def _sweep_jobs_run_on_slurm(config_name: str, base_groups: list[str], hydra_overrides: list[Any]) -> bool:
    """Whether Hydra's launcher for this sweep runs its jobs as SLURM jobs, where their own checks
    (a W&B key, say) belong: chosen on the command line, or by an option file (an experiment's
    ``override /hydra/launcher: submitit_slurm``) in the sweep's base config, which sets Hydra's
    launcher (its swept groups are applied per job, after the launcher is chosen)."""
    chosen = [str(o.value()) for o in hydra_overrides if o.key_or_group == "hydra/launcher"]
    if chosen:
        return "slurm" in chosen[-1]
    try:
        cfg = _composed(config_name, base_groups, with_hydra=True)
        return runs_jobs_on_slurm(OmegaConf.select(cfg, "hydra.launcher._target_", default=""))
    except Exception:  # (a composition problem: the config's own checks name it)
        return False


def runs_jobs_on_slurm(hydra_launcher_target: object) -> bool:
    """Whether Hydra's launcher (its ``hydra.launcher._target_``) is submitit's SLURM launcher."""
    return "SlurmLauncher" in str(hydra_launcher_target or "")


def _launcher_of(compose: Callable[[str, list[str]], dict[str, Any]], config_name: str, groups: list[str]) -> Any:
    try:
        return compose(config_name, groups).get("launcher", {}).get("name")
    except Exception:  # (a composition problem: the config's own checks name it)
        return None


def _check_hydra_overrides(config_name: str, groups: list[str], overrides: list[Any]) -> list[str]:
    """Hydra's own settings (``hydra.*``, ``hydra/*``), applied as Hydra will apply them: a typo
    is one line here, exit 2, rather than Hydra's multi-line error with exit 1 after the checks."""
    # Hydra applies group choices (hydra/launcher=...) before values (hydra.launcher.x=...).
    ordered = sorted(overrides, key=lambda o: "/" not in o.key_or_group)
    lines = [o.input_line for o in ordered]
    together = _hydra_problem(config_name, [*groups, *lines], ordered[-1].key_or_group)
    if together is None or _hydra_problem(config_name, groups, "") is not None:
        return []  # (a problem without Hydra's overrides is not theirs: the config's own check names it)
    for end in range(1, len(ordered) + 1):  # the first override that brings the problem
        culprit = ordered[end - 1]
        problem = _hydra_problem(config_name, [*groups, *lines[:end]], culprit.key_or_group)
        if problem is not None:
            break
    else:
        culprit, problem = ordered[-1], together
    problems = [f"{culprit.input_line}: {problem}"]
    if culprit.key_or_group.startswith("hydra.sweeper.params."):
        problems.append("an Optuna range is written as the key itself, e.g. "
                        "'train.learning_rate=tag(log,interval(1e-5,1e-3))' (see README, Optuna searches)")  # fmt: skip
    return problems


def _sweep_problems(per_job: list[tuple[list[str], list[str]]]) -> list[str]:
    """Each job's problems, each said once: as for a single run when every job has it, else naming
    the swept values that make it (`-m lr=1e-3,-1 seed=1,2,3`: the jobs with lr=-1), or each job."""
    everywhere = set.intersection(*(set(found) for _, found in per_job)) if per_job else set()
    shown: list[str] = []
    for _, found in per_job:
        for problem in found:
            if problem in everywhere:
                lines = [problem]
            else:
                having = [job for job, found_there in per_job if problem in found_there]
                common = [value for value in having[0] if all(value in job for job in having)]
                exactly = common and sum(all(value in job for value in common) for job, _ in per_job) == len(having)
                named = [" ".join(common)] if exactly else [" ".join(job) for job in having]
                lines = [f"in the job{'s' if exactly and len(having) > 1 else ''} with {n}: {problem}" for n in named]
            shown += [line for line in lines if line not in shown]
    return shown


@dataclass(frozen=True)
class _SweepInConfig:
    multirun: bool = False  # hydra.mode: MULTIRUN
    optuna: bool = False  # the sweeper is Hydra's Optuna sweeper (or sala-train's, built on it)
    ours: bool = False  # sala-train's (the presets'), which reads range() as -m does
    params: bool = False  # hydra.sweeper.params holds keys to sweep or search


def _sweep_set_in_config(config_name: str, overrides: list[Any]) -> _SweepInConfig:
    """What an experiment (``experiment=NAME``, the user's own in ``--config-dir`` too) sets of the
    sweep: Hydra 1.2's way to keep one in a config file is ``hydra.mode: MULTIRUN`` and
    ``hydra.sweeper.params``, whose values the checks would otherwise see only as each job ran
    them (a typo there was Hydra's error, exit 1, with the sweep directory begun)."""
    if not any(o.key_or_group.split("@")[0].lstrip("+~") == "experiment" for o in overrides):
        return _SweepInConfig()
    chosen = [o.input_line for o in overrides if not o.is_sweep_override()
              and (o.key_or_group.split("@")[0] in config_groups() or o.is_hydra_override())]  # fmt: skip
    try:
        hydra = compose_config(config_name, chosen, with_hydra=True)["hydra"]
    except Exception:  # (a composition problem: the other checks name it)
        return _SweepInConfig()
    sweeper = hydra.get("sweeper") or {}
    params = sweeper.get("params") if isinstance(sweeper, dict) else None
    target = str(sweeper.get("_target_", "")) if isinstance(sweeper, dict) else ""
    return _SweepInConfig(
        multirun=str(hydra.get("mode")).endswith("MULTIRUN"),
        optuna="Optuna" in target,
        ours="SalaTrainOptunaSweeper" in target,
        params=bool(params) and isinstance(params, dict),
    )


def check_command_line(argv: list[str], config_name: str, schema: type) -> list[Any]:
    """Raise ConfigError listing every problem of this command line; if it is fine, return its
    overrides as Hydra's parser reads them (none for ``--help`` and the like)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, IntervalSweep
    from hydra.errors import HydraException

    from sala_train.config import search_checks  # (it builds on this module's composition)

    register_resolvers()
    use_user_config_dirs([])  # this command line's own, set below once they are known to exist
    args = get_args_parser().parse_args(argv)
    if args.shell_completion:
        if not any(line.split("=")[0] in ("install", "uninstall", "query") for line in args.overrides):
            raise ConfigError(
                [
                    "--shell-completion: say what to do with it: install=SHELL, uninstall=SHELL or "
                    'query=SHELL (bash, zsh or fish), e.g. eval "$(sala-train -sc install=bash)"'
                ]
            )
        return []
    if args.experimental_rerun:
        if not Path(args.experimental_rerun).is_file():
            raise ConfigError([f"--experimental-rerun {args.experimental_rerun}: no such file (a run's "
                               ".hydra/config.pickle)"])  # fmt: skip
        return []
    # The checks compose sala-train's own primary config; another one (Hydra's --config-name and
    # --config-path) would run a config they never saw, or fail in Hydra (exit 1).
    if args.config_name is not None or args.config_path is not None:
        flag = "--config-name" if args.config_name is not None else "--config-path"
        raise ConfigError([f"{flag}: the command composes its own primary config ('{config_name}'); put your "
                           "settings in a config group option of your own (experiment=NAME, dataset=NAME, ...) in a "
                           "directory given with --config-dir"])  # fmt: skip
    # `--cfg`, `--info` and `--help` only print: their overrides are checked (Hydra's own error is a
    # traceback), not the files or combinations a run would use.
    printing = [flag for flag, given in (("--cfg", args.cfg), ("--info", args.info), ("--help", args.help),
                                         ("--hydra-help", args.hydra_help)) if given]  # fmt: skip
    only_prints, flag = bool(printing), printing[0] if printing else ""
    if only_prints and args.multirun and config_name != "data":  # (Hydra's refusal is a traceback)
        raise ConfigError([f"{flag} prints about one job and -m (--multirun) runs a sweep: use one of them; to see "
                           f"one job of a sweep, give {flag} that job's values, without -m"])  # fmt: skip
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as exc:
        # Hydra's lines as it wrote them, each indented alike, so its caret still points at the
        # character it means; the fix for the commonest cause said first.
        lines = "".join(f"\n      {line}" for line in str(exc).splitlines())
        raise ConfigError([f"cannot parse overrides (a value with spaces, letters outside ASCII or any of "
                           f"\\()[]{{}}:=, goes in quotes: 'key=\"...\"'):{lines}"]) from exc  # fmt: skip
    sweep_values = [str(o.input_line) for o in overrides if o.is_sweep_override()] if only_prints else []
    if sweep_values and config_name != "data":  # (Hydra's refusal: its error and exit 1, or with --info a traceback)
        raise ConfigError([f"{sweep_values[0]}: a sweep's values, and {flag} prints about one job; give {flag} one "
                           "value of it to see that job"])  # fmt: skip

    dirs, problems = _user_config_dirs(args.config_dir, overrides)
    if problems:
        raise ConfigError(problems)
    use_user_config_dirs(dirs)
    # A hparams_search preset switches Hydra to multirun itself (hydra.mode: MULTIRUN), and so may
    # an experiment of the user's, with a sweep or search of its own in hydra.sweeper.
    searching = any(o.key_or_group == "hparams_search" and o.value() for o in overrides)
    in_config = _sweep_set_in_config(config_name, overrides)
    multirun = (
        args.multirun
        or searching
        or in_config.multirun
        or any(o.key_or_group == "hydra.mode" and o.value() == "MULTIRUN" for o in overrides)
    )
    if multirun and config_name == "data":  # (Hydra would make a multirun/ directory of job folders)
        raise ConfigError(["-m (--multirun): sala-data shows one data set per command and writes nothing; run it "
                           "once per value"])  # fmt: skip
    optuna = searching or in_config.optuna or any(o.key_or_group == "hydra/sweeper" and "optuna" in str(o.value())
                                                  for o in overrides)  # fmt: skip
    if optuna and any(o.key_or_group == "launcher.dry_run" and o.value() in (True, "true") for o in overrides):
        problems.append("launcher.dry_run=true: an Optuna search (hparams_search, or hydra/sweeper=optuna) picks each "
                        "trial from the results of the ones before, so it has no commands to print in advance; dry-run "
                        "one trial instead, with the values on the command line and without the search")  # fmt: skip
    known_groups = config_groups()
    group_choices: list[list[str]] = []
    value_choices: list[list[tuple[Any, Any]]] = []
    hydra_overrides = []
    for o in overrides:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            if o.is_sweep_override():  # (Hydra: "Sweeping over Hydra's configuration is not supported", exit 1)
                hint = ("; an Optuna range is written as the key itself, e.g. 'train.learning_rate=tag(log,"
                        "interval(1e-5,1e-3))'") if key.startswith("hydra.sweeper.params.") else ""  # fmt: skip
                problems.append(f"{o.input_line}: Hydra's own settings take one value per command, not a sweep; "
                                f"run one command for each{hint}")  # fmt: skip
            elif key != "hydra.searchpath":  # (searchpath: checked above)
                hydra_overrides.append(o)
            continue
        if o.is_sweep_override() and not multirun:
            problems.append(f"{o.input_line}: a sweep needs -m (--multirun)")
            continue
        if o.is_sweep_override() and key == "hparams_search":  # (the checks of a search would all be of none)
            raise ConfigError([f"{o.input_line}: a search preset chooses the sweeper, which runs one search per "
                               "command; run one command for each (hparams_search=ONE)"])  # fmt: skip
        if isinstance(o.value(), IntervalSweep) and not optuna:  # Hydra's basic sweeper: a traceback, exit 1
            problems.append(f"{o.input_line}: an interval is a search range, for an Optuna search (hparams_search="
                            "lora_optuna or full_optuna); a plain -m sweep takes values: 1e-4,3e-4")  # fmt: skip
            continue
        # (a range Optuna would refuse with its traceback)
        if optuna and not only_prints and (problem := search_checks.interval_problem(o)) is not None:
            problems.append(problem)
            continue
        group = key.split("@")[0]
        values = override_values(o, range_end_drawn=optuna and not (searching or in_config.ours))
        if isinstance(glob := o.value(), Glob) and group in known_groups:
            values = list(glob.filter(group_options(group)))  # what Hydra's glob will pick
        if values is None:
            continue  # validated per job once the sweeper picks a value
        if not values:  # Hydra would launch no job, exit 0, and leave an empty sweep directory
            listed = f"; {group} options: {', '.join(group_options(group))}" if group in known_groups else ""
            problems.append(f"{o.input_line}: sweeps no value, so no job would run{listed}")
            continue
        if group in known_groups and o.is_delete():
            group_choices.append([f"~{key}"])
        elif group in known_groups:
            options = group_options(group)
            bad = [v for v in values if str(v) not in options]
            for v in bad:
                shown = "null" if v is None else v
                problems.append(f"{group}={shown}: no such {group}; choose from {', '.join(options)}")
            if not bad:
                group_choices.append([f"{o.get_key_element()}={v}" for v in values])
        elif "/" in key:
            problems.append(f"{o.input_line}: unknown config group '{group}'; groups: {', '.join(known_groups)}")
        elif o.is_delete() and "." not in key:  # (the schema's dataclass defaults then apply, not the options')
            problems.append(f"{o.input_line}: deleting a section leaves the schema's built-in defaults, not the "
                            f"values the chosen options give it; set the keys you want to change "
                            f"({key}.KEY=VALUE)")  # fmt: skip
        elif o.is_delete() and any(part.lstrip("-").isdigit() for part in key.split(".")[1:]):
            parts = key.split(".")
            listed = ".".join(parts[: next(i for i, p in enumerate(parts) if i and p.lstrip("-").isdigit())])
            problems.append(f"{o.input_line}: an item of a list cannot be deleted (Hydra fails on it); set the list "
                            f"whole: {listed}=[...]")  # fmt: skip
        elif o.is_delete():
            problems.append(f"{o.input_line}: deleting a key leaves the schema's built-in default, not the value "
                            f"the chosen options give it; set the value you want ({key}=VALUE, or {key}=null "
                            "where it may be empty)")  # fmt: skip
        else:
            value_choices.append([(o, v) for v in values])

    combos, unchecked = _combinations_to_check(group_choices, value_choices)
    if unchecked and not only_prints:
        say(f"sala-train: note: {unchecked} values of this sweep are checked only as their jobs start (before it "
            f"starts: its first {MAX_SWEEP_COMBINATIONS} jobs, and {MAX_EXTRA_VALUES} values they leave out)",
            sys.stderr)  # fmt: skip
    per_job: list[tuple[list[str], list[str]]] = []
    compose = _composing_once()
    named = [o.value() for o in hydra_overrides if o.key_or_group == "hydra.run.dir" and not multirun]
    trackers = config_name == "train" and not only_prints
    jobs_on_slurm = False
    if trackers and multirun:  # (a single run ignores Hydra's launcher: it runs here)
        base = [choices[0] for choices in group_choices if len(choices) == 1]
        jobs_on_slurm = _sweep_jobs_run_on_slurm(config_name, base, hydra_overrides)
        trackers = not jobs_on_slurm
    run_dir = Path(named[-1]) if named and isinstance(named[-1], str) and "${" not in named[-1] else None
    group_sets: list[list[str]] = []
    for groups, values in combos:
        if list(groups) not in group_sets:
            group_sets.append(list(groups))
        # `--cfg` only prints the config: check keys and types, not files or combinations.
        swept = [g for g, choices in zip(groups, group_choices, strict=True) if len(choices) > 1]
        job = [*swept, *(_swept_value(o, v) for o, v in values if o.is_sweep_override())]
        found = check_combination(config_name, schema, list(groups), list(values), not only_prints, compose,
                                  run_dir, trackers, tuple(str(o.input_line) for o in hydra_overrides))  # fmt: skip
        per_job.append((job, found))
    if jobs_on_slurm and any(_launcher_of(compose, config_name, groups) == "slurm" for groups in group_sets):
        problems.append("launcher=slurm: hydra/launcher=submitit_slurm runs each job as a SLURM job already, where "
                        "launcher=slurm would submit another job and return at once (its allocation wasted, and an "
                        "Optuna search given no value); keep launcher=local, with launcher.nproc_per_node for "
                        "several processes per job")  # fmt: skip
    # The directories Hydra makes in this mode (--cfg only prints: none), which only a training run
    # (or a sweep's jobs) writes in: sala-data's '.' gets nothing.
    used = set() if only_prints else {"hydra.sweep.dir", "hydra.sweep.subdir"} if multirun else {"hydra.run.dir"}
    checked = [o for o in hydra_overrides if o.key_or_group in used]
    resolved: dict[str, Any] = {}
    if group_sets and any(o.key_or_group == "hydra.sweep.subdir" or _interpolates(o) for o in checked):
        first_values = [choices[0] for choices in value_choices if choices]
        command = _first_job_overrides(overrides, False)
        first_job = _first_job_overrides(overrides, multirun)
        resolved = _resolved_hydra_dirs(config_name, group_sets[0], first_values, hydra_overrides, command, first_job)
    for o in checked:
        if (problem := _not_a_directory(o, config_name == "train", resolved)) is not None:
            problems.append(problem)
    swept = [o.key_or_group.split("@")[0].lstrip("+~") for o in overrides if o.is_sweep_override()
             and not o.is_hydra_override() and (o.is_discrete_sweep() or optuna)]  # fmt: skip
    unique = tuple(o.key_or_group for o in overrides
                   if re.search(r"job\.(num|id|override_dirname)\b", str(o.value())))  # fmt: skip
    problems += _directory_naming_problems(config_name, group_sets, checked, len(per_job) + unchecked > 1,
                                           tuple(swept) if multirun else (), unique)  # fmt: skip
    if not only_prints and group_sets:
        problems += _default_directory_problem(config_name, group_sets[0], hydra_overrides, multirun)
    if multirun and any(len(choices) > 1 for choices in group_choices):
        # Hydra composes a sweep's base config without its swept groups first: an option the
        # defaults lists ask for must exist even when every job overrides it.
        problems += _missing_in_base(config_name, [choices[0] for choices in group_choices if len(choices) == 1])
    if hydra_overrides:
        first = [choices[0] for choices in group_choices]
        problems += _check_hydra_overrides(config_name, first, hydra_overrides)
    problems += [line for line in _sweep_problems(per_job) if line not in problems]  # (said by a check above)
    for o, _ in (choices[0] for choices in value_choices if choices):
        if isinstance(o.value(), IntervalSweep) and any(f"{o.key_or_group}: expected int" in p for p in problems):
            # Hydra reads an interval's ends as floats unless it is cast; Optuna then draws floats.
            sweep = o.value()
            # (the hint below says it whole: each end's "expected int, got 4.0" only adds noise before it)
            problems = [p for p in problems if not (f"{o.key_or_group}: expected int" in p and "interval(" in p)]
            problems.append(f"{o.input_line}: {o.key_or_group} takes whole numbers; an integer range is written "
                            f"'{o.key_or_group}=int(interval({int(sweep.start)},{int(sweep.end)}))'")  # fmt: skip
    for o, _ in (choices[0] for choices in value_choices if choices):
        # (a key with a problem already: that line says why, e.g. train.learning_rate must be > 0)
        if optuna and not only_prints and not any(o.key_or_group in p for p in problems):
            problems += [problem for problem in [search_checks.log_interval_problem(o)] if problem is not None]
    if (optuna or in_config.params) and not only_prints and group_sets:
        # The sweeper's own settings and the preset's search space, with this command line (or
        # the values an experiment's sweep takes, hydra.sweeper.params, each with the rest).
        search = next((str(o.value()) for o in overrides if o.key_or_group == "hparams_search"
                       and isinstance(o.value(), str)), None)  # fmt: skip
        hydra_lines = [str(o.input_line) for o in sorted(hydra_overrides, key=lambda o: "/" not in o.key_or_group)]
        first_values = [choices[0] for choices in value_choices if choices]
        baseline = per_job[0][1] if per_job else []
        found = search_checks.preset_problems(config_name, schema, group_sets, first_values, baseline, hydra_lines,
                                              overrides, search, cross_field=True, compose=compose,
                                              a_search=optuna)  # fmt: skip
        problems += [p for p in found if p not in problems]
    if problems:
        raise ConfigError(problems)
    return overrides
