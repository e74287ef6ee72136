"""Record where a run came from, so it can be reproduced from its directory alone.

Package versions, sala-train's version and git commit, the working directory's git commit, host,
GPUs and the exact command line. Written by the launching process; no secrets (environment
variables are not recorded).
"""

from __future__ import annotations

import json
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from sala_train.atomic import write_text_atomic

PROVENANCE_FILE = "provenance.json"
PACKAGES = ("sala-train", "torch", "transformers", "peft", "datasets", "accelerate", "tokenizers",
            "deepspeed", "hydra-core", "omegaconf", "trl", "tensorboard", "wandb")  # fmt: skip


def override_key(item: str) -> str:
    """``train.lr`` of ``train.lr=1e-4``, ``+train.lr=...`` or ``~train.lr``."""
    return item.split("=", 1)[0].lstrip("+~")


def without_dry_run(overrides: list[str]) -> list[str]:
    """A command's overrides less ``launcher.dry_run``: a dry run records (and reports) the
    command its printed command then trains."""
    return [item for item in overrides if override_key(item) != "launcher.dry_run"]


def one_trial(overrides: list[str]) -> list[str]:
    """An Optuna trial's overrides as the command of that trial alone: its ``hparams_search``
    preset (which would start a new search) replaced by what the preset sets besides the search,
    its method and fixed keys, where the command line does not set them. The trial's searched
    values are among ``overrides`` already."""
    search = next((item for item in overrides if override_key(item) == "hparams_search"), None)
    if search is None or "=" not in search:  # (`~hparams_search`: none)
        return overrides
    preset = Path(__file__).parent / "conf" / "hparams_search" / f"{search.split('=', 1)[1]}.yaml"
    if not preset.is_file():  # a user's own preset: kept (its command then searches again)
        return overrides
    import yaml

    spec = yaml.safe_load(preset.read_text(encoding="utf-8"))
    implied = [f"{k.removeprefix('override /')}={v}" for d in spec.get("defaults", []) if isinstance(d, dict)
               for k, v in d.items() if not k.removeprefix("override /").startswith("hydra")]  # fmt: skip

    def flat(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [item for key, value in node.items() for item in flat(value, f"{prefix}{key}.")]
        return [f"{prefix[:-1]}={'null' if node is None else node}"]

    implied += flat({k: v for k, v in spec.items() if k not in ("defaults", "hydra")}, "")
    given = {override_key(item) for item in overrides}
    kept = [item for item in overrides if item != search]
    return kept + [item for item in implied if override_key(item) not in given]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(cwd: Path, *args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _repo_state(path: Path) -> dict[str, Any] | None:
    commit = _git(path, "rev-parse", "HEAD")
    if commit is None:
        return None
    dirty = bool(_git(path, "status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit, "dirty": dirty, "root": _git(path, "rev-parse", "--show-toplevel")}


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []


def collect(argv: list[str], cwd: Path, sweep_dir: Path | None = None) -> dict[str, Any]:
    return {
        "command": argv,
        "sweep_dir": str(sweep_dir) if sweep_dir else None,  # its multirun.yaml holds the sweep
        "cwd": str(cwd),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "packages": {name: _version(name) for name in PACKAGES},
        "sala_train_source": _repo_state(Path(__file__).resolve().parent),
        "cwd_repository": _repo_state(cwd),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "gpus": _gpus(),
    }


def write(run_dir: Path, argv: list[str], cwd: Path, sweep_dir: Path | None = None) -> Path:
    path = run_dir / PROVENANCE_FILE
    write_text_atomic(path, json.dumps(collect(argv, cwd, sweep_dir), indent=2) + "\n")
    return path
