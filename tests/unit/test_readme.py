"""Every sala-train / sala-data command the README shows passes the command-line check, so the
user's manual cannot drift from the config (misspelt keys, bad values, impossible combinations).
Data files the commands name are not here; only "file not found" problems are set aside."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from sala_train.config.compose import check_command_line
from sala_train.config.entries import conf_dir, use_user_config_dirs
from sala_train.config.schema import DataToolConfig, RunConfig
from sala_train.config.typed import ConfigError

README = Path(__file__).parents[2] / "README.md"
PLACEHOLDERS = {
    "launcher.node_rank=R": "launcher.node_rank=0",
    "model.name_or_path=...": "model.name_or_path=org/model",
}


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.split(" ")[0] in ("sala-train", "sala-data"):
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_passes_the_config_check(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = yaml.safe_load((conf_dir() / "dataset" / "messages.yaml").read_text())
    entry.update(name="mine", train=["data/mine.jsonl"], val_size=0.1)
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "mine.yaml").write_text(yaml.safe_dump(entry))
    program, *argv = shlex.split(command)
    argv = [PLACEHOLDERS.get(arg, arg) for arg in argv if arg != "..."]
    config, schema = ("train", RunConfig) if program == "sala-train" else ("data", DataToolConfig)
    try:
        check_command_line(argv, config, schema)
    except ConfigError as err:
        problems = [p for p in err.problems if "file not found" not in p]
        assert problems == [], command
    finally:
        use_user_config_dirs([])
