"""The Trainer's count of the tokens trained on, without a host-device sync per micro-batch.

transformers' Trainer (``include_num_input_tokens_seen``) sums each micro-batch's tokens, gathers
the sum from every rank and reads it back (``.item()``) at every micro-batch: the CPU then waits
for the GPU to finish the step before it can queue the next batch, and the GPU idles while the
CPU collates. Here each micro-batch's count stays on the device and is added up there; it is
gathered and read once at the points that show or keep ``state.num_input_tokens_seen``: every log
(train, eval, the closing summary) and every checkpoint save. Every logged and saved count is the
one the Trainer would have had; every rank reaches those points together, as the Trainer's own
collectives there require.
"""

from __future__ import annotations

from typing import Any

import torch

from sala_train.packing import real_tokens


def micro_batch_tokens(inputs: dict[str, Any], pad_token_id: int | None) -> torch.Tensor:
    """The tokens of a micro-batch the Trainer's ``non_padding`` count takes, as a device tensor:
    a padded batch's attention mask; a packed one's samples (``real_tokens``: the Trainer's
    ``input_ids != pad`` drops every real EOS when the tokenizer pads with it); else every id
    that is not padding (the Trainer's rules, kept here because they end in a read-back there)."""
    ids = inputs["input_ids"]
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    if "position_ids" in inputs and "labels" in inputs and pad_token_id is not None:
        return real_tokens(inputs, pad_token_id)
    if pad_token_id is not None:
        return (ids != pad_token_id).sum()
    return torch.full((), ids.numel(), dtype=torch.int64, device=ids.device)  # (made there: no copy to wait for)


class DeferredTokenCount:
    """A Trainer mixin: ``state.num_input_tokens_seen`` brought up to date only where it is read."""

    _unread_tokens: torch.Tensor | None = None

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        if self.args.include_num_input_tokens_seen != "non_padding" or "input_ids" not in inputs:  # type: ignore[attr-defined]
            super()._track_num_input_tokens(inputs)  # type: ignore[misc]
            return
        pad = getattr(self.processing_class, "pad_token_id", None)  # type: ignore[attr-defined]
        tokens = micro_batch_tokens(inputs, pad).to(torch.int64)
        self._unread_tokens = tokens if self._unread_tokens is None else self._unread_tokens + tokens

    def tokens_seen(self) -> int:
        """``state.num_input_tokens_seen``, brought up to date (on every rank at once: a gather).
        A reader other than a log or a save (a benchmark's meter) asks here."""
        unread, self._unread_tokens = self._unread_tokens, None
        if unread is not None:
            self.state.num_input_tokens_seen += int(self.accelerator.gather(unread).sum().item())  # type: ignore[attr-defined]
        return int(self.state.num_input_tokens_seen)  # type: ignore[attr-defined]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.tokens_seen()
        super().log(logs, start_time)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.tokens_seen()  # (the checkpoint's trainer_state.json holds the count a resume continues)
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
