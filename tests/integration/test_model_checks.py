"""A model that does not fit the run: one message naming the key to change, exit code 2, no
traceback, no run directory left. Tiny local models (config.json, and weights where they load)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_CHAT, run_cli

pytestmark = pytest.mark.slow

SHORT = ("train.max_steps=1", "train.eval_steps=1", "train.save_steps=1", "train.eval_on_start=false")

NO_CHECKPOINTING = """
from transformers import LlamaConfig, LlamaForCausalLM


class NoCheckpointingConfig(LlamaConfig):
    model_type = "no_checkpointing_llama"


class NoCheckpointingForCausalLM(LlamaForCausalLM):
    config_class = NoCheckpointingConfig
    supports_gradient_checkpointing = False
"""

NO_SDPA = (
    NO_CHECKPOINTING.replace("NoCheckpointing", "NoSdpa")
    .replace("no_checkpointing", "no_sdpa")
    .replace("supports_gradient_checkpointing = False", "_supports_sdpa = False")
)


def _model_dir(where: Path, **config: object) -> Path:
    """The tiny model's tokenizer, and its config.json changed by ``config`` (None removes a key)."""
    where.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_CHAT / name, where / name)
    base = json.loads((TINY_CHAT / "config.json").read_text())
    merged = {k: v for k, v in {**base, **config}.items() if v is not None}
    (where / "config.json").write_text(json.dumps(merged))
    return where


def _remote_code_model(where: Path, name: str, code: str) -> Path:
    """A model directory whose config maps to its own code (``{name}Config``, ``{name}ForCausalLM``)."""
    module = f"modeling_{name.lower()}"
    model = _model_dir(where, model_type=f"{where.name}_llama", architectures=[f"{name}ForCausalLM"],
                       auto_map={"AutoConfig": f"{module}.{name}Config",
                                 "AutoModelForCausalLM": f"{module}.{name}ForCausalLM"})  # fmt: skip
    (model / f"{module}.py").write_text(code)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    no_checkpointing = _remote_code_model(root / "no_checkpointing", "NoCheckpointing", NO_CHECKPOINTING)
    no_sdpa = _remote_code_model(root / "no_sdpa", "NoSdpa", NO_SDPA)
    not_causal = _model_dir(root / "not_causal", model_type="t5", architectures=["T5ForConditionalGeneration"])
    # transformers 5 fuses a MoE's experts into one parameter each, which peft adapts without dropout
    moe = _model_dir(
        root / "moe", model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64,
        intermediate_size=128, moe_intermediate_size=32, head_dim=16, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    # weights of an intermediate_size of 256 under a config.json that says 192
    mismatched = _model_dir(root / "mismatched")
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(mismatched)).save_pretrained(mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    # the same weights under a config.json with a layer fewer, and saved under a wrapper's prefix
    import torch
    from safetensors.torch import load_file, save_file

    whole = _model_dir(root / "whole")
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(whole)).save_pretrained(whole)
    fewer_layers = root / "fewer_layers"
    shutil.copytree(whole, fewer_layers)
    config = json.loads((whole / "config.json").read_text())
    (fewer_layers / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    prefixed = root / "prefixed"
    shutil.copytree(whole, prefixed)
    weights = load_file(whole / "model.safetensors")
    save_file({f"base_model.model.{k}": v for k, v in weights.items()}, prefixed / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    # weights the model has no layer for beside its own (a vision tower of a multimodal checkpoint
    # loaded as its text model): allowed, as transformers allows them; an unmerged peft model's
    # state_dict, saved as the model's weights: refused as weights under a prefix
    extra = root / "extra"
    shutil.copytree(whole, extra)
    save_file({**weights, "vision_tower.patch_embed.weight": torch.zeros(4, 4)}, extra / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    unmerged = root / "unmerged"
    shutil.copytree(whole, unmerged)
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(whole), LoraConfig(r=2, target_modules=["q_proj"]))
    state = {k: v.contiguous() for k, v in adapted.state_dict().items() if k != "base_model.model.lm_head.weight"}
    save_file(state, unmerged / "model.safetensors", metadata={"format": "pt"})
    return {
        "extra": extra,
        "unmerged": unmerged,
        "no_sdpa": no_sdpa,
        "not_causal": not_causal,
        "fewer_layers": fewer_layers,
        "prefixed": prefixed,
        "no_checkpointing": no_checkpointing,
        "small_vocab": _model_dir(root / "small_vocab", vocab_size=600),  # its tokenizer has 981 tokens
        "moe": moe,
        "mismatched": mismatched,
    }


def _refused(tmp_path: Path, *overrides: str) -> str:
    """Run sala-train; assert one message, exit code 2 and nothing left behind; return stderr."""
    proc = run_cli("sala-train", *overrides, *SHORT, "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # nothing half-written
    return proc.stderr


def test_gradient_checkpointing_on_a_model_without_it(tmp_path, models):
    """Was the Trainer's ValueError at its first step: a traceback, exit 1, status failed. Refused once
    the model has loaded (whether its class supports it is known only then, for remote code)."""
    path = models["no_checkpointing"]
    err = _refused(tmp_path, f"model.name_or_path={path}", "model.trust_remote_code=true",
                   "train.gradient_checkpointing=true")  # fmt: skip
    assert "train.gradient_checkpointing=true: NoCheckpointingForCausalLM does not support" in err, err[-2000:]
    assert "set train.gradient_checkpointing=false" in err


def test_a_tokenizer_with_more_tokens_than_the_model_has_embeddings(tmp_path, models):
    """Was an IndexError inside the embedding at the first step; now refused before the model loads."""
    path = models["small_vocab"]
    err = _refused(tmp_path, f"model.name_or_path={path}")
    assert f"model.name_or_path={path}:" in err and "vocab_size 600" in err and "981 tokens" in err, err[-2000:]
    shown = run_cli("sala-data", f"model.name_or_path={path}", cwd=tmp_path)  # (the same message, sizes and all)
    assert shown.returncode == 2 and "vocab_size 600" in shown.stderr and "981 tokens" in shown.stderr, shown.stderr


def test_weights_that_do_not_match_the_config(tmp_path, models):
    """Was transformers' RuntimeError (... ignore_mismatched_sizes ...) with a traceback, exit 1."""
    path = models["mismatched"]
    err = _refused(tmp_path, "model=hf", f"model.name_or_path={path}", "train.bf16=false")
    assert f"model.name_or_path={path}: its weights do not match its config.json" in err, err[-2000:]
    # (the first of the weights that differ, by name; transformers' table is not shown as well)
    assert "down_proj.weight: [128, 256] in the weights, [128, 192] by the config, and 2 more" in err, err[-2000:]
    assert "LOAD REPORT" not in err


def test_transformers_refusals_that_name_its_own_api_name_the_key(tmp_path, models):
    """A model without sdpa was told to pass ``attn_implementation="eager"`` (transformers' argument);
    a model that is not a causal LM got a list of some 200 configuration classes."""
    path = models["no_sdpa"]
    err = _refused(tmp_path, "model=hf", f"model.name_or_path={path}", "model.trust_remote_code=true",
                   "model.from_scratch=true")  # fmt: skip
    assert err.strip().splitlines()[-1] == (
        "sala-train: model.attn_implementation=sdpa: NoSdpaForCausalLM does not support attention through "
        "torch.nn.functional.scaled_dot_product_attention; set model.attn_implementation=eager"
    ), err[-2000:]
    path = models["not_causal"]
    (tmp_path / "t5").mkdir()
    said = (
        f"sala-train: model.name_or_path={path}: its config.json describes a T5Config model, which is not a causal "
        "language model (transformers has no AutoModelForCausalLM class for it); sala-train fine-tunes causal LMs: "
        "give one"
    )
    err = _refused(tmp_path / "t5", "model=hf", f"model.name_or_path={path}")
    assert err.strip().splitlines()[-1] == said, err[-2000:]
    # The dry run refuses it too (it printed transformers' words as "no estimate", exit 0).
    err = _refused(tmp_path / "t5", "model=hf", f"model.name_or_path={path}", "launcher.dry_run=true")
    assert err.strip().splitlines()[-1] == said, err[-2000:]


def test_weights_with_no_place_in_the_model_are_refused(tmp_path, models):
    """transformers loads what matches, starts the rest at random and logs a table: a config.json
    with a layer fewer than its weights trained a truncated model, and weights saved under a peft
    model's prefix a model all random, both to exit 0."""
    path = models["fewer_layers"]
    err = _refused(tmp_path, "model=hf", f"model.name_or_path={path}")
    said = "9 weight(s) in its files have no place in the model its config.json builds (model.layers.1.input_layernorm"
    assert f"model.name_or_path={path}: {said}" in err, err[-2000:]
    assert "restore the model's own config.json" in err and "LOAD REPORT" not in err
    path = models["prefixed"]
    for backend in ("single", "zero3"):  # (ZeRO-3's loader lists no unexpected weights: all are missing there)
        (tmp_path / backend).mkdir()
        err = _refused(tmp_path / backend, "model=hf", f"model.name_or_path={path}", f"backend={backend}")
        said = {
            "single": "its weights are saved under the prefix 'base_model.model.' (base_model.model.model.embed_tokens",
            "zero3": "none of the model's weights are in its files (it would train from random weights)",
        }[backend]
        assert f"model.name_or_path={path}: {said}" in err, err[-2000:]
        assert "LOAD REPORT" not in err and "corrupted" not in err  # (transformers' words on the same weights)
    (tmp_path / "unmerged").mkdir()
    err = _refused(tmp_path / "unmerged", "model=hf", f"model.name_or_path={models['unmerged']}")
    assert "its weights are saved under the prefix 'base_model.model.' (" in err and "merge_and_unload()" in err, err
    # Weights of no layer the model has (a multimodal checkpoint's vision tower): loaded as transformers loads
    # them, its table saying what was left out.
    proc = run_cli("sala-train", "model=hf", f"model.name_or_path={models['extra']}", *SHORT, "hydra.run.dir=run",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0 and (tmp_path / "run" / "final").is_dir(), proc.stderr[-2000:]
    assert "vision_tower.patch_embed.weight" in proc.stdout + proc.stderr


def test_lora_dropout_on_fused_moe_experts_names_method_dropout(tmp_path, models):
    """peft's own message named model.lora_target_modules, a key the user never set."""
    path = models["moe"]
    err = _refused(tmp_path, f"model.name_or_path={path}", "model.lora_target_modules=null")
    assert "method.dropout=0.05:" in err and "set method.dropout=0" in err, err[-2000:]
    assert "model.lora_target_modules" not in err


def test_all_linear_as_method_target_modules_means_peft_all_linear(tmp_path):
    """``method.target_modules=all-linear`` arrives as a list of one; peft looked for a module of that name."""
    proc = run_cli("sala-train", "method.target_modules=all-linear", *SHORT, "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    adapted = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}  # (all-linear leaves the head out)
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, adapted
    # with other names it would be ignored (peft trained only those): refused before the model loads
    (tmp_path / "mixed").mkdir()
    err = _refused(tmp_path / "mixed", "method.target_modules=[all-linear,lm_head]")
    assert "method.target_modules=['all-linear', 'lm_head']: all-linear" in err, err[-2000:]


def test_model_directories_transformers_cannot_read(tmp_path):
    """A config.json its config class refuses was a traceback; a directory without tokenizer files
    was blamed on a missing sentencepiece or tiktoken (the config-level cases: test_config)."""
    heads = _model_dir(tmp_path / "models" / "heads", num_attention_heads=3)  # hidden_size 128
    err = _refused(tmp_path, f"model.name_or_path={heads}")
    assert f"model.name_or_path={heads}: cannot load its tokenizer:" in err
    assert "not a multiple of the number of attention heads (3)" in err, err[-2000:]
    untokenized = _model_dir(tmp_path / "models" / "untokenized")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (untokenized / name).unlink()
    err = _refused(tmp_path, f"model.name_or_path={untokenized}")
    assert f"model.name_or_path={untokenized}: no tokenizer there (none of tokenizer.json," in err, err[-2000:]


def test_a_moe_router_loss_is_weighted_once_per_step_not_once_per_micro_batch(tmp_path):
    """transformers adds a MoE model's router loss to each micro-batch's token-normalised loss,
    which the Trainer then leaves undivided: batch 2 × 4 accumulation logged 7.89 + 3 × 0.5 × aux
    (10.9) where batch 8 logged 7.89. Computed here from the logits, each micro-batch's router loss
    counts by its share of the step's trained tokens. (The router loss itself is a statistic of the
    micro-batch's routing, so layouts agree closely, not exactly: 1e-4 here.)"""
    model = _model_dir(
        tmp_path / "moe", model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64,
        intermediate_size=128, moe_intermediate_size=32, head_dim=16, num_experts=4, num_experts_per_tok=2,
        output_router_logits=True, router_aux_loss_coef=0.5,
    )  # fmt: skip
    figures = {}
    for batch, accumulation in ((8, 1), (2, 4)):
        proc = run_cli("sala-train", "model=hf", f"model.name_or_path={model}", "model.from_scratch=true",
                       "model.dtype=float32", "method=full", f"train.per_device_train_batch_size={batch}",
                       f"train.gradient_accumulation_steps={accumulation}", *SHORT, f"hydra.run.dir=b{batch}",
                       cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "its router loss is added to each micro-batch's loss" in proc.stdout
        rows = [json.loads(line) for line in (tmp_path / f"b{batch}" / "metrics.jsonl").read_text().splitlines()]
        (step,) = [r for r in rows if r["event"] == "train" and "loss" in r]
        figures[batch] = step["loss"]
    assert figures[2] == pytest.approx(figures[8], rel=1e-3), figures
