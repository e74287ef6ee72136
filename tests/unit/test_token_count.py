"""The tokens-seen count, read back only where it is logged or saved, equals the Trainer's own."""

from __future__ import annotations

import json

import pytest
import torch

from sala_train.data.chat import IGNORE_INDEX
from sala_train.data.collators import PadToLongestCollator
from sala_train.packing import PackedCollator, real_tokens
from sala_train.stages.flops import CachedFlops
from sala_train.stages.token_count import DeferredTokenCount
from tests.conftest import TINY_CHAT


def _real_tokens_row_by_row(batch: dict[str, torch.Tensor], pad: int) -> int:
    """The definition, one row at a time: a row's last segment (from its last position 0) is
    filler when it is all pad and trains nothing; every other token is a sample's."""
    total = 0
    for ids, labels, positions in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                      batch["position_ids"].tolist(), strict=True):  # fmt: skip
        start = max(i for i, p in enumerate(positions) if p == 0)
        filler = all(t == IGNORE_INDEX for t in labels[start:]) and all(t == pad for t in ids[start:])
        total += start if filler else len(ids)
    return total


@pytest.mark.parametrize("row_tokens", [None, 7, 12, 40])
def test_packed_real_tokens_match_the_row_by_row_definition(row_tokens):
    generator = torch.Generator().manual_seed(row_tokens or 0)
    pad = 0
    for _ in range(20):
        features = []
        for _ in range(int(torch.randint(1, 9, (1,), generator=generator))):
            n = int(torch.randint(2, 8, (1,), generator=generator))
            ids = torch.randint(0, 4, (n,), generator=generator).tolist()  # pad (0) inside samples too
            labels = [IGNORE_INDEX, *ids[1:]] if n > 2 else [IGNORE_INDEX, 3]
            features.append({"input_ids": ids, "labels": labels[:n]})
        batch = PackedCollator(pad_token_id=pad, row_tokens=row_tokens)(features)
        got = real_tokens(batch, pad)
        assert isinstance(got, torch.Tensor)
        assert int(got) == _real_tokens_row_by_row(batch, pad) == sum(len(f["input_ids"]) for f in features)


def _trainer_class(deferred: bool):
    from transformers import Trainer

    return type("Counted", (DeferredTokenCount, CachedFlops, Trainer), {}) if deferred else Trainer


def _train_and_count(tmp_path, deferred: bool, collator, tokenizer) -> tuple[list[int], list[int], float]:
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).float()
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(48):
        n = int(torch.randint(3, 40, (1,), generator=generator))
        ids = torch.randint(0, 12, (n,), generator=generator).tolist()  # the pad id (0) inside samples too
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]]})
    out = tmp_path / ("deferred" if deferred else "stock")
    args = TrainingArguments(output_dir=str(out), max_steps=7, per_device_train_batch_size=3,
                             gradient_accumulation_steps=2, logging_steps=3, save_steps=2, save_strategy="steps",
                             include_num_input_tokens_seen="non_padding", report_to=[], use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, seed=0)  # fmt: skip
    trainer = _trainer_class(deferred)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                       data_collator=collator, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    logged = [entry["num_input_tokens_seen"] for entry in trainer.state.log_history if "num_input_tokens_seen" in entry]
    saved = [json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["num_input_tokens_seen"]
             for step in (2, 4, 6)]  # fmt: skip
    return logged, saved, trainer.state.total_flos


def test_padded_counts_logged_and_saved_are_the_trainers_own(tmp_path, tokenizer):
    """Logs at steps 1, 3, 6 and the summary; checkpoints at 2, 4, 6 (between logs): with gradient
    accumulation, every count shown or saved is the stock Trainer's (which reads it back at every
    micro-batch); so is the FLOP count (its weights counted once, not at every micro-batch)."""
    collator = PadToLongestCollator(pad_token_id=tokenizer.pad_token_id)
    stock = _train_and_count(tmp_path, False, collator, tokenizer)
    deferred = _train_and_count(tmp_path, True, collator, tokenizer)
    assert deferred == stock and len(stock[0]) >= 3 and stock[1][0] < stock[1][1] < stock[1][2], stock


def test_packed_counts_are_every_sample_token_when_samples_hold_the_pad_id(tmp_path, tokenizer):
    """Packed rows padded with an id the samples use too (a tokenizer that pads with its EOS): the
    count is the samples' own tokens (the stock Trainer's ``input_ids != pad`` drops each such
    token); checked against the padded layout's count, which its attention mask gives."""
    padded = _train_and_count(tmp_path / "padded", False, PadToLongestCollator(pad_token_id=0), tokenizer)
    packed = _train_and_count(tmp_path / "packed", True, PackedCollator(pad_token_id=0, row_tokens=64), tokenizer)
    assert packed[:2] == padded[:2]
