"""Issue 20 items 1 and 4: a merged export that plain transformers loads, and adapters that name
their base portably."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import tiny_args


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    from conftest import run_in_process

    out = tmp_path_factory.mktemp("export") / "run"
    result = run_in_process("train_ppo.py", *tiny_args(tiny_model_dir, out, "--learning_rate", "1e-2"))
    assert result.returncode == 0, "see the captured stderr of this setup"
    return out


def test_the_export_computes_what_the_adapter_model_computes(trained_run, tiny_model_dir, tmp_path, run_here):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    exported = tmp_path / "merged"
    result = run_here("export.py", "--checkpoint", str(trained_run), "--output_dir", str(exported))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (exported / "model.safetensors").is_file() and not list(exported.glob("adapter_*"))
    plain = AutoModelForCausalLM.from_pretrained(exported)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained_run / "final")
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().max()) > 0 for p in lora_b)  # the adapter changes the model: the test can fail
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 2, 30]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, adapted(ids).logits, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    source = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template == source.chat_template
    eos = GenerationConfig.from_pretrained(exported).eos_token_id
    assert source.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert plain.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)


def test_bfloat16_export_and_bad_input(trained_run, tiny_model_dir, tmp_path, run_here):
    from safetensors.torch import load_file

    exported = tmp_path / "bf16"
    assert run_here("export.py", "--checkpoint", str(trained_run / "final"), "--output_dir", str(exported),
                    "--dtype", "bfloat16").returncode == 0
    assert {t.dtype for t in load_file(str(exported / "model.safetensors")).values()} == {torch.bfloat16}
    again = run_here("export.py", "--checkpoint", str(trained_run), "--output_dir", str(exported))
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith(
        f"error: output_dir {exported} is not empty")
    model_dir = run_here("export.py", "--checkpoint", str(tiny_model_dir), "--output_dir", str(tmp_path / "x"))
    assert model_dir.returncode == 2 and "is a model, not an adapter" in model_dir.stderr
    missing = run_here("export.py", "--checkpoint", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "y"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_adapters_name_the_embedded_model_by_its_name(tiny_model_dir, tmp_path, run_here, monkeypatch):
    """Before: final/adapter_config.json named the converted cache dir of this machine."""
    from rlhf.models import EMBEDDED_MODEL

    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir, cache / EMBEDDED_MODEL)  # stands in for the converted embedded model
    monkeypatch.setenv("RLHF_CACHE_DIR", str(cache))
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, out, "--save_steps", "1")
    args[args.index("--model_name_or_path") + 1] = EMBEDDED_MODEL
    result = run_here("train_ppo.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    for adapter in (out / "final", out / "checkpoints" / "step-2"):
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_MODEL
    exported = run_here("export.py", "--checkpoint", str(out), "--output_dir", str(tmp_path / "merged"))
    assert exported.returncode == 0, exported.stderr[-2000:]


def test_final_and_the_export_carry_a_model_card_of_the_run(trained_run, tmp_path, run_here):
    """Issue 20 item 2. Before: final/README.md was peft's placeholder ("More Information Needed")."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained_run / "final" / "README.md")
    text = card.text
    assert "More Information Needed" not in text
    assert card.data.library_name == "peft" and "rlhf" in card.data.tags and "ppo" in card.data.tags
    last = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    for fragment in ("PPO", "trained for 2 RL steps", "char_diversity", "| learning_rate | `0.01` |",
                     f"| reward_mean | {last['reward_mean']:.4g} |", "Last logged metrics (step 2)", "PeftModel.from_pretrained"):
        assert fragment in text, fragment
    exported = tmp_path / "merged"
    assert run_here("export.py", "--checkpoint", str(trained_run), "--output_dir", str(exported)).returncode == 0
    merged = ModelCard.load(exported / "README.md")
    assert merged.data.library_name == "transformers" and "A merged model trained for 2 RL steps" in merged.text


class FakeHub:
    """huggingface_hub.HfApi replaced at its boundary: records calls, or fails like an offline hub."""

    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        if FakeHub.fail is not None:
            raise FakeHub.fail
        FakeHub.calls.append(("create_repo", repo_id, private))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None):
        FakeHub.calls.append(("upload_folder", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))


def test_push_to_hub_uploads_final_and_offline_is_one_line(tiny_model_dir, tmp_path, run_here, monkeypatch):
    """Issue 20 item 3 (TRL's push_to_hub / hub_model_id / hub_private_repo)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls, FakeHub.fail = [], None
    out = tmp_path / "run"
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--push_to_hub", "true", "--hub_model_id",
                                                  "me/tiny-ppo", "--hub_private_repo", "true"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert FakeHub.calls[0] == ("create_repo", "me/tiny-ppo", True)
    assert FakeHub.calls[1][:2] == ("upload_folder", "me/tiny-ppo")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(FakeHub.calls[1][2])
    assert f"pushed {out / 'final'} to https://huggingface.co/me/tiny-ppo" in result.stdout

    FakeHub.fail = ConnectionError("Cannot reach https://huggingface.co: offline mode is enabled")
    offline = tmp_path / "offline"
    result = run_here("train_ppo.py", *tiny_args(tiny_model_dir, offline, "--push_to_hub", "true"))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: could not push {offline / 'final'} to the hub as offline (ConnectionError: ")
    assert "the local copy is complete" in line and "Traceback" not in result.stderr
    assert (offline / "final" / "adapter_model.safetensors").is_file()

    FakeHub.calls, FakeHub.fail = [], None
    merged = tmp_path / "merged"
    assert run_here("export.py", "--checkpoint", str(out), "--output_dir", str(merged), "--push_to_hub", "true",
                    "--hub_model_id", "me/tiny-merged").returncode == 0
    assert FakeHub.calls[1][:2] == ("upload_folder", "me/tiny-merged") and "model.safetensors" in FakeHub.calls[1][2]


def test_an_export_of_a_checkpoint_describes_that_step(tiny_model_dir, tmp_path, run_here):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    assert run_here("train_ppo.py", *tiny_args(tiny_model_dir, out, "--max_steps", "3", "--save_steps", "1",
                                               "--save_total_limit", "3")).returncode == 0
    merged = tmp_path / "merged"
    assert run_here("export.py", "--checkpoint", str(out / "checkpoints" / "step-1"), "--output_dir",
                    str(merged)).returncode == 0
    text = ModelCard.load(merged / "README.md").text
    assert "trained for 1 RL steps" in text and "Last logged metrics (step 1)" in text


def test_evaluate_defaults_to_the_runs_own_rewards_and_shows_progress(trained_run, tmp_path, run_here):
    """Issue 20 item 6. Before: evaluate.py scored with `sentiment` unless told otherwise, and showed
    nothing while it ran."""
    out = tmp_path / "eval"
    result = run_here("evaluate.py", "--checkpoints", str(trained_run), "--num_prompts", "2", "--max_new_tokens", "4",
                      "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [str(f) for f in report["settings"]["reward_funcs"]] == [str(f) for f in __import__("yaml").safe_load(
        (trained_run / "config.yaml").read_text())["reward_funcs"]]
    assert "the run's own" in report["settings"]["reward_source"]
    assert "the run's own" in (out / "report.md").read_text()
    assert "evaluate: 100%" in result.stderr and "2/2" in result.stderr  # the progress bar reached the end


def test_plots_draw_each_reward_function_and_refuse_an_empty_run(tmp_path, run_here):
    """Issue 20 item 7. Before: a run with nothing to plot wrote nothing and exited 0."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward_mean": 0.1 * s, "reward/format": 0.2 * s, "reward/length": 1 - 0.1 * s, "kl": 0.01}
            for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_here("plot_metrics.py", str(run), "--output_dir", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "plots" / "reward_functions.png").stat().st_size > 1000
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples_per_second": 3.0}) + "\n")
    refused = run_here("plot_metrics.py", str(empty), "--output_dir", str(tmp_path / "none"))
    assert refused.returncode == 2 and "nothing to plot in" in refused.stderr and "samples_per_second" in refused.stderr
    assert not (tmp_path / "none").exists()
