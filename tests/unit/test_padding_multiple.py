"""``train.pad_to_multiple_of``: padded batch widths rounded up (64 on a GPU by default) so a GPU
meets few batch shapes; never past ``dataset.cutoff_len`` or the model's positions, with the same
loss, and costed as built by the token budget and sala-data."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from sala_train.data.collators import GPU_PAD_MULTIPLE, PadToLongestCollator, padding_multiple
from tests.unit.test_packing import samples, tiny_model  # noqa: F401  (samples: a fixture)


def expected_width(longest: int, multiple: int | None, cap: int | None) -> int:
    """Counted up one position at a time, apart from the collator's arithmetic."""
    if not multiple:
        return longest
    width = longest
    while width % multiple:
        width += 1
    if cap is not None and width > cap:
        width = max(cap, longest)
    return width


@pytest.mark.parametrize("multiple,cap", [(None, None), (16, None), (16, 100), (64, 1000), (7, 50)])
def test_a_batch_is_as_wide_as_its_longest_sample_rounded_up_within_the_cap(multiple, cap):
    collate = PadToLongestCollator(0, pad_to_multiple_of=multiple, max_width=cap)
    rng = random.Random(0)
    for longest in range(1, 130):
        lengths = [longest, *(rng.randint(1, longest) for _ in range(rng.randint(0, 3)))]
        features = [{"input_ids": [5] * n, "labels": [6] * n} for n in lengths]
        batch = collate(features)
        width = expected_width(longest, multiple, cap)
        assert batch["input_ids"].shape == (len(lengths), width), (longest, multiple, cap)
        # every added position is padding: masked, not trained, the pad id
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths
        assert (batch["labels"] != -100).sum(dim=1).tolist() == lengths
        assert int((batch["input_ids"] == 0).sum()) == len(lengths) * width - sum(lengths)
        assert collate.cells(lengths) == batch["input_ids"].numel()


def run_cfg(multiple: int | None = None, attn: str = "sdpa", budget: int | None = None, cutoff: int = 4096):
    train = SimpleNamespace(pad_to_multiple_of=multiple, max_tokens_per_batch=budget, packing=False)
    return SimpleNamespace(train=train, model=SimpleNamespace(attn_implementation=attn),
                           dataset=SimpleNamespace(cutoff_len=cutoff), stage=SimpleNamespace(name="dpo"))  # fmt: skip


def test_the_default_rounds_sdpa_batches_of_a_fixed_size_on_a_gpu_only(monkeypatch):
    """flash_attention_2 and eager build nothing per shape; token-budget groups are sized by the
    multiple, and a mid-epoch resume must find them again on any machine: the setting alone decides."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert padding_multiple(run_cfg()) == GPU_PAD_MULTIPLE == 64
    for attn in ("flash_attention_2", "eager"):
        assert padding_multiple(run_cfg(attn=attn)) is None
    assert padding_multiple(run_cfg(budget=8192)) is None
    assert padding_multiple(run_cfg(8, budget=8192)) == 8 and padding_multiple(run_cfg(8, attn="eager")) == 8
    assert padding_multiple(run_cfg(1)) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert padding_multiple(run_cfg()) is None and padding_multiple(run_cfg(128)) == 128


def test_rounding_changes_neither_the_loss_nor_the_gradients(samples, tokenizer):  # noqa: F811
    """The added positions are padding only: a real model's loss and gradients on the demo's
    samples are those of the batch padded to its longest (sdpa with the padding mask)."""
    features = [samples[i] for i in range(6)]
    results = []
    for collate in (PadToLongestCollator(tokenizer.pad_token_id),
                    PadToLongestCollator(tokenizer.pad_token_id, pad_to_multiple_of=64, max_width=512)):  # fmt: skip
        batch = collate(features)
        model = tiny_model()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results.append((batch["input_ids"].shape[1], loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain_width, plain_loss, plain_grads), (wide_width, wide_loss, wide_grads) = results
    assert wide_width % 64 == 0 and wide_width > plain_width
    torch.testing.assert_close(wide_loss, plain_loss, rtol=1e-6, atol=0)
    for wide, plain in zip(wide_grads, plain_grads, strict=True):
        torch.testing.assert_close(wide, plain, rtol=1e-5, atol=1e-7)


def test_the_token_budget_counts_the_rounded_width():
    """Costed at the samples' longest, groups overshot the budget once rounded up."""
    from sala_train.data.batching import budget_groups

    rng = random.Random(0)
    lengths = [rng.randint(20, 500) for _ in range(400)]
    features = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    collate = PadToLongestCollator(0, pad_to_multiple_of=64, max_width=512)

    def cells(groups: list[list[int]]) -> list[int]:
        return [collate([features[i] for i in g])["input_ids"].numel() for g in groups]

    rounded = budget_groups(lengths, 2048, False, seed=1, width=collate.width_of)
    assert sorted(i for g in rounded for i in g) == list(range(len(lengths)))
    assert max(cells(rounded)) <= 2048 and sum(cells(rounded)) / len(rounded) > 0.7 * 2048
    assert max(cells(budget_groups(lengths, 2048, False, seed=1))) > 2048  # (the longest alone overshoots)


@pytest.mark.parametrize("cutoff,positions,width", [(1000, None, 1000), (4096, 1000, 1000), (4096, 2048, 1024),
                                                    (1000, 4096, 1000)])  # fmt: skip
def test_the_run_rounds_within_the_cutoff_and_the_models_positions(tokenizer, cutoff, positions, width):
    """Learned position embeddings end at the model's positions: a width past them would index past
    their end (padding's positions count too)."""
    from sala_train.stages.sft import batch_collator

    features = [{"input_ids": [3] * 990, "labels": [3] * 990}]
    text = SimpleNamespace(max_position_embeddings=positions)
    assert batch_collator(run_cfg(64, cutoff=cutoff), tokenizer, text)(features)["input_ids"].shape[1] == width  # type: ignore[arg-type]


def test_preference_pairs_are_rounded_only_where_the_width_stays_within_the_positions(monkeypatch, capsys):
    """TRL's preference collators round without a cap: the multiple is passed to them only where the
    longest pair rounded up stays within the model's positions and no RoPE scaling reads the width;
    set explicitly, its dropping is said."""
    from sala_train.stages.preference import _pair_padding_multiple

    def model(positions: int | None, rope: dict | None = None) -> SimpleNamespace:
        text = SimpleNamespace(max_position_embeddings=positions, rope_parameters=rope)
        return SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))

    assert _pair_padding_multiple(run_cfg(64, cutoff=1000), model(1024)) == 64
    assert _pair_padding_multiple(run_cfg(64), model(None)) == 64
    assert _pair_padding_multiple(run_cfg(64), model(4096, {"rope_type": "llama3", "factor": 8.0})) == 64
    assert capsys.readouterr().out == ""
    assert _pair_padding_multiple(run_cfg(64, cutoff=1000), model(1000)) is None
    assert "train.pad_to_multiple_of=64 not applied: TRL's dpo collator rounds with no cap, and a 1000-token pair " \
        "would be padded past the model's 1000 positions" in capsys.readouterr().out  # fmt: skip
    longrope = {"rope_type": "longrope", "original_max_position_embeddings": 4096}
    assert _pair_padding_multiple(run_cfg(64), model(131072, longrope)) is None
    assert "the model's RoPE scaling reads the batch's width (past 4096 positions)" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _pair_padding_multiple(run_cfg(None), model(4096)) == 64
    assert _pair_padding_multiple(run_cfg(None, cutoff=1000), model(1000)) is None
    assert capsys.readouterr().out == ""  # (the default is dropped without a word: nothing was asked)


@pytest.mark.parametrize("rope", [{"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [4.0] * 4,
                                   "original_max_position_embeddings": 128},
                                  {"rope_type": "dynamic", "factor": 4.0}])  # fmt: skip
def test_rounding_never_changes_the_frequencies_of_a_rope_scaling_that_reads_the_width(tokenizer, rope):
    """LongRoPE switches every token to its long factors once the batch's width passes its original
    positions, dynamic NTK rescales by the width past them: a width rounded across (48: 120 -> 144)
    moved the logits of the real tokens. Rounding stops at the threshold, and batches past it keep
    their exact width: the logits are those of the batch padded to its longest, whatever the multiple."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sala_train.stages.sft import batch_collator

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_parameters={"rope_theta": 10000.0, **rope})  # fmt: skip
    if rope["rope_type"] == "longrope":
        config.max_position_embeddings = 4096  # (longrope's threshold: original_max_position_embeddings)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    text = model.config.get_text_config()
    rng = random.Random(0)
    for lengths in ([120, 60], [127, 3], [150, 90]):
        features = [{"input_ids": [rng.randrange(3, 900) for _ in range(n)], "labels": [1] * n} for n in lengths]
        exact = batch_collator(run_cfg(1, cutoff=4096), tokenizer, text)(features)
        with torch.no_grad():
            reference = model(**{k: v for k, v in exact.items() if k != "labels"}, use_cache=False).logits
        for multiple in (48, 64, 100):
            batch = batch_collator(run_cfg(multiple, cutoff=4096), tokenizer, text)(features)
            if max(lengths) > 128:
                assert batch["input_ids"].shape[1] == max(lengths)  # (past the threshold: exact)
            with torch.no_grad():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
            for row, n in enumerate(lengths):
                torch.testing.assert_close(logits[row, :n], reference[row, :n], rtol=0, atol=1e-5)


def test_the_multiple_decides_a_mid_epoch_resume_only_with_a_token_budget():
    from sala_train.config.validate import DATA_ORDER_KEYS, _applies

    assert "train.pad_to_multiple_of" in DATA_ORDER_KEYS
    budget, plain = {"train": {"max_tokens_per_batch": 4096}}, {"train": {"max_tokens_per_batch": None}}
    assert _applies("train.pad_to_multiple_of", budget, plain) and _applies("train.pad_to_multiple_of", plain, budget)
    assert not _applies("train.pad_to_multiple_of", plain, plain)


def test_neftune_noise_on_a_token_does_not_depend_on_the_padding_after_it(samples, tokenizer):  # noqa: F811
    """The noise was drawn over the whole (rows, width, hidden) tensor, so rounding the width gave
    every row after the first other draws: a GPU run and a CPU run of the same seed trained on
    different noise. Drawn up to the last real token, it is the same for any padding after it."""
    from sala_train.neftune import NoisyEmbeddings

    features = [samples[i] for i in range(4)]
    model = tiny_model().train()
    neftune = NoisyEmbeddings(model, 5.0, tokenizer.pad_token_id, seed=7)
    lengths = [len(f["input_ids"]) for f in features]
    logits = []
    for multiple in (None, 64):
        batch = PadToLongestCollator(tokenizer.pad_token_id, pad_to_multiple_of=multiple, max_width=512)(features)
        with torch.no_grad(), neftune.during(batch, rank=0, step=3, micro_batch=1):
            logits.append(model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits)
    assert logits[1].shape[1] > logits[0].shape[1]
    for row, n in enumerate(lengths):
        torch.testing.assert_close(logits[1][row, :n], logits[0][row, :n], rtol=0, atol=1e-5)
    with torch.no_grad():  # (the noise is there: without it the logits differ)
        plain = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    assert (plain[0, : lengths[0]] - logits[1][0, : lengths[0]]).abs().max() > 1e-3
