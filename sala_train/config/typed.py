"""Turn plain mappings into the typed schemas, collecting every problem instead of stopping at one.

OmegaConf's structured configs stop at the first bad key and cannot hold unions of dataclasses
(our method/backend groups), so this small converter walks the dataclass fields itself. It is used
both at compose time (on the composed config) and by each rank when it reads ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from enum import Enum
from typing import Any, Literal, TypeVar, Union

from sala_train.config.elsewhere import explain, explain_value

T = TypeVar("T")

MISSING_MARK = "???"
# The largest whole number torch, numpy and the dataloader take (a C int64); Python's ints are unbounded.
INT64_MAX = 2**63 - 1


class ConfigError(Exception):
    """A config problem a user can fix; carries every problem found."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems

    def render(self) -> str:
        n = len(self.problems)
        head = f"sala-train: {n} config problem{'s' if n > 1 else ''}:"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _describe(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _discriminator(cls: type) -> str | None:
    hints = typing.get_type_hints(cls)
    tp = hints.get("name")
    if typing.get_origin(tp) is Literal:
        return str(typing.get_args(tp)[0])
    return None


def _number_in_text(tp: Any, data: Any) -> Any:
    """A number or boolean given as text, read as one, as OmegaConf's typed nodes read it: what
    ``${oc.env:LR}`` gives (environment variables are text) and a quoted ``train.learning_rate="1e-3"``.
    Anything else is returned as it is, to be refused by its type."""
    if not isinstance(data, str) or tp not in (int, float, bool):
        return data
    text = data.strip()
    if tp is bool:
        return {"true": True, "false": False}.get(text.lower(), data)
    try:
        return int(text) if tp is int else float(text)
    except ValueError:
        return data


@functools.cache
def _key_paths(root: type) -> dict[str, dict[str, list[str]]]:
    """Every key of the config ``root`` describes, by its name: its full paths, each with the
    options that have it where it belongs to some options of a group only (``method.r``:
    ``method=lora``)."""
    found: dict[str, dict[str, list[str]]] = {}

    def walk(cls: type, prefix: str, option: str | None) -> None:
        for f in dataclasses.fields(cls):
            path = _join(prefix, f.name)
            owners = found.setdefault(f.name, {}).setdefault(path, [])
            if option is not None and option not in owners:
                owners.append(option)
            tp = typing.get_type_hints(cls)[f.name]
            options = typing.get_args(tp) if _is_union(tp) else (tp,)
            choices = [c for c in options if isinstance(c, type) and dataclasses.is_dataclass(c)]
            for choice in choices:
                name = _discriminator(choice) if len(choices) > 1 else None
                walk(choice, path, f"{path}={name}" if name is not None else option)

    walk(root, "", None)
    return found


class _Builder:
    def __init__(self, root: type | None = None) -> None:
        self.root = root  # the whole config's class, for a key given in the wrong place
        self.problems: list[str] = []
        self.incomplete = False  # a required value is missing or bad: no usable object

    def hint(self, key: str, path: str, fields: list[str]) -> str:
        """What an unknown ``key`` at ``path`` may have meant: another tool's name for a setting
        (``lora_rank``), a key of that name elsewhere in the config (``learning_rate`` given flat, as
        LLaMA-Factory's YAML has it, is ``train.learning_rate``), or the nearest spelling here."""
        if (phrase := explain(key)) is not None:
            return f"; {phrase}"
        paths = _key_paths(self.root).get(key, {}) if self.root else {}
        if owners := paths.get(_join(path, key)):  # another option of this group has it
            return f" (a key of {', '.join(owners)})"
        if close := difflib.get_close_matches(key, fields, n=1):  # (dataset.system: default_system, not columns.system)
            return f" (did you mean '{_join(path, close[0])}'?)"
        elsewhere = [p for p in paths if p != _join(path, key)]
        return f" (did you mean '{elsewhere[0]}'?)" if len(elsewhere) == 1 else ""  # (name: every group has one)

    def fail(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}" if path else msg)

    def value(self, tp: Any, data: Any, path: str) -> Any:
        if isinstance(data, str) and data == MISSING_MARK:
            self.fail(path, "missing required value (set it on the command line or in the config)")
            return None
        if _is_union(tp):
            return self.union(tp, data, path)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return self.dataclass(tp, data, path)
        if isinstance(tp, type) and issubclass(tp, Enum):
            if isinstance(data, bool):  # YAML and Hydra read `x=true` as a boolean; an enum may spell it
                data = "true" if data else "false"
            for member in tp:
                if data == member.value or data is member:
                    return member
            more = explain_value(tp.__name__)
            self.fail(path, f"invalid value {data!r}; expected {_describe(tp)}" + (f"; {more}" if more else ""))
            return None
        origin = typing.get_origin(tp)
        if origin is Literal:
            if data in typing.get_args(tp):
                return data
            self.fail(path, f"invalid value {data!r}; expected {typing.get_args(tp)}")
            return None
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if isinstance(data, (str, int, float)) and not isinstance(data, bool):
                data = [data]  # a single item where a list is expected: the common case
            if not isinstance(data, (list, tuple)):
                self.fail(path, f"expected {_describe(tp)}, got {data!r}")
                return None
            before = len(self.problems)
            items = [self.value(item_tp, item, f"{path}[{i}]") for i, item in enumerate(data)]
            return items if len(self.problems) == before else None
        if origin is dict:
            if not isinstance(data, dict):
                self.fail(path, f"expected a mapping, got {data!r}")
                return None
            return dict(data)
        return self.scalar(tp, data, path)

    def scalar(self, tp: Any, data: Any, path: str) -> Any:
        data = _number_in_text(tp, data)
        if tp is bool:
            if isinstance(data, bool):
                return data
        elif tp is int:
            if isinstance(data, int) and not isinstance(data, bool):
                if not -INT64_MAX - 1 <= data <= INT64_MAX:  # passes every range check, then fails in torch
                    self.fail(path, f"{data} is outside a 64-bit integer's range, beyond any count or size the run "
                                    f"can use (at most {INT64_MAX})")  # fmt: skip
                    return None
                return data
        elif tp is float:
            if isinstance(data, (int, float)) and not isinstance(data, bool):
                if not math.isfinite(data):  # passes every range check (nan < 0 is False), then breaks training
                    self.fail(path, f"must be a finite number, got {data!r}")
                    return None
                return float(data)
        elif tp is str:
            if isinstance(data, (str, int, float)) and not isinstance(data, bool):
                return str(data)
        elif tp is type(None):
            if data is None:
                return None
        elif tp is Any:
            return data
        self.fail(path, f"expected {_describe(tp)}, got {data!r}")
        return None

    def union(self, tp: Any, data: Any, path: str) -> Any:
        args = typing.get_args(tp)
        if data is None:
            if type(None) in args:
                return None
            self.fail(path, "missing required value")
            return None
        options = [a for a in args if a is not type(None)]
        classes: list[type] = [a for a in options if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if classes:
            return self.discriminated(classes, data, path)
        if len(options) == 1:
            return self.value(options[0], data, path)
        for option in options:
            trial = _Builder(self.root)
            result = trial.value(option, data, path)
            if not trial.problems:
                return result
        self.fail(path, f"expected {_describe(tp)}, got {data!r}")
        return None

    def discriminated(self, classes: list[type], data: Any, path: str) -> Any:
        by_name = {_discriminator(c): c for c in classes}
        if not isinstance(data, dict):
            self.fail(path, f"expected a mapping with a 'name' in {sorted(map(str, by_name))}")
            return None
        name = data.get("name")
        cls = by_name.get(name)
        if cls is None:
            self.fail(
                _join(path, "name"), f"unknown {path} {name!r}; choose from {', '.join(sorted(map(str, by_name)))}"
            )
            return None
        return self.dataclass(cls, data, path)

    def dataclass(self, cls: type, data: Any, path: str) -> Any:
        if not isinstance(data, dict):
            self.fail(path, f"expected a mapping, got {data!r}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields:
                valid = ", ".join(fields)
                self.fail(
                    _join(path, str(key)), f"unknown key{self.hint(str(key), path, list(fields))}; valid keys: {valid}"
                )
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            sub = _join(path, name)
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if name in data:
                before = len(self.problems)
                value = self.value(hints[name], data[name], sub)
                failed = len(self.problems) != before and (value is None or not dataclasses.is_dataclass(value))
                if not failed:
                    kwargs[name] = value  # nested dataclasses already fell back field by field
                elif not has_default:
                    kwargs[name] = value
                    self.incomplete = True
                # else: a bad value falls back to the default, so later rules can still run
            elif not has_default:
                self.fail(sub, "missing required value")
                self.incomplete = True
                kwargs[name] = None
        return cls(**kwargs)


def build_lenient(cls: type[T], data: Any) -> tuple[T | None, list[str]]:
    """Build ``cls`` from plain data, returning every problem found.

    Bad values fall back to their defaults so cross-field rules can still run on the result and
    report in the same message. The object is only trustworthy when no problem is returned, and
    is None when a required value is missing or unusable.
    """
    builder = _Builder(cls)
    result = builder.dataclass(cls, data, "")
    return (None if builder.incomplete or result is None else typing.cast(T, result)), builder.problems


def build(cls: type[T], data: Any) -> T:
    """Build ``cls`` from plain data or raise ConfigError listing every problem."""
    result, problems = build_lenient(cls, data)
    if problems or result is None:
        raise ConfigError(problems)
    return result


def to_plain(obj: Any) -> Any:
    """The inverse of ``build``: dataclasses and enums to plain YAML-safe data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
