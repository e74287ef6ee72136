"""Padding-free batches: samples laid end to end in one row, positions restarting per sample.

transformers turns restarting ``position_ids`` (with no attention mask) into a block-diagonal
causal mask for sdpa/eager, and the varlen kernel (``sala_train.attention``) reads the sequence
boundaries it is given; either way no sample attends to another. That holds only for attention
that takes boundaries from positions: a model whose layers take them from the attention mask alone
(MiniCPM-SALA's linear attention) would mix samples, so ``check_packing`` compares packed and
padded losses on real batches before training and refuses packing when they differ.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sala_train.data.chat import IGNORE_INDEX, loss_terms
from sala_train.errors import DistributedSetupError


def first_fit(used: list[int], tokens: int, row_tokens: int) -> int:
    """The first row (of ``used`` tokens each) with room for ``tokens`` more; ``len(used)``: a new one."""
    return next((i for i, u in enumerate(used) if u + tokens <= row_tokens), len(used))


@dataclass
class PackedCollator:
    """Samples end to end; the first label of each sample is ignored, so no loss term ever predicts
    one sample's first token from the previous sample's last.

    ``row_tokens`` None: one row (the varlen kernel's layout; its cost is linear in the row).
    Otherwise rows of at most ``row_tokens`` tokens (first fit, in order), each filled up to the
    longest row with a pad segment of its own (positions restarting, no loss): sdpa's block mask
    costs the square of the row length, so short rows keep packing cheaper than padding.
    """

    pad_token_id: int = 0
    row_tokens: int | None = None
    varlen_kwargs: bool = False

    def _rows(self, features: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        if self.row_tokens is None:
            return [features]
        rows: list[list[dict[str, Any]]] = []
        used: list[int] = []
        for f in features:
            n = len(f["input_ids"])
            slot = first_fit(used, n, self.row_tokens)
            if slot == len(used):
                rows.append([f])
                used.append(n)
            else:
                rows[slot].append(f)
                used[slot] += n
        return rows

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = self._rows(features)
        width = max(sum(len(f["input_ids"]) for f in row) for row in rows)
        input_ids, labels, positions, lengths = [], [], [], []  # type: ignore[var-annotated]
        for row in rows:
            ids: list[int] = []
            lab: list[int] = []
            pos: list[int] = []
            for f in row:
                ids += f["input_ids"]
                lab += [IGNORE_INDEX, *f["labels"][1:]]
                pos += range(len(f["input_ids"]))
                lengths.append(len(f["input_ids"]))
            filler = width - len(ids)
            if filler:
                ids += [self.pad_token_id] * filler
                lab += [IGNORE_INDEX] * filler
                pos += range(filler)
                lengths.append(filler)
            input_ids.append(ids)
            labels.append(lab)
            positions.append(pos)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }
        if self.varlen_kwargs:
            bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            batch |= {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
                      "max_length_q": max(lengths), "max_length_k": max(lengths)}  # fmt: skip
        return batch


def real_tokens(batch: dict[str, torch.Tensor], pad_token_id: int) -> torch.Tensor:
    """The tokens of a packed batch that belong to samples, not to a row's filler segment (a
    tensor on the batch's device: counting reads nothing back to the host).

    The Trainer counts a batch without attention mask as ``input_ids != pad``, which drops every
    real end-of-turn token when the tokenizer pads with its EOS (no pad token of its own). A
    filler is a row's last segment (positions restarting at 0) of pad tokens with no label; no
    kept sample looks like that, as every one has a trained token after its first.
    """
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    index = torch.arange(ids.shape[1], device=ids.device)
    start = torch.where(positions == 0, index, -1).amax(dim=1)  # where each row's last segment starts
    tail = index >= start[:, None]
    filler = ((labels == IGNORE_INDEX) | ~tail).all(dim=1) & ((ids == pad_token_id) | ~tail).all(dim=1)
    return torch.where(filler, start, ids.shape[1]).sum()


def _loss(model: Any, batch: dict[str, torch.Tensor]) -> float:
    device = next(model.parameters()).device
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return float(model(**moved, use_cache=False).loss)


# How many samples from the start of the train split the packing check picks its batches from.
GUARD_SCAN = 1024


def guard_batches(samples: Any, packed_collator: Any, batch_size: int, batches: int) -> list[list[dict[str, Any]]]:
    """The batches the packing check compares: built so that samples share packed rows, or the
    check would compare nothing (a row of one sample is exact under any attention).

    They hold the shortest of the first ``GUARD_SCAN`` samples, in file order (with rows of
    ``row_tokens``, a file that starts with long samples put one per row), each cut to half a row
    at most, so that any two share one. A sample left without a trained token is not used: its
    loss is undefined.
    """
    scanned = min(len(samples), GUARD_SCAN)
    lengths = [len(samples[i]["input_ids"]) for i in range(scanned)]
    row_tokens = getattr(packed_collator, "row_tokens", None)
    picked: dict[int, dict[str, Any]] = {}
    for i in sorted(range(scanned), key=lambda i: lengths[i]):
        if len(picked) == batch_size * batches:
            break
        row = samples[i]
        feature = {key: row[key] for key in ("input_ids", "labels")}
        if row_tokens is not None:
            feature = {key: value[: row_tokens // 2] for key, value in feature.items()}
        if loss_terms(feature["labels"]):
            picked[i] = feature
    in_order = [picked[i] for i in sorted(picked)]
    out = [in_order[start : start + batch_size] for start in range(0, len(in_order), batch_size)]
    return [features for features in out if len(features) >= 2]


def check_packing(model: Any, samples: Any, padded_collator: Any, packed_collator: Any, batch_size: int,
                  batches: int = 2, rtol: float | None = None) -> list[tuple[float, float]]:  # fmt: skip
    """Packed vs padded loss on ``batches`` batches of real samples that share packed rows
    (``guard_batches``), in eval mode (no dropout); DistributedSetupError when they differ by more
    than ``rtol`` (relative; by default 1e-4 in float32 and 5e-3 in 16-bit or autocast, whose rounding differs
    between the two batch shapes and kernels; a model that lets samples see each other is off by
    far more on trained weights). No pairs: fewer than two samples with a trained token."""
    if rtol is None:
        device = next(model.parameters()).device.type
        float32 = getattr(model, "dtype", torch.float32) == torch.float32 and not torch.is_autocast_enabled(device)
        rtol = 1e-4 if float32 else 5e-3
    was_training = model.training
    model.eval()
    pairs = []
    try:
        with torch.no_grad():
            for features in guard_batches(samples, packed_collator, batch_size, batches):
                with _attention_that_takes_padding(model):
                    padded = _loss(model, padded_collator(features))
                pairs.append((padded, _loss(model, packed_collator(features))))
    finally:
        model.train(was_training)
    for padded, packed in pairs:
        if not math.isfinite(padded) or not math.isfinite(packed):
            raise DistributedSetupError(
                f"train.packing=true: the packing check's losses on real batches are not finite (padded {padded}, "
                f"packed {packed}); the model's outputs overflow before training starts"
            )
        if abs(packed - padded) > rtol * max(abs(padded), 1e-8):
            raise DistributedSetupError(
                f"train.packing=true refused: on real batches the packed loss ({packed:.6f}) differs from the "
                f"padded loss ({padded:.6f}), so this model lets packed samples see each other (attention or "
                "recurrent layers that take sample boundaries only from the attention mask, as MiniCPM-SALA's "
                "linear attention does); set train.packing=false"
            )
    return pairs


@contextlib.contextmanager
def _attention_that_takes_padding(model: Any) -> Iterator[None]:
    """The padded reference pass with sdpa when the model's kernel is ``sala_varlen``, which takes
    sample boundaries from packed batches only (a padded batch is what it refuses)."""
    from sala_train.attention import VARLEN

    if getattr(model.config, "_attn_implementation", None) != VARLEN:
        yield
        return
    model.set_attn_implementation("sdpa")
    if model.config._attn_implementation != "sdpa":  # transformers only warns for remote code it cannot switch
        model.set_attn_implementation(VARLEN)
        raise DistributedSetupError(
            "train.packing=true with model.attn_implementation=sala_varlen: the packing check compares with "
            "padded batches, which need sdpa, and this model cannot switch its attention at run time; "
            "use model.attn_implementation=sdpa (packed batches with a block-diagonal mask)"
        )
    try:
        yield
    finally:
        model.set_attn_implementation(VARLEN)
