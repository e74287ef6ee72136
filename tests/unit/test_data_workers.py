"""Tokenizing in several processes (``dataset.preprocessing_num_workers``): the splits are the one
process's, row for row; a worker's error is the command's; a Ctrl-C or the command's end ends the
workers, quietly."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sala_train.config.schema import DatasetConfig, DpoStage, KtoStage, PretrainStage, SftStage
from sala_train.config.typed import build
from sala_train.data.build import build_data
from sala_train.data.chat import TemplateRenderError
from sala_train.data.workers import MIN_RECORDS_PER_WORKER, workers_for
from sala_train.errors import DataError
from tests.conftest import GUIDE_DATA, REPO, SHARED

LLAMAFACTORY = SHARED / "data" / "llamafactory"


def _shared(path: str) -> Path:
    """A bundled entry's file: an asset as it names it, a ``data/`` file from the shared copies."""
    for where in (Path(path), LLAMAFACTORY / Path(path).name, GUIDE_DATA / "llama_factory" / Path(path).name):
        if where.is_file():
            return where
    raise FileNotFoundError(path)


def entry(name: str, data_dir: Path | None = None, **changes) -> DatasetConfig:
    """A bundled conf/dataset entry; given ``data_dir``, its files copied there and read from there."""
    from sala_train.config.entries import _entry

    cfg = build(DatasetConfig, _entry("dataset", name))
    if data_dir is None:
        return dataclasses.replace(cfg, **changes)
    moved = {}
    for split in ("train", "validation", "test"):
        if files := getattr(cfg, split):
            moved[split] = [shutil.copy(_shared(f), data_dir / f"{split}-{Path(f).name}") for f in files]
    return dataclasses.replace(cfg, **moved, **changes)


CASES = {  # stage, entry (its files: the guide's or LLaMA-Factory's), what else the case sets
    "sft": (SftStage(), "alpaca_en_demo", {"cutoff_len": 48}),
    "dpo": (DpoStage(), "dpo_en_demo", {"cutoff_len": 256}),
    "kto": (KtoStage(), "kto_en_demo", {"cutoff_len": 128}),
    "pretrain": (PretrainStage(), "c4_demo", {"cutoff_len": 128}),
    # (a named template with tools, set on the tokenizer here: the workers' copies must have it)
    "tools": (SftStage(), "demo_toolcall", {"cutoff_len": 400, "mask_history": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_several_processes_give_the_one_process_splits_row_for_row(case, tmp_path, tokenizer):
    """The guide's and LLaMA-Factory's demo sets, with samples dropped or cut: the same rows, counts
    and content signature from 1 and 3 processes (each from its own copy of the files, so neither
    reads the other's cache), and 3 did run, reading each file and tokenizing each split (the cache
    holds one shard a process)."""
    stage, name, changes = CASES[case]
    built, started = {}, time.time()
    for workers in (1, 3):
        files_dir = tmp_path / str(workers)
        files_dir.mkdir()
        cfg = entry(name, files_dir, preprocessing_num_workers=workers, **changes)
        built[workers] = build_data(stage, cfg, copy.deepcopy(tokenizer))  # (a named template is set on it)
    one, three = built[1], built[3]
    train = one.stats["train"]
    assert sum(train.dropped.values()) + train.truncated + train.left_out_tokens > 0  # (samples dropped or cut)
    for split in one.splits:
        assert dataclasses.asdict(three.stats[split]) == dataclasses.asdict(one.stats[split])
        assert three.splits[split].to_dict() == one.splits[split].to_dict()
    caches = {Path(f["filename"]).parent for split in three.splits.values() for f in split.cache_files}
    shards = [
        f for cache in caches for f in cache.glob("cache-*_0000[0-2]_of_00003.arrow") if f.stat().st_mtime >= started
    ]
    files = len(cfg.train) + len(cfg.validation or []) + len(cfg.test or [])
    assert len(shards) == 3 * (files + len(three.splits)), shards  # (three a file read, three a split tokenized)


def test_a_workers_error_is_the_one_process_error(tmp_path, tokenizer):
    """A conversation the template refuses, in the second worker's share, under on_error=fail:
    the message is the one process's, word for word; under skip, both drop it alike."""
    from transformers import AutoTokenizer

    from tests.conftest import TINY_CHAT

    refusing = AutoTokenizer.from_pretrained(TINY_CHAT)
    refusing.chat_template = ("{% for m in messages %}{% if 'REFUSE' in m['content'] %}{{ raise_exception('no') }}"
                              "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
    chats = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}."}]}
             for i in range(40)]  # fmt: skip
    chats[30]["messages"][0]["content"] = "REFUSE this"
    errors, kept = {}, {}
    for workers in (1, 2):
        path = tmp_path / f"chats{workers}.json"
        path.write_text(json.dumps(chats), encoding="utf-8")
        cfg = DatasetConfig(name="t", train=[str(path)], val_size=2, cutoff_len=64, preprocessing_num_workers=workers)
        with pytest.raises(TemplateRenderError) as refused:
            build_data(SftStage(), cfg, refusing)
        errors[workers] = str(refused.value)
        skip = dataclasses.replace(cfg, on_error=cfg.on_error.SKIP)
        kept[workers] = build_data(SftStage(), skip, refusing).splits["train"].to_dict()
    assert "the conversation beginning 'REFUSE this'" in errors[1]
    assert errors[2] == errors[1]
    assert kept[2] == kept[1] and len(kept[1]["input_ids"]) == 37  # (40, 2 held out, 1 refused)


def test_worker_counts(monkeypatch):
    """null: a worker a core while each has MIN_RECORDS_PER_WORKER records, at most 16; a number:
    that many, at most one a record."""
    monkeypatch.setattr("sala_train.data.workers.usable_cpus", lambda: 8)
    assert workers_for(None, MIN_RECORDS_PER_WORKER - 1) == 1
    assert workers_for(None, 3 * MIN_RECORDS_PER_WORKER) == 3
    assert workers_for(None, 100 * MIN_RECORDS_PER_WORKER) == 8
    monkeypatch.setattr("sala_train.data.workers.usable_cpus", lambda: 64)
    assert workers_for(None, 100 * MIN_RECORDS_PER_WORKER) == 16
    assert workers_for(4, 10) == 4 and workers_for(4, 3) == 3 and workers_for(1, 10**6) == 1


# Maps 400 records slowly in 2 processes into the datasets cache (HF_DATASETS_CACHE), saying its
# pid and its workers' as they start. argv[1]: "slow"; "dies" (a worker killed at record 300) or
# "raises" (a DataError there), under a SIGTERM handler of the command's own that only notes the
# signal, as the runner's does.
_SLOW_MAP = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job starts with it ignored)
    import datasets
    from sala_train.data.workers import map_records
    from sala_train.errors import DataError
    datasets.disable_progress_bars()
    mode = sys.argv[1]
    if mode != "slow":
        signal.signal(signal.SIGTERM, lambda *_: os.write(2, b"noted, going on\\n"))

    def slow(record):
        if record["x"] % 200 == 0:
            os.write(1, f"worker {os.getpid()}\\n".encode())  # (one write: the two workers' lines never mix)
        if record["x"] == 300 and mode == "dies":
            os.kill(os.getpid(), signal.SIGKILL)
        if record["x"] == 300 and mode == "raises":
            raise DataError("record 300 is bad")
        time.sleep(0.05 if mode == "slow" else 0.005)
        return {"y": record["x"]}

    print("parent", os.getpid(), flush=True)
    records = datasets.Dataset.from_generator(lambda: ({"x": i} for i in range(400)))
    try:
        map_records(records, slow, 2)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    except DataError as exc:
        print("refused:", exc, flush=True)
        sys.exit(2)
    print("finished", flush=True)
""")


def _start_slow_map(tmp_path: Path, mode: str = "slow") -> tuple[subprocess.Popen[str], int, list[int]]:
    script = tmp_path / "slow_map.py"
    script.write_text(_SLOW_MAP, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    if not all(len(line.split()) == 2 for line in lines):
        proc.kill()
        raise AssertionError(f"{lines} {proc.communicate()}")
    return proc, int(lines[0].split()[1]), [int(line.split()[1]) for line in lines[1:]]


def _gone(pids: list[int], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the parent-death signal is Linux's")
def test_ctrl_c_stops_the_command_and_its_workers_without_their_tracebacks(tmp_path):
    """Ctrl-C reaches the terminal's whole process group: the command's own KeyboardInterrupt (not
    datasets' TimeoutError over it), no worker's traceback, no worker or partial file left."""
    proc, parent, workers = _start_slow_map(tmp_path)
    time.sleep(1)  # (each worker has written part of its share)
    os.killpg(parent, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in out, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert _gone(workers)
    # The workers' partial Arrow files went with them (datasets' own clean-up runs only when the
    # function raises: each interrupted worker left its share in the cache, for good).
    assert not list((tmp_path / "cache").rglob("tmp*")), list((tmp_path / "cache").rglob("*"))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the parent-death signal is Linux's")
def test_workers_end_with_the_command_stopped_at_once(tmp_path):
    """A command that ends at once (a second stop signal's os._exit, a kill -9) leaves no worker
    tokenizing on."""
    proc, parent, workers = _start_slow_map(tmp_path)
    os.kill(parent, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _gone(workers), [_state(pid) for pid in workers]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("mode", ["dies", "raises"])
def test_a_failed_share_ends_the_pool_under_a_commands_own_sigterm_handler(mode, tmp_path):
    """The runner handles SIGTERM itself (a stop request), and its workers had its handler: when a
    worker died or raised, datasets ended the others with SIGTERM, they noted it and went on, and
    the command waited on them for good. Now the command says the worker's error, at once."""
    proc, _, workers = _start_slow_map(tmp_path, mode)
    out, err = proc.communicate(timeout=60)
    expected = "record 300 is bad" if mode == "raises" else "a process tokenizing the data ended abruptly"
    assert proc.returncode == 2 and f"refused: {expected}" in out, (out, err)
    assert "noted" not in err and "Traceback" not in err, err
    assert _gone(workers)


def test_a_worker_that_dies_is_named_with_the_key_to_lower(tmp_path):
    """A worker killed (the kernel's out-of-memory killer) was datasets' RuntimeError traceback."""
    import datasets

    from sala_train.data.workers import map_records

    def dies(record):
        if record["x"] == 150:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"y": record["x"]}

    datasets.disable_progress_bars()
    with pytest.raises(DataError, match=r"^a process tokenizing the data ended abruptly .* while 2 ran at once; set "
                                        r"dataset.preprocessing_num_workers lower"):  # fmt: skip
        map_records(datasets.Dataset.from_dict({"x": list(range(200))}), dies, 2, load_from_cache_file=False)


def test_the_content_signature_reads_alike_however_the_split_is_batched():
    """The same rows as one Arrow table and as three of other sizes (one process's cache and three
    processes' shards) hash alike; a label that is not its position's id, or another trained mask,
    hashes otherwise."""
    import datasets

    from sala_train.data.build import _content_sha256

    rows = [list(range(i % 7, i % 7 + 3 + i % 5)) for i in range(25_000)]
    labels = [[-100, *ids[1:]] if i % 3 else list(ids) for i, ids in enumerate(rows)]

    def signature(labels, cut=()):
        whole = datasets.Dataset.from_dict({"input_ids": rows, "labels": labels})
        bounds = [0, *cut, len(rows)]
        parts = [whole.select(range(a, b)).flatten_indices() for a, b in itertools.pairwise(bounds)]
        table = datasets.concatenate_datasets(parts) if cut else whole
        return _content_sha256(table, [i for i in range(len(rows)) if i % 11], ["input_ids", "labels"])

    alone = signature(labels)
    assert signature(labels, cut=(3, 9_001)) == alone
    assert signature(labels, cut=(12_500,)) == alone
    other = [list(row) for row in labels]
    other[4][2] += 1  # (a trained label that is not its position's id)
    assert signature(other) != alone
    masked = [list(row) for row in labels]
    masked[5][1] = -100
    assert signature(masked) != alone


def test_bad_records_are_found_and_located_alike_in_several_processes(tmp_path):
    """Records converted in 3 processes: under on_error=fail the same list of bad records, each at
    its file's line (a worker's indices start at its share's offset); under skip the same kept rows
    and counts."""
    from sala_train.config.schema import DatasetFormat, OnError
    from sala_train.data.formats import load_split

    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    lines = [json.dumps({**good, "n": i}) for i in range(90)]
    lines[7] = "{not json"
    lines[40] = "42"
    lines[77] = json.dumps({"messages": [{"role": "assistant", "content": "first"}]})
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = DatasetConfig(name="t", train=[str(path)], format=DatasetFormat.MESSAGES)
    failures, kept = {}, {}
    for workers in (1, 3):
        with pytest.raises(DataError) as bad:
            load_split(cfg, "train", OnError.FAIL, workers=workers)
        failures[workers] = str(bad.value)
        loaded = load_split(cfg, "train", OnError.SKIP, workers=workers)
        kept[workers] = (loaded.records.to_dict(), loaded.dropped)
    assert f"{path}:8: " in failures[1] and f"{path}:41: " in failures[1] and f"{path}:78: " in failures[1]
    assert failures[3] == failures[1]
    assert kept[3] == kept[1] and sum(kept[1][1].values()) == 3
    # A CSV's rows found bad while reading are looked up by each row's index in the file.
    rows = ["instruction,input,output", *(f"q{i},,a{i}" for i in range(60))]
    rows[50] = "q49,,a49,extra"
    table = tmp_path / "rows.csv"
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    alpaca = DatasetConfig(name="t", train=[str(table)], format=DatasetFormat.ALPACA)
    found = {}
    for workers in (1, 3):
        with pytest.raises(DataError) as bad:
            load_split(alpaca, "train", OnError.FAIL, workers=workers)
        found[workers] = str(bad.value)
    assert f"{table}:51: " in found[1] and found[3] == found[1]


def _worker_state(record: dict) -> dict:
    import threading

    started = subprocess.Popen(["sleep", "30"])  # (a program the worker starts ends on SIGTERM, as ever)
    started.terminate()
    return {"sigterm_held": signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []),
            "taken_by": [t.name for t in threading.enumerate() if t.name == "sala-worker-sigterm"],
            "started_ended": started.wait(10), "pid": os.getpid()}  # fmt: skip


def _blocked_on(lock: object, ready: object) -> None:
    import threading

    from sala_train.data import workers

    workers._leave_signals_to_the_command(end_with_parent=False)
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    # The main thread never returns to Python: as when the signal lands just before it waits in C
    # (the Python handler then waits for bytecode that never comes), here by holding it blocked.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ready.set()  # type: ignore[attr-defined]
    lock.acquire()  # type: ignore[attr-defined]  # (as a worker asking for its next task while the pool holds the queue)


def test_a_worker_ends_on_sigterm_while_its_main_thread_waits_on_the_pools_lock():
    """datasets' pool ends its workers with SIGTERM while holding its task queue's lock, on which a
    worker asking for its next task waits in C. Handled in Python alone, a SIGTERM that arrived just
    before that wait began was never handled, and the pool waited for the worker for good (a CI run
    hung in test_a_workers_error_is_the_one_process_error). A thread of each worker's own, woken by
    the signal wherever it lands, ends it; nothing is held blocked (a program a worker starts still
    ends on SIGTERM), and the command's own process is left as it was."""
    import multiprocess
    from datasets import Dataset

    from sala_train.data.workers import map_records

    rows = map_records(Dataset.from_dict({"i": list(range(6))}), _worker_state, 2)
    assert len(set(rows["pid"])) == 2 and os.getpid() not in rows["pid"]
    assert rows["taken_by"] == [["sala-worker-sigterm"]] * 6 and not any(rows["sigterm_held"]), rows[:]
    assert rows["started_ended"] == [-signal.SIGTERM] * 6
    assert signal.set_wakeup_fd(-1) == -1  # (the command's own process: no wakeup descriptor set)
    context = multiprocess.get_context("fork")
    lock, ready = context.Lock(), context.Event()
    lock.acquire()
    worker = context.Process(target=_blocked_on, args=(lock, ready))
    worker.start()
    assert ready.wait(30)
    time.sleep(0.2)  # (waiting on the lock by now)
    worker.terminate()
    worker.join(10)
    if worker.exitcode is None:
        worker.kill()
    assert worker.exitcode == 128 + signal.SIGTERM
