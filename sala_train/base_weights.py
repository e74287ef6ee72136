"""Which base weights a run started from, so that resuming it, or merging its adapter into them
(``sala-export``), on other weights is refused instead of done without a word.

A LoRA adapter is a difference from one base model. Merged into another of the same shapes (a hub
id whose cached snapshot moved to a new commit, a local directory overwritten by another
fine-tune) it loads and runs, and the export's logit check cannot see it: it compares the adapter
model with its own merge, on the same wrong base. A resumed full or LoRA run would likewise go on
from a checkpoint of one model with the frozen parts of another.

The record is a fingerprint of the weight files, not of the path: a model moved or copied
elsewhere is the same model. Each file is fingerprinted by its size and 64 samples of 4 KiB spread
over it, and a safetensors file also by its header (every tensor's name, dtype, shape and place)
and by the bytes on either side of each boundary between tensors, so each tensor's first and last
256 bytes: reading a 19 GB model whole would take minutes at every start and export, and a change
of weights changes a tensor's first or last values (a merged LoRA, a full fine-tune, a rescaled
norm; rows for new tokens at an embedding's end), where 64 spread samples alone missed three
norm weights scaled in place. A model built from scratch has no weight files; its seed rebuilds
it, from its config.json, and is recorded with it.

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
TENSOR_END_BYTES = 256
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header


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
        entry: dict[str, Any] = {"bytes": size, "sampled_sha256": digest.hexdigest()}
        if path.suffix == ".safetensors":
            entry["tensor_ends_sha256"] = _tensor_ends_digest(fh, size)
    return entry


def _tensor_ends_digest(fh: Any, size: int) -> str | None:
    """sha256 of a safetensors file's header and of the bytes around each boundary between its
    tensors (None for a file that is not one: a damaged file fails to load, and says so there)."""
    fh.seek(0)
    head = fh.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):  # (a damaged length read no more than safetensors would)
        return None
    header = fh.read(length)
    try:
        tensors = json.loads(header)
        offsets = {int(offset) for name, entry in tensors.items() if name != "__metadata__"
                   for offset in entry["data_offsets"]}  # fmt: skip
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    digest = hashlib.sha256(header)
    data_start, data_end = 8 + length, size
    for offset in sorted(offsets):  # (one read covers one tensor's end and the next one's start)
        start = max(data_start, data_start + offset - TENSOR_END_BYTES)
        fh.seek(start)
        digest.update(fh.read(max(0, min(data_end, data_start + offset + TENSOR_END_BYTES) - start)))
    return digest.hexdigest()


def record(model: ModelConfig, run_dir: Path, seed: int) -> None:
    """Write the fingerprint of the weights a run starts from (a model built from scratch: its
    ``seed``), and of its config.json and code."""
    path = run_dir / BASE_WEIGHTS_FILE
    directory = model_directory(model)
    files = fingerprint(directory) if directory is not None and not model.from_scratch else {}
    configs = config_fingerprint(directory) if directory is not None else {}
    if directory is None or not (files or (model.from_scratch and configs)):  # (nothing there: its load says so)
        path.unlink(missing_ok=True)  # (a stale record, of a run started afresh in this directory)
        return
    entry: dict[str, Any] = {"name_or_path": model.name_or_path, "directory": str(directory.resolve()),
                             "files": files, "config_files": configs}  # fmt: skip
    if model.from_scratch:
        entry["seed"] = seed
    text = json.dumps(entry, indent=2)
    write_text_atomic(path, text + "\n")


def check_unchanged(model: ModelConfig, record_file: Path, consequence: str, seed: int | None) -> None:
    """ConfigError when ``model``'s weights, config.json or code (from scratch: its ``seed``, None
    where the base's values are not used again, as by a full fine-tune's resume) are not those
    recorded in ``record_file`` (a run's ``BASE_WEIGHTS_FILE``, or a checkpoint's copy) when the run
    started. ``consequence``: what using them would do, and what to do instead. A run recorded
    nothing before this check existed: nothing to compare (nor config files, seeds or tensor ends,
    before they were)."""
    path = record_file
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
    recorded_seed = recorded_run.get("seed")
    if model.from_scratch and seed is not None and isinstance(recorded_seed, int) and recorded_seed != seed:
        raise ConfigError(
            [
                f"train.seed={seed}: model.name_or_path={model.name_or_path} is built from scratch, and this run's "
                f"base was drawn with train.seed={recorded_seed}, recorded in {path}: another seed draws another base "
                f"model; set train.seed={recorded_seed}"
            ]
        )
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
    changed = sorted(name for name in current.keys() & recorded.keys() if not _same(recorded[name], current[name]))
    gone, new = sorted(recorded.keys() - current.keys()), sorted(current.keys() - recorded.keys())
    return (
        [f"{name} differs" for name in changed]
        + [f"{name} is gone" for name in gone]
        + [f"{name} is new" for name in new]
    )


def _same(recorded: Any, current: Any) -> bool:
    """A file's record and its fingerprint now agree on what the record holds (one written before
    tensor ends were recorded compares size and samples alone)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return all(current.get(key) == value for key, value in recorded.items())
    return bool(recorded == current)
