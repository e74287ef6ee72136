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

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the cores: with torch's default (a thread per core) and libgomp's spinning
    # waits, two concurrent tiny runs took 780 s each instead of 46 s; one thread each, 48 s.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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


# Modules whose tests run several processes or whole training runs each: run first, so that under
# pytest-xdist the two workers end together instead of one finishing a long test alone.
HEAVY_FIRST = ("test_distributed.py", "test_reliability.py", "test_sweeps.py")

# For ``-n 2 --dist loadgroup``: the tests that share ``full_run`` run on one worker, so it is
# trained once; those on the one local SLURM cluster too, so no job waits for another test's job to
# leave the nodes. Each group is named after its fixture. xdist reads groups in its own collection
# hook, before a conftest hook could add a mark, so the tests carry them.
SHARES_FULL_RUN = pytest.mark.xdist_group("full_run")
ON_LOCAL_SLURM = pytest.mark.xdist_group("slurm")
GROUPED_FIXTURES = ("full_run", "slurm")


def pytest_configure(config):
    if config.getoption("dist", "no") == "loadgroup" and tuple(map(int, pytest.__version__.split(".")[:2])) >= (9, 2):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} silently ignores --dist loadgroup (pytest-xdist#1386), so tests "
            "that share a run or the SLURM cluster would collide; install the pytest pyproject.toml names"
        )


def pytest_collection_modifyitems(config, items):
    """Order the heaviest tests first; refuse a test that uses a shared fixture without its group."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise
    for item in items:
        groups = {mark.args[0] for mark in item.iter_markers("xdist_group")}
        for fixture in GROUPED_FIXTURES:
            if fixture in getattr(item, "fixturenames", ()) and fixture not in groups:
                raise pytest.UsageError(f"{item.nodeid} uses {fixture}: mark it xdist_group({fixture!r})")


@pytest.fixture(scope="session")
def full_run(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("full_run")
    proc = run_cli(*FULL_RUN_ARGS, cwd=where)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Output is not a terminal here: no library's progress bar (transformers' on every save) writes
    # its carriage returns into what would be a log file.
    assert "Writing model shards" not in proc.stdout + proc.stderr
    return where / "run"
