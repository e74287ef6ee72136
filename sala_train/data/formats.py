"""Read data files (JSON, JSON lines, Parquet, CSV, or directories of them) into canonical records.

Loading goes through ``datasets`` (cached as Arrow). Every record is converted by
``sala_train.data.records``; bad ones are reported by file and record (JSON lines: line number),
then either fail the run (``dataset.on_error=fail``) or are dropped and counted (``skip``).
"""

from __future__ import annotations

import inspect
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sala_train.config.schema import DatasetConfig, DatasetSource, OnError
from sala_train.data import records
from sala_train.data.records import EMPTY, BadRecord, Layout, canonical, kind_of
from sala_train.errors import DataError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
MAX_REPORTED = 10
BAD_RECORD = "bad record: "


def expand_paths(paths: list[str], split: str, key: str = "dataset") -> list[Path]:
    """Files of ``<key>.<split>``, with each directory replaced by the data files inside it."""
    files: list[Path] = []
    for i, name in enumerate(paths):
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
            if not found:
                raise DataError(f"{key}.{split}[{i}]: {path} holds no {', '.join(BUILDERS)} files")
            files += found
        elif path.suffix.lower() not in BUILDERS:
            raise DataError(f"{key}.{split}[{i}]: {path}: unsupported file type; use {', '.join(BUILDERS)}")
        else:
            files.append(path)
    return files


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from exc
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def _locate_json_problem(path: Path) -> str | None:
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})"
        return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                return f"{path}:{lineno}: malformed JSON line: {exc.msg} (column {exc.colno})"
    return None


def _csv_as_text(path: Path) -> dict[str, Any]:
    """CSV cells are text: otherwise pandas reads an answer like "4." as the float 4.0."""
    import csv

    from datasets import Features, Value

    with path.open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), [])
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False}


def load_file(path: Path, split: str) -> Any:
    """One file as a ``datasets.Dataset``, or DataError naming the file (and line, for JSON)."""
    import datasets

    _check_readable(path)
    datasets.disable_progress_bars()
    builder = BUILDERS[path.suffix.lower()]
    options = _csv_as_text(path) if builder == "csv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files={split: [str(path)]}, split=split, **options)
    except Exception as exc:  # datasets raises many types; we only add a location to them
        located = _locate_json_problem(path) if builder == "json" else None
        raise DataError(located or f"{path}: cannot read as {builder}: {exc}") from exc
    if len(ds) == 0:
        raise DataError(f"{path}: holds no records")
    return ds


def _location(path: Path, index: int, cache: dict[Path, list[int]]) -> str:
    if path.suffix.lower() == ".jsonl":
        if path not in cache:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            cache[path] = [n for n, line in enumerate(lines, start=1) if line.strip()]
        return f"{path}:{cache[path][index]}"
    return f"{path}: record {index}"


def _features(kind: str) -> Any:
    from datasets import Features, Value

    message = [{"role": Value("string"), "content": Value("string"), "tool_calls": Value("string")}]
    columns: dict[str, Any] = {
        "chat": {"messages": message, "tools": Value("string")},
        "preference": {"prompt": message, "chosen": Value("string"), "rejected": Value("string")},
        "kto": {"prompt": message, "completion": Value("string"), "label": Value("bool")},
        "text": {"text": Value("string"), "messages": message},
    }[kind]
    return Features({**columns, "_problem": Value("string")})


def _convert(record: dict[str, Any], layout: Layout) -> dict[str, Any]:
    try:
        return {**canonical(record, layout), "_problem": ""}
    except BadRecord as bad:
        return {**EMPTY[kind_of(layout.format)], "_problem": f"{bad.reason}\t{bad}"}


@dataclass
class LoadedSplit:
    records: Any  # datasets.Dataset of canonical records
    dropped: Counter[str] = field(default_factory=Counter)  # skipped bad records by reason


def load_split(cfg: DatasetConfig | DatasetSource, split: str, on_error: OnError, key: str = "dataset") -> LoadedSplit:
    """Every file of ``<key>.<split>`` converted, bad records failed or skipped per ``on_error``
    (``dataset.on_error``, which also governs entries mixed in).

    ``key`` names the files' config in messages: ``dataset``, or ``dataset.mix.<name>`` for an
    entry mixed in.
    """
    import datasets
    from datasets.fingerprint import Hasher

    layout = Layout.of(cfg)
    kind = kind_of(cfg.format)
    parts, dropped, shown, lines = [], Counter[str](), [], {}  # type: ignore[var-annotated]
    for path in expand_paths(getattr(cfg, split), split, key):
        raw = load_file(path, split)
        missing = [name for name in layout.required_fields() if name not in raw.column_names]
        if missing:
            raise DataError(
                f"{path}: no field {', '.join(repr(m) for m in missing)} for {key}.format={cfg.format.value} "
                f"(found: {', '.join(raw.column_names)}); map yours with {key}.columns.<key>=<field>"
            )
        fingerprint = Hasher.hash((raw._fingerprint, layout, inspect.getsource(records)))
        converted = raw.map(_convert, fn_kwargs={"layout": layout}, remove_columns=raw.column_names,
                            features=_features(kind), new_fingerprint=fingerprint)  # fmt: skip
        good = []
        for index, problem in enumerate(converted["_problem"]):
            if not problem:
                good.append(index)
                continue
            reason, detail = problem.split("\t", 1)
            dropped[BAD_RECORD + reason] += 1
            if len(shown) < MAX_REPORTED:
                shown.append(f"  {_location(path, index, lines)}: {detail}")
        parts.append(converted.select(good).remove_columns("_problem"))
    bad = sum(dropped.values())
    if bad and on_error == OnError.FAIL:
        more = f"\n  ... and {bad - len(shown)} more" if bad > len(shown) else ""
        counts = ", ".join(f"{n} {reason.removeprefix(BAD_RECORD)}" for reason, n in dropped.most_common())
        raise DataError(
            f"{key}.{split}: {bad} bad record(s) ({counts}); fix them or set dataset.on_error=skip:\n"
            + "\n".join(shown) + more
        )  # fmt: skip
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(merged) == 0:
        raise DataError(f"{key}.{split}: no usable records ({dict(dropped)})")
    return LoadedSplit(merged, dropped)
