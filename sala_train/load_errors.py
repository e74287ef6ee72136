"""transformers' load errors that advise its own API, or list some 200 classes, said instead with
the config key to change: one module, so that a dry run (``memory``) refuses what the run does
without importing the model loader."""

from __future__ import annotations

import re

from sala_train.config.schema import AttnImplementation, ModelConfig
from sala_train.errors import ModelLoadError


def refuse_what_transformers_words_for_itself(cfg: ModelConfig, exc: BaseException) -> None:
    """Two refusals of transformers' whose advice is its own API (``attn_implementation="eager"``) or
    a list of some 200 classes, said with the key to change."""
    text = str(exc)
    if "scaled_dot_product_attention" in text and cfg.attn_implementation is AttnImplementation.SDPA:
        # (sala-export's fallback to eager looks for "scaled_dot_product_attention" in this message)
        model = text.split(" does not support", 1)[0].split()[-1] if " does not support" in text else "the model"
        raise ModelLoadError(
            f"model.attn_implementation=sdpa: {model} does not support attention through "
            "torch.nn.functional.scaled_dot_product_attention; set model.attn_implementation=eager"
        ) from exc
    unrecognized = re.match(r"Unrecognized configuration class <class '(?:\w+\.)*(\w+)'> for this kind of AutoModel: "
                            r"AutoModelForCausalLM", text)  # fmt: skip
    if unrecognized:
        raise ModelLoadError(
            f"model.name_or_path={cfg.name_or_path}: its config.json describes a {unrecognized[1]} model, which is "
            "not a causal language model (transformers has no AutoModelForCausalLM class for it); sala-train "
            "fine-tunes causal LMs: give one"
        ) from exc
