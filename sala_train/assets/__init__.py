"""Package data: the demo data set and the tiny model's tokenizer and config."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf


def asset_path(relative: str) -> str:
    """Absolute path of a packaged asset: the ``${sala_asset:...}`` resolver in configs."""
    return str(Path(str(resources.files(__name__))) / relative)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sala_asset"):
        OmegaConf.register_new_resolver("sala_asset", asset_path)
