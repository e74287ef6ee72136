"""Checkpoints that are trusted only once complete, and a run directory guarded against mixing configs.

The Trainer writes ``checkpoint-N/`` in place, file by file; a kill at any instant can leave a
half-written directory. Every rank's files are done when the Trainer calls ``on_save``; then
``CheckpointPublisher`` (rank 0) verifies the directory and publishes it by writing a manifest
atomically (``sala_checkpoint.json``: every file and its size; see ``publisher``). Only published checkpoints are
resumed from; unpublished ones are removed at the next start. Old checkpoints are pruned
(``train.save_total_limit``) only after the new one is published, so a kill between the two
never leaves fewer complete checkpoints than before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from sala_train.atomic import write_text_atomic
from sala_train.config.io import CONFIG_FILE
from sala_train.config.typed import ConfigError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "sala_checkpoint.json"
# Keys a rerun may change without changing the run: how it resumes, whether it is a dry run, and
# the W&B names (filled from the command line's wording when not given: the same run, worded
# differently, must still resume).
# (launcher=multinode: every node writes config.yaml, each with its own node_rank, to the directory
# they share; the rendezvous address may move to another head node on a rerun)
RESUME_NEUTRAL = {"train.resume", "launcher.dry_run", "logger.run_name", "logger.group", "launcher.node_rank",
                  "launcher.master_addr", "launcher.master_port"}  # fmt: skip


def _checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in run_dir.glob("checkpoint-*"):
        match = CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def is_complete(path: Path) -> bool:
    """Published, and every file the manifest lists is there at its recorded size."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        return all((path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoints, oldest first."""
    return [path for _, path in _checkpoint_dirs(run_dir) if is_complete(path)]


def remove_incomplete(run_dir: Path) -> list[Path]:
    """Delete checkpoint directories a killed run left unpublished (never trusted, never resumed)."""
    removed = []
    for _, path in _checkpoint_dirs(run_dir):
        if not (path / MANIFEST).exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def set_aside_damaged(run_dir: Path) -> list[Path]:
    """Rename published checkpoints whose files no longer match their manifest (or whose manifest
    is unreadable: it is written atomically) to ``damaged-checkpoint-N``: changed after publishing
    (a failing disk, a hand), not a save a kill cut short, so kept for a look, never resumed."""
    return [
        set_aside(path, "damaged")
        for _, path in _checkpoint_dirs(run_dir)
        if (path / MANIFEST).exists() and not is_complete(path)
    ]


def set_aside(checkpoint: Path, why: str) -> Path:
    """Rename ``checkpoint-N`` to ``WHY-checkpoint-N`` (``WHY-2-checkpoint-N``, ... when taken), out of
    what resuming and pruning read; returns the new path."""
    target = checkpoint.with_name(f"{why}-{checkpoint.name}")
    n = 1
    while target.exists():  # (set aside before)
        n += 1
        target = checkpoint.with_name(f"{why}-{n}-{checkpoint.name}")
    checkpoint.rename(target)
    return target


# The run's records a resume compares with, kept in each checkpoint too (``RUN_RECORD_PREFIX`` +
# their name): a checkpoint copied out of its run (``train.resume=best``), or one whose run lost its
# config.yaml, was resumed with no comparison at all, another learning rate silently ignored and
# another LoRA rank a traceback.
RUN_RECORDS = (CONFIG_FILE, "base_weights.json")
RUN_RECORD_PREFIX = "sala_run_"


def run_record(checkpoint: Path, name: str) -> Path:
    """Where ``checkpoint``'s run record ``name`` (one of ``RUN_RECORDS``) is: the copy the
    checkpoint holds, else (a checkpoint saved before copies were kept) its run directory's."""
    kept = checkpoint / f"{RUN_RECORD_PREFIX}{name}"
    return kept if kept.is_file() else checkpoint.parent / name


def publish(path: Path, step: int, train_data: dict[str, Any] | None = None) -> None:
    """Verify a just-saved checkpoint, keep copies of its run's records in it (``RUN_RECORDS``), and
    write its manifest (the commit point), with what it was trained on (``train_data``:
    ``training_data_signature``)."""
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    if state.get("global_step") != step:
        raise RuntimeError(f"{path}: trainer_state.json is for step {state.get('global_step')}, expected {step}")
    for name in RUN_RECORDS:
        if (path.parent / name).is_file():
            shutil.copyfile(path.parent / name, path / f"{RUN_RECORD_PREFIX}{name}")
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    files.pop(MANIFEST, None)
    manifest = {"step": step, "files": files} | ({"train_data": train_data} if train_data else {})
    write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def training_data_signature(lengths: list[int], content_sha256: str) -> dict[str, Any]:
    """The training samples as the sampler indexes them: their count, tokens, and hashes of their
    lengths and of their token ids and labels (``SplitStats.content_sha256``) in order. A data file
    edited, cut or reordered in place, under the same config, shows, and so does a tokenizer or
    chat template changed to one that tokenizes to the same lengths. (Manifests before its hash read
    alike however the table was batched recorded it as ``content_sha256``: compared on the rest.)"""
    digest = hashlib.sha256(",".join(map(str, lengths)).encode()).hexdigest()[:16]
    return {
        "samples": len(lengths),
        "tokens": sum(lengths),
        "lengths_sha256": digest,
        "ids_labels_sha256": content_sha256,
    }


def refuse_other_training_data(checkpoint: Path, signature: dict[str, Any]) -> None:
    """ConfigError when ``checkpoint`` stopped part-way through an epoch of other training samples
    than these (the config's keys for them are compared before, ``DATA_ORDER_KEYS``; this is for
    the files' contents). Checkpoints saved before their manifests recorded it pass."""
    try:
        saved = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8")).get("train_data")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return
    if not isinstance(saved, dict) or not part_way_through_an_epoch(checkpoint):
        return
    if all(saved.get(key) == value for key, value in signature.items() if key in saved):
        return  # (a checkpoint from before ids_labels_sha256 was recorded is compared on the rest)

    def counted(record: dict[str, Any]) -> str:  # (sequences: a preference pair counts two)
        sequences, tokens = record.get("samples"), record.get("tokens")
        return f"{sequences:,} sequences of {tokens:,} tokens" if isinstance(sequences, int) and isinstance(
            tokens, int) else "?"  # fmt: skip

    then, now = counted(saved), counted(signature)
    order = (
        " (the same counts: their order or token ids changed: the files, or the tokenizer or chat template "
        "that tokenized them)"
        if then == now
        else ""
    )
    raise ConfigError(
        [
            f"train.resume: {checkpoint} stopped part-way through an epoch, and the tokenized training data is not "
            f"what its run trained on ({then} then, {now} now{order}): the Trainer resumes by skipping as many "
            "batches as it trained, so some of that epoch's samples would train twice and others never; put the "
            "run's data files, tokenizer and chat template back as they were, or resume from a checkpoint at an "
            "epoch's end (train.save_strategy=epoch)"
        ]
    )


def prune(run_dir: Path, keep: int | None, best_step: int | None = None) -> None:
    """Keep the newest ``keep`` published checkpoints (all when None), and the one of ``best_step``
    (``train.load_best_model_at_end``: the checkpoint final/ will be loaded from)."""
    if keep is None:
        return
    for path in complete_checkpoints(run_dir)[:-keep]:
        if best_step is not None and path.name == f"checkpoint-{best_step}":
            continue
        # Unpublished first: a kill during the removal leaves what remove_incomplete removes, not
        # what set_aside_damaged takes for damage.
        (path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint holds: its name's, or, for one renamed or copied (``train.resume=best``,
    an ``abandoned-checkpoint-N``), the step its manifest records (0 without one)."""
    if match := CHECKPOINT.match(path.name):
        return int(match.group(1))
    try:
        step = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return step if isinstance(step, int) else 0


# The checkpoint a ``train.resume=PATH`` run started from. The run's config keeps PATH, so a rerun
# of the same command (or a SLURM requeue) would go back to it, losing the progress since, or fail
# once pruning had removed it: a run that has started from PATH continues from its own newest.
STARTED_FROM = ".sala_started_from"


def started_from_another_run_at(run_dir: Path) -> int:
    """The step of the other run's checkpoint this run started from (``train.resume=PATH``), or 0:
    its log history up to that step is that run's."""
    record = _started_record(run_dir)
    if record is None or record[0].parent == run_dir.resolve():
        return 0
    return record[1] if record[1] is not None else checkpoint_step(record[0])


def _started_record(run_dir: Path) -> tuple[Path, int | None] | None:
    """The checkpoint this run started from and its step (None in a record written before the step
    was kept), or None when the run has not started from one."""
    try:
        lines = (run_dir / STARTED_FROM).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines:
        return None
    step = int(lines[1]) if len(lines) > 1 and lines[1].strip().isdigit() else None
    return Path(lines[0].strip()), step


# The SLURM job that trains the run directory (its id), written by the runner as it starts.
SLURM_JOB_RECORD = ".slurm_job"


def record_slurm_job(run_dir: Path) -> None:
    """Note the SLURM job training ``run_dir`` (if any): ``effective_resume`` knows its requeue by it."""
    if job := os.environ.get("SLURM_JOB_ID"):
        write_text_atomic(run_dir / SLURM_JOB_RECORD, job + "\n")


def effective_resume(resume: str, run_dir: Path) -> str:
    """``train.resume`` as a SLURM job started again after a requeue must read it: ``never`` as
    ``auto``. ``never`` was checked when the job was submitted (no checkpoint in its directory), so
    the checkpoints there now are the job's own; read as written, every requeue restarted the run
    from its first step, and a run longer than its time limit never finished. A requeue of the job
    that trained this directory (``record_slurm_job``) only: SLURM_RESTART_COUNT is also passed on
    to every job a requeued job submits."""
    restarts, job = os.environ.get("SLURM_RESTART_COUNT", "0"), os.environ.get("SLURM_JOB_ID")
    if resume != "never" or not restarts.isdigit() or int(restarts) == 0 or not job:
        return resume
    try:
        trained_by = (run_dir / SLURM_JOB_RECORD).read_text(encoding="utf-8").strip()
    except OSError:
        return resume
    return "auto" if trained_by == job else resume


def started_from(run_dir: Path, path: str) -> bool:
    """Whether this run has started from ``path`` (a ``train.resume`` value) already."""
    record = _started_record(run_dir)
    return record is not None and record[0] == Path(path).resolve()


def continue_from(run_dir: Path, path: Path) -> Path:
    """Where a ``train.resume=path`` run resumes: ``path``, or, once this run has started from it,
    its own newest checkpoint past it. (PATH's step is the one recorded when the run started: PATH
    may be gone since, and a missing PATH reads as step 0, which made every checkpoint "past" it.)"""
    record = _started_record(run_dir)
    if record is None or record[0] != path.resolve():
        return path
    start = record[1] if record[1] is not None else checkpoint_step(path)
    later = [c for c in complete_checkpoints(run_dir) if checkpoint_step(c) > start]
    return later[-1] if later else path


def start_from(run_dir: Path, path: Path) -> list[Path]:
    """Record that this run starts from ``path``, and set aside its own checkpoints past that step
    (a rollback's abandoned training) as ``abandoned-checkpoint-N``: resumed, pruned or written
    over in place, they would mix two lines of training (a save into an existing checkpoint
    directory kept the other line's files under a manifest that still matched). Returns them."""
    moved = [set_aside(checkpoint, "abandoned") for step, checkpoint in _checkpoint_dirs(run_dir)
             if step > checkpoint_step(path)]  # fmt: skip
    write_text_atomic(run_dir / STARTED_FROM, f"{path.resolve()}\n{checkpoint_step(path)}\n")
    return moved


def flatten_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"learning_rate": 1e-3}}`` as ``{"train.learning_rate": 1e-3}``; a list of
    mappings (``dataset.mixed``: each mixed entry's settings) by index, ``dataset.mixed[0].train``,
    so a difference names the one setting that changed, not the whole list."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        out = {}
        for i, item in enumerate(data):
            out.update(flatten_config(item, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


# Keys a checkpoint's states override (optimizer param groups, the scheduler's base rates) or fix
# (the adapter: its shapes, scale, the modules it sits on and the base model under it): a resume
# with other values would silently ignore them, train the adapter on another model, or fail late
# (Adam's states loaded onto other modules' adapters crashed the process).
FIXED_BY_CHECKPOINT = ("train.learning_rate", "train.weight_decay", "train.adam_beta1", "train.adam_beta2",
                       "train.adam_epsilon")  # fmt: skip
FIXED_BY_ADAPTER = ("method.r", "method.alpha", "method.target_modules", "model.lora_target_modules",
                    "method.use_rslora", "method.use_dora", "method.modules_to_save", "model.name_or_path")  # fmt: skip


def fixed_differences(
    old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...] = FIXED_BY_CHECKPOINT + FIXED_BY_ADAPTER
) -> list[str]:
    """``config_differences`` in the ``keys`` a resumed checkpoint would override or fix."""
    a, b = flatten_config(old), flatten_config(new)
    return config_differences({k: a.get(k) for k in keys}, {k: b.get(k) for k in keys})


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten_config(old), flatten_config(new)
    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in sorted(set(a) | set(b))
        if k not in RESUME_NEUTRAL and _portable(a.get(k)) != _portable(b.get(k))
    ]


_ASSETS = "/sala_train/assets/"


def _portable(value: Any) -> Any:
    """A packaged asset's path (the demo model and data) as the asset it names: config.yaml holds
    it absolute, and an install elsewhere (a new venv, an upgrade) moves it, not the asset."""
    if isinstance(value, str) and _ASSETS in value:
        return "sala_asset:" + value.rsplit(_ASSETS, 1)[1]
    if isinstance(value, list):
        return [_portable(item) for item in value]
    if isinstance(value, dict):  # (dataset.mixed: the entries' own file lists)
        return {key: _portable(item) for key, item in value.items()}
    return value


def with_current_defaults(old: dict[str, Any]) -> dict[str, Any]:
    """A run directory's config with the keys a newer sala-train added, at their defaults, so a run
    started before an upgrade still resumes; a config the schema cannot read is compared as it is."""
    from sala_train.config.schema import RunConfig
    from sala_train.config.typed import build_lenient, to_plain

    typed, problems = build_lenient(RunConfig, old)
    return to_plain(typed) if typed is not None and not problems else old


# What a run's config.yaml holds at its top (RunConfig's fields; ``model`` and ``train`` always).
RUN_CONFIG_KEYS = {"model", "method", "stage", "dataset", "backend", "launcher", "train", "logger"}


def _refuse_a_config_of_another_tool(run_dir: Path, dir_key: str) -> None:
    """A ``config.yaml`` that is no run's (``hydra.run.dir=.`` in a project with a config of its
    own) would be overwritten by the run's: refused, naming it. (A run with checkpoints whose config
    is damaged is said below, as that.)"""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        why = "" if isinstance(loaded, dict) else " (not a mapping)"
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        loaded, why = None, f" ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if isinstance(loaded, dict) and {"model", "train"} <= loaded.keys() <= RUN_CONFIG_KEYS:
        return
    if isinstance(loaded, dict):
        keys = [str(key) for key in loaded]
        why = f" (its keys: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})"
    raise ConfigError(
        [
            f"{dir_key}: {path} is not a sala-train run's config{why}, and the run writes its own there; "
            f"choose another {dir_key}, or move that file"
        ]
    )


# What Hydra writes at the top of a sweep's directory (its jobs each have their own directory below).
SWEEP_RECORD = "multirun.yaml"
# Touched when the sweep starts: jobs whose Hydra record (.hydra/, written for every job a sweep
# runs, on whichever node) is newer belong to this sweep, not to an earlier one in the same
# directory. Compared by file times on the one file system, so node clocks do not matter.
SWEEP_STARTED = ".sweep_started"
# What tells a sweep's directory: Hydra's basic sweeper writes its record; its Optuna sweeper does
# not, and leaves its results; sala-train's callback marks every sweep it starts.
SWEEP_MARKS = (SWEEP_RECORD, "optimization_results.yaml", SWEEP_STARTED)


def guard_run_dir(run_dir: Path, new_config: dict[str, Any], resume: str, dir_key: str = "hydra.run.dir") -> None:
    """Refuse to mix a different config into a run directory that already holds checkpoints
    (``dir_key``: the key that names another directory, ``hydra.sweep.dir`` for a sweep job)."""
    marks = [name for name in SWEEP_MARKS if (run_dir / name).is_file()]
    if dir_key == "hydra.run.dir" and marks:
        # (a run's files among the sweep's jobs: sala-report then took the directory for one run)
        raise ConfigError([f"hydra.run.dir: {run_dir} is a sweep's directory ({marks[0]}; its jobs are in its "
                           "subdirectories); choose another hydra.run.dir"])  # fmt: skip
    if dir_key == "hydra.sweep.dir" and (run_dir.parent / CONFIG_FILE).is_file():
        # (sala-report then showed the run alone, and the run's checkpoints shared it with the jobs)
        raise ConfigError([f"hydra.sweep.dir: {run_dir.parent} holds a run ({CONFIG_FILE}); a sweep's jobs would be "
                           "made inside it; choose another hydra.sweep.dir"])  # fmt: skip
    resume = effective_resume(resume, run_dir)
    sweep = run_dir.parent
    jobs_own = (CONFIG_FILE, "status.json", "provenance.json", ".hydra")  # (what a job the sweep made keeps)
    sweeps = [name for name in SWEEP_MARKS if (sweep / name).is_file()]
    if dir_key == "hydra.run.dir" and sweeps and not any((run_dir / name).exists() for name in jobs_own):
        # (sala-report listed it as one of the sweep's jobs, with no overrides; one of its jobs, rerun
        # as a single run to finish it, is its own config's to check below)
        raise ConfigError([f"hydra.run.dir: {run_dir} would be a new run among the jobs of the sweep in {sweep} "
                           f"({sweeps[0]}), which sala-report would count as one of them; choose another "
                           "hydra.run.dir"])  # fmt: skip
    checkpoints = complete_checkpoints(run_dir)
    final = run_dir / "final"
    if not checkpoints and not final.is_dir():
        _refuse_a_config_of_another_tool(run_dir, dir_key)
        return
    held = checkpoints[-1].name if checkpoints else f"{final.name}/"
    if resume == "never":
        raise ConfigError(
            [f"train.resume=never: {run_dir} already holds {held}; choose a new {dir_key} or use train.resume=auto"]
        )
    old_path = run_dir / CONFIG_FILE
    # A run started from a checkpoint PATH continues from its own (``continue_from``) as "auto" does.
    if (resume == "auto" or started_from(run_dir, resume)) and old_path.is_file():
        try:
            loaded = yaml.safe_load(old_path.read_text(encoding="utf-8"))
            reason = None if isinstance(loaded, dict) else "not a mapping"
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if reason is not None:
            raise ConfigError(
                [f"{old_path}: the run's config is not readable ({reason}); restore it, or choose a new {dir_key}"]
            )
        old = with_current_defaults(loaded)
        diffs = config_differences(old, new_config)
        if diffs:
            fixed = fixed_differences(old, new_config)  # (a resume would keep the old values)
            anyway = f", or resume anyway with train.resume={checkpoints[-1]}" if checkpoints and not fixed else ""
            elsewhere = _its_own_job_elsewhere(run_dir, new_config) if dir_key == "hydra.sweep.dir" else None
            order = (f" This config is the one {elsewhere} trained: the sweep's overrides came in another order "
                     "than the command that made this directory, and Hydra numbers its jobs by their order; give "
                     "them in that order.") if elsewhere is not None else ""  # fmt: skip
            raise ConfigError(
                [
                    f"{run_dir} holds a run of a different config; rerun it unchanged or choose a new "
                    f"{dir_key}{anyway}.{order} Differences:"
                    + "".join(f"\n      {d}" for d in diffs)  # one problem, its differences listed under it
                ]
            )


def _its_own_job_elsewhere(run_dir: Path, new_config: dict[str, Any]) -> Path | None:
    """Another job directory of the same sweep whose run has exactly this config: the sweep rerun
    with its overrides in another order (``-m b=1,2 a=1,2`` after ``-m a=1,2 b=1,2``), which
    numbers the same jobs otherwise."""
    from sala_train.report import sweep_jobs

    for job in sweep_jobs(run_dir.parent):
        if job == run_dir or not (job / CONFIG_FILE).is_file():
            continue
        try:
            loaded = yaml.safe_load((job / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        if isinstance(loaded, dict) and not config_differences(with_current_defaults(loaded), new_config):
            return job
    return None


def saved_by(checkpoint: Path) -> tuple[str, int | None]:
    """What wrote ``checkpoint``'s optimizer state: ("zero2" | "zero3", its processes), ("fsdp",
    None) or ("plain", None) (single or DDP: one optimizer.pt, whatever the process count)."""
    steps = sorted(p for p in checkpoint.glob("global_step*") if p.is_dir())
    if steps or (checkpoint / "latest").is_file():
        states = steps[-1] if steps else checkpoint
        stage = "zero3" if any(states.glob("zero_pp_rank_*_model_states.pt")) else "zero2"
        return stage, len(list(states.glob("*zero_pp_rank_*_optim_states.pt"))) or None
    # (accelerate: sharded_checkpoints writes pytorch_model_fsdp_0/ and optimizer_0/, whole ones
    # pytorch_model_fsdp.bin and optimizer.bin)
    if (
        any(checkpoint.glob("pytorch_model_fsdp*"))
        or any(checkpoint.glob("optimizer_0*"))
        or (checkpoint / "optimizer.bin").is_file()
    ):
        return "fsdp", None
    return "plain", None


def refuse_another_layout(checkpoint: Path, backend: Any, world: int) -> None:
    """ConfigError, before the model loads, when ``checkpoint`` was written by a backend (or, for
    DeepSpeed, a process count) whose optimizer state this run cannot load. transformers loads a
    plain run's optimizer.pt only if it is there: a DeepSpeed checkpoint resumed under single or DDP
    restarted Adam and the warm-up silently; the other ways round failed after loading the model
    with DeepSpeed's or the Trainer's traceback."""
    from sala_train.config.schema import FsdpBackend, Zero2Backend, Zero3Backend

    saved, processes = saved_by(checkpoint)
    wanted = ("zero3" if isinstance(backend, Zero3Backend) else "zero2" if isinstance(backend, Zero2Backend)
              else "fsdp" if isinstance(backend, FsdpBackend) else "plain")  # fmt: skip
    names = {"zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP", "plain": "single or DDP"}
    if saved != wanted:
        problem = f"its optimizer state was saved by {names[saved]}, which backend={backend.name} cannot load"
    elif processes is not None and processes != world:
        problem = (f"DeepSpeed saved its optimizer state in {processes} partition(s), one per process, and this run "
                   f"has {world} process(es)")  # fmt: skip
    else:
        return
    raise ConfigError(
        [
            f"train.resume: {checkpoint} cannot resume this run: {problem}; resume it with the backend and process "
            "count that wrote it, or start a new run (train.resume=never: from model.name_or_path, not this checkpoint)"
        ]
    )


def part_way_through_an_epoch(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was saved part-way through an epoch (its trainer_state.json's epoch
    is not whole). The Trainer resumes such a run by skipping as many batches as it trained: the
    rest of that epoch is the same only if its batches are."""
    try:
        epoch = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("epoch")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(epoch, int | float) and abs(epoch - round(epoch)) >= 1e-6


def saved_processes(checkpoint: Path) -> int | None:
    """How many processes trained the run that saved ``checkpoint``: the Trainer saves one RNG state
    per process (``rng_state.pth`` alone for one); None when it saved none."""
    if (checkpoint / "rng_state.pth").is_file():
        return 1
    return len(list(checkpoint.glob("rng_state_*.pth"))) or None


def refuse_another_split(checkpoint: Path, world: int) -> None:
    """ConfigError, before the model loads, when ``checkpoint`` stopped part-way through an epoch
    and this run has another process count. Each process skips as many of its own batches as it
    trained; with another count each process's share of the epoch is another one, so some samples
    trained twice and others never (transformers says nothing; a missing RNG file is an info line)."""
    saved = saved_processes(checkpoint)
    if saved is None or saved == world or not part_way_through_an_epoch(checkpoint):
        return
    raise ConfigError(
        [
            f"train.resume: {checkpoint} stopped part-way through an epoch, trained by {saved} process(es), and this "
            f"run has {world}: the Trainer resumes by skipping the batches each process trained, so with another "
            "process count some of that epoch's samples would train twice and others never; resume it with "
            f"{saved} process(es) (launcher.nproc_per_node x launcher.nnodes), or from a checkpoint at an epoch's end "
            "(train.save_strategy=epoch)"
        ]
    )


def refuse_what_cannot_resume(checkpoint: Path, backend: Any, world: int) -> None:
    """Both refusals, as the launcher (before any process starts) and the runner (a requeued SLURM
    job starts no launcher) make them."""
    refuse_another_layout(checkpoint, backend, world)
    refuse_another_split(checkpoint, world)
