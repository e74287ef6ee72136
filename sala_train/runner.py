"""Per-rank entry point: ``python -m sala_train.runner RUN_DIR`` (directly or under torchrun).

Reads only ``RUN_DIR/config.yaml`` (no Hydra here: ranks never re-compose) and runs the recipe
top to bottom: tokenizer, data, model, method, trainer, train, evaluate, save ``final/``.
Exit codes: 0 success, 2 config/data/setup problem (one message), 75 checkpointed after a
preemption request, anything else a training failure.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sala_train.atomic import readable_weights
from sala_train.config import io
from sala_train.config.schema import RunConfig, SingleBackend
from sala_train.console import draws_on_a_terminal, say
from sala_train.errors import USER_ERROR_EXIT, USER_ERRORS, DataError, first_line, os_error_in_chain, render, report
from sala_train.launch.plan import RECORD_PROBLEMS_ENV, RUNNER_STOP_SIGNALS, USER_ERROR_MARKER, stop_at_once
from sala_train.process_exit import exit_without_teardown
from sala_train.ranks import is_main_process

FINAL_DIR = "final"
DIVERGED_EXIT = 1  # a failed run (status failed), not bad input


def resume_checkpoint(cfg: RunConfig, run_dir: Path) -> Path | None:
    from sala_train.checkpoints import complete_checkpoints, continue_from, effective_resume

    resume = effective_resume(cfg.train.resume, run_dir)
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    return continue_from(run_dir, Path(resume))


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported
    logging.getLogger("transformers").setLevel(logging.WARNING)
    if not draws_on_a_terminal(sys.stderr):
        # Off a terminal (a pipe, a SLURM log) a tqdm bar is one line of carriage returns per save;
        # sala_train.progress writes plain lines there instead, and the bars go.
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        disable_progress_bars()
        transformers_logging.disable_progress_bar()
    # DeepSpeed's ZeRO calls collectives torch 2.13 renamed; torch warns on every call (its filter
    # state is reset often enough that Python's once-per-place rule does not hold), 75 lines in a
    # 4-step ZeRO-3 run. Nothing a user can act on, and it buries the progress lines.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # The same for transformers' own rename, which TRL's and DeepSpeed's code paths call on every step.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # (TRL's DPO and KTO turn checkpointing off and on around the reference's forward, every step)
    warnings.filterwarnings(
        "ignore", message=r"`gradient_checkpointing_(enable|disable)` is deprecated", category=FutureWarning
    )
    # peft, twice at every save of an adapter on lm_head or the embeddings: it saves their full
    # weights along with the adapter, as the README says.
    warnings.filterwarnings("ignore", message=r"Setting `save_embedding_layers` to `True`", category=UserWarning)
    # accelerate, at every DeepSpeed start: "Gradient accumulation steps mismatch:
    # GradientAccumulationPlugin has 1, DeepSpeed config has 4. Using DeepSpeed's value." The 1 is the
    # Trainer's own (it accumulates itself, and gives accelerate 1); DeepSpeed's is
    # train.gradient_accumulation_steps, as backends.py writes it. A mismatch that is none.
    # transformers, resuming a checkpoint whose recorded best checkpoint is gone: sala-train takes
    # the best again from the checkpoints kept, and says so itself (sala_train.best_checkpoint).
    logging.getLogger("transformers.trainer").addFilter(
        lambda record: "recorded in the resumed state does not exist anymore" not in record.getMessage()
    )
    logging.getLogger("accelerate.accelerator").addFilter(
        lambda record: (
            "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1," not in record.getMessage()
        )
    )


def _quiet_the_tied_head_on_resume(model: Any) -> None:
    """A checkpoint of a model whose output head shares the input embeddings stores the tensor
    once, so resuming, the Trainer warns "There were missing keys in the checkpoint model loaded:
    ['lm_head.weight']" (transformers 5 no longer lists such keys in ``_keys_to_ignore_on_save``).
    The head is the same Parameter as the embeddings, loaded with them (resume is bit-exact), so
    exactly that message, for exactly the tied head, is dropped."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return
    names = [f"{name}.weight" for name, module in model.named_modules() if module is head]
    expected = f"There were missing keys in the checkpoint model loaded: {names}."
    logging.getLogger("transformers.trainer").addFilter(lambda record: record.getMessage() != expected)


def _warn_of_unpinned_remote_code(model_cfg: Any) -> None:
    """A hub model whose code runs here (trust_remote_code) with no model.revision: its code and
    weights are whatever the hub's main is now, and once main moves a resume or export finds
    other files (and refuses them). Said with the commit this run uses, to pin it."""
    from sala_train.base_weights import model_directory

    if not model_cfg.trust_remote_code or model_cfg.revision or not is_main_process():
        return
    directory = model_directory(model_cfg)
    if directory is None or Path(model_cfg.name_or_path).expanduser().is_dir():
        return  # (a local directory is its own files)
    commit = directory.name if directory.parent.name == "snapshots" else None
    pin = f"model.revision={commit}" if commit else "model.revision=<commit>"
    say(f"sala-train: WARNING: model.name_or_path={model_cfg.name_or_path} runs its own code (trust_remote_code) and "
        f"model.revision is not set: a later resume, export or rerun takes the hub's main as it is then; pin {pin}, "
        "the commit this run uses", sys.stderr)  # fmt: skip


def _say_what_trains(model: Any) -> None:
    """The trained share of the parameters, as peft's print_trainable_parameters gives it (a dry
    run estimates it before loading; this is the model that trains)."""
    if not is_main_process():
        return
    # (ZeRO-3 loading leaves each parameter an empty shard; ds_numel is its whole size)
    sizes = [(getattr(p, "ds_numel", None) or p.numel(), p.requires_grad) for p in model.parameters()]
    total, trained = sum(n for n, _ in sizes), sum(n for n, grad in sizes if grad)
    say(f"sala-train: training {trained:,} of {total:,} parameters ({100 * trained / max(total, 1):.2f}%)")


@dataclass
class Prepared:
    """Everything ``train`` runs with; benchmarks build exactly this too."""

    cfg: RunConfig
    trainer: Any
    tokenizer: Any
    preemption: Any
    publisher: Any  # (its diverged_at: the step whose weights were not finite, where training stopped)
    best: Any  # (sala_train.best_checkpoint.BestCheckpoint: its stopped_early, what to say when it did)
    test_set: Any = None  # dataset.test tokenized, when given: evaluated once on the final weights


def prepare(
    cfg: RunConfig,
    run_dir: Path,
    callbacks: list[Any] | None = None,
    raw: Any = None,
    resuming: Path | None = None,
) -> Prepared:
    """Checks, tokenizer, data, model, method, packing guard and Trainer, in that order (data and
    config problems surface before the model loads). ``raw``: the data files, when read already;
    ``resuming``: the checkpoint the run resumes from, whose training data must be this data."""
    quiet_libraries()

    from transformers import set_seed

    from sala_train import attention
    from sala_train.arguments import mixed_precision_dtype
    from sala_train.backends import fsdp_layer_classes, skip_unused_deepspeed_kernels
    from sala_train.best_checkpoint import BestCheckpoint, from_another_run
    from sala_train.checkpoints import (
        checkpoint_step,
        refuse_other_training_data,
        started_from_another_run_at,
        training_data_signature,
    )
    from sala_train.distributed import check_setup, fail_together
    from sala_train.divergence import StopWhenDiverged
    from sala_train.errors import ModelLoadError
    from sala_train.launch.plan import PREEMPT_REQUEST
    from sala_train.methods import apply_method
    from sala_train.models import load_model
    from sala_train.packing_guard import guard_callback, guard_packing, runs_once_deepspeed_holds_the_model
    from sala_train.preemption import PreemptionCallback, StoppedWhileStarting
    from sala_train.preflight import check_and_build_data
    from sala_train.publisher import CheckpointPublisher
    from sala_train.stages import build_trainer
    from sala_train.stages.inputs import TrainerInputs
    from sala_train.zero3_loading import in_training_dtype, partitioned_loading

    set_seed(cfg.train.seed)
    skip_unused_deepspeed_kernels(cfg.backend)
    tokenizer, data = check_and_build_data(cfg, raw)  # data problems surface before the model loads
    trained = data.stats.get("train")
    train_data = None if trained is None else training_data_signature(trained.lengths, trained.content_sha256)
    if resuming is not None and train_data is not None:
        refuse_other_training_data(resuming, train_data)
    asked = bool(_early_stop) or (run_dir / PREEMPT_REQUEST).exists()  # (the file: a SLURM batch script's ask)
    if asked and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Asked to stop while the data was prepared: not worth loading the model for. (Several
        # ranks stop together, once all are ready to agree: see PreemptionCallback.asked_before_training.)
        raise StoppedWhileStarting
    with partitioned_loading(cfg, run_dir) as partitioned:  # (ZeRO-3: until the Trainer holds its own config)
        if partitioned:
            model = fail_together(lambda: load_model(cfg.model, seed=cfg.train.seed), ModelLoadError)
            _say_partitioned(model)
        else:
            model = load_model(cfg.model, seed=cfg.train.seed)
        attention.check_precision(cfg.model, cfg.train, model)
        _warn_of_unpinned_remote_code(cfg.model)
        _stop_generating_at_reply_end(cfg, model, tokenizer)
        model.config.use_cache = False  # no KV cache while training (with one, packed samples would mix)
        no_split = fsdp_layer_classes(cfg.backend, model)
        model = apply_method(cfg.method, model, cfg.model, cfg.train.gradient_checkpointing)
        _say_what_trains(model)
        if partitioned:
            in_training_dtype(model, mixed_precision_dtype(cfg))
        _warn_of_16_bit_weights_without_a_master_copy(cfg, model)
        deferred_guard = runs_once_deepspeed_holds_the_model(cfg)
        if cfg.train.packing and not deferred_guard:
            guard_packing(cfg, model, tokenizer, data)
        preemption = PreemptionCallback(run_dir)
        preemption.signalled = preemption.signalled or bool(_early_stop)  # asked while starting up
        publisher = CheckpointPublisher(run_dir, cfg.train.save_total_limit, train_data,
                                        keep_best=cfg.train.load_best_model_at_end)  # fmt: skip
        t = cfg.train
        another = from_another_run(resuming, run_dir)
        history_after = checkpoint_step(resuming) if another and resuming else started_from_another_run_at(run_dir)
        best = BestCheckpoint(run_dir, another, t.load_best_model_at_end, t.early_stopping_patience,
                              t.metric_for_best_model, history_after)  # fmt: skip
        callbacks = [preemption, publisher, StopWhenDiverged(), best, *(callbacks or [])]
        if deferred_guard:  # (first: before a tracker starts, or an evaluation on start)
            callbacks.insert(0, guard_callback(cfg, tokenizer, data))
        trainer = build_trainer(TrainerInputs(cfg, model, tokenizer, data, run_dir, no_split, callbacks))
    _quiet_the_tied_head_on_resume(model)
    check_setup(cfg, trainer)
    return Prepared(cfg, trainer, tokenizer, preemption, publisher, best, data.splits.get("test"))


def _base_weights_as_started(cfg: RunConfig, run_dir: Path, checkpoint: Path | None) -> None:
    """A resume must find the base model's weights as the checkpoint's run recorded them when it
    started; a run records them when it starts (or first resumes without a record)."""
    from sala_train.base_weights import BASE_WEIGHTS_FILE, check_unchanged, record
    from sala_train.checkpoints import run_record

    if checkpoint is not None:
        check_unchanged(cfg.model, run_record(checkpoint, BASE_WEIGHTS_FILE), "resuming would go on from another "
                        "base model; put the run's base model back, or start a new run (another hydra.run.dir)",
                        cfg.train.seed if _resumes_on_the_base(cfg) else None)  # fmt: skip
    if is_main_process() and (checkpoint is None or not (run_dir / BASE_WEIGHTS_FILE).exists()):
        record(cfg.model, run_dir, cfg.train.seed)


def _resumes_on_the_base(cfg: RunConfig) -> bool:
    """Whether a resume uses the base model's own values again: a LoRA run's frozen base, a full
    DPO/KTO run's reference model; a full fine-tune's checkpoint holds every weight it trains on."""
    from sala_train.config.schema import DpoStage, KtoStage, LoraMethod

    return isinstance(cfg.method, LoraMethod) or isinstance(cfg.stage, DpoStage | KtoStage)


def _stop_generating_at_reply_end(cfg: RunConfig, model: Any, tokenizer: Any) -> None:
    """A run on chat data trains the model to end replies with its template's end-of-turn token:
    the model saved must stop generating there (``stop_where_trained_replies_end``)."""
    from sala_train.config.schema import LoraMethod

    added = stop_where_trained_replies_end(cfg, model, tokenizer, "sala-train")
    if added is not None and is_main_process():
        where = "sala-export's model" if isinstance(cfg.method, LoraMethod) else "final/"
        say(f"sala-train: generation will stop at {added} too, which the chat template ends replies with (the "
            f"base model's generation config did not stop there): in {where} generation_config.json")  # fmt: skip


def stop_where_trained_replies_end(cfg: RunConfig, model: Any, tokenizer: Any, program: str) -> str | None:
    """``models.stop_at_reply_end`` for a run whose data goes through the chat template (the token
    added, or None); a template that refuses the probes is warned of (``program``: who says it)."""
    from sala_train.data.chat import TemplateError
    from sala_train.models import stop_at_reply_end

    if not trains_chat_turns(cfg):
        return None
    try:
        return stop_at_reply_end(model, tokenizer)
    except TemplateError as exc:  # (the data rendered, so its conversations differ from the probes)
        if is_main_process():
            say(f"{program}: WARNING: could not tell which token the chat template ends replies with ({exc}); check "
                "that the saved generation_config.json's eos_token_id lists it", sys.stderr)  # fmt: skip
        return None


def trains_chat_turns(cfg: RunConfig) -> bool:
    """Whether the run's data goes through the chat template: every stage but pre-training, and
    pre-training on chat formats (its documents are conversations the template renders)."""
    from sala_train.config.schema import DatasetFormat, PretrainStage

    formats = {cfg.dataset.format, *(source.format for source in cfg.dataset.mixed)}
    return not isinstance(cfg.stage, PretrainStage) or formats != {DatasetFormat.TEXT}


def _say_partitioned(model: Any) -> None:
    """What zero.Init left each process: a measured share, so a load that was not partitioned shows."""
    from sala_train.zero3_loading import held_share

    held, whole = held_share(model)
    if not is_main_process():
        return
    if not whole:
        say("sala-train: ZeRO-3 loaded the model whole (transformers does not partition this checkpoint as it loads); "
            "DeepSpeed partitions it as training starts")  # fmt: skip
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    say(f"sala-train: loaded partitioned under ZeRO-3 (zero.Init) across {world} process(es): rank 0 holds "
        f"{held:,} of the model's {whole:,} parameters")  # fmt: skip


def _warn_of_16_bit_weights_without_a_master_copy(cfg: RunConfig, model: Any) -> None:
    """Full fine-tuning of 16-bit weights outside DeepSpeed (which keeps a float32 master copy)
    trains the 16-bit weights themselves: an update below their resolution (1/256 of the weight in
    bfloat16) is lost, so most small steps change nothing. Said, not refused: it halves the memory
    of the weights, and some choose it knowingly."""
    import torch

    from sala_train.config.schema import FsdpBackend, FullMethod, Zero2Backend, Zero3Backend

    if not isinstance(cfg.method, FullMethod) or isinstance(cfg.backend, Zero2Backend | Zero3Backend):
        return
    if isinstance(cfg.backend, FsdpBackend) and (cfg.train.bf16 or cfg.train.fp16):
        return  # (accelerate upcasts FSDP's trained weights to float32 under mixed precision)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    half = sorted(str(d).removeprefix("torch.") for d in dtypes & {torch.bfloat16, torch.float16})
    if half and is_main_process():
        say(f"sala-train: WARNING: method=full on backend={cfg.backend.name} trains the {'/'.join(half)} weights "
            "themselves, with no float32 master copy: updates smaller than their resolution are lost. For float32 "
            "weights with 16-bit compute set model.dtype=float32 train.bf16=true; backend=zero2 or zero3 keeps a "
            "float32 master copy of 16-bit weights, and fsdp under train.bf16/fp16.")  # fmt: skip


def train(run_dir: Path) -> int:
    cfg = io.load(RunConfig, run_dir)
    if isinstance(cfg.backend, SingleBackend):
        from sala_train.distributed import one_gpu_for_one_process

        one_gpu_for_one_process()
    _record_status(run_dir, None)
    from sala_train.preflight import read_data_files
    from sala_train.trackers import check_tracker_folder

    check_tracker_folder(cfg, run_dir)  # (a SLURM job's: its launcher does not check where the job runs)
    raw = read_data_files(cfg)  # before the imports below: a bad record is reported seconds sooner

    from sala_train.best_checkpoint import load_best
    from sala_train.checkpoints import (
        checkpoint_step,
        refuse_what_cannot_resume,
        remove_incomplete,
        set_aside_damaged,
        start_from,
    )
    from sala_train.distributed import check_replicas_identical
    from sala_train.divergence import diverged, not_finite_from_the_start
    from sala_train.launch.plan import PREEMPTED_EXIT
    from sala_train.metrics import read_metrics, truncate_metrics_after
    from sala_train.plots import plot_losses
    from sala_train.preemption import StoppedWhileStarting
    from sala_train.progress import ProgressCallback
    from sala_train.trackers import finish_trackers, tracker_callbacks

    progress = ProgressCallback(interactive=draws_on_a_terminal(sys.stderr))
    # Only published checkpoints count, so removing unpublished ones below leaves this choice as it is.
    checkpoint = resume_checkpoint(cfg, run_dir)
    if checkpoint is not None:
        refuse_what_cannot_resume(checkpoint, cfg.backend, int(os.environ.get("WORLD_SIZE", "1")))
    _base_weights_as_started(cfg, run_dir, checkpoint)
    try:
        prepared = prepare(cfg, run_dir, [progress], raw, resuming=checkpoint)
    except StoppedWhileStarting:
        return _stopped_before_training(run_dir, checkpoint, is_main=True)
    trainer, tokenizer, preemption = prepared.trainer, prepared.tokenizer, prepared.preemption
    if preemption.asked_before_training(trainer.args):
        # Recorded, and the stop signals ignored, before the ranks part: once one has exited 75,
        # torchrun signals the others, which must still exit 75 with the run's status written.
        stopped = _stopped_before_training(run_dir, checkpoint, trainer.is_world_process_zero())
        trainer.accelerator.wait_for_everyone()
        return stopped
    # Trackers start once data and model passed their checks: a refused run leaves no W&B run.
    for tracker in tracker_callbacks(cfg, run_dir, is_main_process(), checkpoint_step(checkpoint) if checkpoint else 0):
        trainer.add_callback(tracker)

    if trainer.is_world_process_zero():
        for partial in remove_incomplete(run_dir):
            say(f"sala-train: removed {partial.name}, left incomplete by an interrupted save")
        for damaged in set_aside_damaged(run_dir):
            say(f"sala-train: WARNING: set aside {damaged.name}: its files no longer match what was saved "
                "(damaged after saving); not resumed from", sys.stderr)  # fmt: skip
        if (
            checkpoint is not None
            and cfg.train.resume not in ("auto", "never")
            and checkpoint == Path(cfg.train.resume)
        ):
            for moved in start_from(run_dir, checkpoint):
                say(f"sala-train: set aside {moved.name}: past {checkpoint.name}, from the training this run replaces")
    if checkpoint is not None:
        if trainer.is_world_process_zero():
            say(f"sala-train: resuming from {checkpoint}")
        trainer.args.eval_on_start = False  # the starting point was evaluated in the first run
    if trainer.is_world_process_zero():
        # Events past the checkpoint (or all of them, when starting over) are logged again.
        truncate_metrics_after(run_dir, checkpoint_step(checkpoint) if checkpoint else -1)
    trained = _train(trainer, checkpoint, prepared.best)
    if prepared.best.stopped_early and trainer.is_world_process_zero():
        say(f"sala-train: {prepared.best.stopped_early}")
    weights_diverged = prepared.publisher.diverged_at
    if preemption.preempted and weights_diverged is None:
        preemption.mark(trainer.is_world_process_zero())
        if trainer.is_world_process_zero():
            finish_trackers(cfg, PREEMPTED_EXIT)
            say(f"sala-train: preempted; checkpoint-{trainer.state.global_step} saved")
        trainer.accelerator.wait_for_everyone()
        # Every rank is done: the SIGTERM torchrun sends the others once the first has exited 75
        # must not turn their 75 into 143 ("killed by SIGTERM") while they shut down.
        _ignore_stop_signals()
        return PREEMPTED_EXIT
    check_replicas_identical(cfg, trainer.model)
    step = trainer.state.global_step
    # Always end with an eval of the final weights, once: the Trainer (5.x) evaluates a last step
    # off the eval_steps grid itself (its log history, the same on every rank, says so), and a
    # rerun that had nothing left to train finds it in metrics.jsonl.
    evaluated = any("eval_loss" in entry and entry.get("step") == step for entry in trainer.state.log_history) or (
        not trained and any(r.get("event") == "eval" and r.get("step") == step for r in read_metrics(run_dir))
    )
    if not evaluated and weights_diverged is None:  # (NaN weights: nothing to learn, and a stop's grace runs)
        trainer.evaluate()
    divergence = diverged(trainer.state.log_history)
    if weights_diverged is not None:  # (whatever the losses show: a weight no batch reached, say)
        divergence = f"the trained weights are not finite at step {weights_diverged}"
        if trainer.is_world_process_zero():
            preemption.withdraw()  # a stop request at that save: the run failed, it is not requeued
    if divergence is not None:
        # No final/ from NaN weights, and a failed status: a sweep or an Optuna search must not
        # rank this run by an eval loss from before it diverged.
        if trainer.is_world_process_zero():
            plot_losses(run_dir)
            finish_trackers(cfg, DIVERGED_EXIT)
            stopped = f"; stopped at step {step} of {trainer.state.max_steps}" if step < trainer.state.max_steps else ""
            clipping = (f"lower train.max_grad_norm (now {cfg.train.max_grad_norm:g})" if cfg.train.max_grad_norm
                        else "set train.max_grad_norm (gradient clipping is off)")  # fmt: skip
            start = not_finite_from_the_start(trainer.state.log_history)
            advice = (f"{start}: the model as loaded computes it, whatever the learning rate; check its weights, "
                      "and train.bf16 / train.fp16 against the dtype it was trained in" if start
                      else f"lower train.learning_rate, or {clipping}")  # fmt: skip
            say(f"sala-train: training diverged: {divergence}{stopped}; final/ not saved ({advice})", sys.stderr)
        trainer.accelerator.wait_for_everyone()
        return DIVERGED_EXIT
    if cfg.train.load_best_model_at_end:
        chosen = load_best(trainer, run_dir, cfg.train.metric_for_best_model)
        if trainer.is_world_process_zero():
            say(f"sala-train: {chosen}")
    save_final(trainer, tokenizer, run_dir / FINAL_DIR)
    if prepared.test_set is not None:
        evaluate_test_set(trainer, prepared.test_set, run_dir, trained)
    if trainer.is_world_process_zero():
        plot_losses(run_dir)
        finish_trackers(cfg)
        say(f"sala-train: saved {run_dir / FINAL_DIR}")
    # No rank may tear down the process group while another still uses it (gloo aborts).
    trainer.accelerator.wait_for_everyone()
    return 0


def prepare_data(run_dir: Path) -> int:
    """``--data-only``: the data checked and tokenized into the ``datasets`` cache, and nothing
    else. A SLURM job of several processes runs it once per node before torchrun starts the node's
    ranks (on one machine the launcher does it; a login node may lack the model's files or the time
    to tokenize): the ranks then read the cache instead of each tokenizing the same data at once,
    and a data problem stops the job before any rank loads a model."""
    import threading

    from sala_train.distributed import node_name
    from sala_train.preflight import check_and_build_data

    node = node_name()
    watch = threading.Thread(target=_stop_when_asked, args=(run_dir, node), name="stop-watch", daemon=True)
    watch.start()
    quiet_libraries()
    _, data = check_and_build_data(io.load(RunConfig, run_dir), quiet=True)  # (rank 0 gives the warnings)
    sizes = ", ".join(f"{len(split):,} {name}" for name, split in data.splits.items())
    say(f"sala-train: data ready on {node} ({sizes} samples)")
    return 0


def _stop_when_asked(run_dir: Path, node: str) -> None:
    """A stop asked for while the data step runs (SLURM's warning reaches only the batch
    script, which asks through the run directory's request file, as it asks the ranks): leave at
    once, nothing is lost (the datasets cache keeps only complete files), so a long tokenization
    cannot run the job into its time limit with no requeue."""
    from sala_train.launch.plan import PREEMPT_REQUEST, PREEMPTED_EXIT

    request = run_dir / PREEMPT_REQUEST
    while not request.exists():
        time.sleep(1)
    say(f"sala-train: stopped on request while preparing the data on {node}")  # (one unbuffered write)
    os._exit(PREEMPTED_EXIT)


def evaluate_test_set(trainer: Any, test_set: Any, run_dir: Path, trained: bool) -> None:
    """``dataset.test`` once, on the final weights (after ``final/`` is saved: a failure here
    costs no model), logged as a ``test`` event. Never during training, and nothing ranks or
    selects by it (sweeps and Optuna use the validation loss), so it stays an unbiased estimate.
    A rerun that had nothing left to train evaluates it again in place of the figure it finds
    (whose test set may have been another: ``train.resume=PATH`` may change ``dataset.test``)."""
    from sala_train.metrics import drop_events

    if not trained and trainer.is_world_process_zero():
        drop_events(run_dir, "test", trainer.state.global_step)
    trainer.evaluate(eval_dataset=test_set, metric_key_prefix="test")


def _stopped_before_training(run_dir: Path, checkpoint: Path | None, is_main: bool) -> int:
    """End a run asked to stop before its first step: preempted (exit 75, requeued under SLURM),
    with nothing trained and no checkpoint written."""
    from sala_train.launch.plan import PREEMPTED_EXIT
    from sala_train.preemption import record_honoured

    if is_main:
        record_honoured(run_dir)
        again = f"resumes it from {checkpoint.name}" if checkpoint else "starts it"
        say(f"sala-train: stopped as asked, before the first step: nothing trained, no checkpoint saved; "
            f"the same command again {again}")  # fmt: skip
    _ignore_stop_signals()  # (as a preempted run's: the other ranks' exit is 75, not torchrun's SIGTERM)
    return PREEMPTED_EXIT


def _ignore_stop_signals() -> None:
    import signal

    for sig in RUNNER_STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class _AlreadyAtMaxSteps(Exception):
    pass


def _train(trainer: Any, checkpoint: Path | None, best: Any = None) -> bool:
    """Train from ``checkpoint``; False when it was already at the last step (nothing trained)."""
    from transformers import TrainerCallback

    class StopAtMaxSteps(TrainerCallback):  # type: ignore[misc]
        """Resuming from a checkpoint at the last step (a run stopped while saving ``final/``),
        the Trainer would take one more step before checking its limit: stop once it is loaded."""

        def __init__(self) -> None:
            self.loaded = False  # the checkpoint's states are all loaded once the first step begins

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise _AlreadyAtMaxSteps
            if best is not None and best.stopped_already:  # (raised here, last: every other callback has begun)
                raise StoppedEarlyAlready

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not self.loaded and checkpoint is not None and not weights_finite(kwargs["model"]):
                # (a published checkpoint's trained weights were finite when saved: bytes changed
                # in place since, a NaN pattern among them, would train on as a "divergence")
                raise _DamagedWeights
            self.loaded = True

    from sala_train.best_checkpoint import StoppedEarlyAlready
    from sala_train.divergence import weights_finite

    stop = StopAtMaxSteps()
    trainer.add_callback(stop)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except _AlreadyAtMaxSteps:
        if trainer.is_world_process_zero():
            say(f"sala-train: {checkpoint} is at step {trainer.state.global_step}, the last; nothing left to train")
        return False
    except StoppedEarlyAlready:
        if trainer.is_world_process_zero():
            say(f"sala-train: {checkpoint} is where training stopped early (train.early_stopping_patience); "
                "nothing left to train")  # fmt: skip
        return False
    except Exception as exc:
        if checkpoint is None or stop.loaded or not _damaged_file(exc):
            raise
        # Published checkpoints are complete (their manifest checks every file's size); bytes
        # changed in place (a failing disk) are found only here, as torch's or safetensors' error,
        # or as trained weights that are no longer finite.
        why = "its trained weights hold NaN or inf, which they did not when saved" if isinstance(
            exc, _DamagedWeights) else first_line(exc)  # fmt: skip
        why = why.split(". ")[0] if len(why) > 120 else why  # (torch's goes on about weights_only)
        raise DataError(
            f"train.resume: {checkpoint} cannot be loaded, a file in it is damaged or unreadable ({why}); set it "
            f"aside (mv {checkpoint} {checkpoint.parent / ('damaged-' + checkpoint.name)}) to resume from the "
            "checkpoint before it, or name one with train.resume=PATH"
        ) from exc
    finally:
        trainer.remove_callback(stop)
    return True


class _DamagedWeights(Exception):
    """A resumed checkpoint's trained weights are not all finite once loaded."""


def _damaged_file(exc: BaseException) -> bool:
    """Whether loading a checkpoint failed on a file's contents (not on memory, devices, ...)."""
    import json
    import pickle

    from safetensors import SafetensorError

    if isinstance(exc, _DamagedWeights | SafetensorError | pickle.UnpicklingError | json.JSONDecodeError | EOFError):
        return True
    words = ("PytorchStreamReader", "legacy .tar format", "invalid load key", "unexpected EOF")
    return isinstance(exc, RuntimeError) and any(word in str(exc) for word in words)


# final/ once this process has begun writing it (a failed write leaves it incomplete).
_final_started: list[Path] = []


def save_final(trainer: Any, tokenizer: Any, out: Path) -> None:
    """The whole model (or complete adapter) plus tokenizer, whatever the backend sharded."""
    _final_started.append(out)
    if getattr(trainer, "is_fsdp_enabled", False):
        # Checkpoints stay sharded (fast, resumable); final/ must load without FSDP.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    # Training runs without a KV cache (packed samples would mix); the saved model generates with one.
    config = getattr(trainer.model, "config", None)
    cached = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = True
    try:
        trainer.save_model(str(out))
    finally:
        if config is not None:
            config.use_cache = cached
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        _drop_helper_adapters(trainer.accelerator.unwrap_model(trainer.model), out)
        readable_weights(out)
    _final_started.clear()  # complete: a later failure (the test set, the plot) must not remove it


def _drop_helper_adapters(model: Any, out: Path) -> None:
    """final/ holds the trained adapter alone: peft saves every adapter the model carries, and TRL's
    DPO/KTO add ``ref`` (the frozen starting adapter, its reference model) beside it, which doubled
    the adapter's size on disk and is rebuilt by TRL whenever it is needed."""
    import shutil

    adapters = getattr(model, "peft_config", None)
    if not isinstance(adapters, dict):
        return
    active = getattr(model, "active_adapters", None)
    active = set((active() if callable(active) else active) or [])  # (a method on transformers' own models)
    for name in adapters:
        if name not in active and (out / name / "adapter_config.json").is_file():
            shutil.rmtree(out / name)


# Less than this left under the run directory after a failed write means the disk is full.
FULL_DISK_BYTES = 1 << 20
# No room to write: a full disk, a quota reached (statvfs still shows free space), a file past
# the file-size limit (``ulimit -f``; Python ignores SIGXFSZ, so the write fails with EFBIG).
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# torch.save's errno-less RuntimeError, safetensors' SafetensorError naming the OS error.
_NO_ROOM_WORDS = ("os error 28", "os error 122", "os error 27", "unexpected pos", "file write failed")


def _full_disk(run_dir: Path, exc: BaseException) -> bool:
    """Whether training failed because there is no room to write under the run directory.

    An OSError says so with its errno somewhere in the exception chain, but torch.save reports a
    full disk as a RuntimeError without one ("unexpected pos"), and safetensors as its own
    SafetensorError, so the disk is asked too: its free space, a write of a MiB (a quota), and the
    file-size limit.
    """
    from safetensors import SafetensorError

    if not isinstance(exc, OSError | RuntimeError | SafetensorError):
        return False  # (any other error, on a disk that happens to be nearly full, is not the disk's)
    if os_error_in_chain(exc, NO_ROOM) is not None:
        return True
    if not isinstance(exc, OSError) and not any(word in str(exc).lower() for word in _NO_ROOM_WORDS):
        return False  # (a RuntimeError of the model's own, on a disk with room)
    import resource
    import shutil

    try:
        if shutil.disk_usage(run_dir).free < FULL_DISK_BYTES:
            return True
    except OSError:
        return False
    if isinstance(exc, OSError):
        return False  # (its errno says what it was, and it was not this)
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return True  # (a write failed as no more room would, under a file-size limit)
    probe = run_dir / f".sala-room-{os.getpid()}"
    try:
        with probe.open("wb") as fh:
            fh.write(b"\0" * FULL_DISK_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as probed:
        return probed.errno in NO_ROOM
    finally:
        probe.unlink(missing_ok=True)
    return False


def _stop_on_full_disk(run_dir: Path) -> int:
    """Remove the half-written checkpoint (never published, so never resumed; removing it also
    frees the space it took) and say which checkpoint a rerun resumes from."""
    import shutil

    from sala_train.checkpoints import remove_incomplete

    removed = remove_incomplete(run_dir) if is_main_process() else []
    if _final_started and is_main_process():
        # final/ is written in place at the very end: what this process began of it is incomplete.
        shutil.rmtree(_final_started[0], ignore_errors=True)
        removed.append(_final_started[0])
    kept = _what_was_kept(run_dir)
    dropped = f" (removed the half-written {', '.join(p.name for p in removed)})" if removed else ""
    if is_main_process():  # (every rank meets it; rank 0 removed what was half-written and says so)
        say(f"sala-train: no room to write in {run_dir} (the disk is full, a quota is reached, or a file is past "
            f"the file-size limit, ulimit -f){dropped}; {kept}; make room and rerun the same command to resume",
            sys.stderr)  # fmt: skip
    return USER_ERROR_EXIT


def _what_was_kept(run_dir: Path) -> str:
    """Which checkpoint a rerun resumes from, as a stop for lack of a writable disk says it."""
    from sala_train.checkpoints import complete_checkpoints

    newest = complete_checkpoints(run_dir)
    return f"the newest complete checkpoint, {newest[-1].name}, is intact" if newest else "no checkpoint was kept"


def _read_only(run_dir: Path) -> bool:
    """Whether the run directory's file system is mounted read-only (EROFS from elsewhere, a
    read-only cache, is not the run directory's)."""
    try:
        return bool(os.statvfs(run_dir).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _stop_on_a_read_only_run_dir(run_dir: Path) -> int:
    """The run directory's file system turned read-only mid-run (a storage fault remounts it so):
    one message naming the checkpoint a rerun resumes from, not a traceback. (Nothing half-written
    can be removed; it was never published, so a rerun removes it.)"""
    kept = _what_was_kept(run_dir)
    if is_main_process():
        say(f"sala-train: {run_dir} is on a read-only file system now, so the run cannot go on writing there; "
            f"{kept}; rerun the same command to resume once it is writable", sys.stderr)  # fmt: skip
    return USER_ERROR_EXIT


# Stop requests that arrive while the runner starts (imports, data, model: minutes for a big model
# on a busy node), before PreemptionCallback takes the signals over: they must lead to the same
# checkpoint-and-exit-75 at the first step boundary, not to a SIGTERM death recorded as a failure.
_early_stop: list[int] = []


def _note_early_stop(signum: int, frame: Any) -> None:
    if _early_stop:
        stop_at_once(signum)  # a second request: stop now
    _early_stop.append(signum)
    if is_main_process():  # (said at once: tokenizing a large data set went on in silence for half a minute)
        say("sala-train: stopping as asked, before the first step, once what is being prepared is ready; "
            "a second signal stops at once", sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in RUNNER_STOP_SIGNALS:
            signal.signal(sig, _note_early_stop)
        # The local launcher starts this process with its stop signals held (sala_train.launch.local):
        # one that came while the interpreter started is delivered now, to the handler above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    parser = argparse.ArgumentParser(prog="sala_train.runner", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="run directory holding config.yaml")
    parser.add_argument("--data-only", action="store_true",
                        help="check and tokenize the data into the datasets cache, then exit")  # fmt: skip
    args = parser.parse_args(argv)
    code = 1
    run_dir = args.run_dir.resolve()
    problem: BaseException | None = None

    def record(code: int) -> None:
        if not args.data_only:  # the batch script records how its data step ended
            _record_status(run_dir, code)

    try:
        code = prepare_data(run_dir) if args.data_only else train(run_dir)
    except USER_ERRORS as exc:
        code, problem = USER_ERROR_EXIT, exc
    except Exception as exc:  # a full disk is an OSError, torch.save's RuntimeError or a SafetensorError
        if os_error_in_chain(exc, {errno.EROFS}) is not None and _read_only(run_dir):
            code = _stop_on_a_read_only_run_dir(run_dir)
        elif not _full_disk(run_dir, exc):
            record(1)
            raise
        else:
            code = _stop_on_full_disk(run_dir)
    finally:
        dist = sys.modules.get("torch.distributed")  # not imported for it: a data error exits sooner
        grouped = dist is not None and dist.is_available() and dist.is_initialized()
        if grouped:
            dist.destroy_process_group()
    # With several ranks, every one may meet the same problem: it is printed once.
    if problem is not None and (
        (int(os.environ.get("WORLD_SIZE", "1")) == 1 and not os.environ.get(RECORD_PROBLEMS_ENV))
        or _first_to_report(run_dir, render(problem))
    ):
        report(problem)
    record(code)
    exit_without_teardown(code)  # (1.5-2 s sooner; and a rank that held a gloo group must: see there)


def _record_status(run_dir: Path, code: int | None) -> None:
    """Rank 0 records ``running`` (``code`` None) or how it ended. The launcher writes the
    status again after it, but a runner started by hand (the command a dry run prints) has no
    launcher: its rerun through ``sala-train`` must still find the run complete. Best effort:
    a full disk must not hide the runner's own message."""
    if not is_main_process() or not (run_dir / io.CONFIG_FILE).is_file():
        return
    from sala_train.checkpoints import record_slurm_job
    from sala_train.launch.plan import status_for_exit
    from sala_train.report import write_running, write_status

    try:
        if code is None:
            record_slurm_job(run_dir)
            write_running(run_dir)
        else:
            write_status(run_dir, status_for_exit(code), code)
    except OSError:
        pass


def _first_to_report(run_dir: Path, message: str) -> bool:
    """Record ``message`` under the run's user-error marker (torchrun names only the first failed
    worker; the launcher reads the marker for the exit code), and say whether no other rank has
    recorded it yet: ranks that all meet one problem print it once, and different problems each
    once. One file per message, created exclusively, so it holds across nodes on a shared run dir."""
    reports = run_dir / USER_ERROR_MARKER
    reports.mkdir(exist_ok=True)
    try:
        with (reports / hashlib.sha256(message.encode()).hexdigest()[:16]).open("x", encoding="utf-8") as fh:
            fh.write(message)  # a SLURM launch that waits prints it from here (the job's log is elsewhere)
    except FileExistsError:
        # This rank's exit makes torchrun stop the others: give the one that recorded the message
        # first the moment it needs to print it.
        time.sleep(1)
        return False
    return True


if __name__ == "__main__":
    main()
