"""DPO's loss settings reach TRL's loss as the config means them."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sala_train.config.schema import DpoLoss, DpoStage
from sala_train.stages.preference import _dpo_class, dpo_loss_args
from tests.conftest import GUIDE_DATA, TINY_CHAT


def one_pair_loss(tmp_path, tokenizer, stage: DpoStage) -> float:
    """TRL's DPO loss on one (prompt, chosen, rejected) with a policy moved off its reference."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import DPOConfig

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).float().eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    pair = {"prompt_ids": tokenizer("Which is larger?")["input_ids"], "chosen_ids": tokenizer(" Two.")["input_ids"],
            "rejected_ids": tokenizer(" One, surely.")["input_ids"]}  # fmt: skip
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], max_length=None, use_cpu=True,
                     **dpo_loss_args(stage))  # fmt: skip
    trainer = _dpo_class()(model=policy, ref_model=reference.requires_grad_(False), args=args,
                           train_dataset=Dataset.from_list([pair]), processing_class=tokenizer)  # fmt: skip
    policy.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(policy, trainer.data_collator([pair])))


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_is_conservative_dpo(tmp_path, tokenizer, smoothing):
    """cDPO on one pair: (1-e)(-logsigmoid(x)) + e(-logsigmoid(-x)), with x = beta * the reward
    margin recovered from the plain sigmoid loss (-logsigmoid(x) = s gives x = log(1/(e^s - 1)));
    TRL 1.x's sigmoid loss alone ignored the smoothing."""
    plain = one_pair_loss(tmp_path, tokenizer, DpoStage(beta=1.0))
    x = math.log(1 / math.expm1(plain))
    assert abs(x) > 0.05  # the policy is off its reference, so smoothing changes the loss
    expected = (1 - smoothing) * plain + smoothing * -math.log(1 / (1 + math.exp(x)))
    smoothed = one_pair_loss(tmp_path, tokenizer, DpoStage(beta=1.0, label_smoothing=smoothing))
    assert smoothed == pytest.approx(expected, rel=1e-5) and smoothed != pytest.approx(plain, rel=1e-3)


def test_the_hinge_loss_is_slics(tmp_path, tokenizer):
    """LLaMA-Factory's pref_loss hinge: max(0, 1 - beta * margin) on one pair, the margin recovered
    from the sigmoid loss at beta 1 as above."""
    margin = math.log(1 / math.expm1(one_pair_loss(tmp_path, tokenizer, DpoStage(beta=1.0))))
    beta = 0.5 / abs(margin)  # (inside the hinge: the loss depends on the margin)
    hinge = one_pair_loss(tmp_path, tokenizer, DpoStage(beta=beta, loss_type=DpoLoss.HINGE))
    assert hinge == pytest.approx(1 - beta * margin, rel=1e-5) and hinge > 0


def test_loss_settings_without_smoothing_are_trls_own():
    assert dpo_loss_args(DpoStage(beta=0.2)) == {"beta": 0.2, "loss_type": ["sigmoid"], "label_smoothing": 0.0}
    assert dpo_loss_args(DpoStage(loss_type=DpoLoss.IPO))["loss_type"] == ["ipo"]
    assert dpo_loss_args(DpoStage(loss_type=DpoLoss.HINGE))["loss_type"] == ["hinge"]


def test_kto_trains_its_split_shuffled_by_the_seed(tmp_path, tokenizer):
    """TRL's KTO samples its train split in order: a file of all desirable then all undesirable
    records trained on one label per batch. The split is shuffled once, by train.seed."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import KTOConfig

    from sala_train.stages.preference import _kto_class

    records = [{"prompt_ids": tokenizer(f"Question {i}?")["input_ids"],
                "completion_ids": tokenizer(f" {i}.")["input_ids"], "label": i < 16} for i in range(32)]  # fmt: skip
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).float()

    def first_batches(seed: int) -> list[list[bool]]:
        args = KTOConfig(output_dir=str(tmp_path), report_to=[], max_length=None, use_cpu=True, seed=seed,
                         per_device_train_batch_size=4)  # fmt: skip
        trainer = _kto_class()(model=model, ref_model=copy.deepcopy(model), args=args,
                               train_dataset=Dataset.from_list(records), processing_class=tokenizer)  # fmt: skip
        assert sorted(trainer.train_dataset["prompt_ids"]) == sorted(r["prompt_ids"] for r in records)
        return [batch["label"].tolist() for batch, _ in zip(trainer.get_train_dataloader(), range(4), strict=False)]

    batches = first_batches(seed=0)
    assert any(len(set(labels)) == 2 for labels in batches), batches  # not one label per batch
    assert first_batches(seed=0) == batches and first_batches(seed=1) != batches


def test_kto_weights_that_do_not_balance_the_labels_are_said_with_the_keys_to_set(tmp_path, tokenizer, capsys):
    """TRL's balance warning came from the dataset preparation sala-train replaces, so it was never
    given. The ranges (KTO paper, Eq. 8): desirable_weight * D / (undesirable_weight * U) in [1, 4/3]."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import KTOConfig

    from sala_train.stages.preference import _kto_class, kto_weight_advice

    # 24 desirable, 8 undesirable, weights 1 and 1: 24 / 8 = 3, above 4/3. desirable_weight in
    # [8/24, 1.33 * 8/24] = [0.33, 0.44], or undesirable_weight in [24/8/1.33, 24/8] = [2.26, 3].
    expected = (
        "the training set has 24 desirable and 8 undesirable examples, and stage.desirable_weight=1 with "
        "stage.undesirable_weight=1 do not balance them (KTO paper, Eq. 8); set EITHER "
        "stage.desirable_weight in [0.33, 0.44] OR stage.undesirable_weight in [2.26, 3], not both"
    )
    assert kto_weight_advice(24, 8, 1.0, 1.0) == expected
    assert kto_weight_advice(24, 8, 0.4, 1.0) is None and kto_weight_advice(24, 8, 1.0, 2.5) is None
    assert kto_weight_advice(16, 16, 1.0, 5.0) is None  # (balanced counts: nothing to say, as TRL)
    # One kind absent: it said "40 desirable and 1 undesirable" and a range of weights to set.
    assert kto_weight_advice(40, 0, 1.0, 1.0) == (
        "the training set has no undesirable examples (all 40 are of the other kind): KTO learns from the contrast "
        "of both; check the data's label column (kto_tag)"
    )
    records = [{"prompt_ids": tokenizer(f"Question {i}?")["input_ids"],
                "completion_ids": tokenizer(f" {i}.")["input_ids"], "label": i < 24} for i in range(32)]  # fmt: skip
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).float()
    args = KTOConfig(output_dir=str(tmp_path), report_to=[], max_length=None, use_cpu=True)
    _kto_class()(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(records),
                 processing_class=tokenizer)  # fmt: skip
    assert f"sala-train: WARNING: {expected}" in capsys.readouterr().err


def test_kto_eval_figures_do_not_depend_on_the_eval_batch_size(tmp_path, tokenizer):
    """KTO's rewards and log-probabilities are means over a batch's desirable or undesirable
    samples, its logits over their tokens: weighted by the batch's size they changed with
    per_device_eval_batch_size (-71.333 at 16 and 1, -71.259 at 3); the margin too."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import KTOConfig

    from sala_train.stages.preference import _kto_class

    records = [{"prompt_ids": tokenizer(f"Question {i}?")["input_ids"],
                "completion_ids": tokenizer(" yes." if i % 3 else f" no, {i} is not it.")["input_ids"],
                "label": i % 3 != 0} for i in range(10)]  # fmt: skip
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).float()
    policy = copy.deepcopy(reference)
    reference.eval().requires_grad_(False)  # as build_trainer makes it
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.2)

    def figures(batch_size: int) -> dict[str, float]:
        args = KTOConfig(output_dir=str(tmp_path), report_to=[], max_length=None, use_cpu=True,
                         per_device_train_batch_size=2, per_device_eval_batch_size=batch_size)  # fmt: skip
        trainer = _kto_class()(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                               train_dataset=Dataset.from_list(records),
                               eval_dataset=Dataset.from_list(records), processing_class=tokenizer)  # fmt: skip
        metrics = trainer.evaluate()
        kept = ("eval_rewards", "eval_logps", "eval_logits", "eval_entropy")
        return {k: v for k, v in metrics.items() if k.split("/")[0] in kept}

    whole = figures(10)
    assert {"eval_rewards/chosen", "eval_rewards/margins", "eval_logps/rejected", "eval_logits/chosen",
            "eval_entropy"} <= set(whole)  # fmt: skip
    assert abs(whole["eval_rewards/margins"]) > 1e-3
    for batch_size in (3, 1):
        # (float32 rounding of padded batches: ~1e-4; weighted by batch size, 3e-2 off)
        assert figures(batch_size) == pytest.approx(whole, rel=1e-3, abs=1e-4), batch_size


def test_dpo_eval_figures_do_not_depend_on_the_eval_batch_size(tmp_path, tokenizer):
    """DPO's logits, entropy and token accuracy are TRL's means over a batch's completion tokens:
    weighted by the batch's samples, they moved with per_device_eval_batch_size (1.6% for the
    logits on the demo). Loss, rewards and log-probabilities are per pair, and were exact."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import DPOConfig

    pairs = [{"prompt_ids": tokenizer(f"Question {i}?")["input_ids"],
              "chosen_ids": tokenizer(" yes." if i % 3 else f" no, {i} is not it at all.")["input_ids"],
              "rejected_ids": tokenizer(f" maybe {'so ' * (i % 4)}.")["input_ids"]} for i in range(10)]  # fmt: skip
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).float()
    policy = copy.deepcopy(reference)
    reference.eval().requires_grad_(False)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.2)

    def figures(batch_size: int) -> dict[str, float]:
        args = DPOConfig(output_dir=str(tmp_path), report_to=[], max_length=None, use_cpu=True,
                         per_device_eval_batch_size=batch_size)  # fmt: skip
        trainer = _dpo_class()(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                               train_dataset=Dataset.from_list(pairs), eval_dataset=Dataset.from_list(pairs),
                               processing_class=tokenizer)  # fmt: skip
        metrics = trainer.evaluate()
        kept = ("eval_logits", "eval_entropy", "eval_mean_token_accuracy", "eval_loss", "eval_rewards")
        return {k: v for k, v in metrics.items() if k.split("/")[0] in kept}

    whole = figures(10)
    assert {"eval_logits/chosen", "eval_logits/rejected", "eval_entropy", "eval_mean_token_accuracy"} <= set(whole)
    for batch_size in (3, 1):
        assert figures(batch_size) == pytest.approx(whole, rel=1e-4, abs=1e-5), batch_size


def _dpo_trainer_on_one_pair(cfg, model, method, tokenizer, tmp_path):
    """build_trainer as the runner calls it, on one preference pair (LoRA on q_proj, v_proj)."""
    from datasets import Dataset

    from sala_train.data.build import TokenizedData
    from sala_train.stages.inputs import TrainerInputs
    from sala_train.stages.preference import build_trainer

    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pair = {"prompt_ids": tokenizer("Which is larger?")["input_ids"], "chosen_ids": tokenizer(" Two.")["input_ids"],
            "rejected_ids": tokenizer(" One, surely.")["input_ids"]}  # fmt: skip
    splits = {"train": Dataset.from_list([pair] * 4), "validation": Dataset.from_list([pair] * 2)}
    return build_trainer(TrainerInputs(cfg, model, tokenizer, TokenizedData(splits, {}), tmp_path, [], [])), pair


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_scores_tokens_with_minicpms_mup_scaled_logits(tmp_path, tokenizer, method):
    """TRL's fused LM head (hidden @ lm_head.weight) skipped MiniCPM's muP division of the hidden
    states by hidden_size / dim_model_base (2 in the stand-in; 16 for MiniCPM4's 4096 / 256): log-probs, rewards
    and KL came from logits too sharp. Built as the runner builds it, the policy's and reference's
    log-probs are the model's own, and the config saved with the model gains nothing."""
    from hydra import compose, initialize_config_module
    from transformers import AutoModelForCausalLM

    from sala_train.config.resolve import resolve_config
    from sala_train.config.schema import RunConfig
    from tests.fixtures.tiny_sala import make_tiny_sala

    sala = make_tiny_sala(tmp_path / "tiny-sala", TINY_CHAT)
    pairs = GUIDE_DATA / "llama_factory" / "dpo_en_demo.json"
    overrides = ["stage=dpo", "dataset=dpo_en_demo", f"dataset.train=[{pairs}]", f"method={method}", "model=hf",
                 f"model.name_or_path={sala}", "model.trust_remote_code=true", "train.bf16=false",
                 "train.per_device_train_batch_size=2"]  # fmt: skip
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        cfg = resolve_config(compose("train", overrides=overrides), RunConfig, tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(sala, trust_remote_code=True, dtype=torch.float32)
    own_model = copy.deepcopy(model).eval()
    trainer, pair = _dpo_trainer_on_one_pair(cfg, model, method, tokenizer, tmp_path)

    ids = torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])
    with torch.no_grad():
        expected = torch.log_softmax(own_model(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        scorers = [trainer.model.eval()]
        scorers += [trainer.ref_model] if trainer.ref_model is not None else []
        for scorer in scorers:
            scored = scorer(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
            torch.testing.assert_close(scored, expected, rtol=1e-4, atol=1e-4)
    assert "logit_scale" not in model.config.to_dict()


def test_kto_kl_pairs_stay_within_cutoff_len(tmp_path, tokenizer):
    """KTO's KL term pairs each prompt with another sample's completion, which TRL builds after
    sala-train's tokenization cut each sample to dataset.cutoff_len: a long prompt met a long
    completion, and the pair ran past cutoff_len and the model's positions, unchecked (up to 837
    tokens at cutoff_len=512 on the guide's kto_en_demo). Cut to cutoff_len from the end, as TRL
    cuts them itself; the samples themselves are as tokenized."""
    from datasets import Dataset
    from hydra import compose, initialize_config_module
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.config.resolve import resolve_config
    from sala_train.config.schema import RunConfig
    from sala_train.data.build import TokenizedData
    from sala_train.stages.inputs import TrainerInputs
    from sala_train.stages.preference import build_trainer

    overrides = ["stage=kto", "dataset=demo_kto", "method=full", "dataset.cutoff_len=40", "train.bf16=false",
                 "train.per_device_train_batch_size=2", "train.per_device_eval_batch_size=2"]  # fmt: skip
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        cfg = resolve_config(compose("train", overrides=overrides), RunConfig, tmp_path)
    long_prompt, short_prompt = list(range(10, 40)), list(range(10, 15))  # 30 and 5 tokens
    long_reply, short_reply = list(range(50, 80)), list(range(50, 55))
    records = [{"prompt_ids": long_prompt, "completion_ids": short_reply, "label": True},
               {"prompt_ids": short_prompt, "completion_ids": long_reply, "label": False}] * 4  # fmt: skip
    splits = {"train": Dataset.from_list(records), "validation": Dataset.from_list(records)}
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).float()
    trainer = build_trainer(TrainerInputs(cfg, model, tokenizer, TokenizedData(splits, {}), tmp_path, [], []))
    for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader()):
        for batch in loader:
            lengths = batch["attention_mask"].sum(1).tolist()
            assert sorted(lengths) == [35, 35]  # (each sample whole: 30 + 5 and 5 + 30)
            kl = batch["KL_attention_mask"].sum(1).tolist()
            assert max(kl) == 40 and min(kl) == 10, kl  # 30 + 30 cut to 40; 5 + 5
            assert batch["KL_input_ids"].shape[1] <= 40


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_policy_and_reference_score_without_attention_dropout(tmp_path, tokenizer, method):
    """TRL's disable_dropout zeroes nn.Dropout modules only: a model configured with Llama's
    float `attention_dropout` kept it in the policy, whose log-probs then changed from one
    forward to the next in training mode. Both score deterministically; the saved config keeps
    the rate it was given."""
    from hydra import compose, initialize_config_module
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.config.resolve import resolve_config
    from sala_train.config.schema import RunConfig

    overrides = ["stage=dpo", "dataset=demo_preference", f"method={method}", "train.bf16=false",
                 "train.per_device_train_batch_size=2"]  # fmt: skip
    overrides += ["method.target_modules=[q_proj,v_proj]"] if method == "lora" else []
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        cfg = resolve_config(compose("train", overrides=overrides), RunConfig, tmp_path)
    config = AutoConfig.from_pretrained(TINY_CHAT, attention_dropout=0.5, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    trainer, pair = _dpo_trainer_on_one_pair(cfg, model, method, tokenizer, tmp_path)
    ids = torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])
    scorers = [trainer.model.train()] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    with torch.no_grad():
        for scorer in scorers:
            torch.testing.assert_close(scorer(input_ids=ids).logits, scorer(input_ids=ids).logits, rtol=0, atol=0)
    assert trainer.model.config.attention_dropout == 0.5


def test_kto_pairs_no_sample_with_its_own_completion_for_the_kl_term(tmp_path, tokenizer, capsys):
    """TRL pairs each prompt with the previous completion of its group of per_device_train_batch_size:
    a last group of one (5 samples in groups of 2) paired the sample with its own completion, whose
    KL term was then its own log-ratio, holding its loss at 0.5 (a one-sample validation split's
    eval_loss was exactly 0.5 at every step). A split of one sample cannot be paired: said."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import KTOConfig

    from sala_train.stages.preference import _kto_class

    records = [{"prompt_ids": tokenizer(f"Question {i}?")["input_ids"],
                "completion_ids": tokenizer(f" {i}.")["input_ids"], "label": i % 2 == 0} for i in range(5)]  # fmt: skip
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).float()
    args = KTOConfig(output_dir=str(tmp_path), report_to=[], max_length=None, use_cpu=True,
                     per_device_train_batch_size=2)  # fmt: skip
    trainer = _kto_class()(model=model, ref_model=copy.deepcopy(model), args=args,
                           train_dataset=Dataset.from_list(records), eval_dataset=Dataset.from_list(records[:3]),
                           processing_class=tokenizer)  # fmt: skip
    for split in (trainer.train_dataset, trainer.eval_dataset):
        own = [row["completion_ids"] == row["KL_completion_ids"] for row in split]
        assert not any(own), own
        assert sorted(map(tuple, split["KL_completion_ids"][:2])) == sorted(map(tuple, split["completion_ids"][:2]))
    assert "split holds 1 sample" not in capsys.readouterr().err
    _kto_class()(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(records),
                 eval_dataset=Dataset.from_list(records[:1]), processing_class=tokenizer)  # fmt: skip
    assert "WARNING: the validation split holds 1 sample: KTO's KL term pairs each sample" in capsys.readouterr().err
