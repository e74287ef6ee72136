"""Typed config: schemas, validation, composition checks, and the resolved run file."""
