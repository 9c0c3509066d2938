"""scripts/benchmark.py refuses bad input in one line before anything runs or is written, never
replaces an earlier run's results with an error-only report, and never waits forever on a system
whose process died."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from rlhf import benchmark
from rlhf.benchmark import BenchmarkConfig, benchmark_to_files, check_inputs, run_benchmark, run_process
from rlhf.errors import ConfigError


def _config(tmp_path, **changes) -> BenchmarkConfig:
    studies = changes.get("grow") or changes.get("learning")  # their own systems: no --systems there
    return BenchmarkConfig(**{"systems": list(benchmark.SYSTEMS) if studies else ["ours-grpo"], "steps": 1,
                              "warmup_steps": 0, "max_new_tokens": 4, "out": str(tmp_path / "bench.json"), **changes})


def test_an_out_that_cannot_hold_the_results_is_refused_before_any_run(tmp_path, tiny_model_dir):
    model = str(tiny_model_dir)
    with pytest.raises(ConfigError, match="is a folder, where the run would write a file"):
        check_inputs(_config(tmp_path, model=model, out=str(tmp_path)))
    (tmp_path / "table.md").mkdir()  # where the table of --out table.json would go
    with pytest.raises(ConfigError, match="table.md is a folder, where the run would write a file"):
        check_inputs(_config(tmp_path, model=model, out=str(tmp_path / "table.json")))
    for suffix in (".md", ".png", ".MD"):  # the table or the plot would be written over the JSON
        with pytest.raises(ConfigError, match=f"another suffix than \\{suffix}"):
            check_inputs(_config(tmp_path, model=model, out=str(tmp_path / f"bench{suffix}")))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="a_file is a file, not a folder"):
        check_inputs(_config(tmp_path, model=model, out=str(a_file / "deeper" / "bench.json")))
    assert check_inputs(_config(tmp_path, model=model, out=str(tmp_path / "new" / "deeper" / "bench"))) == (
        tmp_path / "new")  # no suffix is fine; the outermost folder made is returned
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())  # no probe left
    assert check_inputs(_config(tmp_path, model=model, out=str(tmp_path / "new" / "deeper" / "b.json"))) is None
    check_inputs(_config(tmp_path, model=model, systems=["ours-ppo"], num_generations=1))  # no group needed


def test_profile_runs_our_grpo_so_it_needs_a_group():
    with pytest.raises(ConfigError, match="set num_generations >= 2"):
        BenchmarkConfig(systems=["ours-ppo"], num_generations=1, profile=True)
    BenchmarkConfig(systems=["ours-ppo"], num_generations=1)


def test_what_would_fail_in_every_system_is_refused_up_front(tmp_path, tiny_model_dir, monkeypatch):
    with pytest.raises(ConfigError, match="cannot load model|no such local dir|does not exist"):
        check_inputs(_config(tmp_path, model=str(tmp_path / "nope")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "abc"}))
    with pytest.raises(ConfigError, match="cannot load model") as refused:
        check_inputs(_config(tmp_path, model=str(broken)))
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="need 696 positions, and .* has 512 .* choose shorter --lengths"):
        check_inputs(_config(tmp_path, model=str(tiny_model_dir), lengths=[8, 600]))  # the tiny Llama's 512
    with pytest.raises(ConfigError, match="need 696 positions"):  # --grow's other axes run at max_new_tokens
        check_inputs(_config(tmp_path, model=str(tiny_model_dir), grow=True, lengths=[8], max_new_tokens=600,
                             grow_models=[str(tiny_model_dir)]))
    with pytest.raises(ConfigError, match="random:smollm2-135m has 8192"):  # a random shape's, without building it
        check_inputs(_config(tmp_path, model="random:smollm2-135m", max_new_tokens=9000))
    from rlhf.cpu_linear import use_onednn

    monkeypatch.setenv("RLHF_CPU_LINEAR", "bogus")
    use_onednn.cache_clear()  # the choice is read once per process
    try:
        with pytest.raises(ConfigError, match="RLHF_CPU_LINEAR must be auto, onednn or blas"):
            check_inputs(_config(tmp_path, model=str(tiny_model_dir)))
    finally:
        monkeypatch.delenv("RLHF_CPU_LINEAR")
        use_onednn.cache_clear()
    monkeypatch.setenv("RLHF_CPU_DECODE_KERNEL", "fast")
    with pytest.raises(ConfigError, match="RLHF_CPU_DECODE_KERNEL must be auto or off, got 'fast'"):
        check_inputs(_config(tmp_path, model=str(tiny_model_dir)))


def test_a_bad_model_keeps_the_earlier_results_and_exits_2_in_one_line(tmp_path, run_here):
    out = tmp_path / "bench.json"
    earlier = {out: '{"kind": "sweep"}', out.with_suffix(".md"): "| earlier |\n"}
    for path, text in earlier.items():
        path.write_text(text)
    result = run_here("benchmark.py", "--systems", "ours-grpo", "--model", str(tmp_path / "nope"), "--out", str(out))
    assert_one_line_error(result, "nope")
    assert {path: path.read_text() for path in earlier} == earlier
    assert not out.with_suffix(".png").exists()


def test_a_run_where_every_system_failed_writes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    def failing(system, config):
        return {"error": "RuntimeError: out of memory"}
    monkeypatch.setattr(benchmark, "run_in_child", failing)
    with pytest.raises(ConfigError, match="every system failed, nothing written .the first: RuntimeError: out of"):
        run_benchmark(_config(tmp_path, model=str(tiny_model_dir), systems=["ours-grpo", "trl-grpo"]))

    def one_ran(system, config):  # one system's error is a row of the table, the run still counts
        return {"error": "RuntimeError: out of memory"} if system == "trl-grpo" else {"step_time_s": 1.0}
    monkeypatch.setattr(benchmark, "run_in_child", one_ran)
    report = run_benchmark(_config(tmp_path, model=str(tiny_model_dir), systems=["ours-grpo", "trl-grpo"]))
    assert report["runs"][0]["results"]["trl-grpo"] == {"error": "RuntimeError: out of memory"}


def test_a_system_whose_process_dies_without_answering_is_an_error_not_a_hang():
    # os._exit(queue) fails in the child (a TypeError): it ends with code 1 and never answers
    assert run_process(os._exit) == (None, "its process ended with exit code 1 without a result")
    assert benchmark.ended(-9) == "was killed by SIGKILL (out of memory?)"
    assert benchmark.one_line(RuntimeError("\nfirst\nsecond")) == "RuntimeError: first"


def _written_plainly(monkeypatch):
    """write_report without rendering (the fake reports below have no settings): the JSON only."""
    from rlhf import benchmark_report

    def write(report, out):
        out.write_text(json.dumps(report))
        return "table", [out]
    monkeypatch.setattr(benchmark_report, "write_report", write)


def test_a_failed_run_leaves_no_profile_and_no_folder_of_its_own(tmp_path, tiny_model_dir, monkeypatch):
    _written_plainly(monkeypatch)
    out = tmp_path / "made" / "b.json"

    def failing(config, model_path):  # --profile's table is written while the run goes on
        benchmark.unfinished_profile(out).write_text("this run's profile")
        return {"kind": "sweep", "runs": [{"results": {"ours-grpo": {"error": "RuntimeError: boom"}}}]}
    monkeypatch.setattr(benchmark, "run_sweep", failing)
    with pytest.raises(ConfigError, match="every system failed"):
        benchmark_to_files(_config(tmp_path, model=str(tiny_model_dir), out=str(out), profile=True))
    assert not (tmp_path / "made").exists()

    out = tmp_path / "b.json"
    out.write_text('{"kind": "sweep"}')  # an earlier run's report, with its profile
    benchmark.output_paths(out)["profile"].write_text("an earlier profile")
    with pytest.raises(ConfigError, match="every system failed"):
        benchmark_to_files(_config(tmp_path, model=str(tiny_model_dir), out=str(out), profile=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.profile.txt"]
    assert benchmark.output_paths(out)["profile"].read_text() == "an earlier profile"
    assert out.read_text() == '{"kind": "sweep"}'

    def ran(config, model_path):
        benchmark.unfinished_profile(out).write_text("this run's profile")
        return {"kind": "sweep", "runs": [{"results": {"ours-grpo": {"step_time_s": 1.0}}}]}
    monkeypatch.setattr(benchmark, "run_sweep", ran)
    _, _, written = benchmark_to_files(_config(tmp_path, model=str(tiny_model_dir), out=str(out), profile=True))
    assert written == [out, benchmark.output_paths(out)["profile"]]
    assert benchmark.output_paths(out)["profile"].read_text() == "this run's profile"
    assert not benchmark.unfinished_profile(out).exists()

    def profile_failed(config, model_path):  # no table of this run: none of an earlier run beside its report
        return {"kind": "sweep", "runs": [{"results": {"ours-grpo": {"step_time_s": 1.0},
                                                       "profile": {"error": "RuntimeError: boom"}}}]}
    monkeypatch.setattr(benchmark, "run_sweep", profile_failed)
    benchmark_to_files(_config(tmp_path, model=str(tiny_model_dir), out=str(out), profile=True))
    assert not benchmark.output_paths(out)["profile"].exists()


def test_writing_the_report_keeps_earlier_files_whole_when_it_fails(tmp_path, monkeypatch):
    from rlhf import benchmark_report

    out = tmp_path / "b.json"
    earlier = {out: "{}", out.with_suffix(".md"): "| earlier |\n"}
    for path, text in earlier.items():
        path.write_text(text)

    def broken_plot(report, path):
        raise RuntimeError("no display")
    monkeypatch.setattr(benchmark_report, "plot_sweep", broken_plot)
    with pytest.raises(RuntimeError):
        benchmark_report.write_report({"kind": "sweep", "settings": {"full_length": True, "model": "m"}, "runs": []},
                                      out)
    assert {path: path.read_text() for path in earlier} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md"]  # no drafts left


@pytest.mark.parametrize("refused", [".md", ".png"])
def test_a_report_file_that_cannot_be_replaced_keeps_the_earlier_report_as_a_set(tmp_path, monkeypatch, refused):
    """One of the three files cannot be put in place (immutable, on another owner's folder): one
    line (ConfigError, exit 2) and the earlier JSON, table and plot all as they were, none of
    this run's (before: a PermissionError traceback, exit 1, this run's JSON beside the earlier
    table and plot, helper-50)."""
    from rlhf import benchmark_report
    from rlhf.errors import ConfigError

    out = tmp_path / "b.json"
    earlier = {out: "{}", out.with_suffix(".md"): "| earlier |\n", out.with_suffix(".png"): "png"}
    for path, text in earlier.items():
        path.write_text(text)
    replace = Path.replace

    def refusing(self, target):  # as for an immutable file: neither moved away nor replaced
        if out.with_suffix(refused) in (self, Path(target)):
            raise PermissionError(1, "Operation not permitted", str(out.with_suffix(refused)))
        return replace(self, target)
    monkeypatch.setattr(Path, "replace", refusing)
    monkeypatch.setattr(benchmark_report, "plot_sweep", lambda report, path: path.write_text("new png"))
    with pytest.raises(ConfigError, match=f"cannot write the report at .*Operation not permitted.*b{refused}"):
        benchmark_report.write_report({"kind": "sweep", "settings": {"full_length": True, "model": "m"}, "runs": []},
                                      out)
    assert {path: path.read_text() for path in earlier} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md", "b.png"]  # no drafts or set-asides


def test_no_systems_is_refused_and_a_system_named_twice_runs_once():
    """``--systems`` with no names ran nothing, exited 0 and replaced an earlier report with an
    empty one (helper-50); a system named twice ran twice and kept one row; ``--systems`` beside
    ``--grow`` or ``--learning`` was ignored without a word."""
    from rlhf.benchmark import every_system_failed

    with pytest.raises(ConfigError, match="systems must name at least one system"):
        BenchmarkConfig(systems=[])
    assert BenchmarkConfig(systems=["ours-grpo", "trl-grpo", "ours-grpo"]).systems == ["ours-grpo", "trl-grpo"]
    # growth and the race run their own systems: --systems there is refused, not ignored
    for study in ({"grow": True}, {"learning": True}):
        with pytest.raises(ConfigError, match="drop --systems"):
            BenchmarkConfig(systems=["trl-grpo"], **study)
        assert BenchmarkConfig(**study).systems == list(benchmark.SYSTEMS)
    assert every_system_failed({"kind": "sweep", "runs": [{"results": {}}]}) == "no system ran"


def test_the_growth_table_counts_parameters_of_any_model(tmp_path):
    """--grow needs only a parameter count, not the roofline's Llama shape: a GPT-2 is counted."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    config.save_pretrained(tmp_path / "gpt2")
    assert benchmark.parameter_count(str(tmp_path / "gpt2")) == sum(p.numel() for p in GPT2LMHeadModel(config).parameters())


def test_the_roofline_refuses_a_mixture_of_experts_kept_as_3d_weights(tmp_path):
    """transformers keeps a Qwen2-MoE's experts as [experts, out, in] tensors; counting only 2-D
    weights took this one for a dense Llama with its shared expert as the MLP."""
    from transformers import Qwen2MoeConfig

    Qwen2MoeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                   shared_expert_intermediate_size=127, vocab_size=300).save_pretrained(tmp_path / "moe")
    with pytest.raises(ConfigError, match="is not one: its weight matrices hold"):
        benchmark.model_shape(str(tmp_path / "moe"))


def test_sigterm_to_the_benchmark_stops_the_system_it_waits_on(tmp_path, tiny_model_dir):
    """SIGTERM reaches the parent only (not its process group); the system's process must not go on
    training alone."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from conftest import ROOT, SCRIPT_ENV

    def children(pid: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
        return found

    parent = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", str(tiny_model_dir), "--systems",
         "ours-grpo", "--max_new_tokens", "4", "--steps", "100000", "--warmup_steps", "0", "--out",
         str(tmp_path / "b.json")], env={**os.environ, **SCRIPT_ENV}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    systems: list[int] = []
    while not systems and time.monotonic() < deadline and parent.poll() is None:
        # the spawned system (multiprocessing's resource tracker is a child too)
        systems = [pid for pid in children(parent.pid)
                   if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
        time.sleep(0.5)
    assert systems, parent.stderr.read() if parent.poll() is not None else "no system process started"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 143
    time.sleep(1)
    assert not [pid for pid in systems if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not (tmp_path / "b.json").exists()


def _earlier_race(out):
    """An earlier race at ``out``: its report and one file in each of its run folders."""
    from rlhf import learning_race

    runs = learning_race.runs_dir(out)
    for name in ("ours-grpo/final", "trl-grpo", "eval"):
        (runs / name).mkdir(parents=True)
        (runs / name / "earlier").write_text("")
    out.write_text('{"kind": "learning", "earlier": true}')
    return runs


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


EARLIER_RACE = ["eval/earlier", "ours-grpo/final/earlier", "trl-grpo/earlier"]


@pytest.mark.parametrize("stop_at", ["no system trains", "second system", "evaluation", "writing the report"])
def test_a_learning_race_that_fails_or_is_stopped_keeps_the_earlier_race(stop_at, tmp_path, tiny_model_dir,
                                                                         monkeypatch):
    """The earlier race's runs give way only once the new race's report is written."""
    from rlhf import benchmark_report, learning_race

    _written_plainly(monkeypatch)
    out = tmp_path / "race.json"
    runs = _earlier_race(out)
    calls = []

    def task(name, config, directory):
        calls.append(name)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "new").write_text("")  # this race's (partial) output
        if stop_at == "no system trains":
            return {"error": "ConfigError: cannot load model"}
        if (stop_at, len(calls)) in (("second system", 2), ("evaluation", 3)):
            raise KeyboardInterrupt
        return {"steps": 1}
    monkeypatch.setattr(learning_race, "run_in_child", task)
    if stop_at == "writing the report":
        def stopped(report, out):
            raise KeyboardInterrupt
        monkeypatch.setattr(benchmark_report, "write_report", stopped)
    config = BenchmarkConfig(learning=True, seconds=1, model=str(tiny_model_dir), out=str(out))
    with pytest.raises(ConfigError if stop_at == "no system trains" else KeyboardInterrupt):
        benchmark_to_files(config)
    assert _files(runs) == EARLIER_RACE and json.loads(out.read_text())["earlier"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race-runs", "race.json"]  # nothing set aside left


def test_a_learning_race_replaces_the_earlier_one_once_its_report_is_written(tmp_path, tiny_model_dir, monkeypatch):
    from rlhf import learning_race

    _written_plainly(monkeypatch)
    out = tmp_path / "race.json"
    runs = _earlier_race(out)

    def trained(name, config, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "new").write_text("")
        return {"steps": 1}
    monkeypatch.setattr(learning_race, "run_in_child", trained)
    benchmark_to_files(BenchmarkConfig(learning=True, seconds=1, model=str(tiny_model_dir), out=str(out)))
    # the evaluation writes into runs itself; the race id ties these runs to the report
    assert _files(runs) == [".race_id", "new", "ours-grpo/new", "trl-grpo/new"]
    assert json.loads(out.read_text())["race_id"] == (runs / ".race_id").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race-runs", "race.json"]


def test_a_killed_race_gives_the_earlier_one_back_at_the_next_race(tmp_path, tiny_model_dir, monkeypatch):
    """SIGKILL leaves no chance to settle the runs: the next race does it first, by the race ids of
    the report and of the runs folders, whatever moment the kill came at."""
    from rlhf import learning_race

    out = tmp_path / "race.json"
    runs = _earlier_race(out)
    (runs / learning_race.RACE_ID_FILE).write_text("A")
    out.write_text('{"kind": "learning", "race_id": "A"}')

    def killed_race(race_id):  # set the earlier race aside, began its own runs
        learning_race.set_aside_earlier_race(out)
        (runs / "ours-grpo").mkdir(parents=True)
        (runs / learning_race.RACE_ID_FILE).write_text(race_id)
        (runs / "ours-grpo" / "partial").write_text("")

    killed_race("B")  # killed before its report was written
    learning_race.settle_runs(out)  # what the next race does first
    assert _files(runs) == [".race_id", *EARLIER_RACE] and not learning_race.earlier_race(out).exists()

    killed_race("B")  # killed after its report was written, before the earlier runs were dropped
    out.write_text('{"kind": "learning", "race_id": "B"}')
    learning_race.settle_runs(out)
    assert _files(runs) == [".race_id", "ours-grpo/partial"] and not learning_race.earlier_race(out).exists()

    shutil.rmtree(runs)  # no earlier race at all: a failed race leaves no runs folder
    out.unlink()
    killed_race("C")
    learning_race.settle_runs(out)
    assert not runs.exists() and not learning_race.earlier_race(out).exists()


def test_a_stale_profile_draft_is_never_taken_for_this_runs_table(tmp_path, tiny_model_dir, monkeypatch):
    _written_plainly(monkeypatch)
    out = tmp_path / "b.json"
    benchmark.unfinished_profile(out).write_text("a killed run's draft")
    monkeypatch.setattr(benchmark, "run_sweep", lambda config, model_path: {
        "kind": "sweep", "runs": [{"results": {"ours-grpo": {"step_time_s": 1.0}}}]})
    benchmark_to_files(_config(tmp_path, model=str(tiny_model_dir), out=str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_a_symlinked_out_is_written_through_and_checked_where_it_points(tmp_path, tiny_model_dir, monkeypatch):
    link = tmp_path / "b.json"
    link.symlink_to(tmp_path / "nowhere" / "real.json")
    with pytest.raises(ConfigError, match="cannot write in .*nowhere"):
        check_inputs(_config(tmp_path, model=str(tiny_model_dir), out=str(link)))
    (tmp_path / "nowhere").mkdir()
    from rlhf import benchmark_report

    monkeypatch.setattr(benchmark_report, "render_table", lambda report: "table")
    monkeypatch.setattr(benchmark_report, "plot_sweep", lambda report, path: path.write_bytes(b"png") and path)
    benchmark_report.write_report({"kind": "sweep"}, link)
    assert link.is_symlink() and json.loads((tmp_path / "nowhere" / "real.json").read_text()) == {"kind": "sweep"}


def test_a_system_killed_mid_run_leaves_no_work_folder_behind(tmp_path, tiny_model_dir, monkeypatch):
    """The kernel's OOM killer gives a process no chance to clean up: the work folder is the parent's."""
    import signal
    import tempfile
    import threading
    import time

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the spawned system reads it too
    monkeypatch.setattr(tempfile, "tempdir", None)
    killed = []

    def kill_the_system_once_it_writes() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = list(temp.glob("bench-ours-grpo-*/run/*"))
            systems = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                       if "spawn_main" in _read(p) and int(p.parent.name) != os.getpid()
                       and _parent_of(int(p.parent.name)) == os.getpid()]
            if runs and systems:
                for pid in systems:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(systems)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_system_once_it_writes)
    killer.start()
    result = benchmark.run_in_child("ours-grpo", _config(tmp_path, model=str(tiny_model_dir), steps=100000))
    killer.join()
    assert killed, "the system never started writing its run"
    assert result == {"error": "its process was killed by SIGKILL (out of memory?) without a result"}
    assert list(temp.iterdir()) == []


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_a_race_never_replaces_a_folder_of_someone_elses_files_named_like_its_runs(tmp_path, tiny_model_dir):
    """A race sets an earlier race's runs aside and deletes them once its report is written; a
    folder of the user's own at <stem>-runs was deleted the same way (found by a stranger's review)."""
    from rlhf import learning_race

    out = tmp_path / "race.json"
    mine = learning_race.runs_dir(out)
    mine.mkdir()
    (mine / "mydata.txt").write_text("precious")
    config = BenchmarkConfig(learning=True, seconds=1, model=str(tiny_model_dir), out=str(out))
    with pytest.raises(ConfigError, match="race-runs is not empty and holds no earlier race's runs"):
        benchmark_to_files(config)
    assert (mine / "mydata.txt").read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == [
        "race-runs"]
    for report in ('{"kind": "sweep"}', '{"kind": "learning", "race_id": "A"}'):  # not a race's; a race's with ids
        out.write_text(report)
        with pytest.raises(ConfigError, match="holds no earlier race's runs"):
            check_inputs(config)
    (mine / "mydata.txt").unlink()  # an empty folder holds nothing to lose
    check_inputs(config)
    (mine / "mydata.txt").write_text("")
    (mine / learning_race.RACE_ID_FILE).write_text("A")  # a race's runs, whatever the report
    check_inputs(config)
    (mine / learning_race.RACE_ID_FILE).unlink()
    out.write_text('{"kind": "learning"}')  # a race written before race ids: its runs carry none
    check_inputs(config)
    shutil.rmtree(mine)
    for target in (tmp_path / "nowhere", tmp_path / "empty"):  # a link there: the race would rename and delete it
        mine.symlink_to(target)
        with pytest.raises(ConfigError, match="race-runs is a link"):
            check_inputs(config)
        mine.unlink()
        (tmp_path / "empty").mkdir(exist_ok=True)


def test_the_roofline_is_refused_where_the_systems_would_train_on_a_gpu(tmp_path, tiny_model_dir, monkeypatch):
    """The roofline measures the CPU; on a GPU machine it would set GPU phase times against CPU limits."""
    import torch

    config = _config(tmp_path, model=str(tiny_model_dir), roofline=True)
    check_inputs(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="roofline measures this machine's CPU .* train on the GPU"):
        check_inputs(config)
    check_inputs(_config(tmp_path, model=str(tiny_model_dir)))


def test_more_prompts_per_step_than_trl_can_draw_is_refused_up_front(tmp_path, tiny_model_dir):
    """TRL's sampler drops an incomplete batch of prompts: with more prompts per step than the
    built-in set it trained no step and the table showed 'StatisticsError: no median for empty data'."""
    prompts = len(benchmark.builtin_train_prompts())
    model = str(tiny_model_dir)
    with pytest.raises(ConfigError, match=f"prompts_per_step {prompts + 1} is more than the {prompts} prompts"):
        check_inputs(_config(tmp_path, model=model, systems=["ours-grpo", "trl-grpo"], prompts_per_step=prompts + 1))
    with pytest.raises(ConfigError, match="is more than"):
        check_inputs(_config(tmp_path, model=model, learning=True, prompts_per_step=prompts + 1))
    check_inputs(_config(tmp_path, model=model, systems=["ours-grpo", "trl-grpo"], prompts_per_step=prompts))
    check_inputs(_config(tmp_path, model=model, prompts_per_step=prompts + 1))  # ours cycles through them
    check_inputs(_config(tmp_path, model=model, grow=True, systems=list(benchmark.SYSTEMS),
                         prompts_per_step=prompts + 1))  # --grow runs ours alone


@pytest.mark.parametrize("out", ["", ".", "/", ".."])
def test_an_out_that_names_a_folder_is_one_line_and_exit_2(out, run_here):
    result = run_here("benchmark.py", "--systems", "ours-grpo", "--out", out)
    assert_one_line_error(result, "names a folder, not the JSON file the results go to")


def test_an_earlier_runs_profile_does_not_stay_beside_a_report_without_one(tmp_path, tiny_model_dir, monkeypatch):
    _written_plainly(monkeypatch)
    out = tmp_path / "b.json"
    out.write_text('{"kind": "sweep"}')  # the earlier run's report, beside its op table
    stale = benchmark.output_paths(out)["profile"]
    stale.write_text("an earlier run's op table")
    monkeypatch.setattr(benchmark, "run_sweep", lambda config, model_path: {
        "kind": "sweep", "runs": [{"results": {"ours-grpo": {"step_time_s": 1.0}}}]})

    def failing(config, model_path):
        raise KeyboardInterrupt
    with monkeypatch.context() as patched:
        patched.setattr(benchmark, "run_sweep", failing)
        with pytest.raises(KeyboardInterrupt):
            benchmark_to_files(_config(tmp_path, model=str(tiny_model_dir), out=str(out)))
    assert stale.read_text() == "an earlier run's op table"  # a run that wrote no report keeps it
    benchmark_to_files(_config(tmp_path, model=str(tiny_model_dir), out=str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]
    (tmp_path / "keep").mkdir()  # a link the user put there, to a file of theirs: both stay
    (tmp_path / "keep" / "mine.txt").write_text("mine")
    stale.symlink_to(tmp_path / "keep" / "mine.txt")
    benchmark_to_files(_config(tmp_path, model=str(tiny_model_dir), out=str(out)))
    assert stale.is_symlink() and (tmp_path / "keep" / "mine.txt").read_text() == "mine"


def test_lengths_run_shortest_first_each_once():
    assert BenchmarkConfig(lengths=[6, 2, 6]).sweep_lengths == [2, 6]
    assert BenchmarkConfig(max_new_tokens=5).sweep_lengths == [5]


def test_an_out_that_is_a_device_a_pipe_or_a_kernel_file_is_refused(tmp_path, tiny_model_dir):
    """The report is written beside --out and renamed over it: over a pipe or a device node that
    replaced it with a file (a reviewer's ``--out /dev/null``, as root, left the machine without
    its null device), and ``/dev/stdout`` led to the file stdout went to, which the JSON replaced
    (the log, with the printed table). Until 2026-12-07."""
    model = str(tiny_model_dir)
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)
    with pytest.raises(ConfigError, match="pipe.json is not a regular file"):
        check_inputs(_config(tmp_path, model=model, out=str(pipe)))
    os.mkfifo(tmp_path / "b.png")  # the plot's place beside an ordinary --out
    with pytest.raises(ConfigError, match="b.png is not a regular file"):
        check_inputs(_config(tmp_path, model=model, out=str(tmp_path / "b.json")))
    for out in ("/dev/null", "/dev/stdout", "/proc/self/fd/1", "/sys/kernel/bench.json"):
        with pytest.raises(ConfigError, match=f"{out} is in /(dev|proc|sys)"):
            check_inputs(_config(tmp_path, model=model, out=out))
    log = tmp_path / "log.json"  # stdout's file, reached through a link as /dev/stdout reaches it
    log.write_text("earlier")
    (tmp_path / "stdout.json").symlink_to("/proc/self/fd/1")
    with pytest.raises(ConfigError, match="stdout.json is a link into /proc"):
        check_inputs(_config(tmp_path, model=model, out=str(tmp_path / "stdout.json")))
    (tmp_path / "kernel").symlink_to("/dev", target_is_directory=True)
    with pytest.raises(ConfigError, match="is a path into /dev"):
        check_inputs(_config(tmp_path, model=model, out=str(tmp_path / "kernel" / "bench.json")))
    # ".." after a linked folder is the linked folder's parent, as the kernel resolves it, not the
    # text's (a reviewer's way past the first version: <link to /dev/shm>/../null)
    (tmp_path / "shm").symlink_to("/dev/shm", target_is_directory=True)
    with pytest.raises(ConfigError, match="is a path into /dev"):
        check_inputs(_config(tmp_path, model=model, out=str(tmp_path / "shm" / ".." / "null")))
    (tmp_path / "real" / "sub").mkdir(parents=True)
    os.mkfifo(tmp_path / "real" / "p.json")
    (tmp_path / "sub").symlink_to(tmp_path / "real" / "sub", target_is_directory=True)
    (tmp_path / "real" / "sub" / "out.json").symlink_to("../p.json")
    (tmp_path / "via.json").symlink_to("sub/../p.json")
    for out in ("sub/../p.json", "sub/out.json", "via.json"):
        with pytest.raises(ConfigError, match="not a regular file"):
            check_inputs(_config(tmp_path, model=model, out=str(tmp_path / out)))
    assert (tmp_path / "real" / "p.json").is_fifo()
    assert pipe.is_fifo() and log.read_text() == "earlier" and os.path.exists("/dev/null")
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):  # a tmpfs is an ordinary place for results
        out = shm / f"rlhf-test-{os.getpid()}.json"
        try:
            check_inputs(_config(tmp_path, model=model, out=str(out)))
        finally:
            out.unlink(missing_ok=True)


def test_a_fifo_out_stops_the_script_in_one_line_and_stays_a_fifo(tmp_path, run_here):
    pipe = tmp_path / "b.json"
    os.mkfifo(pipe)
    result = run_here("benchmark.py", "--out", str(pipe))
    assert_one_line_error(result, "is not a regular file (a device, pipe or socket)")
    assert pipe.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


@pytest.mark.parametrize(("args", "message"), [
    (["--learning_rate", "20"], "learning_rate must be in (0, 10], got 20"),
    (["--learning_rate", "-1"], "learning_rate must be in (0, 10], got -1"),
    (["--learning_rate", "nan"], "learning_rate must be in (0, 10], got nan"),
    (["--seed", "4294967296"], "seed must be an integer in 0..4294967295, got 4294967296"),
    (["--seed", "-1"], "seed must be an integer in 0..4294967295, got -1"),
])
def test_a_learning_rate_or_seed_our_trainer_refuses_stops_before_any_system(args, message, tmp_path, run_here):
    """Checked as our trainer checks them, before any system's process loads the model (until
    2026-12-07 --learning_rate 20 ran TRL alone and wrote that half-failed report over an earlier one)."""
    (tmp_path / "b.json").write_text("earlier")
    result = run_here("benchmark.py", *args, "--out", str(tmp_path / "b.json"))
    assert_one_line_error(result, message)
    assert (tmp_path / "b.json").read_text() == "earlier" and len(list(tmp_path.iterdir())) == 1


def test_more_held_out_prompts_than_there_are_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="eval_num_prompts 41 is more than the 40 held-out prompts"):
        check_inputs(_config(tmp_path, model=str(tiny_model_dir), learning=True, eval_num_prompts=41))
    check_inputs(_config(tmp_path, model=str(tiny_model_dir), learning=True, eval_num_prompts=40))


@pytest.mark.parametrize("damage", ["report not text", "report cut short", "report not a race's", "race id not text"])
def test_a_race_keeps_earlier_runs_whose_report_or_id_is_damaged(damage, tmp_path, tiny_model_dir):
    """Runs that no readable report claims were deleted as a killed race's leftovers: a race.json
    damaged on disk cost the earlier race's adapters and metrics (found by a stranger's review)."""
    from rlhf import learning_race

    out = tmp_path / "race.json"
    runs = _earlier_race(out)
    (runs / learning_race.RACE_ID_FILE).write_text("A")
    out.write_text('{"kind": "learning", "race_id": "A"}')
    if damage == "report not text":
        out.write_bytes(bytes(range(128, 160)))
    elif damage == "report cut short":
        out.write_text('{"kind": "learn')
    elif damage == "report not a race's":
        out.write_text("[1, 2]")
    else:
        (runs / learning_race.RACE_ID_FILE).write_bytes(bytes(range(128, 160)))
    config = BenchmarkConfig(learning=True, seconds=1, model=str(tiny_model_dir), out=str(out))
    with pytest.raises(ConfigError, match="race-runs holds an earlier race's runs .* and the race would delete them"):
        benchmark_to_files(config)
    assert _files(runs) == [".race_id", *EARLIER_RACE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race-runs", "race.json"]


def test_an_out_whose_table_and_plot_are_another_reports_is_refused(tmp_path, tiny_model_dir, run_here):
    """--out x/b after --out x/b.json would write b.md and b.png over that report's table and plot
    while its JSON stays (a review found them replaced): one line, exit 2, every file as it was; the
    same --out again replaces its own files, and a link placed at the table's path is no report's."""
    from conftest import assert_one_line_error

    earlier = {tmp_path / "b.json": "{}", tmp_path / "b.md": "| table |", tmp_path / "b.png": "png"}
    for path, text in earlier.items():
        path.write_text(text)
    result = run_here("benchmark.py", "--systems", "ours-grpo", "--model", str(tiny_model_dir), "--steps", "1",
                      "--warmup_steps", "0", "--lengths", "4", "--out", str(tmp_path / "b"))
    assert_one_line_error(result, "b.md is there without b, so it is another report's", "choose another --out")
    assert {path: path.read_text() for path in earlier} == earlier and not (tmp_path / "b").exists()
    (tmp_path / "c.profile.txt").write_text("an op table")
    with pytest.raises(ConfigError, match="c.profile.txt is there without c.json"):
        check_inputs(_config(tmp_path, model=str(tiny_model_dir), out=str(tmp_path / "c.json")))
    check_inputs(_config(tmp_path, model=str(tiny_model_dir), out=str(tmp_path / "b.json")))  # its own files
    (tmp_path / "d.md").symlink_to(tmp_path / "elsewhere.md")
    check_inputs(_config(tmp_path, model=str(tiny_model_dir), out=str(tmp_path / "d.json")))
