"""Schemas, compose-time validation, the resolved config file, and launch plans."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml

from sala_train.atomic import cannot_make_directory_in
from sala_train.config import io
from sala_train.config.compose import check_command_line
from sala_train.config.entries import conf_dir, config_groups, group_options
from sala_train.config.schema import (
    DatasetColumns,
    DatasetConfig,
    DatasetFormat,
    DatasetTags,
    DdpBackend,
    DpoStage,
    FsdpBackend,
    FsdpMultinodeBackend,
    FullMethod,
    KtoStage,
    LocalLauncher,
    LoraMethod,
    ModelConfig,
    MultinodeLauncher,
    NoLogger,
    PretrainStage,
    RunConfig,
    SchedulerType,
    SftStage,
    SingleBackend,
    SlurmLauncher,
    TensorboardLogger,
    TrainConfig,
    WandbLogger,
    Zero2Backend,
    Zero3Backend,
    Zero3OffloadBackend,
)
from sala_train.config.typed import ConfigError, build
from sala_train.launch.plan import plan_launch


def problems_of(*overrides: str, config: str = "train", schema: type = RunConfig) -> list[str]:
    with pytest.raises(ConfigError) as err:
        check_command_line(list(overrides), config, schema)
    return err.value.problems


def test_masking_options_that_exclude_each_other_are_refused():
    from sala_train.config.schema import DataToolConfig

    both = ("dataset.mask_history=true", "dataset.train_on_prompt=true")
    for config, schema in (("train", RunConfig), ("data", DataToolConfig)):
        assert problems_of(*both, config=config, schema=schema) == [
            "dataset.mask_history / dataset.train_on_prompt: choose one (LLaMA-Factory refuses them together too): "
            "mask_history trains only the last reply, train_on_prompt every token"
        ]
    assert problems_of("preview=-1", config="data", schema=DataToolConfig) == [
        "preview: the number of train samples to show, >= 0; got -1"
    ]
    assert problems_of("dataset.tool_format=qwen") == [
        "dataset.tool_format: applies to dataset.template=chatml or cpm4; with dataset.template=null "
        "the tokenizer's own template writes tools its own way"
    ]


def test_default_command_line_is_valid():
    check_command_line([], "train", RunConfig)
    check_command_line(["method=full", "train.learning_rate=1e-4", "dataset.cutoff_len=256"], "train", RunConfig)


def test_every_kind_of_problem_listed_in_one_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = problems_of(
        "train.lerning_rate=1e-4",  # misspelt key
        "train.max_steps=many",  # wrong type
        "model.attn_implementation=flash",  # bad enum value
        "method=lroa",  # no such group option
        "train.bf16=true",
        "train.fp16=true",  # impossible combination
        "dataset.val_size=0.1",  # both validation file and val_size
        "launcher.nproc_per_node=2",  # single backend with 2 processes
    )
    text = "\n".join(problems)
    assert "train.lerning_rate: unknown key (did you mean 'train.learning_rate'?)" in text
    assert "train.max_steps: expected int, got 'many'" in text
    assert "model.attn_implementation: invalid value 'flash'" in text and "'flash_attention_2'" in text
    assert "method=lroa: no such method; choose from full, lora" in text
    assert "train.bf16 / train.fp16" in text
    assert "dataset.validation / dataset.val_size" in text
    assert "backend=single / launcher.nproc_per_node=2: the single backend runs one process" in text
    assert len(problems) == 7
    # Only what asks for more than one process is named (it read 'launcher.nproc_per_node=None').
    assert problems_of("launcher=multinode", "launcher.nnodes=2", "backend=single", "hydra.run.dir=x") == [
        "backend=single / launcher.nnodes=2: the single backend runs one process; choose backend=ddp, zero2, zero3 "
        "or fsdp"
    ]


@pytest.mark.parametrize("steps", ["0", "-2"])
def test_max_steps_is_a_count_or_minus_one(steps):
    # The Trainer trains one step for max_steps=0 (it reads epochs only below 0).
    assert problems_of(f"train.max_steps={steps}") == [
        f"train.max_steps: a step count >= 1, or -1 to train num_train_epochs, got {steps}"
    ]


def test_an_explicit_resume_must_name_a_published_checkpoint(tmp_path, monkeypatch):
    """Refused before anything loads: the runner would delete the unpublished directory the user
    named, and the Trainer fails on a directory without its states only after loading the model."""
    monkeypatch.chdir(tmp_path)
    partial = tmp_path / "run" / "checkpoint-4"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text("{}")
    assert problems_of(f"train.resume={partial}") == [
        f"train.resume: {partial} is not a complete checkpoint (sala_checkpoint.json missing, or a file it lists "
        "is missing or cut short); name a checkpoint-N directory a run published"
    ]
    (partial / "sala_checkpoint.json").write_text(json.dumps({"files": {"trainer_state.json": 2}}))
    check_command_line([f"train.resume={partial}"], "train", RunConfig)  # published: accepted
    (partial / "trainer_state.json").write_text("{ }")  # a size the manifest does not list
    assert len(problems_of(f"train.resume={partial}")) == 1
    assert problems_of("train.resume=nowhere") == [
        "train.resume=nowhere: no such directory; give 'auto', 'never' or a checkpoint directory"
    ]


def test_a_resume_refuses_changes_the_checkpoint_would_override(tmp_path):
    """Trainer restores the optimizer's and scheduler's states: a new learning rate or weight decay
    was silently ignored (the run's config.yaml said otherwise), and a new LoRA shape fails late;
    other target modules crashed the process (Adam's states on other modules' adapters), another
    base model trained the adapter on it silently."""
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "sala_checkpoint.json").write_text(json.dumps({"files": {"trainer_state.json": 2}}))
    from tests.conftest import TINY_CHAT

    blocks = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    tiny = ModelConfig(name_or_path=str(TINY_CHAT), from_scratch=True, lora_target_modules=blocks)  # as model=tiny
    io.save(dataclasses.replace(sample_config(LoraMethod()), model=tiny), checkpoint.parent)  # lr 5e-05, r 16
    # (alpha null, 2 × r: another r is another scale too)
    resume = f"train.resume={checkpoint}"
    assert problems_of(resume, "train.learning_rate=1e-3", "method.r=8", "train.max_steps=20") == [
        f"{resume}: a resumed run keeps what its checkpoint holds, so these changes from the run that wrote it "
        "would not take effect (its optimizer and scheduler states carry the learning rate, weight decay and Adam's "
        "betas and epsilon; its adapter, the LoRA shape, scale and modules and the base model it adapts); resume "
        "with that run's values, or start a new run:\n      method.alpha: 32 -> 16\n      method.r: 16 -> 8"
        "\n      train.learning_rate: 5e-05 -> 0.001"
    ]
    (tmp_path / "config.json").write_text((TINY_CHAT / "config.json").read_text())  # another model directory
    (other,) = problems_of(resume, "train.learning_rate=5e-5", "model.lora_target_modules=[k_proj,o_proj]",
                           "method.alpha=7",
                           f"model.name_or_path={tmp_path}")  # fmt: skip
    assert other.endswith(
        f"\n      method.alpha: 32 -> 7\n      method.target_modules: {sorted(blocks)!r} -> ['k_proj', "
        f"'o_proj']\n      model.name_or_path: {str(TINY_CHAT)!r} -> {str(tmp_path)!r}"
    ), other  # (the targets as the adapter has them, whichever key set them)
    # The same adapter by the other key, in another order: no change (it was refused as one).
    check_command_line([resume, "train.learning_rate=5e-5", f"method.target_modules=[{','.join(reversed(blocks))}]"],
                       "train", RunConfig)  # fmt: skip
    check_command_line([resume, "train.learning_rate=5e-5", "train.max_steps=20"], "train", RunConfig)
    # The tiny base is built from its config with train.seed's weights: another seed, another base.
    # DoRA, rsLoRA and modules trained whole are the adapter's too (a run from before they were keys: off)
    (dora,) = problems_of(resume, "train.learning_rate=5e-5", "method.use_dora=true", "method.use_rslora=true",
                          "method.modules_to_save=[embed_tokens]")  # fmt: skip
    assert dora.endswith("\n      method.modules_to_save: [] -> ['embed_tokens']\n      method.use_dora: False -> True"
                         "\n      method.use_rslora: False -> True"), dora  # fmt: skip
    (seed,) = problems_of(resume, "train.learning_rate=5e-5", "train.seed=7")
    assert seed.endswith("\n      train.seed: 42 -> 7"), seed
    (loaded,) = problems_of(resume, "train.learning_rate=5e-5", "model.from_scratch=false")
    assert loaded.endswith("\n      model.from_scratch: True -> False"), loaded
    # Adam's betas and epsilon are in the optimizer's param groups, which the checkpoint restores
    (adam,) = problems_of(resume, "train.learning_rate=5e-5", "train.adam_beta2=0.95", "train.adam_epsilon=1e-6")
    assert adam.endswith("\n      train.adam_beta2: 0.999 -> 0.95\n      train.adam_epsilon: 1e-08 -> 1e-06"), adam
    # A run from before those keys existed trained with their defaults: it resumes (it was refused, None -> 0.9)
    saved = yaml.safe_load((checkpoint.parent / "config.yaml").read_text())
    for key in ("adam_beta1", "adam_beta2", "adam_epsilon"):
        del saved["train"][key]
    (checkpoint.parent / "config.yaml").write_text(yaml.safe_dump(saved))
    check_command_line([resume, "train.learning_rate=5e-5"], "train", RunConfig)
    (adam,) = problems_of(resume, "train.learning_rate=5e-5", "train.adam_beta2=0.95")
    assert adam.endswith("\n      train.adam_beta2: 0.999 -> 0.95"), adam


def test_a_resume_part_way_through_an_epoch_refuses_changes_to_its_batches(tmp_path):
    """The Trainer resumes mid-epoch by skipping as many batches as it trained: with another seed,
    batch size or data under train.resume=PATH, some of that epoch's samples trained twice and
    others never, without a word. At an epoch's end the next epoch starts afresh: accepted."""
    from hydra import compose, initialize_config_module

    from sala_train.config.resolve import resolve_config

    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    state = checkpoint / "trainer_state.json"
    state.write_text('{"epoch": 0.25}')
    (checkpoint / "sala_checkpoint.json").write_text(json.dumps({"files": {"trainer_state.json": 15}}))
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        written = resolve_config(compose("train", overrides=["method=full"]), RunConfig, tmp_path)
    io.save(written, checkpoint.parent)
    seed, size = written.train.seed, written.train.per_device_train_batch_size
    resume = f"train.resume={checkpoint}"
    (problem,) = problems_of("method=full", resume, f"train.seed={seed + 1}",
                             f"train.per_device_train_batch_size={size + 1}")  # fmt: skip
    assert problem == (
        f"{resume}: that checkpoint stopped part-way through an epoch, and the Trainer resumes by skipping as many "
        "batches as it trained, so a change to what decides the batches would train some of that epoch's samples "
        "twice and others never; resume with that run's values, or resume from a checkpoint at an epoch's end "
        f"(train.save_strategy=epoch):\n      train.per_device_train_batch_size: {size} -> {size + 1}\n"
        f"      train.seed: {seed} -> {seed + 1}"
    )
    check_command_line(["method=full", resume, "train.max_steps=20"], "train", RunConfig)
    # Another split of train and validation: records the run had trained on were evaluated on.
    check_command_line(["method=full", resume, "dataset.split_seed=7"], "train", RunConfig)  # (no val_size: no effect)
    held_out, _ = problems_of("method=full", resume, "dataset.split_seed=7", "dataset.val_size=0.5")
    assert held_out.endswith(f"\n      dataset.split_seed: {written.dataset.split_seed} -> 7\n"
                             f"      dataset.val_size: {written.dataset.val_size} -> 0.5"), held_out  # fmt: skip
    state.write_text('{"epoch": 1.00}')  # (the same size: the manifest still matches)
    changes = [f"train.seed={seed + 1}", f"train.per_device_train_batch_size={size + 1}"]
    check_command_line(["method=full", resume, *changes], "train", RunConfig)


def test_a_resume_compares_paths_as_the_run_that_wrote_it_saved_them(tmp_path, monkeypatch):
    """config.yaml holds the data and model paths made absolute; the command line's relative ones
    were compared as given: a LoRA resume from `model.name_or_path=tiny` was refused as another
    base model ('/.../tiny' -> 'tiny'), and a mid-epoch one as other data."""
    from hydra import compose, initialize_config_module

    from sala_train.config.resolve import resolve_config
    from tests.conftest import TINY_CHAT

    monkeypatch.chdir(tmp_path)
    shutil.copytree(TINY_CHAT, "tiny")
    shutil.copytree(TINY_CHAT.parents[1] / "data" / "demo_chat", "data")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"epoch": 0.25}')
    (checkpoint / "sala_checkpoint.json").write_text(json.dumps({"files": {"trainer_state.json": 15}}))
    overrides = ["method=lora", "model=hf", "model.name_or_path=tiny", "method.target_modules=[q_proj]",
                 "dataset.train=[data/train.jsonl]", "dataset.validation=[data/validation.jsonl]"]  # fmt: skip
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        io.save(resolve_config(compose("train", overrides=overrides), RunConfig, tmp_path), checkpoint.parent)
    check_command_line([*overrides, "train.resume=run/checkpoint-2"], "train", RunConfig)


def test_a_checkpoint_is_resumed_only_with_the_method_that_wrote_it(tmp_path):
    """A LoRA checkpoint under method=full: the Trainer failed after loading the model ("Can't find
    a checkpoint index"), with a traceback."""
    checkpoints = {}
    for method, weights in (("lora", "adapter_config.json"), ("full", "model.safetensors"), ("sharded", "")):
        path = checkpoints[method] = tmp_path / method / "checkpoint-2"
        path.mkdir(parents=True)
        files = {"trainer_state.json": 2, **({weights: 2} if weights else {})}
        for name in files:
            (path / name).write_text("{}")
        (path / "sala_checkpoint.json").write_text(json.dumps({"files": files}))
    for method, other in (("full", "lora"), ("lora", "full")):
        assert problems_of(f"method={method}", f"train.resume={checkpoints[other]}") == [
            f"train.resume={checkpoints[other]} / method={method}: that checkpoint is of a method={other} run (the "
            "Trainer would fail on it after loading the model); resume it with the method it was trained with"
        ]
        check_command_line([f"method={method}", f"train.resume={checkpoints[method]}"], "train", RunConfig)
        check_command_line([f"method={method}", f"train.resume={checkpoints['sharded']}"], "train", RunConfig)


def test_missing_required_value():
    assert problems_of("model=hf") == [
        "model.name_or_path: missing required value (set it on the command line or in the config)"
    ]


def test_missing_data_file_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = problems_of("dataset=advertisegen_chatml")
    assert problems == [
        f"dataset.train[0]: file not found: {tmp_path}/data/AdvertiseGenChatML/train.json",
        f"dataset.validation[0]: file not found: {tmp_path}/data/AdvertiseGenChatML/dev.json",
    ]


def test_key_of_another_method_is_unknown():
    assert problems_of("method=full", "method.r=8") == [
        "method.r: unknown key (a key of method=lora); valid keys: name"
    ]


def test_sweep_without_multirun_and_bad_sweep_values():
    assert problems_of("train.seed=1,2") == ["train.seed=1,2: a sweep needs -m (--multirun)"]
    assert problems_of("-m", "method.r=8,0") == ["in the job with method.r=0: method.r: must be >= 1, got 0"]
    # A sweep of nothing: Hydra launched no job, exited 0 and left an empty sweep directory.
    assert problems_of("-m", "train.seed=range(0,0)") == ["train.seed=range(0,0): sweeps no value, so no job would run"]
    assert problems_of("-m", "dataset=glob(nomatch*)")[0].startswith(
        "dataset=glob(nomatch*): sweeps no value, so no job would run; dataset options: advertisegen_chatml, "
    )
    check_command_line(["-m", "dataset=glob(demo_c*)"], "train", RunConfig)


def test_sala_data_preview_format_enum():
    from sala_train.config.schema import DataToolConfig

    (problem,) = problems_of("preview_format=xml", config="data", schema=DataToolConfig)
    assert problem.startswith("preview_format: invalid value 'xml'")


def _schema_keys(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


GROUP_SCHEMAS = {
    "method": {"full": FullMethod, "lora": LoraMethod},
    "stage": {"sft": SftStage, "pretrain": PretrainStage, "dpo": DpoStage, "kto": KtoStage},
    "backend": {
        "single": SingleBackend,
        "ddp": DdpBackend,
        "zero2": Zero2Backend,
        "zero3": Zero3Backend,
        "zero3_offload": Zero3OffloadBackend,
        "fsdp": FsdpBackend,
        "fsdp_multinode": FsdpMultinodeBackend,
    },
    "launcher": {"local": LocalLauncher, "multinode": MultinodeLauncher, "slurm": SlurmLauncher},
    "logger": {"none": NoLogger, "tensorboard": TensorboardLogger, "wandb": WandbLogger},
}


def test_every_group_option_lists_every_schema_key():
    """Hydra only lets users override keys present in YAML: options must spell out the schema."""
    for group, classes in GROUP_SCHEMAS.items():
        assert set(group_options(group)) == set(classes)
        for option, cls in classes.items():
            data = yaml.safe_load((conf_dir() / group / f"{option}.yaml").read_text())
            assert set(data) == _schema_keys(cls), (group, option)
            assert build(cls, data) == cls(), (group, option)  # the YAML spells out the schema defaults
    for option in group_options("dataset"):
        data = yaml.safe_load((conf_dir() / "dataset" / f"{option}.yaml").read_text())
        assert set(data) == _schema_keys(DatasetConfig) - {"mixed"}, option  # `mixed` is filled from `mix`
        assert set(data["columns"]) == _schema_keys(DatasetColumns), option  # every mapping key overridable
        assert set(data["tags"]) == _schema_keys(DatasetTags), option
    for option in group_options("model"):
        data = yaml.safe_load((conf_dir() / "model" / f"{option}.yaml").read_text())
        data = data.get("model", data)  # `tiny` is a _global_ package
        assert set(data) == _schema_keys(ModelConfig), option
    train = yaml.safe_load((conf_dir() / "train.yaml").read_text())["train"]
    assert set(train) == _schema_keys(TrainConfig)
    assert set(config_groups()) >= {"model", "method", "stage", "dataset", "backend", "launcher", "experiment"}


def test_guide_recipe_composes_with_guide_hyperparameters():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        cfg = compose("train", overrides=["model=minicpm_sala", "dataset=advertisegen_chatml", "method=lora"])
    data = OmegaConf.to_container(cfg, resolve=True)
    t = data["train"]
    assert (t["learning_rate"], t["per_device_train_batch_size"], t["gradient_accumulation_steps"]) == (5e-5, 2, 4)
    assert (t["warmup_steps"], t["max_steps"], t["weight_decay"]) == (100, 3000, 0.01)
    assert (t["eval_steps"], t["save_steps"], t["seed"], t["logging_steps"], t["bf16"]) == (100, 500, 42, 10, True)
    m = data["model"]
    assert m["name_or_path"] == "openbmb/MiniCPM-SALA" and m["trust_remote_code"] is True
    assert m["attn_implementation"] == "flash_attention_2" and m["dtype"] == "bfloat16"
    assert {"o_gate", "z_proj", "gate_proj", "q_proj"} <= set(m["lora_target_modules"])
    assert data["dataset"]["train"] == ["data/AdvertiseGenChatML/train.json"]
    assert data["dataset"]["validation"] == ["data/AdvertiseGenChatML/dev.json"]


def test_only_minicpm_sala_trusts_remote_code():
    for option in group_options("model"):
        data = yaml.safe_load((conf_dir() / "model" / f"{option}.yaml").read_text())
        data = data.get("model", data)
        assert data["trust_remote_code"] is (option == "minicpm_sala"), option


def sample_config(method: typing.Any) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name_or_path="/m", lora_target_modules=["q_proj"]),
        method=method,
        stage=SftStage(),
        dataset=DatasetConfig(name="d", train=["/a.jsonl"], validation=["/b.jsonl"], val_size=None),
        backend=SingleBackend(),
        launcher=LocalLauncher(nproc_per_node=1),
        train=TrainConfig(lr_scheduler_type=SchedulerType.COSINE, save_total_limit=3),
    )


@pytest.mark.parametrize("method", [FullMethod(), LoraMethod(r=8, alpha=16, dropout=0.0, target_modules=["a", "b"])])
def test_resolved_config_round_trips_exactly(tmp_path, method):
    cfg = sample_config(method)
    io.save(cfg, tmp_path)
    loaded = io.load(RunConfig, tmp_path)
    assert loaded == cfg
    assert type(loaded.method) is type(method)
    assert isinstance(loaded.train.lr_scheduler_type, SchedulerType)
    assert (tmp_path / "config.yaml").read_text() == io.dump(loaded)


def test_loading_rejects_a_tampered_config(tmp_path):
    cfg = sample_config(FullMethod())
    io.save(cfg, tmp_path)
    text = (tmp_path / "config.yaml").read_text().replace("name: full", "name: qlora")
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape("method.name: unknown method 'qlora'; choose from full, lora")):
        io.load(RunConfig, tmp_path)


def test_build_lists_all_problems_at_once():
    with pytest.raises(ConfigError) as err:
        build(TrainConfig, {"seed": "x", "bf16": 1, "nope": 2})
    assert len(err.value.problems) == 3


def test_launch_plan_local_runs_the_runner_on_the_run_dir(tmp_path):
    (plan,) = plan_launch(sample_config(FullMethod()), tmp_path)
    assert plan.argv == (sys.executable, "-m", "sala_train.runner", str(tmp_path))
    assert plan.display().endswith(f"-m sala_train.runner {tmp_path}")


def test_every_node_of_a_multinode_run_resumes_from_the_directory_they_share(tmp_path):
    """Each node writes config.yaml there with its own node_rank: the last writer's refused the
    other node's rerun ("launcher.node_rank: 1 -> 0"), so the run could not be resumed."""
    from sala_train.checkpoints import guard_run_dir, publish
    from sala_train.config.typed import to_plain

    def node(rank: int, addr: str = "10.0.0.1") -> dict:
        return to_plain(dataclasses.replace(sample_config(FullMethod()), backend=DdpBackend(),
                                            launcher=MultinodeLauncher(node_rank=rank, master_addr=addr)))  # fmt: skip

    io.save(build(RunConfig, node(1)), tmp_path)
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    publish(tmp_path / "checkpoint-5", 5)
    guard_run_dir(tmp_path, node(0), "auto")
    guard_run_dir(tmp_path, node(0, addr="10.0.0.7"), "auto")  # the head node moved on the rerun
    with pytest.raises(ConfigError, match=re.escape("launcher.nnodes: 2 -> 3")):  # the world size still may not
        guard_run_dir(tmp_path, {**node(0), "launcher": {**node(0)["launcher"], "nnodes": 3}}, "auto")


def test_a_sweep_rerun_with_its_overrides_reordered_is_told_why_its_jobs_are_refused(tmp_path):
    """Hydra numbers a sweep's jobs by the order of its overrides: `-m b=1,2 a=1,2` after
    `-m a=1,2 b=1,2` gives jobs 1 and 2 each other's values, and both were refused with only
    their differences, though each config had trained in the other directory."""
    from sala_train.checkpoints import guard_run_dir, publish
    from sala_train.config.typed import to_plain

    def job(seed: int, lr: float) -> dict:
        config = sample_config(FullMethod())
        return to_plain(dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed,
                                                                               learning_rate=lr)))  # fmt: skip

    for name, config in (("1", job(1, 3e-3)), ("2", job(2, 1e-3))):
        io.save(build(RunConfig, config), tmp_path / name)
        (tmp_path / name / "checkpoint-5").mkdir()
        (tmp_path / name / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
        publish(tmp_path / name / "checkpoint-5", 5)
    with pytest.raises(ConfigError) as refused:
        guard_run_dir(tmp_path / "1", job(2, 1e-3), "auto", "hydra.sweep.dir")
    assert (f"This config is the one {tmp_path / '2'} trained: the sweep's overrides came in another order than the "
            "command that made this directory") in refused.value.problems[0]  # fmt: skip
    with pytest.raises(ConfigError) as refused:  # (a config no job has: the differences alone)
        guard_run_dir(tmp_path / "1", job(3, 1e-3), "auto", "hydra.sweep.dir")
    assert "another order" not in refused.value.problems[0]


def test_a_run_on_the_packaged_demo_assets_resumes_after_sala_train_moves(tmp_path):
    """config.yaml holds the demo model's and data's absolute paths inside the installed package: a
    new venv or an upgrade moved them, and the rerun was refused as a different config."""
    from sala_train.assets import asset_path
    from sala_train.checkpoints import guard_run_dir, publish
    from sala_train.config.typed import to_plain

    def on_assets(root: str | None) -> dict:
        where = (lambda rel: f"{root}/sala_train/assets/{rel}") if root else asset_path
        cfg = sample_config(FullMethod())
        model = dataclasses.replace(cfg.model, name_or_path=where("models/tiny-chat"))
        dataset = dataclasses.replace(cfg.dataset, train=[where("data/demo/train.jsonl")])
        return to_plain(dataclasses.replace(cfg, model=model, dataset=dataset))

    io.save(build(RunConfig, on_assets("/old/venv/lib/python3.11/site-packages")), tmp_path)
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    publish(tmp_path / "checkpoint-5", 5)
    guard_run_dir(tmp_path, on_assets(None), "auto")  # the same assets, installed elsewhere
    from sala_train.checkpoints import config_differences

    mixed = [{"name": "demo_alpaca", "train": ["/old/sala_train/assets/data/demo_alpaca/train.json"]}]
    moved = [{"name": "demo_alpaca", "train": [asset_path("data/demo_alpaca/train.json")]}]
    assert config_differences({"dataset": {"mixed": mixed}}, {"dataset": {"mixed": moved}}) == []
    elsewhere = {**on_assets(None), "model": {**on_assets(None)["model"], "name_or_path": "/m"}}
    with pytest.raises(ConfigError, match=re.escape("model.name_or_path: '/old/venv/")):
        guard_run_dir(tmp_path, elsewhere, "auto")  # another model is still another config


def test_a_requeued_slurm_job_resumes_its_own_checkpoints_under_resume_never(tmp_path, monkeypatch):
    """train.resume=never was checked when the job was submitted; a requeued run of it read it as
    written and trained from step 0 again on every requeue (never finishing a run longer than its
    time limit). SLURM_RESTART_COUNT says the job was requeued: its checkpoints are its own."""
    from sala_train.checkpoints import guard_run_dir, publish, record_slurm_job
    from sala_train.config.typed import to_plain
    from sala_train.runner import resume_checkpoint

    cfg = sample_config(FullMethod())
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="never"))
    io.save(cfg, tmp_path)
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6}')
    publish(tmp_path / "checkpoint-6", 6)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(ConfigError, match=r"train.resume=never: .* already holds checkpoint-6"):
        guard_run_dir(tmp_path, to_plain(cfg), "never")
    assert resume_checkpoint(cfg, tmp_path) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # (set on a job's first run too)
    assert resume_checkpoint(cfg, tmp_path) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    # Job 41 trains another directory: SLURM_RESTART_COUNT is passed on to every job a requeued job
    # submits (seen on the local SLURM 22.05), so the count alone does not say this run was requeued.
    assert resume_checkpoint(cfg, tmp_path) is None
    record_slurm_job(tmp_path)  # (as the runner does when it starts in job 41)
    guard_run_dir(tmp_path, to_plain(cfg), "never")  # (a submitit job, requeued, runs the command again)
    assert resume_checkpoint(cfg, tmp_path) == tmp_path / "checkpoint-6"
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # another job, with the requeued one's count inherited
    assert resume_checkpoint(cfg, tmp_path) is None


def test_run_dir_guard(tmp_path):
    from sala_train.checkpoints import guard_run_dir, publish
    from sala_train.config.typed import to_plain

    cfg = sample_config(FullMethod())
    guard_run_dir(tmp_path, to_plain(cfg), "auto")  # no checkpoints: anything goes
    io.save(cfg, tmp_path)
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    publish(tmp_path / "checkpoint-5", 5)
    guard_run_dir(tmp_path, to_plain(cfg), "auto")  # same config: resume
    # A run started before keys were added (here: this session's) resumes after the upgrade.
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["train"]["warmup_ratio"], saved["train"]["save_strategy"], saved["dataset"]["columns"]["tools"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    guard_run_dir(tmp_path, to_plain(cfg), "auto")
    changed = to_plain(dataclasses.replace(cfg, train=TrainConfig(learning_rate=1.0)))
    with pytest.raises(ConfigError) as err:
        guard_run_dir(tmp_path, changed, "auto")
    assert len(err.value.problems) == 1 and "\n      train.learning_rate: 5e-05 -> 1.0" in err.value.problems[0]
    # The checkpoint's optimizer and scheduler states would keep the old rate: no "resume anyway".
    assert "resume anyway" not in err.value.problems[0]
    with pytest.raises(ConfigError, match=re.escape(f"resume anyway with train.resume={tmp_path / 'checkpoint-5'}")):
        guard_run_dir(tmp_path, to_plain(dataclasses.replace(cfg, train=TrainConfig(logging_steps=3))), "auto")
    with pytest.raises(ConfigError, match=re.escape("train.resume=never")):
        guard_run_dir(tmp_path, to_plain(cfg), "never")
    # A finished run without checkpoints (save_steps past max_steps) is guarded by its final/ too.
    shutil.rmtree(tmp_path / "checkpoint-5")
    (tmp_path / "final").mkdir()
    with pytest.raises(ConfigError, match="holds a run of a different config"):
        guard_run_dir(tmp_path, changed, "auto")
    with pytest.raises(ConfigError, match=re.escape("already holds final/")):
        guard_run_dir(tmp_path, to_plain(cfg), "never")
    # A sweep job's message names the sweep's directory key.
    with pytest.raises(ConfigError, match=re.escape("choose a new hydra.sweep.dir")):
        guard_run_dir(tmp_path, changed, "auto", "hydra.sweep.dir")
    # A run's config.yaml that is not readable: one message naming it, not a YAML traceback.
    for broken in ("train: [unclosed\n", "just a string\n"):
        (tmp_path / "config.yaml").write_text(broken)
        with pytest.raises(
            ConfigError, match=re.escape(f"{tmp_path / 'config.yaml'}: the run's config is not readable")
        ):
            guard_run_dir(tmp_path, to_plain(cfg), "auto")


def test_path_anchoring_makes_data_paths_absolute(tmp_path):
    from sala_train.config.resolve import anchor_paths

    cfg = sample_config(FullMethod())
    cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, train=["rel/a.jsonl"]))
    anchored = anchor_paths(cfg, tmp_path)
    assert anchored.dataset.train == [str(Path(tmp_path, "rel/a.jsonl").resolve())]


def test_optional_group_can_be_dropped_but_not_set_to_null():
    check_command_line(["~experiment"], "train", RunConfig)
    assert problems_of("experiment=null") == [
        "experiment=null: no such experiment; choose from guide_lf_dpo, guide_lf_kto, guide_lf_sft, guide_lf_toolcall, "
        "minicpm_sala_lora"
    ]
    assert problems_of("~method") == ["method: missing required value"]
    from sala_train.provenance import one_trial

    # (the run's recorded command took `~hparams_search` for a preset and ended in an IndexError)
    assert one_trial(["~hparams_search", "train.seed=1"]) == ["~hparams_search", "train.seed=1"]


def test_an_empty_list_of_lora_targets_is_refused_by_either_key():
    """`model.lora_target_modules=[]` was read as none named: every linear layer, without a word."""
    assert problems_of("method.target_modules=[]") == [
        "method.target_modules: empty list; use null for the model's defaults"
    ]
    assert problems_of("model.lora_target_modules=[]") == [
        "model.lora_target_modules: empty list; use null for every linear layer but the output head (all-linear), "
        "or name the modules"
    ]
    check_command_line(["model.lora_target_modules=[]", "method.target_modules=[q_proj]"], "train", RunConfig)
    check_command_line(["model.lora_target_modules=[]", "method=full"], "train", RunConfig)


def test_deleting_a_key_or_section_is_refused():
    """`~train.learning_rate` trained with the schema's dataclass default (5e-05), not the chosen
    options' value (the demo's 3e-3), and `~train` with a third set of defaults, documented nowhere."""
    assert problems_of("~train.learning_rate", "~train") == [
        "~train.learning_rate: deleting a key leaves the schema's built-in default, not the value the chosen options "
        "give it; set the value you want (train.learning_rate=VALUE, or train.learning_rate=null where it may be "
        "empty)",
        "~train: deleting a section leaves the schema's built-in defaults, not the values the chosen options give "
        "it; set the keys you want to change (train.KEY=VALUE)",
    ]


def test_packing_and_batching_rules():
    problems = problems_of(
        "train.max_tokens_per_batch=100",  # below dataset.cutoff_len (512)
        "train.group_by_length=true",  # conflicts with a token budget
        "model.attn_implementation=sala_varlen",  # without packing
    )
    text = "\n".join(problems)
    assert "train.max_tokens_per_batch=100: must be >= dataset.cutoff_len (512)" in text
    assert "train.group_by_length / train.packing / train.max_tokens_per_batch" in text
    varlen = "model.attn_implementation=sala_varlen needs train.packing=true (it attends within packed samples), and"
    assert f"{varlen} a CUDA GPU" in text  # (both said at once: the GPU is checked only where torch is imported)
    dpo = problems_of("stage=dpo", "dataset=demo_preference", "method=full", "train.packing=true")
    assert dpo == [
        "train.packing / train.max_tokens_per_batch: not available for stage=dpo "
        "(TRL's preference collators pad pairs themselves)"
    ]


def test_sweeps_hydra_cannot_enumerate_and_sala_data_sweeps_are_refused():
    """range(1,5,0) ended in the sweeper's ValueError traceback (exit 1) after making the sweep
    directory; sala-data -m made a multirun/ folder though it writes nothing."""
    from sala_train.config.schema import DataToolConfig

    assert problems_of("-m", "train.seed=range(1,5,0)") == ["train.seed=range(1,5,0): range() arg 3 must not be zero"]
    assert problems_of("-m", "preview=1,2", config="data", schema=DataToolConfig) == [
        "-m (--multirun): sala-data shows one data set per command and writes nothing; run it once per value"
    ]


def test_a_bad_value_past_the_first_64_jobs_of_a_sweep_is_found_before_any_runs():
    """The first 64 combinations are checked; every value they leave out is checked once too (the
    -1 jobs come after the 64th: each would have started and failed on its own)."""
    assert problems_of("-m", "train.learning_rate=1e-3,-1", "train.seed=range(0,64)") == [
        "in the job with train.learning_rate=-1 train.seed=0: train.learning_rate: must be > 0, got -1.0"
    ]
    found = problems_of("-m", "stage=sft,dpo", "train.seed=range(0,64)", "train.packing=true")  # (dpo: no packing)
    assert found and all(p.startswith("in the job with stage=dpo train.seed=0: ") for p in found), found


def test_a_sweep_too_large_to_check_whole_says_how_many_values_wait_for_their_jobs(capsys):
    # The first 64 jobs: learning rate 1e-3 with seeds 0-63; then 2e-3 and seeds 64-299, 192 of those 237.
    check_command_line(["-m", "train.learning_rate=1e-3,2e-3", "train.seed=range(0,300)"], "train", RunConfig)
    assert capsys.readouterr().err == (
        "sala-train: note: 45 values of this sweep are checked only as their jobs start (before it starts: its "
        "first 64 jobs, and 192 values they leave out)\n"
    )
    check_command_line(["-m", "train.learning_rate=1e-3,2e-3", "train.seed=range(0,255)"], "train", RunConfig)
    assert capsys.readouterr().err == ""  # (1 + 191 left out: all checked)


def test_varlen_with_float32_weights_needs_16_bit_training():
    """Flash attention computes in 16 bits only; the kernel would get float32 (checked after loading
    too, where model.dtype=auto takes the checkpoint's: tests/unit/test_packing.py)."""
    varlen = ("train.packing=true", "model.attn_implementation=sala_varlen")
    fix = "; set train.bf16=true (float32 weights, bfloat16 compute) or model.dtype=bfloat16"
    start = "model.attn_implementation=sala_varlen computes in bfloat16/float16, and "
    assert problems_of(*varlen, "model.dtype=float32") == [start + "model.dtype=float32 gives float32 weights" + fix]
    assert problems_of(*varlen, "model.dtype=auto") == [  # the tiny model: random init from config.json
        start + "model.from_scratch=true with model.dtype=auto gives float32 weights" + fix
    ]
    for fine in (
        ["model.dtype=float32", "train.bf16=true"],  # float32 weights, bf16 compute under autocast
        ["model.dtype=bfloat16"],
        ["model=hf", "model.name_or_path=some/hub-id"],  # auto: the checkpoint's, known after loading
    ):
        check_command_line([*varlen, *fine], "train", RunConfig)


def test_liger_is_never_on_silently_where_it_cannot_run():
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.config.schema import LigerMode
    from sala_train.errors import ModelLoadError
    from sala_train.kernels import check_liger_possible, use_liger
    from tests.conftest import TINY_CHAT

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    cfg = ModelConfig(name_or_path=str(TINY_CHAT))
    assert use_liger(cfg, SingleBackend(), model) is False  # auto: off on CPU
    assert use_liger(dataclasses.replace(cfg, liger=LigerMode.FALSE), SingleBackend(), model) is False
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
            check_liger_possible(dataclasses.replace(cfg, liger=LigerMode.TRUE))


def test_liger_stays_off_under_zero3(monkeypatch):
    """Its fused loss reads lm_head.weight without running lm_head, where ZeRO-3 gathers it: the first
    step fails (a zero-size shard). auto is off there; true is refused before anything loads."""
    import importlib.util

    from sala_train import kernels

    # A CUDA machine with liger-kernel, and a model Liger supports: only the backend decides.
    monkeypatch.setattr(kernels.torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else find_spec(name, *a)
    )
    monkeypatch.setattr(kernels, "_unsupported_reason", lambda model: None)
    auto = ModelConfig(name_or_path="m")
    assert kernels.use_liger(auto, SingleBackend(), object()) is True
    assert kernels.use_liger(auto, Zero2Backend(), object()) is True
    assert kernels.use_liger(auto, Zero3Backend(), object()) is False
    assert kernels.use_liger(auto, Zero3OffloadBackend(), object()) is False
    for backend in ("zero3", "zero3_offload"):
        assert problems_of("model.liger=true", f"backend={backend}", "launcher.nproc_per_node=2") == [
            f"model.liger=true with backend={backend}: Liger's fused loss reads lm_head's weight, which ZeRO-3 "
            "keeps sharded outside lm_head's own forward; use model.liger=auto (off under ZeRO-3), or backend=fsdp"
        ]


def test_liger_stays_off_where_lora_adapts_the_head():
    # Liger's fused loss reads lm_head.weight, which under peft is the frozen base weight: the
    # head's adapter would get no gradient (lora_B stays 0), silently.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.kernels import _unsupported_reason
    from tests.conftest import TINY_CHAT

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    assert "LoRA adapts lm_head" in (_unsupported_reason(peft_model.get_base_model()) or "")


def test_liger_stays_off_for_every_logit_scale_a_config_carries():
    """Falcon-H1 multiplies its logits by lm_head_multiplier (0.039 in real checkpoints), which
    Liger's fused loss skips: model.liger=auto turned it on, training on logits 25x too sharp."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from sala_train.kernels import MUP_ATTRIBUTES, _unsupported_reason
    from sala_train.stages.preference import TRL_LOGIT_SCALES

    assert set(TRL_LOGIT_SCALES) <= set(MUP_ATTRIBUTES)
    falcon = AutoConfig.for_model("falcon_h1", lm_head_multiplier=0.0390625)
    assert _unsupported_reason(SimpleNamespace(config=falcon)) == (
        "falcon_h1 scales its logits (lm_head_multiplier), which Liger's fused cross-entropy would skip"
    )


def test_only_published_checkpoints_count_and_partial_ones_are_removed(tmp_path):
    """Unpublished (a kill mid-save, or mid-prune): removed. Published and changed since (a failing
    disk, a damaged manifest): set aside as damaged-checkpoint-N, not deleted."""
    from sala_train.checkpoints import (
        MANIFEST,
        complete_checkpoints,
        prune,
        publish,
        remove_incomplete,
        set_aside_damaged,
    )

    for step in (2, 4, 6):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * step)
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    publish(tmp_path / "checkpoint-2", 2)
    publish(tmp_path / "checkpoint-4", 4)  # checkpoint-6: killed before it was published
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"x")  # truncated after publishing
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2"]
    with pytest.raises(RuntimeError, match="for step 6, expected 8"):
        publish(tmp_path / "checkpoint-6", 8)
    assert [p.name for p in remove_incomplete(tmp_path)] == ["checkpoint-6"]
    assert [p.name for p in set_aside_damaged(tmp_path)] == ["damaged-checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "damaged-checkpoint-4"]
    for step in (8, 10):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        publish(path, step)
    (tmp_path / "checkpoint-8" / MANIFEST).write_text("{oops")  # (written atomically: only damage does this)
    assert [p.name for p in set_aside_damaged(tmp_path)] == ["damaged-checkpoint-8"]
    prune(tmp_path, keep=1)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-10"]
    assert not (tmp_path / "checkpoint-2").exists()


def test_a_prune_cut_short_leaves_an_unpublished_checkpoint_not_a_damaged_one(tmp_path, monkeypatch):
    from sala_train import checkpoints

    for step in (2, 4):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (path / "model.safetensors").write_bytes(b"x")
        checkpoints.publish(path, step)

    def killed_midway(path, ignore_errors=False):
        (Path(path) / "model.safetensors").unlink()  # one file gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.prune(tmp_path, keep=1)
    monkeypatch.undo()
    assert checkpoints.set_aside_damaged(tmp_path) == []
    assert [p.name for p in checkpoints.remove_incomplete(tmp_path)] == ["checkpoint-2"]


def test_mixed_entries_are_checked_and_recorded_with_absolute_paths(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from sala_train.config.resolve import resolve_config

    monkeypatch.chdir(tmp_path)
    assert problems_of("dataset.mix=[identity,no_such]") == [
        f"dataset.mix[1]: no data set entry 'no_such'; choose from {', '.join(group_options('dataset'))}",
        f"dataset.mix.identity.train[0]: file not found: {tmp_path}/data/identity.json",
    ]
    assert problems_of("dataset.mix=[demo_chat]") == ["dataset.mix[0]: demo_chat is already in this run's data"]
    dpo = ("stage=dpo", "dataset=demo_preference", "model.lora_target_modules=[q_proj]")
    assert problems_of(*dpo, "dataset.mix=[demo_alpaca]") == [
        "dataset.mix.demo_alpaca: format alpaca cannot be mixed into stage=dpo (preference only)"
    ]
    check_command_line(
        ["stage=pretrain", "dataset=demo_text", "dataset.mix=[demo_alpaca,demo_sharegpt]"], "train", RunConfig
    )

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "identity.json").write_text("[]")
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        composed = compose(config_name="train", overrides=["dataset=demo_alpaca", "dataset.mix=[identity,demo_chat]"])
    run = resolve_config(OmegaConf.create(OmegaConf.to_container(composed)), RunConfig, tmp_path)
    assert [s.name for s in run.dataset.mixed] == ["identity", "demo_chat"]
    assert run.dataset.mixed[0].train == [str(tmp_path / "data" / "identity.json")]
    assert run.dataset.mixed[0].format == DatasetFormat.ALPACA and run.dataset.mixed[1].validation
    # dataset.max_samples caps each entry of the mix that sets none itself, as LLaMA-Factory's does.
    assert run.dataset.max_samples is None and run.dataset.mixed[0].max_samples is None
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        composed = compose(config_name="train", overrides=["dataset=demo_alpaca", "dataset.mix=[identity,demo_chat]",
                                                           "dataset.max_samples=7"])  # fmt: skip
    run = resolve_config(OmegaConf.create(OmegaConf.to_container(composed)), RunConfig, tmp_path)
    assert [s.max_samples for s in run.dataset.mixed] == [7, 7]


def test_a_directory_of_data_files_is_a_valid_train_entry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "pipe.jsonl")  # (it exists: "file not found" was wrong)
    assert problems_of("dataset.train=[pipe.jsonl]") == [
        f"dataset.train[0]: not a regular file or directory: {tmp_path}/pipe.jsonl"
    ]
    (tmp_path / "folder").mkdir()
    check_command_line(["dataset.train=[folder]"], "train", RunConfig)
    assert problems_of("dataset.train=[nowhere]") == [f"dataset.train[0]: file not found: {tmp_path}/nowhere"]


def test_true_and_false_on_the_command_line_reach_a_true_false_enum(tmp_path):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from sala_train.config.resolve import resolve_config
    from sala_train.config.schema import LigerMode

    check_command_line(["model.liger=true"], "train", RunConfig)  # Hydra hands over the boolean True
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        composed = compose(config_name="train", overrides=["model.liger=false"])
    run = resolve_config(OmegaConf.create(OmegaConf.to_container(composed)), RunConfig, tmp_path)
    assert run.model.liger is LigerMode.FALSE
    assert problems_of("model.liger=maybe") == [
        "model.liger: invalid value 'maybe'; expected one of 'auto', 'true', 'false'"
    ]


@pytest.mark.parametrize("stage", ["stage=dpo dataset=demo_preference", "stage=kto dataset=demo_kto"])
def test_length_grouping_is_refused_where_trl_cannot_take_it(stage):
    (problem,) = problems_of(*stage.split(), "model.lora_target_modules=[q_proj]", "train.group_by_length=true")
    assert problem.startswith(f"train.group_by_length: not available for {stage.split()[0]}")


def test_interleaving_options_are_checked():
    assert problems_of("dataset.mix_strategy=interleave_under") == [
        "dataset.mix_strategy=interleave_under: there is nothing to interleave; list entries in dataset.mix"
    ]
    mixed = ("dataset.mix=[demo_alpaca,demo_sharegpt]",)
    assert problems_of(*mixed, "dataset.interleave_probs=[0.5,0.5,0]") == [
        "dataset.interleave_probs: weights need dataset.mix_strategy=interleave_under or interleave_over"
    ]
    over = (*mixed, "dataset.mix_strategy=interleave_over")
    assert problems_of(*over, "dataset.interleave_probs=[0.5,0.5]") == [
        "dataset.interleave_probs: 2 weight(s) for 3 data sets (this entry first, then dataset.mix)"
    ]
    assert problems_of(*over, "dataset.interleave_probs=[0.5,0.5,0.5]") == [
        "dataset.interleave_probs: weights must be >= 0 and sum to 1, got [0.5, 0.5, 0.5]"
    ]
    check_command_line([*over, "dataset.interleave_probs=[0.6,0.3,0.1]"], "train", RunConfig)
    # interleave_over draws until every data set is used up: a weight of 0 would never finish.
    assert problems_of(*over, "dataset.interleave_probs=[0,0.5,0.5]") == [
        "dataset.interleave_probs: interleave_over samples until every data set is used up, so none may have "
        "weight 0, got [0.0, 0.5, 0.5]; drop that data set from dataset.mix or use interleave_under"
    ]
    under = (*mixed, "dataset.mix_strategy=interleave_under")
    check_command_line([*under, "dataset.interleave_probs=[0,0.5,0.5]"], "train", RunConfig)


def test_a_sweep_problem_names_its_job():
    """Said once for the swept values that make it; it was said once per job (8 lines here, 32 for
    a sweep of 299 seeds)."""
    assert problems_of("-m", "train.learning_rate=1e-3,-1", "method=lora,full", "train.seed=1,2,3,4") == [
        "in the jobs with train.learning_rate=-1: train.learning_rate: must be > 0, got -1.0",
    ]
    assert problems_of("-m", "train.learning_rate=1e-3,-1", "method=lora,full") == [
        "in the jobs with train.learning_rate=-1: train.learning_rate: must be > 0, got -1.0",
    ]
    # Values that make it only together are named together; jobs no shared values single out, each.
    assert problems_of("-m", "stage=sft,dpo", "method=full,lora", "train.seed=1,2")[-1] == (
        "in the jobs with stage=dpo method=lora: stage=dpo / LoRA on lm_head: TRL computes log-probabilities from "
        "lm_head.weight, so an adapter there would never train; set "
        "method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    )
    assert problems_of("-m", "train.learning_rate=-1,1e-3,-2") == [
        "in the job with train.learning_rate=-1: train.learning_rate: must be > 0, got -1.0",
        "in the job with train.learning_rate=-2: train.learning_rate: must be > 0, got -2.0",
    ]
    # A problem every job has is said once, as for a single run.
    assert problems_of("-m", "train.learning_rate=1e-3,2e-3", "train.per_device_train_batch_size=0") == [
        "train.per_device_train_batch_size: must be >= 1, got 0"
    ]


def test_malformed_yaml_in_a_users_config_directory_is_one_problem_with_its_line(tmp_path):
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    broken = tmp_path / "conf" / "dataset" / "mine.yaml"
    broken.write_text("name: mine\nformat: messages\ntrain: [a.jsonl\n")
    expected = (f"{broken}:3: not valid YAML: expected ',' or ']', but got '<stream end>' "
                "(while parsing a flow sequence that starts on line 3)")  # fmt: skip
    assert problems_of("-cd", str(tmp_path / "conf"), "dataset=mine") == [expected]
    assert problems_of("-cd", str(tmp_path / "conf"), "dataset.mix=[mine]") == [f"dataset.mix[0] (mine): {expected}"]


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    """Hydra's message named no file; mixed in, it was a UnicodeDecodeError traceback."""
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    latin = tmp_path / "conf" / "dataset" / "mine.yaml"
    latin.write_bytes("name: caf\u00e9\nformat: messages\n".encode("latin-1"))
    expected = f"{latin}: not UTF-8 text (byte 9); save it as UTF-8"
    assert problems_of("-cd", str(tmp_path / "conf"), "dataset=mine") == [expected]
    assert problems_of("-cd", str(tmp_path / "conf"), "dataset.mix=[mine]") == [f"dataset.mix[0] (mine): {expected}"]


def test_a_config_directory_holding_an_unreadable_file_is_no_traceback(tmp_path):
    """Looking for the file that asks for a missing option read every file of the user's directory:
    one not UTF-8 beside it was a UnicodeDecodeError traceback. A file Hydra cannot open (root reads
    anything, so its PermissionError is raised here) was Hydra's traceback too."""
    from sala_train.config.compose import check_combination
    from sala_train.config.entries import use_user_config_dirs

    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "experiment").mkdir()
    (tmp_path / "conf" / "dataset" / "caf.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    mine = tmp_path / "conf" / "experiment" / "my.yaml"
    mine.write_text("# @package _global_\ndefaults:\n  - override /dataset: mien\n")
    try:
        (found,) = problems_of("-cd", str(tmp_path / "conf"), "experiment=my")
    finally:
        use_user_config_dirs([])
    assert found.startswith(f"{mine}: dataset: mien: no such dataset; choose from ")

    def unreadable(config_name: str, groups: list[str]) -> dict:
        raise PermissionError(13, "Permission denied", "/conf/dataset/mine.yaml")

    assert check_combination("train", RunConfig, [], [], True, unreadable) == [
        "/conf/dataset/mine.yaml: cannot be read (Permission denied)"
    ]


def test_info_checks_its_overrides_as_cfg_does():
    """`--info config train.lerning_rate=1` was Hydra's ConfigCompositionException traceback."""
    assert problems_of("--info", "config", "train.lerning_rate=1")[0].startswith(
        "train.lerning_rate: unknown key (did you mean 'train.learning_rate'?)"
    )
    assert problems_of("--info", "defaults-tree", "dataset=nope")[0].startswith("dataset=nope: no such dataset")
    check_command_line(["--info"], "train", RunConfig)
    check_command_line(["--info", "config", "train.learning_rate=1"], "train", RunConfig)


def test_help_checks_its_overrides_and_hydras_other_flags_their_arguments():
    """`--help method=qlora` was Hydra's MissingConfigException traceback, exit 1; so were
    `--shell-completion` without what to do and `--experimental-rerun` of a missing file."""
    for flag in ("--help", "--hydra-help"):
        assert problems_of(flag, "method=qlora") == ["method=qlora: no such method; choose from full, lora"]
        assert problems_of(flag, "train.lerning_rate=1")[0].startswith("train.lerning_rate: unknown key")
        check_command_line([flag, "method=lora"], "train", RunConfig)
    assert problems_of("--shell-completion")[0].startswith("--shell-completion: say what to do with it: install=SHELL")
    check_command_line(["--shell-completion", "install=bash"], "train", RunConfig)
    assert problems_of("--experimental-rerun", "no/such.pickle") == [
        "--experimental-rerun no/such.pickle: no such file (a run's .hydra/config.pickle)"
    ]


def test_cfg_and_info_with_multirun_are_one_message():
    """Hydra refuses `--cfg job -m ...` with a ValueError traceback."""
    for flag in (["--cfg", "job"], ["--info", "config"], ["--help"]):
        (problem,) = problems_of(*flag, "-m", "train.seed=1,2")
        assert problem.startswith(f"{flag[0]} prints about one job and -m (--multirun) runs a sweep: use one of them")
    check_command_line(["--cfg", "job", "train.seed=1"], "train", RunConfig)
    # A search preset runs without -m: its ranges too were Hydra's error (exit 1), or with --info a traceback.
    for flag in (["--cfg", "job"], ["--info", "config"]):
        (problem,) = problems_of(*flag, "hparams_search=lora_optuna", "method.r=choice(8,16)")
        assert problem == (f"method.r=choice(8,16): a sweep's values, and {flag[0]} prints about one job; "
                           f"give {flag[0]} one value of it to see that job")  # fmt: skip
    check_command_line(["--cfg", "job", "hparams_search=lora_optuna", "method.r=8"], "train", RunConfig)


def test_a_bad_option_in_a_users_experiment_is_one_line_naming_the_file(tmp_path):
    """Hydra names only the primary config ('train') and lists its search path; a hydra.run.dir
    on the same command line was blamed for it too."""
    from sala_train.config.entries import use_user_config_dirs

    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    mine = tmp_path / "conf" / "experiment" / "my_bad.yaml"
    mine.write_text("# @package _global_\ndefaults:\n  - override /method: ful\n")
    try:
        found = problems_of("-cd", str(tmp_path / "conf"), "experiment=my_bad", f"hydra.run.dir={tmp_path / 'run'}")
    finally:
        use_user_config_dirs([])
    assert found == [f"{mine}: method: ful: no such method; choose from full, lora"]
    # A sweep over that group too: Hydra composes the sweep's base config, without it, first.
    try:
        swept = problems_of("-m", "-cd", str(tmp_path / "conf"), "experiment=my_bad", "method=full,lora")
    finally:
        use_user_config_dirs([])
    assert swept == found
    # Said once, though every job of a sweep over another group has it too.
    (tmp_path / "conf" / "experiment" / "x.yaml").write_text("# @package _global_\ndefaults:\n"
                                                             "  - override /dataset: nosuch\n")  # fmt: skip
    try:
        twice = problems_of("-m", "-cd", str(tmp_path / "conf"), "experiment=x", "method=full,lora")
    finally:
        use_user_config_dirs([])
    assert len(twice) == 1 and "dataset: nosuch: no such dataset" in twice[0], twice


def test_an_experiment_file_without_its_package_header_is_named_with_the_fix(tmp_path):
    """Without `# @package _global_`, Hydra said `Could not override 'method@experiment.method'`,
    or the schema `experiment: unknown key`: neither names the file nor the missing line."""
    from sala_train.config.entries import use_user_config_dirs

    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    with_defaults = tmp_path / "conf" / "experiment" / "mine.yaml"
    with_defaults.write_text("defaults:\n  - override /method: lora\ntrain:\n  learning_rate: 1e-4\n")
    keys_only = tmp_path / "conf" / "experiment" / "keys.yaml"
    keys_only.write_text("# my run\ntrain:\n  learning_rate: 1e-4\n")
    fixed = tmp_path / "conf" / "experiment" / "fixed.yaml"
    fixed.write_text("# @package _global_\n" + with_defaults.read_text())
    try:
        for option, path in (("mine", with_defaults), ("keys", keys_only)):
            assert problems_of("-cd", str(tmp_path / "conf"), f"experiment={option}") == [
                f"experiment={option}: {path} does not start with the line '# @package _global_', which an "
                "experiment file needs (it sets keys of the whole config; without it Hydra puts them under "
                "'experiment.')"
            ]
        check_command_line(["-cd", str(tmp_path / "conf"), "experiment=fixed"], "train", RunConfig)
        check_command_line(["experiment=guide_lf_sft", "--cfg", "job"], "train", RunConfig)
        (swept,) = problems_of("-m", "-cd", str(tmp_path / "conf"), "experiment=fixed,mine", "launcher.dry_run=true")
        assert swept.startswith("in the job with experiment=mine: experiment=mine: ")
    finally:
        use_user_config_dirs([])


def test_a_run_directory_at_a_file_is_refused_before_hydra_trips_on_it(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    notes = tmp_path / "notes.txt"
    assert problems_of(f"hydra.run.dir={notes}") == [f"hydra.run.dir={notes}: {notes} is a file; choose a directory"]
    # An empty one trained into the current directory (Hydra reads it as '.').
    assert problems_of("hydra.run.dir=") == ["hydra.run.dir=: empty; give a directory ('.' for the current one)"]
    # Quoted for Hydra, ~ stays: Hydra made ./~/runs (the check looked at $HOME/runs).
    assert problems_of('hydra.run.dir="~/runs"') == [
        "hydra.run.dir=\"~/runs\": Hydra does not expand '~' (it would make a directory named '~' here); give the "
        "whole path, or leave the ~ unquoted for the shell to expand"
    ]
    assert problems_of("-m", f"hydra.sweep.dir={notes}/sweep") == [
        f"hydra.sweep.dir={notes}/sweep: {notes}/sweep is under {notes}, a file; choose a directory"
    ]
    # Where no directory can be made (three chained tracebacks from Hydra, exit 1); access() says
    # yes to root even there, so the check makes one and removes it.
    assert problems_of("hydra.run.dir=/proc/sala/run") == [
        "hydra.run.dir=/proc/sala/run: cannot create /proc/sala/run: making a directory in /proc failed (No such "
        "file or directory)"
    ]
    # An existing directory too (a read-only or immutable one: Hydra's PermissionError making .hydra/).
    assert problems_of("-m", "hydra.sweep.dir=/proc", "method=full,lora") == [
        "hydra.sweep.dir=/proc: cannot write in /proc: making a directory in it failed (No such file or directory)"
    ]
    check_command_line(["hydra.run.dir=${oc.env:HOME}/runs/a"], "train", RunConfig)  # resolved by Hydra later
    check_command_line([f"hydra.run.dir={tmp_path}/new/run"], "train", RunConfig)
    check_command_line([f"hydra.run.dir={tmp_path}"], "train", RunConfig)
    assert sorted(tmp_path.iterdir()) == [notes]  # the probes left nothing


def test_interpolated_run_and_job_directories_are_checked_as_hydra_resolves_them(tmp_path):
    """${...} in hydra.run.dir / sweep.dir / sweep.subdir: a key that does not resolve was Hydra's
    InterpolationKeyError traceback (exit 1, after the sweep directory was made); a resolved path
    where no directory can be made, its PermissionError traceback. A sweep job's directory
    (hydra.sweep.subdir, under the sweep's unless absolute) is checked too."""
    assert problems_of("hydra.run.dir=runs/${oops}") == [
        "hydra.run.dir=runs/${oops}: cannot be resolved (InterpolationKeyError: Interpolation key 'oops' not found)"
    ]
    (refused,) = problems_of("hydra.run.dir=/proc/run_${now:%Y}")
    assert refused.startswith("hydra.run.dir=/proc/run_${now:%Y}: cannot create /proc/run_2") and "in /proc" in refused
    sweep = ("-m", "method=full,lora", f"hydra.sweep.dir={tmp_path}/sweep")
    assert problems_of(*sweep, "hydra.sweep.subdir=${oops}") == [
        "hydra.sweep.subdir=${oops}: cannot be resolved (InterpolationKeyError: Interpolation key 'oops' not found)"
    ]
    assert problems_of(*sweep, "hydra.sweep.subdir=/proc/job") == [
        "hydra.sweep.subdir=/proc/job: cannot create /proc/job: making a directory in /proc failed (No such file or "
        "directory)",
        "hydra.sweep.subdir=/proc/job: every job of the sweep would share this one directory; name each job's, as "
        "the default ${hydra.job.num} does",
    ]
    for fine in ("hydra.sweep.subdir=${hydra.job.num}_x", "hydra.sweep.subdir=${hydra.job.override_dirname}"):
        check_command_line([*sweep, fine], "train", RunConfig)  # (set per job: resolved for the first)
    check_command_line([*sweep, "hydra.sweep.subdir=${hydra.job.id}"], "train", RunConfig)
    check_command_line([f"hydra.run.dir={tmp_path}/${{now:%H}}_${{hydra:job.name}}"], "train", RunConfig)
    # The job's own values resolve too; keys Hydra fills as the job starts, or does not use, are not refused.
    check_command_line(["train.seed=7", f"hydra.run.dir={tmp_path}/seed${{train.seed}}"], "train", RunConfig)
    check_command_line([f"hydra.run.dir={tmp_path}/${{hydra:runtime.cwd}}"], "train", RunConfig)
    check_command_line(["hydra.run.dir=/tmp", "hydra.sweep.subdir=/proc/job"], "train", RunConfig)  # (no sweep)
    check_command_line(["hydra.run.dir=/tmp", "hydra.sweep.subdir=${oops}"], "train", RunConfig)
    check_command_line(["--cfg", "job", "hydra.run.dir=${oops}"], "train", RunConfig)  # (--cfg makes no directory)
    # Directories Hydra does not make in this mode are not checked at all (nor plain ones).
    (tmp_path / "afile").write_text("")
    check_command_line(["--cfg", "job", f"hydra.run.dir={tmp_path}/afile/x"], "train", RunConfig)
    check_command_line([*sweep, f"hydra.run.dir={tmp_path}/afile/x"], "train", RunConfig)
    # ${hydra:job.name} is the commands' own (cli), not the compose API's (app); Hydra's state is left as found.
    from hydra.core.hydra_config import HydraConfig

    held = HydraConfig.instance().cfg
    (tmp_path / "app").write_text("")
    check_command_line([f"hydra.run.dir={tmp_path}/${{hydra:job.name}}/r"], "train", RunConfig)
    assert HydraConfig.instance().cfg is held
    (tmp_path / "cli").write_text("")
    (refused,) = problems_of(f"hydra.run.dir={tmp_path}/${{hydra:job.name}}/r")
    assert refused.endswith(f"{tmp_path}/cli/r is under {tmp_path}/cli, a file; choose a directory")
    for name in ("cli", "app", "afile"):
        (tmp_path / name).unlink()
    assert sorted(tmp_path.iterdir()) == []  # the checks made nothing


def test_a_run_directory_through_a_broken_link_is_refused_before_hydra_trips_on_it(tmp_path, monkeypatch):
    """`outputs` a link into scratch space since purged (or a loop): Hydra's mkdir failed with a
    FileExistsError traceback, exit 1 (exists() is False for such a link, so the check passed)."""
    (tmp_path / "outputs").symlink_to(tmp_path / "purged")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    monkeypatch.chdir(tmp_path)
    gone = f"{tmp_path}/outputs is a symbolic link to {tmp_path}/purged, which does not exist (or loops back)"
    assert problems_of() == [f"hydra.run.dir=outputs/${{now:%Y-%m-%d}}/${{now:%H-%M-%S}}: {gone}; make its target, "
                             "or set hydra.run.dir"]  # fmt: skip
    assert problems_of("-m", "hydra.sweep.dir=outputs/sweep") == [
        f"hydra.sweep.dir=outputs/sweep: {gone.replace(str(tmp_path) + '/', '', 1)}; make its target, or choose "
        "another directory"
    ]
    (problem,) = problems_of("hydra.run.dir=loop/run")
    assert problem.startswith("hydra.run.dir=loop/run: loop is a symbolic link to")


def test_the_default_run_directory_where_nothing_can_be_made_is_refused(monkeypatch):
    """Run from a read-only directory, the default outputs/DATE/TIME (and a sweep's multirun/...)
    could not be made: Hydra's PermissionError traceback. sala-data's '.' exists: nothing to make."""
    from sala_train.config.schema import DataToolConfig

    monkeypatch.chdir("/proc")  # (no directory can be made there, by root either)
    assert problems_of() == [
        "hydra.run.dir=outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}: cannot make it in /proc (No such file or "
        "directory); run from a directory you can write in, or set hydra.run.dir"
    ]
    assert problems_of("-m", "method=full,lora")[0].startswith("hydra.sweep.dir=multirun/${now:%Y-%m-%d}/")
    check_command_line(["preview=1"], "data", DataToolConfig)
    # A config Hydra cannot compose is named as in any other directory (no traceback).
    assert problems_of("hydra.job.chdirr=true") == ["hydra.job.chdirr=true: Key 'chdirr' not in 'JobConf'"]
    # Given directories that exist get nothing from these commands: not refused.
    check_command_line(["preview=1", "hydra.run.dir=/proc"], "data", DataToolConfig)  # (sala-data writes nothing)
    check_command_line(["--cfg", "job", "hydra.run.dir=/proc"], "train", RunConfig)
    check_command_line(["-m", "method=full,lora", "hydra.run.dir=/proc", "hydra.sweep.dir=/tmp"], "train", RunConfig)


def test_a_run_directory_from_the_config_is_checked_where_it_is_made(tmp_path, monkeypatch):
    """An experiment's run directory (a sweep's, when the experiment sets hydra.mode MULTIRUN),
    with an interpolation inside a name: what exists before it is checked, nothing after."""
    from sala_train.config.entries import use_user_config_dirs

    locked, runs = tmp_path / "locked", tmp_path / "locked" / "runs-x"
    runs.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here (it needs root and a file system that has it)")
    try:
        assert cannot_make_directory_in(locked) and cannot_make_directory_in(runs) is None
        (tmp_path / "conf" / "experiment").mkdir(parents=True)
        (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(
            "# @package _global_\nhydra:\n  run:\n    dir: " + str(locked) + "/runs-${oc.env:SALA_RUNS}/${now:%H}\n"
            "  sweep:\n    dir: " + str(locked) + "/sweeps\n"
        )
        (tmp_path / "conf" / "experiment" / "search.yaml").write_text(
            "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweep:\n    dir: " + str(runs) + "/${now:%H}\n"
        )
        monkeypatch.chdir(locked)
        monkeypatch.setenv("SALA_RUNS", "x")
        try:
            check_command_line(["-cd", str(tmp_path / "conf"), "experiment=mine"], "train", RunConfig)
            check_command_line(["-cd", str(tmp_path / "conf"), "experiment=search"], "train", RunConfig)
            swept = problems_of("-m", "-cd", str(tmp_path / "conf"), "experiment=mine", "method=full,lora")
        finally:
            use_user_config_dirs([])
        assert swept == [f"hydra.sweep.dir={locked}/sweeps: cannot make it in {locked} (Operation not permitted); "
                         "run from a directory you can write in, or set hydra.sweep.dir"]  # fmt: skip
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_warmup_ratio_is_a_share_of_the_steps_and_excludes_warmup_steps(tmp_path):
    """LLaMA-Factory's warmup_ratio: transformers 5 dropped the argument, so the ratio must reach it as
    a float warmup_steps; the Trainer then warms up for that share of max_steps."""
    from sala_train.arguments import training_arguments

    assert problems_of("train.warmup_ratio=0.1") == [
        "train.warmup_ratio=0.1 / train.warmup_steps=10: both set the warm-up; give one "
        "(train.warmup_steps=0 to use the ratio)"
    ]
    assert problems_of("train.warmup_ratio=1.5", "train.warmup_steps=0") == [
        "train.warmup_ratio: must be in [0, 1), got 1.5"
    ]
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from sala_train.config.resolve import resolve_config

    def warmup_steps(*overrides: str) -> float:
        check_command_line(list(overrides), "train", RunConfig)
        with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
            composed = compose(config_name="train", overrides=["train.max_steps=50", *overrides])
        run = resolve_config(OmegaConf.create(OmegaConf.to_container(composed)), RunConfig, tmp_path)
        return training_arguments(run, tmp_path).get_warmup_steps(50)

    assert warmup_steps("train.warmup_ratio=0.1", "train.warmup_steps=0") == 5
    assert warmup_steps("train.warmup_steps=7") == 7


@pytest.fixture
def user_conf(tmp_path, monkeypatch):
    """A project directory with its own config directory holding a data set entry ``mine``."""
    from sala_train.config.entries import use_user_config_dirs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "chats.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]}) + "\n"
    )
    entry = yaml.safe_load((conf_dir() / "dataset" / "messages.yaml").read_text())
    entry.update(name="mine", train=["chats.jsonl"], validation=["chats.jsonl"])
    (tmp_path / "myconf" / "dataset").mkdir(parents=True)
    (tmp_path / "myconf" / "dataset" / "mine.yaml").write_text(yaml.safe_dump(entry))
    yield tmp_path
    use_user_config_dirs([])  # the next command line sets its own; leave no state behind


def test_user_config_directories_add_their_own_entries(user_conf):
    """--config-dir and hydra.searchpath (Hydra's two ways) make a user's own data set entry
    selectable and mixable, checked before anything runs; the package's entries stay available."""
    assert problems_of("dataset=mine")[0].startswith("dataset=mine: no such dataset; choose from ")
    assert problems_of("dataset=demo_chat", "dataset.mix=[mine]")[0].startswith("dataset.mix[0]: no data set entry")
    check_command_line(["--config-dir", "myconf", "dataset=mine", "dataset.mix=[demo_sharegpt]"], "train", RunConfig)
    check_command_line(
        ["hydra.searchpath=[file://myconf]", "dataset=demo_chat", "dataset.mix=[mine]"], "train", RunConfig
    )
    assert problems_of("-cd", "myconf", "dataset=mine", "dataset.cutoff_len=0")  # its keys are checked too
    assert problems_of("-cd", "elsewhere", "dataset=mine") == [
        f"config directory {user_conf}/elsewhere: no such directory"
    ]
    shadow = user_conf / "myconf" / "dataset" / "demo_chat.yaml"
    shadow.write_text("name: demo_chat\n")
    assert problems_of("-cd", "myconf", "dataset=mine") == [
        f"{shadow}: hidden by sala-train's own dataset=demo_chat; rename it"
    ]


GUIDE_PRESETS = [  # preset, the guide's LLaMA-Factory YAML it reproduces, that YAML's dataset names
    ("guide_lf_toolcall", "llamafactory_minicpm_sft.yaml", None),
    ("guide_lf_sft", "llamafactory_minicpm_sft.yaml", "sft_zh_demo"),  # the guide's text: the same, on sft_zh_demo
    ("guide_lf_dpo", "llamafactory_minicpm_dpo.yaml", None),
    ("guide_lf_kto", "llamafactory_minicpm_kto.yaml", None),
]


@pytest.mark.parametrize(("preset", "seed", "dataset"), GUIDE_PRESETS, ids=[p[0] for p in GUIDE_PRESETS])
def test_guide_presets_reproduce_the_guides_llamafactory_configs(preset, seed, dataset):
    """Each experiment=guide_lf_* composes to exactly the settings of the guide's LLaMA-Factory YAML,
    read from the guide's own file; only its model path (a local MiniCPM 4 copy) differs."""
    from hydra import compose, initialize_config_module

    from tests.conftest import SHARED

    path = SHARED / "reference" / "seed-configs" / seed
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    lf = yaml.safe_load(path.read_text())
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        c = compose(config_name="train", overrides=[f"experiment={preset}"])
    names = [c.dataset.name, *c.dataset.mix]
    lf_names = (dataset or lf["dataset"]).split(",")
    assert names == lf_names
    assert (c.stage.name, c.method.name, c.backend.name) == (lf["stage"], lf["finetuning_type"], "zero3")
    assert lf["deepspeed"].endswith("ds_z3_config.json") and c.model.name_or_path == "openbmb/MiniCPM-SALA"
    d, t = c.dataset, c.train
    assert (d.template, d.cutoff_len, d.max_samples, d.val_size) == (lf["template"], lf["cutoff_len"],
                                                                     lf["max_samples"], lf["val_size"])  # fmt: skip
    for key in ("learning_rate", "num_train_epochs", "lr_scheduler_type", "warmup_ratio", "bf16",
                "per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                "eval_steps", "logging_steps"):  # fmt: skip
        assert t[key] == lf[key], key
    assert t.save_strategy == lf.get("save_strategy", "steps") and t.max_steps == -1 and t.warmup_steps == 0
    # Keys the YAML leaves out take LLaMA-Factory's defaults, not finetune.py's (train.yaml's).
    assert t.weight_decay == lf.get("weight_decay", 0.0)
    assert t.gradient_checkpointing is not lf.get("disable_gradient_checkpointing", False)
    if t.save_strategy == "steps":
        assert t.save_steps == lf["save_steps"]


def test_the_full_search_composes_with_the_guide_presets(tmp_path, monkeypatch):
    """full_optuna searches the warm-up as a ratio (with warmup_steps 0), so every value it can
    pick is valid on top of a guide_lf_* preset, which sets a ratio too. (The sweeper picks values
    per trial, after the command-line check: each choice is checked here as a trial would get it.)"""
    from hydra import compose, initialize_config_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft_zh_demo.json").write_text("[]")
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=full_optuna"], return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.sweeper.params.items() if v.startswith("choice(")}
    assert "train.warmup_ratio" in choices
    for key, spec in choices.items():
        for value in spec.removeprefix("choice(").removesuffix(")").split(","):
            for preset in (["experiment=guide_lf_sft"], []):
                check_command_line(
                    [*preset, "hparams_search=full_optuna", f"{key}={value.strip()}"], "train", RunConfig
                )


def test_worker_exit_codes_become_the_runs(tmp_path):
    """torchrun says 1 for any failed worker: the ranks' markers say which failure it was."""
    from sala_train.cli import _workers_outcome

    assert _workers_outcome(tmp_path, 0) == 0 and _workers_outcome(tmp_path, 1) == 1
    assert _workers_outcome(tmp_path, -15) == 143  # killed by SIGTERM, as a shell writes it
    for marker, code in ((".user-error", 2), (".preempted", 75)):
        (tmp_path / marker).touch()
        assert _workers_outcome(tmp_path, 1) == code
        # Kept: on a shared run directory the other nodes' launchers read it too.
        assert _workers_outcome(tmp_path, 1) == code
        (tmp_path / marker).unlink()
    (tmp_path / ".preempted").touch()
    assert _workers_outcome(tmp_path, 0) == 0  # a marker never turns a success into a failure


def test_samples_longer_than_the_models_positions_are_refused():
    from sala_train.data.build import SplitStats, TokenizedData
    from sala_train.errors import DataError
    from sala_train.preflight import check_samples_fit_positions
    from tests.conftest import TINY_CHAT

    limit = json.loads((TINY_CHAT / "config.json").read_text())["max_position_embeddings"]
    cfg = dataclasses.replace(sample_config(FullMethod()), model=ModelConfig(name_or_path=str(TINY_CHAT)))
    cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, cutoff_len=2048))
    fits = TokenizedData({}, {"train": SplitStats(lengths=[limit, 3]), "validation": SplitStats(lengths=[7])})
    check_samples_fit_positions(cfg.model, cfg.dataset.cutoff_len, fits)
    longer = TokenizedData({}, {"train": SplitStats(lengths=[5]), "validation": SplitStats(lengths=[limit + 1])})
    with pytest.raises(DataError) as err:
        check_samples_fit_positions(cfg.model, cfg.dataset.cutoff_len, longer)
    assert str(err.value) == (
        f"dataset.cutoff_len=2048: the longest sequences (tokens: validation {limit + 1}) exceed the {limit} "
        f"positions of {TINY_CHAT} (max_position_embeddings); set dataset.cutoff_len={limit}"
    )


def test_bad_input_in_an_existing_directory_removes_only_sala_trains_new_entries(tmp_path):
    from sala_train import run_dir

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.yaml").write_text("an older file of the same name, there before")
    run_dir._snapshots[tmp_path] = run_dir._Snapshot(
        frozenset({"notes.txt", "config.yaml"}), frozenset(), "cli.log", None, None
    )
    for name in (".hydra", "checkpoint-2", "tensorboard"):
        (tmp_path / name).mkdir()
    for name in ("cli.log", "provenance.json", "status.json", "data.jsonl"):  # data.jsonl: written meanwhile
        (tmp_path / name).write_text("")
    run_dir.remove_what_this_command_wrote(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "data.jsonl", "notes.txt"]
    del run_dir._snapshots[tmp_path]
    run_dir.remove_what_this_command_wrote(tmp_path)  # no snapshot (a sweep job): nothing is removed
    assert (tmp_path / "notes.txt").exists()


def test_hydra_settings_are_checked_with_the_rest_in_one_line_each():
    """Hydra's own keys and groups: a typo is one line naming the override (exit 2 before
    anything runs), not Hydra's multi-line error with exit 1; valid ones, in any order, pass."""
    assert problems_of("hydra.rn.dir=x") == ["hydra.rn.dir=x: Key 'rn' not in 'HydraConf'"]
    assert problems_of("hydra.job.chdir=maybe") == [
        "hydra.job.chdir=maybe: Value 'maybe' is not a valid bool (type str)"
    ]
    assert problems_of("hydra/launcher=submitit_slurmm") == [
        "hydra/launcher=submitit_slurmm: no such hydra/launcher; choose from basic, submitit_local, submitit_slurm"
    ]
    # The culprit is named among valid ones; a launcher's key needs that launcher chosen.
    assert problems_of("hydra.run.dir=ok", "hydra.launcher.timeout_min=5", "method=full") == [
        "hydra.launcher.timeout_min=5: Key 'timeout_min' not in 'BasicLauncherConf'"
    ]
    check_command_line(["hydra.launcher.timeout_min=5", "hydra/launcher=submitit_slurm", "hydra.run.dir=x",
                        "hydra.job.chdir=false"], "train", RunConfig)  # fmt: skip
    # The dotted Optuna range that Hydra cannot apply, with the form that works.
    search = problems_of("hparams_search=lora_optuna", "hydra.sweeper.params.train.learning_rate=x")
    assert search[0].startswith("hydra.sweeper.params.train.learning_rate=x: ")
    assert "'train.learning_rate=tag(log,interval(1e-5,1e-3))'" in search[1] and len(search) == 2
    check_command_line(["hparams_search=lora_optuna", "hydra.sweeper.n_trials=2"], "train", RunConfig)
    # A search range on the command line: its key and both its ends are checked before any trial
    # (a misspelt key was Hydra's error with exit 1; a range of invalid values refused every trial).
    optuna = ("hparams_search=lora_optuna", "hydra.sweeper.n_trials=2")
    assert problems_of(*optuna, "train.lerning_rate=interval(1e-4,1e-2)")[0].startswith(
        "train.lerning_rate: unknown key (did you mean 'train.learning_rate'?)"
    )
    assert problems_of(*optuna, "train.learning_rate=tag(log,interval(-1,1e-3))") == [
        "in the job with train.learning_rate=tag(log,interval(-1,1e-3)) at -1.0: train.learning_rate: must be > 0, "
        "got -1.0"
    ]
    check_command_line([*optuna, "train.learning_rate=tag(log,interval(1e-5,1e-3))"], "train", RunConfig)
    # Hydra reads an interval's ends as floats: an integer key is told the form that draws integers.
    # (alone: each end's "expected int, got 4.0" came first, noise before it)
    assert problems_of(*optuna, "method.r=interval(4,32)") == [
        "method.r=interval(4,32): method.r takes whole numbers; an integer range is written "
        "'method.r=int(interval(4,32))'"
    ]
    check_command_line([*optuna, "method.r=int(interval(4,32))"], "train", RunConfig)
    assert problems_of("-m", "train.learning_rate=interval(1e-4,1e-3)") == [  # no Optuna: Hydra's traceback
        "train.learning_rate=interval(1e-4,1e-3): an interval is a search range, for an Optuna search "
        "(hparams_search=lora_optuna or full_optuna); a plain -m sweep takes values: 1e-4,3e-4"
    ]
    check_command_line(["hydra.mode=MULTIRUN", "train.seed=1,2"], "train", RunConfig)  # multirun without -m
    # Hydra failing on values it did not expect: still one line, and the line that says why.
    assert problems_of("hydra=null") == [
        "hydra=null: Hydra cannot apply this override (ValueError: Config group override must be a string or a "
        "list. Got NoneType)"
    ]
    (sampler,) = problems_of("hparams_search=lora_optuna", "hydra/sweeper/sampler=grid")
    assert sampler.startswith("hydra/sweeper/sampler=grid: ") and "Key 'seed' not in 'SamplerConfig'" in sampler
    # (hydra/sweeper=optuna alone ran its 20 trials as dry runs, each failing for want of a result)
    for search in (["hparams_search=lora_optuna"], ["-m", "train.seed=1,2", "hydra/sweeper=optuna"]):
        assert problems_of(*search, "launcher.dry_run=true") == [
            "launcher.dry_run=true: an Optuna search (hparams_search, or hydra/sweeper=optuna) picks each trial from "
            "the results of the ones before, so it has no commands to print in advance; dry-run one trial instead, "
            "with the values on the command line and without the search"
        ]


def test_values_the_trainer_or_trl_would_misuse_silently_are_refused():
    """Each was accepted and then ignored, inverted or failed only after the model loaded."""
    assert problems_of("train.weight_decay=-0.1", "train.max_grad_norm=-1", "train.dataloader_num_workers=-1") == [
        "train.weight_decay: must be >= 0, got -0.1",
        "train.max_grad_norm: must be >= 0 (0: no clipping), got -1.0",
        "train.dataloader_num_workers: must be >= 0 (0: load in the training process), got -1",
    ]
    kto = ("stage=kto", "dataset=demo_kto", "method=full")
    assert problems_of(*kto, "stage.desirable_weight=-1", "train.per_device_train_batch_size=1") == [
        "stage.desirable_weight: must be >= 0, got -1.0",
        "train.per_device_train_batch_size=1: stage=kto needs at least 2 samples per device batch (its KL term "
        "compares each sample with another in the batch)",
    ]
    assert problems_of(*kto, "stage.desirable_weight=0", "stage.undesirable_weight=0") == [
        "stage.desirable_weight / stage.undesirable_weight: both 0 leave nothing to train"
    ]
    check_command_line([*kto, "stage.undesirable_weight=0"], "train", RunConfig)  # desirable samples only: fine
    dpo = ("stage=dpo", "dataset=demo_preference", "method=full")
    assert problems_of(*dpo, "stage.loss_type=ipo", "stage.label_smoothing=0.3") == [
        "stage.label_smoothing=0.3 / stage.loss_type=ipo: label smoothing is for the sigmoid loss (conservative "
        "DPO); the IPO loss does not use it"
    ]
    assert problems_of(*dpo, "stage.loss_type=hinge", "stage.label_smoothing=0.3") == [
        "stage.label_smoothing=0.3 / stage.loss_type=hinge: label smoothing is for the sigmoid loss (conservative "
        "DPO); the hinge loss does not use it"
    ]
    check_command_line([*dpo, "stage.label_smoothing=0.3"], "train", RunConfig)
    check_command_line([*dpo, "stage.loss_type=hinge"], "train", RunConfig)
    check_command_line(["train.max_grad_norm=0", "train.weight_decay=0"], "train", RunConfig)


def test_adam_and_a_schedule_to_a_floor_reach_the_trainer_or_are_refused():
    """Betas of 1 or more never forget (or diverge), an epsilon of 0 divides by zero where a moment is
    0; cosine_with_min_lr without its floor failed at the first step, a floor on another schedule
    was ignored."""
    from sala_train.arguments import training_kwargs

    assert problems_of("train.adam_beta1=-0.1", "train.adam_beta2=1", "train.adam_epsilon=0") == [
        "train.adam_beta1: must be in [0, 1), got -0.1",
        "train.adam_beta2: must be in [0, 1), got 1.0",
        "train.adam_epsilon: must be > 0, got 0.0",
    ]
    assert problems_of("train.lr_scheduler_type=cosine_with_min_lr") == [
        "train.lr_scheduler_type=cosine_with_min_lr: set train.min_lr_rate, the share of train.learning_rate it "
        "ends at (e.g. 0.1)"
    ]
    assert problems_of("train.lr_scheduler_type=cosine", "train.min_lr_rate=0.1") == [
        "train.min_lr_rate=0.1: only train.lr_scheduler_type=cosine_with_min_lr ends at a floor (this run's is "
        "cosine); set that schedule, or train.min_lr_rate=null"
    ]
    floor = ("train.lr_scheduler_type=cosine_with_min_lr", "train.min_lr_rate={}")
    assert problems_of(floor[0], floor[1].format(1)) == ["train.min_lr_rate: must be in [0, 1), got 1.0"]
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    def typed(*overrides: str) -> RunConfig:
        with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
            return build(RunConfig, OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True))

    kwargs = training_kwargs(typed(floor[0], floor[1].format(0.1), "train.adam_beta2=0.95"), Path("run"))
    assert kwargs["lr_scheduler_type"] == "cosine_with_min_lr" and kwargs["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    assert (kwargs["adam_beta1"], kwargs["adam_beta2"], kwargs["adam_epsilon"]) == (0.9, 0.95, 1e-8)
    assert "lr_scheduler_kwargs" not in training_kwargs(typed(), Path("run"))


def test_neftune_is_refused_where_its_noise_would_reach_the_reference_model():
    assert problems_of("train.neftune_noise_alpha=0") == [
        "train.neftune_noise_alpha: must be > 0 (null: no noise), got 0.0"
    ]
    assert problems_of("stage=dpo", "dataset=demo_preference", "method=full", "train.neftune_noise_alpha=5") == [
        "train.neftune_noise_alpha: not available for stage=dpo (sala-train adds the noise to supervised and "
        "pre-training steps: TRL's preference trainers lay the batch out again inside their loss, and with LoRA "
        "their reference model is a frozen adapter on the same embeddings)"
    ]
    check_command_line(["stage=pretrain", "dataset=demo_text", "train.neftune_noise_alpha=5"], "train", RunConfig)


def test_the_best_checkpoint_is_chosen_by_a_figure_the_stage_reports_at_every_checkpoint():
    """``train.load_best_model_at_end`` compares checkpoints by the eval at their step: saving at
    epoch ends, or off the eval grid, would leave checkpoints with nothing to compare; a figure
    the stage's evaluation does not report failed only at the first evaluation."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from sala_train.arguments import training_kwargs

    best = "train.load_best_model_at_end=true"
    assert problems_of(best, "train.save_steps=150", "train.eval_steps=100") == [
        "train.load_best_model_at_end / train.save_steps=150 / train.eval_steps=100: checkpoints are compared by "
        "the evaluation at their step, so train.save_steps must be a multiple of train.eval_steps (e.g. "
        "train.save_steps=100)"
    ]
    assert problems_of(best, "train.save_strategy=epoch", "train.max_steps=-1") == [
        "train.load_best_model_at_end / train.save_strategy=epoch / train.eval_strategy=steps: checkpoints are "
        "compared by the evaluation at their step, so both must be steps or both epoch (e.g. "
        "train.eval_strategy=epoch)"
    ]
    by_epoch = (best, "train.save_strategy=epoch", "train.eval_strategy=epoch")
    assert problems_of(*by_epoch, "train.max_steps=100") == [
        "train.load_best_model_at_end / train.eval_strategy=epoch / train.max_steps=100: a run that stops part-way "
        "through an epoch has no checkpoint of its last weights to compare; train whole epochs with "
        "train.max_steps=-1"
    ]
    check_command_line([*by_epoch, "train.max_steps=-1", "train.num_train_epochs=2"], "train", RunConfig)
    assert problems_of("train.metric_for_best_model=rewards/margins") == [
        "train.metric_for_best_model=rewards/margins: stage=sft's evaluation reports loss only"
    ]
    assert problems_of(best, "train.eval_steps=0") == [
        "train.eval_steps: must be >= 1, got 0"
    ]  # (not a ZeroDivisionError)
    assert problems_of("train.early_stopping_patience=2") == [
        "train.early_stopping_patience: needs train.load_best_model_at_end=true (stopped early, the last step's "
        "weights are those that stopped bettering; final/ should be the best checkpoint's)"
    ]
    assert problems_of(best, "train.save_steps=100", "train.early_stopping_patience=0") == [
        "train.early_stopping_patience: must be >= 1 or null, got 0"
    ]
    dpo = ("stage=dpo", "dataset=demo_preference", "method=full")
    assert problems_of(*dpo, "train.metric_for_best_model=rewards/chosen") == [
        "train.metric_for_best_model=rewards/chosen: stage=dpo's evaluation reports loss, rewards/accuracies, "
        "rewards/margins; choose one"
    ]
    assert problems_of(
        "stage=kto", "dataset=demo_kto", "method=full", "train.metric_for_best_model=rewards/accuracies"
    ) == [
        "train.metric_for_best_model=rewards/accuracies: stage=kto's evaluation reports loss, rewards/margins; "
        "choose one"
    ]

    def kwargs(*overrides: str) -> dict:
        with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
            composed = compose("train", overrides=list(overrides))
        return training_kwargs(build(RunConfig, OmegaConf.to_container(composed, resolve=True)), Path("run"))

    # The Trainer tracks the best (a margin higher, a loss lower: LLaMA-Factory's eval_ prefix read
    # as the figure's name), but sala-train loads it: the Trainer's own load runs only inside train().
    chosen = kwargs(*dpo, best, "train.metric_for_best_model=eval_rewards/margins", "train.save_steps=100")
    assert (chosen["metric_for_best_model"], chosen["greater_is_better"]) == ("rewards/margins", True)
    assert not chosen.get("load_best_model_at_end")
    by_loss = kwargs(best, "train.save_steps=100")
    assert (by_loss["metric_for_best_model"], by_loss["greater_is_better"]) == ("loss", False)
    assert "metric_for_best_model" not in kwargs()
    assert kwargs("train.eval_strategy=epoch")["eval_strategy"] == "epoch"


def test_a_slurm_time_limit_sbatch_would_reject_is_refused_before_submitting():
    """A dry run wrote the batch script with --time=48h; sbatch refuses it only at submission."""
    assert problems_of("launcher=slurm", "launcher.time=48h", "launcher.dry_run=true") == [
        "launcher.time: '48h' is not a SLURM time limit; use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
        "D-HH:MM:SS (48 hours: 2-00:00:00), or UNLIMITED"
    ]
    for limit in ("90", "30:00", "24:00:00", "2-00", "2-12:30", "2-00:00:00", "UNLIMITED"):
        check_command_line(["launcher=slurm", f"launcher.time={limit}"], "train", RunConfig)


def test_a_slurm_time_limit_within_the_preemption_warning_is_refused():
    """--time=1 with --signal=B:USR1@120: the warning came as the job started, and each run of it
    checkpointed before its first step and requeued itself."""
    from sala_train.config.validate import slurm_seconds

    assert [slurm_seconds(t) for t in ("1", "1:30", "01:00:00", "2-00", "2-01:30", "1-00:00:05", "0", "INFINITE")] == [
        60, 90, 3600, 172800, 178200, 86405, None, None]  # fmt: skip
    assert problems_of("launcher=slurm", "launcher.time=2:00") == [
        "launcher.time=2:00 / launcher.signal_seconds=120: the time limit is 120 s, so SLURM's warning would come as "
        "the job starts, and each run of it would checkpoint and requeue before a step; give a longer launcher.time, "
        "or a smaller launcher.signal_seconds"
    ]
    for ok in (["launcher.time=2:01"], ["launcher.time=1", "launcher.signal_seconds=30"],
               ["launcher.time=1", "launcher.signal_seconds=0"], ["launcher.time=0"]):  # fmt: skip
        check_command_line(["launcher=slurm", *ok], "train", RunConfig)


def test_a_slurm_memory_size_sbatch_would_reject_is_refused_before_submitting():
    # Real sbatch (22.05) takes 64G, 64gb and 100 (megabytes), and rejects 64Gi, 1.5G and 100B.
    for mem in ("64Gi", "1.5G", "100B"):
        assert problems_of("launcher=slurm", f"launcher.mem={mem}") == [
            f"launcher.mem: '{mem}' is not a SLURM memory size; use a number with an optional unit K, M (the "
            "default), G or T (64 GiB: 64G), or 0 for all of a node's memory"
        ]
    for mem in ("64G", "64gb", "100", "0", "1T"):
        check_command_line(["launcher=slurm", f"launcher.mem={mem}"], "train", RunConfig)
    assert problems_of("launcher.cpu_memory_gib=0") == ["launcher.cpu_memory_gib: must be > 0 or null, got 0.0"]


def test_fsdp_lora_on_a_tied_head_is_refused_before_loading(tmp_path):
    from tests.conftest import TINY_CHAT

    # accelerate's FSDP loading re-ties lm_head after peft wrapped it: a KeyError deep in prepare().
    assert problems_of("backend=fsdp", "method=lora") == [
        "backend=fsdp / LoRA on lm_head: this model ties lm_head to its input embeddings, and FSDP's loading "
        "cannot re-tie a head LoRA has wrapped; set method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,"
        "up_proj,down_proj]"
    ]
    check_command_line(["backend=fsdp", "method=lora", "method.target_modules=[q_proj,v_proj]"], "train", RunConfig)
    untied = tmp_path / "untied"
    untied.mkdir()
    config = json.loads((TINY_CHAT / "config.json").read_text())
    for tie in ({"tie_word_embeddings": False}, {}):  # (no key: Llama's own default, untied)
        (untied / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "tie_word_embeddings"}
                                                       | tie))  # fmt: skip
        check_command_line(["backend=fsdp", "method=lora", f"model.name_or_path={untied}"], "train", RunConfig)


def test_seeds_out_of_numpys_range_and_numbers_that_are_not_finite_are_refused():
    """They passed every range check (nan < 0 is False) and failed in the runner, after the model
    loaded, with a traceback; some trained to NaN, or were used as they were."""
    assert problems_of("train.seed=-1", "dataset.split_seed=4294967296") == [
        "train.seed: must be in [0, 2**32), got -1",
        "dataset.split_seed: must be in [0, 2**32), got 4294967296",
    ]
    assert sorted(
        problems_of(
            "train.learning_rate=nan",
            "train.num_train_epochs=inf",
            "stage=dpo",
            "dataset=demo_preference",
            "stage.beta=-inf",
            "method=full",
        )
    ) == [
        "stage.beta: must be a finite number, got -inf",
        "train.learning_rate: must be a finite number, got nan",
        "train.num_train_epochs: must be a finite number, got inf",
    ]
    check_command_line(["train.seed=4294967295", "dataset.split_seed=0"], "train", RunConfig)
    # A whole number past int64 passed the range checks and was the dataloader's traceback.
    assert problems_of("train.per_device_train_batch_size=99999999999999999999") == [
        "train.per_device_train_batch_size: 99999999999999999999 is outside a 64-bit integer's range, beyond any "
        "count or size the run can use (at most 9223372036854775807)"
    ]
    check_command_line(["train.per_device_train_batch_size=9223372036854775807"], "train", RunConfig)


def test_a_full_checkpoint_of_another_model_shape_is_refused_before_loading(tmp_path):
    """It was a size-mismatch traceback once the model had loaded (LoRA runs compare the base's
    name; a full checkpoint may move to another copy of its model, but not to another shape)."""
    from sala_train.checkpoints import publish
    from tests.conftest import TINY_CHAT

    tiny = json.loads((TINY_CHAT / "config.json").read_text())
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps(tiny))
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    publish(checkpoint, 2)
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    (bigger / "config.json").write_text(json.dumps({**tiny, "hidden_size": 256}))
    assert problems_of("method=full", f"train.resume={checkpoint}", f"model.name_or_path={bigger}") == [
        f"train.resume={checkpoint} / model.name_or_path={bigger}: that checkpoint holds a model of another shape "
        f"(hidden_size {tiny['hidden_size']} -> 256; the Trainer would fail on it after loading the model); "
        "resume with the model it was trained from"
    ]
    check_command_line(["method=full", f"train.resume={checkpoint}", f"model.name_or_path={TINY_CHAT}"], "train",
                       RunConfig)  # fmt: skip


def test_model_directories_that_are_no_models_are_refused_with_the_config(tmp_path, monkeypatch):
    """A directory without config.json was blamed on a missing sentencepiece or tiktoken; one whose
    config.json is not an object was a TypeError traceback; an empty name named the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "config.json").write_text("[1, 2]")
    assert problems_of("model.name_or_path=./empty") == [
        "model.name_or_path: ./empty has no config.json: not a model directory"
    ]
    assert problems_of("model.name_or_path=./listed") == [
        f"model.name_or_path: {tmp_path / 'listed' / 'config.json'} is not a JSON object"
    ]
    assert problems_of("model.name_or_path=") == ["model.name_or_path: empty; give a hub id or a local model directory"]


@pytest.mark.parametrize(
    ("file", "edit", "problem"),
    [
        ("tokenizer_config.json", {"eos_token": 5}, "eos_token is 5; a token is a string such as '</s>'"),
        ("tokenizer_config.json", {"model_max_length": "abc"}, "model_max_length is 'abc'; a number of tokens"),
        ("config.json", {"torch_dtype": "bf16"},
         "torch_dtype 'bf16' is not a torch dtype (such as 'bfloat16', 'float16' or 'float32')"),
        ("tokenizer_config.json", [1], None),
        ("tokenizer.json", "{oops", None),
    ],
    ids=["special-token", "max-length", "dtype", "not-an-object", "not-json"],
)  # fmt: skip
def test_a_models_json_files_are_checked_with_the_config_naming_the_file(tmp_path, file, edit, problem):
    """Values transformers fails on with a traceback (TypeError, AttributeError from getattr(torch,
    'bf16')) after the run directory was made, or a JSON error that names no file (blamed on the
    tokenizer even when config.json was the broken one)."""
    import json

    from tests.conftest import TINY_CHAT

    model = tmp_path / "m"
    shutil.copytree(TINY_CHAT, model)
    path = model / file
    if isinstance(edit, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    else:
        path.write_text(edit if isinstance(edit, str) else json.dumps(edit))
    (found,) = problems_of(f"model.name_or_path={model}")
    if problem is None:
        expected = "is not a JSON object" if isinstance(edit, list) else "is not valid JSON (Expecting property name"
        assert found.startswith(f"model.name_or_path: {path} {expected}"), found
    else:
        assert found == f"model.name_or_path: {path}: {problem}"


def test_the_torch_dtype_names_kept_for_the_check_are_torchs():
    import torch

    from sala_train.config.validate import TORCH_DTYPE_NAMES

    # (a name torch has and the list lacks would refuse a model that names it)
    assert {n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)} <= TORCH_DTYPE_NAMES


def test_a_directory_name_longer_than_the_file_system_takes_is_one_problem(tmp_path):
    """A name past the file system's limit (255 bytes) was an OSError traceback (ENAMETOOLONG), from
    our own check or Hydra's: written out, or made by ${hydra.job.override_dirname} from a long
    command line, which is now resolved as Hydra names the first job."""
    from sala_train.config.compose import _first_job_overrides

    long = "a" * 300
    limit = "is 300 bytes long, and the file system takes at most 255; choose a shorter name"
    assert problems_of(f"hydra.run.dir={tmp_path}/{long}/run") == [
        f"hydra.run.dir={tmp_path}/{long}/run: the name '{'a' * 57}...' {limit}"
    ]
    assert problems_of("-m", f"hydra.sweep.dir={tmp_path}/{long}", "train.seed=1,2") == [
        f"hydra.sweep.dir={tmp_path}/{long}: the name '{'a' * 57}...' {limit}"
    ]
    values = ["train.learning_rate=0.00012345678901234567", "train.weight_decay=0.0123456789012345678",
              "train.max_grad_norm=0.512345678901234567", "train.warmup_steps=1234567",
              "train.seed=1234567890", "train.max_steps=1234567", "train.logging_steps=1234567",
              "train.eval_steps=1234567", "train.save_steps=1234567", "train.per_device_eval_batch_size=3"]  # fmt: skip
    name = ",".join(sorted(values))
    assert len(name) > 255
    (problem,) = problems_of(*values, f"hydra.run.dir={tmp_path}/${{hydra.job.override_dirname}}")
    assert problem == (
        f"hydra.run.dir={tmp_path}/${{hydra.job.override_dirname}}: the name '{name[:57]}...' is {len(name)} bytes "
        "long, and the file system takes at most 255; choose a shorter name"
    )
    sweep = ("-m", f"hydra.sweep.dir={tmp_path}/sweep", "hydra.sweep.subdir=${hydra.job.override_dirname}")
    (problem,) = problems_of(*sweep, *values[1:], "train.learning_rate=1e-4,2e-4")
    assert problem.startswith("hydra.sweep.subdir=${hydra.job.override_dirname}: the name 'train.eval_steps=")
    # Hydra's own exclusions shorten it: fine then.
    exclude = "hydra.job.config.override_dirname.exclude_keys=[train.learning_rate,train.weight_decay,train.seed]"
    check_command_line([*sweep, *values[1:], "train.learning_rate=1e-4,2e-4", exclude], "train", RunConfig)
    assert sorted(tmp_path.iterdir()) == []  # (nothing made)
    # The first job's name, as Hydra made it in a real sweep (a sweep job's values as Hydra writes them).
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    line = OverridesParser.create().parse_overrides(["train.max_steps=2", "train.seed=1,2", "launcher.dry_run=true"])
    for multirun, expected in ((True, "launcher.dry_run=True,train.max_steps=2,train.seed=1"),
                               (False, "launcher.dry_run=true,train.max_steps=2,train.seed=1,2")):  # fmt: skip
        job = _first_job_overrides(line, multirun)
        assert get_overrides_dirname(job, exclude_keys=[], item_sep=",", kv_sep="=") == expected
    # A key given twice: Hydra's sweeper keeps the last. A value not known before the sweep starts
    # (shuffled, a glob of options: Hydra's ConfigLoader error here) is left out: a shorter name.
    line = OverridesParser.create().parse_overrides(
        ["train.seed=1,2", "train.seed=3", "train.max_steps=shuffle(4,5)", "method=glob(lora,full)"]
    )
    assert [o.input_line for o in _first_job_overrides(line, True)] == ["train.seed=3"]
    check_command_line(["-m", "method=glob(lora,full)", f"hydra.sweep.dir={tmp_path}/sw/${{now:%H}}"], "train",
                       RunConfig)  # fmt: skip
    # The sweep's own directory is named from the whole command line (sweep lists and all), as
    # Hydra's launcher makes it before any job.
    seeds = ",".join(str(1000 + i) for i in range(81))
    (problem,) = problems_of("-m", f"train.seed={seeds}", f"hydra.sweep.dir={tmp_path}/${{hydra.job.override_dirname}}")
    assert problem.startswith(f"hydra.sweep.dir={tmp_path}/${{hydra.job.override_dirname}}: the name 'train.seed=1000,")
    assert sorted(tmp_path.iterdir()) == []


def test_pinned_batches_are_copied_to_the_gpu_without_waiting(tmp_path, monkeypatch):
    """accelerate copies each batch to the GPU with a blocking copy unless told otherwise: with
    pinned memory (train.dataloader_pin_memory, on CUDA) the copy is asynchronous."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from sala_train.arguments import batch_transfer, training_arguments, training_kwargs
    from sala_train.config.resolve import resolve_config

    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        composed = compose(config_name="train")
    run = resolve_config(OmegaConf.create(OmegaConf.to_container(composed)), RunConfig, tmp_path)
    on_cpu = training_arguments(run, tmp_path)  # (the real arguments take the setting)
    assert on_cpu.dataloader_pin_memory is False and on_cpu.accelerator_config.non_blocking is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (what a CUDA machine's arguments get)
    on_cuda = training_kwargs(run, tmp_path)
    assert on_cuda["dataloader_pin_memory"] is True and on_cuda["accelerator_config"] == {"non_blocking": True}
    assert batch_transfer(False) == {"dataloader_pin_memory": False, "accelerator_config": {"non_blocking": False}}


def test_wandb_online_without_a_key_is_refused_once_for_a_whole_sweep(tmp_path, monkeypatch):
    """Each job of a sweep (or trial of a search) was refused on its own, one message per job,
    exit 1, its empty directory left; the command line check says it once, before any job."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.netrc)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    online = ("logger=wandb", "logger.mode=online")
    no_key = "logger.mode=online: no W&B API key; set WANDB_API_KEY, run `wandb login`, or use logger.mode=auto"
    for command in (("-m", "train.seed=1,2", *online), ("hparams_search=lora_optuna", *online), online):
        (problem,) = problems_of(*command)
        assert problem.startswith(no_key), command
    # Jobs that run on SLURM nodes, and a dry run, whose command may be pasted elsewhere: their key is there.
    check_command_line(["-m", "train.seed=1,2", *online, "hydra/launcher=submitit_slurm"], "train", RunConfig)
    check_command_line([*online, "launcher.dry_run=true"], "train", RunConfig)
    # Hydra's launcher chosen by an experiment file: the sweep's jobs run on SLURM all the same. A
    # single run ignores Hydra's launcher (it runs here), so its key is checked here.
    experiment = tmp_path / "conf" / "experiment" / "on_slurm.yaml"
    experiment.parent.mkdir(parents=True)
    experiment.write_text("# @package _global_\ndefaults:\n  - override /hydra/launcher: submitit_slurm\n")
    on_slurm = ("--config-dir", str(tmp_path / "conf"), "experiment=on_slurm", *online)
    check_command_line(["-m", *on_slurm, "train.seed=1,2"], "train", RunConfig)
    (problem,) = problems_of(*on_slurm)
    assert problem.startswith(no_key)


def test_a_sweep_on_slurm_jobs_keeps_the_local_launcher(tmp_path):
    """hydra/launcher=submitit_slurm runs each job as a SLURM job; launcher=slurm in it submitted a
    second job from each and returned at once (exit 0, the allocation wasted, an Optuna search given
    no value). Refused, also when a job's launcher comes from an experiment file or a swept group."""
    problem = ("launcher=slurm: hydra/launcher=submitit_slurm runs each job as a SLURM job already, where "
               "launcher=slurm would submit another job and return at once")  # fmt: skip
    for command in (("-m", "hydra/launcher=submitit_slurm", "launcher=slurm", "train.seed=1,2"),
                    ("-m", "hydra/launcher=submitit_slurm", "launcher=local,slurm")):  # fmt: skip
        assert any(p.startswith(problem) for p in problems_of(*command)), command
    experiment = tmp_path / "conf" / "experiment" / "slurm_jobs.yaml"
    experiment.parent.mkdir(parents=True)
    experiment.write_text("# @package _global_\ndefaults:\n  - override /launcher: slurm\n")
    on_slurm = ("-m", "--config-dir", str(tmp_path / "conf"), "experiment=slurm_jobs", "train.seed=1,2")
    assert any(p.startswith(problem) for p in problems_of(*on_slurm, "hydra/launcher=submitit_slurm"))
    # Hydra's own launcher runs the jobs here: each may submit its SLURM job (and launcher=local runs on SLURM).
    check_command_line(["-m", "launcher=slurm", "train.seed=1,2"], "train", RunConfig)
    check_command_line(["-m", "hydra/launcher=submitit_slurm", "train.seed=1,2"], "train", RunConfig)


def test_a_single_run_in_a_sweeps_directory_is_refused(tmp_path):
    """A run made its files beside a sweep's job directories, and sala-report then showed the
    directory as that one run, hiding the sweep's jobs."""
    from sala_train.checkpoints import guard_run_dir

    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(ConfigError) as refused:
        guard_run_dir(tmp_path, {}, "auto")
    assert refused.value.problems == [
        f"hydra.run.dir: {tmp_path} is a sweep's directory (multirun.yaml; its jobs are in its subdirectories); "
        "choose another hydra.run.dir"
    ]
    guard_run_dir(tmp_path, {}, "auto", dir_key="hydra.sweep.dir")  # (a sweep's own rerun)
    # A new run among its jobs: sala-report listed it as one of them, with no overrides, ranked too.
    with pytest.raises(ConfigError) as refused:
        guard_run_dir(tmp_path / "0x", {}, "auto")
    assert refused.value.problems == [
        f"hydra.run.dir: {tmp_path / '0x'} would be a new run among the jobs of the sweep in {tmp_path} "
        "(multirun.yaml), which sala-report would count as one of them; choose another hydra.run.dir"
    ]
    (tmp_path / "0").mkdir()  # one of its jobs, rerun on its own to finish it: its config decides
    (tmp_path / "0" / "config.yaml").write_text("model: {}\ntrain: {}\n")
    guard_run_dir(tmp_path / "0", {}, "auto")
    (tmp_path / "1" / ".hydra").mkdir(parents=True)  # one refused, or stopped before its config was written
    guard_run_dir(tmp_path / "1", {}, "auto")


def test_directory_names_hydra_would_get_wrong_without_a_word_are_refused():
    """A sweep subdir without ${...} put every job in one directory (the first trained there, the
    next refused after it, the first one's records rewritten); a ${hydra:KEY} naming no setting
    resolved to None (out/None)."""
    assert problems_of("-m", "train.seed=1,2", "hydra.sweep.subdir=same") == [
        "hydra.sweep.subdir=same: every job of the sweep would share this one directory; name each job's, as the "
        "default ${hydra.job.num} does"
    ]
    check_command_line(["-m", "train.seed=1", "hydra.sweep.subdir=same"], "train", RunConfig)  # (one job)
    assert problems_of("hydra.run.dir=out/${hydra:job.nope}") == [
        "hydra.run.dir=out/${hydra:job.nope}: ${hydra:job.nope} names no Hydra setting (it would resolve to None); "
        "such as ${hydra:job.num} or ${hydra:runtime.choices.method}"
    ]
    check_command_line(["-m", "train.seed=1,2", "hydra.sweep.subdir=s${hydra:job.num}"], "train", RunConfig)
    # A subdir naming jobs by some of their values: jobs that differ in another share one.
    shared = ("-m", "train.learning_rate=1e-3,2e-3", "method=full,lora", "hydra.sweep.subdir=s${train.seed}")
    assert problems_of(*shared) == [
        "hydra.sweep.subdir=s${train.seed}: jobs that differ only in train.learning_rate, method would share a "
        "directory (the first trained there, the next refused after it); name them in the subdir too, or use "
        "${hydra.job.num}"
    ]  # fmt: skip
    # (a key named there whose value differs for every job names each job's directory too)
    check_command_line(["-m", "train.learning_rate=1e-3,2e-3", "train.seed=${hydra:job.num}",
                        "hydra.sweep.subdir=s${train.seed}"], "train", RunConfig)  # fmt: skip
    for named in ("lr${train.learning_rate}/${method.name}", "${hydra:runtime.choices.method}/${train.learning_rate}",
                  "${hydra.job.override_dirname}"):  # fmt: skip
        check_command_line(["-m", "train.learning_rate=1e-3,2e-3", "method=full,lora", f"hydra.sweep.subdir={named}"],
                           "train", RunConfig)  # fmt: skip


def test_another_primary_config_is_refused():
    """The checks compose the command's own primary config: with --config-name (or --config-path)
    Hydra would run one they never saw, or fail with its own error and exit 1."""
    for flag in ("--config-name=mine", "--config-path=/somewhere"):
        (problem,) = problems_of(flag)
        assert problem.startswith(f"{flag.split('=')[0]}: the command composes its own primary config ('train'); ")


def test_a_tracker_that_is_not_installed_is_refused_with_the_install_command(monkeypatch):
    """(sala-train is installed from its checkout: ``pip install 'sala-train[tracking]'`` named a
    package no index has.)"""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb")
                        else find_spec(name, *a))  # fmt: skip
    assert problems_of("logger=tensorboard") == [
        "logger=tensorboard needs TensorBoard: pip install tensorboard (or, in the sala-train checkout, pip install "
        "-e '.[tracking]')"
    ]
    assert problems_of("logger=wandb") == [
        "logger=wandb needs wandb: pip install wandb (or, in the sala-train checkout, pip install -e '.[tracking]')"
    ]


def test_a_mixed_entrys_own_max_samples_below_one_is_refused(tmp_path):
    """Only dataset.max_samples was checked: an entry's own 0 was an IndexError traceback once
    max_samples cut the files as they are read (and a negative one "the files hold none")."""
    entry = tmp_path / "dataset" / "zero.yaml"
    entry.parent.mkdir()
    bundled = (Path(__file__).parents[2] / "sala_train" / "conf" / "dataset" / "demo_chat.yaml").read_text()
    entry.write_text(bundled.replace("name: demo_chat", "name: zero").replace("max_samples: null", "max_samples: 0"))
    assert "max_samples: 0" in entry.read_text()
    assert problems_of("--config-dir", str(tmp_path), "dataset=demo_alpaca", "dataset.mix=[zero]") == [
        "dataset.mix[0] (zero): max_samples: must be >= 1 or null, got 0"
    ]


def test_columns_a_format_never_reads_are_refused():
    """`stage=dpo dataset.columns.kto_tag=label` ran as if the mapping were absent."""
    common = ("method=full", "launcher.dry_run=true")
    assert problems_of("stage=dpo", "dataset=demo_preference", "dataset.columns.kto_tag=label", *common) == [
        "dataset.columns.kto_tag=label: dataset.format=preference does not read a 'kto_tag' column; map the field "
        "to one of the format's columns, or leave it null"
    ]
    assert problems_of("stage=kto", "dataset=demo_kto", "dataset.columns.chosen=good", *common)[0].startswith(
        "dataset.columns.chosen=good: dataset.format=kto does not read a 'chosen' column"
    )
    assert problems_of(
        "stage=kto", "dataset=demo_kto", "dataset.columns.completion=a", "dataset.columns.response=b", *common
    ) == [
        "dataset.columns.completion / dataset.columns.response: both name the KTO reply (response is LLaMA-Factory's "
        "name for it); give one"
    ]
    # What each format reads passes: LLaMA-Factory's KTO `response`, pre-training text as `prompt`.
    check_command_line(["stage=kto", "dataset=demo_kto", "dataset.columns.response=completion", *common], "train",
                       RunConfig)  # fmt: skip
    check_command_line(["stage=pretrain", "dataset=demo_text", "dataset.columns.prompt=text", *common], "train",
                       RunConfig)  # fmt: skip
    # Text named twice: `prompt` would have been required in every file but never read.
    assert problems_of(
        "stage=pretrain", "dataset=demo_text", "dataset.columns.text=text", "dataset.columns.prompt=body", *common
    ) == [
        "dataset.columns.text / dataset.columns.prompt: both name the text column (prompt is LLaMA-Factory's name "
        "for it); give one"
    ]


def test_checkpoint_layouts_are_told_apart_and_a_backend_that_cannot_load_one_is_refused(tmp_path):
    """The files DeepSpeed (0.19), FSDP (accelerate) and a plain Trainer write: a ZeRO-2 checkpoint
    resumed under backend=single restarted Adam and the warm-up without a word (transformers
    loads optimizer.pt only if it is there); ZeRO-3 under ZeRO-2 and 1 process's ZeRO-2 under 2
    were DeepSpeed tracebacks after loading the model."""
    from sala_train.checkpoints import refuse_another_layout, saved_by
    from sala_train.config.schema import DdpBackend, FsdpBackend, SingleBackend, Zero2Backend, Zero3OffloadBackend

    def checkpoint(name: str, *files: str) -> Path:
        for file in files:
            (tmp_path / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).touch()
        return tmp_path / name

    zero2 = checkpoint("z2", "latest", "global_step6/mp_rank_00_model_states.pt",
                       "global_step6/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       "global_step6/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")  # fmt: skip
    zero3 = checkpoint("z3", "latest", "global_step4/zero_pp_rank_0_mp_rank_00_model_states.pt",
                       "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt")  # fmt: skip
    fsdp = checkpoint("f", "pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata")
    assert saved_by(checkpoint("whole", "pytorch_model_fsdp.bin", "optimizer.bin")) == ("fsdp", None)
    plain = checkpoint("p", "optimizer.pt", "scheduler.pt")
    assert [saved_by(c) for c in (zero2, zero3, fsdp, plain)] == [("zero2", 2), ("zero3", 1), ("fsdp", None),
                                                                   ("plain", None)]  # fmt: skip
    refuse_another_layout(zero2, Zero2Backend(), 2)
    refuse_another_layout(zero3, Zero3OffloadBackend(), 1)
    refuse_another_layout(fsdp, FsdpBackend(), 8)
    refuse_another_layout(plain, DdpBackend(), 4)
    with pytest.raises(ConfigError, match="saved by DeepSpeed ZeRO-2, which backend=single cannot load"):
        refuse_another_layout(zero2, SingleBackend(), 1)
    with pytest.raises(ConfigError, match="saved by DeepSpeed ZeRO-3, which backend=zero2 cannot load"):
        refuse_another_layout(zero3, Zero2Backend(), 1)
    with pytest.raises(ConfigError, match=r"in 2 partition\(s\), one per process, and this run has 4 process\(es\)"):
        refuse_another_layout(zero2, Zero2Backend(), 4)
    with pytest.raises(ConfigError, match="saved by FSDP, which backend=ddp cannot load"):
        refuse_another_layout(fsdp, DdpBackend(), 2)


def test_a_checkpoint_saved_part_way_through_an_epoch_resumes_only_with_its_process_count(tmp_path):
    """Each process skips as many of its own batches as it trained: with another process count its
    share of the epoch is another one, so some samples trained twice and others never, and
    transformers said nothing. At an epoch's end the next epoch is drawn afresh: any count resumes."""
    from sala_train.checkpoints import refuse_another_split, saved_processes

    def checkpoint(name: str, epoch: float, *rng_files: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "global_step": 3}))
        for file in rng_files:
            (tmp_path / name / file).touch()
        return tmp_path / name

    two = checkpoint("two", 0.4, "rng_state_0.pth", "rng_state_1.pth")
    one = checkpoint("one", 1.5, "rng_state.pth")
    ended = checkpoint("ended", 2.0, "rng_state_0.pth", "rng_state_1.pth")
    assert [saved_processes(c) for c in (two, one, ended, checkpoint("none", 0.5))] == [2, 1, 2, None]
    refuse_another_split(two, 2)
    refuse_another_split(one, 1)
    refuse_another_split(ended, 1)
    refuse_another_split(tmp_path / "none", 4)  # (nothing says how many trained it)
    with pytest.raises(
        ConfigError, match=r"part-way through an epoch, trained by 2 process\(es\), and this run has 1:"
    ):
        refuse_another_split(two, 1)
    with pytest.raises(
        ConfigError, match=r"trained by 1 process\(es\), and this run has 8: .* resume it with 1 process"
    ):
        refuse_another_split(one, 8)


def test_a_submitit_sweep_requeues_a_job_at_its_time_limit_unless_told_otherwise():
    """Hydra's default max_num_timeout, 0, ended a job at its first time limit in submitit's
    UncompletedJobError, a traceback of the whole sweep, though the job had saved a checkpoint."""
    from omegaconf import OmegaConf

    from sala_train.sweep import REQUEUES_AT_THE_TIME_LIMIT, _requeue_jobs_at_their_time_limit

    def config(*overrides: str, timeouts: int = 0) -> object:
        launcher = {"max_num_timeout": timeouts}
        cfg = OmegaConf.create({"hydra": {"launcher": launcher, "overrides": {"hydra": list(overrides)}}})
        OmegaConf.set_struct(cfg, True)
        OmegaConf.set_readonly(cfg.hydra, True)  # (as Hydra hands it to the callbacks)
        return cfg

    defaulted = config("hydra/launcher=submitit_slurm")
    _requeue_jobs_at_their_time_limit(defaulted)
    assert defaulted.hydra.launcher.max_num_timeout == REQUEUES_AT_THE_TIME_LIMIT == 3
    for chosen in ("hydra.launcher.max_num_timeout=0", "++hydra.launcher.max_num_timeout=0"):
        kept = config("hydra/launcher=submitit_slurm", chosen)
        _requeue_jobs_at_their_time_limit(kept)
        assert kept.hydra.launcher.max_num_timeout == 0
    from_a_file = config("hydra/launcher=submitit_slurm", timeouts=5)  # (a launcher yaml of the user's)
    _requeue_jobs_at_their_time_limit(from_a_file)
    assert from_a_file.hydra.launcher.max_num_timeout == 5


def test_a_data_path_under_home_is_expanded(tmp_path, monkeypatch):
    """``~/x.jsonl`` in a data path was read as a folder named ``~`` in the working directory
    ("file not found: /cwd/~/x.jsonl"), where model and resume paths expand it."""
    from hydra import compose, initialize_config_module

    from sala_train.config.resolve import resolve_config

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    (tmp_path / "x.jsonl").write_text('{"messages": []}\n')
    overrides = ["dataset=demo_chat", "dataset.train=['~/x.jsonl']"]
    check_command_line(overrides, "train", RunConfig)
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        cfg = resolve_config(compose("train", overrides=overrides), RunConfig, Path.cwd())
    assert cfg.dataset.train == [str(tmp_path / "x.jsonl")]
    # A file whose name starts with ~ is that file (expanduser read it as a user's home: a traceback).
    (tmp_path / "~data.jsonl").write_text('{"messages": []}\n')
    monkeypatch.chdir(tmp_path)
    check_command_line(["dataset=demo_chat", "dataset.train=['~data.jsonl']"], "train", RunConfig)


def test_quoted_values_in_a_sweep_are_checked_as_their_jobs_get_them():
    """A quoted element of a comma sweep (a path with a space, a regex, a value holding a comma)
    reached the checks as Hydra's QuotedString object: every such sweep was refused, in a message
    naming the object. Hydra hands each job the value's text, which the job reads unquoted."""
    check_command_line(["-m", 'train.learning_rate="1e-3",2e-3'], "train", RunConfig)
    check_command_line(["-m", "method=lora", "method.target_modules='.*q_proj',all-linear"], "train", RunConfig)
    assert problems_of("-m", 'train.learning_rate="-1",2e-3') == [
        "in the job with train.learning_rate=-1: train.learning_rate: must be > 0, got -1.0"
    ]
    found = problems_of("-m", 'dataset.train=["no such dir/a b.json"],["x.json"]')
    assert found and not any("QuotedString" in p for p in found), found
    assert any("no such dir/a b.json" in p for p in found), found


def test_numbers_given_as_text_are_read_as_numbers():
    """What ${oc.env:LR} gives is text, as is a quoted number: OmegaConf's typed nodes read it as
    the number, and so does the schema; text that is no number is still refused."""
    from sala_train.config.compose import compose_config

    check_command_line(["train.learning_rate='2e-4'"], "train", RunConfig)
    data = compose_config("train", [])
    data["train"].update(learning_rate="2e-4", max_steps=" 7", bf16="False")
    cfg = build(RunConfig, data)
    assert (cfg.train.learning_rate, cfg.train.max_steps, cfg.train.bf16) == (2e-4, 7, False)
    assert problems_of("train.max_steps='1e3'") == ["train.max_steps: expected int, got '1e3'"]


def test_hydra_interpolations_in_a_jobs_keys_are_resolved_as_the_job_resolves_them():
    """``train.seed=${hydra:job.num}`` and a run name made of the overrides are Hydra idioms; the
    checks resolved the config with no Hydra config set, so each was refused ("HydraConfig was not
    set"). A name made of the overrides that holds itself never resolves: said with the fix."""
    check_command_line(["-m", "train.learning_rate=1e-3,2e-3", "train.seed=${hydra:job.num}"], "train", RunConfig)
    check_command_line(["logger=tensorboard", "logger.name=${hydra:runtime.choices.logger}"], "train", RunConfig)
    named = ("-m", "logger=wandb", "logger.mode=offline", "train.learning_rate=1e-3,2e-3",
             "logger.run_name=${hydra:job.override_dirname}")  # fmt: skip
    assert problems_of(*named) == [
        "logger.run_name=${hydra:job.override_dirname}: the override_dirname is made of the job's overrides, this one "
        "too, so it would name itself without end; leave it out of the name: "
        "hydra.job.config.override_dirname.exclude_keys=[logger.run_name]"
    ]
    check_command_line([*named, "hydra.job.config.override_dirname.exclude_keys=[logger.run_name]"], "train",
                       RunConfig)  # fmt: skip


def test_a_stray_plus_is_one_line_saying_to_drop_it():
    """``+train.seed=1`` on a key the config has ended in Hydra's "Could not append to config"
    (exit 1, HYDRA_FULL_ERROR; under -m with a sweep directory begun), and ``+method=full`` in
    Hydra's advice to write ``override method: full`` in a YAML defaults list."""
    assert problems_of("+train.seed=1") == [
        "+train.seed=1: train.seed is in the config already: drop the '+' (train.seed=1), or write '++' to set it, "
        "there or not"
    ]
    assert problems_of("-m", "+train.seed=1,2") == [
        "+train.seed=1,2: train.seed is in the config already: drop the '+' (train.seed=1,2), or write '++' to set "
        "it, there or not"
    ]
    assert problems_of("+method=full") == [
        "+method=full: method is chosen already (the defaults list has it): drop the '+', method=full"
    ]
    check_command_line(["++train.seed=1"], "train", RunConfig)
    # Hydra adds over a null, and merges a list or mapping given: those are no stray +.
    check_command_line(
        ["+train.save_total_limit=2", "+train.warmup_ratio=0.1", "train.warmup_steps=0"], "train", RunConfig
    )


def test_a_sweep_and_a_run_are_not_made_inside_each_other(tmp_path, monkeypatch):
    """A sweep into a run's directory was accepted (each job then refused as it started, and
    sala-report showed the run alone); a run into an Optuna search's directory too, which has no
    multirun.yaml (Hydra's Optuna sweeper writes none)."""
    from sala_train.checkpoints import guard_run_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}\n")
    assert problems_of("-m", "train.seed=1,2", "hydra.sweep.dir=run") == [
        "hydra.sweep.dir=run: run holds a run (config.yaml); a sweep's jobs would be made inside it; choose another "
        "hydra.sweep.dir"
    ]
    with pytest.raises(ConfigError, match="holds a run"):  # (a subdir naming jobs by their values, say)
        guard_run_dir(tmp_path / "run" / "0", {}, "auto", "hydra.sweep.dir")
    for mark in ("optimization_results.yaml", ".sweep_started"):
        search = tmp_path / f"search{len(mark)}"
        search.mkdir()
        (search / mark).write_text("")
        with pytest.raises(ConfigError, match=re.escape(f"is a sweep's directory ({mark};")):
            guard_run_dir(search, {}, "auto")
        with pytest.raises(ConfigError, match=re.escape(f"would be a new run among the jobs of the sweep in {search} "
                                                        f"({mark})")):  # fmt: skip
            guard_run_dir(search / "mine", {}, "auto")


def test_an_override_hydra_cannot_parse_keeps_its_caret_and_says_to_quote(tmp_path):
    """Hydra's caret was shifted by the prefix put before its first line only, and the message
    did not say what fixes the commonest case (a value that needs quotes)."""
    (problem,) = problems_of("logger.name=训练-α")
    head, hydra_line, caret, *_ = problem.splitlines()
    assert head.startswith("cannot parse overrides (a value with spaces, letters outside ASCII")
    assert hydra_line.endswith("logger.name=训练-α") and hydra_line[caret.index("^")] == "训"
    (tmp_path / "conf.yaml").write_text("")
    assert problems_of("--config-dir", str(tmp_path / "conf.yaml")) == [
        f"config directory {tmp_path / 'conf.yaml'}: a file; --config-dir takes the directory that holds your group "
        "folders (experiment/, dataset/, ...)"
    ]


def test_hydras_own_settings_are_not_swept():
    """Hydra refuses a sweep of its own settings with its error and exit 1."""
    assert problems_of("-m", "hydra.sweep.dir=a1,a2", "train.seed=1") == [
        "hydra.sweep.dir=a1,a2: Hydra's own settings take one value per command, not a sweep; run one command for each"
    ]


def test_an_experiment_choosing_a_group_without_override_names_its_file(tmp_path):
    """Hydra's "Multiple values for dataset. To override a value use 'override dataset: X'" named
    no file; it is the same words as for a stray +dataset=X, which the command line did not have."""
    from sala_train.config.entries import use_user_config_dirs

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - /dataset: demo_alpaca\n")
    try:
        found = problems_of("--config-dir", str(tmp_path), "experiment=mine")
    finally:
        use_user_config_dirs([])
    assert found == [
        f"{tmp_path / 'experiment' / 'mine.yaml'}: its defaults list chooses dataset, which the main config chooses "
        "already: write '- override /dataset: demo_alpaca'"
    ]


def test_a_changed_mixed_entry_is_named_by_its_one_setting():
    """The refusal printed the whole dataset.mixed list, before and after, on one line."""
    from sala_train.checkpoints import config_differences

    entry = {"name": "extra", "train": ["/a.json"], "cutoff_len": 512}
    assert config_differences({"dataset": {"mixed": [entry]}}, {"dataset": {"mixed": [{**entry, "train": ["/b.json"]}]}}
                              ) == ["dataset.mixed[0].train: ['/a.json'] -> ['/b.json']"]  # fmt: skip


def test_a_mixed_entrys_own_settings_that_give_way_to_the_runs_are_said():
    """A mixed entry's template, masking and cutoff are the run's (as LLaMA-Factory's): one it sets
    otherwise was dropped without a word. An entry that leaves them at their defaults says nothing."""
    from sala_train.config.entries import mixed_settings_warning
    from sala_train.config.schema import DatasetConfig

    run = DatasetConfig(name="alpaca_en_demo", train=["a.json"], mix=["identity", "advertisegen_chatml"])
    assert mixed_settings_warning(run) == (
        "WARNING: dataset.mix: advertisegen_chatml's cutoff_len=512 (dataset.cutoff_len=2048 applies): the run's own "
        "template, tool_format, default_system, train_on_prompt, mask_history, on_error, cutoff_len apply to every "
        "entry of a mix; set them for the run, or train the entries apart"
    )
    assert mixed_settings_warning(dataclasses.replace(run, cutoff_len=512)) is None
    # (identity sets none of them: the run's template is no change of identity's)
    assert mixed_settings_warning(dataclasses.replace(run, mix=["identity"], template="chatml")) is None


def test_default_system_is_some_text_for_conversations():
    assert problems_of("dataset.default_system=' '") == [
        "dataset.default_system: blank; give the system prompt, or null for none"
    ]
    text = ("stage=pretrain", "dataset=demo_text", "dataset.default_system=Hi")
    assert problems_of(*text) == [
        "dataset.default_system: applies to conversations; dataset=demo_text holds text (format text), which has "
        "no turns"
    ]
    for fine in (["dataset.default_system='You are terse.'"], [*text, "dataset.mix=[demo_chat]"]):
        check_command_line(fine, "train", RunConfig)


def test_preprocessing_workers_are_one_or_more_or_null():
    """0 would be datasets' "no multiprocessing" and a negative count its ValueError, after the model's
    tokenizer loaded; both are refused with the key's meaning."""
    expected = ("dataset.preprocessing_num_workers: must be >= 1 (1: tokenize in the command's own process) or "
                "null (one per core, for large splits), got {}")  # fmt: skip
    assert problems_of("dataset.preprocessing_num_workers=0") == [expected.format(0)]
    assert problems_of("dataset.preprocessing_num_workers=-2") == [expected.format(-2)]
    for fine in ("4", "null"):
        check_command_line([f"dataset.preprocessing_num_workers={fine}"], "train", RunConfig)


def test_a_key_an_older_entry_does_not_list_is_refused_with_the_fix(tmp_path):
    """A user's entry copied before sala-train added a key (here without preprocessing_num_workers
    and mask_history): setting it was Hydra's "Key ... is not in struct" with exit 1, after these
    checks passed; what the schema does not know at all stays an unknown key; '+' and '++' set it, and
    once set a plain override changes it; a list's index is no missing key."""
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    mine = tmp_path / "conf" / "dataset" / "mine.yaml"
    bundled = (conf_dir() / "dataset" / "demo_chat.yaml").read_text(encoding="utf-8").splitlines()
    mine.write_text("\n".join(line for line in bundled if not line.startswith(("preprocessing_num_workers",
                                                                                   "mask_history"))))  # fmt: skip
    fix = "(an entry written for an earlier sala-train, or by hand): add it there, or write +"
    found = problems_of("-cd", str(tmp_path / "conf"), "dataset=mine", "dataset.preprocessing_num_workers=4",
                        "dataset.mask_history=true", "dataset.no_such_key=1")  # fmt: skip
    assert found[:1] == ["dataset.no_such_key: unknown key; valid keys: " + found[0].split("valid keys: ")[1]]
    assert found[1:] == [
        f"dataset.preprocessing_num_workers=4: dataset=mine ({mine}) does not list preprocessing_num_workers {fix}"
        "dataset.preprocessing_num_workers=4",
        f"dataset.mask_history=true: dataset=mine ({mine}) does not list mask_history {fix}dataset.mask_history=true",
    ]
    conf = ["-cd", str(tmp_path / "conf"), "dataset=mine"]
    for fine in (["+dataset.mask_history=true"], ["++dataset.preprocessing_num_workers=4"],
                 ["+dataset.mask_history=true", "dataset.mask_history=false"]):  # fmt: skip
        check_command_line([*conf, *fine], "train", RunConfig)  # (as Hydra takes them)
    assert not any("does not list" in p for p in problems_of(*conf, "dataset.mix.0=identity"))


def test_an_index_into_a_list_sets_that_item_as_hydra_does():
    """``dataset.mix.0=x`` was checked as if ``mix`` were a mapping ({'0': 'x'}: "expected a list of
    str") while Hydra sets the list's first item; an index Hydra would refuse is one problem."""
    from hydra import compose, initialize_config_dir

    mix = ["dataset.mix=[identity,demo_sharegpt]"]
    overrides = [*mix, "dataset.mix.0=demo_alpaca"]
    check_command_line(overrides, "train", RunConfig)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        assert list(compose("train", overrides).dataset.mix) == ["demo_alpaca", "demo_sharegpt"]
    # the item is checked as an item of the list: the value is what is wrong
    assert problems_of(*mix, "dataset.mix.1=no_such_entry")[0].startswith("dataset.mix[1]: no data set entry")
    whole = "set it whole: dataset.mix=[...]"
    assert problems_of(*mix, "dataset.mix.2=identity") == [
        f"dataset.mix.2: dataset.mix is a list (indices 0 to 1); {whole}"
    ]
    assert problems_of(*mix, "dataset.mix.first=identity") == [
        f"dataset.mix.first: dataset.mix is a list (indices 0 to 1); {whole}"
    ]
    assert problems_of("dataset.mix.0=identity") == [f"dataset.mix.0: dataset.mix is a list (no items); {whole}"]
    assert problems_of(*mix, "dataset.interleave_probs.1=0.5") == [
        "dataset.interleave_probs.1: dataset.interleave_probs is null, no list to index; set it whole: "
        "dataset.interleave_probs=[...]"
    ]
    # a key below an item that holds none (a traceback, exit 1); '+' on an item there (Hydra's "Could
    # not append to config", exit 1, after these checks passed)
    for through in ("dataset.mix.0.x=1", "++dataset.mix.0.x=1"):
        assert problems_of(*mix, through) == [
            "dataset.mix.0.x: dataset.mix[0] is str 'identity', with no keys to set; set dataset.mix whole"
        ]
    assert problems_of(*mix, "+dataset.mix.1=demo_alpaca") == [
        "+dataset.mix.1=demo_alpaca: dataset.mix.1 is in the config already: drop the '+' "
        "(dataset.mix.1=demo_alpaca), or write '++' to set it, there or not"
    ]
    check_command_line(["dataset.mix=[demo_alpaca,demo_sharegpt]", "++dataset.mix.1=demo_toolcall"], "train", RunConfig)
    # deleting an item: Hydra's TypeError (the general message proposed dataset.mix.0=null, refused too)
    assert problems_of("dataset.mix=[demo_alpaca,demo_sharegpt]", "~dataset.mix.0") == [
        "~dataset.mix.0: an item of a list cannot be deleted (Hydra fails on it); set the list whole: dataset.mix=[...]"
    ]
    # under a key the schema does not know, only that
    found = problems_of("dataset.mix_weights.0=2")
    assert len(found) == 1 and found[0].startswith("dataset.mix_weights: unknown key")


def test_epochs_given_while_the_config_limits_the_steps_are_refused(tmp_path):
    """train.yaml's max_steps (3000; the tiny model's 300) beats any epoch count in the Trainer: a
    LLaMA-Factory user's `train.num_train_epochs=1` trained 300 steps without a word."""
    fix = ("has no effect while train.max_steps=300 (the config's) ends the run whatever the epochs; add "
           "train.max_steps=-1 to train by epochs, or give the steps instead")  # fmt: skip
    assert problems_of("train.num_train_epochs=1") == [f"train.num_train_epochs=1: {fix}"]
    assert problems_of("-m", "train.num_train_epochs=1,2") == [
        f"in the job with train.num_train_epochs={n}: train.num_train_epochs={n}: {fix}" for n in (1, 2)
    ]
    for fine in (["train.num_train_epochs=1", "train.max_steps=-1"], ["train.num_train_epochs=1", "train.max_steps=50"],
                 ["train.max_steps=50"]):  # fmt: skip
        check_command_line(fine, "train", RunConfig)
    # ... or in an experiment of the user's own (a LLaMA-Factory YAML ported), whose train block sets
    # the epochs and not the steps; sala-data trains nothing, and takes them as they are
    experiment = tmp_path / "conf" / "experiment" / "my_epochs.yaml"
    experiment.parent.mkdir(parents=True)
    experiment.write_text("# @package _global_\ntrain:\n  num_train_epochs: 1.0\n")
    mine = ("--config-dir", str(tmp_path / "conf"), "experiment=my_epochs")
    assert problems_of(*mine) == [
        f"{experiment}: its train.num_train_epochs=1.0 has no effect while train.max_steps=300 (the config's) ends the "
        "run whatever the epochs; add max_steps: -1 to its train block (or train.max_steps=-1 to the command line) "
        "to train by epochs"
    ]
    check_command_line([*mine, "train.max_steps=-1"], "train", RunConfig)
    from sala_train.config.schema import DataToolConfig

    check_command_line(["train.num_train_epochs=1"], "data", DataToolConfig)


from sala_train.config.typed import _key_paths  # noqa: E402
from tests.conftest import SHARED  # noqa: E402

KNOWN_PATHS = {path for paths in _key_paths(RunConfig).values() for path in paths}
# The guide's LLaMA-Factory YAMLs' keys, each given as it is written there (flat); groups excepted.
GUIDE_LF_KEYS = sorted(
    {key for path in (SHARED / "reference" / "seed-configs").glob("llamafactory_*.yaml")
     for key in yaml.safe_load(path.read_text(encoding="utf-8"))} - {"stage", "dataset"}
)  # fmt: skip


@pytest.mark.parametrize("key", GUIDE_LF_KEYS)
def test_each_key_of_the_guides_llamafactory_configs_is_explained_where_sala_train_lacks_it(key):
    """A ported LLaMA-Factory config met bare "unknown key" lines, flat keys got no hint at all, and
    the nearest spellings misled: each key is now sala-train's own name for it, or why it has none."""
    (problem,) = problems_of(f"+{key}=1")
    said = re.match(
        rf"{key}: unknown key(?:; LLaMA-Factory's {key}(?: is ([^;\s]+)|: )| \(did you mean '(\S+)'\?\))", problem
    )
    assert said, problem
    named = said[1] or said[2]
    assert named is None or named in KNOWN_PATHS or named in config_groups() or named == "hydra.run.dir", problem


def test_other_tools_names_and_keys_given_in_the_wrong_place_or_option_are_explained():
    valid_train = "valid keys: max_steps, "
    assert problems_of("method=lora", "method.lora_rank=8")[0].startswith(
        "method.lora_rank: unknown key; LLaMA-Factory's lora_rank is method.r (with method=lora); valid keys: name, r,"
    )
    assert problems_of("train.evaluation_strategy=epoch")[0].startswith(
        "train.evaluation_strategy: unknown key; transformers' evaluation_strategy is train.eval_strategy; "
        + valid_train
    )
    assert problems_of("train.eval_strategy=no") == [
        "train.eval_strategy: invalid value 'no'; expected one of 'steps', 'epoch'"
    ]
    assert problems_of("train.use_galore=true")[0].startswith(
        "train.use_galore: unknown key; LLaMA-Factory's use_galore: GaLore is not offered; " + valid_train
    )
    assert problems_of("train.greater_is_better=true")[0].startswith(
        "train.greater_is_better: unknown key; LLaMA-Factory's greater_is_better: not needed: it follows "
        "train.metric_for_best_model (a loss lower, rewards/* higher); " + valid_train
    )
    assert problems_of("train.cutoff_len=512")[0].startswith(
        f"train.cutoff_len: unknown key (did you mean 'dataset.cutoff_len'?); {valid_train}"
    )
    assert problems_of("method=full", "method.r=8") == [
        "method.r: unknown key (a key of method=lora); valid keys: name"
    ]
    assert problems_of("stage.beta=0.2") == [
        "stage.beta: unknown key (a key of stage=dpo, stage=kto); valid keys: name"
    ]
    assert problems_of("train.lerning_rate=1")[0].startswith(
        f"train.lerning_rate: unknown key (did you mean 'train.learning_rate'?); {valid_train}"
    )
    # a near spelling here beats the same name elsewhere (columns.system names a field of the files),
    # and a name every group has points nowhere
    assert problems_of("dataset.system=x")[0].startswith(
        "dataset.system: unknown key (did you mean 'dataset.default_system'?)"
    )
    assert problems_of("+name=x")[0].startswith("name: unknown key; valid keys: model, method,")
    # LLaMA-Factory's values sala-train does not read
    assert problems_of("dataset.template=llama3") == [
        "dataset.template: invalid value 'llama3'; expected one of 'chatml', 'cpm4'; LLaMA-Factory's other template "
        "names are not read: null (the default) renders with the tokenizer's own chat template, as the model ships "
        "it (Llama 3's, Qwen's, ...); chatml and cpm4 are for tokenizers without one"
    ]
    assert problems_of("stage=dpo", "dataset=demo_preference", "method=full", "stage.loss_type=simpo") == [
        "stage.loss_type: invalid value 'simpo'; expected one of 'sigmoid', 'ipo', 'hinge'; ORPO and SimPO are not "
        "offered (stage=kto trains KTO)"
    ]


def test_every_name_another_tool_has_points_at_a_key_or_group_sala_train_has():
    from sala_train.config.elsewhere import NAMES_ELSEWHERE, Renamed

    for name, where in NAMES_ELSEWHERE.items():
        if isinstance(where, Renamed):
            assert where.to in KNOWN_PATHS or where.to in config_groups() or where.to == "hydra.run.dir", name
        assert name not in _key_paths(RunConfig), name  # (a key of sala-train's own is never unknown where it belongs)


def test_the_padding_multiple_is_a_positive_count_for_padded_batches():
    assert problems_of("train.pad_to_multiple_of=0") == [
        "train.pad_to_multiple_of: must be >= 1 (1: each batch to its longest sample; null: 64 on a GPU with sdpa), "
        "got 0"
    ]
    assert problems_of("train.pad_to_multiple_of=64", "train.packing=true") == [
        "train.pad_to_multiple_of / train.packing: the multiple rounds padded batches; packed batches are laid out "
        "by train.packing (leave train.pad_to_multiple_of null)"
    ]
    check_command_line(["train.pad_to_multiple_of=8"], "train", RunConfig)
    check_command_line(
        ["stage=dpo", "dataset=demo_preference", "method=full", "train.pad_to_multiple_of=8"], "train", RunConfig
    )
