"""Packing: packed and padded batches give the same loss and gradients; leaking models are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from sala_train.config.schema import DatasetConfig, SftStage
from sala_train.data.build import build_data
from sala_train.data.chat import IGNORE_INDEX
from sala_train.data.collators import PadToLongestCollator
from sala_train.errors import DistributedSetupError
from sala_train.packing import PackedCollator, check_packing, guard_batches, real_tokens
from tests.conftest import TINY_CHAT

DEMO = TINY_CHAT.parents[1] / "data" / "demo_chat"


@pytest.fixture(scope="module")
def samples(tokenizer):
    cfg = DatasetConfig(name="demo", train=[str(DEMO / "train.jsonl")], validation=[str(DEMO / "validation.jsonl")],
                        cutoff_len=512, max_samples=8)  # fmt: skip
    return build_data(SftStage(), cfg, tokenizer).splits["train"]


def tiny_model(attn: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY_CHAT)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float()


def test_packed_collator_layout():
    features = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}]
    batch = PackedCollator(varlen_kwargs=True)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]  # no loss across the boundary
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["max_length_q"] == 3
    assert "attention_mask" not in batch  # boundaries come from positions, not a padding mask


def test_packed_rows_with_a_filler_segment():
    features = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]},
                {"input_ids": [4], "labels": [4]}]  # fmt: skip
    batch = PackedCollator(pad_token_id=0, row_tokens=4, varlen_kwargs=True)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 4], [8, 9, 0, 0]]  # first fit: [4] joins the first row
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]  # the filler is its own segment
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX],
        [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX],  # the filler trains nothing
    ]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4, 6, 8]


@pytest.mark.parametrize("row_tokens", [None, 300], ids=["one-row", "rows-of-300"])
def test_a_packed_batch_counts_every_real_token_when_pad_is_eos(samples, tokenizer, row_tokens):
    """A tokenizer without a pad token pads with EOS: the filler and the real end-of-turn tokens
    then share an id, and only the filler is left out of the tokens seen."""
    eos = tokenizer.eos_token_id
    features = [samples[i] for i in range(8)]
    batch = PackedCollator(pad_token_id=eos, row_tokens=row_tokens)(features)
    has_filler = (batch["input_ids"] == eos).sum() > sum(f["input_ids"].count(eos) for f in features)
    assert has_filler == (row_tokens is not None)
    assert real_tokens(batch, eos) == sum(len(f["input_ids"]) for f in features)
    assert int((batch["input_ids"] != eos).sum()) < real_tokens(batch, eos)  # the Trainer's own count


@pytest.mark.parametrize("row_tokens", [None, 300], ids=["one-row", "rows-of-300"])
def test_packed_and_padded_loss_and_gradients_are_equal(samples, tokenizer, row_tokens):
    features = [samples[i] for i in range(6)]
    padded_model, packed_model = tiny_model(), tiny_model()
    padded = padded_model(**PadToLongestCollator(tokenizer.pad_token_id)(features), use_cache=False).loss
    collator = PackedCollator(tokenizer.pad_token_id, row_tokens=row_tokens)
    assert row_tokens is None or collator(features)["input_ids"].shape[0] > 1
    packed = packed_model(**collator(features), use_cache=False).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=0)
    padded.backward()
    packed.backward()
    for (name, a), (_, b) in zip(padded_model.named_parameters(), packed_model.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_guard_accepts_a_model_that_respects_boundaries(samples, tokenizer):
    check = check_packing(tiny_model(), samples, PadToLongestCollator(tokenizer.pad_token_id), PackedCollator(), 4)
    assert len(check.losses) == 2 and all(abs(a - b) < 1e-4 * a for a, b in check.losses)
    # The same operations on the same shapes: a sample's logits do not move at all with the others.
    assert len(check.leaks) == 2 and all(
        leak.moved.largest == leak.control.largest == 0 < leak.scale for leak in check.leaks
    )


def leaky_model():
    """Attention that is causal over the whole row but ignores any mask: right-padded batches are
    still exact (pads come after every real token), packed rows let a sample see the one before."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def leaky(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("leaky_test", leaky)
    ALL_MASK_ATTENTION_FUNCTIONS.register("leaky_test", sdpa_mask)
    return tiny_model("leaky_test")


def test_guard_refuses_a_model_that_leaks_across_samples(samples, tokenizer):
    padded = PadToLongestCollator(tokenizer.pad_token_id)
    with pytest.raises(DistributedSetupError, match=r"train\.packing=true refused"):
        check_packing(leaky_model(), samples, padded, PackedCollator(), 4)
    model = leaky_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DistributedSetupError):
        check_packing(model, samples, padded, PackedCollator(), 4)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _zero3_check_worker(rank: int, init_file: str, out_dir: str) -> None:
    import json
    import os
    from functools import partial
    from pathlib import Path

    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    import deepspeed
    from transformers import AutoTokenizer

    from sala_train.backends import skip_unused_deepspeed_kernels
    from sala_train.config.schema import Zero3Backend
    from sala_train.distributed import fail_together

    skip_unused_deepspeed_kernels(Zero3Backend())
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    cfg = DatasetConfig(name="demo", train=[str(DEMO / "train.jsonl")], validation=[str(DEMO / "validation.jsonl")],
                        cutoff_len=512, max_samples=8)  # fmt: skip
    data = build_data(SftStage(), cfg, tokenizer).splits["train"]
    # The persistence threshold and prefetch bucket transformers' "auto" gives a hidden size of 128;
    # DeepSpeed's limits on what stays gathered (1e9 parameters by default, a whole model as small
    # as this one) sized to it as the defaults are to a model that needs ZeRO-3.
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1280,
                                    "stage3_prefetch_bucket_size": 14746, "stage3_max_live_parameters": 1,
                                    "stage3_max_reuse_distance": 0},
              "zero_allow_untested_optimizer": True}  # fmt: skip
    seen = {}
    for kind, make in (("sound", tiny_model), ("leaky", leaky_model)):
        engine, *_ = deepspeed.initialize(model=make(), config=config, model_parameters=None)
        model = engine.module
        live: list[int] = []  # parameters gathered whole on this rank as each module starts its forward
        params = list(model.parameters())

        def count(*_: object, params: list = params, live: list[int] = live) -> None:
            live.append(sum(p.numel() for p in params))

        for module in model.modules():  # (after DeepSpeed's own pre-hook, which gathers the module's)
            module.register_forward_pre_hook(count)
        padded = PadToLongestCollator(tokenizer.pad_token_id)
        try:
            check = fail_together(
                partial(check_packing, model, data, padded, PackedCollator(), 4), DistributedSetupError
            )
            outcome = f"passed on {len(check.losses)} batches"
        except DistributedSetupError as exc:
            outcome = str(exc)[:41]
        seen[kind] = [outcome, max(live), sum(p.ds_numel for p in model.parameters())]
    Path(out_dir, f"{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_the_check_runs_inside_zero3_without_gathering_the_model(tmp_path):
    """Under ZeRO-3 the check runs in DeepSpeed's engine: its hooks gather each layer for its own
    forward, never the whole model (gathered on every GPU before, which a model that needs ZeRO-3
    does not fit). Both ranks run every batch and refuse a leaking model together."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_zero3_check_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for rank in seen:
        (sound, sound_live, whole), (leaky, leaky_live, _) = rank["sound"], rank["leaky"]
        assert sound == "passed on 2 batches" and leaky == "train.packing=true refused: on real batch"
        assert 0 < sound_live < whole / 2 and 0 < leaky_live < whole / 2


def test_guard_compares_rows_that_samples_share(samples, tokenizer):
    """Rows of ``row_tokens`` and a file that starts with samples longer than half a row: its first
    batches pack one sample per row, exact under any attention; the check still catches the leak."""
    row_tokens = max(len(s["input_ids"]) for s in samples)
    long_ones = [s for s in samples if len(s["input_ids"]) > row_tokens // 2]
    short = min((s for s in samples if len(s["input_ids"]) <= row_tokens // 2), key=lambda s: len(s["input_ids"]))
    collator = PackedCollator(tokenizer.pad_token_id, row_tokens=row_tokens)
    assert len(long_ones) >= 4 and collator(long_ones[:4])["input_ids"].shape[0] == 4  # one per row
    padded = PadToLongestCollator(tokenizer.pad_token_id)
    for data in (long_ones, [*long_ones, short, short]):  # cut to share rows; the short ones picked first
        batches = guard_batches(data, collator, 4, 2)
        assert len(batches) == 2 and all(collator(b)["input_ids"].shape[0] < len(b) for b in batches)
        with pytest.raises(DistributedSetupError, match=r"train\.packing=true refused"):
            check_packing(leaky_model(), data, padded, collator, 4)
    with_short = guard_batches([*long_ones, short, short], collator, 4, 2)
    assert sum(f["input_ids"] == short["input_ids"] for f in with_short[0] + with_short[1]) == 2
    check = check_packing(tiny_model(), long_ones, padded, collator, 4)
    assert len(check.losses) == 2 and all(abs(a - b) < 1e-4 * a for a, b in check.losses)
    # Samples that train nothing once cut (all prompt): the leak still shows in their logits (the
    # check compared nothing and let packing train).
    untrained = [{"input_ids": s["input_ids"], "labels": [IGNORE_INDEX] * len(s["labels"])} for s in samples]
    assert len(guard_batches(untrained, collator, 4, 2)) == 2
    with pytest.raises(DistributedSetupError, match=r"train\.packing=true refused: .* logits move"):
        check_packing(leaky_model(), untrained, padded, collator, 4)
    check = check_packing(tiny_model(), untrained, padded, collator, 4)
    assert check.losses == [] and len(check.leaks) == 2


def test_guard_refuses_the_sala_stand_in_whose_loss_moves_less_than_its_tolerance(samples, tokenizer, tmp_path):
    """The MiniCPM-SALA stand-in (linear attention over the whole row) in bf16, as its preset trains:
    its packed loss differed from the padded one by 1.3e-3, under the 5e-3 that bf16 rounding needs,
    and packing trained; a sample's logits move by half their size with the sample before it."""
    from transformers import AutoModelForCausalLM

    from tests.fixtures.tiny_sala import make_tiny_sala

    sala = make_tiny_sala(tmp_path / "tiny-sala", TINY_CHAT)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(sala, trust_remote_code=True, dtype=torch.float32)
    padded = PadToLongestCollator(tokenizer.pad_token_id)
    batches = guard_batches(samples, PackedCollator(tokenizer.pad_token_id), 4, 2)
    with torch.no_grad(), _bf16_autocast():
        losses = [(float(model(**padded(b)).loss), float(model(**PackedCollator()(b), use_cache=False).loss))
                  for b in batches]  # fmt: skip
        assert all(abs(a - b) < 5e-3 * a for a, b in losses)  # what the loss comparison alone saw
        with pytest.raises(DistributedSetupError, match=r"refused: on real batches packed samples' logits move"):
            check_packing(model, samples, padded, PackedCollator(tokenizer.pad_token_id), 4)


def test_a_moe_model_is_told_from_one_that_leaks_by_most_of_its_tokens():
    """Other samples' content changes how many tokens each expert gets; where a CPU's bf16 kernels
    round by that (the machine review 6 ran on: a few tokens moved by 0.6% of the largest logit) the
    dense rule refused a MoE model that keeps samples apart. Where they do not (an AMD EPYC with
    AVX-512: nothing moves) it passes either way, so the rule itself is pinned on measured figures in
    test_the_moe_rule_takes_rounding_for_rounding_and_a_leak_for_a_leak. Most tokens must move for a
    MoE model, as in Qwen3-Next, which also leaks."""
    import random

    from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3NextConfig

    from sala_train.packing import has_experts, leak

    rng = random.Random(0)
    samples = [{"input_ids": (ids := [rng.randrange(1, 512) for _ in range(n)]), "labels": ids}
               for n in (40, 55, 63, 70, 80, 90, 47, 52)]  # fmt: skip
    shape = {"vocab_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
             "num_experts_per_tok": 2, "pad_token_id": 0}  # fmt: skip
    torch.manual_seed(0)
    moe = Qwen3MoeConfig(**shape, hidden_size=512, intermediate_size=512, moe_intermediate_size=256,
                         num_hidden_layers=4, head_dim=128, initializer_range=0.05)  # fmt: skip
    model = AutoModelForCausalLM.from_config(moe, attn_implementation="sdpa").bfloat16().eval()
    collator = PackedCollator(0)
    with torch.no_grad():
        leaks = [leak(model, collator(b), 0) for b in guard_batches(samples, collator, 4, 2)]
    assert has_experts(model) and len(leaks) == 2
    check = check_packing(model, samples, PadToLongestCollator(0), collator, 4)
    assert len(check.leaks) == 2
    # In another order, a token sent to other experts early in a last sample moved the later ones:
    # the 90th percentile moved 4x its first sample's, by about a unit in the last place.
    rng = random.Random(1)
    other = [{"input_ids": (ids := [rng.randrange(1, 512) for _ in range(n)]), "labels": ids}
             for n in (40, 55, 63, 70, 80, 90, 47, 52)]  # fmt: skip
    random.Random(1).shuffle(other)
    check_packing(model, other, PadToLongestCollator(0), collator, 4)
    torch.manual_seed(0)
    leaking = Qwen3NextConfig(**shape, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              shared_expert_intermediate_size=32, num_hidden_layers=2, head_dim=16,
                              linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                              linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"],
                              initializer_range=0.2)  # fmt: skip
    model = AutoModelForCausalLM.from_config(leaking, attn_implementation="eager").bfloat16().eval()
    with pytest.raises(DistributedSetupError, match=r"refused: on real batches packed samples' logits move"):
        check_packing(model, samples, PadToLongestCollator(0), collator, 4)


def test_the_moe_rule_takes_rounding_for_rounding_and_a_leak_for_a_leak():
    """Figures measured in bf16 (review 6's machine; a scale of 5.81, 2^-8 of it 0.0227): a
    Qwen3-MoE that keeps samples apart moved one token by 0.57 and its tenth most-moved by a unit in
    the last place, as its rows' first samples did; Qwen3-Next, which leaks, moved most tokens by a
    tenth of the scale or more."""
    from sala_train.packing import Leak, Movement

    ulp = 2**-8 * 5.81
    apart = Leak(moved=Movement(0.57, ulp), rerun=Movement(0.0, 0.0), control=Movement(0.3, ulp), scale=5.81)
    assert apart.verdict(2**-8, sixteen_bit=True) is not None  # the dense rule: refused
    assert apart.verdict(2**-8, sixteen_bit=True, experts=True) is None
    leaking = Leak(moved=Movement(2.5, 0.6), rerun=Movement(0.0, 0.0), control=Movement(0.3, ulp), scale=5.81)
    assert leaking.verdict(2**-8, sixteen_bit=True, experts=True) == (
        "a tenth of their tokens by more than 0.6, of 5.81, where a row's first sample's move by 0.0227 and a "
        "rerun's by 0"
    )
    # Below the 16-bit floor (2^-5 of the scale, 0.18) a MoE's move is not told from rounding, even
    # 4x its control's; float32 has no such floor.
    small = Leak(moved=Movement(0.5, 0.15), rerun=Movement(0.0, 0.0), control=Movement(0.1, 0.01), scale=5.81)
    assert small.verdict(2**-8, sixteen_bit=True, experts=True) is None
    assert small.verdict(1e-6, experts=True) is not None
    # A kernel that moves on a rerun of the same batch makes a dense model judged the same way.
    noisy = Leak(moved=Movement(0.5, 0.05), rerun=Movement(0.3, 0.02), control=Movement(0.0, 0.0), scale=5.81)
    assert noisy.verdict(2**-8, sixteen_bit=True) is None


def test_a_model_whose_forward_takes_no_position_ids_is_refused_by_name(samples, tokenizer):
    """Such a model cannot be told where packed samples start: it was a TypeError traceback."""
    model = tiny_model()
    forward = model.forward

    def no_positions(input_ids=None, labels=None, use_cache=None, attention_mask=None):
        return forward(input_ids=input_ids, labels=labels, use_cache=use_cache, attention_mask=attention_mask)

    model.forward = no_positions
    with pytest.raises(DistributedSetupError, match=r"refused: this model's forward takes no position_ids"):
        check_packing(model, samples, PadToLongestCollator(tokenizer.pad_token_id), PackedCollator(), 4)


def test_a_rows_filler_stops_at_the_longest_samples_positions(tokenizer):
    """RoPE scalings that pick their frequencies from the batch's largest position (Phi-3's
    longrope, dynamic) saw the filler's, past every sample's: packed rows then differed from padded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    features = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (30, 30, 6)]
    batch = PackedCollator(pad_token_id=0, row_tokens=64)(features)
    assert batch["input_ids"].shape == (2, 60) and int(batch["position_ids"].max()) == 29
    assert batch["position_ids"][1, 6:].tolist() == [*range(29), *[29] * 25]  # (a run of 1-token segments)
    assert real_tokens(batch, 0) == 66
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, initializer_range=0.2,
                         rope_scaling={"rope_type": "dynamic", "factor": 4.0})  # fmt: skip

    def fresh() -> LlamaForCausalLM:  # (dynamic RoPE keeps the largest length it has seen)
        torch.manual_seed(0)
        return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()

    with torch.no_grad():
        packed = float(fresh()(**batch, use_cache=False).loss)
        padded = float(fresh()(**PadToLongestCollator(0)(features), use_cache=False).loss)
    assert abs(packed - padded) < 1e-5 * padded, (packed, padded)


def _segment_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's varlen_attn signature (no enable_gqa), computed segment by segment with sdpa:
    a CPU stand-in for the CUDA-only kernel, so the code around it runs here. Like the kernel, it
    takes 16-bit inputs only."""
    assert k.shape[1] == q.shape[1] and torch.equal(cu_q, cu_k)  # (KV heads repeated for it)
    assert {t.dtype for t in (q, k, v)} <= {torch.bfloat16, torch.float16}, (q.dtype, k.dtype, v.dtype)
    left, right = window_size  # (flash attention's: a query sees keys from i - left to i + right; -1: no bound)
    out = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        i, j = torch.arange(e - s)[:, None], torch.arange(e - s)[None, :]
        seen = ((j <= i + right) | (right < 0)) & ((j >= i - left) | (left < 0))
        out.append(torch.nn.functional.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)),
                                                                    attn_mask=seen, scale=scale))  # fmt: skip
    return torch.cat([o.transpose(0, 1) for o in out])


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("weights", ["bfloat16", "float32 under bf16 autocast"])
def test_varlen_model_passes_the_packing_check_and_keeps_its_kernel(samples, tokenizer, monkeypatch, weights):
    # The check's padded pass cannot run through sala_varlen (it takes packed batches only): it
    # runs with sdpa, and the model trains with sala_varlen again afterwards. The tiny model has
    # fewer KV heads than query heads: without enable_gqa, they are repeated for the kernel.
    # Float32 weights (model.dtype=float32 train.bf16=true) train under autocast, whose dtype the
    # kernel gets: RoPE's float32 cos/sin hand it a float32 query otherwise.
    import contextlib

    from sala_train import attention

    attention.register()
    monkeypatch.setattr(attention, "_kernel", lambda: (_segment_sdpa, False))
    model, reference_model = tiny_model(attention.VARLEN), tiny_model()
    precision = _bf16_autocast() if weights.startswith("float32") else contextlib.nullcontext()
    if weights == "bfloat16":
        model, reference_model = model.bfloat16(), reference_model.bfloat16()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    padded = PadToLongestCollator(tokenizer.pad_token_id)
    with precision:
        check = check_packing(model, samples, padded, PackedCollator(tokenizer.pad_token_id, varlen_kwargs=True), 4)
        reference = float(reference_model(**padded([samples[i] for i in range(4)]), use_cache=False).loss)
    pairs = check.losses
    assert len(pairs) == 2 and all(abs(a - b) < 5e-3 * a for a, b in pairs)  # (bf16 rounding differs)
    assert len(check.leaks) == 2 and all(leak.moved.largest == 0 for leak in check.leaks)
    assert model.config._attn_implementation == attention.VARLEN and model.training
    assert abs(reference - pairs[0][0]) < 1e-6 * reference
    # Remote code that cannot switch its attention (transformers only warns): refused, clearly.
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with precision, pytest.raises(DistributedSetupError, match="cannot switch its attention at run time"):
        check_packing(model, samples, padded, PackedCollator(tokenizer.pad_token_id, varlen_kwargs=True), 4)
    assert model.config._attn_implementation == attention.VARLEN


def test_a_varlen_forward_reads_nothing_back_from_the_device_for_a_mask(samples, tokenizer, monkeypatch):
    """With a mask function registered for sala_varlen, transformers searched the position ids for
    packed sequences before every forward, reading a flag back from the GPU (a host sync per
    forward), for a mask the kernel never reads: none is registered, and the loss is unchanged."""
    import transformers.masking_utils as masking

    from sala_train import attention

    attention.register()
    monkeypatch.setattr(attention, "_kernel", lambda: (_segment_sdpa, False))
    searched = []
    real_search = masking.find_packed_sequence_indices
    monkeypatch.setattr(
        masking, "find_packed_sequence_indices", lambda *a, **k: searched.append(1) or real_search(*a, **k)
    )
    model, reference_model = tiny_model(attention.VARLEN).bfloat16(), tiny_model().bfloat16()
    features = [samples[i] for i in range(4)]
    packed = float(model(**PackedCollator(tokenizer.pad_token_id, varlen_kwargs=True)(features), use_cache=False).loss)
    assert searched == []
    padded = float(reference_model(**PadToLongestCollator(tokenizer.pad_token_id)(features), use_cache=False).loss)
    assert abs(packed - padded) < 5e-3 * padded


@pytest.mark.parametrize("family", ["mistral", "qwen2_moe"])
@pytest.mark.parametrize("kernel", ["cpu-stand-in", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the varlen kernel needs CUDA"))])  # fmt: skip
def test_varlen_keeps_a_models_sliding_window(samples, tokenizer, monkeypatch, kernel, family):
    """A Mistral-style model attends within a sliding window (here 8 tokens): sala_varlen passed the
    kernel plain causal attention, so every query saw its whole sample (the packing check's short
    samples could not tell). Its loss now equals sdpa's padded loss with the window, not without
    (an off-by-one window is 2% off: bf16 kernels differ by less). Qwen2-MoE's layers hold their
    window without passing it to the attention function (their mask applies it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, Qwen2MoeConfig

    from sala_train import attention

    attention.register()
    device, tolerance = ("cuda", 1e-2) if kernel == "cuda" else ("cpu", 2e-3)
    if kernel != "cuda":
        monkeypatch.setattr(attention, "_kernel", lambda: (_segment_sdpa, False))
    tiny = AutoConfig.from_pretrained(TINY_CHAT).to_dict()
    shape = {k: tiny[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}  # fmt: skip

    def mistral(attn: str, window: int | None):
        torch.manual_seed(0)
        if family == "mistral":
            config = MistralConfig(**shape, sliding_window=window, initializer_range=0.5)
        else:
            layers = ["sliding_attention" if window else "full_attention"] * shape["num_hidden_layers"]
            config = Qwen2MoeConfig(**shape, use_sliding_window=window is not None, sliding_window=window or 4096,
                                    layer_types=layers, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                    initializer_range=0.5)  # fmt: skip
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        return model.to(device, torch.bfloat16).eval()

    def on_device(batch: dict) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    features = [samples[i] for i in range(4)]
    assert min(len(f["input_ids"]) for f in features) > 8
    with torch.no_grad():
        packed_batch = on_device(PackedCollator(tokenizer.pad_token_id, varlen_kwargs=True)(features))
        packed = float(mistral(attention.VARLEN, 8)(**packed_batch, use_cache=False).loss)
        padded = on_device(PadToLongestCollator(tokenizer.pad_token_id)(features))
        windowed = float(mistral("sdpa", 8)(**padded, use_cache=False).loss)
        unwindowed = float(mistral("sdpa", None)(**padded, use_cache=False).loss)
    assert abs(packed - windowed) < tolerance * windowed < abs(packed - unwindowed), (packed, windowed, unwindowed)


def test_varlen_takes_a_window_given_as_none_as_none(monkeypatch):
    """EXAONE 4's layers all hold the config's sliding_window, and its full-attention layers pass
    ``sliding_window=None`` to mean none: they attended within the window. A layer that passes
    nothing (Qwen2-MoE) has the window it holds."""
    from types import SimpleNamespace

    from sala_train import attention

    windows = []

    def recording(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        windows.append(window_size)
        return torch.zeros_like(q)

    monkeypatch.setattr(attention, "_kernel", lambda: (recording, False))
    layer = SimpleNamespace(is_causal=True, sliding_window=16)
    q = torch.zeros(1, 2, 6, 8, dtype=torch.bfloat16)
    bounds = {"cu_seq_lens_q": torch.tensor([0, 6], dtype=torch.int32), "max_length_q": 6}
    attention.varlen_attention_forward(layer, q, q, q, None, sliding_window=None, **bounds)
    attention.varlen_attention_forward(layer, q, q, q, None, sliding_window=4, **bounds)
    attention.varlen_attention_forward(layer, q, q, q, None, **bounds)
    assert windows == [(-1, 0), (3, 0), (15, 0)]


def test_varlen_refuses_attention_it_does_not_compute(samples, tokenizer, monkeypatch):
    """Gemma 2 caps its attention logits (softcap): the kernel call would have ignored it. Refused
    by the layer as it passes it, a user error (exit 2, met at the packing check's first pass).
    Gemma 3's config carries a softcapping value its layers never apply: not refused."""
    from types import SimpleNamespace

    from transformers import AutoConfig, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from sala_train import attention
    from sala_train.errors import ModelLoadError

    attention.register()
    monkeypatch.setattr(attention, "_kernel", lambda: (_segment_sdpa, False))
    tiny = AutoConfig.from_pretrained(TINY_CHAT).to_dict()
    shape = {k: tiny[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads")}  # fmt: skip
    batch = PackedCollator(tokenizer.pad_token_id, varlen_kwargs=True)([samples[0], samples[1]])
    torch.manual_seed(0)
    gemma2 = Gemma2ForCausalLM._from_config(Gemma2Config(**shape, head_dim=16, attn_logit_softcapping=50.0),
                                            attn_implementation=attention.VARLEN).bfloat16()  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"sala_varlen: .*logit softcapping \(softcap=50.0\), .*=sdpa, or eager"):
        gemma2(**batch, use_cache=False)
    gemma3 = Gemma3ForCausalLM._from_config(Gemma3TextConfig(**shape, head_dim=16, attn_logit_softcapping=50.0),
                                            attn_implementation=attention.VARLEN).bfloat16()  # fmt: skip
    assert torch.isfinite(gemma3(**batch, use_cache=False).loss)
    causal_layer = SimpleNamespace(is_causal=True)
    assert attention._unsupported(causal_layer, {"s_aux": torch.zeros(2)}) == "attention sinks"
    assert attention._unsupported(causal_layer, {"sinks": torch.zeros(2)}) == "attention sinks"
    assert attention._unsupported(causal_layer, {"indices": torch.zeros(2)}) == "sparse attention indices"
    assert attention._unsupported(SimpleNamespace(is_causal=False), {}) == "non-causal attention"
    assert attention._unsupported(causal_layer, {"is_causal": False}) == "non-causal attention"
    assert attention._unsupported(causal_layer, {"sliding_window": 8, "softcap": None, "position_ids": 0}) is None
    # Applied in training only (the packing check runs in eval mode), or through the mask alone:
    # they passed the check, then the first step raised, or attended across chunks.
    dropping = SimpleNamespace(is_causal=True, attention_dropout=0.1)
    assert attention._unsupported(dropping, {}) == "attention dropout (attention_dropout=0.1)"
    # As a module: GPT-2's attn_dropout (p=0.1 by default) was missed; Persimmon's, at p=0, refused.
    gpt2 = SimpleNamespace(is_causal=True, attn_dropout=torch.nn.Dropout(0.1))
    assert attention._unsupported(gpt2, {}) == "attention dropout (attn_dropout=0.1)"
    assert attention._unsupported(SimpleNamespace(is_causal=True, attention_dropout=torch.nn.Dropout(0.0)), {}) is None
    chunked = SimpleNamespace(is_causal=True, use_rope=True, config=SimpleNamespace(attention_chunk_size=8192))
    assert attention._unsupported(chunked, {}) == "chunked attention (attention_chunk_size=8192)"
    assert attention._unsupported(SimpleNamespace(**{**vars(chunked), "use_rope": False}), {}) is None


@pytest.mark.parametrize(
    ("bf16", "padded_loss", "difference", "refused"),
    [(True, 0.3, 1.9e-3, False), (True, 0.3, 2.1e-3, True), (True, 10.0, 4.9e-2, False), (True, 10.0, 5.1e-2, True),
     (False, 0.3, 2.9e-5, False), (False, 0.3, 3.1e-5, True)],
)  # fmt: skip
def test_the_packing_checks_loss_tolerance(samples, tokenizer, monkeypatch, bf16, padded_loss, difference, refused):
    """Packed and padded losses must agree to 1e-4 relative in float32; in 16 bits to 5e-3 relative,
    or 2e-3 absolute where that is more: a pretrained model's low loss (0.3) left 1.5e-3, the size of
    the rounding two kernels and batch shapes leave in bf16, and refused packing for it. The model's
    losses are set here (its logits, and the leak test, are real)."""
    from sala_train import packing

    model = tiny_model().bfloat16() if bf16 else tiny_model()
    losses = iter([padded_loss, padded_loss + difference] * 4)
    monkeypatch.setattr(packing, "_loss", lambda model, batch: next(losses))
    padded, packed = PadToLongestCollator(tokenizer.pad_token_id), PackedCollator(tokenizer.pad_token_id)
    if refused:
        with pytest.raises(DistributedSetupError, match=r"the packed loss \(\d+\.\d+\) differs from the padded"):
            check_packing(model, samples, padded, packed, 4)
    else:
        assert len(check_packing(model, samples, padded, packed, 4).losses) == 2


def _sized_kernel(q, k, v, *args, **kwargs):
    """The stand-in, taking only what the CUDA kernel takes: one head size, a multiple of 8, at most 256."""
    assert q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256, q.shape
    return _segment_sdpa(q, k, v, *args, **kwargs)


def test_varlen_pads_a_head_size_the_kernel_does_not_take_and_refuses_one_too_large(samples, tokenizer, monkeypatch):
    """A head size that is no multiple of 8 (12 here) was the kernel's RuntimeError: zero-padded, with
    the real size's scale, it gives the packed loss sdpa gives; one over 256 (Gemma 4's global layers,
    512) is refused as a user error naming the key."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train import attention
    from sala_train.errors import ModelLoadError

    attention.register()
    monkeypatch.setattr(attention, "_kernel", lambda: (_sized_kernel, False))
    packed = PackedCollator(tokenizer.pad_token_id, varlen_kwargs=True)([samples[i] for i in range(3)])
    losses = {}
    for attn in (attention.VARLEN, "sdpa"):
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(TINY_CHAT, head_dim=12)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).bfloat16()
        losses[attn] = float(model(**packed, use_cache=False).loss)
    assert abs(losses[attention.VARLEN] - losses["sdpa"]) < 5e-3 * losses["sdpa"], losses  # (bf16 rounding)
    config = AutoConfig.from_pretrained(TINY_CHAT, head_dim=264)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.VARLEN).bfloat16()
    with pytest.raises(ModelLoadError, match=r"sala_varlen: .* heads have 264 dimensions, .* at most 256; use model"):
        model(**packed, use_cache=False)


def test_varlen_refuses_a_batch_without_segment_bounds(samples, tokenizer, monkeypatch):
    """A padded batch (or generation) gets no mask through sala_varlen (it registers no mask
    function), so its padding could not be told apart: refused, with what to load instead."""
    from sala_train import attention

    attention.register()
    monkeypatch.setattr(attention, "_kernel", lambda: (_segment_sdpa, False))
    model = tiny_model(attention.VARLEN).bfloat16()
    with pytest.raises(ValueError, match=r"sala_varlen attention takes packed batches .* attn_implementation='sdpa'"):
        model(**PadToLongestCollator(tokenizer.pad_token_id)([samples[i] for i in range(2)]), use_cache=False)


def test_varlen_with_float32_weights_and_no_16_bit_training_is_refused(samples, tokenizer, monkeypatch):
    """Flash attention computes in 16 bits only: float32 weights without train.bf16/fp16 are refused
    by name, in validation where the config says so, after loading where the checkpoint does."""
    from sala_train import attention
    from sala_train.config.schema import AttnImplementation, DType, ModelConfig, TrainConfig
    from sala_train.errors import ModelLoadError

    attention.register()
    monkeypatch.setattr(attention, "_kernel", lambda: (_segment_sdpa, False))
    model = tiny_model(attention.VARLEN)
    features = [samples[i] for i in range(4)]
    with pytest.raises(ValueError, match="sala_varlen computes in bfloat16/float16"):
        model(**PackedCollator(tokenizer.pad_token_id, varlen_kwargs=True)(features), use_cache=False)
    varlen = ModelConfig(name_or_path="m", attn_implementation=AttnImplementation.SALA_VARLEN, dtype=DType.AUTO)
    with pytest.raises(ModelLoadError, match=r"model.name_or_path=m: .* model.dtype=auto \(here: float32\)"):
        attention.check_precision(varlen, TrainConfig(packing=True), model)
    attention.check_precision(varlen, TrainConfig(packing=True, bf16=True), model)  # bf16 compute: fine
    attention.check_precision(varlen, TrainConfig(packing=True), model.bfloat16())  # 16-bit weights: fine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernel needs CUDA")
def test_varlen_kernel_loss_equals_padded_loss(samples, tokenizer):
    from sala_train import attention

    attention.register()
    features = [samples[i] for i in range(6)]
    padded_model = tiny_model().to("cuda", torch.bfloat16)
    varlen_model = tiny_model(attention.VARLEN).to("cuda", torch.bfloat16)
    batch = PadToLongestCollator(tokenizer.pad_token_id)(features)
    padded = padded_model(**{k: v.cuda() for k, v in batch.items()}, use_cache=False).loss
    packed_batch = PackedCollator(tokenizer.pad_token_id, varlen_kwargs=True)(features)
    moved = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed_batch.items()}
    packed = varlen_model(**moved, use_cache=False).loss
    torch.testing.assert_close(packed.float(), padded.float(), rtol=2e-2, atol=0)  # bf16 kernels differ slightly


@pytest.mark.parametrize("layout", ["padded", "one-row", "rows-of-512"])
def test_token_budget_batches_hold_at_most_the_budget_as_collated(layout):
    """The budget counts the tokens of the batch the collator builds: with sdpa's rows, the rows
    times the longest one (filler included), not the samples' sum, which rows overshoot."""
    import random

    from sala_train.data.batching import budget_groups
    from sala_train.data.collators import PadToLongestCollator

    rng = random.Random(0)
    lengths = [rng.randint(20, 512) for _ in range(400)]
    features = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    collator = {"padded": PadToLongestCollator(0), "one-row": PackedCollator(0),
                "rows-of-512": PackedCollator(0, row_tokens=512)}[layout]  # fmt: skip
    row_tokens = 512 if layout == "rows-of-512" else None
    groups = budget_groups(lengths, 2048, layout != "padded", seed=1, row_tokens=row_tokens)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each sample once
    cells = [collator([features[i] for i in g])["input_ids"].numel() for g in groups]
    assert max(cells) <= 2048 and sum(cells) / len(cells) > 0.7 * 2048, (max(cells), sum(cells) / len(cells))


@pytest.mark.parametrize("attention", ["flash_attention_2", "sala_varlen"])
def test_flash_attention_packs_one_row_with_its_segment_bounds(tokenizer, attention):
    """transformers' flash_attention_2 path finds packed samples from the positions only in a
    batch of one row: with sdpa's rows of cutoff_len it ran plain causal attention
    over each row (three here), samples seeing each other, and the packing check (whose batches fit one row)
    passed. Both flash kernels get one row and the bounds transformers' flash path reads."""
    from types import SimpleNamespace

    from sala_train.config.schema import AttnImplementation
    from sala_train.stages.sft import batch_collator

    cfg = SimpleNamespace(train=SimpleNamespace(packing=True), dataset=SimpleNamespace(cutoff_len=8),
                          model=SimpleNamespace(attn_implementation=AttnImplementation(attention)))  # fmt: skip
    features = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (5, 6, 4)]
    batch = batch_collator(cfg, tokenizer)(features)  # type: ignore[arg-type]
    assert batch["input_ids"].shape == (1, 15)
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 5, 11, 15]
    assert batch["max_length_q"] == batch["max_length_k"] == 6
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    sdpa = SimpleNamespace(**{**vars(cfg), "model": SimpleNamespace(attn_implementation=AttnImplementation.SDPA)})
    assert batch_collator(sdpa, tokenizer)(features)["input_ids"].shape[0] == 3  # (rows of cutoff_len)


def test_varlen_computes_mla_attention_whose_value_heads_are_smaller(monkeypatch):
    """DeepSeek-V3's multi-head latent attention: query/key heads of 24, value heads of 16. The
    kernel call reshaped values with the query's head size: `shape '[17, 4, 24]' is invalid`, a
    traceback at the packing check's first pass. Values are padded to the query's head size and the
    output cut back; the packed loss equals sdpa's padded one (bf16 on the CPU stand-in)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from sala_train import attention

    attention.register()
    monkeypatch.setattr(attention, "_kernel", lambda: (_segment_sdpa, False))
    config = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                              first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2)  # fmt: skip
    features = [{"input_ids": list(range(3, 13)), "labels": list(range(3, 13))},
                {"input_ids": list(range(20, 27)), "labels": list(range(20, 27))}]  # fmt: skip

    def loss(attn: str, batch: dict) -> float:
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM._from_config(config, attn_implementation=attn).bfloat16().eval()
        with torch.no_grad():
            return float(model(**batch, use_cache=False).loss)

    packed = loss(attention.VARLEN, PackedCollator(0, varlen_kwargs=True)(features))
    padded = loss("sdpa", PadToLongestCollator(0)(features))
    assert abs(packed - padded) < 5e-3 * padded, (packed, padded)


def test_a_collators_cell_count_is_the_size_of_the_batch_it_builds():
    """sala-data's padding figure counts each batch's positions from the samples' lengths alone
    (building every batch took a minute per 400k samples): the count must be what the collator builds."""
    import random

    from sala_train.data.collators import PadToLongestCollator
    from sala_train.packing import PackedCollator

    rng = random.Random(0)
    collators = [PadToLongestCollator(0), PadToLongestCollator(0, pad_to_multiple_of=8), PackedCollator(0),
                 PackedCollator(0, row_tokens=64), PackedCollator(0, row_tokens=64, varlen_kwargs=True)]  # fmt: skip
    for _ in range(200):
        lengths = [rng.randint(2, 64) for _ in range(rng.randint(1, 12))]
        features = [{"input_ids": [5] * n, "labels": [5] * n} for n in lengths]
        for collate in collators:
            assert collate.cells(lengths) == collate(features)["input_ids"].numel(), (collate, lengths)
