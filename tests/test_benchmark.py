"""scripts/benchmark.py runs the systems on the same work at each length, with the roofline, and
the growth study; one table, a JSON and a PNG each (no timing asserts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_script

from rlhf import cpu_memory
from rlhf.cpu_memory import malloc_choice

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _expected_allocator() -> str:
    """What a benchmark child's keep_freed_memory gives on this host: the heap also marked for huge
    pages where the kernel hands them out on request and nothing rules the range out."""
    choice = malloc_choice()
    return f"{choice}+thp" if choice == "keep" and cpu_memory.huge_page_heap_wanted() else choice


def test_length_sweep_of_ours_and_trl_with_roofline_floor_and_profile(tiny_model_dir, tmp_path):
    out = tmp_path / "bench" / "sweep.json"
    result = run_script("benchmark.py", "--model", str(tiny_model_dir), "--systems", "ours-grpo", "trl-grpo",
                        "--steps", "1", "--warmup_steps", "0", "--prompts_per_step", "2", "--num_generations", "2",
                        "--lengths", "3", "5", "--lora_r", "4", "--roofline", "true", "--floor", "true",
                        "--profile", "true", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [run["max_new_tokens"] for run in report["runs"]] == [3, 5]
    for run in report["runs"]:
        length = run["max_new_tokens"]
        for system in ("ours-grpo", "trl-grpo"):
            numbers = run["results"][system]
            assert "error" not in numbers, numbers
            assert numbers["steps_measured"] == 1 and numbers["peak_rss_mb"] > 50
            assert "peak_gpu_mb" not in numbers  # no GPU used
            assert numbers["generation_s"] > 0 and numbers["update_s"] > 0
            assert math.isclose(numbers["samples_per_second"] * numbers["step_time_s"], 4)  # 2 prompts x 2
            # full-length responses in both systems: 4 rows x length tokens each
            assert math.isclose(numbers["tokens_per_second"] * numbers["step_time_s"], 4 * length)
        ours, trl = run["results"]["ours-grpo"], run["results"]["trl-grpo"]
        assert ours["response_length"] == length and ours["prompt_length"] > 1
        ratios = run["ratios_ours_grpo_over_trl_grpo"]
        assert math.isclose(ratios["samples_per_second"], ours["samples_per_second"] / trl["samples_per_second"])
        assert math.isclose(ratios["update_s"], ours["update_s"] / trl["update_s"])
        assert run["results"]["floor"]["floor_step_s"] > 0 and run["ours_grpo_step_over_floor"] > 0
        roofline = run["roofline"]
        assert roofline["step_shape"]["response_length"] == length
        # the update took the response's and the prompt prefix's frozen products from the sampler:
        # the bound counts neither forward (before, the prefix's was counted twice)
        assert roofline["step_shape"]["sampled_forward"] and roofline["step_shape"]["sampled_prefix"]
        assert roofline["step_shape"]["sampled_logits"]  # and the LM head's forward over the response
        assert roofline["step_shape"]["sampled_attention"]  # and the attention's
        for phase in ("generation", "update"):
            assert roofline[phase]["bound_s"] > 0 and roofline[phase]["flops"] > 0
            assert math.isclose(roofline[phase]["achieved"], roofline[phase]["bound_s"] / ours[f"{phase}_s"])
        assert roofline["logprobs"]["bound_by"] == "nothing"  # one update per rollout: no separate pass
    machine = report["machine"]
    assert machine["bandwidth"] > 0 and machine["decode_flops"] > 0 and machine["batch_flops"] > 0
    assert machine["details"]["decode"]["rows"] == 4

    table = out.with_suffix(".md").read_text()
    assert table.strip() in result.stdout
    for length in (3, 5):
        for row in ("ours-grpo", "trl-grpo", "ours-grpo / trl-grpo", "roofline bound", "ours-grpo % of bound"):
            assert f"| {length} | {row} |" in table
        # no separate logprob pass: no bound for it, "—" as in the share row (it read 0.000)
        bound_row = next(line for line in table.splitlines() if line.startswith(f"| {length} | roofline bound |"))
        header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
        assert [cell.strip() for cell in bound_row.strip("|").split("|")][header.index("logprobs s")] == "—"
    assert "machine (" in table and "every row runs to the length" in table
    assert "3 new tokens, floor: generate " in table and " MB" in table and "peak_rss_mb" not in table
    assert report["malloc"] == _expected_allocator()  # every system's process alike
    assert {run["results"][system]["malloc"] for run in report["runs"] for system in ("ours-grpo", "trl-grpo")} == {
        report["malloc"]}  # each trainer's process says what it got
    if report["malloc"] == "keep":
        assert "freed buffers kept for reuse in every system's process" in table
    if report["malloc"] == "keep+thp":
        assert "freed buffers kept for reuse, the heap grown in transparent huge pages, in every system's" in table
    assert out.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    profile = out.with_suffix(".profile.txt").read_text()
    for phase in ("rollout", "score", "make_experience", "update"):
        assert f"## {phase}" in profile
    assert "aten::mm" in profile


@pytest.fixture(scope="module")
def wider_tiny_model_dir(tmp_path_factory):
    """A second tiny Llama, wider and deeper than tiny_model_dir, for the model-size axis."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conftest import FIXTURES

    directory = tmp_path_factory.mktemp("wider-tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_growth_against_length_group_and_model(tiny_model_dir, wider_tiny_model_dir, tmp_path):
    out = tmp_path / "grow.json"
    result = run_script("benchmark.py", "--model", str(tiny_model_dir), "--grow", "--steps", "1", "--warmup_steps", "0",
                        "--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "3", "--lora_r", "4",
                        "--lengths", "3", "5", "--grow_generations", "2", "3",
                        "--grow_models", str(tiny_model_dir), str(wider_tiny_model_dir), "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    points = [(row["axis"], row["max_new_tokens"], row["num_generations"], row["model"]) for row in report["rows"]]
    tiny, wider = str(tiny_model_dir), str(wider_tiny_model_dir)
    assert points == [("response length", 3, 2, tiny), ("response length", 5, 2, tiny), ("group size", 3, 2, tiny),
                      ("group size", 3, 3, tiny), ("model", 3, 2, tiny), ("model", 3, 2, wider)]
    for row in report["rows"]:
        assert "error" not in row, row
        assert row["step_time_s"] > 0 and row["peak_rss_mb"] > 50
        assert math.isclose(row["samples_per_second"] * row["step_time_s"], 2 * row["num_generations"])
    assert report["rows"][-1]["parameters"] > report["rows"][-2]["parameters"]
    # the base point (3 tokens, group 2, the tiny model) ran once and serves all three axes
    assert report["rows"][0]["step_time_s"] == report["rows"][2]["step_time_s"] == report["rows"][4]["step_time_s"]
    assert result.stdout.count("ours-grpo (") == 4
    table = out.with_suffix(".md").read_text()
    assert "| group size | 3 |" in table and f"| model | {wider} |" in table
    assert out.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


def test_benchmark_unknown_system_exits_2(tmp_path, run_here):
    result = run_here("benchmark.py", "--systems", "openrlhf", "--out", str(tmp_path / "b.json"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown system(s) openrlhf; choose from ours-grpo, ours-ppo, ours-reinforce, trl-grpo")
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--lengths", "32", "-8"], "lengths must be response lengths >= 1, got 32 -8"),
    (["--lengths", "32", "many"], "lengths expects a list of int values"),
    (["--lenghts", "32"], "lenghts"),
    (["--roofline", "maybe"], "roofline expects bool"),
    (["--model", "random:gpt5"], "unknown random model 'random:gpt5'"),
    (["--grow", "--grow_models", "random:smollm2-7b"], "unknown random model 'random:smollm2-7b'"),
    (["--grow", "--grow_generations", "1", "4"], "grow_generations must be group sizes >= 2"),
    (["--num_generations", "1"], "set num_generations >= 2"),
    (["--roofline", "--systems", "trl-grpo"], "add ours-grpo to --systems"),
    (["--grow", "--roofline"], "grow times our GRPO alone: drop --roofline"),
    (["--bf16", "--roofline"], "roofline measures float32 GEMM rates"),
    (["--roofline", "--full_length", "false"], "roofline counts every row decoded to the full length"),
])
def test_bad_benchmark_input_is_one_line_and_exit_2(args, message, tmp_path, run_here):
    result = run_here("benchmark.py", *args, "--out", str(tmp_path / "b.json"))
    assert_one_line_error(result, message)
    assert not list(tmp_path.iterdir())


def test_bf16_loads_every_systems_weights_in_bfloat16(tiny_model_dir, tmp_path):
    """--bf16 is the same setting for every system: ours through its config, TRL's model loaded in
    bfloat16 with bf16=True (as a TRL user on a GPU runs it)."""
    import torch

    from rlhf.benchmark import BenchmarkConfig, ours_config, trl_grpo_trainer
    from rlhf.benchmark_report import WEIGHTS_NOTE

    config = BenchmarkConfig(model=str(tiny_model_dir), bf16=True, max_new_tokens=4)
    assert ours_config("grpo", config, tmp_path / "ours", 1).bf16 is True
    assert ours_config("grpo", BenchmarkConfig(model=str(tiny_model_dir)), tmp_path / "plain", 1).bf16 is False
    trainer = trl_grpo_trainer(config, tmp_path / "trl", lambda completions, **kwargs: [0.0] * len(completions), 1)
    assert trainer.args.bf16 is True
    base = trainer.model.get_base_model()
    assert {p.dtype for p in base.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert "bfloat16 in every system" in WEIGHTS_NOTE[True] and "float32" in WEIGHTS_NOTE[False]


def test_a_run_on_a_gpu_reports_its_peak_gpu_memory(monkeypatch):
    """On a GPU peak RSS counts host memory only: each system's process also records the GPU and
    the most memory PyTorch's allocator handed out, and the table's notes say both."""
    import torch

    from rlhf import benchmark
    from rlhf.benchmark_report import render_sweep

    assert benchmark._gpu_facts() == {}  # this machine: no GPU used
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2 ** 30)
    assert benchmark._gpu_facts() == {"gpu": "NVIDIA H100 80GB HBM3", "peak_gpu_mb": 3072.0}

    report = json.loads((Path(__file__).parents[1] / "scripts" / "results" / "sweep.json").read_text())
    for run in report["runs"]:
        run["results"]["ours-grpo"].update(gpu="NVIDIA H100 80GB HBM3", peak_gpu_mb=3072.0)
        run["results"]["trl-grpo"].update(gpu="NVIDIA H100 80GB HBM3", peak_gpu_mb=5120.4)
    length = report["runs"][0]["max_new_tokens"]
    assert (f"{length} new tokens, peak GPU memory (PyTorch's allocator): ours-grpo 3072 MB on NVIDIA H100 80GB "
            "HBM3, trl-grpo 5120 MB on NVIDIA H100 80GB HBM3") in render_sweep(report)


def test_trl_runs_on_the_gpu_where_ours_does(monkeypatch, tmp_path):
    """Our trainer's Accelerator takes the GPU where there is one; TRL's GRPOTrainer in the
    benchmark and the learning race must too (it was pinned to the CPU: on a GPU machine the
    comparison would have set our GPU against TRL on the host's cores)."""
    import torch
    import trl

    from rlhf.benchmark import BenchmarkConfig, trl_grpo_settings

    config = BenchmarkConfig(model="random:smollm2-135m", systems=["trl-grpo"])
    assert trl_grpo_settings(config, tmp_path, 1).use_cpu  # this machine: no GPU
    # GRPOConfig would take the GPU it is told of at once: the settings it is given are checked
    monkeypatch.setattr(trl, "GRPOConfig", lambda **settings: settings)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trl_grpo_settings(config, tmp_path, 1)["use_cpu"] is False


def test_trl_gets_plain_text_prompts_where_the_tokenizer_has_no_chat_template(tiny_model_dir, tmp_path):
    """Ours formats a prompt as plain text for a base model's tokenizer (no chat template); TRL was
    always given chat messages, so its row failed ('Cannot use chat template functions ...')."""
    import shutil

    from rlhf.benchmark import BenchmarkConfig, trl_grpo_trainer
    from rlhf.data import format_prompt
    from rlhf.models import load_tokenizer

    def first_prompt(model):
        config = BenchmarkConfig(model=str(model), systems=["trl-grpo"], max_new_tokens=2, prompts_per_step=1,
                                 num_generations=2)
        def reward(prompts, completions, **kwargs):
            return [0.0] * len(prompts)
        trainer = trl_grpo_trainer(config, tmp_path / model.name, reward, 1)
        return trainer.train_dataset[0]["prompt"]
    assert load_tokenizer(str(tiny_model_dir)).chat_template
    assert first_prompt(tiny_model_dir)[0]["role"] == "user"
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = load_tokenizer(str(base))
    assert not tokenizer.chat_template
    prompt = first_prompt(base)
    assert isinstance(prompt, str) and prompt == format_prompt(prompt, tokenizer)


def test_tokens_per_second_agrees_with_samples_per_second_over_an_even_number_of_steps():
    """With full-length responses every step holds the same tokens, so tokens/s is samples/s times
    the length whatever the number of steps (a review's --steps 2 run had 479 tokens/s beside 49.1
    samples/s x 8 tokens = 393: the median of the per-step rates, the mean of the two, against
    the rows over the median step)."""
    from rlhf.benchmark import _summarise

    rows = [{"step": step, "tokens": 16 * 8, "generation": 0.1, "scoring": 0.0, "logprobs": 0.0, "update": 0.1}
            for step in (0.2, 0.45)]
    numbers = _summarise(rows, 16)
    assert math.isclose(numbers["tokens_per_second"], numbers["samples_per_second"] * 8)
    assert math.isclose(numbers["tokens_per_second"] * numbers["step_time_s"], 16 * 8)
