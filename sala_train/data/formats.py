"""Read data files into canonical ``messages`` records, with file-and-line errors.

Loading goes through ``datasets`` (JSON arrays and JSON lines, cached as Arrow). When it fails,
we re-read the file ourselves only to point at the offending line, since its errors do not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sala_train.errors import DataError

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 10


def load_json_records(paths: list[str], split: str) -> Any:
    """One ``datasets.Dataset`` from JSON / JSON-lines files, or DataError naming the file."""
    import datasets

    for path in paths:
        _check_readable(Path(path))
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("json", data_files={split: list(paths)}, split=split)
    except Exception as exc:  # datasets raises many types; we only add a location to them
        raise DataError(_locate_json_problem(paths) or f"dataset.{split}: cannot read {paths}: {exc}") from exc
    if len(ds) == 0:
        raise DataError(f"dataset.{split}: {', '.join(paths)} holds no records")
    return ds


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


def _locate_json_problem(paths: list[str]) -> str | None:
    for name in paths:
        text = Path(name).read_text(encoding="utf-8", errors="replace")
        if text.lstrip().startswith("["):
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                return f"{name}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})"
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{name}:{lineno}: malformed JSON line: {exc.msg} (column {exc.colno})"
    return None


def message_problems(messages: Any) -> list[str]:
    """What is wrong with one ``messages`` record (empty list when it is usable)."""
    if not isinstance(messages, list) or not messages:
        return ["'messages' must be a non-empty list of {role, content} objects"]
    problems = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            problems.append(f"message {i} is not an object")
            continue
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            problems.append(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and i != 0:
            problems.append(f"message {i}: a system message may only come first")
        if not isinstance(content, str):
            problems.append(f"message {i} ({role}) has no string 'content'")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append("no assistant turn to train on")
    return problems


def validate_messages(ds: Any, paths: list[str], split: str) -> None:
    """Raise DataError listing the first bad records (file, record number) and how many in all."""
    if "messages" not in ds.column_names:
        raise DataError(
            f"dataset.{split}: {', '.join(paths)} has no 'messages' field (found: {', '.join(ds.column_names)})"
        )
    bad: list[str] = []
    count = 0
    for index, messages in enumerate(ds["messages"]):
        problems = message_problems(messages)
        if problems:
            count += 1
            if len(bad) < MAX_REPORTED:
                bad.append(f"  record {index}: {'; '.join(problems)}")
    if count:
        where = paths[0] if len(paths) == 1 else ", ".join(paths)
        more = f"\n  ... and {count - len(bad)} more" if count > len(bad) else ""
        raise DataError(f"{where}: {count} bad record(s) in dataset.{split}:\n" + "\n".join(bad) + more)
