"""When a run stops on a loss that is no longer a number."""

from __future__ import annotations

from transformers import TrainerControl

from sala_train.divergence import StopWhenDiverged


def test_training_stops_at_the_second_non_finite_loss_in_a_row():
    """One inf loss can be an fp16 overflow whose step the scaler skips: training goes on. Two in
    a row (NaN weights) stop it; eval logs do not count either way."""
    callback, control = StopWhenDiverged(), TrainerControl()
    for logs in (
        {"loss": 2.0},
        {"loss": float("inf")},
        {"eval_loss": float("nan")},
        {"loss": 1.9},
        {"loss": float("nan")},
    ):
        callback.on_log(None, None, control, logs=logs)
        assert not control.should_training_stop, logs
    callback.on_log(None, None, control, logs={"loss": float("nan")})
    assert control.should_training_stop


def test_the_last_step_is_logged_whatever_logging_steps_says(tmp_path):
    """The Trainer logs every logging_steps only: steps 5-6 of 6 at logging_steps=4 were never
    logged, so a loss gone NaN there went unseen, and metrics.jsonl and loss.png ended at step 4."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    from tests.conftest import TINY_CHAT

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    rows = [{"input_ids": list(range(1, 17)), "labels": list(range(1, 17))} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, logging_steps=4, per_device_train_batch_size=2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[StopWhenDiverged()])
    trainer.train()
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [4, 6]


def test_weights_finite_looks_at_the_trained_weights():
    """Frozen weights never change (a LoRA base): a NaN there is not the run's; a trained one's is."""
    import torch

    from sala_train.divergence import weights_finite

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert weights_finite(model)
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    assert weights_finite(model)
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            model[1].bias[1] = bad
        assert not weights_finite(model)


def _zero3_worker(rank: int, init_file: str, out_dir: str) -> None:
    import json
    import os
    from pathlib import Path

    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    import deepspeed

    from sala_train.backends import skip_unused_deepspeed_kernels
    from sala_train.config.schema import Zero3Backend
    from sala_train.divergence import weights_finite

    skip_unused_deepspeed_kernels(Zero3Backend())  # as the runner does (a fresh machine compiled it: 60 s)

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    param, bias = engine.module[0].weight, engine.module[1].bias
    seen = [param.numel(), param.ds_tensor.numel(), bias.ds_tensor.numel(), weights_finite(engine.module)]
    if rank == 1:  # 3 elements in partitions of 2: rank 1 holds the last one and a padding slot
        bias.ds_tensor.data[1] = float("nan")  # (never written by DeepSpeed: not a weight)
    seen.append(weights_finite(engine.module))
    if rank == 1:  # only this rank's partition of the weight goes NaN
        param.ds_tensor.data[0] = float("nan")
    seen.append(weights_finite(engine.module))
    Path(out_dir, f"{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    # Leave without tearing down DeepSpeed's and gloo's objects: once in CI a spawned rank's C++
    # teardown aborted ("terminate called without an active exception") after its answers were
    # written. (The runner's own exit is tested by every distributed run.)
    os._exit(0)


def test_weights_finite_reads_each_ranks_zero3_partition_and_agrees_across_ranks(tmp_path):
    """Under ZeRO-3 a rank's full parameter is empty and it holds a partition: a NaN in rank 1's
    partition makes both ranks answer False (each checkpoint is then set aside on all of them). The
    padding that evens out a partition holds whatever its memory held: not read."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_zero3_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert seen == [[0, 64, 2, True, True, False], [0, 64, 2, True, True, False]]
