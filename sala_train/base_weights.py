"""Which base weights a run started from, so that resuming it, or merging its adapter into them
(``sala-export``), on other weights is refused instead of done without a word.

A LoRA adapter is a difference from one base model. Merged into another of the same shapes (a hub
id whose cached snapshot moved to a new commit, a local directory overwritten by another
fine-tune) it loads and runs, and the export's logit check cannot see it: it compares the adapter
model with its own merge, on the same wrong base. A resumed full or LoRA run would likewise go on
from a checkpoint of one model with the frozen parts of another.

The record is a fingerprint of the weight files, not of the path: a model moved or copied
elsewhere is the same model. Each file is fingerprinted by its size and 64 samples of 4 KiB spread
over it: reading a 19 GB model whole would take minutes at every start and export, and a change of
weights (a merged LoRA dense in every attention layer, a full fine-tune) touches most samples.
A model built from scratch has no weight files; its seed rebuilds it, from its config.json.

The config.json and any code beside it (remote code, ``*.py``) are recorded too, whole, for every
run: the same weights under an edited config.json (another ``rope_theta``, ``rms_norm_eps``) are
another model, and a model built from scratch is nothing but them and the seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sala_train.atomic import write_text_atomic
from sala_train.config.schema import ModelConfig
from sala_train.config.typed import ConfigError

BASE_WEIGHTS_FILE = "base_weights.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
SAMPLES = 64
SAMPLE_BYTES = 4096


CONFIG_PATTERNS = ("config.json", "*.py")


def weights_directory(model: ModelConfig) -> Path | None:
    """Where ``model``'s weights load from: its local directory, or the hub snapshot cached for its
    revision; None when it is built from scratch or nothing is cached (the load then says why)."""
    return None if model.from_scratch else model_directory(model)


def model_directory(model: ModelConfig) -> Path | None:
    """Where ``model``'s config.json is read from (``weights_directory``, from scratch too)."""
    local = Path(model.name_or_path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model.name_or_path, "config.json", revision=model.revision)
    except ValueError:  # (not a valid repo id: the load says so in its own words)
        return None
    return Path(found).parent if isinstance(found, str) else None


def fingerprint(directory: Path) -> dict[str, dict[str, Any]]:
    """Each weight file's name, size and sampled digest."""
    files = sorted({path for pattern in WEIGHT_PATTERNS for path in directory.glob(pattern) if path.is_file()})
    return {path.name: _file_fingerprint(path) for path in files}


def config_fingerprint(directory: Path) -> dict[str, str]:
    """config.json's and each code file's name and sha256 (small files: read whole)."""
    files = sorted({path for pattern in CONFIG_PATTERNS for path in directory.glob(pattern) if path.is_file()})
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def _file_fingerprint(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for i in range(SAMPLES):
            fh.seek(i * max(size - SAMPLE_BYTES, 0) // (SAMPLES - 1))
            digest.update(fh.read(SAMPLE_BYTES))
    return {"bytes": size, "sampled_sha256": digest.hexdigest()}


def record(model: ModelConfig, run_dir: Path) -> None:
    """Write the fingerprint of the weights a run starts from (a model built from scratch: none),
    and of its config.json and code."""
    path = run_dir / BASE_WEIGHTS_FILE
    directory = model_directory(model)
    files = fingerprint(directory) if directory is not None and not model.from_scratch else {}
    configs = config_fingerprint(directory) if directory is not None else {}
    if directory is None or not (files or (model.from_scratch and configs)):  # (nothing there: its load says so)
        path.unlink(missing_ok=True)  # (a stale record, of a run started afresh in this directory)
        return
    entry = {"name_or_path": model.name_or_path, "directory": str(directory.resolve()), "files": files,
             "config_files": configs}  # fmt: skip
    text = json.dumps(entry, indent=2)
    write_text_atomic(path, text + "\n")


def check_unchanged(model: ModelConfig, run_dir: Path, consequence: str) -> None:
    """ConfigError when ``model``'s weights, config.json or code are not those recorded when the
    run started. ``consequence``: what using them would do, and what to do instead. A run recorded
    nothing before this check existed: nothing to compare (nor config files, before they were)."""
    path = run_dir / BASE_WEIGHTS_FILE
    try:
        recorded_run = json.loads(path.read_text(encoding="utf-8"))
        recorded, recorded_directory = recorded_run["files"], recorded_run.get("directory")
        recorded_configs = recorded_run.get("config_files")
        if not isinstance(recorded, dict) or not isinstance(recorded_configs, dict | None):
            raise TypeError("not a record of files")
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError([f"{path}: unreadable ({exc}); it records the weights the run started from"]) from exc
    directory = model_directory(model)
    if directory is None:
        return  # (not there: loading it says so)
    differences = _differences(recorded, fingerprint(directory)) if recorded else []
    what = "weights"
    if not differences and recorded_configs is not None:
        # (a code file new since is no change: transformers fetches a hub model's code as it needs it)
        current_configs = {k: v for k, v in config_fingerprint(directory).items() if k in recorded_configs}
        differences, what = _differences(recorded_configs, current_configs), "config.json and code"
    if not differences:
        return
    more = f", and {len(differences) - 3} more" if len(differences) > 3 else ""
    cached = "" if Path(model.name_or_path).expanduser().is_dir() else f" (the hub's, cached in {directory})"
    raise ConfigError(
        [
            f"model.name_or_path={model.name_or_path}: its {what}{cached} are not the ones this run started from, "
            f"recorded in {path}{f' from {recorded_directory}' if recorded_directory else ''} "
            f"({', '.join(differences[:3])}{more}); {consequence}"
        ]
    )


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    changed = sorted(name for name in current.keys() & recorded.keys() if current[name] != recorded[name])
    gone, new = sorted(recorded.keys() - current.keys()), sorted(current.keys() - recorded.keys())
    return (
        [f"{name} differs" for name in changed]
        + [f"{name} is gone" for name in gone]
        + [f"{name} is new" for name in new]
    )
