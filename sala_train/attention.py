"""``model.attn_implementation=sala_varlen``: PyTorch's own variable-length flash attention
(``torch.nn.attention.varlen``, CUDA) registered as a transformers attention implementation, so
packed batches run flash attention without building the flash-attn package.

Sequence boundaries come from the ``cu_seq_lens_*`` / ``max_length_*`` keywords that
``PackedCollator(varlen_kwargs=True)`` adds to every batch; transformers passes model keywords
through to the attention function.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from sala_train.config.schema import AttnImplementation, ModelConfig, TrainConfig
from sala_train.config.validate import VARLEN_PRECISION
from sala_train.errors import ModelLoadError

VARLEN = "sala_varlen"
MAX_HEAD_DIM = 256  # (flash attention 2's forward, as torch builds it: head sizes up to 256)


def varlen_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    varlen_attn, takes_gqa = _kernel()
    batch, heads, length, dim = query.shape
    if cu_seq_lens_q is None:
        # A padded batch (or generation): transformers passes no mask (none is registered), so its
        # padding cannot be told apart. sala-train never sends one (validation requires packing
        # with sala_varlen; the packing check's padded pass runs under sdpa).
        raise ValueError("sala_varlen attention takes packed batches with their segment bounds (the collator of "
                         "train.packing=true); load the model with attn_implementation='sdpa' for padded batches or "
                         "generation")  # fmt: skip
    if dropout:
        raise ValueError("sala_varlen attention does not implement attention dropout")
    if (unsupported := _unsupported(module, kwargs)) is not None:  # (met at the packing check's first pass)
        raise ModelLoadError(f"model.attn_implementation=sala_varlen: this model's attention uses {unsupported}, "
                             "which sala_varlen does not apply; use model.attn_implementation=sdpa, or eager for a "
                             "model without sdpa such as Gemma 2 (train.packing=true works with either)")  # fmt: skip
    dtype = _sixteen_bit(query)
    value_dim = value.shape[-1]
    if value_dim > dim:
        raise ModelLoadError(f"model.attn_implementation=sala_varlen: this model's value heads ({value_dim}) are "
                             f"larger than its query heads ({dim}); use model.attn_implementation=sdpa")  # fmt: skip
    if dim > MAX_HEAD_DIM:  # (Gemma 4's global layers: 512; the kernel's own refusal was a RuntimeError)
        raise ModelLoadError(f"model.attn_implementation=sala_varlen: this model's attention heads have {dim} "
                             f"dimensions, and the flash kernel takes at most {MAX_HEAD_DIM}; use "
                             "model.attn_implementation=sdpa (train.packing=true works with it)")  # fmt: skip
    # Flash kernels take one head size, a multiple of 8: MLA (DeepSeek-V2/V3) gives values a smaller
    # head than queries and keys, and some models an odd size. Zero dimensions change no dot product
    # nor any output dimension kept, so all three are zero-padded and the output cut back (as
    # transformers' flash path pads values), the scale staying that of the real head size.
    padded = -(-dim // 8) * 8
    scaling = dim**-0.5 if scaling is None else scaling
    query, key, value = (torch.nn.functional.pad(t, (0, padded - t.shape[-1])) if t.shape[-1] < padded else t
                         for t in (query, key, value))  # fmt: skip
    # (B, H, T, D) -> (B*T, H, D), the layout varlen kernels take.
    q = query.transpose(1, 2).reshape(batch * length, heads, padded).to(dtype)
    k = key.transpose(1, 2).reshape(batch * key.shape[2], key.shape[1], padded).to(dtype)
    v = value.transpose(1, 2).reshape(batch * value.shape[2], value.shape[1], padded).to(dtype)
    gqa = {}
    if heads != key.shape[1] and takes_gqa:
        gqa = {"enable_gqa": True}
    elif heads != key.shape[1]:  # a torch whose varlen_attn has no enable_gqa (2.11): one KV head per query head
        k, v = (t.repeat_interleave(heads // key.shape[1], dim=1) for t in (k, v))
    # Causal, within the layer's sliding window when it has one (Mistral, Qwen2, Gemma's local
    # layers pass it; Qwen2-MoE's layers only hold it, their mask applying it): a query sees itself
    # and the sliding_window - 1 tokens before it, as transformers' sdpa mask does.
    # (given as None, the layer means it: EXAONE 4's full-attention layers hold the window too)
    sliding_window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    window = (int(sliding_window) - 1, 0) if sliding_window else (-1, 0)
    out = varlen_attn(q, k, v, cu_seq_lens_q.to(query.device), (cu_seq_lens_k if cu_seq_lens_k is not None
                      else cu_seq_lens_q).to(query.device), int(max_length_q or length), int(max_length_k or length),
                      scale=scaling, window_size=window, **gqa)  # fmt: skip
    return out.reshape(batch, length, heads, padded)[..., :value_dim], None


def _sixteen_bit(query: torch.Tensor) -> torch.dtype:
    """The dtype the kernel computes in: flash attention takes bfloat16/float16 only. Float32 weights
    train under the Trainer's autocast, yet reach here in float32 (RoPE's float32 cos/sin promote the
    query back), so they are cast to autocast's dtype, as transformers' flash attention does."""
    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    raise ValueError(VARLEN_PRECISION.format(weights="the model"))


# What a layer hands its attention function beyond plain causal attention, which the kernel call
# here would ignore: logit softcapping (Gemma 2), attention sinks (GPT-OSS's s_aux, others' sinks),
# sparse-attention indices (DeepSeek-V3.2), a position bias.
_UNSUPPORTED_ARGUMENTS = {"softcap": "attention logit softcapping", "s_aux": "attention sinks",
                          "sinks": "attention sinks", "indices": "sparse attention indices",
                          "position_bias": "a position bias"}  # fmt: skip


def _unsupported(module: Any, kwargs: dict[str, Any]) -> str | None:
    """What this layer's attention does that the kernel call here does not (it computes plain
    causal softmax attention, within a sliding window), or None. Asked of what the layer passes,
    not of its config (Gemma 3's config carries a softcapping value its layers never apply), but
    for what it passes in training only (attention dropout: the packing check runs in eval mode)
    or applies through the mask alone (Llama 4's chunked attention: this kernel reads no mask)."""
    for name in ("attention_dropout", "attn_dropout"):  # (a rate, or an nn.Dropout: GPT-2, Persimmon)
        rate = getattr(getattr(module, name, None), "p", getattr(module, name, 0.0))
        if isinstance(rate, int | float) and rate > 0:
            return f"attention dropout ({name}={rate})"
    chunk = getattr(getattr(module, "config", None), "attention_chunk_size", None)
    if chunk and getattr(module, "use_rope", True):  # (Llama 4: its layers without RoPE attend unchunked)
        return f"chunked attention (attention_chunk_size={chunk})"
    for name, what in _UNSUPPORTED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            value = kwargs[name]
            return f"{what} ({name}={value})" if isinstance(value, int | float) else what
    causal = kwargs.get("is_causal")
    if causal is False or (causal is None and getattr(module, "is_causal", True) is False):
        return "non-causal attention"
    return None


def check_precision(cfg: ModelConfig, train: TrainConfig, model: Any) -> None:
    """After loading (``model.dtype=auto`` takes the checkpoint's): float32 weights need 16-bit training."""
    if cfg.attn_implementation is not AttnImplementation.SALA_VARLEN or train.bf16 or train.fp16:
        return
    if getattr(model, "dtype", None) == torch.float32:
        weights = f"model.dtype={cfg.dtype.value} (here: float32)"
        raise ModelLoadError(f"model.name_or_path={cfg.name_or_path}: " + VARLEN_PRECISION.format(weights=weights))


@functools.cache
def _kernel() -> tuple[Callable[..., torch.Tensor], bool]:
    """torch's varlen_attn, and whether it takes ``enable_gqa`` (torch 2.13 does, 2.11 does not)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def register() -> None:
    """Make ``attn_implementation="sala_varlen"`` loadable (idempotent). No mask function is
    registered for it: the segments come from the packed batch's ``cu_seq_lens``, and with one
    registered, transformers looks for packed sequences in the position ids before every forward
    (``find_packed_sequence_indices``), reading a flag back from the GPU: a host sync per forward
    for a mask the kernel never reads."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
