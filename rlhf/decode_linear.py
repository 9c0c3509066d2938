"""The sampler's float32 products on AVX-512 and AVX2 CPUs, bitwise oneDNN's, faster at a decode step's rows.

A decode step multiplies 16 rows (4 prompts x 4 samples) by every weight of the model once: a
stream of the weights with 16 FMAs per weight. oneDNN's kernels, at that row count, read them far
below the memory's rate: on the 2-core Xeon with AVX-512 and AMX (2026-12-07), the 121 products of
a SmolLM2-135M decode step (538 MB of weights, packed for oneDNN) took 41-44 ms, 13 GB/s, where a
plain read of the same weights in the same 121 calls takes about 27 ms (20 GB/s). Hand-written
here (``decode_linear.c``, about 160 lines) since no library kernel does better at these rows
(MKL's is slower still), and measured to pay: the same products 32-33 ms (three runs each,
alternating), 23 against 28 ms at 2 rows, 49 against 58 at 32, 109-111 against 115-118 at 128; a
prefill of 384 rows takes about 1.1x oneDNN's time (302 against 270-280 ms for the layers), once
per rollout, so the sampler takes the kernel at every row count rather than hold a second copy.

Its sums are oneDNN's bitwise, so the sampler still draws from the numbers the update scores:
oneDNN sums a product's inputs (K) in order with one FMA each, in segments of 512 (K up to 1024 on
that machine) or 1024 (from K = 1536) summed from zero and then added in order, whatever the row
count from 2 on (for all but weights with very few outputs and very many inputs, whose inputs it
splits across threads). The kernel takes the segments as an argument, and ``onednn_segments``
finds the ones that give oneDNN's sums for each weight shape on this machine, once per process,
by comparing both on random inputs; a shape none matches keeps oneDNN. A single row, where oneDNN
takes another kernel, gets the sums of 2+ rows (those the update's products have).

On the 2-core Zen 4 EPYC (AVX-512; 2026-12-08) the same 121 products took 26.7-28.4 ms against
oneDNN's 28.6-31.9 at 16 rows and 15.7-18.1 against 23.6-25.9 at 2; from 32 rows they are as fast
as oneDNN's (47-53 against 49-51 ms), and 3-10% slower at 128 (168-201 against 162-176). The
same source built for AVX2 (``FLAGS_BY_WIDTH``; 8 columns per register and 16 registers: 4 rows
x 24 columns per tile) against oneDNN's AVX2 kernels (``ONEDNN_MAX_CPU_ISA=AVX2`` on that Zen 4,
whose 256-bit FMAs run at the same rate as on the AVX2 EPYCs; not measured on an AVX2 machine):
33.8-34.9 against 41.0-47.7 ms at 16 rows, 18.7-21.2 against 25.4-27.6 at 2, 54-55 against 60-62
at 32, the same at 128. oneDNN's AVX2 kernels sum in order too, in segments of their own (K =
576 in one), which the probe below finds as it finds the AVX-512 ones.

A last tile of fewer rows than a full one multiplies only its rows (since 2026-12-08; before, the
zero rows too): on the Zen 4 the 121 products at 9 / 10 / 12 / 14 / 20 rows 29.3 / 29.5 / 29.3 /
29.5 / 40.3 -> 23.2 / 24.0 / 24.6 / 27.0 / 34.9 ms, full tiles (16, 24 rows) and 2 to 6 rows as
before; the benchmark's GRPO at 4 prompts x 3 samples (12 rows) and 128 tokens generated in 6.21
/ 6.73 s against 6.78 / 7.37 (alternating processes). Such counts are common: groups of 3 or 6,
and rows leaving the decode batch as their responses end (``compact_finished_rows``).

Used only where oneDNN takes the sampler's float32 products (``rlhf.cpu_linear.use_onednn``),
PyTorch runs its AVX-512 or AVX2 kernels (``vector_width``: its CPU capability, which
``ATEN_CPU_CAPABILITY`` lowers), a C compiler builds ``decode_linear.c`` for that width (about a
second, once per machine, into ``RLHF_CACHE_DIR``), and PyTorch's OpenMP runtime is libgomp,
which the kernel's threads then share; anywhere else the products stay oneDNN's.
``RLHF_CPU_DECODE_KERNEL=off`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import stat
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

ENV = "RLHF_CPU_DECODE_KERNEL"
SOURCE = Path(__file__).with_name("decode_linear.c")
# The compiler's flags for each vector width the kernel is built for (PyTorch's CPU capability:
# AVX512 for every AVX-512 level it names, AVX2 with FMA); the source picks its code by them.
FLAGS_BY_WIDTH = {"AVX512": ("-O3", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC"),
                  "AVX2": ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")}
# Segment lengths tried, in order, for the one that gives oneDNN's sums (512 and 1024 seen).
SEGMENT_CANDIDATES = (512, 1024, None, 256, 2048, 128, 4096, 64)  # None: K in one segment


def kernel_choice() -> str:
    """``RLHF_CPU_DECODE_KERNEL`` as read now: auto or off. A bad value stops the run (ConfigError)."""
    choice = os.environ.get(ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "off"):
        from rlhf.errors import ConfigError
        raise ConfigError(f"{ENV} must be auto or off, got {choice!r}")
    return choice


def _mapped_openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes (libgomp, libiomp, libomp) mapped into this process."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in lines if any(name in line.rsplit("/", 1)[-1] for name in names)}


def vector_width() -> str | None:
    """AVX512 or AVX2: the kernel built for PyTorch's own CPU capability here, or None (no kernel)."""
    from rlhf.cpu_linear import cpu_capability

    capability = cpu_capability()  # ATEN_CPU_CAPABILITY lowers it, and the kernel with it
    return "AVX512" if capability.startswith("AVX512") else "AVX2" if capability == "AVX2" else None


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def _private(folder: Path) -> bool:
    """Whether ``folder`` is a folder (not a link) of this user's that no one else can write into.
    The temporary folder is shared by the machine's users: a library another user placed in
    ``rlhf-kernels-<uid>`` there would otherwise be loaded into this process."""
    try:
        info = folder.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _build(width: str) -> Path:
    """The kernel's shared library for ``width`` (AVX512 or AVX2), compiled into the cache on first
    use (keyed by source, flags and compiler, so an edit or another compiler builds afresh). Raises
    OSError / CalledProcessError / TimeoutExpired where it cannot be built."""
    from rlhf.models import cache_root

    compiler, build_flags = _compiler(), FLAGS_BY_WIDTH[width]
    key = hashlib.sha256(SOURCE.read_bytes() + repr((compiler, build_flags)).encode()).hexdigest()[:16]
    cache, shared = cache_root() / "kernels", Path(tempfile.gettempdir()) / f"rlhf-kernels-{os.getuid()}"
    for folder in (cache, shared):
        if (folder / f"decode_linear-{key}.so").exists() and (folder is cache or _private(shared)):
            return folder / f"decode_linear-{key}.so"
    for folder in (cache, shared):
        try:
            folder.mkdir(mode=0o700 if folder is shared else 0o777, parents=True, exist_ok=True)
            if folder is shared and not _private(shared):
                continue
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".decode_linear-"):
                pass
        except OSError:
            continue  # an unwritable cache (read-only, not ours): the temporary folder
        target = folder / f"decode_linear-{key}.so"
        partial = folder / f".{target.name}.{os.getpid()}"
        try:
            subprocess.run([*compiler, *build_flags, str(SOURCE), "-o", str(partial)], check=True,
                           capture_output=True, timeout=120)
            os.replace(partial, target)  # whole or absent for another process building it too
        finally:
            partial.unlink(missing_ok=True)
        return target
    raise OSError("no writable folder for the kernel")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it is off or cannot run here (see the module docstring);
    decided once per process."""
    from rlhf.cpu_linear import use_onednn

    width = vector_width()
    if kernel_choice() == "off" or width is None or not use_onednn():
        return None
    runtimes = _mapped_openmp_runtimes()
    # the kernel's OpenMP must be PyTorch's own libgomp, loaded already (the loader then binds the
    # kernel's libgomp.so.1 to it): a second runtime would spin its own threads beside PyTorch's
    if len(runtimes) != 1 or "libgomp" not in next(iter(runtimes)):
        return None
    try:
        loaded = load(width)
    except (OSError, AttributeError, subprocess.SubprocessError):  # AttributeError: a function missing
        return None
    return loaded if _mapped_openmp_runtimes() == runtimes else None


def load(width: str) -> ctypes.CDLL:
    """The kernel built for ``width`` (AVX512 or AVX2), loaded and its functions typed, and its
    ``lanes`` (output columns per packed block) read once; ``library`` decides which, if any, runs
    here. Raises where it cannot be built or loaded."""
    loaded = ctypes.CDLL(str(_build(width)))
    loaded.rlhf_decode_lanes.restype = ctypes.c_int
    loaded.rlhf_decode_lanes.argtypes = []
    loaded.lanes = loaded.rlhf_decode_lanes()
    function = loaded.rlhf_decode_linear
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                         ctypes.c_int]
    return loaded


@dataclass(eq=False)
class DecodePacked:
    """A float32 weight [out, in] packed for the kernel: ``blocks`` [ceil(out / lanes), in, lanes]
    (``lanes()``; zero columns past ``out_features``), and the segments of ``in`` that give oneDNN's
    sums."""

    blocks: Tensor
    out_features: int
    bounds: tuple[int, ...]
    bounds_array: ctypes.Array = field(init=False, repr=False)  # as the kernel reads them

    def __post_init__(self) -> None:
        self.bounds_array = (ctypes.c_int * len(self.bounds))(*self.bounds)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    @property
    def in_features(self) -> int:
        return self.blocks.shape[1]


def _segment_bounds(in_features: int, length: int | None) -> tuple[int, ...]:
    step = length or in_features
    return (*range(0, in_features, step), in_features)


def lanes() -> int:
    """Output columns per packed block: one vector register of float32 in the loaded kernel (16
    with AVX-512, 8 with AVX2). Only where ``library()`` is not None."""
    return library().lanes


def _blocks(weight: Tensor) -> Tensor:
    out_features, in_features = weight.shape
    block = lanes()
    padding = -out_features % block
    if padding:
        weight = torch.cat([weight, weight.new_zeros(padding, in_features)])
    return weight.reshape(-1, block, in_features).transpose(1, 2).contiguous()  # any strides


# (in, out) -> the segment bounds found for that weight shape, or None: none matched
_segments_by_shape: dict[tuple[int, int], tuple[int, ...] | None] = {}


def forget_segments() -> None:
    """Probe every weight shape afresh (tests)."""
    _segments_by_shape.clear()


def onednn_segments(weight: Tensor, blocks: Tensor) -> tuple[int, ...] | None:
    """The segment bounds of the inputs for which the kernel's sums through ``blocks`` (``weight``
    packed) equal oneDNN's through ``weight`` bitwise, or None; probed once per weight shape and
    process, on the weight itself (no second weight of its size in memory; oneDNN's reorder inside
    the product is the only transient copy), with random inputs of 2 and 19 rows, with and without
    a bias, at this process's thread count, one thread and one per core (``_cores``): oneDNN
    splits the inputs of a weight with very few outputs and very many inputs (such as 32 x 32768)
    across threads, and a sum that changes with the thread count matches no segments (a
    reviewer's probe at one thread had matched, then differed at two)."""
    from rlhf.cpu_linear import onednn_linear

    shape = (weight.shape[1], weight.shape[0])
    if shape in _segments_by_shape:
        return _segments_by_shape[shape]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, shape[0], generator=generator) for rows in (2, 19)]
    bias = torch.randn(shape[1], generator=generator)
    threads = torch.get_num_threads()
    expected = [(x, None, onednn_linear(x, weight)) for x in inputs]
    expected.append((inputs[1], bias, onednn_linear(inputs[1], weight, bias)))
    try:
        for other in sorted({1, _cores()} - {threads}):
            torch.set_num_threads(other)
            expected += [(x, None, onednn_linear(x, weight)) for x in inputs]
    finally:
        torch.set_num_threads(threads)
    candidates = dict.fromkeys(_segment_bounds(shape[0], length) for length in SEGMENT_CANDIDATES)
    matching = [bounds for bounds in candidates
                if all(torch.equal(linear(x, DecodePacked(blocks, shape[1], bounds), with_bias), sums)
                       for x, with_bias, sums in expected)]
    if len(matching) > 1:
        # a weight whose sums come out exact in several orders (zeros, a few distinct small values)
        # tells nothing about the order: this one keeps oneDNN, the next of its shape probes again
        return None
    _segments_by_shape[shape] = matching[0] if matching else None
    return _segments_by_shape[shape]


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pack(weight: Tensor) -> DecodePacked | None:
    """``weight`` [out, in] packed for the kernel, or None where the kernel does not run here or
    does not give oneDNN's sums at this shape (the caller packs for oneDNN then)."""
    if (weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu"
            or 0 in weight.shape or library() is None):
        return None
    with torch.no_grad():
        weight = weight.detach()
        blocks = _blocks(weight)
        bounds = onednn_segments(weight, blocks)
        return None if bounds is None else DecodePacked(blocks, weight.shape[0], bounds)


def linear(x: Tensor, packed: DecodePacked, bias: Tensor | None = None) -> Tensor:
    """x W^T + b: x [..., in] float32, ``packed`` from ``pack`` -> [..., out]. No autograd."""
    kernel = library()
    if kernel is None or packed.blocks.shape[-1] != kernel.lanes:
        # packed for another build of the kernel (the process changed its mind): its blocks would be misread
        raise RuntimeError("decode_linear: this weight was packed for another vector width than the kernel loaded")
    if x.shape[-1] != packed.in_features:  # the kernel would read past each row's end
        raise ValueError(f"decode_linear: x has {x.shape[-1]} features, the weight {packed.in_features} inputs")
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = x.new_empty(rows.shape[0], packed.out_features)
    if rows.shape[0] and kernel.rlhf_decode_linear(
            rows.data_ptr(), rows.stride(0), packed.blocks.data_ptr(), None if bias is None else bias.data_ptr(),
            out.data_ptr(), out.stride(0), rows.shape[0], packed.in_features, packed.out_features,
            ctypes.addressof(packed.bounds_array), len(packed.bounds) - 1, torch.get_num_threads()):
        raise MemoryError("decode_linear: no memory for the transposed rows")
    return out.view(*x.shape[:-1], packed.out_features)
