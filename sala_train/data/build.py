"""Tokenized splits for every stage, with counts of what was kept and why not.

Files -> canonical records (``formats``/``records``) -> ``max_samples`` / ``val_size`` -> per-stage
tokenization, all through ``datasets`` (cached; the masking code is part of each cache key):

- ``sft``: ``input_ids`` + ``labels`` (loss on assistant turns and tool calls, see ``chat``);
- ``pretrain``: documents + EOS concatenated and cut into ``cutoff_len`` blocks, loss everywhere;
- ``dpo``: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``; ``kto``: ``prompt_ids``,
  ``completion_ids``, ``label`` (TRL's column names, tokenized by us so templates match SFT).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import math
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sala_train.config.schema import (
    DatasetConfig,
    DatasetSource,
    DpoStage,
    KtoStage,
    MixStrategy,
    OnError,
    PretrainStage,
    SftStage,
    StageConfig,
    ToolFormat,
)
from sala_train.data import chat
from sala_train.data.chat import IGNORE_INDEX, TemplateRenderError, encode, prompt_and_reply, render_document
from sala_train.data.formats import BAD_RECORD, LoadedSplit, load_split
from sala_train.data.workers import map_records, workers_for
from sala_train.errors import DataError, os_error_in_chain

DROP_NO_TRAINED = "no trained token left within dataset.cutoff_len"
DROP_LONG_PROMPT = "prompt fills dataset.cutoff_len"
DROP_REFUSED = "the chat template refused it (dataset.on_error=skip)"
# Replies that differ only past the cut: the pair teaches nothing (its loss has no gradient) and
# lowers the preference accuracy the run reports.
DROP_SAME_WITHIN_CUTOFF = "chosen and rejected the same within dataset.cutoff_len"


@dataclass
class SplitStats:
    kept: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    trained_tokens: int = 0  # loss terms: labels after each sequence's first token
    lengths: list[int] = field(default_factory=list)
    left_out_tokens: int = 0  # pre-training: the partial last block of each 1000 documents
    # The kept samples' token ids, labels and KTO labels, in order: a changed tokenizer or chat
    # template that tokenizes to the same lengths (a "\n" become "\t") changes it.
    content_sha256: str = ""

    def padding_fraction(self, batch_size: int, multiple: int | None = None) -> float:
        """Share of padding in batches of ``batch_size`` padded to their longest (file order),
        rounded up to ``multiple``."""
        from sala_train.data.collators import round_up

        padded = 0
        for i in range(0, len(self.lengths), batch_size):
            chunk = self.lengths[i : i + batch_size]
            padded += round_up(max(chunk), multiple or 1) * len(chunk)
        return 1 - self.tokens / padded if padded else 0.0


@dataclass
class TokenizedData:
    splits: dict[str, Any]  # split name -> datasets.Dataset, columns as the stage's trainer wants them
    stats: dict[str, SplitStats]


ALL_SPLITS = ("train", "validation", "test")


def _own_splits(
    files: DatasetConfig | DatasetSource, cfg: DatasetConfig, key: str, wanted: tuple[str, ...] = ALL_SPLITS
) -> dict[str, LoadedSplit]:
    """One entry's own files per split, each cut to its first ``max_samples`` records (``load_split``;
    the run's ``cfg`` says how bad records are handled and by how many processes)."""
    raw = {}
    for split in ALL_SPLITS:
        if split in wanted and (split == "train" or getattr(files, split, None)):
            raw[split] = load_split(files, split, cfg.on_error, key, cfg.preprocessing_num_workers)
    return raw


def _aligned(parts: list[Any]) -> list[Any]:
    """Chat records gain an empty ``text``, text records empty ``tools``, so both sit side by side
    (pre-training takes both)."""
    if not any("text" in p.column_names for p in parts):
        return parts
    columns = ["text", "messages", "tools"]
    for i, part in enumerate(parts):
        for column in columns:
            if column not in part.column_names:
                part = part.add_column(column, [""] * len(part))
        parts[i] = part.select_columns(columns)
    return parts


def _combine(loaded: list[LoadedSplit], cfg: DatasetConfig, strategy: MixStrategy) -> LoadedSplit:
    """One split from several entries' records, concatenated or interleaved by weight."""
    import datasets

    dropped = sum((part.dropped for part in loaded), Counter[str]())
    parts = _aligned([part.records for part in loaded])
    if len(parts) == 1:
        return LoadedSplit(parts[0], dropped)
    if strategy is MixStrategy.CONCAT:
        return LoadedSplit(datasets.concatenate_datasets(parts), dropped)
    stop = "first_exhausted" if strategy is MixStrategy.INTERLEAVE_UNDER else "all_exhausted"
    # The weights as numpy's sampler takes them: the config's check allows a sum off 1 by 1e-6
    # (three thirds written 0.3333333), numpy by ~1.5e-8 ("Probabilities do not sum to 1").
    probs = cfg.interleave_probs
    weights = None if probs is None else [w / sum(probs) for w in probs]
    mixed = datasets.interleave_datasets(parts, probabilities=weights, seed=cfg.split_seed,
                                         stopping_strategy=stop)  # fmt: skip
    return LoadedSplit(mixed, dropped)


# A path datasets cannot make in its cache (a file there or above it, a path under /proc): taken
# for the cache's only when they name a path in it (pyarrow reports a data file that went missing
# as ENOENT with no file name).
_NOT_A_DIRECTORY = {errno.EEXIST, errno.ENOTDIR}
_NAMED_ONLY = {*_NOT_A_DIRECTORY, errno.ENOENT}
# What a datasets cache (HF_DATASETS_CACHE) that cannot take what datasets writes there raises:
# read-only, full, or one of those.
CACHE_WRITE_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, *_NAMED_ONLY}


def _writing_the_datasets_cache(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` reads and tokenizes through datasets, which writes its cache as it goes (lock files,
    Arrow files): a cache it cannot write in, read-only or full, was its OSError traceback (or a
    DatasetGenerationError's), exit 1. The data files themselves were read and checked before."""

    @functools.wraps(step)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        except DataError:
            raise
        except Exception as exc:
            import datasets

            cache = Path(datasets.config.HF_DATASETS_CACHE)
            cause = os_error_in_chain(exc, CACHE_WRITE_ERRORS)
            # (datasets names its files under the cache's real path: behind a link, ~ or a relative one;
            # or a directory above the cache it could not make, HF_HOME=/proc/nope)
            named = (
                Path(os.path.realpath(os.fsdecode(cause.filename))) if cause is not None and cause.filename else None
            )
            real_cache = Path(os.path.realpath(cache.expanduser()))
            inside = named is not None and (named.is_relative_to(real_cache) or real_cache.is_relative_to(named))
            if cause is None or ((cause.filename or cause.errno in _NAMED_ONLY) and not inside):
                raise  # (a file elsewhere, a data file or a temporary one: not the cache's problem)
            why = "it, or a directory above it, is a file" if cause.errno in _NOT_A_DIRECTORY else cause.strerror
            raise DataError(f"the datasets cache {cache}: cannot write in it ({why or cause}); set "
                            "HF_DATASETS_CACHE to a directory with room that you can write in") from exc  # fmt: skip

    return wrapped


@_writing_the_datasets_cache
def raw_splits(cfg: DatasetConfig, validation_only: bool = False) -> dict[str, LoadedSplit]:
    """Canonical records per split: this entry's and each ``dataset.mix`` entry's, the training
    records combined per ``mix_strategy``; ``validation`` is cut from the mixed train when
    ``val_size`` is set (entries' own validation files join it). ``validation_only``: the
    validation split alone, its files only read (and the train files where ``val_size`` cuts it
    from them), for ``sala-export``'s check: a run's train and test files may be gone by then."""
    if not validation_only:
        wanted = ALL_SPLITS
    else:
        wanted = ("train", "validation") if cfg.val_size is not None else ("validation",)
    entries = [_own_splits(cfg, cfg, "dataset", wanted)]
    entries += [_own_splits(s, cfg, f"dataset.mix.{s.name}", wanted) for s in cfg.mixed]
    held_out: list[LoadedSplit] = []
    per_entry = cfg.val_size is not None and cfg.mix_strategy is MixStrategy.INTERLEAVE_OVER and len(entries) > 1
    if per_entry:
        # Oversampling repeats records: held out after it, a repeated record could land on both
        # sides. Each entry gives its share before mixing instead, so no validation record is trained on.
        assert cfg.val_size is not None
        sizes = [len(e["train"].records) if "train" in e else 0 for e in entries]
        names = ["dataset", *(f"dataset.mix.{s.name}" for s in cfg.mixed)]
        for name, entry, share in zip(names, entries, _val_shares(cfg.val_size, sizes, cfg), strict=True):
            if share:
                whose = f"{name}'s train (each mixed entry holds out its share of the {sum(sizes)} records)"
                entry["train"].records, held = _hold_out(entry["train"].records, share, cfg, whose)
                held_out.append(LoadedSplit(held))
    raw = {"train": _combine([e["train"] for e in entries], cfg, cfg.mix_strategy)} if "train" in wanted else {}
    for split in ("validation", "test"):
        given = [e[split] for e in entries if split in e]
        if given:
            raw[split] = _combine(given, cfg, MixStrategy.CONCAT)
    if cfg.val_size is not None and not per_entry:
        raw["train"].records, held = _hold_out(raw["train"].records, cfg.val_size, cfg)
        held_out.append(LoadedSplit(held))
    if held_out:
        raw["validation"] = _combine([*held_out, *([raw["validation"]] if "validation" in raw else [])], cfg,
                                     MixStrategy.CONCAT)  # fmt: skip
    return raw


def _val_shares(val_size: float, sizes: list[int], cfg: DatasetConfig) -> list[float]:
    """Each mixed entry's part of ``val_size`` under interleave_over: a fraction, of each entry that
    has records to spare (2 or more); a count, shared out by size with the largest remainders taking
    what rounding leaves, so the parts add up to it (each entry's rounded on its own, every part
    could be 0, or add up to more). DataError when no entry can hold any out."""
    spare = [n if n >= 2 else 0 for n in sizes]
    if not any(spare):
        raise DataError(f"dataset.val_size={cfg.val_size:g}: under dataset.mix_strategy=interleave_over each mixed "
                        f"entry holds out its share before mixing, and none has 2 records to split "
                        f"({', '.join(map(str, sizes))}); give dataset.validation files instead")  # fmt: skip
    if val_size < 1:
        return [val_size if n else 0 for n in spare]
    count = int(val_size)
    exact = [count * n / sum(spare) for n in spare]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(spare)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: count - sum(shares)]:
        shares[i] += 1
    return [float(share) for share in shares]


def _hold_out(records: Any, val_size: float, cfg: DatasetConfig, whose: str = "train") -> tuple[Any, Any]:
    """``records`` split into (train, held out): ``val_size`` a fraction or a count, as ``dataset.val_size``;
    ``whose``: the records named in a refusal (an entry's share of a mix)."""
    size = int(val_size) if val_size >= 1 else val_size
    held = size if isinstance(size, int) else math.ceil(size * len(records))  # as train_test_split counts
    if len(records) < 2 or held >= len(records):
        raise DataError(
            f"dataset.val_size={cfg.val_size:g}: {whose} has only {len(records)} records, "
            f"and holding out {held} leaves none to train on"
        )
    parts = records.train_test_split(test_size=size, seed=cfg.split_seed)
    return parts["train"], parts["test"]


def _fingerprint(ds: Any, tokenizer: Any, *options: Any) -> str:
    """Cache key of a tokenized split.

    datasets hashes a mapped function by reference, so an upgrade that changes how masks or
    blocks are computed would silently reuse stale caches; the source of the code that computes
    them (the masking module and this one) is part of the key.
    """
    from datasets.fingerprint import Hasher

    code = (inspect.getsource(chat), inspect.getsource(sys.modules[__name__]))
    return Hasher.hash((ds._fingerprint, Hasher.hash(tokenizer), options, code))


# --- per stage: one record -> token columns, plus "_drop" (a reason, or "") ---------------------

RecordFn = Callable[[dict[str, Any]], dict[str, Any]]


def _skip_refused(fn: RecordFn, cfg: DatasetConfig, refused: dict[str, Any]) -> RecordFn:
    """With ``dataset.on_error=skip``, a conversation the chat template refuses is dropped (and
    counted) like any other bad record; ``refused`` is the row it becomes."""
    if cfg.on_error is not OnError.SKIP:
        return fn

    def tokenize(record: dict[str, Any]) -> dict[str, Any]:
        try:
            return fn(record)
        except TemplateRenderError:
            return {**refused, **({"label": record["label"]} if "label" in record else {}), "_drop": DROP_REFUSED}

    return tokenize


def _with_default_system(messages: list[dict[str, Any]], cfg: DatasetConfig) -> list[dict[str, Any]]:
    """``dataset.default_system`` before a conversation (or prompt) without a system turn of its own:
    a record's own system prompt, or a system turn it opens with, wins (as in LLaMA-Factory)."""
    if cfg.default_system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": cfg.default_system, "tool_calls": ""}, *messages]


def _sft_fn(tokenizer: Any, cfg: DatasetConfig) -> RecordFn:
    def tokenize(record: dict[str, Any]) -> dict[str, Any]:
        messages = _with_default_system(record["messages"], cfg)
        enc = encode(
            tokenizer, messages, cfg.cutoff_len, cfg.train_on_prompt, cfg.mask_history, record.get("tools") or ""
        )
        drop = DROP_NO_TRAINED if enc.trained_tokens == 0 else ""
        return {"input_ids": enc.input_ids, "labels": enc.labels, "_truncated": enc.truncated, "_drop": drop}

    return _skip_refused(tokenize, cfg, {"input_ids": [], "labels": [], "_truncated": False})


def _pair_fn(tokenizer: Any, cfg: DatasetConfig, replies: tuple[str, ...]) -> RecordFn:
    """DPO (chosen, rejected) or KTO (completion): the prompt once, each reply cut to fit after it."""

    def tokenize(record: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"_truncated": False, "_drop": ""}
        prompts: dict[str, list[int]] = {}
        for column in replies:
            prompt_ids, reply_ids = prompt_and_reply(tokenizer, _with_default_system(record["prompt"], cfg),
                                                     record[column], record["tools"], prompts)  # fmt: skip
            room = cfg.cutoff_len - len(prompt_ids)
            out["prompt_ids"] = prompt_ids
            out[f"{column}_ids"] = reply_ids[: max(room, 0)]
            out["_truncated"] |= len(reply_ids) > room
            if room <= 0:
                out["_drop"] = DROP_LONG_PROMPT
        if len(replies) == 2 and not out["_drop"] and out["chosen_ids"] == out["rejected_ids"]:
            out["_drop"] = DROP_SAME_WITHIN_CUTOFF
        if "label" in record:
            out["label"] = record["label"]
        return out

    refused = {"prompt_ids": [], **{f"{column}_ids": [] for column in replies}, "_truncated": False}
    return _skip_refused(tokenize, cfg, refused)


def _content_sha256(tokenized: Any, keep: list[int] | None, columns: list[str]) -> str:
    """sha256 over the kept rows' ``columns`` in order (``SplitStats.content_sha256``): each
    column's values and its rows' lengths hashed apart, read from Arrow a batch at a time. Hashing
    is most of the cost (1M samples of 512 tokens: 8 GB as int64, 20 s), so ids are hashed as
    int32 (any vocabulary fits) and ``labels`` beside ``input_ids`` as which positions train (a
    byte each) and the few labels that are not their position's id (none, as every stage builds
    them). Every stream is the same however the table is cut into batches: a split tokenized in
    several processes is read back in other batches than one tokenized in one (a bit mask packed a
    batch at a time hashed differently, and a resume on a machine of another core count was
    refused as other data)."""
    import numpy as np
    import pyarrow as pa

    table = tokenized.data.table if hasattr(tokenized.data, "table") else tokenized.data
    mask = None
    if keep is not None:
        mask = np.zeros(table.num_rows, dtype=bool)
        mask[keep] = True
    streams = {c: (hashlib.sha256(), hashlib.sha256()) for c in columns}  # (values, lengths)
    other_labels = hashlib.sha256()  # (position, label) where a label is neither ignored nor its id
    start = position = 0
    for batch in table.select(columns).to_batches(max_chunksize=8192):
        rows = batch.num_rows
        if mask is not None:
            batch = batch.filter(pa.array(mask[start : start + rows]))
        start += rows
        flat = {c: _flat_values(batch.column(c)) for c in columns}
        for c in columns:
            values, lengths = flat[c]
            if c == "labels" and "input_ids" in flat and values.shape == flat["input_ids"][0].shape:
                ids = flat["input_ids"][0]
                trained = values != IGNORE_INDEX
                other = np.flatnonzero(trained & (values != ids))
                other_labels.update(np.stack([other + position, values[other]], axis=1).astype(np.int64).tobytes())
                values = trained
            streams[c][0].update(values.tobytes())
            streams[c][1].update(lengths.tobytes())
        if "input_ids" in flat:
            position += len(flat["input_ids"][0])
    whole = hashlib.sha256()
    for c in columns:
        whole.update(c.encode() + streams[c][0].digest() + streams[c][1].digest())
    if "labels" in columns and "input_ids" in columns:
        whole.update(other_labels.digest())
    return whole.hexdigest()[:16]


def _flat_values(column: Any) -> tuple[Any, Any]:
    """(every value, as int32; each row's length, or nothing for a column of scalars)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.int32)
        return values, np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False), dtype=np.int32)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int32), np.zeros(0, dtype=np.int32)


def _tokenize_records(ds: Any, fn: RecordFn, fingerprint: str, workers: int) -> tuple[Any, SplitStats]:
    tokenized = map_records(ds, fn, workers, remove_columns=ds.column_names, new_fingerprint=fingerprint)
    stats, keep = _record_stats(tokenized)
    stats.content_sha256 = _content_sha256(tokenized, keep, sorted(c for c in tokenized.column_names if c[0] != "_"))
    return tokenized.select(keep).remove_columns(["_drop", "_truncated"]), stats


def row_lengths(split: Any, column: str = "input_ids") -> list[int]:
    """Each row's length in a list column, read from Arrow (the column as Python lists copied every id)."""
    import pyarrow.compute as pc

    return pc.list_value_length(split.with_format("arrow")[column]).to_numpy(zero_copy_only=False).tolist()


def _record_stats(tokenized: Any) -> tuple[SplitStats, list[int]]:
    """The split's counts and the rows kept, read from Arrow by column a batch at a time: a loop
    over rows decoded each one into Python lists (a minute per 400k samples, at every start, the
    cache warm or not)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = tokenized.with_format("arrow")[:]
    drops = table.column("_drop").to_pylist()
    kept_rows = np.array([not reason for reason in drops], dtype=bool)
    stats = SplitStats(dropped=Counter(reason for reason in drops if reason), kept=int(kept_rows.sum()))
    replies = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in table.column_names]
    columns = ["input_ids", "labels"] if "labels" in table.column_names else ["prompt_ids", *replies]
    sequences = []
    start = 0
    for batch in table.select(["_truncated", *columns]).to_batches(max_chunksize=65_536):
        rows = kept_rows[start : start + batch.num_rows]
        start += batch.num_rows
        if not rows.all():
            batch = batch.filter(pa.array(rows))

        def lengths_of(column: str, batch: Any = batch) -> Any:
            return pc.list_value_length(batch.column(column)).to_numpy(zero_copy_only=False).astype(np.int64)

        stats.truncated += int(pc.sum(batch.column("_truncated").cast(pa.int64())).as_py() or 0)
        if "labels" in columns:
            labels = batch.column("labels")
            trained = pc.sum(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)).as_py() or 0
            # (a sequence's first token is never a target: nothing before it predicts it)
            firsts = pc.list_element(labels.filter(pc.greater(pc.list_value_length(labels), 0)), 0)
            stats.trained_tokens += int(trained) - int(pc.sum(pc.not_equal(firsts, IGNORE_INDEX)).as_py() or 0)
            sequences.append(lengths_of("input_ids")[:, None])
        else:  # the model sees prompt + each reply as its own sequence
            reply = np.stack([lengths_of(c) for c in replies], axis=1)
            stats.trained_tokens += int(reply.sum())
            sequences.append(lengths_of("prompt_ids")[:, None] + reply)
    flat = np.concatenate(sequences).ravel() if sequences else np.zeros(0, np.int64)
    stats.lengths = flat.tolist()
    stats.tokens = int(flat.sum())
    return stats, [i for i, kept in enumerate(kept_rows) if kept]


def _pretrain_documents(ds: Any, tokenizer: Any, cfg: DatasetConfig, workers: int) -> tuple[Any, Counter[str]]:
    """Each record's ids as pre-training reads it, EOS last: a text as the tokenizer encodes text,
    with the BOS a Llama-style tokenizer (MiniCPM's) puts first, as transformers' run_clm example
    does; a conversation as its chat template renders it, which holds the BOS it wants. With the
    conversations the template refused, dropped under ``dataset.on_error=skip``. (Per record, so
    it can run in several processes; the blocks are cut after, in one.)"""
    eos = tokenizer.eos_token_id

    def to_ids(record: dict[str, Any]) -> dict[str, Any]:
        messages = record.get("messages")
        if not messages:  # text formats; a mix of text and chat carries both columns
            ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        else:
            document = render_document(tokenizer, _with_default_system(messages, cfg), record.get("tools") or "")
            ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        return {"ids": ids if ids[-1:] == [eos] else [*ids, eos], "_drop": ""}  # (some tokenizers end text with EOS)

    fingerprint = _fingerprint(ds, tokenizer, "pretrain-documents", cfg.on_error.value, cfg.default_system)
    documents = map_records(ds, _skip_refused(to_ids, cfg, {"ids": []}), workers, remove_columns=ds.column_names,
                            new_fingerprint=fingerprint)  # fmt: skip
    reasons = documents["_drop"]
    dropped = Counter(reason for reason in reasons if reason)
    if dropped:
        documents = documents.select([i for i, reason in enumerate(reasons) if not reason])
    return documents.remove_columns(["_drop"]), dropped


def _pretrain_blocks(ds: Any, tokenizer: Any, cfg: DatasetConfig, workers: int) -> tuple[Any, SplitStats]:
    """Documents + EOS, concatenated in order and cut into ``cutoff_len`` blocks (the last partial
    block of each 1000 documents is dropped unless it is the only one, as LLaMA-Factory does; its
    tokens are counted as left out)."""
    if tokenizer.eos_token_id is None:
        raise DataError(
            "stage=pretrain needs an EOS token between documents; the tokenizer of "
            f"model.name_or_path={getattr(tokenizer, 'name_or_path', '?')} has none (its tokenizer_config.json sets no "
            "eos_token)"
        )
    block = cfg.cutoff_len
    documents, dropped = _pretrain_documents(ds, tokenizer, cfg, workers)

    def to_blocks(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids = [token for document in batch["ids"] for token in document]
        blocks = [ids[i : i + block] for i in range(0, len(ids), block)]
        left_out = 0
        if len(blocks) > 1 and len(blocks[-1]) < block:
            left_out = len(blocks.pop())
        # (a batched map returns columns, one row per block: the batch's left-out count rides on its first)
        return {"input_ids": blocks, "labels": [list(b) for b in blocks],
                "_left_out": [left_out] + [0] * (len(blocks) - 1)}  # fmt: skip

    # (one process: a batch's blocks depend on where the batch starts, and a worker's shard would start anywhere)
    blocks = documents.map(to_blocks, batched=True, batch_size=1000, remove_columns=documents.column_names,
                           new_fingerprint=_fingerprint(documents, tokenizer, "pretrain", block))  # fmt: skip
    left_out = sum(blocks["_left_out"])
    blocks = blocks.remove_columns(["_left_out"])
    lengths = row_lengths(blocks)
    # A block's first token is never a target (nothing before it in the block predicts it).
    stats = SplitStats(
        kept=len(lengths),
        tokens=sum(lengths),
        trained_tokens=sum(n - 1 for n in lengths),
        lengths=lengths,
        dropped=dropped,
        left_out_tokens=left_out,
        content_sha256=_content_sha256(blocks, None, ["input_ids"]),  # (its labels are its ids)
    )
    return blocks, stats


def _tokenize(stage: StageConfig, cfg: DatasetConfig, ds: Any, tokenizer: Any) -> tuple[Any, SplitStats]:
    # (on_error: a refused conversation is dropped only with skip; a fail run must not reuse that cache)
    options = (type(stage).__name__, cfg.cutoff_len, cfg.train_on_prompt, cfg.mask_history, cfg.on_error.value,
               cfg.default_system)  # fmt: skip
    fingerprint = _fingerprint(ds, tokenizer, *options)
    workers = workers_for(cfg.preprocessing_num_workers, len(ds))  # (the cache is the same for any count)
    match stage:
        case SftStage():
            return _tokenize_records(ds, _sft_fn(tokenizer, cfg), fingerprint, workers)
        case PretrainStage():
            return _pretrain_blocks(ds, tokenizer, cfg, workers)
        case DpoStage():
            return _tokenize_records(ds, _pair_fn(tokenizer, cfg, ("chosen", "rejected")), fingerprint, workers)
        case KtoStage():
            return _tokenize_records(ds, _pair_fn(tokenizer, cfg, ("completion",)), fingerprint, workers)
    raise AssertionError(stage)


@_writing_the_datasets_cache
def build_data(
    stage: StageConfig, cfg: DatasetConfig, tokenizer: Any, raw: dict[str, LoadedSplit] | None = None
) -> TokenizedData:
    """Tokenized splits (of ``raw``, when the files were read already); DataError when a required
    split ends up empty."""
    if cfg.template is not None:
        chat.use_named_template(tokenizer, cfg.template.value, (cfg.tool_format or ToolFormat.DEFAULT).value)
    splits: dict[str, Any] = {}
    stats: dict[str, SplitStats] = {}
    for name, loaded in (raw_splits(cfg) if raw is None else raw).items():
        splits[name], stats[name] = _tokenize(stage, cfg, loaded.records, tokenizer)
        stats[name].dropped.update(loaded.dropped)
    for name in ("train", "validation", "test"):
        if name in splits and len(splits[name]) == 0:
            dropped = stats[name].dropped
            why = ", ".join(f"{count} {reason}" for reason, count in dropped.most_common())
            raise DataError(f"dataset.{name}: every sample was dropped ({why}); {dropping_advice(dropped, cfg)}")
    return TokenizedData(splits, stats)


def run_summary(data: TokenizedData, cfg: DatasetConfig) -> list[str]:
    """What a run trains on, said as it starts (sala-data's counts, short): samples dropped for
    their length were counted only by ``sala-data``, so a run on the guide's DPO data at its
    cutoff trained on 176 of its 270 pairs without a word."""
    parts = []
    for name, stats in data.stats.items():
        cut = f", {stats.truncated:,} cut at dataset.cutoff_len" if stats.truncated else ""
        parts.append(f"{name} {stats.kept:,} samples ({stats.tokens:,} tokens{cut})")
    lines = [f"data: {'; '.join(parts)}"]
    for name, stats in data.stats.items():
        if dropped := sum(stats.dropped.values()):
            why = ", ".join(f"{count:,} {reason}" for reason, count in stats.dropped.most_common())
            lines.append(f"WARNING: {dropped:,} {name} records dropped ({why}), {stats.kept:,} samples kept; "
                         f"{dropping_advice(stats.dropped, cfg)}")  # fmt: skip
    return lines


def dropping_advice(dropped: Counter[str], cfg: DatasetConfig) -> str:
    """What to change, by why the samples were dropped (a longer cutoff does not help a template
    that refuses them)."""
    advice = []
    if {DROP_NO_TRAINED, DROP_LONG_PROMPT, DROP_SAME_WITHIN_CUTOFF} & set(dropped):
        advice.append(f"raise dataset.cutoff_len (now {cfg.cutoff_len})")
    if DROP_REFUSED in dropped:
        advice.append("use a chat template that takes these conversations (dataset.template)")
    if any(reason.startswith(BAD_RECORD) for reason in dropped):
        advice.append("fix the bad records (sala-data lists them)")
    return "; ".join(advice) or "sala-data shows each sample's reason"
