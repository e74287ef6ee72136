"""Package data: the demo data set and the tiny model's tokenizer and config."""
