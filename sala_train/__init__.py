"""sala-train: Hydra-composed fine-tuning for MiniCPM-SALA and any Hugging Face causal LM."""

__version__ = "0.1.0"
