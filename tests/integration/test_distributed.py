"""Distributed training on CPU as a user launches it: torchrun DDP, DeepSpeed ZeRO-3 (gloo),
a two-node run simulated on one machine, and real SLURM jobs on the local cluster CI starts."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ON_LOCAL_SLURM, TINY_CHAT, run_cli
from tests.integration.test_cli import (
    FALL_THEN_RISE,
    assert_ok,
    assert_same_weights,
    best_saved_step,
    metrics,
    train_losses,
)
from tests.integration.test_stages import BLOCKS

pytestmark = pytest.mark.slow

SHORT = ("train.max_steps=4", "train.save_steps=2", "train.eval_steps=2", "train.logging_steps=1")


def digests(output: str) -> dict[int, str]:
    return {int(r): d for r, d in re.findall(r"sala-train: rank (\d+) weights sha256 ([0-9a-f]{64})\b", output)}


@pytest.mark.parametrize("stage", [("stage=sft",), ("stage=dpo", "dataset=demo_preference")], ids=["sft", "dpo"])
def test_ddp_two_processes_keep_identical_weights(tmp_path, stage):
    # The test set (the validation set here) is evaluated by sample on the final weights.
    proc = run_cli("sala-train", *stage, "backend=ddp", "launcher.nproc_per_node=2", "method=full", "hydra.run.dir=run",
                   "dataset.test=${dataset.validation}", *SHORT, cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    final_eval = [r for r in metrics(tmp_path / "run") if r["event"] == "eval"][-1]
    (test,) = [r for r in metrics(tmp_path / "run") if r["event"] == "test"]
    assert test["step"] == final_eval["step"] == 4
    assert math.isclose(test["test_loss"], final_eval["eval_loss"], rel_tol=1e-6)
    ranks = digests(proc.stdout)
    assert sorted(ranks) == [0, 1] and len(set(ranks.values())) == 1
    from transformers import AutoModelForCausalLM

    from sala_train.distributed import parameter_digest

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert parameter_digest(final) == ranks[0]  # what was saved is what both ranks hold
    assert "rank 1 of 2" in proc.stdout and "(MULTI_CPU)" in proc.stdout
    if stage == ("stage=sft",):
        # The validation loss does not depend on the number of processes: the step-0 evaluation
        # (same weights) equals a single process's (the Trainer's own gave rank 0's share only).
        single = run_cli("sala-train", *stage, "method=full", "hydra.run.dir=single", "train.max_steps=1",
                         "train.eval_steps=1", "train.save_steps=1", cwd=tmp_path)  # fmt: skip
        assert_ok(single)

        def start_eval(run: str) -> float:
            return next(r["eval_loss"] for r in metrics(tmp_path / run) if r["event"] == "eval" and r["step"] == 0)

        assert math.isclose(start_eval("run"), start_eval("single"), rel_tol=1e-6)


def test_ranks_asked_to_stop_while_starting_agree_and_end_before_the_first_step(tmp_path):
    """With several ranks the request (the launcher's file here, as Ctrl-C or the SLURM batch
    script leaves it) is agreed on once every rank is ready: all end before the first step, no
    checkpoint, exit 75, and none hangs in a collective the others left."""
    from sala_train.launch.plan import PREEMPT_REQUEST, PREEMPTED_EXIT

    dry = run_cli("sala-train", "backend=ddp", "launcher.nproc_per_node=2", "hydra.run.dir=run", "train.max_steps=3",
                  "launcher.dry_run=true", cwd=tmp_path)  # fmt: skip
    assert_ok(dry)
    run = tmp_path / "run"
    (run / PREEMPT_REQUEST).touch()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ranks = subprocess.run(shlex.split(dry.stdout.splitlines()[0]), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert ranks.returncode == PREEMPTED_EXIT, ranks.stdout[-2000:] + ranks.stderr[-2000:]
    assert ranks.stdout.count("sala-train: stopped as asked, before the first step: nothing trained") == 1
    assert not list(run.glob("checkpoint-*")) and not (run / PREEMPT_REQUEST).exists()
    assert json.loads((run / "status.json").read_text()) == {"status": "preempted", "exit_code": 75}


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_eval_does_not_depend_on_the_number_of_processes(tmp_path, stage):
    """After one step (2 processes of 8, or one of 8 with 2 accumulation steps: the same update),
    every DPO/KTO eval figure is the single process's. 40 validation samples in batches of 3 end
    in a short batch; TRL's own loop gathered across ranks per step, padding duplicates included,
    and was up to 51% off (KTO's KL), 1.5% on DPO's reward margins."""
    data = {"dpo": "dataset=demo_preference", "kto": "dataset=demo_kto"}[stage]
    common = (f"stage={stage}", data, "dataset.test=${dataset.validation}", "method=full", "train.learning_rate=1e-2",
              "train.warmup_steps=0",
              "train.max_steps=1", "train.eval_on_start=false", "train.eval_steps=1", "train.save_steps=1",
              "train.per_device_train_batch_size=8", "train.per_device_eval_batch_size=3")  # fmt: skip
    assert_ok(run_cli("sala-train", *common, "backend=ddp", "launcher.nproc_per_node=2", "hydra.run.dir=ddp",
                      cwd=tmp_path))  # fmt: skip
    assert_ok(run_cli("sala-train", *common, "train.gradient_accumulation_steps=2", "hydra.run.dir=single",
                      cwd=tmp_path))  # fmt: skip

    def figures(run: str, event: str = "eval") -> dict[str, float]:
        (evaluation,) = [r for r in metrics(tmp_path / run) if r["event"] == event]
        return {k.replace(f"{event}_", "eval_", 1): v for k, v in evaluation.items()
                if k.startswith(f"{event}_") and not k.endswith(("_runtime", "second"))}  # fmt: skip

    single, ddp = figures("single"), figures("ddp")
    # The test set (the validation set here), evaluated after training on the same weights, gives
    # the same figures, prepared for TRL as its validation set is.
    for run in ("single", "ddp"):
        tested, evaluated = figures(run, "test"), figures(run)
        assert set(tested) == set(evaluated) and all(math.isclose(tested[k], evaluated[k], rel_tol=1e-6)
                                                     for k in evaluated), (run, tested, evaluated)  # fmt: skip
    assert {"eval_loss", "eval_rewards/chosen", "eval_rewards/margins", "eval_logps/rejected"} <= set(single)
    assert single["eval_rewards/margins"] != 0  # the policy moved from the reference: the figures say something
    assert set(ddp) == set(single) and all(math.isclose(ddp[k], single[k], rel_tol=1e-5) for k in single), (single, ddp)
    if stage == "dpo":
        # DPO's loss, rewards and log-probabilities are per pair: means over pairs, so batches of 1
        # give the same (TRL averaged per batch, and a last batch of 1 pair weighed as much as 3).
        assert_ok(run_cli("sala-train", *common, "train.gradient_accumulation_steps=2",
                          "train.per_device_eval_batch_size=1", "hydra.run.dir=by_one", cwd=tmp_path))  # fmt: skip
        by_one = figures("by_one")
        per_pair = [k for k in single if k == "eval_loss" or k.startswith(("eval_rewards/", "eval_logps/"))]
        assert len(per_pair) == 7 and all(math.isclose(by_one[k], single[k], rel_tol=1e-5) for k in per_pair)


# One process runs the preference stages (TRL's trainers, whose reference model ZeRO-3 must shard
# too); SFT with LoRA under ZeRO-3 is test_zero3_lora_two_processes_resume_bit_exact.
PREFERENCE = {"sft": (), "kto": ("stage=kto", "dataset=demo_kto"),
              "dpo": ("stage=dpo", "dataset=demo_preference", BLOCKS)}  # fmt: skip


@pytest.mark.parametrize(
    ("backend", "procs", "method", "stage"),
    [
        ("zero3", 1, "full", "kto"),
        ("zero3", 1, "lora", "dpo"),
        ("zero3", 2, "full", "sft"),
        ("zero2", 2, "full", "sft"),
        ("zero3_offload", 1, "full", "sft"),
    ],
)
def test_deepspeed_on_cpu(tmp_path, backend, procs, method, stage):
    # ZeRO-Offload steps with DeepSpeed's CPU Adam: with a strong weight decay its losses must be
    # single's, so it decays the same parameters (not biases and norm weights) the same AdamW way;
    # with Adam's betas and epsilon set, and a schedule to a floor, it steps with those too
    # (accelerate builds DeepSpeed's optimizer from the Trainer's with lr and weight decay alone).
    decay = (
        ("train.weight_decay=0.5", "train.learning_rate=1e-2", *ADAM_AND_FLOOR) if backend == "zero3_offload" else ()
    )
    # Without offload DeepSpeed needs no kernel of its own: it compiled none (it compiled its
    # inference all-reduce on start, 35 s on a machine's first run).
    kernels = {} if decay else {"TORCH_EXTENSIONS_DIR": str(tmp_path / "kernels")}
    proc = run_cli("sala-train", f"backend={backend}", f"launcher.nproc_per_node={procs}", f"method={method}",
                   *PREFERENCE[stage], "hydra.run.dir=run", *SHORT, *decay, cwd=tmp_path, env=kernels)  # fmt: skip
    assert_ok(proc)
    assert not list(tmp_path.glob("kernels/*"))
    if decay:
        assert_ok(run_cli("sala-train", f"method={method}", "hydra.run.dir=single", *SHORT, *decay, cwd=tmp_path))
        losses = {name: [r["loss"] for r in metrics(tmp_path / name) if r["event"] == "train"]
                  for name in ("run", "single")}  # fmt: skip
        assert len(losses["run"]) == 4 and losses["run"][-1] < losses["run"][0]
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(*losses.values(), strict=True)), losses
        assert_adam_and_floor_applied(tmp_path / "single", tmp_path / "run")
    # DeepSpeed's calls to collectives torch renamed warned on every call, burying the progress lines.
    assert "is deprecated" not in proc.stdout + proc.stderr
    run = tmp_path / "run"
    ds = json.loads((run / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == (2 if backend == "zero2" else 3)
    assert (ds["zero_optimization"].get("offload_param", {}).get("device") == "cpu") is (backend == "zero3_offload")
    final = run / "final"
    if method == "full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(final)  # whole 16-bit-gathered weights
        assert sum(p.numel() for p in model.parameters()) == 421_120
    else:
        assert_complete_adapter(final, with_lm_head=stage == "sft")
    assert (run / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's sharded states
    if stage != "sft":
        # Step 1 compares the policy with its reference before any update: the rewards are exactly 0
        # (a reference with other weights would not give 0); then the policy moves away from it.
        trained = [r for r in metrics(run) if r["event"] == "train"]
        assert trained[0]["step"] == 1 and trained[0]["rewards/chosen"] == trained[0]["rewards/rejected"] == 0.0
        assert trained[-1]["rewards/margins"] != 0.0
        finite = [v for r in trained for k, v in r.items() if k == "loss" or k.startswith(("logps/", "rewards/"))]
        assert finite and all(math.isfinite(v) for v in finite)  # KTO's nansum would read NaN rewards as 0


@pytest.mark.parametrize(("backend", "method"), [("single", "lora"), ("zero3", "full")])
def test_load_best_model_at_end_loads_the_best_adapter_or_deepspeeds_checkpoint(tmp_path, backend, method):
    """The best checkpoint's weights as final/: an adapter loaded into the peft model, or DeepSpeed's
    ZeRO-3 partitions loaded into its engine (then gathered whole into final/)."""
    proc = run_cli("sala-train", f"backend={backend}", f"method={method}", *FALL_THEN_RISE, "hydra.run.dir=run",
                   cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    run = tmp_path / "run"
    best = best_saved_step(run, (4, 8))
    assert best != 8, metrics(run)  # (the run this test needs: the last step is not the best)
    assert f"final/ holds the weights of checkpoint-{best}, the best eval_loss" in proc.stdout
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert assert_same_weights(run / "final" / weights, run / f"checkpoint-{best}" / weights)
    assert not assert_same_weights(run / "final" / weights, run / "checkpoint-8" / weights)


ADAM_AND_FLOOR = ("train.adam_beta1=0.5", "train.adam_beta2=0.9", "train.adam_epsilon=1e-3", "train.warmup_steps=1",
                  "train.lr_scheduler_type=cosine_with_min_lr", "train.min_lr_rate=0.1")  # fmt: skip


def assert_adam_and_floor_applied(single: Path, deepspeed: Path) -> None:
    """``ADAM_AND_FLOOR`` as both optimizers saved it, and the learning rate of each logged step as
    transformers' cosine to a floor gives it (one warm-up step, then from 1e-2 down to 1e-3)."""
    import torch

    groups = torch.load(single / "checkpoint-2" / "optimizer.pt", weights_only=False)["param_groups"]
    (states,) = (deepspeed / "checkpoint-2" / "global_step2").glob("*optim_states.pt")
    zero = torch.load(states, weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
    for group in (*groups, *zero):
        assert (tuple(group["betas"]), group["eps"]) == ((0.5, 0.9), 1e-3), group
    for run in (single, deepspeed):
        rates = [r["learning_rate"] for r in metrics(run) if r["event"] == "train"]
        floor, peak, decay_steps = 1e-3, 1e-2, 3  # steps 2, 3, 4 decay; step 1 warms up from 0
        expected = [0.0] + [floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * k / decay_steps)) for k in range(3)]
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(rates, expected, strict=True)), rates


def assert_complete_adapter(final: Path, with_lm_head: bool = True) -> None:
    """Every LoRA matrix saved with its real shape and trained values (not an empty file)."""
    from safetensors.torch import load_file

    tensors = load_file(final / "adapter_model.safetensors")
    lora = {k: v for k, v in tensors.items() if "lora_" in k}
    assert len(lora) == 2 * (2 * 7 + with_lm_head)  # A and B for 7 projections x 2 layers (+ lm_head)
    assert all(v.numel() > 0 for v in lora.values())
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0
    # ... and loadable: peft puts every saved matrix back into a fresh base model.
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    model = PeftModel.from_pretrained(base, final)
    state = model.state_dict()
    for key, value in lora.items():
        loaded = state[key.replace(".weight", ".default.weight")]
        assert loaded.equal(value.to(loaded.dtype)), key


def test_zero3_lora_two_processes_resume_bit_exact(tmp_path):
    args = ("sala-train", "backend=zero3", "launcher.nproc_per_node=2", "method=lora", *SHORT)
    assert_ok(run_cli(*args, "hydra.run.dir=straight", cwd=tmp_path))
    shutil.copytree(tmp_path / "straight", tmp_path / "cut")  # (the same run: trained once)
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    shutil.rmtree(tmp_path / "cut" / "final")
    proc = run_cli(*args, "hydra.run.dir=cut", cwd=tmp_path)
    assert_ok(proc)
    assert "resuming from" in proc.stdout and "checkpoint-2" in proc.stdout
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "cut")
    # (steps 3 and 4 logged once, by the resumed run: the copied lines past checkpoint-2 were dropped)
    assert [r["step"] for r in metrics(tmp_path / "cut") if r["event"] == "train"] == [1, 2, 3, 4]
    assert re.search(r"step 4/4 \(100\.0%\) \| loss ", proc.stdout + proc.stderr)
    assert [resumed[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]
    assert_complete_adapter(tmp_path / "cut" / "final")
    exported = run_cli("sala-export", "cut", cwd=tmp_path)  # an adapter saved under ZeRO-3 merges cleanly
    assert_ok(exported)
    assert "logit check on" in exported.stdout and (tmp_path / "cut" / "export" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The tiny model saved with weights, as a downloaded model is: loaded, not built from config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = tmp_path_factory.mktemp("models") / "tiny-pretrained"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).save_pretrained(where)
    AutoTokenizer.from_pretrained(TINY_CHAT).save_pretrained(where)
    return where


def test_zero3_loads_a_pretrained_model_partitioned(tmp_path, pretrained):
    """Loaded under zero.Init as the guide's finetune.py loads it (rank 0 reads the weights, each
    process keeps its half), the model trains as ZeRO-2 trains the whole one: same start, same
    losses; the packing check gathers it. A full DPO's reference, which cannot be copied from a
    partitioned policy, is loaded again: the same weights, so step 1's rewards are exactly 0."""
    common = ("launcher.nproc_per_node=2", "model.from_scratch=false", "train.eval_on_start=true", *SHORT)
    full = ("method=full", f"model.name_or_path={pretrained}", *common)
    zero3 = run_cli("sala-train", "backend=zero3", "train.packing=true", "hydra.run.dir=zero3", *full, cwd=tmp_path)
    assert_ok(zero3)
    assert ("loaded partitioned under ZeRO-3 (zero.Init) across 2 process(es): rank 0 holds 210,560 of the model's "
            "421,120 parameters") in zero3.stdout  # fmt: skip
    assert "packing check passed" in zero3.stdout
    assert_ok(run_cli("sala-train", "backend=zero2", "train.packing=true", "hydra.run.dir=zero2", *full, cwd=tmp_path))

    def losses(run: str) -> list[tuple[int, str, float]]:
        return [(r["step"], r["event"], r.get("loss", r.get("eval_loss"))) for r in metrics(tmp_path / run)
                if r["event"] in ("train", "eval")]  # fmt: skip

    partitioned, whole = losses("zero3"), losses("zero2")
    assert len(partitioned) == 7 and partitioned[0] == whole[0]  # step 0's evaluation, before any update
    assert all(
        a[:2] == b[:2] and math.isclose(a[2], b[2], rel_tol=1e-5) for a, b in zip(partitioned, whole, strict=True)
    )
    # The reference of a checkpoint that lacks a layer its config has: that layer is drawn from the
    # seed for both loads (it was drawn anew for the reference, whose rewards then started off 0).
    deeper = tmp_path / "deeper"
    shutil.copytree(pretrained, deeper)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps(config | {"num_hidden_layers": config["num_hidden_layers"] + 1}))
    dpo = run_cli("sala-train", "backend=zero3", "stage=dpo", "dataset=demo_preference", "hydra.run.dir=dpo",
                  "method=full", f"model.name_or_path={deeper}", *common, cwd=tmp_path)  # fmt: skip
    assert_ok(dpo)
    assert "model.layers.2.self_attn.q_proj.weight" in dpo.stdout + dpo.stderr  # (transformers' MISSING rows)
    trained = [r for r in metrics(tmp_path / "dpo") if r["event"] == "train"]
    assert trained[0]["step"] == 1 and trained[0]["rewards/chosen"] == trained[0]["rewards/rejected"] == 0.0
    assert trained[-1]["rewards/margins"] != 0.0
    # LoRA's new weights, which ZeRO-3 does not hold, train in bf16 as on every other backend
    # (DeepSpeed skips its cast of a model loaded under zero.Init: they trained in float32).
    lora = ("method=lora", f"model.name_or_path={pretrained}", "train.bf16=true", "hydra.run.dir=lora")
    assert_ok(run_cli("sala-train", "backend=zero3", *lora, *common, cwd=tmp_path))
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "lora" / "final" / "adapter_model.safetensors")
    assert adapter and {tensor.dtype for name, tensor in adapter.items() if "lora_" in name} == {torch.bfloat16}


def test_zero3_weights_unlike_their_config_stop_every_rank_with_one_message(tmp_path, pretrained):
    """Under zero.Init rank 0 alone reads the weights' values; the other ranks went on to train and
    ended in a traceback when it stopped."""
    edited = tmp_path / "edited"
    shutil.copytree(pretrained, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(config | {"intermediate_size": config["intermediate_size"] + 8}))
    proc = run_cli("sala-train", "backend=zero3", "launcher.nproc_per_node=2", f"model.name_or_path={edited}",
                   "model.from_scratch=false", "hydra.run.dir=run", *SHORT, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    message = ("its weights do not match its config.json (model.layers.0.mlp.down_proj.weight: [128, 256] in the "
               "weights, [128, 264] by the config, and 5 more)")  # fmt: skip
    assert (proc.stdout + proc.stderr).count(message) == 1
    assert not (tmp_path / "run" / "final").exists()


def test_zero3_refuses_packing_for_a_model_that_leaks_once_deepspeed_holds_it(tmp_path):
    """Under ZeRO-3 the packing check runs in DeepSpeed's engine, as training begins (gathering
    the whole model on every GPU first does not fit a model that needs ZeRO-3): the MiniCPM-SALA
    stand-in, whose linear attention takes sample boundaries from the mask only, is still refused
    on both ranks, with one message, exit 2, before any step or evaluation."""
    from tests.fixtures.tiny_sala import make_tiny_sala

    sala = make_tiny_sala(tmp_path / "tiny-sala", TINY_CHAT)
    proc = run_cli("sala-train", "model=minicpm_sala", f"model.name_or_path={sala}", "model.attn_implementation=sdpa",
                   "backend=zero3", "launcher.nproc_per_node=2", "train.packing=true", "train.bf16=true",
                   "train.eval_on_start=true", "hydra.run.dir=run", *SHORT, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "loaded partitioned under ZeRO-3" in proc.stdout  # (so it ran in the engine, not before it)
    refusal = "sala-train: train.packing=true refused: on real batches packed samples' logits move"
    assert (proc.stdout + proc.stderr).count(refusal) == 1
    assert "eval_loss" not in proc.stdout + proc.stderr  # (train.eval_on_start's evaluation comes after it)
    # (accelerate warned of a gradient accumulation "mismatch" at DeepSpeed's start, which is none)
    assert "mismatch" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()  # a new run refused as it starts leaves nothing


def test_ddp_length_grouped_resume_in_a_later_epoch_is_bit_exact(tmp_path):
    """Resumed mid-way through its second epoch, a two-process run with train.group_by_length
    trained the first epoch's batches again: the sampler's epoch did not reach it through the
    batches the resume skips. 3 steps per epoch; checkpoint-4 is one step into epoch 2."""
    args = ("sala-train", "backend=ddp", "launcher.nproc_per_node=2", "train.group_by_length=true",
            "train.max_steps=-1", "train.num_train_epochs=3", "dataset.max_samples=48", "train.save_steps=4",
            "train.eval_steps=5", "train.logging_steps=1")  # fmt: skip
    assert_ok(run_cli(*args, "hydra.run.dir=straight", cwd=tmp_path))
    shutil.copytree(tmp_path / "straight", tmp_path / "cut")
    for later in ("checkpoint-8", "checkpoint-9", "final"):
        shutil.rmtree(tmp_path / "cut" / later)
    proc = run_cli(*args, "hydra.run.dir=cut", cwd=tmp_path)
    assert_ok(proc)
    assert f"resuming from {tmp_path}/cut/checkpoint-4" in proc.stdout
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "cut")
    assert sorted(straight) == list(range(1, 10)) and resumed == straight
    from safetensors.torch import load_file

    want, got = (load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("straight", "cut"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_fsdp_refused_on_cpu(tmp_path):
    cpu = {"CUDA_VISIBLE_DEVICES": ""}  # (a GPU machine runs it as a CPU one)
    proc = run_cli("sala-train", "backend=fsdp", "method=full", "launcher.nproc_per_node=2", "hydra.run.dir=run",
                   *SHORT, cwd=tmp_path, env=cpu)  # fmt: skip
    assert proc.returncode == 2 and "backend=fsdp needs CUDA GPUs" in proc.stderr
    # Refused before torchrun starts (it was each rank's refusal, then "rank 0 ... exited with code 2"),
    # and before the run directory is made.
    assert "rank 0" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    # The runner refuses it too: a SLURM job's node is not the machine that submitted it.
    from sala_train.config.io import load
    from sala_train.config.schema import RunConfig
    from sala_train.distributed import refuse_unsupported
    from sala_train.errors import DistributedSetupError

    # A local dry run's command runs here: refused as the run is. A multinode one's commands are
    # pasted on the nodes, whose runners refuse it there.
    local = run_cli("sala-train", "backend=fsdp", "method=full", "launcher.nproc_per_node=2", "hydra.run.dir=local",
                    "launcher.dry_run=true", cwd=tmp_path, env=cpu)  # fmt: skip
    assert local.returncode == 2 and "backend=fsdp needs CUDA GPUs" in local.stderr
    dry = run_cli("sala-train", "backend=fsdp", "method=full", "launcher=multinode", "launcher.nnodes=2",
                  "launcher.node_rank=0", "launcher.master_addr=127.0.0.1", "launcher.nproc_per_node=2",
                  "hydra.run.dir=dry", "launcher.dry_run=true", cwd=tmp_path, env=cpu)  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-2000:]
    with pytest.raises(DistributedSetupError, match="backend=fsdp needs CUDA GPUs"):
        refuse_unsupported(load(RunConfig, tmp_path / "dry"))


def test_two_nodes_simulated_on_one_machine(tmp_path):
    """Two launcher invocations, node ranks 0 and 1, rendezvous on 127.0.0.1."""
    common = ("sala-train", "launcher=multinode", "launcher.nnodes=2", "launcher.nproc_per_node=1",
              "launcher.master_port=29731", "backend=ddp", "method=full", "hydra.run.dir=run", *SHORT)  # fmt: skip
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    def node(rank: int) -> None:
        results[rank] = run_cli(*common, f"launcher.node_rank={rank}", cwd=tmp_path)

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in (0, 1):
        assert_ok(results[rank])
    both = results[0].stdout + results[1].stdout
    ranks = digests(both)
    assert sorted(ranks) == [0, 1] and len(set(ranks.values())) == 1
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    # Nodes started with different overrides: each node's config.yaml overwrote the other's, and both
    # trained on the last one written, without a word. Refused on every node, naming the key.
    overrides = {0: ("train.learning_rate=1e-3",), 1: ()}
    common = (*common[: -len(SHORT) - 1], "hydra.run.dir=differ", "launcher.master_port=29733", *SHORT)

    def differing(rank: int) -> None:
        results[rank] = run_cli(*common, f"launcher.node_rank={rank}", *overrides[rank], cwd=tmp_path)

    threads = [threading.Thread(target=differing, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    said = ("launcher=multinode: the nodes were started with different configs (train.learning_rate: 0.001 on node 0, "
            "0.003 on node 1); every node must run the same command, with only launcher.node_rank changed")  # fmt: skip
    for rank in (0, 1):
        assert results[rank].returncode == 2 and said in results[rank].stderr, results[rank].stderr[-2000:]
    assert not (tmp_path / "differ" / "checkpoint-1").exists()


# --- SLURM (the local cluster from ../shared/tools/local-slurm; .ci/run starts it with two nodes) ---


@pytest.fixture(scope="module")
def slurm() -> None:
    if shutil.which("sbatch") is None:
        if os.environ.get("CI"):
            pytest.fail("sbatch not on PATH: .ci/run should have started the local SLURM cluster")
        pytest.skip("no SLURM here (start ../shared/tools/local-slurm/start.sh)")


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "GONE"


@ON_LOCAL_SLURM
def test_slurm_two_node_job_trains_with_ranks_on_both_nodes(tmp_path, slurm):
    proc = run_cli("sala-train", "launcher=slurm", "launcher.nnodes=2", "launcher.nproc_per_node=1",
                   "launcher.wait=true", "backend=ddp", "method=full", "hydra.run.dir=run", *SHORT,
                   cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    (job_id,) = re.findall(r"submitted SLURM job (\d+)", proc.stdout)
    assert f"SLURM job {job_id} COMPLETED (exit 0)" in proc.stdout
    log = (tmp_path / "run" / "slurm" / f"{job_id}.out").read_text()
    placement = dict(re.findall(r"sala-train: rank (\d) of 2 on (n\d)", log))
    assert sorted(placement) == ["0", "1"] and sorted(placement.values()) == ["n1", "n2"]  # c10d picks who is 0
    # Each node's data step tokenized the data into the cache before its ranks started.
    prepared = re.findall(r"sala-train: data ready on (n\d) \(\d+ train, \d+ validation samples\)", log)
    assert sorted(prepared) == ["n1", "n2"] and log.rindex("data ready on") < log.index("sala-train: rank ")
    assert len(set(digests(log).values())) == 1
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@ON_LOCAL_SLURM
def test_a_job_sbatch_refuses_is_one_message_and_leaves_no_run(tmp_path, slurm):
    proc = run_cli("sala-train", "launcher=slurm", "launcher.partition=no_such_partition", "backend=ddp",
                   "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "sala-train: sbatch refused the job: " in proc.stderr and "partition" in proc.stderr
    assert not (tmp_path / "run").exists()


@ON_LOCAL_SLURM
@pytest.mark.parametrize(
    ("override", "problem", "ranks_started"),
    [
        ("model.from_scratch=false", "cannot load the model", True),
        ("dataset.cutoff_len=8", "every sample was dropped", False),
    ],
)
def test_a_problem_the_job_finds_is_shown_once_and_the_job_kept(tmp_path, slurm, override, problem, ranks_started):
    """The tiny model has no weights: both nodes' ranks fail on loading it. No sample fits
    dataset.cutoff_len: each node's data step finds it, and no torchrun, rank or model starts.
    The waiting launcher shows the message (it went to the job's log), exits 2, and keeps the
    job's files."""
    proc = run_cli("sala-train", "launcher=slurm", "launcher.nnodes=2", "launcher.nproc_per_node=1",
                   "launcher.wait=true", "backend=ddp", override, "hydra.run.dir=run", *SHORT,
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (job_id,) = re.findall(r"submitted SLURM job (\d+)", proc.stdout)
    assert f"SLURM job {job_id} FAILED (exit 2)" in proc.stdout
    assert proc.stderr.count(problem) == 1 and "Traceback" not in proc.stderr
    log = (tmp_path / "run" / "slurm" / f"{job_id}.out").read_text()
    assert log.count(problem) == 1  # each rank (or node) met it; printed once
    assert ("sala-train: rank " in log) is ranks_started, log
    assert json.loads((tmp_path / "run" / "status.json").read_text()) == {"status": "failed", "exit_code": 2}


def test_a_slurm_jobs_data_step_stops_at_once_when_asked(tmp_path):
    """SLURM's warning reaches only the batch script, which asks through the run directory's
    request file: the data step leaves at once (exit 75) instead of tokenizing on into the job's
    time limit, where SLURM would not requeue it."""
    from sala_train.launch.plan import PREEMPT_REQUEST, PREEMPTED_EXIT

    dry = run_cli("sala-train", "launcher=slurm", "launcher.dry_run=true", "backend=ddp", "launcher.nnodes=2",
                  "launcher.nproc_per_node=1", "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert_ok(dry)
    run = tmp_path / "run"
    (run / PREEMPT_REQUEST).touch()  # (the batch script clears it before the step starts)
    step = subprocess.run([sys.executable, "-m", "sala_train.runner", "--data-only", str(run)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert step.returncode == PREEMPTED_EXIT, step.stdout + step.stderr
    assert "sala-train: stopped on request while preparing the data on " in step.stdout
    assert "data ready" not in step.stdout and not (run / "status.json").exists()


@ON_LOCAL_SLURM
def test_the_default_single_backend_runs_on_slurm_as_one_plain_process(tmp_path, slurm):
    """backend=single under SLURM: the runner itself (no torchrun, no process group), so the
    distributed check finds what it asked for; a problem it meets still reaches the waiting launcher."""
    bad = run_cli("sala-train", "launcher=slurm", "launcher.wait=true", "model.from_scratch=false",
                  "hydra.run.dir=bad", *SHORT, cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("cannot load the model") == 1, bad.stdout[-2000:] + bad.stderr
    proc = run_cli("sala-train", "launcher=slurm", "launcher.wait=true", "method=full", "hydra.run.dir=run", *SHORT,
                   cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    (job_id,) = re.findall(r"submitted SLURM job (\d+)", proc.stdout)
    assert f"SLURM job {job_id} COMPLETED (exit 0)" in proc.stdout
    assert "torchrun" not in (tmp_path / "run" / "slurm" / "job.sbatch").read_text()
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "status.json").read_text()) == {"status": "completed", "exit_code": 0}


@ON_LOCAL_SLURM
def test_a_cancelled_slurm_job_checkpoints_and_stays_cancelled(tmp_path, slurm):
    """scancel's SIGTERM reached the batch script's trap as a preemption did: the job saved a
    checkpoint, then requeued itself (PENDING again, Restarts=1) although it had been cancelled."""
    run = tmp_path / "run"
    proc = run_cli("sala-train", "launcher=slurm", "hydra.run.dir=run", "train.max_steps=100000",
                   "train.save_steps=1000", "train.logging_steps=1", cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    (job_id,) = re.findall(r"submitted SLURM job (\d+)", proc.stdout)
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists() or not any(r.get("step", 0) >= 2 for r in metrics(run)):
        assert time.monotonic() < deadline, "job did not start training"
        time.sleep(0.5)
    # The same command again while the job trains: a second job in the directory trained beside the
    # first (both wrote the same checkpoints, and metrics.jsonl interleaved); refused, naming the job.
    again = run_cli("sala-train", "launcher=slurm", "hydra.run.dir=run", "train.max_steps=100000",
                    "train.save_steps=1000", "train.logging_steps=1", cwd=tmp_path)  # fmt: skip
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert f"hydra.run.dir: {run} is trained by SLURM job {job_id} (RUNNING); wait for it to end" in again.stderr
    assert "submitted" not in again.stdout
    subprocess.run(["scancel", job_id], check=True)
    while job_state(job_id) not in ("CANCELLED", "GONE", "PENDING"):
        assert time.monotonic() < deadline, "job did not end"
        time.sleep(0.5)
    time.sleep(6)  # (SLURM kills what is left after KillWait, 5 s here: a requeue would have come)
    fields = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "JobState=CANCELLED" in fields and "Restarts=0" in fields, fields
    assert "requeueing" not in (run / "slurm" / f"{job_id}.out").read_text()


@ON_LOCAL_SLURM
def test_a_job_cancelled_before_it_starts_and_a_controller_slow_to_answer(tmp_path, slurm):
    """A job cancelled while pending said `CANCELLED (exit 0)` and exited 1; one scontrol call that
    failed (a busy controller's timeout) ended launcher.wait=true with `vanished`, exit 2, while the
    job ran on. scontrol is the real one, behind a wrapper whose first two calls fail."""
    from sala_train.launch.plan import PREEMPTED_EXIT

    scontrol = shutil.which("scontrol")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(
        "#!/bin/bash\n"
        'if [ "$1" = "-o" ] && [ "$(cat "$COUNT" 2>/dev/null || echo 0)" -lt 2 ]; then\n'
        '  echo $(( $(cat "$COUNT" 2>/dev/null || echo 0) + 1 )) > "$COUNT"\n'
        '  echo "slurm_load_jobs error: Socket timed out on send/recv operation" >&2; exit 1\n'
        "fi\n"
        f'exec {scontrol} "$@"\n'
    )
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "COUNT": str(tmp_path / "count")}
    waiting = subprocess.Popen(
        [str(Path(sys.executable).parent / "sala-train"), "launcher=slurm", "launcher.wait=true",
         "launcher.extra_sbatch=['--begin=now+3600']", "hydra.run.dir=run", *SHORT],
        cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "count").exists() or (tmp_path / "count").read_text().strip() != "2":
        assert time.monotonic() < deadline and waiting.poll() is None, waiting.communicate()
        time.sleep(0.2)
    script = str(tmp_path / "run" / "slurm" / "job.sbatch")
    listed = subprocess.run(["squeue", "-h", "-o", "%i|%o"], capture_output=True, text=True).stdout.splitlines()
    (job_id,) = [line.split("|")[0] for line in listed if line.split("|", 1)[1] == script]
    subprocess.run(["scancel", job_id], check=True)
    stdout, stderr = waiting.communicate(timeout=120)
    assert waiting.returncode == PREEMPTED_EXIT, stdout + stderr
    assert f"sala-train: SLURM job {job_id} CANCELLED; submit the same command again to continue" in stdout
    assert "vanished" not in stderr and "Traceback" not in stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text()) == {"status": "preempted", "exit_code": 75}


@ON_LOCAL_SLURM
def test_a_job_the_controller_no_longer_knows_ended_as_it_recorded(tmp_path, slurm):
    """Purged between two polls (MinJobAge): the job wrote how it ended in status.json."""
    from sala_train.errors import DistributedSetupError
    from sala_train.launch.slurm import wait_for

    with pytest.raises(DistributedSetupError, match="SLURM job 999999 vanished from scontrol before finishing"):
        wait_for("999999", tmp_path)
    (tmp_path / "status.json").write_text('{"status": "completed", "exit_code": 0}')
    assert wait_for("999999", tmp_path) == 0
    os.utime(tmp_path / "status.json", (time.time() - 600, time.time() - 600))  # an earlier job's ending
    with pytest.raises(DistributedSetupError, match="vanished"):
        wait_for("999999", tmp_path)
    (tmp_path / "status.json").write_text('{"status": "submitted", "exit_code": 0}')  # requeued, then gone
    with pytest.raises(DistributedSetupError, match="vanished"):
        wait_for("999999", tmp_path)


@ON_LOCAL_SLURM
def test_slurm_preempted_job_requeues_and_resumes(tmp_path, slurm):
    """Under train.resume=never too (checked at submission): the requeued job read it as written
    and trained from its first step again, on every requeue."""
    run = tmp_path / "run"
    proc = run_cli("sala-train", "launcher=slurm", "launcher.nnodes=2", "launcher.nproc_per_node=1",
                   "backend=ddp", "hydra.run.dir=run", "train.resume=never", "train.max_steps=24",
                   "train.save_steps=12", "train.eval_steps=12", "train.logging_steps=1", cwd=tmp_path)  # fmt: skip
    assert_ok(proc)  # returns after submission
    (job_id,) = re.findall(r"submitted SLURM job (\d+)", proc.stdout)
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists() or not any(r.get("step", 0) >= 3 for r in metrics(run)):
        assert time.monotonic() < deadline, "job did not start training"
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)  # SLURM's warning
    released, pending_since = False, None
    while (state := job_state(job_id)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        assert time.monotonic() < deadline + 240, "job did not finish"
        if state == "PENDING" and pending_since is None:
            pending_since = time.monotonic()
        if pending_since is not None and not released and time.monotonic() - pending_since >= 2:
            # SLURM holds a requeued job for AuthInfo's cred_expire (120 s) before it may start again;
            # an operator may let it start now. That wait is SLURM's policy, not what is tested here.
            # Not in the second of the requeue, though: slurmd compares its credential revocation
            # with the new credential's time in whole seconds and would refuse a start that soon.
            update = ["scontrol", "update", f"JobId={job_id}", "StartTime=now"]
            released = subprocess.run(update, capture_output=True).returncode == 0
        time.sleep(0.5)
    assert job_state(job_id) in ("COMPLETED", "GONE")
    log = (run / "slurm" / f"{job_id}.out").read_text()
    (saved,) = re.findall(r"preempted; checkpoint-(\d+) saved", log)
    assert f"requeueing job {job_id}" in log
    assert f"resuming from {run}/checkpoint-{saved}" in log
    assert sorted(train_losses(run)) == list(range(1, 25))  # every step once, none lost or repeated
    assert (run / "final" / "adapter_model.safetensors").is_file()
    # The command returned at submission ("submitted"); the job itself says how it ended.
    assert json.loads((run / "status.json").read_text()) == {"status": "completed", "exit_code": 0}
