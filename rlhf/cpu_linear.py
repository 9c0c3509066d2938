"""Float32 linear layers on CPU through oneDNN on AMD processors and AVX-512 Intel ones, where MKL is the slower of the two.

PyTorch's x86 CPU wheels send a float32 ``F.linear`` / ``@`` to MKL's sgemm, which is tuned for
Intel processors. On AMD EPYC (the 2-core machine this project is measured on) oneDNN, which
PyTorch also ships (``torch.ops.mkldnn._linear_pointwise``, the op Inductor uses for CPU linears),
is much faster at training shapes: SmolLM2-135M at 4096 rows, 576 -> 1536 forward 92 -> 163
GFLOP/s, its input gradient 123 -> 196; a GRPO update of 16 x 304 tokens 33.8 -> 28.1 s. Both
compute in float32 (errors against float64 of the same order, ~1e-4 on values of ~30) in another
summation order, so results agree to float rounding, not bitwise.

The choice is fixed per machine, not timed per run: a run must not switch backend (and so its
rounding, and with it every later sample) with the machine's load. oneDNN is used on x86 CPUs
whose vendor is AMD, and on Intel CPUs where PyTorch runs its AVX-512 kernels: on a 2-core Intel
Xeon with AVX-512 and AMX (2026-12-07) MKL was no faster at an update's shapes (4096 rows, 290-330
GFLOP/s either way) and slower at a decode step's: 16 rows of SmolLM2-135M's layers through
oneDNN's packed weights 132-148 GFLOP/s against MKL's 92-122, its LM head 135 against 90; the
benchmark's GRPO step (4 x 4 samples, 32 and 128 tokens, two processes each) generation 3.8-4.3
-> 3.2-3.4 s and 13.9-15.1 -> 10.9-11.5 s, update 1.96-2.20 -> 1.99-2.02 s and 5.26-5.58 ->
4.92-5.36 s. Elsewhere (Intel without AVX-512, unmeasured, and non-x86) PyTorch's own product
stays. ``RLHF_CPU_LINEAR=onednn`` or ``=blas`` overrides that.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rlhf.decode_linear import DecodePacked

ENV = "RLHF_CPU_LINEAR"


# Smallest weight (elements) routed to oneDNN: each call there has a fixed cost of ~14 us against
# ~2 us on BLAS, which outweighs the faster kernel on small layers. Measured at 8 rows (decoding)
# on the 2-core EPYC: 64 -> 192 BLAS 21 us, oneDNN 36; 256 -> 256 (2**16) 41 vs 39, even; 256 ->
# 1024 141 vs 82; at 512 rows oneDNN is ahead from 2**16 up (417 vs 377 us).
MIN_WEIGHT_ELEMENTS = 2 ** 16


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b through oneDNN: x [..., in], weight [out, in] (any strides) -> [..., out].
    No autograd: callers use it under no_grad or inside a Function with its own backward."""
    # oneDNN reads the bias as contiguous whatever its strides
    return torch.ops.mkldnn._linear_pointwise(x, weight, None if bias is None else bias.contiguous(), "none", [], "")


# Row count oneDNN is told to expect when packing; any count of 2+ rows gives the same products.
PACK_ROWS = 16


def pack_for_onednn(weight: Tensor) -> Tensor:
    """``weight`` [out, in] float32 (or bfloat16, see ``bf16_packing_exact``) copied into oneDNN's
    blocked layout, for ``onednn_linear``.

    oneDNN otherwise reorders a plain weight inside every call; a decode step calls each layer
    with a few rows, where that reorder is much of the work. All 211 linears of SmolLM2-135M at
    16 rows on the 2-core EPYC: 56 -> 36 ms (median of 6); at 188 rows 230 -> 211 ms; at 2432
    rows (an update's micro-batch) 0-8% in different runs, too little to hold a packed copy of the
    frozen weights for a whole run, so only sampling packs. For a contiguous weight,
    products through the packed copy equal those through the plain weight bitwise for 2 rows and
    more (checked from 2 to 2048 rows on 14 shapes, whatever row count the layout was made for); a
    single row takes another kernel and differs by rounding, and so does a weight with strided
    rows (a column slice), so callers keep the plain weight for both."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


def pack_for_sampling(weight: Tensor) -> Tensor | DecodePacked:
    """``weight`` [out, in] packed for ``packed_linear``: for the decode kernel where it runs here
    (``rlhf.decode_linear``: float32, bitwise oneDNN's sums, faster at a decode step's rows), else
    for oneDNN (``pack_for_onednn``)."""
    from rlhf import decode_linear

    return decode_linear.pack(weight) or pack_for_onednn(weight)


def packed_linear(x: Tensor, packed: Tensor | DecodePacked, bias: Tensor | None = None) -> Tensor:
    """x W^T + b through a weight from ``pack_for_sampling`` (no autograd): x [..., in] -> [..., out]."""
    from rlhf import decode_linear

    if isinstance(packed, decode_linear.DecodePacked):
        return decode_linear.linear(x, packed, bias)
    return onednn_linear(x, packed, bias)


@functools.cache
def onednn_packing_usable() -> bool:
    """Whether this torch can pack weights for oneDNN (``pack_for_onednn``) and use them."""
    if not onednn_usable() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        weight, x = torch.ones(4, 3), torch.ones(2, 3)
        return bool(torch.equal(onednn_linear(x, pack_for_onednn(weight)), onednn_linear(x, weight)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def bf16_packing_exact() -> bool:
    """Whether a bfloat16 ``F.linear`` here equals the product through a weight packed for oneDNN
    (``pack_for_onednn``) bitwise. PyTorch sends CPU bfloat16 products to oneDNN where the CPU has
    the instructions for it, reordering the plain weight inside every call; the packed copy only
    saves that reorder. Checked on the 2-core EPYC (AVX-512 BF16) for 12 shapes from 64 -> 192 to
    576 -> 49152, with and without bias, at 1 to 700 rows: all equal, for contiguous inputs (a
    strided one with a bias takes another kernel in ``F.linear``, so ``inference_linears`` keeps the
    plain product for it). Probed here at two shapes and five input shapes, so a CPU or a torch
    build whose bfloat16 products take another path (no oneDNN, emulated bfloat16) keeps the plain
    product."""
    if not onednn_packing_usable():
        return False
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    try:
        for inputs, outputs in ((64, 192), (576, 1536)):
            weight = torch.randn(outputs, inputs, generator=generator).bfloat16()
            bias = torch.randn(outputs, generator=generator).bfloat16()
            packed = pack_for_onednn(weight)
            for shape in ((1, inputs), (2, inputs), (16, inputs), (33, inputs), (3, 5, inputs)):
                x = torch.randn(shape, generator=generator).bfloat16()
                if not (torch.equal(F.linear(x, weight), onednn_linear(x, packed))
                        and torch.equal(F.linear(x, weight, bias), onednn_linear(x, packed, bias))):
                    return False
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def available_memory_bytes() -> int:
    """Memory this process can still take: its share of the system's available memory, or less
    where a limit of its cgroups (a container, a batch job) is nearer, and no more than its caps on
    address space leave (``ulimit -v`` / ``-d``), plus what its own heap holds free for reuse
    (``rlhf.cpu_memory``). The processes a launcher started on this machine share the memory
    evenly: they sample and update in step, and each sizes its weight copies by this figure, so
    each taking half of all that is free would together leave nothing; a cap on address space is
    each process's own."""
    import psutil

    from rlhf.cpu_memory import address_space_headroom, cgroup_memory_headroom, reusable_heap_bytes
    from rlhf.distributed import local_process_count

    available = int(psutil.virtual_memory().available)
    limited = cgroup_memory_headroom()
    if limited is not None:
        available = min(available, limited)
    available //= local_process_count()
    mappable = address_space_headroom()
    if mappable is not None:
        available = min(available, mappable)
    return available + reusable_heap_bytes()


# The memory free the first time this run (this process, until a trainer starts another run) sized
# each copy that moves float rounding (``memory_choice``), and the copies whose answer that memory
# has changed since (told once each).
_first_memory: dict[str, float] = {}
_memory_choices_told: set[str] = set()


def forget_memory_choices() -> None:
    """Start ``memory_choice``'s comparisons afresh: a trainer built in a process that trained
    before (a notebook's second run) measures its memory against its own first step, not the
    earlier run's."""
    _first_memory.clear()
    _memory_choices_told.clear()


def memory_choice(copy: str, fits: Callable[[float], bool], memory: float | None = None) -> bool:
    """``fits(memory)``, for one of the CPU speed-ups' copies whose presence moves the float rounding
    of every later number (the sampler's products, logits or attention kept for the update, the LoRA
    folded or merged into copies of the weights); ``memory``: the memory free now (default
    ``available_memory_bytes()``). Where the answer differs from the one the memory free at this
    run's first call for ``copy`` would give the same ``fits`` (its sizes change with each
    batch's shapes, which a resumed run sees alike), a warning says so, once per copy.

    Such a choice follows the memory: a process whose heap has grown over its steps, or a machine
    whose other processes took memory, can leave a copy off at a later step. That moves the run's
    numbers by float rounding (1e-8 to 1e-6 of the adapter after a few steps), and a run resumed
    from an earlier checkpoint, in a fresh process with more memory free, may choose otherwise and
    end that far from the uninterrupted run (a reviewer's run under ``ulimit -v``: 6e-8). Sizing
    them by a figure fixed at the run's start instead was tried on 2026-12-07: the same run then ran
    out of memory at step 4, the copies kept where its grown heap had no room for them."""
    memory = available_memory_bytes() if memory is None else memory
    first = _first_memory.setdefault(copy, memory)
    answer = fits(memory)
    if answer != fits(first) and copy not in _memory_choices_told:
        _memory_choices_told.add(copy)
        warnings.warn(f"memory: the {copy} {'now fit and are made' if answer else 'no longer fit and are left off'}, "
                      "as the memory free changed; this moves the run's numbers by float rounding, and a run resumed "
                      "from an earlier checkpoint may choose otherwise and differ by as much", stacklevel=2)
    return answer


def onednn_usable() -> bool:
    try:
        if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            return False
        probe = torch.ones(2, 3)
        return bool(torch.allclose(onednn_linear(probe, torch.ones(4, 3)), torch.full((2, 4), 3.0)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def cpu_vendor() -> str:
    """The x86 vendor string (AuthenticAMD, GenuineIntel), or '' where it cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def linear_choice() -> str:
    """``RLHF_CPU_LINEAR`` as read now: auto, onednn or blas. A bad value stops the run (ConfigError)."""
    choice = os.environ.get(ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "onednn", "blas"):
        from rlhf.errors import ConfigError
        raise ConfigError(f"{ENV} must be auto, onednn or blas, got {choice!r}")
    return choice


@functools.cache
def use_onednn() -> bool:
    """Whether float32 CPU linears go through oneDNN on this machine (see the module docstring);
    decided once per process."""
    choice = linear_choice()
    if choice == "blas" or not onednn_usable():
        return False
    if choice == "onednn":
        return True
    vendor = cpu_vendor()
    return vendor == "AuthenticAMD" or (vendor == "GenuineIntel" and cpu_capability().startswith("AVX512"))


def cpu_capability() -> str:
    """The widest x86 vector kernels PyTorch dispatches to here (``AVX512``, ``AVX2``, ``DEFAULT``...;
    lowered by ``ATEN_CPU_CAPABILITY``), or '' where this torch cannot say."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return ""


def check_cpu_settings() -> None:
    """Stop on a bad ``RLHF_CPU_LINEAR``, ``RLHF_CPU_DECODE_KERNEL``, ``RLHF_CPU_MALLOC`` or
    ``RLHF_CPU_HUGE_PAGES`` (ConfigError: one line, exit 2) before a command loads anything or
    writes its output, on any device: each is otherwise read only where the CPU path first needs it
    (until 2026-12-07 ``evaluate.py`` ignored a bad ``RLHF_CPU_MALLOC`` and stopped on a bad
    ``RLHF_CPU_LINEAR`` mid-sampling, and ``train_dpo.py`` ignored a bad ``RLHF_CPU_LINEAR`` and read
    the malloc choice after building TRL's trainer)."""
    from rlhf.cpu_memory import malloc_choice
    from rlhf.decode_linear import kernel_choice

    linear_choice()  # as set now: ``use_onednn`` answers once per process
    kernel_choice()
    malloc_choice()


def routes_to_onednn(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether ``x @ weight^T (+ bias)`` goes through oneDNN here: float32 tensors on the CPU, a
    weight of at least MIN_WEIGHT_ELEMENTS, no autocast (oneDNN would compute in float32 where the
    plain layer computes in bfloat16), and this machine's choice (``use_onednn``)."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and weight.numel() >= MIN_WEIGHT_ELEMENTS and not torch.is_autocast_enabled("cpu")
            and use_onednn())


def times_transposed(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight^T (no autograd) through the faster backend here: x [N, in], weight [out, in]."""
    return onednn_linear(x, weight) if routes_to_onednn(x, weight) else x @ weight.t()


@dataclass
class _KeptTransposes:
    """The scope of ``transposed_weights_kept``: its copies, data_ptr -> (the weight, its version,
    its transpose copy), and how many more bytes of copies it may still make (None until the first
    copy, when it is read off the free memory). ``micro_batch``: (token positions of the
    micro-batch running, of the update's largest), as the update last told ``expect_micro_batch``;
    ``start_free``: the memory free when it first did, before the first micro-batch's forward."""

    start_free: int = 0
    copies: dict[int, tuple[Tensor, int, Tensor]] = field(default_factory=dict)
    budget: int | None = None
    micro_batch: tuple[int, int] | None = None

    def transpose_of(self, weight: Tensor) -> Tensor | None:
        """``weight``'s kept transpose copy, made now if it is missing or stale and the budget
        holds it; None: no room, the caller takes the strided view."""
        key = weight.data_ptr()
        kept = self.copies.get(key)
        if kept is not None:
            # the same tensor, still at that address (a ``.data`` swap frees it for another tensor)
            if (kept[0] is weight and kept[1] == weight._version and kept[0].shape == weight.shape
                    and kept[0].stride() == weight.stride()):
                return kept[2]
            del self.copies[key]  # stale: freed before its replacement is made, and its bytes credited
            self.budget += kept[2].nbytes  # set when that copy was made
        if self.budget is None:
            self.budget = self._first_budget()
        needed = weight.nbytes
        if needed > self.budget:
            return None
        self.budget -= needed
        self.copies[key] = (weight, weight._version, transposed_copy(weight))
        return self.copies[key][2]

    def _first_budget(self) -> int:
        """Half of the memory free once the update's largest micro-batch holds its activations.

        Read when the first copy is wanted, inside the first micro-batch's forward (the chunked LM
        head) or its backward, where that micro-batch's activations already hold their memory.
        The update sorts a minibatch's micro-batches by length, so a later one can be several times
        as long: what the running one took since it started, scaled by token positions
        (activations grow with them), is kept free for the largest. Measured on SmolLM2-135M,
        GRPO at 256 new tokens: 1.64 MB per position held at the first copy for 768 positions,
        1.70 MB at the peak of a 1196-position micro-batch."""
        free = available_memory_bytes()
        if self.micro_batch is not None:
            running, largest = self.micro_batch
            held = max(self.start_free - free, 0)
            free -= held * max(largest - running, 0) // max(running, 1)
        return max(free, 0) // 2


_transposed_copies: _KeptTransposes | None = None

# Rows of a tall weight transposed per block by ``transposed_copy``.
TRANSPOSE_BLOCK_ROWS = 256


def transposed_copy(weight: Tensor) -> Tensor:
    """``weight.t().contiguous()`` for a 2-D ``weight`` [out, in], a block of rows at a time.

    One strided copy of a tall matrix writes each output row across the whole of it; in blocks of
    256 rows the writes stay within a few pages: SmolLM2's 49152 x 576 LM head 96 -> 48 ms
    (AVX-512 EPYC, 2 threads), a 1536 x 576 weight 0.47 ms either way. The same numbers (a copy)."""
    rows = weight.shape[0]
    if rows <= 2 * TRANSPOSE_BLOCK_ROWS:
        return weight.t().contiguous()
    transposed = torch.empty(weight.shape[1], rows, dtype=weight.dtype, device=weight.device)
    for start in range(0, rows, TRANSPOSE_BLOCK_ROWS):
        transposed[:, start:start + TRANSPOSE_BLOCK_ROWS].copy_(weight[start:start + TRANSPOSE_BLOCK_ROWS].t())
    return transposed


@functools.cache
def transposed_copy_exact() -> bool:
    """Whether, here, oneDNN's product with a weight's transpose given as a contiguous copy equals
    the product with the strided ``weight.t()`` view bitwise (2+ rows). Both reorder into the
    same blocked layout, so the kernel and its summation order are the same; the strided view
    just takes a slower reorder, on every call. Checked on the 2-core EPYC (AVX2) for SmolLM2's
    five shapes, 576 -> 192 up to the 49152-row LM head, at 2 to 1000 rows; one row takes another
    kernel and differs by rounding, so ``times_weight`` keeps the view there. Probed at two shapes
    so a CPU or build where the two paths part keeps the view."""
    if not use_onednn():
        return False
    generator = torch.Generator().manual_seed(0)
    try:
        for outputs, inputs in ((1536, 576), (576, 1536)):
            weight = torch.randn(outputs, inputs, generator=generator)
            copy = weight.t().contiguous()
            for rows in (2, 17, 300):
                grad = torch.randn(rows, outputs, generator=generator)
                if not torch.equal(onednn_linear(grad, weight.t()), onednn_linear(grad, copy)):
                    return False
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


# The copies are kept where products through them take less than this share of the strided view's
# time at both of the probe's shapes: on the 2-core EPYC with AVX2 the view took 1.4-1.7x the
# copy's time at 4096 rows (see ``transposed_weights_kept``; its extra reorder does not grow with
# the rows, so at the probe's 512 rows the share is lower still); on the Zen 4 EPYC with AVX-512
# 0.98-1.03 from 300 to 4800 rows, where the copies only cost their making and their memory.
COPY_PAYS_BELOW = 0.85
# what transposed_copies_pay times with; a test drives it by hand
_clock = time.perf_counter


@functools.cache
def transposed_copies_pay() -> bool:
    """Whether oneDNN multiplies by a contiguous transposed copy of a weight clearly faster than by
    the strided ``weight.t()`` view here (``COPY_PAYS_BELOW`` at both of two SmolLM2 shapes, 512
    rows, best of five interleaved), timed once per process when the first update starts (about
    0.06 s on the idle 2-core Zen 4 EPYC, several times that under load or on slower products).
    Where it does not, an update makes no copies.

    Timed, not fixed per machine as ``use_onednn`` is: both give the same numbers bitwise
    (``transposed_copy_exact``), so the answer moves speed and memory only. Leaning to no: a
    busy machine that slows the view's timings more than the copy's makes copies where they do not
    pay, so the copy must win at both shapes. SmolLM2-135M GRPO, 32 new tokens, on the Zen 4 EPYC:
    update 2.12-2.33 s with the copies against 1.95-2.00 without, peak RSS 3.05-3.10 -> 2.69-2.75
    GB; a random model of Qwen3-0.6B's shape 6.75-7.19 -> 6.39-6.48 s, 7.48 -> 6.61 GB."""
    if not transposed_copy_exact():
        return False
    generator = torch.Generator().manual_seed(0)
    try:
        return all(_copy_time_share(torch.randn(outputs, inputs, generator=generator),
                                    torch.randn(512, outputs, generator=generator)) < COPY_PAYS_BELOW
                   for outputs, inputs in ((1536, 576), (576, 1536)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _copy_time_share(weight: Tensor, grad: Tensor, repeats: int = 5) -> float:
    """oneDNN's best time for grad @ weight through ``transposed_copy(weight)`` over its best time
    through the strided ``weight.t()``; grad [N, out], weight [out, in]. Interleaved, so a burst of
    load falls on both alike, after one untimed call each (their first reorders)."""
    copy = transposed_copy(weight)
    best = {False: math.inf, True: math.inf}
    for transposed in (weight.t(), copy):
        onednn_linear(grad, transposed)
    for _ in range(repeats):
        for transposed, is_copy in ((weight.t(), False), (copy, True)):
            start = _clock()
            onednn_linear(grad, transposed)
            best[is_copy] = min(best[is_copy], _clock() - start)
    return best[True] / max(best[False], 1e-12)


@contextlib.contextmanager
def transposed_weights_kept(model: torch.nn.Module) -> Iterator[None]:
    """While the block runs (an update), ``times_weight`` keeps a contiguous copy of each frozen
    weight's transpose it is given, for every later product with that weight, and drops them all
    at the end.

    A backward multiplies by W itself (dL/dx = g W for y = x W^T): the input gradient of each
    frozen LoRA base layer, and the chunked LM head's p W. oneDNN takes ``W.t()``, a strided view,
    through a slower path on every call; through a contiguous copy the product is bitwise the same
    (``transposed_copy_exact``) and faster. On the 2-core EPYC (AVX2), at 4096 rows: 576 -> 1536
    147 -> 103 ms, 1536 -> 576 170 -> 100 ms; the LM head's p W for 682 rows 866 -> 586 ms. A
    copy costs about a fifth of one such product (1.6 ms for 576 x 1536, 109 ms for the LM head),
    so it is made once per update and not per call. Only where the copies are faster here
    (``transposed_copies_pay``: not on the Zen 4 EPYC with AVX-512), and where free memory holds
    twice the model's frozen float32 weights when the update starts (the copies take once that:
    0.54 GB for SmolLM2-135M), and then at most half the memory that is free when the first copy is wanted
    (read once, with the first micro-batch's activations in memory, which the start cannot see)
    after setting aside what the update's largest micro-batch will take on top of those, where the
    update says (``expect_micro_batch``); past that the remaining weights keep the view. The
    copies are not kept across steps, where sampling needs the memory for its own weight copies.

    A weight changed in place is copied again (its version counter moves); a write through
    ``.data`` moves no counter and is not seen, as with ``inference_linears``' packed copies: the
    update changes no frozen weight. A scope opened inside another adds nothing (the outer one's
    copies serve it)."""
    global _transposed_copies
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                       if not p.requires_grad and p.dim() == 2 and p.dtype == torch.float32 and p.device.type == "cpu")
    # the timed probe last: it runs once per process, and only where copies could be made at all
    enabled = (_transposed_copies is None and frozen_bytes > 0 and 2 * frozen_bytes < available_memory_bytes()
               and transposed_copies_pay())
    if enabled:
        _transposed_copies = _KeptTransposes()
    try:
        yield
    finally:
        if enabled:
            _transposed_copies = None


def expect_micro_batch(positions: int, largest_positions: int) -> None:
    """Tell an open ``transposed_weights_kept`` scope that a micro-batch of ``positions`` token
    positions (rows x columns) runs next, and that none in this update runs more than
    ``largest_positions``: until the copies' budget is read, it then leaves room for the largest
    one's activations. Nothing where no scope is open or its budget is already set."""
    if _transposed_copies is not None and _transposed_copies.budget is None:
        if _transposed_copies.micro_batch is None:  # what the first micro-batch takes is counted from here
            _transposed_copies.start_free = available_memory_bytes()
        _transposed_copies.micro_batch = (positions, largest_positions)


def times_weight(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight (no autograd) through the faster backend here: x [N, out], weight [out, in] -> [N, in].
    Inside ``transposed_weights_kept`` a frozen weight's transpose is copied once and reused."""
    transposed = weight.t()
    if not routes_to_onednn(x, transposed):
        return x @ weight
    # a strided weight (a column slice) or a single row takes another kernel: rounding would change
    # an inference-mode tensor has no version counter to tell a change by
    if (_transposed_copies is not None and x.shape[0] >= 2 and not weight.requires_grad and weight.is_contiguous()
            and not weight.is_inference()):
        kept = _transposed_copies.transpose_of(weight)
        if kept is not None:
            transposed = kept
    return onednn_linear(x, transposed)
