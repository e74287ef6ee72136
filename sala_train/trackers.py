"""External experiment trackers (``logger`` group): TensorBoard and Weights & Biases.

Both use transformers' own callbacks; this module only decides where they write, what run they
attach to, and whether W&B can be online. Secrets: the W&B API key is read by wandb itself from
``WANDB_API_KEY`` or ``~/.netrc``; sala-train only checks that one exists and never records it.
"""

from __future__ import annotations

import netrc
import os
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from sala_train.atomic import write_text_atomic
from sala_train.config.schema import NoLogger, RunConfig, TensorboardLogger, WandbLogger, WandbMode
from sala_train.config.typed import ConfigError, to_plain
from sala_train.console import say

TENSORBOARD_DIR = "tensorboard"
WANDB_HOST = "https://api.wandb.ai"


def tracker_callbacks(cfg: RunConfig, run_dir: Path, is_main_process: bool, resume_step: int = 0) -> list[Any]:
    """The Trainer callbacks for ``cfg.logger``; trackers live on the main process only.
    ``resume_step``: the checkpoint's step (0 when starting over); what was logged after it goes."""
    if not is_main_process:
        return []
    match cfg.logger:
        case NoLogger():
            return []
        case TensorboardLogger():
            return [_tensorboard(cfg, run_dir, resume_step)]
        case WandbLogger() as wandb_cfg:
            return [_wandb(wandb_cfg, cfg, run_dir, resume_step)]
    raise AssertionError(cfg.logger)


def check_trackers(cfg: RunConfig) -> None:
    """Fail before any model loads when the tracker cannot run as configured."""
    if isinstance(cfg.logger, WandbLogger) and cfg.logger.mode == WandbMode.ONLINE:
        wandb_mode(cfg.logger.mode)


def check_tracker_folder(cfg: RunConfig, run_dir: Path) -> None:
    """Fail before any model loads when a file holds the place of the tracker's folder in
    ``run_dir`` (a FileExistsError traceback once the model had loaded)."""
    folder = {TensorboardLogger: TENSORBOARD_DIR, WandbLogger: str(WANDB_ID_FILE.parent)}.get(type(cfg.logger))
    if folder is not None and (run_dir / folder).exists() and not (run_dir / folder).is_dir():
        raise ConfigError([f"logger={cfg.logger.name}: {run_dir / folder} is a file, where the tracker writes its "
                           "folder; move it out of the run directory"])  # fmt: skip


def finish_trackers(cfg: RunConfig, exit_code: int = 0) -> None:
    """End the tracker's run with the run's own exit code (W&B shows a diverged run as failed,
    a preempted one as preempting, and resumes it on the rerun)."""
    if isinstance(cfg.logger, WandbLogger):
        import wandb

        from sala_train.launch.plan import PREEMPTED_EXIT

        if wandb.run is not None:
            if exit_code == PREEMPTED_EXIT:
                wandb.run.mark_preempting()
            wandb.finish(exit_code=exit_code)


def _tensorboard(cfg: RunConfig, run_dir: Path, resume_step: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations.integration_utils import TensorBoardCallback

    log_dir = str(run_dir / TENSORBOARD_DIR)
    # As metrics.jsonl is cut at the checkpoint, TensorBoard hides what an earlier attempt logged
    # past it (the steps are logged again): without this, a resumed run showed them twice.
    writer = SummaryWriter(log_dir=log_dir, purge_step=resume_step + 1 if resume_step else 0)
    writer.add_text("sala_train/config", "```yaml\n" + yaml.safe_dump(to_plain(cfg), sort_keys=False) + "```")
    callback = TensorBoardCallback(tb_writer=writer)  # type: ignore[no-untyped-call]
    callback.logging_dir = log_dir  # a writer reopened after train() (final eval) writes here too
    return callback


def _has_api_key(base_url: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(base_url).hostname or "") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(base_url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(base_url)
    try:
        port = parsed.port or (80 if parsed.scheme == "http" else 443)  # (a self-hosted server on plain http)
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(requested: WandbMode) -> tuple[str, str | None]:
    """(mode, why offline) for ``logger.mode``; ``auto`` is online only with a key and the network."""
    base_url = os.environ.get("WANDB_BASE_URL", WANDB_HOST)
    if requested == WandbMode.ONLINE and not _has_api_key(base_url):
        raise ConfigError(["logger.mode=online: no W&B API key; set WANDB_API_KEY, run `wandb login`, "
                           "or use logger.mode=auto to fall back to offline"])  # fmt: skip
    if requested != WandbMode.AUTO:
        return requested.value, None
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun"):
        return "offline", "WANDB_MODE=offline"
    if not _has_api_key(base_url):
        return "offline", "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if not _reachable(base_url):
        return "offline", f"{urlparse(base_url).hostname} is unreachable"
    return "online", None


# The W&B run of a run directory: made by the run's first session, read by its resumes and
# requeues, so they continue the same W&B run. (Derived from the path, a new run in a directory
# an earlier, removed run had used attached to that run's W&B history.)
WANDB_ID_FILE = Path("wandb") / "sala_run_id"


def _wandb_run_id(run_dir: Path, resume_step: int) -> str:
    """The run's W&B id; a new one for a session that starts over from step 0 (no checkpoint to
    resume: a run that diverged or was killed before its first save, rerun), which otherwise logged
    its steps 1, 2, ... into the abandoned attempt's W&B run, beside that attempt's own."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file() and resume_step:
        return path.read_text(encoding="utf-8").strip()
    run_id = secrets.token_hex(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, run_id + "\n")
    return run_id


def _wandb(logger: WandbLogger, cfg: RunConfig, run_dir: Path, resume_step: int) -> Any:
    import wandb
    from transformers.integrations.integration_utils import WandbCallback

    mode, why = wandb_mode(logger.mode)
    if why is not None:
        say(f"sala-train: wandb runs offline ({why}); sync later with: wandb sync {run_dir / 'wandb'}")
    wandb.init(
        project=logger.project,
        entity=logger.entity,
        group=logger.group,
        name=logger.run_name or run_dir.name,
        tags=list(logger.tags),
        config=to_plain(cfg),
        dir=str(run_dir),
        mode=mode,  # type: ignore[arg-type]
        id=_wandb_run_id(run_dir, resume_step),
        resume="allow",
        settings=wandb.Settings(console="off", silent=True),
    )
    return WandbCallback()  # type: ignore[no-untyped-call]
