"""Tokenizer and model loading: one loader for hub ids, local directories and remote-code models.

MiniCPM-SALA ships its own modeling code; ``trust_remote_code`` is passed only when the model
config says so, and ``revision`` pins which code runs.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from sala_train.config.schema import AttnImplementation, DType, ModelConfig
from sala_train.errors import ModelLoadError, first_line


def hub_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **hub_kwargs(cfg))
    except (OSError, ValueError, ImportError) as exc:  # ImportError: its remote code needs a package not here
        raise ModelLoadError(
            f"model.name_or_path={cfg.name_or_path}: cannot load its tokenizer: {exc}{_local_hint(cfg.name_or_path)}"
        ) from exc
    if tokenizer.pad_token is None:
        # Padding tokens are masked out of attention and loss, so eos is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    # transformers warns once when a text tokenizes longer than model_max_length ("will result in
    # indexing errors"): sala-train tokenizes whole texts and then cuts them at dataset.cutoff_len,
    # which is itself checked against the model's positions, so the warning is only ever misleading.
    if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def _local_hint(name: str) -> str:
    """``models/nope`` beside a ``models/`` directory reads as a hub id; the user most likely
    meant a local path (a hub id of that shape is not refused: it may simply not be downloaded)."""
    first, _, rest = name.partition("/")
    if not rest or not first or not Path(first).is_dir():
        return ""
    return (
        f"\n(if you meant a local directory: {Path(first).resolve()} has no {rest!r}; a local path may start with ./)"
    )


def torch_dtype(cfg: ModelConfig) -> torch.dtype | str:
    return {
        DType.AUTO: "auto",
        DType.FLOAT32: torch.float32,
        DType.BFLOAT16: torch.bfloat16,
        DType.FLOAT16: torch.float16,
    }[cfg.dtype]


def check_attention_available(cfg: ModelConfig) -> None:
    """Refuse, rather than silently fall back, when the asked attention kernel cannot run here."""
    if cfg.attn_implementation is AttnImplementation.SALA_VARLEN and not torch.cuda.is_available():
        raise ModelLoadError(
            "model.attn_implementation=sala_varlen needs a CUDA GPU; on CPU packed batches use "
            "model.attn_implementation=sdpa (block-diagonal mask)"
        )
    if cfg.attn_implementation is AttnImplementation.FLASH_ATTENTION_2:
        if not torch.cuda.is_available():
            raise ModelLoadError(
                "model.attn_implementation=flash_attention_2 needs a CUDA GPU; "
                "on this machine use model.attn_implementation=sdpa"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise ModelLoadError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn --no-build-isolation); or use model.attn_implementation=sdpa"
            )


def load_model(cfg: ModelConfig, seed: int) -> Any:
    """The causal LM as configured: pretrained weights, or random init from config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_attention_available(cfg)
    if cfg.attn_implementation is AttnImplementation.SALA_VARLEN:
        from sala_train import attention

        attention.register()
    common = {"dtype": torch_dtype(cfg), "attn_implementation": cfg.attn_implementation.value}
    try:
        if cfg.from_scratch:
            config = AutoConfig.from_pretrained(cfg.name_or_path, **hub_kwargs(cfg))
            torch.manual_seed(seed)
            dtype = common.pop("dtype")
            # (a revision names the config's files, fetched above; the model is built from it)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code, **common)
            if isinstance(dtype, torch.dtype):
                model = model.to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **hub_kwargs(cfg), **common)
    except (OSError, ValueError, ImportError) as exc:  # ImportError: its remote code needs a package not here
        raise ModelLoadError(f"model.name_or_path={cfg.name_or_path}: cannot load the model: {exc}") from exc
    except (SafetensorError, pickle.UnpicklingError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in str(exc):
            raise  # (only torch.load's reader failing on a .bin is about the file)
        why = re.sub(r"\x1b\[[0-9;]*m", "", first_line(exc))  # (torch colours its message)
        if isinstance(exc, pickle.UnpicklingError):  # a .bin: damaged, or holding more than tensors
            raise ModelLoadError(
                f"model.name_or_path={cfg.name_or_path}: a .bin weights file cannot be loaded ({why}): it is damaged, "
                "or holds objects besides tensors, which torch.load refuses to unpickle; download the model again, "
                "or save it as safetensors"
            ) from exc
        raise ModelLoadError(
            f"model.name_or_path={cfg.name_or_path}: a weights file is damaged or incomplete ({why}); "
            "download or copy the model again"
        ) from exc
    return model
