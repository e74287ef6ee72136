"""Generated DeepSpeed/FSDP settings, the memory arithmetic, and dry-run plans of every combination."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import pytest

from sala_train.arguments import CHECKPOINTING_ARGUMENT
from sala_train.backends import backend_arguments, deepspeed_config, fsdp_settings
from sala_train.config.compose import check_command_line
from sala_train.config.entries import group_options
from sala_train.config.schema import (
    DdpBackend,
    FsdpBackend,
    RunConfig,
    SingleBackend,
    Zero2Backend,
    Zero3Backend,
    Zero3OffloadBackend,
)
from sala_train.config.typed import ConfigError
from sala_train.memory import Estimate, ParameterCounts, estimate
from tests.conftest import SHARED

SEEDS = SHARED / "reference" / "seed-configs"


def seed(name: str) -> dict:
    path = SEEDS / name
    if not path.is_file():
        pytest.skip(f"seed config {path} not here")
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("backend", "seed_file"),
    [
        (Zero2Backend(), "ds_config_zero2.json"),
        (Zero3Backend(), "ds_config_zero3.json"),
        (Zero3OffloadBackend(), "ds_config_zero3_offload.json"),
    ],
)
def test_generated_deepspeed_config_matches_the_recipe(backend, seed_file):
    """The generated config carries the seed recipe's ZeRO settings; batch fields stay 'auto'."""
    ours, theirs = deepspeed_config(backend), seed(seed_file)
    for key, value in theirs["zero_optimization"].items():
        if key in ("offload_optimizer", "offload_param"):
            assert ours["zero_optimization"][key]["device"] == value["device"], key
        else:
            assert ours["zero_optimization"][key] == value, key
    # A bucket size the seed leaves to DeepSpeed stays DeepSpeed's (with "auto" the Trainer would fill hidden²).
    assert ours["zero_optimization"].get("reduce_bucket_size") == theirs["zero_optimization"].get("reduce_bucket_size")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert ours[key] == "auto"  # the Trainer fills them from train.*: they cannot drift
    assert ours["bf16"] == {"enabled": "auto"}


def test_zero3_gathers_16bit_weights_on_save_and_no_backend_sets_deepspeeds_optimizer():
    assert deepspeed_config(Zero3Backend())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    # The Trainer's AdamW (decay / no-decay groups) is used; under offload accelerate rebuilds it as
    # DeepSpeed's CPU Adam from those groups. A config "optimizer" block would have one group.
    for backend in (Zero3Backend(), Zero3OffloadBackend(), Zero2Backend(offload_optimizer=True)):
        assert "optimizer" not in deepspeed_config(backend)
        assert "zero_force_ds_cpu_optimizer" not in deepspeed_config(backend)
    assert deepspeed_config(Zero2Backend(offload_optimizer=True))["zero_optimization"]["stage"] == 2


def test_fsdp_settings_wrap_transformer_layers():
    settings = fsdp_settings(FsdpBackend(), ["LlamaDecoderLayer"], gradient_checkpointing=True)
    assert settings["fsdp"] is True  # (everything in fsdp_config: the "full_shard auto_wrap" string is deprecated)
    config = settings["fsdp_config"]
    assert config["version"] == 2 and config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert config["state_dict_type"] == "SHARDED_STATE_DICT" and config["activation_checkpointing"] is True
    assert fsdp_settings(FsdpBackend(cpu_offload=True), ["X"], False)["fsdp_config"]["cpu_offload"] is True
    args = backend_arguments(FsdpBackend(), ["X"], gradient_checkpointing=True)
    assert args[CHECKPOINTING_ARGUMENT] is False  # FSDP checkpoints activations itself


def test_fsdp_wraps_only_the_layer_classes_a_model_builds():
    """Qwen3.5's text model names its vision block among its _no_split_modules: given that list,
    accelerate raised `Could not find the transformer layer class Qwen3_5VisionBlock` once the
    model had loaded. A model that names none is refused as a config problem, not a ValueError."""
    import torch
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.backends import fsdp_layer_classes

    def on_meta(model_type: str, **shape):
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape))

    qwen = on_meta("qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)  # fmt: skip
    assert sorted(qwen._no_split_modules) == ["Qwen3_5DecoderLayer", "Qwen3_5VisionBlock"]
    assert fsdp_layer_classes(FsdpBackend(), qwen) == ["Qwen3_5DecoderLayer"]
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    plugin.transformer_cls_names_to_wrap = list(qwen._no_split_modules)
    with pytest.raises(ValueError, match="Qwen3_5VisionBlock"):  # what the run met
        fsdp2_prepare_auto_wrap_policy(plugin, qwen)
    plugin.transformer_cls_names_to_wrap = fsdp_layer_classes(FsdpBackend(), qwen)
    assert fsdp2_prepare_auto_wrap_policy(plugin, qwen) is not None
    older = on_meta("openai-gpt", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(ConfigError) as refused:
        fsdp_layer_classes(FsdpBackend(), older)
    assert refused.value.problems == [
        "backend=fsdp: FSDP wraps a model's transformer layers, and OpenAIGPTLMHeadModel does not say which (it names "
        "no _no_split_modules); use backend=zero3, which needs no wrapping"
    ]
    assert fsdp_layer_classes(Zero3Backend(), older) == []  # (only FSDP wraps)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("offload", [False, True])
def test_fsdp_settings_make_the_plugin_accelerate_builds(version, offload, monkeypatch):
    """Through transformers' own translation into accelerate's FSDP plugin, as the Trainer makes it
    (on a GPU: FSDP1 refuses to build its plugin on CPU): FSDP1 (backend.version=1) crashed there
    (KeyError: 'TRUE', reshard_after_forward given as a bool, which FSDP1 reads as a strategy name)
    and lost the guide's BACKWARD_PRE prefetch."""
    import os
    from types import SimpleNamespace
    from unittest import mock

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils import dataclasses as accelerate_dataclasses
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffloadPolicy, ShardingStrategy
    from transformers import TrainingArguments

    monkeypatch.setattr(accelerate_dataclasses, "get_torch_accelerator_backend", lambda: ("cuda", None))
    settings = fsdp_settings(FsdpBackend(version=version, cpu_offload=offload), ["LlamaDecoderLayer"], True)
    legacy = TrainingArguments._apply_legacy_fsdp_to_config  # (the fsdp="full_shard ..." strings)
    arguments = SimpleNamespace(**settings, activation_checkpointing=False, _apply_legacy_fsdp_to_config=legacy)
    with mock.patch.dict(os.environ):  # (both set FSDP_* variables as they go)
        plugin = FullyShardedDataParallelPlugin(**TrainingArguments._process_fsdp_args(arguments))
    assert plugin.fsdp_version == version and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.cpu_ram_efficient_loading and plugin.activation_checkpointing
    if version == 1:
        assert plugin.reshard_after_forward == ShardingStrategy.FULL_SHARD
        assert plugin.backward_prefetch == BackwardPrefetch.BACKWARD_PRE and plugin.sync_module_states
        assert plugin.cpu_offload.offload_params is offload
    else:
        assert plugin.reshard_after_forward is True
        assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) is offload


def test_fsdp2_gives_each_layer_of_a_lora_model_its_own_shard(monkeypatch):
    """For a peft model the Trainer swaps the plugin's layer policy for peft's FSDP1 one just before
    ``accelerator.prepare``; accelerate's FSDP2 path reads no policy from it: no decoder layer was
    sharded on its own, and with activation checkpointing ``fsdp2_apply_ac`` called None. Here with
    the plugin as the Trainer builds it, transformers' own update, and accelerate's own policy and
    checkpointing code (on CPU: only the sharding itself needs a GPU)."""
    import os
    from unittest import mock

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils import dataclasses as accelerate_dataclasses
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_auto_wrap_policy
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
    from transformers.distributed.fsdp import update_fsdp_plugin_peft

    from sala_train.backends import keep_fsdp2_layer_wrapping

    monkeypatch.setattr(accelerate_dataclasses, "get_torch_accelerator_backend", lambda: ("cuda", None))
    settings = fsdp_settings(FsdpBackend(version=2), ["LlamaDecoderLayer"], True)
    legacy = TrainingArguments._apply_legacy_fsdp_to_config
    arguments = SimpleNamespace(**settings, activation_checkpointing=False, _apply_legacy_fsdp_to_config=legacy)
    with mock.patch.dict(os.environ):
        plugin = FullyShardedDataParallelPlugin(**TrainingArguments._process_fsdp_args(arguments))
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    class Accelerator:  # (accelerate's own needs a process group for FSDP; prepare's first two steps)
        state = SimpleNamespace(fsdp_plugin=plugin)

        def prepare(self, prepared):
            plugin.set_auto_wrap_policy(prepared)
            return fsdp2_prepare_auto_wrap_policy(plugin, prepared)

    trainer = SimpleNamespace(accelerator=Accelerator())
    keep_fsdp2_layer_wrapping(trainer)
    update_fsdp_plugin_peft(model, trainer.accelerator)  # (the Trainer, before it prepares the model)
    policy = trainer.accelerator.prepare(model)
    assert policy is not None
    sharded = [name for name, module in model.named_modules() if policy(module)]
    assert sharded == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    fsdp2_apply_ac(trainer.accelerator, model)  # (train.gradient_checkpointing=true: it called None)
    checkpointed = [name for name, module in model.named_modules() if type(module).__name__ == "CheckpointWrapper"]
    assert checkpointed == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]


def test_ddp_and_single_arguments():
    assert backend_arguments(SingleBackend(), [], False) == {}
    assert backend_arguments(DdpBackend(find_unused_parameters=True), [], False) == {"ddp_find_unused_parameters": True}


def test_memory_arithmetic_is_deepspeeds():
    """Full fine-tuning figures agree with DeepSpeed's own estimators."""
    stage2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    total, largest, gpus, nodes = 9_000_000_000, 300_000_000, 8, 2
    counts = ParameterCounts(total=total, trainable=total, largest_layer=largest)
    world = gpus * nodes

    def ours(backend):
        e = estimate(backend, counts, world, nodes)
        return int(e.cpu_bytes), int(e.gpu_bytes)

    z2 = stage2.estimate_zero2_model_states_mem_needs
    z3 = stage3.estimate_zero3_model_states_mem_needs
    assert ours(Zero2Backend())[1] == z2(total, gpus, nodes, cpu_offload=False)[1]
    # ZeRO-2 offload: DeepSpeed takes max(4 x processes, 16) bytes of CPU memory per parameter, the
    # 4 per process being their loading (the dry run's own line) and not divided by the nodes though
    # the optimizer's part is sharded across them: the same as ours on one node of up to 4 GPUs...
    e = estimate(Zero2Backend(offload_optimizer=True), counts, 4, 1)
    assert (int(e.cpu_bytes), int(e.gpu_bytes)) == z2(total, 4, 1, cpu_offload=True)
    # ...and on more, the 16 bytes sharded per node (8 GPUs x 2 nodes read 16 x 4 bytes, unsharded).
    assert ours(Zero2Backend(offload_optimizer=True)) == (16 * total * 1.5 / nodes, 2 * total)
    assert ours(Zero3Backend())[1] == z3(total, largest, gpus, nodes, cpu_offload=False)[1]
    assert ours(Zero3OffloadBackend()) == z3(total, largest, gpus, nodes, cpu_offload=True)[:2]
    assert (
        ours(Zero3Backend(offload_optimizer=True))
        == z3(total, largest, gpus, nodes, cpu_offload=True, cpu_offload_params=False)[:2]
    )
    # In 32 bits DeepSpeed keeps 4-byte weights, and 16 bytes of grads, master copy and moments.
    assert estimate(Zero2Backend(), counts, world, nodes, mixed=False).gpu_bytes == 4 * total + 16 * total / world
    # DDP keeps the model as loaded (16-bit here) on every GPU: weight, gradient, two Adam moments,
    # and its buckets' copy of the gradient (not counted before); one process is not wrapped.
    assert estimate(DdpBackend(), counts, world, nodes).gpu_bytes == 10 * total
    assert estimate(DdpBackend(), dataclasses.replace(counts, weight_bytes=4), world, nodes).gpu_bytes == 20 * total
    assert estimate(DdpBackend(), counts, 1, 1).gpu_bytes == estimate(SingleBackend(), counts, 1, 1).gpu_bytes
    # ZeRO-3 offloading its parameters alone (DeepSpeed's estimator has no such case; it fell
    # through to no offload): their 16-bit copies in CPU memory, the optimizer's part on the GPU.
    assert estimate(Zero3Backend(offload_param=True), counts, world, nodes) == Estimate(
        4 * largest + 16 * total / world, 2 * total / nodes * 1.5
    )
    # FSDP (accelerate) upcasts trained parameters to 32 bits: 16 bytes each, sharded.
    assert estimate(FsdpBackend(), counts, world, nodes).gpu_bytes == 4 * largest + 16 * total / world


def test_full_dpo_and_kto_count_their_frozen_reference_copy():
    """Full DPO/KTO hold a frozen copy of the model (TRL's reference): the dry run said a run fits
    that needs that copy's memory too. Its weights only, placed as TRL prepares it."""
    total, largest, world, nodes = 9_000_000_000, 300_000_000, 16, 2
    counts = ParameterCounts(total=total, trainable=total, largest_layer=largest)

    def extra(backend):
        plain, with_ref = (estimate(backend, counts, world, nodes, reference=ref) for ref in (False, True))
        return with_ref.gpu_bytes - plain.gpu_bytes, with_ref.cpu_bytes - plain.cpu_bytes

    assert extra(SingleBackend()) == extra(DdpBackend()) == (2 * total, 0)  # the model as loaded (16-bit)
    assert extra(Zero2Backend()) == (2 * total, 0)  # TRL runs ZeRO-2's reference as stage 0: whole
    assert extra(Zero3Backend()) == (2 * total / world, 0)  # partitioned as the policy is
    assert extra(Zero3OffloadBackend()) == (0, 2 * total / nodes)  # its parameters offloaded too
    assert extra(FsdpBackend()) == (2 * total / world, 0)


def test_lora_frozen_base_costs_its_weights_only():
    counts = ParameterCounts(total=1_000_000, trainable=10_000, largest_layer=100_000)
    # 16-bit frozen base; peft keeps the adapters in 32 bits (weight, gradient, two moments).
    assert estimate(SingleBackend(), counts, 1, 1).gpu_bytes == 2 * 990_000 + 16 * 10_000


def test_the_largest_gathered_layer_can_be_the_embedding(tmp_path):
    # ZeRO-3 gathers a module's own parameters: with a large vocabulary, the embedding (here tied
    # to lm_head) outweighs a decoder block.
    from sala_train.config.schema import FullMethod, ModelConfig
    from sala_train.memory import count_parameters
    from tests.conftest import TINY_CHAT

    config = json.loads((TINY_CHAT / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"vocab_size": 50_000}))
    counts = count_parameters(ModelConfig(name_or_path=str(tmp_path)), FullMethod())
    assert counts.largest_layer == 50_000 * config["hidden_size"]
    # FSDP wraps the blocks, then the root, whose one unit holds the rest: with an untied head, the
    # embedding, the head and the final norm are gathered together (the estimate took the embedding).
    (tmp_path / "config.json").write_text(json.dumps(config | {"vocab_size": 50_000, "tie_word_embeddings": False}))
    untied = count_parameters(ModelConfig(name_or_path=str(tmp_path)), FullMethod())
    hidden = config["hidden_size"]
    assert untied.largest_layer == 50_000 * hidden and untied.root_unit == 2 * 50_000 * hidden + hidden
    assert estimate(FsdpBackend(), untied, 8, 1).gpu_bytes == 4 * untied.root_unit + 16 * untied.total / 8
    assert counts.weight_bytes == (2 if config.get("torch_dtype") in ("bfloat16", "float16") else 4)


HEAD_TOO = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.mark.parametrize(
    ("targets", "peft_targets"),
    [(None, HEAD_TOO), (["embed_tokens", "q_proj"], ["embed_tokens", "q_proj"]), (["all-linear"], "all-linear")],
)
def test_lora_trained_parameters_are_the_ones_peft_trains(targets, peft_targets):
    """The dry run's count of LoRA parameters is the trained model's: it counted nn.Linear layers
    only, so an adapted embedding (or any other kind of layer peft adapts) was left out."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.config.schema import LoraMethod, ModelConfig
    from sala_train.memory import count_parameters
    from tests.conftest import TINY_CHAT

    method = LoraMethod(r=4, target_modules=targets)  # (None: the model's lora_target_modules)
    counts = count_parameters(ModelConfig(name_or_path=str(TINY_CHAT), lora_target_modules=HEAD_TOO), method)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    trained = get_peft_model(model, LoraConfig(r=4, target_modules=peft_targets, task_type="CAUSAL_LM"))
    assert counts.trainable == sum(p.numel() for p in trained.parameters() if p.requires_grad) > 0
    assert counts.total == sum(p.numel() for p in trained.parameters())


def test_lora_targets_peft_refuses_stop_the_estimate(tmp_path):
    from types import SimpleNamespace

    from sala_train.config.schema import LoraMethod, ModelConfig
    from sala_train.memory import counts_or_why_not
    from tests.conftest import TINY_CHAT

    # (the model and method are all the estimate reads before it stops)
    cfg = SimpleNamespace(model=ModelConfig(name_or_path=str(TINY_CHAT)), method=LoraMethod(target_modules=["no_such"]))
    with pytest.raises(ConfigError, match=r"^method.target_modules=\['no_such'\]: Target modules"):
        counts_or_why_not(cfg)
    cfg.method = LoraMethod(target_modules=["mlp"])
    with pytest.raises(ConfigError, match=r"^method.target_modules=\['mlp'\]: a target is a LlamaMLP, which holds"):
        counts_or_why_not(cfg)


def test_lora_on_a_tied_head_keeps_peft_merge_warning_from_the_user():
    """peft warns that an adapter on a head tied to the input embeddings complicates a merge;
    sala-export unties the head before it merges, so the demo's LoRA (lm_head among its targets)
    showed every user a warning that asked nothing of them."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.config.schema import LoraMethod, ModelConfig
    from sala_train.methods import apply_method
    from tests.conftest import TINY_CHAT

    def warned(adapt) -> list[str]:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
        assert model.config.tie_word_embeddings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapt(model)
        return [str(w.message) for w in caught if "tie_word_embeddings" in str(w.message)]

    assert warned(lambda model: get_peft_model(model, LoraConfig(r=4, target_modules=HEAD_TOO)))  # (peft's own)
    model_cfg = ModelConfig(name_or_path=str(TINY_CHAT), lora_target_modules=HEAD_TOO)
    assert warned(lambda model: apply_method(LoraMethod(r=4), model, model_cfg, gradient_checkpointing=False)) == []


def test_a_lora_target_peft_adapts_as_a_parameter_matches_and_a_misspelt_one_is_named():
    """A MoE router (``mlp.gate``) peft adapts as a parameter, named down to its tensor
    (``...mlp.gate.weight``): it was refused as matching nothing, in a message that listed it among
    the model's modules. A misspelt name beside it is still refused."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from sala_train.config.schema import LoraMethod, ModelConfig
    from sala_train.methods import apply_method

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8)  # fmt: skip
    model_cfg = ModelConfig(name_or_path="moe")
    adapted = apply_method(LoraMethod(target_modules=["gate", "q_proj"], dropout=0.0), Qwen3MoeForCausalLM(config),
                           model_cfg, gradient_checkpointing=False)  # fmt: skip
    assert any(".mlp.gate." in name for name, p in adapted.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError) as refused:
        apply_method(LoraMethod(target_modules=["gate", "q_prj"], dropout=0.0), Qwen3MoeForCausalLM(config),
                     model_cfg, gradient_checkpointing=False)  # fmt: skip
    assert refused.value.problems[0].startswith(
        "method.target_modules=['gate', 'q_prj']: q_prj matches no module of Qwen3MoeForCausalLM"
    )


def test_lora_adapters_start_as_method_init_says():
    """OpenBMB's finetune.py starts LoRA gaussian (std 1/r); peft's default is Kaiming-uniform
    (bounded by 1/sqrt(fan_in)). B starts at zero either way: the first step is the base model's."""
    import math

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.config.schema import LoraInit, LoraMethod, ModelConfig
    from sala_train.methods import apply_method
    from tests.conftest import TINY_CHAT

    model_cfg = ModelConfig(name_or_path=str(TINY_CHAT), lora_target_modules=["q_proj", "v_proj"])

    def adapters(init: LoraInit) -> tuple[torch.Tensor, torch.Tensor, int]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
        adapted = apply_method(LoraMethod(r=4, init=init), model, model_cfg, gradient_checkpointing=False)
        named = dict(adapted.named_parameters())
        a = torch.cat([p.flatten() for n, p in named.items() if "lora_A" in n])
        b = torch.cat([p.flatten() for n, p in named.items() if "lora_B" in n])
        fan_in = next(p.shape[1] for n, p in named.items() if "lora_A" in n)
        return a, b, fan_in

    a, b, fan_in = adapters(LoraInit.DEFAULT)
    assert a.abs().max() <= 1 / math.sqrt(fan_in) and not b.any()
    a, b, _ = adapters(LoraInit.GAUSSIAN)
    assert math.isclose(a.std().item(), 1 / 4, rel_tol=0.1) and a.abs().max() > 1 / math.sqrt(fan_in) and not b.any()


LAUNCHERS = {
    "local": ["launcher.nproc_per_node=2"],
    "multinode": ["launcher.nproc_per_node=2", "launcher.nnodes=2"],
    "slurm": ["launcher.gpus_per_node=2", "launcher.nnodes=2"],
}


def dry_run_text(tmp_path: Path, overrides: list[str]) -> str:
    """What `launcher.dry_run=true` prints, through the same compose -> check -> plan path."""
    from hydra import compose, initialize_config_module

    from sala_train.config.resolve import resolve_config
    from sala_train.launch.dry_run import render
    from sala_train.launch.plan import plan_launch, resolve_processes
    from sala_train.memory import counts_or_why_not

    check_command_line(overrides, "train", RunConfig)
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run = resolve_processes(resolve_config(cfg, RunConfig, Path.cwd()), 0)
    return render(run, plan_launch(run, tmp_path), tmp_path, counts_or_why_not(run), gpus_counted_here=None)


@pytest.mark.parametrize(("backend", "launcher"), list(product(group_options("backend"), LAUNCHERS)))
def test_dry_run_of_every_backend_and_launcher(tmp_path, backend, launcher):
    overrides = [f"backend={backend}", f"launcher={launcher}", *LAUNCHERS[launcher], "launcher.gpu_memory_gib=80"]
    if backend.startswith("fsdp"):  # (the demo model's LoRA on its tied lm_head is refused under FSDP)
        overrides.append("method.target_modules=[q_proj,k_proj,v_proj,o_proj]")
    if backend == "single":
        with pytest.raises(ConfigError, match="the single backend runs one process"):
            check_command_line(overrides, "train", RunConfig)
        return
    if backend == "fsdp_multinode" and launcher == "local":
        with pytest.raises(ConfigError, match="backend=fsdp_multinode spans nodes"):
            check_command_line(overrides, "train", RunConfig)
        return
    text = dry_run_text(tmp_path, overrides)
    runner = f"-m sala_train.runner {tmp_path}"
    torchrun = shlex.join([sys.executable, "-m", "sala_train.launch.torchrun"])
    if launcher == "local":
        assert text.splitlines()[0] == f"{torchrun} --nnodes 1 --nproc_per_node 2 --standalone {runner}"
    elif launcher == "multinode":
        assert text.startswith(f"# every node reads {tmp_path}/config.yaml: keep it on a file system the nodes share")
        for rank in (0, 1):
            assert f"# node {rank} of 2\n{torchrun} --nnodes 2 --nproc_per_node 2 --node_rank {rank} " in text
        assert text.count("--rdzv_endpoint 127.0.0.1:29500") == 2
    else:
        assert f"sbatch --parsable {tmp_path}/slurm/job.sbatch" in text
        assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=2" in text
        assert f"srun --kill-on-bad-exit=1 {torchrun} --nnodes 2 --nproc_per_node 2" in text
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text
    world = 2 if launcher == "local" else 4
    assert f"model states per GPU under backend={backend} x {world} process(es)" in text
    assert "# memory: fits in 80 GiB per GPU" in text


def test_the_single_backend_is_one_process_on_one_gpu_of_a_slurm_node(tmp_path):
    """SLURM's gpus_per_node made a null nproc_per_node one per GPU, after validation: the job's
    one runner then stopped, waiting for a world of two ("the processes did not join one group").
    The runner keeps one GPU (it spread itself over all with DataParallel): asking for more is
    refused, as they would sit idle."""
    text = dry_run_text(tmp_path, ["launcher=slurm", "launcher.gpus_per_node=1", "launcher.gpu_memory_gib=80"])
    assert "model states per GPU under backend=single x 1 process(es)" in text
    assert "#SBATCH --gpus-per-node=1" in text and "torchrun" not in text
    with pytest.raises(ConfigError) as refused:
        check_command_line(["launcher=slurm", "launcher.gpus_per_node=2"], "train", RunConfig)
    assert refused.value.problems == [
        "backend=single / launcher.gpus_per_node=2: the single backend runs one process on one GPU, the others would "
        "sit idle; ask for launcher.gpus_per_node=1, or choose backend=ddp, zero2, zero3 or fsdp"
    ]


def test_dry_run_warns_and_names_a_backend_that_fits(tmp_path):
    # Full fine-tuning of the 421K-parameter tiny model in 32 bits: 8.0 MiB per GPU under DDP x 4,
    # 3.2 MiB under ZeRO-2 (4-byte weights, 16 bytes of states sharded 4 ways).
    overrides = ["method=full", "backend=ddp", "launcher.nproc_per_node=4", "launcher.gpu_memory_gib=0.004"]
    text = dry_run_text(tmp_path, overrides)
    assert "# WARNING: will not fit in 0.004 GiB per GPU; backend=zero2 would fit" in text


def test_advice_overrides_the_runs_own_offload_setting_and_says_when_it_drops_the_master_copy(tmp_path):
    # ZeRO-2 offloading its optimizer x 4 needs 421.12K x 16 x 1.5 = 9.6 MiB of CPU memory, over
    # 0.9 x 0.008 GiB (7.4 MiB); ZeRO-2 without offload fits the GPU (3.2 MiB) and its loading (4
    # copies of 1.6 MiB). "backend=zero2" alone would keep the run's backend.offload_optimizer=true,
    # the setting that does not fit.
    ddp = ["method=full", "backend=zero2", "backend.offload_optimizer=true", "launcher.nproc_per_node=4",
           "launcher.gpu_memory_gib=0.004"]  # fmt: skip
    text = dry_run_text(tmp_path, [*ddp, "launcher.cpu_memory_gib=0.008"])
    assert (
        "# WARNING: will not fit in 0.008 GiB of CPU memory per node; backend=zero2 backend.offload_optimizer=false "
        "would fit" in text
    )
    # In 0.004 GiB the 4 copies a node's processes load (6.4 MiB) do not fit either: ZeRO-3, which
    # loads one (rank 0's, partitioned as it loads) and fits the GPU, is advised; it was ZeRO-2,
    # which the same dry run then warned would not load.
    from tests.conftest import TINY_CHAT

    pretrained = ["model.from_scratch=false", f"model.name_or_path={TINY_CHAT}"]
    text = dry_run_text(tmp_path, [*ddp, *pretrained, "launcher.cpu_memory_gib=0.004"])
    assert "# WARNING: will not fit in 0.004 GiB of CPU memory per node; backend=zero3 would fit" in text, text
    # bfloat16 weights, one process: ZeRO-2 keeps 2 + 18 bytes a parameter (8.0 MiB), the single
    # backend 4 x 2 (3.2 MiB): it fits by training the 16-bit weights themselves.
    text = dry_run_text(
        tmp_path, ["method=full", "model.dtype=bfloat16", "backend=zero2", "launcher.gpu_memory_gib=0.004"]
    )
    assert (
        "# WARNING: will not fit in 0.004 GiB per GPU; backend=single would fit (training the 16-bit weights "
        "themselves, with no float32 master copy; ZeRO keeps one)" in text
    )


@pytest.mark.parametrize("method", ["full", "lora"])
def test_when_nothing_fits_a_larger_gpu_is_advised(tmp_path, method):
    # ZeRO-3 with offload keeps only the gathered largest layer (a tiny-model block) on the GPU:
    # neither more GPUs nor LoRA make it smaller.
    text = dry_run_text(tmp_path, [f"method={method}", "launcher.gpu_memory_gib=0.0001"])
    advice = ("no backend fits: even ZeRO-3 with offload gathers the largest layer (147.71K parameters, 0.6 MiB) "
              "on each GPU; use GPUs with more memory")  # fmt: skip
    assert f"# WARNING: will not fit in 0.0001 GiB per GPU; {advice}\n" in text + "\n"


def test_offload_is_checked_against_cpu_memory(tmp_path):
    # Full fine-tuning of the tiny model in 32 bits, one process. Only ZeRO-3 with offload keeps the
    # GPU part (the largest layer, 147.71K parameters gathered: 0.6 MiB) under 0.9 MiB, and it moves
    # the 32-bit weight, gradient and two moments to CPU memory: 421.12K x 16 x 1.5 (DeepSpeed's
    # buffer factor) = 9.6 MiB.
    full = ["method=full", "backend=zero3_offload", "launcher.gpu_memory_gib=0.001"]
    text = dry_run_text(tmp_path, [*full, "launcher.cpu_memory_gib=0.02"])
    assert "(+9.6 MiB of CPU memory per node)" in text
    assert "# memory: fits in 0.001 GiB per GPU and 0.02 GiB of CPU memory per node" in text
    text = dry_run_text(tmp_path, [*full, "launcher.cpu_memory_gib=0.01"])
    assert (
        "# WARNING: will not fit in 0.01 GiB of CPU memory per node; no backend fits: these GPUs need offload, "
        "and the least it takes (backend=zero3_offload) is 9.6 MiB of CPU memory per node; add nodes or GPUs, "
        "use nodes with more memory, or method=lora"
    ) in text


def test_when_only_loading_overruns_cpu_memory_offload_is_not_advised(tmp_path):
    """ZeRO-3 fits 0.0025 GiB per GPU (4 processes) and needs no CPU memory for its states, but each
    process builds the tiny model from scratch whole: 4 x 421.12K x 4 bytes = 6.4 MiB, over 0.001 GiB.
    The advice said "these GPUs need offload", sending the user to a backend needing more CPU memory."""
    text = dry_run_text(tmp_path, ["method=full", "backend=ddp", "launcher.nproc_per_node=4",
                                   "launcher.gpu_memory_gib=0.0025", "launcher.cpu_memory_gib=0.001"])  # fmt: skip
    assert (
        "# WARNING: will not fit in 0.0025 GiB per GPU; no backend fits: backend=zero3 fits on the GPUs, but loading "
        "the model takes 6.4 MiB of CPU memory per node (the least of the backends that fit on the GPUs); use nodes "
        "with more memory, or fewer processes per node\n"
    ) in text + "\n", text


def test_an_fsdp_run_is_advised_its_own_offload_and_unchecked_cpu_memory_is_said(tmp_path):
    """FSDP was no candidate: an FSDP run whose own backend.cpu_offload=true fits (16 bytes a
    parameter of CPU memory: 6.4 MiB) was told that nothing fits, the least being ZeRO's 9.6 MiB.
    And an offloading backend was said to fit where no one knew the nodes' CPU memory (SLURM
    without launcher.mem)."""
    fsdp = ["method=full", "backend=fsdp", "launcher.nproc_per_node=4", "launcher.gpu_memory_gib=0.001"]
    text = dry_run_text(tmp_path, [*fsdp, "launcher.cpu_memory_gib=0.0085"])
    assert "# WARNING: will not fit in 0.001 GiB per GPU; backend=fsdp backend.cpu_offload=true would fit" in text
    slurm = [
        "method=full",
        "backend=zero3",
        "launcher=slurm",
        "launcher.gpus_per_node=4",
        "launcher.gpu_memory_gib=0.001",
    ]
    text = dry_run_text(tmp_path, slurm)
    advice = (
        "# WARNING: will not fit in 0.001 GiB per GPU; backend=zero3_offload would fit on the GPUs, with 9.6 MiB of "
        "CPU memory per node that nothing here checks (set launcher.cpu_memory_gib)"
    )
    assert advice in text, text


@pytest.mark.parametrize(("mixed", "figure"), [("true", "2.2 MiB"), ("false", "1.4 MiB")])
def test_fsdp_costs_16_bit_weights_as_accelerate_trains_them(tmp_path, mixed, figure):
    """accelerate upcasts FSDP's trained weights to float32 under mixed precision only: 16 bytes a
    parameter then, 4 x 2 without (weight, gradient, two moments in bfloat16). Plus the gathered
    largest layer: 147.71K x 4 = 0.56 MiB; 421.12K x 16 / 4 = 1.61 MiB, x 8 / 4 = 0.80 MiB."""
    text = dry_run_text(tmp_path, ["method=full", "backend=fsdp", "launcher.nproc_per_node=4", "model.dtype=bfloat16",
                                   f"train.bf16={mixed}", "launcher.gpu_memory_gib=80"])  # fmt: skip
    assert f"model states per GPU under backend=fsdp x 4 process(es): {figure} " in text


def test_loading_a_copy_per_process_is_counted_against_cpu_memory(tmp_path):
    """Each of a node's processes loads the whole model before DDP places it: 4 x 421.12K x 4 bytes
    = 6.4 MiB, over 0.005 GiB x 90%. Not said for one process."""
    ddp = ["method=full", "backend=ddp", "launcher.nproc_per_node=4", "launcher.gpu_memory_gib=80"]
    text = dry_run_text(tmp_path, [*ddp, "launcher.cpu_memory_gib=0.005"])
    assert "# memory: loading, each of a node's 4 processes holds the whole model in CPU memory first: 6.4 MiB" in text
    assert "# WARNING: loading will not fit in 0.005 GiB of CPU memory per node; run fewer processes" in text
    assert "WARNING: loading" not in dry_run_text(tmp_path, [*ddp, "launcher.cpu_memory_gib=0.01"])
    assert "# memory: loading" not in dry_run_text(tmp_path, ["method=full", "launcher.gpu_memory_gib=80"])


def test_zero3_loading_a_pretrained_model_counts_one_copy(tmp_path):
    """Under ZeRO-3 a pretrained model loads partitioned (zero.Init): rank 0 reads it once,
    421.12K x 4 bytes = 1.6 MiB, however many processes a node runs. One built from scratch is
    built whole in each process (the same seed gives the same weights as on any other backend)."""
    zero3 = ["method=full", "backend=zero3", "launcher.nproc_per_node=4", "launcher.gpu_memory_gib=80"]
    text = dry_run_text(tmp_path, [*zero3, "model.from_scratch=false", "launcher.cpu_memory_gib=0.001"])
    assert ("# memory: loading, partitioned as it loads (zero.Init): rank 0 reads the whole model into CPU memory, "
            "1.6 MiB, and each process keeps its partition") in text  # fmt: skip
    assert "# WARNING: loading will not fit in 0.001 GiB of CPU memory per node; use nodes with more memory" in text
    assert "WARNING: loading" not in dry_run_text(tmp_path, [*zero3, "model.from_scratch=false",
                                                             "launcher.cpu_memory_gib=0.005"])  # fmt: skip
    scratch = dry_run_text(tmp_path, zero3)
    assert (
        "# memory: loading, each of a node's 4 processes holds the whole model in CPU memory first: 6.4 MiB" in scratch
    )
    # 16-bit weights without 16-bit training load whole too: zero.Init would make them float32.
    half = dry_run_text(tmp_path, [*zero3, "model.from_scratch=false", "model.dtype=bfloat16"])
    assert "# memory: loading, each of a node's 4 processes holds the whole model in CPU memory first: 3.2 MiB" in half
    # Rank 0 reads the checkpoint as stored (float32 here: its config names no dtype), not as
    # model.dtype converts it afterwards: 1.6 MiB, not 0.8.
    mixed = dry_run_text(tmp_path, [*zero3, "model.from_scratch=false", "model.dtype=bfloat16", "train.bf16=true"])
    assert "# memory: loading, partitioned as it loads (zero.Init): rank 0 reads the whole model into CPU memory, " \
           "1.6 MiB," in mixed  # fmt: skip
    # A checkpoint saved in bfloat16 is 0.8 MiB of files, whatever model.dtype makes of it.
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY_CHAT

    saved = tmp_path / "saved-bf16"
    shutil.copytree(TINY_CHAT, saved)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT), dtype=torch.bfloat16).save_pretrained(saved)
    stored = dry_run_text(tmp_path, [*zero3, f"model.name_or_path={saved}", "model.from_scratch=false"])
    assert "rank 0 reads the whole model into CPU memory, 0.8 MiB," in stored


def test_the_fastest_backend_that_fits_both_memories_is_named(tmp_path):
    # DDP x 4 in 32 bits needs 8.0 MiB per GPU; within 1.8 MiB only the offloading backends fit:
    # ZeRO-2 offloading its optimizer keeps the 4-byte weights (1.6 MiB) and moves
    # 421.12K x 16 x 1.5 = 9.6 MiB to CPU memory; ZeRO-3 offloading its optimizer keeps
    # 0.6 + 1.6 / 4 MiB and moves all but the weights, 421.12K x 12 x 1.5 = 7.2 MiB.
    ddp = ["method=full", "backend=ddp", "launcher.nproc_per_node=4", "launcher.gpu_memory_gib=0.002"]
    named = {
        0.02: "backend=zero2 backend.offload_optimizer=true would fit",
        0.01: "backend=zero3 backend.offload_optimizer=true would fit",
    }
    for cpu, advice in named.items():
        text = dry_run_text(tmp_path, [*ddp, f"launcher.cpu_memory_gib={cpu}"])
        assert f"# WARNING: will not fit in 0.002 GiB per GPU; {advice}" in text


def test_a_slurm_dry_run_uses_the_compute_nodes_memory_not_this_machines(tmp_path, monkeypatch):
    from sala_train.launch import dry_run
    from sala_train.launch.dry_run import slurm_mem_gib

    monkeypatch.setattr(dry_run, "visible_gpu_memory_gib", lambda: 80.0)  # a login node with a GPU
    slurm = ["method=full", "backend=zero3_offload", "launcher=slurm", "launcher.gpus_per_node=2"]
    assert "# memory: fits in 80 GiB per GPU" in dry_run_text(tmp_path, slurm[:2])  # local: this machine's GPU
    text = dry_run_text(tmp_path, slurm)
    assert "# memory: the compute nodes' GPUs are not visible from here; set launcher.gpu_memory_gib" in text
    assert "# memory: the compute nodes' CPU memory is unknown; set launcher.cpu_memory_gib (or launcher.mem" in text
    assert "fits in" not in text
    # sbatch --mem: megabytes unless a unit follows (0.9 x 8 MiB < the 9.6 MiB offload needs; DDP's
    # two processes keep everything on their GPUs).
    text = dry_run_text(tmp_path, [*slurm, "launcher.mem=8", "launcher.gpu_memory_gib=80"])
    assert "#SBATCH --mem=8\n" in text
    assert "# WARNING: will not fit in 0.00781 GiB of CPU memory per node; backend=ddp would fit" in text
    text = dry_run_text(tmp_path, [*slurm, "launcher.mem=16M", "launcher.gpu_memory_gib=80"])
    assert "# memory: fits in 80 GiB per GPU and 0.0156 GiB of CPU memory per node" in text
    text = dry_run_text(tmp_path, [*slurm, "launcher.mem=0", "launcher.gpu_memory_gib=80"])
    assert (
        "CPU memory is unknown; launcher.mem=0 asks for all of a node's memory, an amount not known here; set " in text
    )
    text = dry_run_text(tmp_path, [*slurm, "launcher.mem=2T", "launcher.gpu_memory_gib=139.7"])
    assert "# memory: fits in 139.7 GiB per GPU and 2048 GiB of CPU memory per node" in text
    assert [slurm_mem_gib(m) for m in ("64G", "64gb", "1T", "1048576K", "512MB", "0", None)] == [
        64,
        64,
        1024,
        1,
        0.5,
        None,
        None,
    ]


def test_no_estimate_when_the_models_code_needs_a_missing_package(tmp_path):
    """The dry run still prints its commands; the estimate says why it is missing."""
    from tests.fixtures.tiny_sala import CODE, HERE

    model = tmp_path / "sala"  # config and code only (never imported in this process before: no module cache)
    model.mkdir()
    for name in CODE:
        (model / name).write_text((HERE / name).read_text())
    code = model / "modeling_minicpm_sala_tiny.py"
    code.write_text("import sala_missing_dependency\n" + code.read_text())
    auto_map = {"AutoConfig": "configuration_minicpm_sala_tiny.MiniCPMSALATinyConfig",
                "AutoModelForCausalLM": "modeling_minicpm_sala_tiny.MiniCPMSALATinyForCausalLM"}  # fmt: skip
    (model / "config.json").write_text(json.dumps({"model_type": "minicpm_sala_tiny", "auto_map": auto_map}))
    overrides = ["model=minicpm_sala", f"model.name_or_path={model}", "launcher.gpu_memory_gib=80"]
    text = dry_run_text(tmp_path / "run", overrides)
    assert "-m sala_train.runner" in text
    assert "# memory: no estimate: This modeling file requires the following packages that were not found" in text
    assert "sala_missing_dependency" in text


def test_no_estimate_without_the_models_files_says_which_to_download(tmp_path):
    text = dry_run_text(tmp_path, ["model=minicpm_sala", "model.name_or_path=openbmb/Not-Here-SALA"])
    assert "download it once, without the weights (hf download openbmb/Not-Here-SALA --include '*.json' '*.py')" in text
    # A pinned revision is the one to download (main's config would still miss the pinned lookup).
    pinned = dry_run_text(tmp_path, ["model=minicpm_sala", "model.name_or_path=openbmb/Not-Here-SALA",
                                     f"model.revision={'0' * 40}"])  # fmt: skip
    assert f"(hf download openbmb/Not-Here-SALA --revision {'0' * 40} --include '*.json' '*.py')" in pinned


def test_multinode_and_slurm_settings_checked():
    with pytest.raises(ConfigError) as err:
        check_command_line(
            ["launcher=multinode", "backend=ddp", "launcher.node_rank=2", "launcher.master_port=70000"],
            "train",
            RunConfig,
        )
    assert err.value.problems == [
        "launcher.node_rank: must be in [0, 1] for launcher.nnodes=2, got 2",
        "launcher.master_port: not a TCP port: 70000",
    ]
    # An empty address passed every check, then failed in torch's rendezvous with a traceback.
    with pytest.raises(ConfigError) as err:
        check_command_line(["launcher=multinode", "backend=ddp", "launcher.master_addr=''"], "train", RunConfig)
    assert err.value.problems == [
        "launcher.master_addr: '' is not a host name or address; give node 0's address, as the other nodes reach it"
    ]
    # Each was written into the batch script as it was (sbatch refuses, or the job runs otherwise).
    with pytest.raises(ConfigError) as err:
        extra = (
            "launcher.extra_sbatch=['--qos high','--nodes=4','-o/tmp/x','--constraint=a100','--gres=gpu:4',"
            "'--comment=nightly run']"
        )
        check_command_line(["launcher=slurm", "backend=ddp", "launcher.gpus_per_node=4", "launcher.nproc_per_node=8",
                            "launcher.cpus_per_task=-3", "launcher.signal_seconds=70000", extra],
                           "train", RunConfig)  # fmt: skip
    assert err.value.problems == [
        "launcher.signal_seconds: must be in [0, 65535], got 70000",
        "launcher.cpus_per_task: must be >= 1 or null, got -3",
        "launcher.nproc_per_node=8 / launcher.gpus_per_node=4: one process per GPU; the ranks past the node's GPUs "
        "would have none (leave nproc_per_node null for one per GPU)",
        "launcher.extra_sbatch: '--qos high' is not one sbatch option; write each as --name=value (e.g. --qos=high), "
        "one list item each",
        "launcher.extra_sbatch: '--nodes=4' is the launcher's own option; set launcher.nnodes",
        "launcher.extra_sbatch: '-o/tmp/x' is the launcher's own option; sala-train sets it for torchrun and its logs",
    ]
    # Relatives of the launcher's own options: a job array trained its copies in one run directory;
    # sbatch refuses --mem-per-cpu beside --mem (the dry run checks memory by launcher.mem); a GPU
    # count beside --gpus-per-node; --wait blocked the submission.
    with pytest.raises(ConfigError) as err:
        extra = (
            "launcher.extra_sbatch=['--array=0-3','--mem-per-gpu=40G','-G16','--gpus-per-task=1','--wait',"
            "'--gres=gpu:4']"
        )
        check_command_line(["launcher=slurm", "backend=ddp", "launcher.gpus_per_node=4", "launcher.mem=64G", extra],
                           "train", RunConfig)  # fmt: skip
    assert err.value.problems == [
        "launcher.extra_sbatch: '--array=0-3': each task of a job array would train in the one run directory at "
        "once; a sweep (sala-train -m ... with values for a key) runs one job per run",
        "launcher.extra_sbatch: '--mem-per-gpu=40G': launcher.mem=64G sets --mem, and sbatch takes one of --mem, "
        "--mem-per-cpu and --mem-per-gpu; set launcher.mem=null to give yours",
        "launcher.extra_sbatch: '-G16': launcher.gpus_per_node=4 sets --gpus-per-node, the GPUs torchrun gives its "
        "ranks on each node; set the count there",
        "launcher.extra_sbatch: '--gpus-per-task=1': launcher.gpus_per_node=4 sets --gpus-per-node, the GPUs "
        "torchrun gives its ranks on each node; set the count there",
        "launcher.extra_sbatch: '--wait' is the launcher's own option; set launcher.wait",
    ]
    # Without launcher.mem or a GPU count of the launcher's, those are the user's to give.
    extra = "launcher.extra_sbatch=['--mem-per-gpu=40G','--gpus=16']"
    check_command_line(["launcher=slurm", "backend=ddp", "launcher.gpus_per_node=0", extra], "train", RunConfig)
    with pytest.raises(ConfigError) as err:
        check_command_line(["backend=fsdp", "method=full", "backend.version=3"], "train", RunConfig)
    assert err.value.problems == ["backend.version: FSDP is version 1 or 2, got 3"]


@pytest.mark.parametrize("requeue", [True, False])
def test_the_batch_script_writes_the_status_words_sala_report_reads(tmp_path, requeue):
    """A SLURM job writes its run's status.json from shell; the words must be RunStatus's, and the
    file what ``read_status`` parses."""
    import re
    import subprocess

    from sala_train.config.schema import SlurmLauncher
    from sala_train.launch.plan import PREEMPTED_EXIT, sbatch_script
    from sala_train.report import RunStatus, read_status

    script = sbatch_script(SlurmLauncher(requeue=requeue), 1, tmp_path)
    words = set(re.findall(r"\bfinish (\S+) ", script))
    # (a stop signal, not the preemption warning, ends preempted even where the job requeues; one
    # that came as SLURM requeued the job itself ends submitted, with or without launcher.requeue)
    assert words == {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.PREEMPTED, RunStatus.SUBMITTED}
    assert f"finish {RunStatus.PREEMPTED} {PREEMPTED_EXIT}" in script
    # The script's own finish(), run by bash: each word comes back through read_status as written.
    finish = next(line for line in script.splitlines() if line.startswith("finish()"))
    for word in words:
        subprocess.run(["bash", "-c", f"{finish}\nfinish {word} 3"], check=False)
        assert read_status(tmp_path) == word
        assert json.loads((tmp_path / "status.json").read_text()) == {"status": str(word), "exit_code": 3}


@pytest.mark.parametrize(("signal", "requeues"), [("USR1", True), ("TERM", False)])
def test_the_batch_scripts_signal_traps_ask_for_a_checkpoint_in_any_run_directory(tmp_path, signal, requeues):
    """The traps quoted an already-quoted path inside single quotes: with a space in the run
    directory bash refused the trap ("invalid signal specification") and the ranks were never asked
    to checkpoint. SLURM's warning (USR1) requeues; a stop signal (scancel's TERM) must not."""
    import subprocess

    from sala_train.config.schema import SlurmLauncher
    from sala_train.launch.plan import PREEMPT_REQUEST, sbatch_script

    run_dir = tmp_path / "run it's [a,b]"
    run_dir.mkdir()
    lines = sbatch_script(SlurmLauncher(), 1, run_dir).splitlines()
    traps = [line for line in lines if line.startswith(("trap ", "requeue_wanted="))]
    assert len(traps) == 3
    shell = "\n".join([*traps, f"kill -{signal} $$", 'echo "requeue=$requeue_wanted"'])
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True)
    assert done.stderr == "" and (run_dir / PREEMPT_REQUEST).is_file()
    assert done.stdout.endswith(f"requeue={int(requeues)}\n"), done.stdout


def test_the_batch_scripts_srun_gets_the_cpus_of_the_task():
    """Since SLURM 22.05 srun does not take sbatch's --cpus-per-task: torchrun and every rank ran
    on one CPU of the node."""
    from sala_train.config.schema import SlurmLauncher
    from sala_train.launch.plan import sbatch_script

    (srun,) = [line for line in sbatch_script(SlurmLauncher(cpus_per_task=16), 1, Path("/r")).splitlines()
               if line.startswith("srun ")]  # fmt: skip
    assert srun.startswith("srun --kill-on-bad-exit=1 --cpus-per-task=16 ")
    assert "--cpus-per-task" not in next(line for line in sbatch_script(SlurmLauncher(), 1, Path("/r")).splitlines()
                                         if line.startswith("srun "))  # fmt: skip
    steps = [line for line in sbatch_script(SlurmLauncher(nnodes=2, cpus_per_task=16), 1, Path("/r")).splitlines()
             if line.startswith("srun ")]  # fmt: skip
    assert len(steps) == 2 and all(step.startswith("srun --kill-on-bad-exit=1 --cpus-per-task=16 ") for step in steps)


@pytest.mark.parametrize(
    ("nodes", "procs", "torchrun", "prepared"),
    [(2, 1, True, True), (1, 2, True, True), (1, 1, True, False), (2, 1, False, False)],
)
def test_a_batch_script_of_several_processes_prepares_the_data_on_each_node_first(nodes, procs, torchrun, prepared):
    """As the launcher does on one machine: the ranks then read the datasets cache instead of each
    tokenizing the same data at once. One process (one rank, or backend=single) needs no step."""
    from sala_train.config.schema import SlurmLauncher
    from sala_train.launch.plan import sbatch_script

    script = sbatch_script(SlurmLauncher(nnodes=nodes), procs, Path("/r"), torchrun=torchrun)
    steps = [line for line in script.splitlines() if line.startswith("srun ")]
    data_step = f"srun --kill-on-bad-exit=1 {shlex.join([sys.executable, '-m', 'sala_train.runner'])} --data-only /r &"
    assert steps[:-1] == ([data_step] if prepared else [])
    assert "--data-only" not in steps[-1] and ("sala_train.launch.torchrun" in steps[-1]) is torchrun


FAKE_SRUN = """#!/bin/bash
echo "$*" >> "$CALLS"
kill -"$STOP" "$PPID"  # a stop asked for while the data step runs
sleep 0.3
"""


@pytest.mark.parametrize(
    ("signal", "said", "status", "code"),
    [("USR1", "requeueing job 7", "submitted", 0), ("TERM", "submit again to resume", "preempted", 75)],
)
def test_a_stop_asked_for_during_the_data_step_ends_the_job_before_training(tmp_path, signal, said, status, code):
    """SLURM's warning (USR1) during the data step requeues the job at once, a stop signal ends it
    preempted: no rank starts (it would load the model only to checkpoint after one step). srun
    and scontrol are stand-ins here (the real ones need a job); the job's flow is the script's own."""
    import subprocess

    from sala_train.config.schema import SlurmLauncher
    from sala_train.launch.plan import sbatch_script

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$CALLS"; echo n1\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "STOP": signal,
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}  # fmt: skip
    script = sbatch_script(SlurmLauncher(nnodes=2), 1, run_dir)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == code, done.stdout + done.stderr
    assert said in done.stdout
    assert json.loads((run_dir / "status.json").read_text()) == {"status": status, "exit_code": code}
    srun_calls = [line for line in calls.read_text().splitlines() if not line.startswith("scontrol")]
    assert len(srun_calls) == 1 and "--data-only" in srun_calls[0]  # the torchrun step never ran
    assert ("scontrol requeue 7" in calls.read_text()) is (signal == "USR1")


def test_a_job_slurm_requeues_itself_says_it_resumes_by_itself(tmp_path):
    """`scontrol requeue`, a node failure or a requeueing preemption reaches the job as SIGTERM,
    with the job's Restarts already counted (seen on the local SLURM 22.05: Restarts=1 in the TERM
    trap, 0 on scancel). The job said `submit again to resume` and wrote `preempted`: following it
    made a second job train beside the requeued one. (srun and scontrol are stand-ins here.)"""
    import subprocess

    from sala_train.config.schema import SlurmLauncher
    from sala_train.launch.plan import sbatch_script

    bin_dir, calls, run_dir = tmp_path / "bin", tmp_path / "calls", tmp_path / "run"
    bin_dir.mkdir()
    run_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\necho "scontrol $*" >> "$CALLS"\n'
        'if [ "$1" = "-o" ]; then echo "JobId=7 JobName=sala-train JobState=COMPLETING Requeue=1 Restarts=1 '
        'BatchFlag=1"; else echo n1; fi\n'
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "STOP": "TERM",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}  # fmt: skip
    done = subprocess.run(["bash", "-c", sbatch_script(SlurmLauncher(nnodes=2), 1, run_dir)], capture_output=True,
                          text=True, env=env, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SLURM requeued job 7, which resumes by itself" in done.stdout and "submit again" not in done.stdout
    assert json.loads((run_dir / "status.json").read_text()) == {"status": "submitted", "exit_code": 0}
    assert "scontrol requeue" not in calls.read_text()  # (SLURM does it)
    env["SLURM_RESTART_COUNT"] = "1"  # the same count in the job's own run: a stop signal (scancel) after all
    done = subprocess.run(["bash", "-c", sbatch_script(SlurmLauncher(nnodes=2), 1, run_dir)], capture_output=True,
                          text=True, env=env, timeout=30)  # fmt: skip
    assert done.returncode == 75 and "submit again to resume" in done.stdout, done.stdout + done.stderr


PROGRESSING_SRUN = """#!/bin/bash
echo "$*" >> "$CALLS"
mkdir -p "$RUN_DIR/checkpoint-$NEW_STEP"  # (NEW_STEP empty: no checkpoint saved)
kill -USR1 "$PPID"
sleep 0.3
"""


@pytest.mark.parametrize(("restarts", "new_step", "requeued"), [(0, "", True), (1, "", False), (1, "8", True)])
def test_a_requeued_job_that_saves_nothing_before_the_next_warning_is_not_requeued_again(
    tmp_path, restarts, new_step, requeued
):
    """A job whose model takes longer to load than the time it gets before SLURM's warning stopped
    before its first step, was requeued, and did the same again, for ever. Once requeued, it is
    requeued again only if it saved a checkpoint meanwhile. (srun and scontrol are stand-ins.)"""
    import subprocess

    from sala_train.config.schema import SlurmLauncher
    from sala_train.launch.plan import sbatch_script

    bin_dir, calls, run_dir = tmp_path / "bin", tmp_path / "calls", tmp_path / "run"
    bin_dir.mkdir()
    (run_dir / "checkpoint-4").mkdir(parents=True)  # (saved before the requeue)
    (bin_dir / "srun").write_text(PROGRESSING_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$CALLS"; echo n1\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "RUN_DIR": str(run_dir),
           "NEW_STEP": new_step, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1",
           "SLURM_RESTART_COUNT": str(restarts)}  # fmt: skip
    script = sbatch_script(SlurmLauncher(nnodes=2), 1, run_dir)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30)
    assert ("scontrol requeue 7" in calls.read_text()) is requeued, done.stdout
    if not requeued:
        assert done.returncode == 75 and "not requeued again, as it would make no progress" in done.stdout
        assert json.loads((run_dir / "status.json").read_text()) == {"status": "preempted", "exit_code": 75}


def test_a_run_directory_with_a_percent_sign_keeps_its_log_where_it_is_said_to_be():
    """SLURM reads % in --output as its own patterns: a run in runs/top%u logged to runs/toproot/
    (no such directory: the job failed to launch, with no log anywhere)."""
    from sala_train.config.schema import SlurmLauncher
    from sala_train.launch.plan import sbatch_script

    script = sbatch_script(SlurmLauncher(), 1, Path("/runs/top%u"))
    assert "#SBATCH --output=/runs/top%%u/slurm/%j.out" in script.splitlines()


def test_a_running_status_reads_incomplete_once_its_process_is_gone(tmp_path):
    """The runner's rank 0 writes ``running`` with its host and pid; a reader on that host can tell
    whether the process still runs (a run killed by SIGKILL said nothing more)."""
    import socket
    import subprocess

    from sala_train.report import read_status, write_running

    write_running(tmp_path)
    record = json.loads((tmp_path / "status.json").read_text())
    assert {k: record[k] for k in ("status", "host", "pid")} == {"status": "running", "host": socket.gethostname(),
                                                                  "pid": os.getpid()}  # fmt: skip
    assert read_status(tmp_path) == "running"  # this process: alive
    dead_pid = subprocess.Popen(["true"])  # a pid that has ended and been reaped
    dead_pid.wait()
    (tmp_path / "status.json").write_text(json.dumps({**record, "pid": dead_pid.pid}))
    assert read_status(tmp_path) == "incomplete"
    zombie = subprocess.Popen(["true"])  # ended, not yet reaped: gone too
    deadline = time.monotonic() + 10
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (tmp_path / "status.json").write_text(json.dumps({**record, "pid": zombie.pid}))
    assert read_status(tmp_path) == "incomplete"
    zombie.wait()
    (tmp_path / "status.json").write_text(json.dumps({**record, "pid": dead_pid.pid, "host": "another-node"}))
    assert read_status(tmp_path) == "running"  # another node's process cannot be checked from here


def test_cpu_memory_is_the_lowest_cgroup_limit_on_the_way_to_the_root(tmp_path):
    """A SLURM job step's cgroup (v2, no namespace) sits below its job's, which holds the limit;
    v1 keeps memory limits in its own hierarchy."""
    from sala_train.memory import _cgroup_limits

    v2 = tmp_path / "v2"
    step = v2 / "system.slice" / "slurmstepd.scope" / "job_7" / "step_0"
    step.mkdir(parents=True)
    (v2 / "system.slice" / "slurmstepd.scope" / "job_7" / "memory.max").write_text("68719476736\n")
    (step / "memory.max").write_text("max\n")
    membership = tmp_path / "cgroup"
    membership.write_text("0::/system.slice/slurmstepd.scope/job_7/step_0\n")
    assert _cgroup_limits(v2, membership) == [64 * 1024**3]
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("1073741824\n")
    membership.write_text("9:name=systemd:/\n4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    assert _cgroup_limits(v1, membership) == [1024**3]
    assert _cgroup_limits(v1, tmp_path / "no-such-file") == []


def test_modules_to_save_trains_exactly_the_modules_it_names():
    """peft takes a modules_to_save name as the end of a module's name: ``[norm]`` also trained every
    ``input_layernorm`` and ``post_attention_layernorm`` whole, and saved them, without a word; and
    ``[layernorm]`` was refused as matching nothing while peft took four modules."""
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.config.schema import LoraMethod, ModelConfig
    from sala_train.methods import apply_method
    from tests.conftest import TINY_CHAT

    model_cfg = ModelConfig(name_or_path=str(TINY_CHAT), lora_target_modules=["q_proj", "v_proj"])

    def adapt(names: list[str]):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
        return apply_method(LoraMethod(r=4, modules_to_save=names), model, model_cfg, gradient_checkpointing=False)

    for names, extra, meant in (
        (["norm"], "also train whole model.layers.0.input_layernorm", "model.norm"),
        (["layernorm"], "train whole model.layers.0.input_layernorm", "input_layernorm,post_attention_layernorm"),
    ):
        with pytest.raises(ConfigError) as refused:
            adapt(names)
        (problem,) = refused.value.problems
        assert problem.startswith(f"method.modules_to_save={names}: peft takes each name as the end of a module's "
                                  f"name, so it would {extra}, ")  # fmt: skip
        assert problem.endswith(f"and 1 more; name each module by its own name or full path, such as "
                                f"method.modules_to_save=[{meant}]")  # fmt: skip
    for names, wrapped in ((["model.norm"], ["model.norm"]), (["input_layernorm"], [f"model.layers.{i}.input_layernorm"
                                                                                   for i in (0, 1)])):  # fmt: skip
        adapted = adapt(names).base_model.model
        assert [n for n, m in adapted.named_modules() if isinstance(m, ModulesToSaveWrapper)] == wrapped
    # The partner of a tied head or embeddings is wrapped with it, as asked for: no refusal.
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    apply_method(LoraMethod(r=4, modules_to_save=["embed_tokens"]), model, model_cfg, gradient_checkpointing=False)


def test_dora_on_a_weight_with_an_all_zero_row_is_refused():
    """DoRA divides each output row by its norm: the tiny model's head, tied to embeddings whose
    padding row is zero, gave a NaN loss from step 0 (and the divergence message blamed the
    learning rate). The same targets without the head train."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.config.schema import LoraMethod, ModelConfig
    from sala_train.methods import apply_method
    from tests.conftest import TINY_CHAT

    def adapt(targets: list[str]):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
        assert not model.get_input_embeddings().weight[model.config.pad_token_id].any()
        return apply_method(LoraMethod(r=4, use_dora=True), model,
                            ModelConfig(name_or_path=str(TINY_CHAT), lora_target_modules=targets), False)  # fmt: skip

    with pytest.raises(ConfigError) as refused:
        adapt(["q_proj", "lm_head"])
    assert refused.value.problems == [
        "method.use_dora=true: adapted weights have output rows that are all zero, which DoRA divides by their norm "
        "(0/0: every loss would be NaN): lm_head (1 row); leave lm_head out of the LoRA targets, or set "
        "method.use_dora=false"
    ]
    adapted = adapt(["q_proj"])
    with torch.no_grad():
        assert adapted(input_ids=torch.tensor([[0, 5, 6, 7]])).logits.isfinite().all()
    # A dry run's estimate adapts the model on the meta device, which holds no values to look at.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    head_too = ModelConfig(name_or_path=str(TINY_CHAT), lora_target_modules=["q_proj", "lm_head"])
    apply_method(LoraMethod(r=4, use_dora=True), model, head_too, gradient_checkpointing=False)


def test_a_loss_not_finite_before_any_update_is_told_apart_from_a_divergence():
    from sala_train.divergence import not_finite_from_the_start

    nan = float("nan")
    assert not_finite_from_the_start([{"step": 0, "eval_loss": nan}, {"step": 1, "loss": nan}]) == (
        "eval_loss was already nan at step 0, before any update"
    )
    assert not_finite_from_the_start([{"step": 1, "loss": float("inf")}]) == (
        "loss was already inf at step 1, before any update"
    )
    assert not_finite_from_the_start([{"step": 0, "eval_loss": 6.9}, {"step": 1, "loss": 6.9}, {"step": 2, "loss": nan},
                                      {"step": 2, "eval_loss": nan}]) is None  # fmt: skip
    # A finite training loss since: the model computed one (step 1 overflowed once; the validation
    # data alone gave NaN), so the divergence came later.
    assert not_finite_from_the_start([{"step": 1, "loss": float("inf")}, {"step": 2, "loss": 6.9},
                                      {"step": 40, "loss": nan}]) is None  # fmt: skip
    assert not_finite_from_the_start([{"step": 0, "eval_loss": nan}, {"step": 1, "loss": 6.9}]) is None


@pytest.mark.parametrize(
    ("visible", "kept"),
    [(None, "0"), ("3,5", "3"), (" 2 , 4", "2"), ("GPU-1f2e,GPU-9a8b", "GPU-1f2e"), ("", ""), ("6", "6")],
)
def test_backend_single_keeps_one_gpu_of_those_visible(visible, kept):
    """On a machine with several GPUs the Trainer wrapped backend=single's model in DataParallel
    over all of them (the batch multiplied by the GPU count): the runner's process sees one."""
    from sala_train.distributed import one_gpu_for_one_process

    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    one_gpu_for_one_process(environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == kept
    rocm = {"HIP_VISIBLE_DEVICES": "2,3"}  # (ROCm's torch reads it before CUDA_VISIBLE_DEVICES)
    one_gpu_for_one_process(rocm)
    assert rocm == {"HIP_VISIBLE_DEVICES": "2", "CUDA_VISIBLE_DEVICES": "0"}
