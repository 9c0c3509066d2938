"""Telling a local path from a Hugging Face hub id, so that a missing local path is reported as
missing instead of being looked up (and perhaps downloaded) from the hub."""

from __future__ import annotations

from pathlib import Path

# First path parts that name this project's own outputs or the usual local folders, never hub users.
LOCAL_PREFIXES = ("outputs", "output", "checkpoints", "runs", "data", "models", "tmp")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".py", ".safetensors", ".bin")


def looks_local(spec: str) -> bool:
    """True for names meant as local paths: ./, ../, /, ~, a Windows separator, more than one
    '/', a file suffix, a first part that is a known local folder, or an existing parent dir."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    path = Path(spec)
    if path.suffix.lower() in DATA_SUFFIXES:
        return True
    if "/" in spec:
        first = spec.split("/", 1)[0]
        return first in LOCAL_PREFIXES or Path(first).is_dir()
    return False
