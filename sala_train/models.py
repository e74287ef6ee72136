"""Tokenizer and model loading: one loader for hub ids, local directories and remote-code models.

MiniCPM-SALA ships its own modeling code; ``trust_remote_code`` is passed only when the model
config says so, and ``revision`` pins which code runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from sala_train.config.schema import AttnImplementation, DType, ModelConfig
from sala_train.errors import ModelLoadError, first_line, unloadable
from sala_train.load_errors import refuse_what_transformers_words_for_itself


def hub_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


# The files a Hugging Face tokenizer is read from (fast, SentencePiece, BPE vocabularies, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "tokenizer.tiktoken")  # fmt: skip


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    _refuse_local_remote_code_not_trusted(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **hub_kwargs(cfg))
    except unloadable() as exc:
        refuse_remote_code_not_trusted(cfg, exc)
        local = Path(cfg.name_or_path).expanduser()
        if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
            # (transformers blames a missing sentencepiece or tiktoken for the files it did not find)
            raise ModelLoadError(
                f"model.name_or_path={cfg.name_or_path}: no tokenizer there (none of {', '.join(TOKENIZER_FILES)}); "
                "copy the model's tokenizer files beside its config.json"
            ) from exc
        raise ModelLoadError(
            f"model.name_or_path={cfg.name_or_path}: cannot load its tokenizer: {exc}{_local_hint(cfg.name_or_path)}"
        ) from exc
    if tokenizer.pad_token is None:
        # Padding tokens are masked out of attention and loss, so eos (else unk) is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:  # (batches were padded with None: a TypeError at the first one)
        raise ModelLoadError(
            f"model.name_or_path={cfg.name_or_path}: its tokenizer has no pad, eos or unk token to pad batches "
            "with; give it a pad_token (its tokenizer_config.json, or special_tokens_map.json)"
        )
    # padding_side stays the model's: sala-train's collators (and TRL's) pad on the side they need
    # themselves, and the tokenizer saved in final/ and exported is the one users generate with
    # (set to "right", a base tokenizer's "left" broke batched generate() after fine-tuning).
    without_the_length_warning(tokenizer)
    return tokenizer


def without_the_length_warning(tokenizer: Any) -> None:
    """transformers warns once when a text tokenizes longer than model_max_length ("will result in
    indexing errors"): sala-train tokenizes whole texts and then cuts them at dataset.cutoff_len,
    which is itself checked against the model's positions, so the warning is only ever misleading."""
    if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True


def _refuse_local_remote_code_not_trusted(cfg: ModelConfig) -> None:
    """A local model whose config.json maps its type to its own code, which transformers does not
    know: refused before its tokenizer loads (transformers loads one, with a warning about a model
    "of type ``", and refuses only the model's config, after the data is tokenized)."""
    path = Path(cfg.name_or_path).expanduser() / "config.json"
    if cfg.trust_remote_code or not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # (the config check says what is wrong with it)
    if not isinstance(config, dict) or not isinstance(config.get("auto_map"), dict):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(_NOT_TRUSTED.format(name=cfg.name_or_path))


_NOT_TRUSTED = (
    "model.name_or_path={name}: its config.json names its own code (auto_map), which runs only with "
    "model.trust_remote_code=true: read that code, then set it (and pin model.revision for a hub model)"
)


def refuse_remote_code_not_trusted(cfg: ModelConfig, exc: BaseException) -> None:
    """transformers' refusal of a model's own code names its own argument (``trust_remote_code=True``),
    not the key to set."""
    if not cfg.trust_remote_code and "trust_remote_code=True" in str(exc):
        raise ModelLoadError(_NOT_TRUSTED.format(name=cfg.name_or_path)) from exc


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


@contextlib.contextmanager
def _drawn_from(seed: int) -> Iterator[None]:
    """Weights a checkpoint lacks (a config.json with more layers than its weights, a new head),
    which transformers initialises at random with a MISSING table, are drawn from ``seed`` alone.
    From the caller's random state they differed between the run and ``sala-export``, which then
    merged the adapter into other weights than it was trained on (and between a run and its resume,
    wherever the data's preparation drew numbers). The caller's random state is left as it was."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def stop_at_reply_end(model: Any, tokenizer: Any) -> str | None:
    """Make ``model`` stop generating at the token its chat template ends replies with, when its
    generation config does not already: returns that token, or None when nothing changed.

    A base model given a chat template (``dataset.template=chatml`` on a tokenizer whose eos is
    ``<|endoftext|>``, a base Qwen's own template) learns to end each reply with ``<|im_end|>``,
    but generate() and vLLM stop only at the generation config's eos ids, so the fine-tuned model
    wrote ``<|im_end|><|im_end|>...`` up to the token limit. The tokenizer's eos stays as it was:
    pre-training data and the loss masks are built with it. TemplateError when the template
    refuses the probe conversations (``reply_end_token``)."""
    from sala_train.data.chat import reply_end_token

    end = reply_end_token(tokenizer)
    config = getattr(model, "generation_config", None)
    if end is None or config is None:
        return None
    end_id = tokenizer.convert_tokens_to_ids(end)
    eos = config.eos_token_id
    stops = [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]
    if not isinstance(end_id, int) or end_id in stops:
        return None
    config.eos_token_id = [*stops, end_id]
    return str(end)


def load_model(cfg: ModelConfig, seed: int) -> Any:
    """The causal LM as configured: pretrained weights, or random init from config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_attention_available(cfg)
    if cfg.attn_implementation is AttnImplementation.SALA_VARLEN:
        from sala_train import attention

        attention.register()
    common = {"dtype": torch_dtype(cfg), "attn_implementation": cfg.attn_implementation.value}
    held = _HeldLoadReport()
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
            with held, _drawn_from(seed):
                # use_kernels=False: transformers 5.25 turned Hub kernels on by default, which swaps layers for
                # code fetched from the Hub at load time (offline: a load error). Kernels here are model.liger's.
                model, loading = AutoModelForCausalLM.from_pretrained(
                    cfg.name_or_path, **hub_kwargs(cfg), **common, use_kernels=False, output_loading_info=True
                )
                _refuse_weights_without_a_place(cfg, model, loading)
    except unloadable() as exc:
        refuse_remote_code_not_trusted(cfg, exc)
        refuse_what_transformers_words_for_itself(cfg, exc)
        raise ModelLoadError(f"model.name_or_path={cfg.name_or_path}: cannot load the model: {exc}") from exc
    except (SafetensorError, pickle.UnpicklingError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and _shapes_differ(exc):
            raise ModelLoadError(
                f"model.name_or_path={cfg.name_or_path}: its weights do not match its config.json "
                f"({held.mismatch(exc)}): the config.json is not the one these weights were saved with (edited, or "
                "from another model or size); restore the model's own config.json, or download the model again"
            ) from exc  # (transformers' asks for ignore_mismatched_sizes: those weights would be random)
        if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in str(exc):
            raise  # (only torch.load's reader failing on a .bin is about the file)
        why = _plain(first_line(exc))  # (torch colours its message)
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


def _refuse_weights_without_a_place(cfg: ModelConfig, model: Any, loading: dict[str, Any]) -> None:
    """Weights in the files of layers the model built from config.json does not have, weights saved
    under a wrapper's prefix, or a model none of whose weights were in the files: transformers loads
    what matches, starts the rest at random and trains on with a table in the log. A config.json
    with fewer layers than the weights trained a truncated model; a peft-wrapped model's
    ``state_dict`` trained a model all random. Other unexpected weights stay allowed, as transformers
    allows them: a multimodal checkpoint loaded as its text model (Llama 4, Mllama: the vision tower
    is left out), a legacy buffer (GPT-2's ``masked_bias``). (ZeRO-3's loader lists no unexpected
    weights: there only the all-missing case can be seen.) Missing weights alone, a config with a
    layer or a head more than its checkpoint, stay allowed: they are drawn from the seed
    (``_drawn_from``)."""
    unexpected = sorted(loading.get("unexpected_keys") or ())
    missing = set(loading.get("missing_keys") or ())
    where = f"model.name_or_path={cfg.name_or_path}"
    prefix = _saved_with_prefix(unexpected, missing)
    if prefix:
        raise ModelLoadError(
            f"{where}: its weights are saved under the prefix {prefix!r} ({unexpected[0]}), so none has a place in "
            "the model its config.json builds: a wrapper's state_dict (a peft model's: merge_and_unload() it first); "
            "save the model itself with save_pretrained"
        )
    shape = {_layer_shape(name) for name, _ in (*model.named_parameters(), *model.named_buffers())}
    other_layers = [name for name in unexpected if _layer_shape(name) in shape]
    if other_layers:
        more = f", and {len(other_layers) - 3} more" if len(other_layers) > 3 else ""
        raise ModelLoadError(
            f"{where}: {len(other_layers)} weight(s) in its files have no place in the model its config.json builds "
            f"({', '.join(other_layers[:3])}{more}): layers it does not have, so the config.json is not the one these "
            "weights were saved with (edited: fewer layers than the weights); restore the model's own config.json"
        )
    named = {name for name, _ in model.named_parameters()}
    if named and named <= missing:
        raise ModelLoadError(
            f"{where}: none of the model's weights are in its files (it would train from random weights): they are "
            "named for another model, or saved under a prefix; save the model again with save_pretrained, or set "
            "model.from_scratch=true to start from random weights on purpose"
        )


def _layer_shape(name: str) -> str:
    """A weight's name with its layer numbers left out (``model.layers.#.mlp.up_proj.weight``)."""
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


def _saved_with_prefix(unexpected: list[str], missing: set[str]) -> str | None:
    """The prefix every unexpected weight has before the name of a missing one (or of a peft
    adapter's own weights around one: ``...q_proj.base_layer.weight``, ``...lora_A...``), if one does."""

    def of_the_model(key: str) -> bool:
        return key in missing or key.replace(".base_layer.", ".") in missing or ".lora_" in key

    for name in missing:
        if unexpected and unexpected[0].endswith("." + name):
            prefix = unexpected[0][: -len(name)]
            if all(key.startswith(prefix) and of_the_model(key[len(prefix) :]) for key in unexpected):
                return prefix
    return None


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _shapes_differ(exc: RuntimeError) -> bool:
    """transformers' refusal of weights whose shapes differ from the model its config builds."""
    text = str(exc)
    return "ignore_mismatched_sizes" in text or ("Error(s) in loading state_dict" in text and "size mismatch" in text)


class _HeldLoadReport(logging.Filter):
    """transformers logs a table of the weights that did not load as they are (missing, unexpected,
    of another shape) before it raises on a shape: held back while the model loads, it becomes part
    of sala-train's one message on that failure or on a refusal of the weights, and is logged as it
    was otherwise. So is the rest of what transformers' loader logs meanwhile (``This checkpoint seem
    corrupted``, of weights such a refusal names)."""

    LOGGER = "transformers.modeling_utils"

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)  # (the table, and what transformers says of the same weights beside it)
        return False

    def __enter__(self) -> _HeldLoadReport:
        logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeFilter(self)
        said = isinstance(exc, ModelLoadError) or (isinstance(exc, RuntimeError) and _shapes_differ(exc))
        if not said:  # (a refusal says what the table would)
            for record in self.records:
                logger.handle(record)

    def mismatch(self, exc: RuntimeError) -> str:
        """Which weights differ, from the held report's MISMATCH rows (or transformers' own message)."""
        rows = []
        for record in self.records:
            for line in _plain(record.getMessage()).splitlines():
                cells = [cell.strip() for cell in line.split("|")]
                if len(cells) >= 3 and cells[1] == "MISMATCH":
                    shapes = re.search(r"ckpt: torch\.Size\((\[.*?\])\) vs model: ?torch\.Size\((\[.*?\])\)", line)
                    rows.append(
                        f"{cells[0]}: {shapes[1]} in the weights, {shapes[2]} by the config" if shapes else cells[0]
                    )
        if not rows:  # (under ZeRO-3 transformers logs no report: torch's own message names them)
            text = _plain(str(exc))
            rows = [f"{name}: {ours} in the weights, {theirs} by the config" for name, ours, theirs in re.findall(
                r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, "
                r"the shape in current model is torch\.Size\((\[.*?\])\)", text)]  # fmt: skip
        if not rows:
            return _plain(first_line(exc))
        rows.sort()
        more = f", and {len(rows) - 1} more" if len(rows) > 1 else ""
        return f"{rows[0]}{more}"
