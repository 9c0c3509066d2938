"""rlhf.cpu_memory: a run on CPU keeps freed memory for reuse (glibc), so the update's large
buffers stop faulting in page by page; the benchmark gives every system the same; a bad
RLHF_CPU_MALLOC is one line and exit 2."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, assert_one_line_error, tiny_args

from rlhf import cpu_memory

GLIBC_HERE = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
glibc = pytest.mark.skipif(not GLIBC_HERE, reason="the switches are glibc's")

# Page faults of a 64 MB buffer allocated, filled and freed, after one such buffer came and went
# (the fewest of three tries: a thread may take part of a freed hole once, and the heap grows);
# then the same after a CPU trainer was built. glibc's default maps each one afresh (16384 faults).
FAULTS_BEFORE_AND_AFTER_A_TRAINER = """
import resource, sys
import torch
from rlhf.config import RLConfig
from rlhf.trainer import RLTrainer

def faults_of_a_reused_buffer():
    buffer = torch.empty(2 ** 24); buffer.fill_(1.0); del buffer
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty(2 ** 24); buffer.fill_(1.0); del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

before = min(faults_of_a_reused_buffer() for _ in range(3))
RLTrainer(RLConfig(model_name_or_path=sys.argv[1], output_dir=sys.argv[2], reward_funcs=[sys.argv[3]],
                   max_new_tokens=4, rollout_batch_size=2, mini_batch_size=2, lora_r=4))
print(before, min(faults_of_a_reused_buffer() for _ in range(3)))
"""


def _faults(tiny_model_dir, tmp_path, choice: str | None) -> tuple[int, int]:
    env = {key: value for key, value in os.environ.items() if key != cpu_memory.ENV}
    if choice is not None:
        env[cpu_memory.ENV] = choice
    result = subprocess.run([sys.executable, "-c", FAULTS_BEFORE_AND_AFTER_A_TRAINER, str(tiny_model_dir),
                             str(tmp_path / (choice or "auto")), f"{FIXTURES / 'rewards.py'}:char_diversity"],
                            capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = map(int, result.stdout.split()[-2:])
    return before, after


@glibc
def test_a_cpu_trainer_makes_freed_buffers_reusable_without_page_faults(tiny_model_dir, tmp_path):
    before, after = _faults(tiny_model_dir, tmp_path, None)
    if before < 10_000:  # GLIBC_TUNABLES hugetlb, THP "always", THP_MEM_ALLOC_ENABLE: few faults either way
        pytest.skip(f"this host maps large buffers in huge pages ({before} faults for 64 MB): nothing to measure")
    assert after < 200, after  # the freed buffer's pages are still mapped and reused
    # the opt-out leaves glibc's default in place
    before, after = _faults(tiny_model_dir, tmp_path, "default")
    assert before > 10_000 and after > 10_000


# A 256 MB buffer freed under keep: the heap holds it free (counted as available), and handing it
# back at the end of training shrinks the resident set again.
HEAP_KEPT_THEN_RELEASED = """
import os, psutil, torch
from rlhf import cpu_memory
from rlhf.cpu_linear import available_memory_bytes
rss = lambda: psutil.Process(os.getpid()).memory_info().rss
assert cpu_memory.keep_freed_memory()
buffer = torch.empty(2 ** 26); buffer.fill_(1.0); del buffer
free_in_heap, held = cpu_memory.reusable_heap_bytes(), rss()
counted = available_memory_bytes() - psutil.virtual_memory().available
cpu_memory.release_freed_memory()
print(free_in_heap, counted, held - rss())
"""


@glibc
def test_kept_memory_counts_as_available_and_goes_back_when_training_ends():
    result = subprocess.run([sys.executable, "-c", HEAP_KEPT_THEN_RELEASED], capture_output=True, text=True,
                            env={**os.environ, cpu_memory.ENV: "keep"}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    free_in_heap, counted, released = map(int, result.stdout.split())
    assert free_in_heap >= 2 ** 28
    assert counted >= 2 ** 28 * 0.9  # the weight copies' memory check sees it (the system's figure moves a little)
    assert released >= 2 ** 28 * 0.9


@pytest.mark.parametrize("kept_before", [False, True])
def test_training_hands_the_kept_memory_back_at_its_end(kept_before, tiny_model_dir, tmp_path, run_here, monkeypatch):
    """glibc's own thresholds come back too where the trainer set the switches; a process that kept
    freed memory before (the benchmark's, the learning race's) goes on keeping it."""
    released = []
    monkeypatch.setattr(cpu_memory, "_kept", kept_before)
    monkeypatch.setattr("rlhf.trainer.release_freed_memory", lambda stop_keeping=False: released.append(stop_keeping))
    result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert released == [not kept_before]


def test_a_training_run_that_fails_hands_the_kept_memory_back_too(tiny_model_dir, tmp_path, run_here, monkeypatch):
    """A reward function that raises stops the run (one line, exit 2): before 2026-12-07 the
    process kept its peak then (1.8 GB against 0.6 GB after a finished run, a reviewer's model)."""
    (tmp_path / "broken.py").write_text("def broken(prompts, completions, **kwargs):\n    raise ValueError('no')\n")
    released = []
    monkeypatch.setattr(cpu_memory, "_kept", False)
    monkeypatch.setattr("rlhf.trainer.release_freed_memory", lambda stop_keeping=False: released.append(stop_keeping))
    args = tiny_args(tiny_model_dir, tmp_path / "run")
    args[args.index("--reward_funcs") + 1] = f"{tmp_path / 'broken.py'}:broken"
    result = run_here("train_grpo.py", *args, "--reward_error", "raise")
    assert result.returncode == 2, result.stderr[-3000:]
    assert released == [True]


# After keep_freed_memory and its release with stop_keeping: the process allocates as glibc does by
# default again, so a 256 MB buffer freed afterwards leaves the resident set (mmap'd, unmapped on free).
KEPT_THEN_STOPPED = """
import os, psutil, torch
from rlhf import cpu_memory
rss = lambda: psutil.Process(os.getpid()).memory_info().rss
assert cpu_memory.keep_freed_memory()
buffer = torch.empty(2 ** 26); buffer.fill_(1.0); del buffer
cpu_memory.release_freed_memory(stop_keeping=True)
before = rss()
buffer = torch.empty(2 ** 26); buffer.fill_(1.0); del buffer
print(cpu_memory.allocator_in_use(), cpu_memory.keeping_freed_memory(), rss() - before)
"""


@glibc
def test_releasing_with_stop_keeping_gives_glibc_its_default_back():
    result = subprocess.run([sys.executable, "-c", KEPT_THEN_STOPPED], capture_output=True, text=True,
                            env={**os.environ, cpu_memory.ENV: "keep"}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    allocator, keeping, grown = result.stdout.split()
    assert (allocator, keeping) == ("default", "False")
    assert int(grown) < 2 ** 26  # the freed 256 MB went back (kept, the heap would hold it)


def test_malloc_choice_reads_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_memory.ENV, "default")
    assert cpu_memory.malloc_choice() == "default"
    monkeypatch.setenv(cpu_memory.ENV, " KEEP ")
    assert cpu_memory.malloc_choice() == "keep"
    monkeypatch.delenv(cpu_memory.ENV)
    assert cpu_memory.malloc_choice() == ("keep" if GLIBC_HERE else "default")


@pytest.mark.parametrize("name, value, message", [
    (cpu_memory.ENV, "jemalloc", "RLHF_CPU_MALLOC must be auto, keep or default, got 'jemalloc'"),
    (cpu_memory.HUGE_PAGES_ENV, "always", "RLHF_CPU_HUGE_PAGES must be auto or off, got 'always'")])
def test_an_unknown_memory_choice_stops_a_training_run_in_one_line(name, value, message, tiny_model_dir, tmp_path,
                                                                   run_here):
    result = run_here("train_grpo.py", *tiny_args(tiny_model_dir, tmp_path / "run"), env={name: value})
    assert_one_line_error(result, message)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name, value, message", [
    (cpu_memory.ENV, "tcmalloc", "RLHF_CPU_MALLOC must be auto, keep or default, got 'tcmalloc'"),
    (cpu_memory.HUGE_PAGES_ENV, "on", "RLHF_CPU_HUGE_PAGES must be auto or off, got 'on'")])
def test_an_unknown_memory_choice_stops_the_benchmark_before_any_system(name, value, message, tmp_path, run_here):
    result = run_here("benchmark.py", "--out", str(tmp_path / "b.json"), env={name: value})
    assert_one_line_error(result, message)
    assert not list(tmp_path.iterdir())


def _host_marks_huge_pages() -> bool:
    return GLIBC_HERE and cpu_memory.huge_page_heap_wanted()


# After keep_freed_memory: how the process allocates, how much of a 64 MB buffer filled then came in
# huge pages, the marked range's size, what the heap counted free before and after the buffer was freed.
HUGE_PAGE_HEAP = """
import torch
from rlhf import cpu_memory
def huge_bytes():
    with open("/proc/self/smaps_rollup") as file:
        return sum(int(line.split()[1]) * 1024 for line in file if line.startswith("AnonHugePages:"))
assert cpu_memory.keep_freed_memory()
before = huge_bytes()
buffer = torch.empty(2 ** 24); buffer.fill_(1.0)
grown, free_while_held = huge_bytes() - before, cpu_memory.reusable_heap_bytes()
del buffer
start, end = cpu_memory._huge_page_range or (0, 0)
print(cpu_memory.allocator_in_use(), grown, end - start, free_while_held, cpu_memory.reusable_heap_bytes())
"""


def _huge_page_heap(choice: str) -> tuple[str, int, int, int, int]:
    result = subprocess.run([sys.executable, "-c", HUGE_PAGE_HEAP], capture_output=True, text=True, timeout=120,
                            env={**os.environ, cpu_memory.ENV: "keep", cpu_memory.HUGE_PAGES_ENV: choice})
    assert result.returncode == 0, result.stderr[-3000:]
    allocator, *numbers = result.stdout.split()
    return allocator, *map(int, numbers)


@pytest.mark.skipif(not _host_marks_huge_pages(), reason="the kernel gives huge pages without asking, or never")
def test_kept_memory_grows_in_huge_pages_and_counts_only_what_was_touched():
    allocator, grown, marked, free_while_held, free_after = _huge_page_heap("auto")
    assert allocator == "keep+thp"
    assert grown >= 2 ** 25, grown  # most of the 64 MB in 2 MB pages (a fragmented host may fall back for a few)
    assert marked >= 2 ** 28  # the memory available, as address space
    # the marked range's untouched part is not free memory the process holds: the kernel counts it already
    assert free_while_held < min(marked // 2, 2 ** 27)
    assert free_after - free_while_held >= 2 ** 24 * 4 * 0.9  # the freed buffer is
    allocator, grown, marked, *_ = _huge_page_heap("off")
    assert (allocator, marked) == ("keep", 0) and grown < 2 ** 23


@pytest.mark.parametrize("mode, overcommit", [("always [madvise] never", "2"), ("[always] madvise never", "0"),
                                              ("always madvise [never]", "0"), ("", "0")])
def test_no_range_is_marked_where_the_kernel_decides_alone_or_commits_strictly(mode, overcommit, monkeypatch):
    monkeypatch.setattr(cpu_memory, "_kept", True)
    monkeypatch.setattr(cpu_memory, "_huge_page_range", None)
    assert cpu_memory.reserve_huge_page_heap(mode, overcommit) is None
    assert cpu_memory._huge_page_range is None


# keep_freed_memory with the range capped at argv[1] bytes, called from the main thread or another
# (argv[2]): how the process allocates, the marked range, the main heap's range, the resident KiB.
CAPPED_RESERVATION = """
import resource, sys, threading
from rlhf import cpu_memory
cpu_memory.MAX_HUGE_PAGE_HEAP_BYTES = int(sys.argv[1])
if len(sys.argv) > 3:  # a cap on address space, as ulimit -v sets it
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]), resource.RLIM_INFINITY))
if sys.argv[2] == "thread":
    caller = threading.Thread(target=cpu_memory.keep_freed_memory); caller.start(); caller.join()
else:
    cpu_memory.keep_freed_memory()
start, end = cpu_memory._huge_page_range or (0, 0)
heap_start, heap_end = cpu_memory.main_heap_range() or (0, 0)
with open("/proc/self/status") as file:
    resident = next(int(line.split()[1]) for line in file if line.startswith("VmRSS:"))
print(cpu_memory.allocator_in_use(), start, end, heap_start, heap_end, resident)
"""


def _capped_reservation(cap: int, caller: str = "main", address_space: int | None = None,
                        **env: str) -> tuple[str, int, int, int, int, int]:
    limit = [] if address_space is None else [str(address_space)]
    result = subprocess.run([sys.executable, "-c", CAPPED_RESERVATION, str(cap), caller, *limit], capture_output=True,
                            text=True, timeout=120, env={**os.environ, cpu_memory.ENV: "keep",
                                                         cpu_memory.HUGE_PAGES_ENV: "auto", **env})
    assert result.returncode == 0, result.stderr[-3000:]
    allocator, *numbers = result.stdout.split()
    return allocator, *map(int, numbers)


@pytest.mark.skipif(not _host_marks_huge_pages(), reason="the kernel gives huge pages without asking, or never")
def test_the_marked_range_is_at_most_its_cap_and_inside_the_main_heap():
    allocator, start, end, heap_start, heap_end, _ = _capped_reservation(2 ** 26)
    assert allocator == "keep+thp"
    assert 0 < end - start <= 2 ** 26 and start % cpu_memory.HUGE_PAGE_BYTES == 0
    assert heap_start <= start < end <= heap_end


@pytest.mark.skipif(not _host_marks_huge_pages(), reason="the kernel gives huge pages without asking, or never")
def test_a_call_from_another_thread_marks_nothing():
    # its arena maps the request afresh and unmaps it on free: nothing would stay marked
    allocator, start, end, *_ = _capped_reservation(2 ** 28, "thread")
    assert (allocator, end - start) == ("keep", 0)


@pytest.mark.skipif(not _host_marks_huge_pages(), reason="the kernel gives huge pages without asking, or never")
def test_a_cap_on_address_space_marks_nothing():
    # the range would spend 256 MB of a 64 GB budget of address space that later mappings may need
    allocator, start, end, *_ = _capped_reservation(2 ** 28, address_space=2 ** 36)
    assert (allocator, end - start) == ("keep", 0)


@pytest.mark.skipif(not _host_marks_huge_pages(), reason="the kernel gives huge pages without asking, or never")
@pytest.mark.parametrize("env", [{"MALLOC_PERTURB_": "165"}, {"GLIBC_TUNABLES": "glibc.malloc.perturb=165"}])
def test_perturbed_malloc_marks_nothing_and_writes_nothing(env):
    # glibc would fill the whole range on malloc and on free: 256 MB resident for a 256 MB cap
    allocator, start, end, _, _, resident_kib = _capped_reservation(2 ** 28, **env)
    assert (allocator, end - start) == ("keep", 0)
    assert resident_kib < 2 ** 17, resident_kib  # under 128 MB: the interpreter, not the range


def test_malloc_perturbation_is_read_as_glibc_reads_it():
    assert not cpu_memory.malloc_perturbed({})
    assert cpu_memory.malloc_perturbed({"MALLOC_PERTURB_": "165"})
    assert not cpu_memory.malloc_perturbed({"MALLOC_PERTURB_": "0"})
    assert not cpu_memory.malloc_perturbed({"MALLOC_PERTURB_": "256"})  # its low byte is 0
    assert not cpu_memory.malloc_perturbed({"MALLOC_PERTURB_": "junk"})
    assert cpu_memory.malloc_perturbed({"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.perturb=0x55"})
    assert not cpu_memory.malloc_perturbed({"GLIBC_TUNABLES": "glibc.malloc.perturb=0:glibc.malloc.hugetlb=1"})


def test_the_main_heap_is_the_heap_line_of_the_maps():
    maps = ("55d0c1e00000-55d0c1e21000 r--p 00000000 08:01 123 /usr/bin/python3\n"
            "55d0c3a4b000-55d0c3b6c000 rw-p 00000000 00:00 0                          [heap]\n"
            "7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 \n")
    assert cpu_memory.main_heap_range(maps) == (0x55d0c3a4b000, 0x55d0c3b6c000)
    marked = maps.replace("-55d0c3b6c000 rw-p 00000000 00:00 0                          [heap]",
                          "-55d0c3a60000 rw-p 00000000 00:00 0 [heap]\n55d0c3a60000-55d0c3b6c000 rw-p 00000000 00:00 0 [heap]")
    assert cpu_memory.main_heap_range(marked) == (0x55d0c3a4b000, 0x55d0c3b6c000)
    assert cpu_memory.main_heap_range("7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0\n") is None


def test_no_range_is_marked_where_another_allocator_serves_malloc(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_kept", True)
    monkeypatch.setattr(cpu_memory, "_huge_page_range", None)
    monkeypatch.setattr(cpu_memory, "allocator_in_use", lambda: "tcmalloc")
    assert cpu_memory.reserve_huge_page_heap("always [madvise] never", "0") is None
    assert cpu_memory._huge_page_range is None


def test_the_thp_mode_is_the_bracketed_word():
    assert cpu_memory.transparent_huge_pages_mode("always [madvise] never\n") == "madvise"
    assert cpu_memory.transparent_huge_pages_mode("[always] madvise never") == "always"
    assert cpu_memory.transparent_huge_pages_mode("") == ""


@glibc
def test_untouched_bytes_are_the_range_s_pages_not_yet_touched():
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    region = mmap.mmap(-1, 64 * page)
    first_byte = ctypes.c_char.from_buffer(region)
    start = ctypes.addressof(first_byte)
    try:
        assert cpu_memory.untouched_bytes((start, start + 64 * page)) == 64 * page
        for index in (0, 5, 63):
            region[index * page] = 1
        assert cpu_memory.untouched_bytes((start, start + 64 * page)) == 61 * page
        assert cpu_memory.untouched_bytes((start + page, start + 5 * page)) == 4 * page
    finally:
        del first_byte  # a mapping with a live export cannot close
        region.close()
    # unmapped now: mincore fails, and the whole range counts as untouched (none of it as memory held free)
    assert cpu_memory.untouched_bytes((start, start + 64 * page)) == 64 * page


class _Queue(list):
    put = list.append


@pytest.mark.parametrize("system", ["trl-grpo", "ours-grpo", "machine"])
def test_the_benchmark_gives_every_system_the_same_allocator(system, monkeypatch, tmp_path):
    """TRL's process keeps freed memory as ours does: the comparison is of the trainers, not of malloc."""
    from rlhf import benchmark
    from rlhf.benchmark import BenchmarkConfig

    calls = []

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the allocator was chosen")
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(benchmark, "run_trl_grpo", stop)
    monkeypatch.setattr(benchmark, "run_ours", stop)
    monkeypatch.setattr(benchmark, "run_machine", stop)
    queue = _Queue()
    benchmark._child(system, {**BenchmarkConfig().__dict__}, str(tmp_path), queue)
    assert calls == ["keep"]
    assert queue == [(None, "RuntimeError: stopped after the allocator was chosen")]


@glibc
def test_keeping_freed_memory_moves_no_number(tiny_model_dir, tmp_path):
    """The same seeded run under either choice: identical metrics and adapter (a read of memory
    torch.empty left unwritten would differ here: fresh pages are zero, reused ones are not)."""
    import json

    from conftest import run_script
    from safetensors.torch import load_file

    runs = {}
    for choice, huge_pages in (("default", "auto"), ("keep", "off"), ("keep", "auto")):
        out = tmp_path / f"{choice}-{huge_pages}"
        result = run_script("train_grpo.py", *tiny_args(tiny_model_dir, out, "--num_generations", "2"),
                            env={cpu_memory.ENV: choice, cpu_memory.HUGE_PAGES_ENV: huge_pages})
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = [{key: value for key, value in json.loads(line).items()
                    if not ("time" in key or "per_second" in key or key == "run_id")}
                   for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[choice, huge_pages] = metrics, load_file(str(out / "final" / "adapter_model.safetensors"))
    metrics_default, adapter_default = runs["default", "auto"]
    assert "policy_loss" in metrics_default[-1]
    for metrics, adapter in (runs["keep", "off"], runs["keep", "auto"]):  # small pages, then huge where the host has them
        assert metrics == metrics_default
        assert adapter.keys() == adapter_default.keys()
        assert all(adapter[key].equal(adapter_default[key]) for key in adapter_default)


@pytest.mark.parametrize("task", ["ours-grpo", "trl-grpo", "evaluate"])
def test_the_learning_race_gives_both_systems_and_the_evaluation_the_same_allocator(task, monkeypatch, tmp_path):
    from rlhf import learning_race
    from rlhf.benchmark import BenchmarkConfig

    calls = []

    def stop(config, directory):
        raise RuntimeError(f"stopped after {calls}")
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setitem(learning_race.TASKS, task, stop)
    results = _Queue()
    learning_race._child(task, {**BenchmarkConfig().__dict__}, str(tmp_path), results)
    assert results == [(None, "RuntimeError: stopped after ['keep']")]


MAPS_WITH_JEMALLOC = """\
7f1c00000000-7f1c00021000 rw-p 00000000 00:00 0
7f1c0a000000-7f1c0a0b2000 r-xp 00000000 08:01 131 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
7f1c0b000000-7f1c0b1d4000 r-xp 00000000 08:01 132 /usr/lib/x86_64-linux-gnu/libc.so.6
"""


def test_the_allocator_in_use_names_a_preloaded_one_before_glibc_s_switches(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_kept", True)
    monkeypatch.setattr(cpu_memory, "_huge_page_range", None)
    assert cpu_memory.allocator_in_use(MAPS_WITH_JEMALLOC) == "jemalloc"  # mallopt answered, but reaches nothing
    plain = MAPS_WITH_JEMALLOC.replace("libjemalloc.so.2", "libgomp.so.1")
    assert cpu_memory.allocator_in_use(plain) == "keep"
    monkeypatch.setattr(cpu_memory, "_huge_page_range", (2 ** 30, 2 ** 31))
    assert cpu_memory.allocator_in_use(plain) == "keep+thp"
    monkeypatch.setattr(cpu_memory, "_kept", False)
    assert cpu_memory.allocator_in_use(plain) == "default"
    # this process: no preloaded allocator in the test environment
    assert cpu_memory.allocator_in_use() in ("keep", "default", *cpu_memory.PRELOADED_ALLOCATORS)


@pytest.mark.parametrize("got", [{"ours-grpo": "keep", "trl-grpo": "keep"},
                                 {"ours-grpo": "keep", "trl-grpo": "jemalloc"},
                                 {"ours-grpo": "tcmalloc", "trl-grpo": "tcmalloc"}])
def test_the_benchmark_reports_what_the_systems_processes_got_not_what_was_asked(got, monkeypatch, tmp_path):
    """The table's memory note comes from each system's process: a preloaded jemalloc, or a process
    whose switches did not take, shows there instead of the requested setting."""
    from rlhf import benchmark
    from rlhf.benchmark import BenchmarkConfig
    from rlhf.benchmark_report import malloc_note

    def sweep(config, model_path):
        return {"kind": "sweep", "runs": [{"results": {system: {"step_time_s": 1.0, "malloc": allocator}
                                                       for system, allocator in got.items()}}]}
    monkeypatch.setattr(benchmark, "run_sweep", sweep)
    monkeypatch.setenv(cpu_memory.ENV, "keep")
    report = benchmark.run_benchmark(BenchmarkConfig(systems=list(got), out=str(tmp_path / "b.json")))
    note = malloc_note(report)[0]
    if len(set(got.values())) > 1:
        assert report["malloc"] == "jemalloc, keep" and "allocated differently (jemalloc, keep)" in note
    elif "keep" in got.values():
        assert report["malloc"] == "keep" and "freed buffers kept for reuse in every system's process" in note
    else:
        assert report["malloc"] == "tcmalloc" and note == ("memory: tcmalloc preloaded in every system's process "
                                                            "(RLHF_CPU_MALLOC does not reach it)")


def test_a_child_reports_the_allocator_it_ran_with(monkeypatch, tmp_path):
    from rlhf import benchmark
    from rlhf.benchmark import BenchmarkConfig

    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(cpu_memory, "allocator_in_use", lambda: "jemalloc")
    monkeypatch.setattr(benchmark, "run_ours", lambda *args, **kwargs: ([], {}))
    monkeypatch.setattr(benchmark, "_summarise", lambda rows, sequences: {"step_time_s": 1.0})
    queue = _Queue()
    benchmark._child("ours-grpo", {**BenchmarkConfig().__dict__}, str(tmp_path), queue)
    assert queue[0][0]["malloc"] == "jemalloc"


def _in_file_mapping(tensor) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in cpu_memory.file_mappings())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings")
def test_loaded_weights_leave_the_mapped_file_with_the_same_values_and_ties(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_base_model, weights_into_own_memory

    mapped = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if not any(_in_file_mapping(parameter) for parameter in mapped.parameters()):
        pytest.skip("this transformers copies the file's tensors on loading")
    expected = {name: parameter.detach().clone() for name, parameter in mapped.named_parameters()}
    assert weights_into_own_memory(mapped) > 0
    assert not any(_in_file_mapping(parameter) for parameter in mapped.parameters())
    assert all(torch.equal(parameter, expected[name]) for name, parameter in mapped.named_parameters())
    assert all(parameter.data_ptr() % 64 == 0 for parameter in mapped.parameters())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU would take the weights instead
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    loaded = load_base_model(str(tiny_model_dir))  # what every CPU run of one process per host loads
    assert not any(_in_file_mapping(parameter) for parameter in loaded.parameters())
    if loaded.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_file_mappings_are_the_maps_lines_with_a_path():
    maps = ("7f0000000000-7f0000100000 r--s 00000000 08:01 42   /root/.cache/model.safetensors\n"
            "7f0000200000-7f0000300000 rw-p 00000000 00:00 0 \n"
            "55d0c3a4b000-55d0c3b6c000 rw-p 00000000 00:00 0                          [heap]\n")
    assert cpu_memory.file_mappings(maps) == [(0x7f0000000000, 0x7f0000100000)]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings")
def test_several_processes_on_a_host_keep_sharing_the_mapped_file(tiny_model_dir, monkeypatch):
    import torch

    from rlhf.models import load_base_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    alone = load_base_model(str(tiny_model_dir))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # each would hold a private copy of what the page cache shares
    shared = load_base_model(str(tiny_model_dir))
    if not any(_in_file_mapping(parameter) for parameter in shared.parameters()):
        pytest.skip("this transformers copies the file's tensors on loading")
    assert not any(_in_file_mapping(parameter) for parameter in alone.parameters())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings")
def test_weights_stay_mapped_where_their_copies_would_take_over_half_the_memory_left(tiny_model_dir, monkeypatch):
    """Under a cgroup's limit or ``ulimit -v`` the copy (mapped beside the file until it ends) can
    be what stops the run: the run reads the mapped weights instead."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf import cpu_linear
    from rlhf.models import weights_into_own_memory

    mapped = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    in_mapping = [parameter for parameter in mapped.parameters() if _in_file_mapping(parameter)]
    if not in_mapping:
        pytest.skip("this transformers copies the file's tensors on loading")
    needed = sum(parameter.nbytes for parameter in in_mapping)
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 2 * needed - 2)
    assert weights_into_own_memory(mapped) == 0
    assert all(_in_file_mapping(parameter) for parameter in in_mapping)
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 2 * needed)
    assert weights_into_own_memory(mapped) == len(in_mapping)
    assert not any(_in_file_mapping(parameter) for parameter in mapped.parameters())


def _fake_cgroups(root: Path, memberships: str, mounts: list[tuple[str, str, str, str]],
                  files: dict[str, str]) -> tuple[str, str]:
    """/proc/self/cgroup and /proc/self/mountinfo stand-ins under ``root``, and cgroup files there:
    ``mounts`` (mount root, mount point under ``root``, fstype, super options), ``files`` (path under
    ``root``: contents)."""
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text + "\n")
    lines = [f"{30 + i} 23 0:{40 + i} {mount_root} {root / point} rw,relatime - {fstype} {fstype} {options}"
             for i, (mount_root, point, fstype, options) in enumerate(mounts)]
    (root / "mountinfo").write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n" + "\n".join(lines) + "\n")
    (root / "cgroup").write_text(memberships)
    return str(root / "cgroup"), str(root / "mountinfo")


def test_a_memory_limit_below_the_cgroup_root_is_read(tmp_path):
    """A Slurm job, ``systemd-run -p MemoryMax=`` or a container sharing the host's cgroup
    namespace sets its limit on a child cgroup: the least headroom of the process's own cgroup
    and each one above it counts (before 2026-12-07 only the root's files were read)."""
    gib = 2 ** 30
    unlimited = str(2 ** 63 - 4096)
    v1 = _fake_cgroups(tmp_path / "v1", "4:memory:/jobs/job7/step0\n3:cpu:/\n",
                       [("/", "fs/memory", "cgroup", "rw,memory"), ("/", "fs/cpu", "cgroup", "rw,cpu")],
                       {"fs/memory/memory.limit_in_bytes": unlimited, "fs/memory/memory.usage_in_bytes": str(9 * gib),
                        "fs/memory/jobs/job7/memory.limit_in_bytes": str(4 * gib),
                        "fs/memory/jobs/job7/memory.usage_in_bytes": str(3 * gib),
                        "fs/memory/jobs/job7/step0/memory.limit_in_bytes": str(2 * gib),
                        "fs/memory/jobs/job7/step0/memory.usage_in_bytes": str(gib // 2)})
    assert cpu_memory.cgroup_memory_headroom(*v1) == gib  # the job's 4 - 3 GiB, below the step's 1.5
    v2 = _fake_cgroups(tmp_path / "v2", "0::/user.slice/run-1.scope\n",
                       [("/", "fs", "cgroup2", "rw,nsdelegate")],
                       {"fs/user.slice/memory.max": "max", "fs/user.slice/memory.current": str(5 * gib),
                        "fs/user.slice/run-1.scope/memory.max": str(3 * gib),
                        "fs/user.slice/run-1.scope/memory.current": str(gib)})
    assert cpu_memory.cgroup_memory_headroom(*v2) == 2 * gib
    # a mount of part of the hierarchy (its root the job's cgroup), as a container is given it
    bound = _fake_cgroups(tmp_path / "bound", "0::/jobs/job7\n", [("/jobs/job7", "fs", "cgroup2", "rw")],
                          {"fs/memory.max": str(3 * gib), "fs/memory.current": str(2 * gib)})
    assert cpu_memory.cgroup_memory_headroom(*bound) == gib
    free = _fake_cgroups(tmp_path / "free", "0::/a\n", [("/", "fs", "cgroup2", "rw")],
                         {"fs/a/memory.max": "max", "fs/a/memory.current": str(gib)})
    assert cpu_memory.cgroup_memory_headroom(*free) is None
    free_v1 = _fake_cgroups(tmp_path / "free_v1", "4:memory:/a\n", [("/", "fs", "cgroup", "rw,memory")],
                            {"fs/a/memory.limit_in_bytes": unlimited, "fs/a/memory.usage_in_bytes": str(gib)})
    assert cpu_memory.cgroup_memory_headroom(*free_v1) is None
    # another container's cgroup mounted first (a monitoring agent's): the mount that holds this one counts
    agents = _fake_cgroups(tmp_path / "agents", "0::/kubepods/pod1/c1\n",
                           [("/kubepods/pod2/c9", "other", "cgroup2", "rw"), ("/", "fs", "cgroup2", "rw")],
                           {"other/memory.max": str(gib // 4), "other/memory.current": "0",
                            "fs/kubepods/pod1/c1/memory.max": str(8 * gib),
                            "fs/kubepods/pod1/c1/memory.current": str(gib)})
    assert cpu_memory.cgroup_memory_headroom(*agents) == 7 * gib
    # page cache the kernel reclaims first is not in use (the kubelet's count)
    cached = _fake_cgroups(tmp_path / "cached", "0::/job\n", [("/", "fs", "cgroup2", "rw")],
                           {"fs/job/memory.max": str(4 * gib), "fs/job/memory.current": str(3 * gib),
                            "fs/job/memory.stat": f"anon {gib}\nfile {2 * gib}\ninactive_file {2 * gib}"})
    assert cpu_memory.cgroup_memory_headroom(*cached) == 3 * gib
    assert cpu_memory.cgroup_memory_headroom(str(tmp_path / "absent"), str(tmp_path / "absent")) is None


def test_available_memory_counts_the_cgroup_and_the_address_space_cap(monkeypatch):
    import resource
    import types

    from rlhf import cpu_linear

    gib = 2 ** 30
    monkeypatch.setattr("psutil.virtual_memory", lambda: types.SimpleNamespace(available=8 * gib))
    monkeypatch.setattr(cpu_memory, "reusable_heap_bytes", lambda: gib)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cpu_memory, "address_space_headroom", lambda: None)
    monkeypatch.setattr(cpu_memory, "cgroup_memory_headroom", lambda: 3 * gib)
    assert cpu_linear.available_memory_bytes() == 4 * gib
    monkeypatch.setattr(cpu_memory, "address_space_headroom", lambda: 2 * gib)
    assert cpu_linear.available_memory_bytes() == 3 * gib
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the cgroup is shared, the cap is each process's own
    monkeypatch.setattr(cpu_memory, "address_space_headroom", lambda: gib)
    assert cpu_linear.available_memory_bytes() == 2 * gib
    monkeypatch.undo()
    cap = (int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) * 1024 + 300 * 2 ** 20
           if Path("/proc/self/status").exists() else None)
    if cap is not None:
        real = resource.getrlimit

        def capped(limit):
            return (cap, resource.RLIM_INFINITY) if limit == resource.RLIMIT_AS else real(limit)

        monkeypatch.setattr(resource, "getrlimit", capped)
        monkeypatch.setattr(cpu_memory, "reusable_heap_bytes", lambda: 0)  # it moves with every allocation
        assert 0 < cpu_memory.address_space_headroom() <= 300 * 2 ** 20
        assert cpu_linear.available_memory_bytes() <= 300 * 2 ** 20


@pytest.mark.parametrize("name, value, message", [
    ("RLHF_CPU_LINEAR", "mkl", "RLHF_CPU_LINEAR must be auto, onednn or blas, got 'mkl'"),
    ("RLHF_CPU_DECODE_KERNEL", "on", "RLHF_CPU_DECODE_KERNEL must be auto or off, got 'on'"),
    (cpu_memory.ENV, "jemalloc", "RLHF_CPU_MALLOC must be auto, keep or default, got 'jemalloc'"),
    (cpu_memory.HUGE_PAGES_ENV, "always", "RLHF_CPU_HUGE_PAGES must be auto or off, got 'always'")])
@pytest.mark.parametrize("script", ["evaluate.py", "train_dpo.py"])
def test_a_bad_cpu_setting_stops_evaluation_and_dpo_before_they_load_anything(script, name, value, message,
                                                                              tiny_model_dir, tmp_path, run_here):
    """Before 2026-12-07 evaluate.py ignored a bad RLHF_CPU_MALLOC and stopped on a bad
    RLHF_CPU_LINEAR only mid-sampling, and train_dpo.py ignored a bad RLHF_CPU_LINEAR."""
    from test_dpo import dpo_args

    out = tmp_path / "out"
    if script == "evaluate.py":
        args = ["--checkpoints", str(tiny_model_dir), "--output_dir", str(out), "--num_prompts", "1",
                "--num_samples", "1", "--max_new_tokens", "2", "--reward_funcs", f"{FIXTURES / 'rewards.py'}:char_diversity"]
    else:
        args = dpo_args(tiny_model_dir, out, tmp_path)
    result = run_here(script, *args, env={name: value})
    assert_one_line_error(result, message)
    assert not out.exists()


def test_a_trainer_that_cannot_be_built_hands_the_switches_back(tiny_model_dir, tmp_path, monkeypatch):
    """The trainer sets glibc's switches before it loads data and model: a construction that fails
    after that (here a missing dataset) gives them back, as a failed run does."""
    from rlhf import trainer
    from rlhf.config import RLConfig
    from rlhf.errors import UserError

    released = []
    monkeypatch.setattr(cpu_memory, "_kept", False)
    monkeypatch.setattr(trainer, "release_freed_memory", lambda stop_keeping=False: released.append(stop_keeping))
    with pytest.raises(UserError, match="dataset"):
        trainer.RLTrainer(RLConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path / "run"),
                                   dataset=str(tmp_path / "missing.jsonl"), max_new_tokens=4, rollout_batch_size=2,
                                   mini_batch_size=2, lora_r=4, reward_funcs=[f"{FIXTURES / 'rewards.py'}:char_diversity"]))
    assert released == [True]
