"""Roofline of one GRPO step: the least time this machine needs for the work a step must do.

Each phase's work is counted from the model's config (pure functions, no model is run) and
divided by this machine's limits (``measure_machine``: fp32 GEMM FLOP/s at the step's shapes and
memory bandwidth); a phase's measured time over its bound says how far from the machine it runs.

What is counted (Llama-style decoder, float32, LoRA on every linear layer of the blocks):
- generation: the prompt's prefill (once per group with a shared prompt) and T decode steps of
  ``rows`` tokens; decode step t reads every weight once and each row's KV cache of P + t positions,
  so it is bound by max(bytes / bandwidth, FLOPs / GEMM rate at M = rows). LoRA is folded into the
  weights while sampling, so the base shapes are all there is.
- logprobs: each separate no-grad pass (old / reference) is one forward: 2 FLOPs per weight per
  token through the blocks, the LM head only on the T predicting positions.
- update: one forward + backward. A frozen weight W (y = x W^T) needs the forward (2 FLOPs per
  weight and token) and the input gradient dx = g W (2 more) but no weight gradient: 4x, not the
  6x of full fine-tuning (where dW = g^T x adds 2 more). Layer 0's q/k/v/gate/up read the frozen
  embedding, whose gradient nobody needs: 2x. The tied LM head is frozen: 4x on the predicting
  positions. LoRA A, B (trained): forward x A^T, (x A^T) B^T = 2r(in+out); backward g B, dA, dB and
  the low-rank part of dx = 4r(in+out) (less 2r·in in layer 0's q/k/v/gate/up): 6x their size.
  Attention's score and value products (QK^T, AV) are counted causally (2 FLOPs per head dim per
  query-key pair each); their backward is 2x their forward. Where the update's forward takes the
  sampler's products (``sampled_forward``), the frozen weights' forward after the prompt is not
  counted (the sampler did it): 2x there; where its forward over the shared prompt prefix takes
  the prefill's (``sampled_prefix``), neither is the prefix's; where its logprobs take the sampler's
  logits (``sampled_logits``), the LM head's forward is the sampler's too: 2x on the predicting positions;
  where its attention takes the sampler's outputs (``sampled_attention``), the attention's forward over
  the response is not counted either (its backward, 2x, is).
Norms, activations, softmax and the optimizer step are left out (elementwise; small next to the GEMMs).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

FLOAT32_BYTES = 4
PHASES_WITH_BOUNDS = ("generation", "logprobs", "update")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that set its FLOPs and bytes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True  # LM head = the input embedding (SmolLM2); else a matrix of its own

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (LlamaConfig and the like)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                   heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                   head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
                   tied=bool(getattr(text, "tie_word_embeddings", False)))

    def matrix_weights_of(self, config: Any) -> str | None:
        """None if the matrices of the model ``config`` builds (every parameter of two or more
        dimensions, counted on the meta device: no memory) are exactly what this shape counts (the
        blocks' q/k/v/o and gated MLP, fused or not, the embedding and an untied LM head); else why
        not, in a few words. A mixture of experts (transformers keeps the experts' weights as 3-D
        tensors), an MLP without a gate (GPT-NeoX, Phi-2) or recurrent layers fail here, where
        counting them as a dense Llama block would give a wrong bound."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        found = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
        if found != self.matrices:
            return f"its weight matrices hold {found:,} numbers where a dense Llama-style block layout counts {self.matrices:,}"
        return None

    def block_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_weights(self) -> int:
        """Matmul weights of all blocks (what every token multiplies through)."""
        return self.layers * sum(i * o for i, o in self.block_linears().values())

    def first_layer_inputs(self) -> dict[str, tuple[int, int]]:
        """Linears of layer 0 that read the embedding (q, k, v, gate, up): with a frozen embedding
        nothing needs their input gradient."""
        return {name: shape for name, shape in self.block_linears().items() if name not in ("o_proj", "down_proj")}

    @property
    def lm_head_weights(self) -> int:
        return self.hidden * self.vocab

    @property
    def matrices(self) -> int:
        """Every weight matrix: the blocks' linears, the embedding, and the LM head if untied."""
        return self.block_weights + self.lm_head_weights * (1 if self.tied else 2)

    @property
    def parameters(self) -> int:
        """All parameters: the matrices, two norms per block and the final norm."""
        return self.matrices + 2 * self.layers * self.hidden + self.hidden

    def lora_weights(self, r: int) -> int:
        """LoRA A (r x in) and B (out x r) on every linear layer of the blocks (peft's all-linear)."""
        return self.layers * sum(r * (i + o) for i, o in self.block_linears().values())

    def attention_flops(self, queries: int, past: int) -> float:
        """QK^T and AV of one sequence: ``queries`` new positions attending causally to ``past``
        earlier ones and to each other (2 FLOPs per head dim per pair, for each of the two products)."""
        pairs = queries * past + queries * (queries + 1) / 2
        return 4.0 * self.layers * self.heads * self.head_dim * pairs

    def kv_bytes(self, positions: int) -> float:
        """Float32 K and V of ``positions`` positions of one sequence, all layers."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * positions * FLOAT32_BYTES


@dataclass(frozen=True)
class StepShape:
    """One step's batch: ``groups`` prompts of P tokens (padded), ``group_size`` responses of T
    tokens each."""

    groups: int
    group_size: int
    prompt_length: int
    response_length: int
    lora_r: int | None = 16  # None: full fine-tuning
    no_grad_passes: int = 0  # separate logprob passes over the batch (old, reference); 0 for one-update GRPO
    shared_prompt: bool = True  # a group's prompt runs once (its KV cache copied to each row)
    # the update's forward after the prompt takes the frozen products from the sampler (rlhf.sampled_products)
    sampled_forward: bool = False
    # the update's forward over the shared prompt prefix takes them from the sampler's prefill (prefix_replay)
    sampled_prefix: bool = False
    # the update's logprobs take the sampler's logits (the LM head's forward over the response)
    sampled_logits: bool = False
    # the update's attention over the response takes the sampler's outputs (its SDPA forward)
    sampled_attention: bool = False

    @property
    def sequences(self) -> int:
        return self.groups * self.group_size

    @property
    def prefix_rows(self) -> int:
        return self.groups if self.shared_prompt else self.sequences


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float


def prefill_work(model: ModelShape, step: StepShape) -> Work:
    """The prompt minus its last token (which the first decode step takes), through the blocks."""
    tokens = step.prefix_rows * (step.prompt_length - 1)
    flops = 2.0 * model.block_weights * tokens + step.prefix_rows * model.attention_flops(step.prompt_length - 1, 0)
    return Work(flops, model.block_weights * FLOAT32_BYTES)


def decode_work(model: ModelShape, step: StepShape) -> list[Work]:
    """Decode step t (t < T): one token per row through the blocks and the LM head, attending to
    P + t positions; reads every weight once and each row's KV cache."""
    weights = model.block_weights + model.lm_head_weights
    rows = step.sequences
    return [Work(2.0 * weights * rows + rows * model.attention_flops(1, step.prompt_length + t - 1),
                 weights * FLOAT32_BYTES + rows * model.kv_bytes(step.prompt_length + t))
            for t in range(step.response_length)]


def _forward_tokens(step: StepShape) -> tuple[int, int]:
    """(tokens through the blocks, tokens through the LM head) of one forward over the batch: the
    shared prefix once per group, the last prompt token and the response but its last token for
    each row (T positions: those that predict response tokens, the only ones the LM head sees)."""
    body = step.prefix_rows * (step.prompt_length - 1) + step.sequences * step.response_length
    return body, step.sequences * step.response_length


def _forward_attention(model: ModelShape, step: StepShape) -> float:
    return (step.prefix_rows * model.attention_flops(step.prompt_length - 1, 0)
            + step.sequences * model.attention_flops(step.response_length, step.prompt_length - 1))


def forward_work(model: ModelShape, step: StepShape) -> Work:
    """One no-grad forward over the batch (a logprob pass), LoRA unmerged."""
    body, head = _forward_tokens(step)
    lora = model.lora_weights(step.lora_r) if step.lora_r else 0
    flops = 2.0 * (model.block_weights + lora) * body + 2.0 * model.lm_head_weights * head
    return Work(flops + _forward_attention(model, step), (model.block_weights + model.lm_head_weights) * FLOAT32_BYTES)


def update_work(model: ModelShape, step: StepShape) -> Work:
    """One forward + backward over the batch (see the module docstring for the multipliers)."""
    body, head = _forward_tokens(step)
    flops = (4.0 * model.block_weights * body + 4.0 * model.lm_head_weights * head
             + 3.0 * _forward_attention(model, step))
    if step.lora_r:
        r = step.lora_r
        first = model.first_layer_inputs().values()
        flops += 6.0 * model.lora_weights(r) * body
        flops -= (2.0 * sum(i * o for i, o in first) + 2.0 * r * sum(i for i, _ in first)) * body  # no dx there
        if step.sampled_forward:  # the response positions' frozen forward products were the sampler's
            flops -= 2.0 * model.block_weights * step.sequences * step.response_length
        if step.sampled_prefix and step.shared_prompt:  # and the shared prefix's were its prefill's
            flops -= 2.0 * model.block_weights * step.prefix_rows * (step.prompt_length - 1)
        if step.sampled_logits:  # and the LM head's over the response
            flops -= 2.0 * model.lm_head_weights * head
        if step.sampled_attention:  # and the attention's forward over the response
            flops -= step.sequences * model.attention_flops(step.response_length, step.prompt_length - 1)
    else:  # every weight also gets dW = g^T x (the embedding is trained, so layer 0 needs its dx too)
        flops += 2.0 * model.block_weights * body + 2.0 * model.lm_head_weights * head
    return Work(flops, (model.block_weights + model.lm_head_weights) * FLOAT32_BYTES)


@dataclass(frozen=True)
class Machine:
    """This machine's limits: memory bandwidth and fp32 GEMM rates at decode and batch shapes."""

    bandwidth: float  # bytes/s
    decode_flops: float  # FLOP/s of the model's GEMMs at M = rows being decoded (hot weights)
    batch_flops: float  # FLOP/s of the model's GEMMs (forward and input-gradient layouts) at M = batch tokens
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PhaseBound:
    flops: float
    bytes: float
    compute_s: float  # FLOPs / GEMM rate
    memory_s: float  # bytes / bandwidth
    bound_s: float  # summed max(compute, memory) over the phase's parts
    bound_by: str  # "compute" | "memory" | "nothing" (no such pass)


def _bound(parts: list[tuple[Work, float]], bandwidth: float) -> PhaseBound:
    """Bound of work done in ``parts`` (each with its GEMM rate); each part is limited by the
    slower of its compute and its memory traffic."""
    flops = sum(w.flops for w, _ in parts)
    traffic = sum(w.bytes for w, _ in parts)
    compute = sum(w.flops / rate for w, rate in parts)
    memory = sum(w.bytes / bandwidth for w, _ in parts)
    bound = sum(max(w.flops / rate, w.bytes / bandwidth) for w, rate in parts)
    by = "nothing" if not parts else "memory" if memory > compute else "compute"
    return PhaseBound(flops, traffic, compute, memory, bound, by)


def step_bounds(model: ModelShape, step: StepShape, machine: Machine) -> dict[str, PhaseBound]:
    """{generation, logprobs, update: PhaseBound}: the least time of each phase on ``machine``."""
    generation = [(prefill_work(model, step), machine.batch_flops),
                  *((work, machine.decode_flops) for work in decode_work(model, step))]
    logprobs = [(forward_work(model, step), machine.batch_flops)] * step.no_grad_passes
    return {"generation": _bound(generation, machine.bandwidth), "logprobs": _bound(logprobs, machine.bandwidth),
            "update": _bound([(update_work(model, step), machine.batch_flops)], machine.bandwidth)}


def bounds_report(model: ModelShape, step: StepShape, machine: Machine, measured: dict[str, float]) -> dict[str, Any]:
    """Bounds of each phase with the measured seconds (``measured[phase + '_s']``) and the
    fraction of the bound achieved (bound / measured; 1 = at the machine's limit)."""
    report: dict[str, Any] = {"step_shape": asdict(step)}
    for phase, bound in step_bounds(model, step, machine).items():
        seconds = measured.get(f"{phase}_s")
        achieved = bound.bound_s / seconds if seconds and bound.bound_by != "nothing" else None
        report[phase] = {**asdict(bound), "measured_s": seconds, "achieved": achieved}
    report["step"] = {"bound_s": sum(report[p]["bound_s"] for p in PHASES_WITH_BOUNDS)}
    return report


# --- measuring the machine (runs torch; everything above is arithmetic) ---

def _best_seconds(fn: Any, min_time: float = 0.2, min_repeats: int = 5) -> float:
    """Fastest of repeated calls (after one warm-up): the roof is what the machine can do, and on a
    shared machine a call can wait a scheduler slice for its second thread (milliseconds)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_time:
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def measure_bandwidth(megabytes: int = 256) -> dict[str, float]:
    """GB/s of a large float32 copy (bytes read + written) and of a sum (bytes read)."""
    import torch

    source = torch.rand(megabytes * 2**20 // FLOAT32_BYTES)
    target = torch.empty_like(source)
    size = source.numel() * FLOAT32_BYTES
    copy = _best_seconds(lambda: target.copy_(source))
    read = _best_seconds(lambda: source.sum())
    return {"copy_gbs": 2 * size / copy / 1e9, "read_gbs": size / read / 1e9}


def gemm_rates(model: ModelShape, rows: int, backward: bool) -> dict[str, Any]:
    """fp32 GEMM rate of the model's linear shapes with M = ``rows``, weighted as one token
    through the model uses them (each block linear ``layers`` times, the LM head once), hot weights.

    Forward ``F.linear(x, W)``, the same product as ``(W @ x^T)^T`` (faster on some BLAS at small
    M) and through oneDNN where this torch has it (rlhf.cpu_linear), with the weight as it is and
    packed into oneDNN's layout, and through the sampler's kernel where it runs
    (rlhf.decode_linear); the fastest counts: a bound is what the machine can do.
    ``backward``: also the input gradient ``g @ W`` of every shape, as an update runs it, on BLAS
    and oneDNN (with ``W^T`` as a strided view, as a contiguous copy and packed)."""
    import torch
    import torch.nn.functional as F

    from rlhf import decode_linear
    from rlhf.cpu_linear import onednn_linear, onednn_packing_usable, onednn_usable, pack_for_onednn

    onednn, packing = onednn_usable(), onednn_packing_usable()

    shapes = {**{name: (i, o, model.layers) for name, (i, o) in model.block_linears().items()},
              "lm_head": (model.hidden, model.vocab, 1)}
    per_shape: dict[str, float] = {}
    total_flops = total_seconds = 0.0
    with torch.no_grad():
        for name, (fan_in, fan_out, count) in shapes.items():
            x, weight, grad = torch.randn(rows, fan_in), torch.randn(fan_out, fan_in), torch.randn(rows, fan_out)
            flops = 2.0 * rows * fan_in * fan_out
            packed = pack_for_onednn(weight) if packing and rows >= 2 else None
            kernel_packed = decode_linear.pack(weight) if rows >= 2 else None
            seconds = min(_best_seconds(lambda: F.linear(x, weight)), _best_seconds(lambda: weight @ x.T),
                          _best_seconds(lambda: onednn_linear(x, weight)) if onednn else math.inf,
                          _best_seconds(lambda: onednn_linear(x, packed)) if packed is not None else math.inf,
                          _best_seconds(lambda: decode_linear.linear(x, kernel_packed))
                          if kernel_packed is not None else math.inf)
            per_shape[f"{name} {fan_in}->{fan_out}"] = flops / seconds / 1e9
            total_flops, total_seconds = total_flops + count * flops, total_seconds + count * seconds
            if backward:
                transposed = weight.t().contiguous()  # as an update keeps it (rlhf.cpu_linear.times_weight)
                packed_transposed = pack_for_onednn(transposed) if packing and rows >= 2 else None
                seconds = min(_best_seconds(lambda: grad @ weight),
                              _best_seconds(lambda: onednn_linear(grad, weight.t())) if onednn else math.inf,
                              _best_seconds(lambda: onednn_linear(grad, transposed)) if onednn else math.inf,
                              _best_seconds(lambda: onednn_linear(grad, packed_transposed))
                              if packed_transposed is not None else math.inf)
                per_shape[f"{name} grad {fan_out}->{fan_in}"] = flops / seconds / 1e9
                total_flops, total_seconds = total_flops + count * flops, total_seconds + count * seconds
    return {"rows": rows, "gflops": total_flops / total_seconds / 1e9, "per_shape_gflops": per_shape}


def measure_machine(model: ModelShape, decode_rows: int, batch_rows: int, bandwidth_megabytes: int = 256) -> Machine:
    """Bandwidth (the faster of copy and read) and GEMM rates at M = decode_rows (decode) and
    M = batch_rows (forward/backward over the batch; capped by the caller: the rate is flat past a
    few hundred rows and a full-batch LM head GEMM takes seconds)."""
    import os

    import torch

    # Another process on these cores makes every multi-threaded call wait for its second thread:
    # the limits then read low. Recorded so that the report can say so.
    busy = {"load_average_1m": os.getloadavg()[0], "cores": len(os.sched_getaffinity(0))}
    bandwidth = measure_bandwidth(bandwidth_megabytes)
    decode = gemm_rates(model, decode_rows, backward=False)
    batch = gemm_rates(model, batch_rows, backward=True)
    return Machine(bandwidth=max(bandwidth.values()) * 1e9, decode_flops=decode["gflops"] * 1e9,
                   batch_flops=batch["gflops"] * 1e9,
                   details={"threads": torch.get_num_threads(), **busy, **bandwidth, "decode": decode,
                            "batch": batch})
