"""Random-initialised Llama models of published shapes, for timing at sizes nobody has to download.

``random:smollm2-360m`` is a LlamaForCausalLM with SmolLM2-360M's dimensions (from its
config.json on the hub) and the embedded model's tokenizer (every SmolLM2 size shares its
49,152-token vocabulary), its weights drawn from the config's initialiser: the FLOPs, bytes and
memory of a step are those of the real model, its outputs are noise. For benchmarks only.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf.errors import ConfigError
from rlhf.signals import stop_process

PREFIX = "random:"
RANDOM_DIR_PREFIX = "rlhf-random-models-"  # the temporary dir ``materialised`` writes them in
_SMOLLM2 = {"vocab_size": 49152, "max_position_embeddings": 8192, "head_dim": 64, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True, "rope_theta": 100000.0}
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {**_SMOLLM2, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3},
    "smollm2-360m": {**_SMOLLM2, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 15, "num_key_value_heads": 5},
    "smollm2-1.7b": {**_SMOLLM2, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 130000.0},
}


def is_random(spec: str) -> bool:
    return spec.startswith(PREFIX)


def check_spec(spec: str) -> None:
    """Raise ConfigError for ``random:<unknown>``; anything else is left to the model loader."""
    if is_random(spec) and spec[len(PREFIX):] not in SHAPES:
        raise ConfigError(f"unknown random model {spec!r}; choose from {', '.join(PREFIX + n for n in SHAPES)}")


def shape_of(spec: str) -> dict[str, Any]:
    """The LlamaConfig fields of ``random:<shape>``."""
    check_spec(spec)
    return dict(SHAPES[spec[len(PREFIX):]])


def llama_config(shape: dict[str, Any], tokenizer: Any) -> Any:
    """A LlamaConfig of ``shape`` (rlhf.random_models.SHAPES) with the tokenizer's special ids."""
    from transformers import LlamaConfig

    fields = dict(shape)
    rope = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    return LlamaConfig(**fields, rope_parameters=rope, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def save_random_model(shape: dict[str, Any], directory: Path, seed: int = 0, tokenizer_from: str | None = None) -> Path:
    """Write a random-initialised Llama of ``shape`` as a model dir (float32 safetensors + the
    tokenizer of ``tokenizer_from``, by default the embedded model's)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from rlhf.models import EMBEDDED_MODEL, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_from or EMBEDDED_MODEL))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape, tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@contextmanager
def materialised(specs: list[str], seed: int = 0, tokenizer_from: str | None = None) -> Iterator[dict[str, str]]:
    """{spec: what to load}: each ``random:`` spec written once to a temporary dir (removed on
    exit), any other spec as it is. Each model is built in a child process: the caller's memory
    stays free for the runs that load it (a 1.7B float32 model is 6.8 GB)."""
    import multiprocessing

    paths: dict[str, str] = {}
    root = Path(tempfile.mkdtemp(prefix=RANDOM_DIR_PREFIX)) if any(map(is_random, specs)) else None
    try:
        for spec in dict.fromkeys(specs):
            if not is_random(spec) or root is None:
                paths[spec] = spec
                continue
            directory = root / spec[len(PREFIX):]
            process = multiprocessing.get_context("spawn").Process(
                target=save_random_model, args=(shape_of(spec), directory, seed, tokenizer_from))
            process.start()
            try:
                process.join()
            finally:  # stopped (Ctrl-C, SIGTERM) while it builds: it would write on into the dir removed below
                if process.is_alive():
                    stop_process(process)
            if process.exitcode != 0:
                raise RuntimeError(f"building {spec} failed (exit code {process.exitcode}; its error is above)")
            paths[spec] = str(directory)
        yield paths
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
