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
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    into_a_file = run_here("export.py", "--checkpoint", str(trained_run), "--output_dir", str(a_file), "--overwrite", "true")
    assert into_a_file.returncode == 2 and "Traceback" not in into_a_file.stderr  # was NotADirectoryError
    assert into_a_file.stderr.strip().splitlines()[-1] == f"error: output_dir {a_file} is a file, not a folder; choose " \
        "another output_dir" and a_file.read_text() == "kept"


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


@pytest.fixture
def drawn(monkeypatch):
    """What a reader of each saved PNG sees, by file name, without reading pixels: its texts
    (titles, axis labels, ticks, legends) and its labelled lines' points."""
    from pathlib import Path

    import matplotlib.figure
    import matplotlib.text

    seen: dict[str, dict] = {}
    save = matplotlib.figure.Figure.savefig

    def savefig(figure, fname, *args, **kwargs):
        seen[Path(fname).name] = {
            "texts": [t.get_text() for t in figure.findobj(matplotlib.text.Text) if t.get_text()],
            "lines": {line.get_label(): list(zip(map(float, line.get_xdata()), map(float, line.get_ydata())))
                      for ax in figure.axes for line in ax.get_lines() if not line.get_label().startswith("_")}}
        return save(figure, fname, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


@pytest.fixture(scope="module")
def named_run(tiny_model_dir, tmp_path_factory):
    """A run with a run_name in its config.yaml and a checkpoint per step."""
    from conftest import run_in_process

    out = tmp_path_factory.mktemp("named") / "run"
    result = run_in_process("train_ppo.py", *tiny_args(tiny_model_dir, out, "--learning_rate", "1e-2", "--save_steps",
                                                        "1", "--run_name", "ppo-demo"))
    assert result.returncode == 0, "see the captured stderr of this setup"
    return out


EVAL_FLAGS = ("--num_prompts", "2", "--max_new_tokens", "4", "--include_base")


def test_evaluate_puts_its_summary_in_the_cards_and_the_export_keeps_it(named_run, tmp_path, run_here, drawn):
    """Issue 20 items 2 and 6. Before: the card had no evaluation, and the plots named the
    checkpoints "final" and "checkpoints/step-1", not their run."""
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    shutil.copytree(named_run, run)
    final, step = run / "final", run / "checkpoints" / "step-1"
    out = tmp_path / "eval"
    result = run_here("evaluate.py", "--checkpoints", str(run), str(step), *EVAL_FLAGS, "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    for adapter, label in ((final, str(run)), (step, str(step))):
        numbers = report["checkpoints"][label]
        summary = json.loads((adapter / "evaluation.json").read_text())
        assert summary["reward"] == numbers["reward"] and summary["kl_per_sequence"] == numbers["kl_per_sequence"]
        assert summary["win_rate_vs_base"] == numbers["win_rate_vs_base"]
        assert summary["base_reward"] == report["checkpoints"]["base"]["reward"]
        assert summary["num_prompts"] == 2 and summary["dataset"] == "builtin:prompts"
        assert summary["reward_funcs"] == [str(f) for f in report["settings"]["reward_funcs"]]
        assert summary["date"][:2] == "20" and summary["report"] == str(out / "report.md")
        card = ModelCard.load(adapter / "README.md")
        assert card.data.library_name == "peft" and "More Information Needed" not in card.text
        reward = numbers["reward"]
        for fragment in ("## Evaluation", "2 prompts of `builtin:prompts` (eval)",
                         f"| reward (combined) | {reward['mean']:.4g} [{reward['ci_low']:.4g}, {reward['ci_high']:.4g}] |",
                         "| win rate vs the base model (ties count half) |", "| reward of the base model |", "char_diversity"):
            assert fragment in card.text, fragment
        assert f"model card: {adapter / 'README.md'} now shows this evaluation" in result.stdout
    assert "trained for 2 RL steps" in (final / "README.md").read_text()
    assert "trained for 1 RL steps" in (step / "README.md").read_text()  # the checkpoint's own step

    # The plots name each checkpoint by its run (config.yaml's run_name) and which adapter it is.
    assert {"ppo-demo (final)", "ppo-demo (step-1)"} <= set(drawn["reward_distribution.png"]["texts"])
    assert {"ppo-demo (final) (mean)", "ppo-demo (step-1) (mean)"} <= set(drawn["reward_vs_kl.png"]["texts"])

    merged = tmp_path / "merged"
    assert run_here("export.py", "--checkpoint", str(run), "--output_dir", str(merged)).returncode == 0
    text = ModelCard.load(merged / "README.md").text
    reward = report["checkpoints"][str(run)]["reward"]
    assert "## Evaluation" in text and f"| reward (combined) | {reward['mean']:.4g} [" in text
    assert "measured on the LoRA adapter before the merge" in text
    assert json.loads((merged / "evaluation.json").read_text())["reward"] == reward


def test_evaluate_leaves_cards_it_cannot_or_should_not_update(named_run, tmp_path, run_here, monkeypatch):
    """Outside a run (no config.yaml) or in a dir it cannot write, the evaluation succeeds, says in
    one line why the card was left alone, and every file there stays as it was; so does every card
    with --update_model_cards false."""
    import os

    loose = tmp_path / "loose" / "final"  # an adapter that is not part of a run
    shutil.copytree(named_run / "final", loose)
    run = tmp_path / "run"
    shutil.copytree(named_run, run)
    before = {path: path.read_bytes() for adapter in (loose, run / "final") for path in adapter.iterdir() if path.is_file()}
    asked_not_to = run_here("evaluate.py", "--checkpoints", str(run), "--num_prompts", "1", "--max_new_tokens", "2",
                            "--output_dir", str(tmp_path / "quiet"), "--update_model_cards", "false")
    assert asked_not_to.returncode == 0 and "model card:" not in asked_not_to.stdout
    assert not (run / "final" / "evaluation.json").exists()
    real_replace = os.replace

    def read_only_run(src, dst, *args, **kwargs):  # root writes through chmod: refuse like a read-only mount
        if str(run) in str(dst):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", read_only_run)
    result = run_here("evaluate.py", "--checkpoints", str(loose), str(run), "--num_prompts", "1", "--max_new_tokens",
                      "2", "--output_dir", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert f"model card: {loose} is not part of a run (no config.yaml next to it); its card is left as it was" in lines
    assert any(line.startswith(f"model card: could not update {run / 'final'} (") and "Permission denied" in line
               for line in lines), result.stdout
    after = {path: path.read_bytes() for adapter in (loose, run / "final") for path in adapter.iterdir() if path.is_file()}
    assert after == before  # nothing added (no evaluation.json, no temp file), nothing changed


def test_plots_draw_dpo_and_reward_model_runs_and_both_reward_spellings(tmp_path, run_here, drawn):
    """Issue 20 item 7. Before: DPO and reward-model runs had "nothing to plot" (their metrics.jsonl
    holds loss / accuracy / margin, as rlhf.tracking.write_trainer_log writes them), and a run
    logging TRL's rewards/<name>/mean had no per-function curves."""
    def write(name, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    dpo = write("dpo", [{"step": s, "loss": 0.69 - 0.01 * s, "epoch": s / 4, "accuracy": min(1.0, 0.3 * s),
                         "margin": 0.001 * s} for s in range(1, 7)] + [
        {"step": 6, "eval_accuracy_before": 0.0, "eval_margin_before": 0.0, "eval_loss_before": 0.693,
         "eval_accuracy_after": 1.0, "eval_margin_after": 0.0044, "eval_loss_after": 0.691, "train_steps": 6}])
    rm = write("rm", [{"step": s, "loss": 0.6931 - 1e-5 * s, "accuracy": 0.5 + 0.05 * s, "epoch": s / 8}
                      for s in range(1, 7)] + [{"step": 6, "train_pairwise_accuracy": 0.9, "eval_pairwise_accuracy": 0.8}])
    result = run_here("plot_metrics.py", dpo, rm, "--output_dir", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"loss.png", "accuracy.png", "margin.png"} <= {p.name for p in (tmp_path / "plots").iterdir()}
    loss, accuracy = drawn["loss.png"]["lines"], drawn["accuracy.png"]["lines"]
    assert {"dpo train", "rm train"} <= set(loss) and "optimizer step" in drawn["loss.png"]["texts"]
    assert loss["dpo held-out"] == [(0.0, 0.693), (6.0, 0.691)]  # eval_*_before at step 0, eval_*_after at the end
    assert accuracy["dpo held-out"] == [(0.0, 0.0), (6.0, 1.0)] and accuracy["rm held-out"] == [(6.0, 0.8)]
    assert accuracy["rm all train pairs"] == [(6.0, 0.9)] and len(accuracy["rm train batches"]) == 6
    assert drawn["margin.png"]["lines"]["dpo held-out"] == [(0.0, 0.0), (6.0, 0.0044)]

    old_and_new = write("grpo", [{"step": 1, "reward_mean": 0.1, "reward/format": 0.2},
                                 {"step": 2, "reward_mean": 0.2, "rewards/format/mean": 0.4, "rewards/format/std": 0.1}])
    result = run_here("plot_metrics.py", old_and_new, "--output_dir", str(tmp_path / "grpo_plots"))
    assert result.returncode == 0, result.stderr[-2000:]
    # One curve across both spellings; the std is no function of its own.
    assert drawn["reward_functions.png"]["lines"] == {"grpo format": [(1.0, 0.2), (2.0, 0.4)]}


def test_card_of_an_embedded_model_run_says_how_to_load_its_base():
    from rlhf.card import render_model_card

    card = render_model_card({"model_name_or_path": "smollm2-135m-instruct", "reward_funcs": ["sentiment"]}, None, 3)
    assert "rlhf.models.load_base_model('smollm2-135m-instruct')" in card and "HuggingFaceTB/SmolLM2-135M-Instruct" in card
    # any other base (a local dir here; a hub id takes the same branch) loads as named; nothing loads in the test
    other = render_model_card({"model_name_or_path": "my-policy-0.5b"}, None, 3)
    assert "AutoModelForCausalLM.from_pretrained('my-policy-0.5b')" in other


def test_an_export_never_replaces_its_adapter_its_run_or_its_base(trained_run, tiny_model_dir, tmp_path, run_here):
    """--overwrite replaces output_dir whole. Before: output_dir = the run (or its final/) printed
    'exported RUN -> RUN' and left only the merged model (checkpoints, metrics, adapter gone), and
    output_dir = the adapter's base dir replaced the base, under every adapter that names it."""
    run, base = tmp_path / "run", tmp_path / "base"
    shutil.copytree(trained_run, run)
    shutil.copytree(tiny_model_dir, base)
    config_path = run / "final" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(config))
    before = {path: path.read_bytes() for path in [*run.rglob("*"), *base.rglob("*")] if path.is_file()}
    for target, what in ((run, "the adapter it merges"), (run / "final", "the adapter it merges"),
                         (base, "its base model")):
        result = run_here("export.py", "--checkpoint", str(run), "--output_dir", str(target),
                          "--overwrite_output_dir", "true")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: output_dir {target} holds {what}")
    assert {path: path.read_bytes() for path in [*run.rglob("*"), *base.rglob("*")] if path.is_file()} == before
    beside = run_here("export.py", "--checkpoint", str(run), "--output_dir", str(tmp_path / "merged"),
                      "--overwrite", "true")
    assert beside.returncode == 0 and (tmp_path / "merged" / "model.safetensors").is_file()
