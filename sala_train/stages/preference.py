"""DPO and KTO with TRL's own trainers and losses, fed with sala-train's tokenization.

TRL tokenizes with its own chat-template handling; we hand it ``prompt_ids`` / ``chosen_ids`` /
``rejected_ids`` (DPO) or ``prompt_ids`` / ``completion_ids`` / ``label`` (KTO) built from the same
segments as SFT, and skip only its tokenization step. Reference model: for LoRA, TRL's frozen copy
of the starting adapter (``ref``; LoRA starts at zero, so it computes the base), a frozen copy for full
fine-tuning (TRL would otherwise reload weights from the hub path, which for a model built from
config are not the ones being trained).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator
from typing import Any

from sala_train.config.schema import DpoLoss, DpoStage, FullMethod, KtoStage
from sala_train.console import say
from sala_train.evaluation import evaluate_by_samples, trl_figures
from sala_train.ranks import is_main_process
from sala_train.stages.inputs import TrainerInputs

PRETOKENIZED = "prompt_ids"
# The logit-scale attributes TRL's fused LM head reads itself (trl.trainer.utils.add_fused_lm_head).
TRL_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@contextlib.contextmanager
def mup_scale_told_to_trl(*models: Any) -> Iterator[None]:
    """While TRL's DPO/KTO trainer is built: MiniCPM's muP logit scale, as ``logit_scale``.

    TRL scores tokens with a fused LM head, ``last_hidden_state @ lm_head.weight``, scaled only by
    the config attributes it knows. MiniCPM (MiniCPM-SALA included) divides the hidden states by
    ``hidden_size / dim_model_base`` before its ``lm_head``, which TRL does not read: every log-prob,
    reward and KL would come from logits that many times too sharp (16 for MiniCPM4's 4096 / 256).
    The head reads the scale once, when the trainer patches the model, so it is set for that moment
    only and the config saved with the model stays the model's own.
    """
    told = []
    for model in models:
        config = model.config.get_text_config() if model is not None else None
        base = getattr(config, "dim_model_base", None)
        if base is None or any(getattr(config, name, None) is not None for name in TRL_LOGIT_SCALES):
            continue
        config.logit_scale = base / config.hidden_size
        told.append(config)
    try:
        yield
    finally:
        for config in told:
            del config.logit_scale


class SampleWeightedEval:
    """TRL's evaluation, by sample on any number of processes (``sala_train.evaluation``): its
    metrics were gathered across the ranks and averaged per step, and so differed with the world size."""

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> Any:
        if eval_dataset is not None:  # (the test set) prepared as TRL prepares its eval split at start
            eval_dataset = self._prepare_dataset(eval_dataset, self.processing_class, self.args,  # type: ignore[attr-defined]
                                                 metric_key_prefix)  # fmt: skip
        return evaluate_by_samples(self, trl_figures(self), metric_key_prefix, eval_dataset)


class NoModelCard:
    """TRL writes a hub model card (README.md, naming no model) into the run directory at every
    checkpoint; the run directory's record is config.yaml and provenance.json instead."""

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        return None


class PerSampleSteps:
    """Each pair (DPO) or sample (KTO) of an optimizer step weighs the same in its loss, in any
    batch layout.

    TRL's loss is its micro-batch's mean, and the Trainer divides it by the micro-batches in the
    accumulation window: a mean of means. A window's micro-batches are equal but in the last step of
    an epoch, where one may be short (a pair alone there weighed as much as 4 together in batches of
    4). Here each micro-batch's mean is weighted by its share of the step's samples. On several
    processes accelerate fills every micro-batch (``even_batches``, the Trainer's setting), so each
    process's share is the global one: no collective needed. A full window gets a weight of exactly
    1: nothing else changes. (TRL's other logged figures, rewards and log-probs, stay its means per
    micro-batch.) The Trainer's own per-item scaling (``num_items_in_batch``) counts label tokens,
    which preference batches do not have.
    """

    _step_samples: int | None = None

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        self._step_samples = sum(self._samples_in(b) for b in batches)
        return batches, items

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
                     ) -> Any:  # fmt: skip
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        if not model.training or not self._step_samples:
            return result
        # (the Trainer divides by current_gradient_accumulation_steps: the micro-batches of this window)
        share = self._samples_in(inputs) * self.current_gradient_accumulation_steps / self._step_samples  # type: ignore[attr-defined]
        if share == 1:
            return result
        if return_outputs:
            return result[0] * share, result[1]
        return result * share

    @staticmethod
    def _samples_in(batch: dict[str, Any]) -> int:
        raise NotImplementedError


class OneTokenCount:
    """TRL logs its own ``num_tokens``, which starts again from 0 on a resume (its counter is not in
    the checkpoint); the Trainer's ``num_input_tokens_seen`` is restored and is the run's count."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for recorded in self._metrics.values():  # type: ignore[attr-defined]
            recorded.pop("num_tokens", None)
        super().log(logs, start_time)  # type: ignore[misc]


def _shared_bases() -> tuple[type, ...]:
    """What both preference trainers add to TRL's, in method-resolution order."""
    from sala_train.best_checkpoint import BestAmongCheckpoints
    from sala_train.stages.flops import CachedFlops
    from sala_train.stages.token_count import DeferredTokenCount

    return (BestAmongCheckpoints, SampleWeightedEval, PerSampleSteps, NoModelCard, OneTokenCount, DeferredTokenCount,
            CachedFlops)  # fmt: skip


def _dpo_class() -> type:
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(*_shared_bases(), DPOTrainer):  # type: ignore[misc]
        @staticmethod
        def _samples_in(batch: dict[str, Any]) -> int:
            return len(batch["input_ids"]) // 2  # (chosen then rejected: TRL's DataCollatorForPreference)

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if PRETOKENIZED in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def _kto_class() -> type:
    from trl import KTOTrainer

    class PretokenizedKTOTrainer(*_shared_bases(), KTOTrainer):  # type: ignore[misc]
        @staticmethod
        def _samples_in(batch: dict[str, Any]) -> int:
            return len(batch["label"])

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if PRETOKENIZED not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if dataset_name == "train":
                labels = dataset["label"]
                advice = kto_weight_advice(sum(labels), len(labels) - sum(labels), self.desirable_weight,
                                           self.undesirable_weight)  # fmt: skip
                if advice and is_main_process():
                    say(f"sala-train: WARNING: {advice}", sys.stderr)
                # TRL's KTO reads its train split in order (its KL pairs are fixed per batch): a file
                # sorted by label gave batches of one label. Shuffled once here, seeded; the same
                # order every epoch, as the pairs require.
                dataset = dataset.shuffle(seed=args.seed).flatten_indices()
            if not self.calculate_KL:
                return dataset

            # TRL's KL estimate pairs each prompt with the previous completion of its batch; its
            # _prepare_dataset does this after tokenizing, so it is repeated here for our ids. Unlike
            # TRL, a last group of one sample (a split of 2k+1 samples in batches of 2) is paired with
            # the sample before it: paired with its own completion, its KL term was its own log-ratio,
            # which held its loss at 0.5 whatever the model (a one-sample validation split's eval_loss).
            def add_kl_completion_ids(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
                completions = batch["completion_ids"]
                if len(completions) == 1 and indices[0] > 0:
                    batch["KL_completion_ids"] = [dataset[indices[0] - 1]["completion_ids"]]
                else:
                    batch["KL_completion_ids"] = [completions[-1], *completions[:-1]]
                return batch

            if len(dataset) == 1 and is_main_process():
                split = {"eval": "validation"}.get(dataset_name, dataset_name)
                say(f"sala-train: WARNING: the {split} split holds 1 sample: KTO's KL term pairs each sample "
                    "with another one's completion, so its loss is held at 0.5 whatever the model; give it more "
                    "samples", sys.stderr)  # fmt: skip
            return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size,
                               with_indices=True)  # fmt: skip

    return PretokenizedKTOTrainer


def kto_weight_advice(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float
                      ) -> str | None:  # fmt: skip
    """TRL's check of KTO's weights against the training set's balance, said with sala-train's keys
    (TRL's own warning comes from the dataset preparation this module replaces). The ranges are
    those of Eq. (8) of the KTO paper (arXiv 2402.01306), as TRL computes them: the weighted counts
    of desirable and undesirable examples should be in a ratio between 1 and 4/3."""
    if not desirable or not undesirable:  # (no weights balance a kind that is not there)
        missing, present = ("desirable", undesirable) if not desirable else ("undesirable", desirable)
        return (f"the training set has no {missing} examples (all {present} are of the other kind): KTO learns "
                "from the contrast of both; check the data's label column (kto_tag)")  # fmt: skip
    if desirable == undesirable:
        return None
    good_low = round(undesirable * undesirable_weight / desirable, 2)
    good_high = round(undesirable * undesirable_weight / desirable * 1.33, 2)
    bad_low = round(desirable * desirable_weight / undesirable / 1.33, 2)
    bad_high = round(desirable * desirable_weight / undesirable, 2)
    if good_low <= desirable_weight <= good_high or bad_low <= undesirable_weight <= bad_high:
        return None
    return (
        f"the training set has {desirable} desirable and {undesirable} undesirable examples, and "
        f"stage.desirable_weight={desirable_weight:g} with stage.undesirable_weight={undesirable_weight:g} do not "
        f"balance them (KTO paper, Eq. 8); set EITHER stage.desirable_weight in [{good_low:g}, {good_high:g}] OR "
        f"stage.undesirable_weight in [{bad_low:g}, {bad_high:g}], not both"
    )


def dpo_loss_args(stage: DpoStage) -> dict[str, Any]:
    """TRL's DPOConfig loss settings for ``stage``.

    Conservative DPO (``label_smoothing`` e > 0 on the sigmoid loss: (1-e)S + eF, where S is
    -logsigmoid(beta*delta) and F is -logsigmoid(-beta*delta)) is no loss type of TRL's since 1.x:
    its ``sigmoid`` ignores the smoothing. Its ``robust`` loss is R = ((1-e)S - eF) / (1-2e), so the
    weighted sum 2(1-e)S - (1-2e)R is exactly conservative DPO, with TRL's own terms.
    """
    smoothing = stage.label_smoothing
    if stage.loss_type is DpoLoss.SIGMOID and smoothing > 0:
        return {"beta": stage.beta, "loss_type": ["sigmoid", "robust"], "label_smoothing": smoothing,
                "loss_weights": [2 * (1 - smoothing), -(1 - 2 * smoothing)]}  # fmt: skip
    return {"beta": stage.beta, "loss_type": [stage.loss_type.value], "label_smoothing": smoothing}


def _reference_model(inputs: TrainerInputs) -> Any:
    """Full fine-tuning's frozen reference: a copy of the policy as loaded. A policy loaded
    partitioned under ZeRO-3 cannot be copied (its parameters are DeepSpeed's partitions): the
    reference is loaded again, partitioned too, with the same weights (training has not begun)."""
    from sala_train.zero3_loading import is_partitioned

    if not is_partitioned(inputs.model):
        return copy.deepcopy(inputs.model).eval().requires_grad_(False)
    from sala_train.distributed import fail_together
    from sala_train.errors import ModelLoadError
    from sala_train.models import load_model

    # (weights the checkpoint lacks are drawn from the seed, as they were for the policy)
    reference = fail_together(lambda: load_model(inputs.cfg.model, seed=inputs.cfg.train.seed), ModelLoadError)
    reference.config.use_cache = inputs.model.config.use_cache
    return reference.eval().requires_grad_(False)


def _without_attention_dropout(*models: Any) -> None:
    """TRL's ``disable_dropout`` sets ``nn.Dropout`` modules to 0, but most attention layers keep
    their rate as a float read in training (Llama's ``attention_dropout``): a model configured with
    one kept it, so the policy's log-probs were noisy against the reference's. The config is left
    as it is: the saved model keeps the rate it was given."""
    for model in models:
        for module in model.modules() if model is not None else ():
            for name in ("attention_dropout", "attn_dropout"):
                rate = getattr(module, name, None)
                if isinstance(rate, int | float) and not isinstance(rate, bool) and rate > 0:
                    setattr(module, name, 0.0)


def _pair_padding_multiple(cfg: Any, model: Any) -> int | None:
    """``collators.pair_padding_multiple`` for this model; set explicitly and not applied, said."""
    from sala_train.data.collators import pair_padding_multiple

    multiple, why_not = pair_padding_multiple(cfg, model.config.get_text_config())
    if why_not is not None and cfg.train.pad_to_multiple_of is not None and is_main_process():
        say(f"sala-train: train.pad_to_multiple_of={cfg.train.pad_to_multiple_of} not applied: TRL's "
            f"{cfg.stage.name} collator rounds with no cap, and {why_not}; its batches pad to their "
            "longest")  # fmt: skip
    return multiple


def build_trainer(inputs: TrainerInputs) -> Any:
    from trl import DPOConfig, KTOConfig

    cfg = inputs.cfg
    common = {"max_length": None, "precompute_ref_log_probs": False,  # cutoff_len was applied when tokenizing
              "pad_to_multiple_of": _pair_padding_multiple(cfg, inputs.model)}  # fmt: skip
    match cfg.stage:
        case DpoStage() as dpo:
            trainer_class, args_class = _dpo_class(), DPOConfig
            stage_args = common | dpo_loss_args(dpo)
        case KtoStage(beta=beta, desirable_weight=good, undesirable_weight=bad):
            trainer_class, args_class = _kto_class(), KTOConfig
            stage_args = common | {"beta": beta, "desirable_weight": good, "undesirable_weight": bad}
            # TRL pairs each prompt with another sample's completion for the KL term, after this
            # tokenization: a long prompt with a long completion ran past cutoff_len (and the model's
            # positions). Its collator cuts them from the end at max_length; the samples themselves
            # fit already, and their prompts leave room for a reply, so nothing else changes.
            # A pair of a long prompt and another sample's long completion may also pass the model's
            # positions where cutoff_len is above them (each sample was checked against them alone):
            # a GPT-2's learned positions failed mid-training; RoPE trained on positions never learned.
            positions = getattr(inputs.model.config.get_text_config(), "max_position_embeddings", None)
            fits = positions if isinstance(positions, int) and positions > 0 else cfg.dataset.cutoff_len
            stage_args["max_length"] = min(cfg.dataset.cutoff_len, fits)
        case _:
            raise AssertionError(cfg.stage)
    reference = _reference_model(inputs) if isinstance(cfg.method, FullMethod) else None
    _without_attention_dropout(inputs.model, reference)  # (TRL's disable_dropout does the nn.Dropout ones)
    with mup_scale_told_to_trl(inputs.model, reference):
        return trainer_class(
            model=inputs.model,
            ref_model=reference,
            args=inputs.arguments(args_class, stage_args),
            train_dataset=inputs.data.splits["train"],
            eval_dataset=inputs.data.splits["validation"],
            processing_class=inputs.tokenizer,
            callbacks=inputs.trainer_callbacks(),
        )
