"""Checks of an Optuna search before its first trial: the sweeper's direction, each range's ends,
and every value the preset searches with the rest of the command line (Optuna and Hydra would
otherwise fail the search with a traceback, or refuse every trial one by one)."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

from sala_train.config.compose import check_combination, compose_config, lookup, override_values
from sala_train.config.entries import config_groups, group_options
from sala_train.errors import first_line

_DIRECTIONS = ("minimize", "maximize")  # what Optuna's create_study takes (Hydra's sweeper passes them on)


def _direction_problem(direction: Any, overrides: list[Any]) -> str | None:
    """``hydra.sweeper.direction``: Optuna takes minimize or maximize, as a string or a list; a job
    returns one value (its best validation loss), so a list of more than one fails every trial."""
    named = next((o.input_line for o in overrides if o.key_or_group == "hydra.sweeper.direction"),
                 "hydra.sweeper.direction")  # fmt: skip
    if isinstance(direction, list) and len(direction) != 1:
        return (f"{named}: each trial returns one value (its best validation loss), so the search takes one "
                f"direction, minimize or maximize; got {len(direction)}")  # fmt: skip
    one = direction[0] if isinstance(direction, list) else direction
    if isinstance(one, Enum):  # the sweeper's own default, Direction.minimize: Hydra passes on its name
        one = one.name
    if one in _DIRECTIONS:
        return None
    shown = "null" if one is None else one
    return (f"{named}: the search's direction is minimize or maximize (each trial returns its best validation "
            f"loss: minimize looks for the lowest); got {shown}")  # fmt: skip


def _count_problems(sweeper: dict[str, Any]) -> list[str]:
    """Trial counts the search would run zero of (it then failed with "no trial completed"), a
    sampler seed out of the samplers' range (Hydra's traceback), and a SQLite storage whose
    directory does not exist (a sqlalchemy traceback at the first trial)."""
    problems = []

    def interpolated(value: Any) -> bool:  # (resolved by Hydra later: ${oc.env:...}, ${hydra:runtime.cwd})
        return isinstance(value, str) and "${" in value

    for key in ("n_trials", "n_jobs"):
        value = sweeper.get(key)
        if value is None or interpolated(value):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"hydra.sweeper.{key}: must be a whole number >= 1, got {value!r}")
    seed = (sweeper.get("sampler") or {}).get("seed")
    # (numpy's seed range, which Optuna's samplers refuse past with Hydra's instantiate traceback)
    if seed is not None and not interpolated(seed) and (isinstance(seed, bool) or not isinstance(seed, int)
                                                        or not 0 <= seed < 2**32):  # fmt: skip
        problems.append(f"hydra.sweeper.sampler.seed: must be a whole number from 0 to 2**32 - 1, got {seed!r}")
    storage = sweeper.get("storage")
    if isinstance(storage, str) and storage.startswith("sqlite:///") and not interpolated(storage):
        database = Path(storage.removeprefix("sqlite:///"))
        if str(database) not in ("", ":memory:") and not database.parent.is_dir():
            problems.append(f"hydra.sweeper.storage={storage}: no directory {database.parent} for its database")
    return problems


def interval_problem(override: Any) -> str | None:
    """An Optuna range Optuna itself would refuse with a traceback once the search started."""
    from hydra.core.override_parser.types import IntervalSweep

    sweep = override.value()
    if not isinstance(sweep, IntervalSweep):
        return None
    low, high = sweep.start, sweep.end
    if low is not None and high is not None and low > high:
        return (f"{override.input_line}: the interval's low end {low} is above its high end {high}; "
                "write the lower one first")  # fmt: skip
    return None


def log_interval_problem(override: Any) -> str | None:
    """``tag(log, interval(0, x))``: Optuna draws a log-scale range only above 0 (from 1 for integers)."""
    from hydra.core.override_parser.types import IntervalSweep

    sweep = override.value()
    if not isinstance(sweep, IntervalSweep) or "log" not in sweep.tags or sweep.start is None:
        return None
    whole = isinstance(sweep.start, int) and isinstance(sweep.end, int)
    if (sweep.start < 1) if whole else (sweep.start <= 0):
        least = "at least 1 (an integer range)" if whole else "above 0"
        return f"{override.input_line}: a log-scale interval's low end must be {least}; got {sweep.start}"
    return None


def _has_key(data: dict[str, Any], dotted: str) -> bool:
    return lookup(data, dotted.split("."))[0]


def _sweeper_settings(config_name: str, groups: list[str], hydra_lines: list[str]) -> dict[str, Any] | None:
    """``hydra.sweeper`` as Hydra will compose it for these choices; None where Hydra cannot (its
    own check names why)."""
    try:
        data = compose_config(config_name, [*groups, *hydra_lines], with_hydra=True)
    except Exception:
        return None
    sweeper = (data.get("hydra") or {}).get("sweeper")
    return sweeper if isinstance(sweeper, dict) else None


def _search_params(sweeper: dict[str, Any], given: set[str]) -> tuple[list[Any], list[str]]:
    """The preset's search space (``hydra.sweeper.params``) as Hydra's overrides, less the keys the
    command line sets (a value there takes the key out of the search, a range replaces it), and
    problems of entries that cannot be read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    params = sweeper.get("params") or {}
    parsed: list[Any] = []
    problems: list[str] = []
    for key, spec in params.items() if isinstance(params, dict) else []:
        if isinstance(spec, str) and "${" in spec:
            continue  # known only once Hydra resolves it
        try:
            (o,) = OverridesParser.create().parse_overrides([f"{key}={spec}"])
        except HydraException as exc:
            problems.append(f"hydra.sweeper.params.{key}: cannot read {spec!r} as a search range ({first_line(exc)})")
            continue
        if o.key_or_group not in given:
            parsed.append(o)
    return parsed, problems


def _preset_for(
    config_name: str, groups: list[str], hydra_lines: list[str], current: str,
    compose: Callable[[str, list[str]], dict[str, Any]],
) -> str | None:  # fmt: skip
    """Another hparams_search option whose searched keys all exist with these group choices."""
    for name in group_options("hparams_search"):
        if name == current:
            continue
        others = [*(g for g in groups if g.split("=")[0].lstrip("+~") != "hparams_search"), f"hparams_search={name}"]
        sweeper = _sweeper_settings(config_name, others, hydra_lines)
        if sweeper is None:
            continue
        params, unreadable = _search_params(sweeper, set())
        try:
            data = compose(config_name, others)
        except Exception:
            continue
        if params and not unreadable and all(_has_key(data, o.key_or_group) for o in params if not o.is_add()):
            return name
    return None


def _missing_keys_problem(
    source: str, missing: list[str], groups: list[str], config_name: str, hydra_lines: list[str],
    searching: str | None, compose: Callable[[str, list[str]], dict[str, Any]],
) -> str:  # fmt: skip
    """``hparams_search=lora_optuna method=full``: Hydra would fail on the first trial (``Key 'r' is
    not in struct``, exit 1, a sweep directory left behind)."""
    keys = ", ".join(missing)
    chosen = {g.split("=")[0]: g.split("=", 1)[1] for g in groups if "=" in g and not g.startswith("~")}
    group = missing[0].split(".")[0]
    if group not in chosen or group not in config_groups():
        return f"{source} searches {keys}, which this config does not have"
    own = ""
    try:  # the preset's own choice for that group, without the command line's
        data = compose_config(config_name, [g for g in groups if g.split("=")[0] != group], with_hydra=True)
        own_choice = data["hydra"]["runtime"]["choices"].get(group)
        if own_choice and own_choice != chosen[group]:
            own = f" (keys of {group}={own_choice})"
    except Exception:
        pass
    line = f"{source} searches {keys}{own}, which {group}={chosen[group]} does not have"
    other = _preset_for(config_name, groups, hydra_lines, searching, compose) if searching else None
    if other is not None:
        line += f"; for {group}={chosen[group]} use hparams_search={other}"
    return line


def preset_problems(
    config_name: str, schema: type, group_sets: list[list[str]], values: list[tuple[Any, Any]],
    baseline: list[str], hydra_lines: list[str], overrides: list[Any], searching: str | None,
    cross_field: bool, compose: Callable[[str, list[str]], dict[str, Any]], a_search: bool = True,
) -> list[str]:  # fmt: skip
    """The search's own settings, checked before the first trial: its direction, and every value
    of the preset's search space (each choice, both ends of each interval) with this command line's
    other values, as a trial would get them (otherwise each trial is refused, one by one).
    ``a_search``: False for Hydra's basic sweeper given ``hydra.sweeper.params`` by an experiment,
    which has the values but not a search's settings."""
    groups = group_sets[0]
    sweeper = _sweeper_settings(config_name, groups, hydra_lines)
    if sweeper is None:
        return []
    problems = []
    if a_search and (problem := _direction_problem(sweeper.get("direction"), overrides)) is not None:
        problems.append(problem)
    problems += _count_problems(sweeper) if a_search else []
    given = {o.key_or_group for o in overrides}
    params, unreadable = _search_params(sweeper, given)
    problems += unreadable
    source = f"hparams_search={searching}" if searching else "hydra.sweeper.params"
    for choices in group_sets:  # a key the preset searches that these choices do not have
        try:
            data = compose(config_name, choices)
        except Exception:
            continue  # the jobs' own check names it
        missing = [o.key_or_group for o in params if not o.is_add() and not _has_key(data, o.key_or_group)]
        if missing:
            problems.append(_missing_keys_problem(source, missing, choices, config_name, hydra_lines, searching,
                                                  compose))  # fmt: skip
            params = [o for o in params if o.key_or_group not in missing]
    known_groups = config_groups()
    for o in params:
        spec = f"{source} searches {o.input_line}"
        if (problem := interval_problem(o) or log_interval_problem(o)) is not None:
            problems.append(f"{source} searches {problem}")
            continue
        taken = override_values(o)
        if not taken or o.key_or_group in known_groups:
            continue  # (a group the search picks: Hydra checks its options per trial)
        refused: list[tuple[Any, list[str]]] = []
        for value in taken:
            found = check_combination(config_name, schema, groups, [*values, (o, value)], cross_field, compose)
            new = [p for p in found if p not in baseline]
            if new:
                refused.append((value, new))
        if refused and len(refused) == len(taken):  # the command line rules the key out: one line
            value, found = refused[0]
            problems.append(f"{spec}, and every value it can take is refused with this command line (at {value}: "
                            f"{'; '.join(found)}); giving {o.key_or_group} on the command line replaces the "
                            "preset's range")  # fmt: skip
        else:
            problems += [f"{spec}; at {value}: {p}" for value, found in refused for p in found]
    return problems
