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
import itertools
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
    costs the square of the row length, so short rows keep packing cheaper than padding. The
    filler's positions stop at the longest sample's last: RoPE scalings that pick their
    frequencies from the batch's largest position (longrope, dynamic) must see the padded batch's.
    """

    pad_token_id: int = 0
    row_tokens: int | None = None
    varlen_kwargs: bool = False

    def _rows(self, features: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        slots, used = self._slots([len(f["input_ids"]) for f in features])
        rows: list[list[dict[str, Any]]] = [[] for _ in used]
        for slot, f in zip(slots, features, strict=True):
            rows[slot].append(f)
        return rows

    def _slots(self, lengths: list[int]) -> tuple[list[int], list[int]]:
        """The row each sample goes to, in order, and each row's tokens."""
        if self.row_tokens is None:
            return [0] * len(lengths), [sum(lengths)]
        used: list[int] = []
        slots = []
        for n in lengths:
            slot = first_fit(used, n, self.row_tokens)
            if slot == len(used):
                used.append(0)
            used[slot] += n
            slots.append(slot)
        return slots, used

    def cells(self, lengths: list[int]) -> int:
        """The token positions of the batch of samples of ``lengths``, as ``__call__`` builds it
        (sala-data's padding figure, without building every batch)."""
        _, used = self._slots(lengths)
        return len(used) * max(used)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = self._rows(features)
        width = max(sum(len(f["input_ids"]) for f in row) for row in rows)
        longest = max(len(f["input_ids"]) for f in features)
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
                pos += (min(i, longest - 1) for i in range(filler))
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
    start, filler = _last_segments(batch, pad_token_id)
    return torch.where(filler, start, batch["input_ids"].shape[1]).sum()


def sample_lengths(batch: dict[str, torch.Tensor], pad_token_id: int) -> torch.Tensor:
    """Each token's own sample's length (0 for a row's filler), shaped as ``input_ids``."""
    positions = batch["position_ids"]
    rows, width = positions.shape
    segment = (positions == 0).cumsum(dim=1) - 1  # (every row starts a sample at 0)
    flat = segment + torch.arange(rows, device=positions.device)[:, None] * width
    lengths = torch.bincount(flat.flatten(), minlength=rows * width)[flat]
    start, filler = _last_segments(batch, pad_token_id)
    in_filler = filler[:, None] & (torch.arange(width, device=positions.device) >= start[:, None])
    return lengths.masked_fill(in_filler, 0)


def _last_segments(batch: dict[str, torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's last segment starts (positions restarting at 0), and whether it is the
    row's filler (see ``real_tokens``)."""
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    index = torch.arange(ids.shape[1], device=ids.device)
    start = torch.where(positions == 0, index, -1).amax(dim=1)
    tail = index >= start[:, None]
    filler = ((labels == IGNORE_INDEX) | ~tail).all(dim=1) & ((ids == pad_token_id) | ~tail).all(dim=1)
    return start, filler


def _on_device(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward(model: Any, batch: dict[str, Any]) -> Any:
    try:
        return model(**_on_device(model, batch), use_cache=False)
    except TypeError as exc:
        if "position_ids" not in str(exc):
            raise
        raise DistributedSetupError(
            f"train.packing=true refused: this model's forward takes no position_ids ({exc}), which tell it where "
            "each packed sample starts; set train.packing=false"
        ) from None


def _loss(model: Any, batch: dict[str, torch.Tensor]) -> float:
    return float(_forward(model, batch).loss)


def _first_and_last_samples(batch: dict[str, torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of each row's first and last sample, in rows that hold two or more (a row's
    filler segment is no sample)."""
    ids, positions = batch["input_ids"], batch["position_ids"]
    _, filler = _last_segments(batch, pad_token_id)
    first, last = (torch.zeros_like(ids, dtype=torch.bool) for _ in range(2))
    for row in range(ids.shape[0]):
        starts = [*(positions[row] == 0).nonzero().flatten().tolist(), ids.shape[1]]
        segments = list(itertools.pairwise(starts))
        if len(segments) > 1 and bool(filler[row]):
            segments.pop()
        if len(segments) > 1:
            first[row, segments[0][0] : segments[0][1]] = True
            last[row, segments[-1][0] : segments[-1][1]] = True
    return first, last


@dataclass(frozen=True)
class Movement:
    """How far logits move over a set of tokens: the largest change, and the 90th percentile of
    each token's largest change (how far the tenth of the tokens that move most move, at least)."""

    largest: float
    typical: float

    @staticmethod
    def of(a: torch.Tensor, b: torch.Tensor) -> Movement:
        per_token = (a - b).abs().amax(dim=-1)
        return Movement(float(per_token.max()), float(per_token.quantile(0.9)))


# In a MoE model under 16 bits, other content changes the experts' loads and so their rounding,
# which sends a few tokens to other experts; each such token moves the later tokens of its sample
# by about a unit in the last place. There, a leak must move the tokens by more than this part of
# the largest logit (8 units in the last place of bf16); smaller leaks show only in float32.
MOE_16_BIT_FLOOR = 2**-5


@dataclass(frozen=True)
class Leak:
    """How far the logits of each row's last sample move when every other token changes (every
    length, position and boundary kept): ``moved``; against how far they move when the same batch
    runs again (``rerun``: kernels that differ from run to run), and how far each row's first
    sample moves when every other token changes (``control``: a causal model's first sample sees
    no other, so this is the rounding that other content brings, as in MoE layers); and the
    logits' scale."""

    moved: Movement
    rerun: Movement
    control: Movement
    scale: float

    def verdict(self, rtol: float, sixteen_bit: bool = False, experts: bool = False) -> str | None:
        """How the last samples moved, in words, when that is a leak; None when it is not.
        ``rtol``: less than this part of the largest logit is rounding; ``experts``: a MoE model."""
        if not experts and self.rerun.largest == 0:  # (a dense model: not a bit moves)
            if self.moved.largest > rtol * self.scale:
                return f"by up to {self.moved.largest:.3g}, of {self.scale:.3g}"
            return None
        floor = (max(rtol, MOE_16_BIT_FLOOR) if experts and sixteen_bit else rtol) * self.scale
        noise = max(self.rerun.typical, self.control.typical)
        if self.moved.typical > max(4 * noise, floor):
            return (f"a tenth of their tokens by more than {self.moved.typical:.3g}, of {self.scale:.3g}, where a "
                    f"row's first sample's move by {self.control.typical:.3g} and a rerun's by "
                    f"{self.rerun.typical:.3g}")  # fmt: skip
        return None


# What transformers' MoE configs call their expert count (Mixtral, Qwen-MoE, DeepSeek; DBRX in its
# ffn_config).
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def has_experts(model: Any) -> bool:
    def found(config: dict[str, Any], depth: int = 0) -> bool:
        for key, value in config.items():
            if key in EXPERT_COUNTS and isinstance(value, int) and value > 1:
                return True
            if isinstance(value, dict) and depth < 3 and found(value, depth + 1):
                return True
        return False

    return found(model.config.to_dict())


def leak(model: Any, batch: dict[str, torch.Tensor], pad_token_id: int) -> Leak | None:
    """None when no sample comes after another in a row. Attention that takes sample boundaries
    from the positions computes a sample from its own tokens only, with the same operations on
    the same shapes whatever the others hold, so a dense model's logits do not move at all; a leak
    moves them however small the weights (a batch's mean loss dilutes it below any tolerance for
    random weights, a model trained from scratch, or 16-bit rounding). Where other content moves
    logits by rounding (MoE), see ``Leak.verdict``."""
    first, last = _first_and_last_samples(batch, pad_token_id)
    if not last.any():
        return None
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None) or model.config.vocab_size
    other = (batch["input_ids"] + 1) % vocab
    kept_last = {**batch, "input_ids": torch.where(last, batch["input_ids"], other)}
    kept_first = {**batch, "input_ids": torch.where(first, batch["input_ids"], other)}
    kept = []  # (each pass's logits of the first and the last samples only: a vocabulary of 256k is large)
    for inputs in (batch, batch, kept_last, kept_first):
        logits = _forward(model, {k: v for k, v in inputs.items() if k != "labels"}).logits
        at_first, at_last = first.to(logits.device), last.to(logits.device)
        kept.append((logits[at_first].float(), logits[at_last].float()))
        del logits
    (first0, last0), (_, last_again), (_, last_kept), (first_kept, _) = kept
    return Leak(Movement.of(last_kept, last0), Movement.of(last_again, last0), Movement.of(first_kept, first0),
                float(last0.abs().max()))  # fmt: skip


# How many samples from the start of the train split the packing check picks its batches from.
GUARD_SCAN = 1024


def guard_batches(samples: Any, packed_collator: Any, batch_size: int, batches: int) -> list[list[dict[str, Any]]]:
    """The batches the packing check compares: built so that samples share packed rows, or the
    check would compare nothing (a row of one sample is exact under any attention).

    They hold the shortest of the first ``GUARD_SCAN`` samples, in file order (with rows of
    ``row_tokens``, a file that starts with long samples put one per row), each cut to half a row
    at most, so that any two share one. (A sample the cut leaves without a trained token still
    shows a leak in its logits; only the loss comparison needs one in the batch.)
    """
    scanned = min(len(samples), GUARD_SCAN)
    lengths = [len(samples[i]["input_ids"]) for i in range(scanned)]
    row_tokens = getattr(packed_collator, "row_tokens", None)
    picked = sorted(sorted(range(scanned), key=lambda i: lengths[i])[: batch_size * batches])
    features = [{key: samples[i][key] for key in ("input_ids", "labels")} for i in picked]
    if row_tokens is not None:
        features = [{key: value[: row_tokens // 2] for key, value in f.items()} for f in features]
    out = [features[start : start + batch_size] for start in range(0, len(features), batch_size)]
    return [batch for batch in out if len(batch) >= 2]


@dataclass(frozen=True)
class PackingCheck:
    """What the packing check measured: padded/packed loss pairs (batches with a trained token) and
    the leak measured on each batch."""

    losses: list[tuple[float, float]]
    leaks: list[Leak]


SIXTEEN_BIT_LOSS_ATOL = 2e-3


def check_packing(model: Any, samples: Any, padded_collator: Any, packed_collator: Any, batch_size: int,
                  batches: int = 2, rtol: float | None = None) -> PackingCheck:  # fmt: skip
    """Packed vs padded on ``batches`` batches of real samples that share packed rows
    (``guard_batches``), in eval mode (no dropout); DistributedSetupError when a sample's logits
    move with the other samples in its row (``leak``), or the losses differ by more than ``rtol``
    (relative; by default 1e-4 in float32 and 5e-3 in 16-bit or autocast, whose rounding differs
    between the two batch shapes and kernels, there at least ``SIXTEEN_BIT_LOSS_ATOL``: this catches
    positions the model does not restart).
    No batches: fewer than two samples, which no packed row can mix."""
    device = next(model.parameters()).device.type
    float32 = getattr(model, "dtype", torch.float32) == torch.float32 and not torch.is_autocast_enabled(device)
    if rtol is None:
        rtol = 1e-4 if float32 else 5e-3
    # In 16 bits, also an absolute floor: a pretrained model's loss can be low (0.3), where 5e-3 of
    # it is the size of the rounding that the two kernels and batch shapes leave over 30-odd layers
    # (a position that does not restart moves the loss by far more; the leak test sees the rest).
    atol = 0.0 if float32 else SIXTEEN_BIT_LOSS_ATOL
    # The same operations on the same shapes do not move logits at all; allowed: less than one unit
    # in the last place of the largest, and 4x what a rerun moves them (kernels with atomics, such
    # as CUDA's index_add in MoE layers, differ from run to run).
    leak_rtol = 1e-6 if float32 else 2**-8
    pad = getattr(packed_collator, "pad_token_id", None)
    pad = -1 if pad is None else pad  # (no filler to tell apart)
    experts = has_experts(model)
    was_training = model.training
    model.eval()
    pairs, leaks, moved = [], [], None
    try:
        with torch.no_grad():
            # Every batch runs whatever the first shows: under ZeRO-3 each forward gathers weights
            # with the other ranks, so each rank must run as many (a refusal is raised after them).
            for features in guard_batches(samples, packed_collator, batch_size, batches):
                packed_batch = packed_collator(features)
                found = leak(model, packed_batch, pad)
                how = found.verdict(leak_rtol, not float32, experts) if found is not None else None
                moved = moved or how
                leaks += [found] if found is not None else []
                if not any(loss_terms(f["labels"]) for f in features):
                    continue  # (no loss to compare: every label cut off)
                with _attention_that_takes_padding(model):
                    padded = _loss(model, padded_collator(features))
                pairs.append((padded, _loss(model, packed_batch)))
    finally:
        model.train(was_training)
    if moved is not None:
        raise DistributedSetupError(
            f"train.packing=true refused: on real batches packed samples' logits move ({moved}) when the "
            "samples before them in their rows change, so this model lets packed samples see each other "
            "(attention or recurrent layers that take sample boundaries only from the attention mask, as "
            "MiniCPM-SALA's linear attention does); set train.packing=false"
        )
    for padded, packed in pairs:
        if not math.isfinite(padded) or not math.isfinite(packed):
            raise DistributedSetupError(
                f"train.packing=true: the packing check's losses on real batches are not finite (padded {padded}, "
                f"packed {packed}); the model's outputs overflow before training starts"
            )
        if abs(packed - padded) > max(rtol * abs(padded), atol, 1e-8 * rtol):
            raise DistributedSetupError(
                f"train.packing=true refused: on real batches the packed loss ({packed:.6f}) differs from the "
                f"padded loss ({padded:.6f}), so this model lets packed samples see each other or does not restart "
                "their positions (attention or recurrent layers that take sample boundaries only from the attention "
                "mask, as MiniCPM-SALA's linear attention does); set train.packing=false"
            )
    return PackingCheck(pairs, leaks)


@contextlib.contextmanager
def _attention_that_takes_padding(model: Any) -> Iterator[None]:
    """The padded reference pass with sdpa when the model's kernel is ``sala_varlen``, which takes
    sample boundaries from packed batches only (a padded batch is what it refuses)."""
    from sala_train.attention import VARLEN

    if getattr(model.config, "_attn_implementation", None) != VARLEN:
        yield
        return
    try:
        model.set_attn_implementation("sdpa")
    except ValueError:  # (a model without sdpa, such as Gemma 2: eager takes padding as well)
        model.set_attn_implementation("eager")
    if model.config._attn_implementation not in ("sdpa", "eager"):  # transformers only warns for remote code
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
