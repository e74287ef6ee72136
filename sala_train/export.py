"""``sala-export RUN_DIR``: a LoRA run merged into its base model, as a plain Hugging Face model.

Loads the base model exactly as the run did (hub id or local path, or the same seeded random
init for ``from_scratch`` models), applies the adapter from ``final/`` (or ``--checkpoint``),
merges it, and checks on a batch of the run's own validation samples that the merged model's
logits match the adapter model's; the model, tokenizer and chat template are written to a
temporary directory and renamed into place only after that check passes.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import signal
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sala_train.atomic import cannot_make_directory_in, readable_weights
from sala_train.base_weights import BASE_WEIGHTS_FILE, check_unchanged
from sala_train.checkpoints import CHECKPOINT, complete_checkpoints, is_complete
from sala_train.config import io
from sala_train.config.schema import LoraMethod, RunConfig
from sala_train.config.typed import ConfigError
from sala_train.errors import DataError, exit_on_user_error, exit_quietly_on_interrupt, first_line, resolved
from sala_train.report import RunStatus, read_status
from sala_train.runner import FINAL_DIR, quiet_libraries, stop_where_trained_replies_end

EXPORT_DIR = "export"


@dataclass
class ExportResult:
    out: Path
    max_abs_diff: float
    max_logit: float
    tokens: int


def _untie_adapted_head(model: Any, adapter_dir: Path) -> None:
    """An adapter on a head or input embeddings tied to each other: merging would change both (one
    shared tensor), so the head gets its own copy first and the export is untied."""
    import torch
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or head is None:
        return
    config = PeftConfig.from_pretrained(str(adapter_dir))  # (peft's own matching of its target modules)
    names = [name for name, module in model.named_modules() if module is head or module is embeddings]
    if any(check_target_module_exists(config, name) for name in names):
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def _sample_batch(cfg: RunConfig, tokenizer: Any, samples: int) -> dict[str, Any]:
    from sala_train.data.build import build_data, raw_splits
    from sala_train.data.collators import PadToLongestCollator

    # The validation split alone is read and tokenized (with the train files only where
    # dataset.val_size holds it out of them): tokenizing the whole train split took a minute per
    # 100,000 records, uncached, and a run's train or test files may be gone by the time it is exported.
    validation = raw_splits(cfg.dataset, validation_only=True)["validation"]
    split = build_data(cfg.stage, cfg.dataset, tokenizer, raw={"validation": validation}).splits["validation"]
    if "input_ids" not in split.column_names:  # dpo / kto rows: prompt + first reply
        reply = "chosen_ids" if "chosen_ids" in split.column_names else "completion_ids"
        rows = [{"input_ids": r["prompt_ids"] + r[reply], "labels": r["prompt_ids"] + r[reply]} for r in split]
    else:
        rows = list(split)
    batch = PadToLongestCollator(pad_token_id=tokenizer.pad_token_id)(rows[:samples])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _adapter_dir(run_dir: Path, checkpoint: Path | None) -> Path:
    """``final/`` of a completed run, or one of this run's published checkpoints: an adapter from
    elsewhere (another run's, a half-written one) would be merged into the wrong base or fail late."""
    if checkpoint is None:
        status = read_status(run_dir)
        if status != RunStatus.COMPLETED or not (run_dir / FINAL_DIR).is_dir():
            latest = complete_checkpoints(run_dir)
            running = status == RunStatus.RUNNING
            finish = "wait for it to finish" if running else "rerun the run's command to finish it"
            hint = f"; pass --checkpoint {latest[-1]}, or {finish}" if latest else f"; {finish}"
            what = (f"{FINAL_DIR}/ is missing, though the run completed" if status == RunStatus.COMPLETED
                    else f"the run is {status}; only a completed run's {FINAL_DIR}/ is exported")  # fmt: skip
            raise ConfigError([f"{run_dir}: {what}{hint}"])
        return run_dir / FINAL_DIR
    checkpoint = _this_runs_checkpoint(run_dir, checkpoint)
    if not (checkpoint / "adapter_config.json").is_file():
        raise ConfigError([f"--checkpoint {checkpoint}: no adapter_config.json in it"])
    return checkpoint


def _this_runs_checkpoint(run_dir: Path, checkpoint: Path) -> Path:
    """``--checkpoint``, resolved: one of this run's published checkpoints (``checkpoint-N``, or
    its path), else ConfigError."""
    if not checkpoint.is_absolute() and ((run_dir / checkpoint).exists() or not checkpoint.exists()):
        checkpoint = run_dir / checkpoint  # --checkpoint checkpoint-8: one of this run's
    checkpoint = resolved(checkpoint, "--checkpoint")
    if checkpoint.parent != run_dir or not CHECKPOINT.match(checkpoint.name):
        raise ConfigError(
            [f"--checkpoint {checkpoint}: not a checkpoint of {run_dir} (expected {run_dir}/checkpoint-N)"]
        )
    if not is_complete(checkpoint):
        raise ConfigError([f"--checkpoint {checkpoint}: missing, or left incomplete by an interrupted save"])
    return checkpoint


def _full_checkpoint(run_dir: Path, checkpoint: Path, method: str) -> str:
    """What to do with a full run's checkpoint, which ``--checkpoint`` named: nothing to merge."""
    where = _this_runs_checkpoint(run_dir, checkpoint)
    if (where / "config.json").is_file() and any(where.glob("model*.safetensors")):
        return (f"--checkpoint {checkpoint}: method={method}, so the checkpoint is a whole model already, nothing "
                f"to merge: load {where} itself (AutoModelForCausalLM.from_pretrained)")  # fmt: skip
    final = (f"the run's {FINAL_DIR}/ is its plain model" if (run_dir / FINAL_DIR).is_dir()
             else f"the run's {FINAL_DIR}/, once it completes, is its plain model")  # fmt: skip
    return (f"--checkpoint {checkpoint}: method={method}, nothing to merge; the checkpoint holds no whole model "
            f"(sharded by the backend, for resuming): {final}")  # fmt: skip


def _check_out(out: Path) -> None:
    if out.exists():
        raise ConfigError([f"{out}: already exists; remove it, or choose another --out"])
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir():
        raise ConfigError([f"--out {out}: {parent} is a file, not a directory"])
    if (why := cannot_make_directory_in(parent)) is not None:
        raise ConfigError([f"--out {out}: cannot write in {parent} ({why})"])


@contextmanager
def _damaged(adapter_dir: Path) -> Iterator[None]:
    """A damaged adapter or tokenizer file (truncated, overwritten) as one message naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        if adapter_dir.name.startswith("checkpoint-") and not is_complete(adapter_dir):
            # (removed while it loaded: the run, still training, pruned it under train.save_total_limit)
            raise ConfigError([f"{adapter_dir}: removed while it was read (the run, still training, keeps its newest "
                               "checkpoints only: train.save_total_limit); export a newer checkpoint, or the run "
                               "once it completes"]) from exc  # fmt: skip
        raise ConfigError([f"{adapter_dir}: cannot be loaded, a file in it is damaged ({first_line(exc)})"]) from exc


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def _pad_as_trained(model: Any, tokenizer: Any) -> None:
    """The pad id the run trained with (a base without one pads with its eos), in the merged model's
    config and generation config, as the Trainer puts it in a full fine-tune's ``final/``: the base
    was loaded afresh, and its ``pad_token_id: null`` disagreed with the tokenizer saved beside it."""
    pad = tokenizer.pad_token_id
    if pad is None:
        return
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = pad


def export(
    run_dir: Path, out: Path, checkpoint: Path | None = None, samples: int = 4, rtol: float = 1e-3
) -> ExportResult:
    try:
        cfg = io.load(RunConfig, run_dir)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{run_dir / io.CONFIG_FILE}: not the config sala-train wrote ({first_line(exc)})"]) from exc
    except ConfigError as exc:  # (sala-export takes no overrides: the keys are the run's config file's)
        raise ConfigError([f"{run_dir / io.CONFIG_FILE}: {problem}" for problem in exc.problems]) from exc
    if not isinstance(cfg.method, LoraMethod):
        if checkpoint is not None:
            raise ConfigError([_full_checkpoint(run_dir, checkpoint, cfg.method.name)])
        if (run_dir / FINAL_DIR).is_dir():
            raise ConfigError([f"{run_dir}: method={cfg.method.name}; {run_dir / FINAL_DIR} is already a plain model"])
        status = read_status(run_dir)
        raise ConfigError([f"{run_dir}: method={cfg.method.name} and the run is {status}, with no {FINAL_DIR}/; "
                           f"a full run's {FINAL_DIR}/ is a plain model already, nothing to merge"])  # fmt: skip
    adapter_dir = _adapter_dir(run_dir, checkpoint)
    base_path = Path(cfg.model.name_or_path).expanduser()
    if cfg.model.name_or_path.startswith(("/", ".", "~")) and not base_path.is_dir():
        # (transformers took the vanished path for a hub id: "Repo id must be in the form ...")
        raise ConfigError([f"{run_dir}: its base model, model.name_or_path={cfg.model.name_or_path}, is no longer "
                           "there; the adapter is merged into it: put it back at that path"])  # fmt: skip
    check_unchanged(cfg.model, run_dir / BASE_WEIGHTS_FILE, "the adapter would be merged into another base model "
                    "than it was trained on; put the run's base model back", cfg.train.seed)  # fmt: skip
    _check_out(out)
    _check_present(adapter_dir)
    quiet_libraries()  # before the imports below (DeepSpeed's accelerator notice, progress bars)
    import torch
    from peft import PeftModel

    from sala_train.models import load_tokenizer, without_the_length_warning

    tokenizer = load_tokenizer(cfg.model)
    with _damaged(adapter_dir):
        if (adapter_dir / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            trained_with_a_template = tokenizer.chat_template is not None or cfg.dataset.template is not None
            # the run's own (template included); its code, if any, is the base model's, trusted as in training
            tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=cfg.model.trust_remote_code)
            without_the_length_warning(tokenizer)
            if trained_with_a_template and tokenizer.chat_template is None:
                # (the logit check's data then blamed config.yaml, advising a dataset.template to set)
                why = "though the run saved the one it trained with here (chat_template.jinja gone?)"
                raise ConfigError([f"{adapter_dir}: its tokenizer has no chat template, {why}; nothing was written"])
    try:  # (before the model loads: a data file moved since training is said at once)
        batch = _sample_batch(cfg, tokenizer, samples)
    except DataError as exc:
        raise ConfigError([f"{run_dir / io.CONFIG_FILE}: the logit check reads the run's validation data: "
                           f"{exc}"]) from exc  # fmt: skip
    base = _load_for_check(cfg.model, cfg.train.seed)
    # Merged and checked in float32, saved in the dtype each weight was loaded in (the model's,
    # and float32 for what a model keeps there, such as MoE routers): in bfloat16 the merge's and
    # the adapter's roundings alone differ by ~0.5% of the logits, more than a broken merge on a
    # small model (a bf16 LoRA run could not be exported). bf16 -> float32 is exact.
    saved_dtype = base.dtype
    loaded_dtypes = {name: t.dtype for name, t in base.state_dict().items()}
    base = base.float()
    with _damaged(adapter_dir):
        _untie_adapted_head(base, adapter_dir)  # (reads adapter_config.json)
        with warnings.catch_warnings():  # (peft's own words for what _check_complete says, naming them)
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    _check_complete(model, adapter_dir)
    with torch.no_grad():
        adapted = model(**batch, use_cache=False).logits.float()
        merged_model = model.merge_and_unload()
        merged = merged_model(**batch, use_cache=False).logits.float()
    stop_where_trained_replies_end(cfg, merged_model, tokenizer, "sala-export")  # (as the run's final/ would)
    _pad_as_trained(merged_model, tokenizer)
    mask = batch["attention_mask"].bool()
    diff = float((adapted - merged).abs()[mask].max())
    scale = float(adapted.abs()[mask].max())
    result = ExportResult(out, diff, scale, int(mask.sum()))
    if not (math.isfinite(diff) and math.isfinite(scale)):
        raise ConfigError([f"{adapter_dir}: the adapter model's logits are not finite (NaN or inf): its weights "
                           "diverged; nothing was written"])  # fmt: skip
    if diff > rtol * max(scale, 1.0):
        raise ConfigError([f"merged logits differ from the adapter model's by {diff:.3g} (max |logit| {scale:.3g}); "
                           "nothing was written"])  # fmt: skip
    from safetensors import SafetensorError

    made = [parent for parent in out.parents if not parent.exists()]
    tmp = _partial(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_partials(out)
        tmp.mkdir()
        _as_loaded(merged_model, loaded_dtypes, saved_dtype).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        readable_weights(tmp)
        if out.exists():  # (a rename would replace an empty directory there, and fail on a full one)
            raise _WrittenMeanwhile
        tmp.rename(out)
    except BaseException as exc:  # a disk that fills up while writing, or Ctrl-C: no partial model left
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:  # (deepest first; one that holds something else now stays)
            with contextlib.suppress(OSError):
                parent.rmdir()
        if isinstance(exc, _WrittenMeanwhile) or (isinstance(exc, OSError) and out.is_dir() and any(out.iterdir())):
            raise ConfigError([f"--out {out}: written meanwhile by another command (a second sala-export of the "
                               "same run?); this one's merged model was discarded"]) from exc  # fmt: skip
        if not isinstance(exc, OSError | SafetensorError):
            raise
        why = getattr(exc, "strerror", None) or exc
        raise ConfigError([f"--out {out}: could not write the merged model ({why}); nothing was "
                           "written"]) from exc  # fmt: skip
    return result


class _WrittenMeanwhile(Exception):
    """``--out`` appeared while this export wrote its own copy."""


PARTIAL = ".{name}.partial-{host}-{pid}"


def _partial(out: Path) -> Path:
    """Where this process writes the merged model before renaming it to ``out``: its own, so two
    exports to one ``--out`` (a second started while the first seemed to hang) never write into,
    remove or rename each other's (one shared name let one publish the other's half-written model)."""
    return out.with_name(PARTIAL.format(name=out.name, host=socket.gethostname(), pid=os.getpid()))


def _remove_abandoned_partials(out: Path) -> None:
    """Partial models left beside ``out`` by exports that were killed (SIGKILL, a lost machine), on
    this host: a model's size each. Those of live processes, or of other hosts, are theirs."""
    from sala_train.liveness import process_ended

    prefix = PARTIAL.format(name=out.name, host="", pid="").removesuffix("-")  # (".NAME.partial-")
    for path in out.parent.glob(f"{glob.escape(prefix)}*"):
        host, _, pid = path.name.removeprefix(prefix).rpartition("-")
        if pid.isdigit() and process_ended({"host": host, "pid": int(pid)}):
            shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(out.with_name(f".{out.name}.partial"), ignore_errors=True)  # (sala-export's name before this)


def _merge_attention(model: Any) -> Any:
    """The run's model config with an attention that runs the logit check: ``sala_varlen`` and
    ``flash_attention_2`` (MiniCPM-SALA's preset) compute in 16 bits on CUDA only, and the check
    runs padded samples in float32, anywhere (the attention changes no weight, and the merged
    model's config does not record it)."""
    import dataclasses

    from sala_train.config.schema import AttnImplementation

    if model.attn_implementation in (AttnImplementation.SALA_VARLEN, AttnImplementation.FLASH_ATTENTION_2):
        return dataclasses.replace(model, attn_implementation=AttnImplementation.SDPA)
    return model


def _load_for_check(model: Any, seed: int) -> Any:
    """The base model with ``_merge_attention``'s attention, or eager for a model without sdpa
    (Gemma 2, trained with flash_attention_2)."""
    import dataclasses

    from sala_train.config.schema import AttnImplementation
    from sala_train.errors import ModelLoadError
    from sala_train.models import load_model

    check = _merge_attention(model)
    try:
        return load_model(check, seed=seed)
    except ModelLoadError as exc:
        switched = check.attn_implementation is not model.attn_implementation
        if not (switched and "scaled_dot_product_attention" in str(exc)):
            raise
    return load_model(dataclasses.replace(check, attn_implementation=AttnImplementation.EAGER), seed=seed)


def _check_present(adapter_dir: Path) -> None:
    """peft reads a directory without its weights as a hub id ("Repo id must be in the form ..."),
    and an adapter_config.json that is JSON but not a LoRA config ended in its AttributeError."""
    wanted = ["adapter_config.json", "adapter_model.safetensors"]
    if not (adapter_dir / wanted[1]).is_file() and (adapter_dir / "adapter_model.bin").is_file():
        wanted[1] = "adapter_model.bin"
    missing = [name for name in wanted if not (adapter_dir / name).is_file()]
    if missing:
        raise ConfigError([f"{adapter_dir}: {' and '.join(missing)} missing; nothing was written"])
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: cannot be read, it is damaged ({first_line(exc)}); nothing was written"]) from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or "target_modules" not in config:
        raise ConfigError([f"{path}: not a LoRA adapter's config (no peft_type LORA and target_modules in it); it "
                           "was overwritten or damaged; nothing was written"])  # fmt: skip


def _check_complete(model: Any, adapter_dir: Path) -> None:
    """Every weight the adapter's config targets is in its file, and every weight in its file is
    targeted: peft only warns of missing ones (left at their start, so the merge drops that part
    of the training) and says nothing of weights a narrowed ``target_modules`` leaves out. The
    logit check compares the adapter model with its own merge, so it sees neither."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return  # (an adapter_model.bin, from elsewhere: its names are peft's to read)
    with _damaged(adapter_dir), safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
    saved = {key for key in keys if "lora_" in key}
    # (LoRA's own weights: a copy of an adapted head or embedding's base weight is saved, or not,
    # as the backend's save path decides, and ZeRO-3's does not)
    expected = {key for key in get_peft_model_state_dict(model) if "lora_" in key}
    missing, unused = sorted(expected - saved), sorted(saved - expected)
    # A module trained whole (modules_to_save) is saved as its weights under its own name.
    whole = getattr(getattr(model, "peft_config", {}).get("default"), "modules_to_save", None) or []
    missing += sorted(f"{name} (trained whole)" for name in whole
                      if not any(key.endswith(f"{name}.weight") for key in keys - saved))  # fmt: skip
    problems = [f"{len(missing)} weight(s) that adapter_config.json targets are not in it (first: {missing[0]})"
                if missing else "", f"{len(unused)} weight(s) in it are targeted by no module of adapter_config.json "
                f"(first: {unused[0]})" if unused else ""]  # fmt: skip
    if missing or unused:
        raise ConfigError([f"{path}: {'; '.join(p for p in problems if p)}; nothing was written"])


def _as_loaded(model: Any, dtypes: dict[str, Any], default: Any) -> Any:
    """Each weight back in the dtype it was loaded in (float32 ones, which transformers keeps in
    float32 for some modules, stay so); a head untied for the merge takes the model's."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtypes.get(name, default))
    return model


class _Terminated(BaseException):
    """SIGTERM (``kill``, a job's time limit) or SIGHUP (the terminal or SSH session it ran in gone),
    raised where the export is, so that a half-written model is removed on the way out as for Ctrl-C
    (by default the signal ends the process at once, leaving the hidden temporary directory behind)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sala-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("run_dir", type=Path, help="a finished LoRA run directory")
    parser.add_argument("--out", type=Path, help=f"where to write the merged model (default RUN_DIR/{EXPORT_DIR})")
    parser.add_argument("--checkpoint", type=Path,
                        help="one of this run's published checkpoints (RUN_DIR/checkpoint-N, or checkpoint-N) "
                        "instead of RUN_DIR/final")  # fmt: skip
    parser.add_argument("--samples", type=_positive, default=4, help="validation samples in the logit check")
    args = parser.parse_args(argv)
    # (a signal ignored when the command started stays ignored: under nohup, SIGHUP must not stop it)
    stops = [stop for stop in STOP_SIGNALS if signal.getsignal(stop) is not signal.SIG_IGN]
    for stop in stops:
        signal.signal(stop, _raise_terminated)
    try:
        with exit_quietly_on_interrupt("sala-export"), exit_on_user_error("sala-export"):
            run_dir = resolved(args.run_dir, "RUN_DIR")
            if not (run_dir / io.CONFIG_FILE).is_file():
                raise ConfigError([f"{run_dir}: no {io.CONFIG_FILE}; not a sala-train run directory"])
            out = resolved(args.out or run_dir / EXPORT_DIR, "--out")
            result = export(run_dir, out, args.checkpoint, args.samples)
    except _Terminated as stopped:
        for stop in stops:
            signal.signal(stop, signal.SIG_IGN)  # (a second one while this is said)
        name = signal.Signals(stopped.signum).name
        with contextlib.suppress(OSError):  # (after SIGHUP the terminal may be gone)
            print(f"sala-export: stopped by {name}; no merged model was written", file=sys.stderr, flush=True)
        sys.exit(128 + stopped.signum)
    for stop in stops:
        signal.signal(stop, signal.SIG_DFL)  # (written: a signal now only cuts the lines below short)
    print(f"sala-export: logit check on {result.tokens} tokens: max |merged - adapter| = {result.max_abs_diff:.3g} "
          f"(max |logit| {result.max_logit:.3g})")  # fmt: skip
    print(f"sala-export: merged model written to {result.out}")
    sys.exit(0)


if __name__ == "__main__":
    main()
