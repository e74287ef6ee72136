"""NEFTune (noisy embeddings for fine-tuning), scaled by each sample's own length.

NEFTune adds uniform noise of magnitude ``alpha / sqrt(L * d)`` to the input embeddings while
training, ``L`` the sequence's length and ``d`` the embedding width (Jain et al. 2023, Algorithm 1).
Written here, not taken from transformers (``TrainingArguments.neftune_noise_alpha``, which
LLaMA-Factory and TRL pass on): its hook takes ``L`` as the batch's width, so a sample's noise
depended on what it was batched with, shrank with the padding of longer neighbours, and in a packed
row of 8 samples was about a third of a padded batch's (``1/sqrt(8)``); padding got noise too. Here
every token gets its own sample's magnitude, the same packed or padded, and padding or a packed
row's filler none. Evaluation, the packing guard and anything else outside a training step see the
embeddings as they are.

The noise comes from a generator of its own, seeded by ``train.seed``, the rank, the step and the
micro-batch: not from torch's global one, so the ranks of a multi-process run draw their own noise
(with the global generator, which every rank seeds alike, ranks with batches of one shape added the
same noise to different samples), and the draws are the same whether a run was resumed or not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sala_train.errors import ModelLoadError
from sala_train.packing import sample_lengths


class NoisyEmbeddings:
    """A forward hook on the model's input embeddings that adds NEFTune's noise to the batch
    ``during`` names: per token ``U(-1, 1) * alpha / sqrt(L_i * d)``, ``L_i`` its sample's length."""

    def __init__(self, model: Any, alpha: float, pad_token_id: int, seed: int = 0):
        self.alpha, self.pad_token_id, self.seed = alpha, pad_token_id, seed
        self.draw = 0  # the generator's seed for this step: see ``during``
        self.lengths: torch.Tensor | None = None  # each token's sample length, while a training step runs
        self.added = False  # whether this step's embeddings took the noise
        embeddings = _input_embeddings(model)
        self.handle = embeddings.register_forward_hook(self._add_noise)

    @contextmanager
    def during(self, batch: dict[str, Any], rank: int = 0, step: int = 0, micro_batch: int = 0) -> Iterator[None]:
        """Noise for the forward passes of this training batch (padded: its attention mask;
        packed: its positions restarting per sample). A step whose embeddings took no noise (a
        model that does not run them, a batch they see split or laid out otherwise) stops the
        run: training on without the noise asked for would be silent."""
        self.lengths, self.added = token_sample_lengths(batch, self.pad_token_id), False
        self.draw = _mixed(self.seed, rank, step, micro_batch)
        try:
            yield
        finally:
            self.lengths = None
        if not self.added:
            raise ModelLoadError(
                "train.neftune_noise_alpha: this model's input embeddings did not run on the training batch as it "
                "was laid out, so no noise could be added; train without train.neftune_noise_alpha"
            )

    def _add_noise(self, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.lengths is None or not module.training:
            return None  # (another forward: the packing guard's, an evaluation)
        if self.lengths.shape != output.shape[:-1]:
            raise ModelLoadError(
                f"train.neftune_noise_alpha: the input embeddings ran on {tuple(output.shape[:-1])} tokens where "
                f"the training batch has {tuple(self.lengths.shape)}, so each token's sample is not known; train "
                "without train.neftune_noise_alpha"
            )
        self.added = True
        lengths = self.lengths.to(output.device, torch.float32)
        scale = torch.where(lengths > 0, self.alpha / torch.sqrt(lengths.clamp(min=1) * output.shape[-1]), 0.0)
        generator = torch.Generator(device=output.device).manual_seed(self.draw)
        self.draw = _mixed(self.draw, 1)  # (a second forward of the same step draws anew)
        # Drawn over the positions up to the last real token only, so a token's noise does not
        # depend on the padding after it (train.pad_to_multiple_of rounds the width on a GPU).
        rows, width, hidden = output.shape
        after_last_real = lengths.gt(0).any(dim=0) * torch.arange(1, width + 1, device=output.device)
        real = int(after_last_real.max())  # (the one read-back: the draw's shape; 0 without a real token)
        noise = torch.zeros_like(output, dtype=torch.float32)
        draws = torch.empty((rows, real, hidden), dtype=torch.float32, device=output.device)
        noise[:, :real] = draws.uniform_(-1, 1, generator=generator) * scale[:, :real, None]
        return output + noise.to(output.dtype)


def token_sample_lengths(batch: dict[str, Any], pad_token_id: int) -> torch.Tensor:
    """Each token's own sample's length; 0 for padding and a packed row's filler."""
    if "attention_mask" in batch:  # padded rows, one sample each
        mask = batch["attention_mask"].bool()
        return mask.sum(dim=1, keepdim=True).expand_as(mask) * mask
    if "position_ids" in batch:
        return sample_lengths(batch, pad_token_id)
    ids = batch["input_ids"]  # (one sample per row, unpadded)
    return torch.full_like(ids, ids.shape[1])


def _mixed(*numbers: int) -> int:
    """One 63-bit seed from several numbers (a polynomial hash: distinct for the small ones here)."""
    value = 0
    for n in numbers:
        value = (value * 1_000_003 + n) % (2**63 - 1)
    return value


def _input_embeddings(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # (peft: the base's)
    return base.get_input_embeddings()


class NoisyEmbeddingsTrainer:
    """A Trainer mix-in: each training step's batch gets NEFTune's noise (``self.neftune``, set
    when ``train.neftune_noise_alpha`` is)."""

    neftune: NoisyEmbeddings | None = None
    _micro_batch: tuple[int, int] = (-1, 0)  # (optimizer step, micro-batch within it)

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
                     ) -> Any:  # fmt: skip
        if self.neftune is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        step, previous = self.state.global_step, self._micro_batch  # type: ignore[attr-defined]
        self._micro_batch = (step, previous[1] + 1 if previous[0] == step else 0)
        with self.neftune.during(inputs, self.args.process_index, *self._micro_batch):  # type: ignore[attr-defined]
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
