"""The loss sala-train computes for models whose own loss is not the step's token mean."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sala_train.stages.token_loss import token_mean_loss, why_the_loss_is_computed_here


class _OwnCode(torch.nn.Module):
    """A model whose class is not transformers' own (as remote code's is)."""

    def __init__(self, **config: object) -> None:
        super().__init__()
        self.config = SimpleNamespace(**config)


def test_transformers_own_models_keep_their_loss_and_others_get_this_one():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    assert why_the_loss_is_computed_here(llama) is None
    llama.config.output_router_logits = True  # (a MoE's router loss: added per micro-batch)
    assert "router loss" in (why_the_loss_is_computed_here(llama) or "")
    assert "its code came with the model" in (why_the_loss_is_computed_here(_OwnCode()) or "")


def test_the_loss_is_the_micro_batchs_share_of_the_steps_token_mean_from_a_dict_or_a_tuple():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, 4, 5, -100]])
    shifted_logits, shifted = logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1)
    summed = torch.nn.functional.cross_entropy(shifted_logits, shifted, ignore_index=-100, reduction="sum")
    loss = token_mean_loss(_OwnCode())
    for outputs in ({"logits": logits}, (logits,)):
        torch.testing.assert_close(loss(outputs, labels, num_items_in_batch=torch.tensor(10)), summed / 10)
    torch.testing.assert_close(loss((logits,), labels), summed / 5)  # (no step count: this batch's 5 tokens)
    # A router loss counts by the micro-batch's share of the step's trained tokens (5 of 10 here).
    moe = token_mean_loss(_OwnCode(router_aux_loss_coef=0.5))
    aux = torch.tensor(2.0)
    got = moe({"logits": logits, "aux_loss": aux}, labels, num_items_in_batch=torch.tensor(10))
    torch.testing.assert_close(got, summed / 10 + 0.5 * 2.0 * 5 / 10)


def test_liger_stays_off_where_the_loss_is_computed_from_the_logits():
    """Liger's fused loss makes no logits: the loss computed here had none to take, and the
    Trainer's evaluation (skip_logits without labels) failed at once."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from sala_train.kernels import _unsupported_reason

    moe = MixtralForCausalLM(MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                                           output_router_logits=True))  # fmt: skip
    assert (_unsupported_reason(moe) or "").startswith("sala-train computes its loss from the logits (its router loss")
