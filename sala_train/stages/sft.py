"""Supervised fine-tuning and continual pre-training with the stock ``transformers.Trainer``.

The loss mask lives in the labels (IGNORE_INDEX outside assistant turns), so the model's own
causal-LM loss is the SFT loss; with gradient accumulation it normalises by the number of trained
tokens in the whole accumulated batch (a model whose code does not: ``token_loss``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from sala_train.config.schema import AttnImplementation, RunConfig
from sala_train.data.batching import GroupCollator, GroupedDataset, budget_groups
from sala_train.data.build import row_lengths
from sala_train.data.collators import PadToLongestCollator, padding_multiple, width_limits
from sala_train.evaluation import evaluate_by_samples, model_loss
from sala_train.neftune import NoisyEmbeddings, NoisyEmbeddingsTrainer
from sala_train.packing import PackedCollator
from sala_train.ranks import is_main_process
from sala_train.stages.flops import CachedFlops
from sala_train.stages.inputs import TrainerInputs
from sala_train.stages.token_count import DeferredTokenCount


class EpochSeededLengthGroupedSampler:
    """transformers' ``LengthGroupedSampler`` draws its order from the global RNG when iterated,
    whose state a resumed run does not share (its samples were trained twice or skipped): here
    each epoch's order comes from its own generator, seeded with ``train.seed`` and the epoch,
    which ``SamplerEpoch`` sets before each epoch is iterated, on resume too."""

    def __init__(self, sampler: Any, seed: int):
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Any:
        self.sampler.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(self.sampler)


class SamplerEpoch(TrainerCallback):
    """Sets the length-grouped sampler's epoch as each epoch begins. The Trainer's own ``set_epoch``
    does not reach it under several processes once a resume skips the first batches of an epoch
    (accelerate's ``SkipBatchSampler`` around its ``BatchSamplerShard``, neither of which passes the
    epoch on): a run resumed in its second epoch or later then trained the first epoch's batches."""

    def __init__(self) -> None:
        self.samplers: list[EpochSeededLengthGroupedSampler] = []

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # (the Trainer's epoch index: its global_step // update steps per epoch, which the float
        # state.epoch, epoch + steps done / steps per epoch, carries as its whole part)
        for sampler in self.samplers:
            sampler.set_epoch(int(state.epoch or 0))


def build_trainer(inputs: TrainerInputs) -> Any:
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from sala_train.best_checkpoint import BestAmongCheckpoints

    cfg = inputs.cfg
    collator = batch_collator(cfg, inputs.tokenizer, inputs.model.config.get_text_config())
    train = inputs.data.splits["train"]
    if cfg.train.max_tokens_per_batch is not None:
        lengths = row_lengths(train)
        groups = train_groups(cfg, lengths, collator)
        train, collator = GroupedDataset(train, groups), GroupCollator(collator)

    class SftTrainer(NoisyEmbeddingsTrainer, BestAmongCheckpoints, DeferredTokenCount, CachedFlops, Trainer):  # type: ignore[misc]
        def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> Any:
            # The Trainer's multi-process eval loss drops ranks' losses, and weights batches by samples,
            # which makes the loss depend on the eval batch size (sala_train.evaluation).
            return evaluate_by_samples(self, model_loss, metric_key_prefix, eval_dataset)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                sampler = EpochSeededLengthGroupedSampler(sampler, self.args.seed)
                sampler_epoch.samplers.append(sampler)
            return sampler

    sampler_epoch = SamplerEpoch()
    trainer = SftTrainer(
        model=inputs.model,
        args=inputs.arguments(),
        train_dataset=train,
        eval_dataset=inputs.data.splits["validation"],
        data_collator=collator,
        processing_class=inputs.tokenizer,
        callbacks=[*inputs.trainer_callbacks(), sampler_epoch],
        compute_loss_func=_loss_computed_here(inputs.model),
    )
    if cfg.train.neftune_noise_alpha is not None:
        trainer.neftune = NoisyEmbeddings(inputs.model, cfg.train.neftune_noise_alpha, inputs.tokenizer.pad_token_id,
                                          cfg.train.seed)  # fmt: skip
    return trainer


def _loss_computed_here(model: Any) -> Any:
    """``token_loss.token_mean_loss`` where the model's own loss is not the step's token mean, said once."""
    from sala_train.console import say
    from sala_train.stages.token_loss import token_mean_loss, why_the_loss_is_computed_here

    why = why_the_loss_is_computed_here(model)
    if why is None:
        return None
    if is_main_process():  # (rank 0 says it)
        name = type(getattr(model, "get_base_model", lambda: model)()).__name__
        say(
            f"sala-train: the loss is computed from {name}'s logits, as the mean over each step's trained tokens: {why}"
        )
    return token_mean_loss(model)


def train_groups(cfg: RunConfig, lengths: list[int], collator: Any) -> list[list[int]]:
    """The token-budget batches (``train.max_tokens_per_batch``), costed as ``collator`` lays them out."""
    assert cfg.train.max_tokens_per_batch is not None
    row_tokens = collator.row_tokens if isinstance(collator, PackedCollator) else None
    width = collator.width_of if isinstance(collator, PadToLongestCollator) else None
    return budget_groups(lengths, cfg.train.max_tokens_per_batch, cfg.train.packing, cfg.train.seed, row_tokens, width)


def batch_collator(cfg: RunConfig, tokenizer: Any, text_config: Any = None) -> Any:
    """Packed rows (``train.packing``) or rows padded to the batch's longest sample, rounded up as
    ``collators.padding_multiple`` says, within ``dataset.cutoff_len`` and the limits of the model's
    ``text_config`` (``collators.width_limits``; none known without it)."""
    if cfg.train.packing:
        if cfg.model.attn_implementation in (AttnImplementation.SALA_VARLEN, AttnImplementation.FLASH_ATTENTION_2):
            # (transformers' flash path finds packed samples from the positions only in a batch of
            # one row; in rows of cutoff_len it attended across them: it reads these bounds instead)
            return PackedCollator(tokenizer.pad_token_id, row_tokens=None, varlen_kwargs=True)
        return PackedCollator(tokenizer.pad_token_id, row_tokens=cfg.dataset.cutoff_len)
    positions, rope_limit = width_limits(text_config) if text_config is not None else (None, None)
    limit = min(cfg.dataset.cutoff_len, positions or cfg.dataset.cutoff_len)
    return PadToLongestCollator(tokenizer.pad_token_id, padding_multiple(cfg), max_width=limit, rope_limit=rope_limit)
