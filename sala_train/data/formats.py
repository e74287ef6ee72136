"""Read data files (JSON, JSON lines, Parquet, CSV, or directories of them) into canonical records.

Loading goes through ``datasets`` (cached as Arrow): its CSV and Parquet builders, and for JSON our
reader (``_json_rows``) feeding ``Dataset.from_generator``. Every record is converted by
``sala_train.data.records``; bad ones are reported by file and record (JSON lines: line number),
then either fail the run (``dataset.on_error=fail``) or are dropped and counted (``skip``).
"""

from __future__ import annotations

import codecs
import csv
import inspect
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sala_train.config.schema import DatasetConfig, DatasetSource, OnError
from sala_train.data import records
from sala_train.data.records import (
    EMPTY,
    JSON_PROBLEMS,
    BadRecord,
    Layout,
    canonical,
    describe,
    json_problem,
    kind_of,
)
from sala_train.data.workers import map_records, workers_for
from sala_train.errors import DataError

BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip")


def _compressed_data(name: str) -> bool:
    """A data file compressed whole (``a.jsonl.gz``): not read, so refused rather than left out."""
    suffixes = [suffix.lower() for suffix in Path(name).suffixes]
    return len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS and suffixes[-2] in BUILDERS


def _refuse_compressed(path: Path, where: str) -> None:
    if _compressed_data(path.name):
        raise DataError(f"{where}: {path} is compressed, which sala-train does not read; decompress it (gunzip, "
                        "unzstd, ...) where it is, or move it out of the folder")  # fmt: skip


MAX_REPORTED = 10
BAD_RECORD = "bad record: "


def _data_files_under(root: Path, where: str) -> list[Path]:
    """The data files in ``root`` and its folders, hidden ones skipped. (Path.rglob passes over a
    folder it may not list without a word: its files would be left out, or the directory called
    empty.)"""

    def unlistable(exc: OSError) -> None:
        raise DataError(f"{where}: cannot list {exc.filename} ({exc.strerror})")

    found: list[Path] = []
    top = os.path.realpath(root)
    seen = {top}
    # Linked folders are followed, as linked files are (os.walk's default skipped them: their data
    # left out without a word); each real folder once, by name order (so that which of two links
    # to one folder is read does not depend on the file system's listing order). A link up to a
    # folder that holds the data (`up -> ..`) is refused: the walk would read everything there.
    for directory, folders, names in os.walk(root, onerror=unlistable, followlinks=True):
        kept = []
        for name in sorted(folders):
            link = os.path.join(directory, name)
            real = os.path.realpath(link)
            if name.startswith(".") or real in seen:
                continue
            if top.startswith(real.rstrip(os.sep) + os.sep):
                raise DataError(f"{where}: {link} is a link to {real}, a folder that holds the data itself; "
                                "remove the link, or name the files it should add")  # fmt: skip
            seen.add(real)
            kept.append(name)
        folders[:] = kept
        for name in names:  # (a compressed one was left out without a word: its records missing)
            if not name.startswith("."):
                _refuse_compressed(Path(directory, name), where)
        found += [Path(directory, name) for name in names
                  if not name.startswith(".") and Path(name).suffix.lower() in BUILDERS]  # fmt: skip
    return sorted(found)


def expand_paths(paths: list[str], split: str, key: str = "dataset") -> list[Path]:
    """Files of ``<key>.<split>``, with each directory replaced by the data files inside it."""
    files: list[Path] = []
    for i, name in enumerate(paths):
        path = Path(name)
        if path.is_dir():
            data = _data_files_under(path, f"{key}.{split}[{i}]")
            found = [p for p in data if p.is_file()]
            # A data file whose link points nowhere (the data moved) would be left out without a word.
            dangling = [p for p in data if p.is_symlink() and not p.exists()]
            if dangling:
                raise DataError(f"{key}.{split}[{i}]: {dangling[0]} is a link to {os.readlink(dangling[0])}, "
                                "which does not exist")  # fmt: skip
            odd = [p for p in data if p.exists() and not p.is_file()]  # (a named pipe, a device)
            if odd:
                raise DataError(f"{key}.{split}[{i}]: {odd[0]}: not a regular file")
            if not found:
                raise DataError(f"{key}.{split}[{i}]: {path} holds no {', '.join(BUILDERS)} files")
            files += found
        elif path.suffix.lower() not in BUILDERS:
            _refuse_compressed(path, f"{key}.{split}[{i}]")
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


def _cache_stamp(path: Path) -> str:
    """Part of a file's cache key: datasets keys local files by mtime alone, so a change that keeps
    the mtime (``cp -p``, ``rsync -t``) would serve the old content. The ctime, which no copy can
    set, catches even a change of the same size."""
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}-{st.st_ino}"


@contextmanager
def _quiet() -> Iterator[None]:
    """datasets logs its own errors ("Failed to read file ...") before raising; we report ours."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


class _NotUtf8(DataError):
    """Bytes that are not UTF-8; ``at`` says where in their line (``byte 0xe9 at column 4``)."""

    def __init__(self, message: str, at: str):
        super().__init__(message)
        self.at = at


def _utf8(raw: bytes, where: str, line_start: int = 0) -> str:
    """``raw`` decoded, or _NotUtf8 naming the line and column of the first byte that is not UTF-8.
    Text from the start of a file (``line_start`` 0) loses the byte-order mark Excel and Notepad write."""
    try:
        text = raw.decode("utf-8")
        return text.removeprefix("\ufeff") if line_start == 0 else text
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start)
        begin = raw.rfind(b"\n", 0, exc.start) + 1
        column = len(raw[begin : exc.start].decode("utf-8", errors="replace")) + 1
        at = f"byte 0x{raw[exc.start]:02x} at column {column}"
        raise _NotUtf8(f"{where}:{line_start + line + 1}: not valid UTF-8 ({at}); save the file as UTF-8", at) from None


# --- JSON and JSON lines -------------------------------------------------------------------------

# ``_bad``: a JSON line that is no record ("reason\tdetail"), a bad record like any other: reported
# with the rest under dataset.on_error=fail, dropped and counted under skip.
JSON_FEATURES = {"_at": "string", "_record": "string", "_keys": "string", "_bad": "string"}
# A .jsonl whose first line does not parse is tried as one pretty-printed object only up to this size.
WHOLE_FILE_BYTES = 64 << 20


def _record_row(record: Any, at: str, text: str | None = None) -> dict[str, str]:
    """``text``: the record as written in the file, kept as it is (default: written out again,
    ASCII-escaped, so even a lone surrogate is stored; ``_convert`` reports it as a bad record)."""
    keys = sorted(record) if isinstance(record, dict) else []
    return {"_at": at, "_record": text or json.dumps(record), "_keys": json.dumps(keys), "_bad": ""}


def _bad_line(at: str, reason: str, detail: str) -> dict[str, str]:
    return {"_at": at, "_record": "null", "_keys": "[]", "_bad": f"{reason}\t{detail}"}


def _json_rows(path: str, stamp: str, reader: str) -> Iterator[dict[str, str]]:
    """Rows of a JSON array or JSON lines file: each record as its own JSON text, where it is, its keys.

    Records stay JSON text instead of Arrow columns: for a field of mixed types (text in one record,
    a number or list in another) datasets' JSON builder (5.2) picks its ``Json`` type, then decodes
    every text that parses as JSON, so an answer "1" or "[1, 2]" would arrive as a number or list.
    ``stamp`` and ``reader`` are only part of the cache key (datasets hashes this function, not
    the helpers it calls).
    """
    with open(path, "rb") as fh:
        head = fh.read(4096)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # (each line was a bad record, or all one)
            raise DataError(f'{path}: the file is UTF-16 (Notepad\'s "Unicode"), not UTF-8; save it as UTF-8')
        head = head.removeprefix(codecs.BOM_UTF8).lstrip()
        fh.seek(0)
        if head.startswith(b"["):
            yield from _json_array(path, fh.read())
            return
        found = False
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = _utf8(raw, path, lineno - 1).rstrip("\r\n")  # (a column past the line's end, not 1 of the next)
            except _NotUtf8 as not_utf8:
                found = True
                yield _bad_line(f":{lineno}", "not UTF-8", not_utf8.at)
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except JSON_PROBLEMS as exc:
                if not found and os.path.getsize(path) <= WHOLE_FILE_BYTES and isinstance(exc, json.JSONDecodeError):
                    # One object over several lines: one record, as datasets reads it.
                    fh.seek(0)
                    data = fh.read()
                    try:
                        whole = _utf8(data, path)
                        record = json.loads(whole)
                    except _NotUtf8:
                        # Bytes that are not UTF-8: in one object over several lines, that is the
                        # file's problem, said where it is; else JSON lines, a bad record each.
                        if _json_alone(data.decode("utf-8", errors="replace")):
                            raise
                    except JSON_PROBLEMS as whole_exc:
                        if (
                            exc.pos >= len(text.rstrip())
                            and isinstance(whole_exc, json.JSONDecodeError)
                            and "\n" in whole.strip()  # (a single line cut short: a bad record, below)
                            and not _json_alone(next(iter(whole.splitlines()[whole_exc.lineno - 1 :]), ""))
                        ):
                            # The first line is an unfinished object continued below (a line that is
                            # JSON alone means JSON lines, the first cut short): the problem is where
                            # the whole file's parse stopped, not on line 1.
                            raise DataError(
                                f"{path}:{whole_exc.lineno}: malformed JSON: {json_problem(whole_exc)}"
                            ) from None
                    else:
                        yield _record_row(record, f":{lineno}")
                        return
                    fh.seek(0)
                    for _ in range(lineno):  # (back to the line after this one)
                        fh.readline()
                found = True
                yield _bad_line(f":{lineno}", "malformed JSON line", json_problem(exc))
                continue
            found = True
            yield _record_row(record, f":{lineno}", text)
    if not found:
        raise DataError(f"{path}: no records")


def _json_alone(line: str) -> bool:
    try:
        json.loads(line)
    except JSON_PROBLEMS:
        return False
    return True


def _json_array(path: str, raw: bytes) -> Iterator[dict[str, str]]:
    text = _utf8(raw, path)
    try:
        records = json.loads(text)
    except JSON_PROBLEMS as exc:
        where = f"{path}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else path
        raise DataError(f"{where}: malformed JSON: {json_problem(exc)}") from None
    if not records:
        raise DataError(f"{path}: no records (an empty JSON array)")
    if isinstance(records, list) and isinstance(records[0], str):  # texts, as datasets reads them
        records = [{"text": r} if isinstance(r, str) else r for r in records]
    for number, record in enumerate(records, start=1):
        yield _record_row(record, f": record {number} of the array")


def _reader_source() -> str:
    return "".join(inspect.getsource(f) for f in (_json_rows, _json_alone, _json_array, _record_row, _bad_line, _utf8,
                                                   describe, json_problem))  # fmt: skip


def _load_json(path: Path, split: str) -> Any:
    import datasets

    features = datasets.Features({name: datasets.Value(kind) for name, kind in JSON_FEATURES.items()})
    try:
        return datasets.Dataset.from_generator(
            _json_rows, features=features, split=datasets.NamedSplit(split),
            gen_kwargs={"path": str(path.resolve()), "stamp": _cache_stamp(path), "reader": _reader_source()},
        )  # fmt: skip
    except datasets.exceptions.DatasetGenerationError as exc:
        if isinstance(exc.__cause__, DataError):
            message = str(exc.__cause__).replace(str(path.resolve()), str(path))
            raise DataError(message) from None
        raise


def _json_columns(ds: Any) -> list[str]:
    """Every field some record of a file loaded by ``_load_json`` has."""
    return sorted({name for keys in ds.unique("_keys") for name in json.loads(keys)})


# --- CSV -----------------------------------------------------------------------------------------

# pandas reads cells of any size; the csv module stops at 128 KiB ("field larger than field
# limit") unless told otherwise, and its checks below must read every file pandas reads.
csv.field_size_limit(2**31 - 1)
# A byte that is not UTF-8, decoded with errors="surrogateescape".
ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class _CsvScan:
    """A CSV file as the csv module reads it: the line each record starts on (header: line 1;
    quoted cells may span lines), and the records pandas cannot read as written, by index
    (``"reason\\tdetail"``, as ``_convert`` reports bad records)."""

    starts: list[int]
    bad: dict[int, str]


class _CsvRecords:
    """The records of a CSV file as the csv module reads it, read as they are needed (a file of any
    size in the memory of a record): the line each starts on, its cells, and where its bytes are
    not UTF-8. ``engine``: whose blank lines to skip, pandas' C reader's (a line of spaces and tabs
    alone) or its python reader's (a line whose one cell is blank, quoted or not)."""

    def __init__(self, fh: Any, engine: str, path: Path):
        self.engine, self.path = engine, path
        self.not_utf8: dict[int, tuple[int, int]] = {}  # line -> (byte, column)
        self.line = ""  # the last line read
        self.reader = csv.reader(self._lines(fh))

    def _lines(self, fh: Any) -> Iterator[str]:
        for lineno, line in enumerate(fh, start=1):
            if escaped := ESCAPED_BYTE.search(line):
                self.not_utf8[lineno] = (ord(escaped.group()) - 0xDC00, escaped.start() + 1)
            self.line = line
            yield line

    def header(self) -> list[str]:
        """The first record's cells; DataError naming where, when its bytes are not UTF-8 (no
        record can be read by its names: the whole file's problem)."""
        header = next(self.reader, [])
        if self.not_utf8:
            _utf8(self.path.read_bytes(), str(self.path))  # (raises: the file's first such byte is in it)
        return header

    def __iter__(self) -> Iterator[tuple[int, int, list[str]]]:
        """(first line, last line, cells) of each record after the header."""
        previous = self.reader.line_num
        for row in self.reader:
            if self._is_record(row, one_line=self.reader.line_num == previous + 1):
                yield previous + 1, self.reader.line_num, row
            previous = self.reader.line_num

    def _is_record(self, row: list[str], one_line: bool) -> bool:
        if len(row) != 1:
            return bool(row)
        if self.engine == "python":
            return bool(row[0].strip())
        return not one_line or bool(self.line.rstrip("\r\n").strip(" \t"))


def _csv_scan(path: Path, engine: str = "c") -> _CsvScan:
    """Every record of ``path`` (``engine``: as ``_CsvRecords``): DataError where the csv module
    cannot read on (an error in its quoting) or there are none. A row with more cells than the
    header and a row with bytes that are not UTF-8 are bad records: pandas would shift the first's
    columns, and cannot decode the second."""
    starts: list[int] = []
    bad: dict[int, str] = {}
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        records = _CsvRecords(fh, engine, path)
        try:
            header = records.header()
            for first, last, row in records:
                where = [(n, records.not_utf8[n]) for n in range(first, last + 1) if n in records.not_utf8]
                if where:
                    line, (byte, column) = where[0]
                    on = f"line {line}, column {column}" if line > first else f"column {column}"
                    bad[len(starts)] = f"not UTF-8\tbyte 0x{byte:02x} at {on}"
                elif len(row) > len(header):
                    bad[len(starts)] = f"more cells than the header\t{len(row)} where the header has {len(header)}"
                starts.append(first)
        except csv.Error as exc:
            raise DataError(f"{path}:{records.reader.line_num + 1}: not CSV: {exc}") from None
    if not starts:
        raise DataError(f"{path}: no records (only a header)")
    return _CsvScan(starts, bad)


def _first_csv_record_is_long(path: Path) -> bool:
    """Whether the first record has more cells than the header: pandas would take the extra first
    cells as the index and shift every column silently (the instruction dropped, the input read as
    it), deciding so from the first record alone (a later long row makes it fail)."""
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
        records = _CsvRecords(fh, "c", path)
        try:
            header = records.header()
            return len(next((row for _, _, row in records), [])) > len(header)
        except csv.Error:
            return False  # (reading the whole file reports it, located)


@dataclass(frozen=True)
class _CutTo:
    """pandas' ``on_bad_lines``: a row with more cells than the header is kept, cut to its width,
    so that rows stay in step with the csv module's records (``_CsvScan.bad`` names it a bad one)."""

    width: int

    def __call__(self, cells: list[str]) -> list[str]:
        return cells[: self.width]


def _csv_options(path: Path) -> dict[str, Any]:
    """CSV cells are text: otherwise pandas reads an answer like "4." as the float 4.0."""
    from datasets import Features, Value

    # The header as the csv module reads records: its lines may end in \r alone (Excel's "CSV
    # (Macintosh)"), and a quoted name may hold a line break; the first line of bytes was neither.
    try:
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            header = _CsvRecords(fh, "c", path).header()  # (later lines that are not UTF-8 are bad records)
    except csv.Error as exc:
        raise DataError(f"{path}:1: not CSV: {exc}") from None
    if "" in header:  # pandas' to_csv() writes its index under no name; datasets fails on it obscurely
        raise DataError(f"{path}:1: column {header.index('') + 1} of the header has no name (a table saved with "
                        "its index: save it with index=False, or name the column)")  # fmt: skip
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:  # pandas would rename one ("x.1") and the other would be read silently
        raise DataError(f"{path}:1: column {', '.join(repr(n) for n in twice)} appears twice in the header")
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False}


def _parquet_rows(path: Path) -> int | None:
    """The row count its footer records; None when there is no readable footer (datasets says why)."""
    import pyarrow.parquet

    try:
        return int(pyarrow.parquet.ParquetFile(path).metadata.num_rows)
    except Exception:  # (not Parquet, or damaged: load_dataset's error is reported with its cause)
        return None


@dataclass(frozen=True)
class FileRows:
    """One file's rows as read: ``_json_rows``' for JSON (a record's text, where it is, its keys,
    or why the line is none), else the file's own columns, with the rows found bad while reading
    (``bad``: index -> ``"reason\tdetail"``) and where each row starts (``lines``; CSV only)."""

    rows: Any  # datasets.Dataset
    json_rows: bool = False
    bad: Mapping[int, str] = field(default_factory=dict)
    lines: list[int] | None = None


def load_file(path: Path, split: str) -> FileRows:
    """One file's rows, or DataError naming the file (and line or record) when it cannot be read."""
    import datasets

    _check_readable(path)
    datasets.disable_progress_bars()
    builder = BUILDERS[path.suffix.lower()]
    with _quiet():
        if builder == "json":
            return FileRows(_load_json(path, split), json_rows=True)
        if builder == "csv":
            return _load_csv(path, split)
        if _parquet_rows(path) == 0:  # (datasets: "BatchSize must be greater than 0")
            raise DataError(f"{path}: no records")
        try:
            ds = datasets.load_dataset(builder, name=f"sala-{_cache_stamp(path)}", data_files={split: [str(path)]},
                                       split=split)  # fmt: skip
        except Exception as exc:  # datasets raises many types; we only add a location to them
            raise DataError(f"{path}: cannot read as {builder}: {_cause(exc)}") from None
    if len(ds) == 0:
        raise DataError(f"{path}: no records")
    return FileRows(ds)


def _cause(exc: BaseException) -> BaseException:
    return exc.__cause__ if type(exc).__name__ == "DatasetGenerationError" and exc.__cause__ else exc


def _load_csv(path: Path, split: str) -> FileRows:
    """pandas (through datasets) reads the file; where it cannot read rows as written, the csv
    module's reading of the file names them as bad records, and pandas reads it again keeping
    every row in step (hand-written because pandas drops such rows without saying which line)."""
    import datasets
    from pandas.errors import ParserWarning

    options = _csv_options(path)
    load = partial(datasets.load_dataset, "csv", name=f"sala-{_cache_stamp(path)}", data_files={split: [str(path)]},
                   split=split, **options)  # fmt: skip
    scan = _csv_scan(path, "python") if _first_csv_record_is_long(path) else None
    if scan is None:
        try:
            ds = load()
        except Exception as exc:  # datasets raises many types; the csv module says where the problem is
            scan = _csv_scan(path, "python")  # (raises the located problem, if it is the file's)
            if not scan.bad:
                _unclosed_quote(path, scan)
                raise DataError(f"{path}: cannot read as csv: {_cause(exc)}") from None
    if scan is not None:
        width = len(options["features"])
        try:
            with warnings.catch_warnings():  # ("This leads to a loss of data": the cells _CutTo cuts)
                warnings.simplefilter("ignore", category=ParserWarning)
                ds = load(engine="python", index_col=False, on_bad_lines=_CutTo(width), encoding_errors="replace")
        except Exception as exc:
            _unclosed_quote(path, scan)
            raise DataError(f"{path}: cannot read as csv: {_cause(exc)}") from None
        if len(ds) != len(scan.starts):  # (rows out of step would blame the wrong lines)
            index, why = next(iter(scan.bad.items()))
            reason, detail = why.split("\t")
            raise DataError(f"{path}:{scan.starts[index]}: {reason}: {detail}; pandas does not read this file's "
                            f"rows in step with the csv module ({len(ds)} records against {len(scan.starts)}), so "
                            "such rows cannot be skipped here: fix them")  # fmt: skip
    if len(ds) == 0:
        raise DataError(f"{path}: no records")
    return FileRows(ds, bad=scan.bad if scan else {}, lines=scan.starts if scan else None)


def _unclosed_quote(path: Path, scan: _CsvScan) -> None:
    if path.read_bytes().count(b'"') % 2:
        # The csv module reads the rest of the file into the last record's open quote (pandas
        # names a row of its own count): the quote is in that record.
        raise DataError(f'{path}:{scan.starts[-1]}: a cell opens a quote (") that is never closed') from None


def _location(path: Path, file: FileRows, index: int, cache: dict[Path, list[int]]) -> str:
    """Where record ``index`` of ``path`` is: JSON lines and CSV by line, arrays and Parquet by number."""
    if file.json_rows:
        return f"{path}{file.rows[index]['_at']}"
    if path.suffix.lower() == ".csv":
        if path not in cache:
            cache[path] = file.lines if file.lines is not None else _csv_scan(path).starts
        return f"{path}:{cache[path][index]}"
    return f"{path}: record {index + 1}"


def _features(kind: str) -> Any:
    from datasets import Features, Value

    reply = {"role": Value("string"), "content": Value("string"), "tool_calls": Value("string")}
    message = [reply]
    tools = Value("string")
    columns: dict[str, Any] = {
        "chat": {"messages": message, "tools": tools},
        "preference": {"prompt": message, "chosen": reply, "rejected": reply, "tools": tools},
        "kto": {"prompt": message, "completion": reply, "label": Value("bool"), "tools": tools},
        "text": {"text": Value("string"), "messages": message},
    }[kind]
    return Features({**columns, "_problem": Value("string")})


# Records looked at for TRL's implicit-prompt layout (the first may be a bad record, skipped).
IMPLICIT_PROMPT_PROBES = 100


def _chosen_holds_conversations(raw: Any, json_rows: bool, layout: Layout) -> bool:
    """Whether one of a file's first records has a chosen field of a whole conversation (TRL's
    implicit prompt): then a file without a prompt field is read as that layout, record by record."""
    for row in raw.select(range(min(len(raw), IMPLICIT_PROMPT_PROBES))):
        record = row
        if json_rows:
            try:
                record = json.loads(row["_record"])
            except (ValueError, TypeError, RecursionError):
                continue
        chosen = record.get(layout.columns.chosen or "") if isinstance(record, Mapping) else None
        if isinstance(chosen, list) and len(chosen) > 1:
            return True
    return False


def _convert(
    row: dict[str, Any], index: int, layout: Layout, json_rows: bool, bad: Mapping[int, str]
) -> dict[str, Any]:
    """``json_rows``: the row is ``_json_rows``' (a CSV or Parquet file may have a column of any
    name, ``_record`` included); ``bad``: rows found bad while reading, by index."""
    record = json.loads(row["_record"]) if json_rows else row
    try:
        problem = row["_bad"] if json_rows else bad.get(index)
        if problem:
            raise BadRecord(*problem.split("\t", 1))
        if not isinstance(record, Mapping):  # a JSON line like `42` (other readers give rows)
            raise BadRecord("not a JSON object", f"found {describe(record)}")
        converted = canonical(record, layout)
        if json_rows and "\\ud" in row["_record"].lower():  # an escaped surrogate: is it half of a pair?
            try:
                json.dumps(converted, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise BadRecord("not text", "a \\u escape is half of a surrogate pair, which is no text") from None
        return {**converted, "_problem": ""}
    except BadRecord as bad:
        return {**EMPTY[kind_of(layout.format)], "_problem": f"{bad.reason}\t{bad}"}


@dataclass
class LoadedSplit:
    records: Any  # datasets.Dataset of canonical records
    dropped: Counter[str] = field(default_factory=Counter)  # skipped bad records by reason


def load_split(
    cfg: DatasetConfig | DatasetSource, split: str, on_error: OnError, key: str = "dataset", workers: int | None = 1
) -> LoadedSplit:
    """Every file of ``<key>.<split>`` converted, bad records failed or skipped per ``on_error``
    (``dataset.on_error``, which also governs entries mixed in); ``workers``: the run's
    ``dataset.preprocessing_num_workers``, for converting a large file's records.

    ``key`` names the files' config in messages: ``dataset``, or ``dataset.mix.<name>`` for an
    entry mixed in. ``cfg.max_samples`` takes the split's first N records as the files hold them,
    before they are checked (as LLaMA-Factory cuts them): records past it are neither read into
    the run nor reported.
    """
    import datasets
    from datasets.fingerprint import Hasher

    layout = Layout.of(cfg)
    kind = kind_of(cfg.format)
    parts, dropped, shown, lines = [], Counter[str](), [], {}  # type: ignore[var-annotated]
    left = cfg.max_samples
    for path in expand_paths(getattr(cfg, split), split, key):
        if left == 0:
            break
        file = load_file(path, split)
        raw = file.rows
        if left is not None:
            raw = raw.select(range(min(len(raw), left)))
            left -= len(raw)
        columns = _json_columns(raw) if file.json_rows else raw.column_names
        missing = [name for name in layout.required_fields() if name not in columns]
        if missing == [layout.columns.prompt] and layout.may_imply_prompt() and _chosen_holds_conversations(
                raw, file.json_rows, layout):  # fmt: skip
            missing = []  # TRL's implicit prompt: each record's chosen and rejected share it
        if missing and columns:  # no object at all: each record is reported as not one
            if len(columns) == 1 and path.suffix.lower() == ".csv" and ";" in columns[0]:  # (Excel, some locales)
                raise DataError(f"{path}: its columns are separated by ';' ({columns[0]}); only comma-separated "
                                "CSV is read: save it with commas")  # fmt: skip
            # (a mixed entry's keys are its own option file's: the command line sets the main entry's)
            fix = (f"map yours with {key}.columns.<key>=<field>" if not key.startswith("dataset.mix.")
                   else f"map yours under columns: in conf/dataset/{key.removeprefix('dataset.mix.')}.yaml (your "
                   "own in --config-dir)")  # fmt: skip
            raise DataError(
                f"{path}: no field {', '.join(repr(m) for m in missing)} for {key}.format={cfg.format.value} "
                f"(found: {', '.join(columns)}); {fix}"
            )
        unmatched = [f"{key}.columns.{k}={name}" for k, name in layout.mapped if name not in columns]
        if unmatched and columns:
            raise DataError(f"{path}: no field named by {', '.join(unmatched)} (found: {', '.join(columns)})")
        bad = {index: why for index, why in file.bad.items() if index < len(raw)}
        code = [inspect.getsource(f) for f in (records, _convert, _features)]  # (an edit: no stale cache)
        fingerprint = Hasher.hash((raw._fingerprint, layout, file.json_rows, sorted(bad.items()), code))
        options = {"layout": layout, "json_rows": file.json_rows, "bad": bad}
        converted = map_records(raw, _convert, workers_for(workers, len(raw)), with_indices=True, fn_kwargs=options,
                                remove_columns=raw.column_names, features=_features(kind),
                                new_fingerprint=fingerprint)  # fmt: skip
        good = []
        for index, problem in enumerate(converted["_problem"]):
            if not problem:
                good.append(index)
                continue
            reason, detail = problem.split("\t", 1)
            dropped[BAD_RECORD + reason] += 1
            if len(shown) < MAX_REPORTED:
                shown.append(f"  {_location(path, file, index, lines)}: {detail}")
        parts.append(converted.select(good).remove_columns("_problem"))
    bad = sum(dropped.values())
    counts = ", ".join(f"{n} {reason.removeprefix(BAD_RECORD)}" for reason, n in dropped.most_common())
    if bad and on_error == OnError.FAIL:
        more = f"\n  ... and {bad - len(shown)} more" if bad > len(shown) else ""
        raise DataError(
            f"{key}.{split}: {bad} bad record(s) ({counts}); fix them or set dataset.on_error=skip:\n"
            + "\n".join(shown) + more
        )  # fmt: skip
    merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0] if parts else None
    if merged is None or len(merged) == 0:
        raise DataError(f"{key}.{split}: no usable records ({counts or 'the files hold none'})")
    return LoadedSplit(merged, dropped)
