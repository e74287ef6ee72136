"""Shared fixtures: the tiny tokenizer, the project's shared data, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_CHAT = REPO / "sala_train" / "assets" / "models" / "tiny-chat"
GUIDE_DATA = SHARED / "data" / "minicpm-sala-finetune"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_CHAT)


@pytest.fixture(scope="session")
def guide_data() -> Path:
    if not GUIDE_DATA.is_dir():
        pytest.skip(f"the guide's data is not at {GUIDE_DATA}")
    return GUIDE_DATA


def run_cli(
    *args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a console script as a user would, in ``cwd`` (``env`` adds to the environment)."""
    scripts = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [str(scripts / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# A finished full fine-tuning run, trained once and shared by the tests that only read it or that
# check a command refuses it (a training run costs ~13 s here, mostly imports). Those tests must
# leave it as it is; each asserts that its refusal wrote nothing.
FULL_RUN_ARGS = ("sala-train", "method=full", "hydra.run.dir=run", "train.learning_rate=1e-3", "train.max_steps=6",
                 "train.save_steps=3", "train.eval_steps=3", "train.logging_steps=1")  # fmt: skip


@pytest.fixture(scope="session")
def full_run(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("full_run")
    proc = run_cli(*FULL_RUN_ARGS, cwd=where)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return where / "run"
