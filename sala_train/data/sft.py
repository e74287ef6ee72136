"""Build tokenized SFT splits from the dataset config, with counts of what was kept and why not."""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sala_train.config.schema import DatasetConfig
from sala_train.data import chat
from sala_train.data.chat import encode
from sala_train.data.formats import load_json_records, validate_messages
from sala_train.errors import DataError

DROP_NO_TRAINED = "no trained token left within dataset.cutoff_len"


@dataclass
class SplitStats:
    kept: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)

    def padding_fraction(self, batch_size: int) -> float:
        """Share of padding in batches of ``batch_size`` padded to their longest (file order)."""
        padded = 0
        for i in range(0, len(self.lengths), batch_size):
            chunk = self.lengths[i : i + batch_size]
            padded += max(chunk) * len(chunk)
        return 1 - self.tokens / padded if padded else 0.0


@dataclass
class SftData:
    splits: dict[str, Any]  # split name -> datasets.Dataset with input_ids, labels
    stats: dict[str, SplitStats]


def _raw_splits(cfg: DatasetConfig) -> dict[str, Any]:
    raw = {"train": load_json_records(cfg.train, "train")}
    validate_messages(raw["train"], cfg.train, "train")
    if cfg.validation:
        raw["validation"] = load_json_records(cfg.validation, "validation")
        validate_messages(raw["validation"], cfg.validation, "validation")
    if cfg.test:
        raw["test"] = load_json_records(cfg.test, "test")
        validate_messages(raw["test"], cfg.test, "test")
    if cfg.max_samples is not None:
        raw = {k: v.select(range(min(len(v), cfg.max_samples))) for k, v in raw.items()}
    if cfg.val_size is not None:
        size = int(cfg.val_size) if cfg.val_size >= 1 else cfg.val_size
        if len(raw["train"]) < 2 or (isinstance(size, int) and size >= len(raw["train"])):
            raise DataError(f"dataset.val_size={cfg.val_size}: train has only {len(raw['train'])} records")
        parts = raw["train"].train_test_split(test_size=size, seed=cfg.split_seed)
        raw["train"], raw["validation"] = parts["train"], parts["test"]
    return raw


def _fingerprint(ds: Any, tokenizer: Any, cutoff_len: int) -> str:
    """Cache key of a tokenized split.

    datasets hashes a mapped function by reference, so an upgrade that changes how masks are
    computed would silently reuse stale caches; the source of the masking code is part of the key.
    """
    from datasets.fingerprint import Hasher

    return Hasher.hash((ds._fingerprint, Hasher.hash(tokenizer), cutoff_len, inspect.getsource(chat)))


def _tokenize_split(ds: Any, tokenizer: Any, cutoff_len: int) -> tuple[Any, SplitStats]:
    def tokenize(record: dict[str, Any]) -> dict[str, Any]:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        enc = encode(tokenizer, messages, cutoff_len)
        return {
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "truncated": enc.truncated,
            "trained_tokens": enc.trained_tokens,
        }

    tokenized = ds.map(
        tokenize, remove_columns=ds.column_names, new_fingerprint=_fingerprint(ds, tokenizer, cutoff_len)
    )
    stats = SplitStats()
    keep: list[int] = []
    for i, (trained, truncated, ids) in enumerate(
        zip(tokenized["trained_tokens"], tokenized["truncated"], tokenized["input_ids"], strict=True)
    ):
        if trained == 0:
            stats.dropped[DROP_NO_TRAINED] += 1
            continue
        keep.append(i)
        stats.kept += 1
        stats.truncated += int(truncated)
        stats.tokens += len(ids)
        stats.trained_tokens += trained
        stats.lengths.append(len(ids))
    kept = tokenized.select(keep).remove_columns(["truncated", "trained_tokens"])
    return kept, stats


def build_sft_data(cfg: DatasetConfig, tokenizer: Any) -> SftData:
    """Tokenized splits; DataError when a required split ends up empty."""
    raw = _raw_splits(cfg)
    splits: dict[str, Any] = {}
    stats: dict[str, SplitStats] = {}
    for name, ds in raw.items():
        splits[name], stats[name] = _tokenize_split(ds, tokenizer, cfg.cutoff_len)
    for name in ("train", "validation"):
        if len(splits[name]) == 0:
            raise DataError(
                f"dataset.{name}: every sample was dropped ({dict(stats[name].dropped)}); "
                f"raise dataset.cutoff_len (now {cfg.cutoff_len})"
            )
    return SftData(splits, stats)
