"""The Dockerfile cannot be built in CI (no Docker engine there); check what can go stale without one."""

from __future__ import annotations

import fnmatch
import re

from conftest import ROOT


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_copied_path_exists_and_is_not_ignored():
    copied = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    assert {"pyproject.toml", "rlhf", "reward_models", "scripts", "configs", "tests"} <= set(copied)
    ignored = dockerignore_patterns()
    for path in copied:
        assert (ROOT / path).exists(), path
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path


def test_image_pins_the_projects_torch_and_runs_the_default_job():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pinned = re.search(r"^torch==(\S+)", (ROOT / "scripts" / "constraints.txt").read_text(), re.M).group(1)
    assert f"torch=={pinned}" in dockerfile
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", dockerfile, re.M)
    assert re.search(r'^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$', dockerfile, re.M)
    assert 'CMD ["python", "scripts/train_ppo.py", "--config", "configs/ppo.yaml"]' in dockerfile
    assert (ROOT / "configs" / "ppo.yaml").is_file()
    assert {".git", ".venv", "outputs"} <= set(dockerignore_patterns())
