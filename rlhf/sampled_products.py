"""The sampler's linear products, taken by the first forward after it at the same weights.

Sampling a response computes, token by token, every projection of every decoder layer for each
row: the products the update's forward computes again over the whole response, at the same
weights (GRPO and RLOO update once per rollout; PPO's no-grad passes also run before any
optimizer step). ``SampledProducts`` keeps each LoRA-wrapped projection's output at every (row,
response column) the sampler fed, and a forward at unchanged weights over the same tokens takes
them instead of multiplying again (``replaying``): the fused LoRA layer (``rlhf.models.lora_linear``)
then returns the kept output and computes only ``x A^T``, which its backward needs; the gradients
are the same formulas. The numbers are the plain forward's up to float rounding: the sampler
folded the LoRA into its weights and multiplied 16 rows at a time, the update multiplies thousands.

The shared prompt prefix too: a generation chunk's prefill runs each distinct prompt once
(``rlhf.models.shared_prompt_cache``), and each projection's output there is kept as the prefill
made it (a copy only of a part of a fused product), where a quarter of the free memory holds
them; the update's prefix forward over rows of that chunk takes them (``prefix_replay``) where its
prompts are the prefill's, with the same or less left padding, at unchanged weights, as often as
it runs (micro-batches holding rows of one group each run its prompt). The benchmark's GRPO at 32
new tokens (SmolLM2-135M shape, 4 prompts of 48 tokens): that forward 0.32-0.39 -> 0.11 s per
update, peak RSS 2.99 -> 3.11 GB.

The logits too, where the update's logprobs take the chunked projection whatever their size
(``chunked_logprobs_mb`` 0, the default) and a quarter of the free memory holds them beside the
products: the sampler's forward keeps the LM head's output at each sampled position (before any
temperature; [columns, rows, V] float32, 805 MB for 16 x 256 tokens of a 49k vocabulary), and
the chunked logprobs (``rlhf.algorithms.logits.logprobs_from_hidden``) copy a chunk of rows out
of it at a time instead of projecting the hidden states through the LM head again; the gradient
direction (W[label] - p W) / T still needs its one product with the head. Taken once per row, by
the same rule as the products, and only by a forward that took every kept projection output for
its rows, whose hidden states are then the sampler's (a reference pass with the adapters switched
off takes none, and projects its own logits).

The attention too, where the memory holds it beside the rest: each decode step calls SDPA's CPU
flash kernel itself (``decode_attention``: bitwise SDPA's output, and the softmax's log-sum-exp,
which SDPA computes and drops), and keeps the attention's output [rows, columns, heads x head dim]
and log-sum-exp [rows, columns, heads]. The update's forward then takes them in place of its SDPA
forward (``_attention_taking_kept``, transformers' stock SDPA function while it replays), and
SDPA's flash backward computes the q/k/v gradients from them: given SDPA's own output and
log-sum-exp, bitwise autograd's. Taken once per row, by a forward whose q, k and v of that layer
were the kept products, with a boolean mask (the shared prefix makes one), no dropout; the
sampler's numbers differ from the update's own SDPA by float rounding (one query row against
many). Not with checkpointed layers (their forward runs again in the backward). SmolLM2-135M's
shape, 16 rows: the SDPA forward takes 1.8 / 27 / 97 / 318 ms per layer at 32 / 256 / 512 / 1024
new tokens (30 layers); the sampler pays two small writes per layer and step.

The outputs are kept by the sampler's forward (``rlhf.sampling_forward``: Llama, Mistral, Qwen2,
Qwen3), on a CPU, for single responses (not tool episodes), where a quarter of the free memory
holds them. A forward takes them only when every trained parameter of the policy equals its
value at the end of sampling and every frozen one and every buffer has its version counter and
storage from then (an optimizer step, any in-place change, a ``.data`` swap; a write into
``.data`` in place is not seen), the rows' prompts and tokens are the sampled ones up to their last
predicting column, and it is the forward after a shared prompt prefix (the last prompt token and
the response). Each row's outputs are taken once: a second forward over a row computes its own,
and a module's buffer is let go once every row has been taken, so the outputs the backward does
not keep are freed during the forward. Anything else computes as before.

Measured on the 2-core EPYC (SmolLM2-135M shape, 16 rows x 256 tokens, random weights): skipping
the update's forward products took its update from 18.1 to 14.4 s (two steps each).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend

_replaying: "_Replay | None" = None  # the forward now taking kept products, if any
_FLASH_ATTENTION = int(SDPBackend.FLASH_ATTENTION)  # torch._fused_sdp_choice's answer for SDPA's flash kernels


class SampledProducts:
    """Per LoRA-wrapped projection, its output [columns, rows, out] at every sampled position;
    column c is the sampler's forward for response token c (column 0: the last prompt token).
    Column-major, so each decode step writes one contiguous block per projection (a 128-token
    rollout took 0.25-0.3 s longer than without the products, 0.6-0.8 s row-major), and with
    ``groups`` one block per decoder layer: its projections side by side in one buffer [columns,
    rows, their widths], each projection's output a view of it (the benchmark's GRPO at 256 tokens,
    SmolLM2-135M shape, 2-core Xeon: peak RSS 10.0-10.2 -> 9.2-9.3 GB, 30 buffers that the update's
    activations reuse instead of 210 smaller ones). The forward that takes them copies its part into
    row order, and each buffer is freed once let go (a layer's, once every projection in it is).

    ``tokens`` [rows, columns]: the token fed at each position, -1 where the sampler fed none
    (after a row's last token, which it draws but never feeds; a row that left the batch)."""

    def __init__(self, modules: list[nn.Module], rows: int, columns: int, device: torch.device,
                 vocabulary: int = 0, attentions: dict[nn.Module, tuple[nn.Module, ...]] | None = None,
                 groups: list[tuple[nn.Module, ...]] | None = None):
        # uninitialised: the positions the sampler never feeds are zeroed by ``seal`` (no memset of
        # the whole buffer first). The modules of each of ``groups`` (a decoder layer's projections,
        # as the sampler's forward hands them to ``write_together``) that are in ``modules`` share
        # one buffer, each module's part a view of it
        self.outputs: dict[nn.Module, Tensor] = {}
        # per group, the buffer and which of the group's modules it keeps (those of ``modules``)
        self._groups: dict[tuple[nn.Module, ...], tuple[Tensor, list[bool]]] = {}
        chosen = set(modules)
        for group in groups or []:
            members = [module for module in group if module in chosen and module not in self.outputs]
            if len(members) < 2:
                continue
            widths = [module.get_base_layer().out_features for module in members]
            buffer = torch.empty(columns, rows, sum(widths), device=device)
            self.outputs.update(zip(members, buffer.split(widths, -1)))
            self._groups[tuple(group)] = (buffer, [module in members for module in group])
        for module in modules:
            if module not in self.outputs:
                self.outputs[module] = torch.empty(columns, rows, module.get_base_layer().out_features, device=device)
        # the LM head's float32 output [columns, rows, vocabulary] at each sampled position (its
        # logits before any temperature), where ``vocabulary`` > 0: the update's chunked logprobs
        # take them instead of projecting again (``_Replay.logits``)
        self.logits = torch.empty(columns, rows, vocabulary, device=device) if vocabulary else None
        self.logits_taken = torch.zeros(rows, dtype=torch.bool, device=device)
        self.tokens = torch.full((rows, columns), -1, dtype=torch.long, device=device)
        # per attention module of ``attentions`` (its q, k and v projections there): the attention's
        # output [rows, columns, heads * head dim] and log-sum-exp [rows, columns, heads] at each
        # sampled position, where the sampler's decode steps computed them with SDPA's CPU flash
        # kernel; the update's forward takes them instead of its own SDPA forward (``_Replay.attention``).
        # Row-major, unlike the projections: a forward over consecutive rows then hands out views in
        # SDPA's own layouts, which its backward keeps, so the buffers are the activations the plain
        # forward would have made (the benchmark's peak RSS at 256 tokens: 0.28 GB above not keeping
        # them, made during sampling and held into the update; column-major, copied out, 0.37 GB)
        self.attention_inputs = dict(attentions or {})
        self.attended = {attention: torch.empty(rows, columns, attention_width(qkv), device=device)
                         for attention, qkv in self.attention_inputs.items()}
        self.logsumexp = {attention: torch.empty(rows, columns, attention_width(qkv) // attention.head_dim,
                                                 device=device)
                          for attention, qkv in self.attention_inputs.items()}
        self.attention_taken = {attention: torch.zeros(rows, dtype=torch.bool, device=device)
                                for attention in self.attention_inputs}
        self._attention_step: set[nn.Module] = set()  # the attentions the sampler's forward now running wrote
        # how many attentions sampling kept (set by ``seal``), and how many of them forwards took for every row
        self.attentions_sealed = self.attentions_taken = 0
        # (tensor, its version counter, its storage address) per parameter and buffer: set by ``seal``
        # once sampling has ended
        self.versions: list[tuple[Tensor, int | None, int]] | None = None
        self.trained: list[tuple[Tensor, Tensor]] = []  # (parameter, its value at the seal) for those with grad
        self.written: set[nn.Module] = set()  # modules whose outputs the sampler's forward wrote
        # per module, the rows a forward has taken: each row's outputs are taken once, and a module
        # whose rows have all been taken is dropped here, so the buffers the forward does not keep
        # for its backward (most of them) are freed as it goes instead of all living to the end
        self.taken = {module: torch.zeros(rows, dtype=torch.bool, device=device) for module in modules}
        self._where: tuple[Tensor | slice, int] | None = None
        self._written = False
        # each generation chunk's shared prompt prefix, as its prefill computed it once per distinct prompt
        self.prefixes: list[_Prefix] = []
        self._prefix: _Prefix | None = None  # the prefill being recorded
        # each row's prompt before its last token, as the sampler fed it (``sampled_prompts``); right-
        # aligned [rows, p] with -1 at padding once sealed, None where some row's prompt was not told
        self._prompts: list[Tensor | None] = [None] * rows
        self.prompt_ids: Tensor | None = None

    @staticmethod
    def bytes_needed(policy: nn.Module, rows: int, columns: int, vocabulary: int = 0) -> int:
        """Bytes of float32 outputs for every replayable LoRA layer of ``policy`` at ``rows`` x
        ``columns`` positions (an upper bound: the sampler's forward writes its projections only),
        and of the logits there where ``vocabulary`` > 0."""
        widths = sum(module.get_base_layer().out_features for module in replayable_modules(policy))
        return 4 * rows * columns * (widths + vocabulary)

    @staticmethod
    def attention_bytes(attentions: dict[nn.Module, tuple[nn.Module, ...]], rows: int, columns: int) -> int:
        """Bytes of the attention outputs and log-sum-exps kept for ``attentions`` (as the constructor
        takes them) at ``rows`` x ``columns`` positions."""
        return 4 * rows * columns * sum(attention_width(qkv) + attention_width(qkv) // attention.head_dim
                                        for attention, qkv in attentions.items())

    def sampled_prompts(self, first_row: int, prefix_ids: Tensor, prefix_mask: Tensor) -> None:
        """The prompts of rows ``first_row`` on as the sampler feeds them but their last token
        (``prefix_ids``, ``prefix_mask`` [b, p]): a response's products hold only for its own prompt,
        which the forward that takes them must have (``replay`` compares it)."""
        for offset, (ids, mask) in enumerate(zip(prefix_ids, prefix_mask)):
            self._prompts[first_row + offset] = ids[mask.bool()].clone()

    @contextlib.contextmanager
    def writing(self, rows: Tensor | slice, column: int, token_ids: Tensor) -> Iterator[None]:
        """The sampler's next forward writes its last position's products into ``rows`` at ``column``
        (``token_ids`` [b]: the tokens it feeds there); the position counts as sampled only where
        that forward wrote them (the model's own forward, which a sliding-window model takes past
        its window, keeps nothing)."""
        self._where, self._written = (rows, column), False
        self._attention_step = set()
        try:
            yield
            if self._written:
                self.tokens[rows, column] = token_ids
                # an attention this step did not write (a prompt fed whole, another SDPA kernel) is
                # not the sampler's at that position: none of it is taken
                for attention in [a for a in self.attended if a not in self._attention_step]:
                    self._drop_attention(attention)
        finally:
            self._where = None

    @contextlib.contextmanager
    def writing_prefix(self, first_row: int, prefix_ids: Tensor, prefix_mask: Tensor) -> Iterator[None]:
        """The sampler's next forward is the shared prompt prefill of these rows (``first_row`` on;
        ``prefix_ids``, ``prefix_mask`` [b, p]: their prompts but the last token, left-padded): it runs
        once per distinct prompt (``rlhf.models.shared_prompt_cache``), and each projection's whole
        output there is kept, for the update's prefix forward at unchanged weights (``prefix_replay``)."""
        from rlhf.cpu_linear import memory_choice
        from rlhf.models import distinct_prompts

        shared = distinct_prompts(prefix_ids, prefix_mask)
        # held from the prefill to the update: only where a quarter of the free memory holds them, as the response's
        needed = 0 if shared is None else 4 * shared[0].numel() * prefix_ids.shape[1] * sum(
            kept.shape[-1] for kept in self.outputs.values())
        fits = shared is not None and memory_choice("prompt prefill's products kept for the update",
                                                    lambda memory: needed <= memory // 4)
        self._prefix = _Prefix(first_row, shared[1], prefix_ids[shared[0]], prefix_mask[shared[0]]) if fits else None
        try:
            yield
            if self._prefix is not None and self._prefix.outputs:
                self.prefixes.append(self._prefix)
        finally:
            self._prefix = None

    def write(self, module: nn.Module, output: Tensor) -> None:
        """``output`` [b, q, out]: ``module``'s output in the sampler's forward, kept at its last
        position (a prefill: kept whole, as the forward made it; it writes none of it in place)."""
        if self._prefix is not None:
            if module in self.outputs and output.shape[:2] == self._prefix.ids.shape:
                # a part of a fused product (the sampler's up of gate/up) would hold the whole of it
                self._prefix.outputs[module] = output if output.is_contiguous() else output.contiguous()
            return
        if self._where is not None and module in self.outputs:
            rows, column = self._where
            self.outputs[module][column, rows] = output[:, -1]
            self._written = True
            self.written.add(module)

    def write_together(self, modules: tuple[nn.Module, ...], outputs: list[Tensor]) -> None:
        """``write`` of each of ``modules`` (one of the constructor's ``groups``) with its output [b, q,
        out]. A decode step over consecutive rows writes those the group's buffer keeps as one
        concatenation into it, once the layer is done; other calls (a prefill, rows that left the
        batch, a group not kept together) write each on its own. Bitwise the same buffers. The 210
        writes of a SmolLM2-135M decode step, each right after its product, took 6.4 of ~95 ms on
        the 2-core Xeon, yet 30 such concatenations gave a 128-token rollout only 10.90 -> 10.75 s
        (medians of 5, alternating in one process): the first small operations after a product
        that streamed its weight through the caches are slow whichever they are (an RMSNorm 27 us
        in a loop, 107 us right after one)."""
        group = self._groups.get(modules) if self._prefix is None and self._where is not None else None
        rows, column = self._where if group is not None else (None, 0)
        if group is None or not isinstance(rows, slice) or any(output.shape[1] != 1 for output in outputs):
            for module, output in zip(modules, outputs):
                self.write(module, output)
            return
        buffer, kept = group
        torch.cat([output for output, keep in zip(outputs, kept) if keep], dim=-1,
                  out=buffer[column, rows].unsqueeze(1))
        self._written = True
        self.written.update(module for module, keep in zip(modules, kept) if keep)

    def keeps_attention(self, attention: nn.Module) -> bool:
        """Whether the forward now running keeps ``attention``'s output (a decode step, recorded)."""
        return self._where is not None and self._prefix is None and attention in self.attended

    def write_attention(self, attention: nn.Module, attended: Tensor, logsumexp: Tensor) -> None:
        """``attended`` [b, 1, heads x head dim] and ``logsumexp`` [b, heads]: ``attention``'s output
        in the sampler's decode step and its softmax's log-normaliser per head, kept at this step's column."""
        rows, column = self._where
        self.attended[attention][rows, column] = attended[:, -1]
        self.logsumexp[attention][rows, column] = logsumexp
        self._attention_step.add(attention)

    def _drop_attention(self, attention: nn.Module) -> None:
        for kept in (self.attended, self.logsumexp, self.attention_taken, self.attention_inputs):
            kept.pop(attention, None)

    def write_logits(self, logits: Tensor) -> None:
        """``logits`` [b, q, V]: the LM head's output in the sampler's forward, kept at its last position
        (nothing in a prefill, whose last position predicts no response token)."""
        if self._where is not None and self.logits is not None:
            rows, column = self._where
            self.logits[column, rows] = logits[:, -1]

    @property
    def recording(self) -> bool:
        return self._where is not None or self._prefix is not None

    @property
    def keeping_prefill(self) -> bool:
        """Whether the forward now running is a prefill whose outputs are kept whole, for the
        update (ordinary tensors then: its backward may save them, which inference tensors refuse)."""
        return self._prefix is not None

    def seal(self, policy: nn.Module) -> None:
        """Sampling has ended: the products hold for the weights as they are now. A trained
        parameter's value is kept to compare (a fused optimizer step, or a write through ``.data``,
        leaves its version counter as it was); the frozen ones are checked by version alone."""
        # A position never fed (a row's last token, padding) must hold a finite number: the forward
        # still computes from it, and a backward that multiplies its zero gradient by a NaN gets NaN.
        unfed = (self.tokens < 0).t()
        if bool(unfed.any()):
            # each buffer once (a group's modules keep views of one)
            buffers = {id(whole): whole for whole in (kept if kept._base is None else kept._base
                                                      for kept in self.outputs.values())}
            for kept in [*buffers.values(), *([self.logits] if self.logits is not None else [])]:
                kept[unfed] = 0.0
            for kept in self.attended.values():  # row-major
                kept[unfed.t()] = 0.0
            # there the attention's backward then weighs every key by exp(score - inf) = 0: such a
            # position's output gradient is zero (it predicts nothing the loss counts), so its
            # gradients are the zeros of the plain backward
            for kept in self.logsumexp.values():
                kept[unfed.t()] = float("inf")
        self.attentions_sealed = len(self.attended)
        # written no more: a group's buffer now lives as long as a view of it in ``outputs`` does
        self._groups.clear()
        parameters = list(policy.parameters())
        # Buffers too (a rotary embedding's inv_freq); the storage address tells a ``.data = ...``
        # swap, which moves no version counter (a write into ``.data`` in place is not seen).
        self.versions = [(tensor, _version(tensor), tensor.data_ptr()) for tensor in [*parameters, *policy.buffers()]]
        self.trained = [(parameter, parameter.detach().clone()) for parameter in parameters if parameter.requires_grad]
        if self._prompts and all(prompt is not None for prompt in self._prompts):
            width = max(prompt.numel() for prompt in self._prompts)
            self.prompt_ids = torch.full((len(self._prompts), width), -1, dtype=torch.long, device=self.tokens.device)
            for row, prompt in enumerate(self._prompts):
                self.prompt_ids[row, width - prompt.numel():] = prompt

    def release(self) -> None:
        self.outputs.clear()
        self._groups.clear()
        for attention in list(self.attended):
            self._drop_attention(attention)
        self.logits = None
        self.taken.clear()
        self.prefixes.clear()
        self.versions, self.trained = None, []

    def _weights_unchanged(self) -> bool:
        return (all(_version(tensor) == version and tensor.data_ptr() == address
                    for tensor, version, address in self.versions)
                and all(torch.equal(parameter, value) for parameter, value in self.trained))

    def replay(self, rows: Tensor, input_ids: Tensor, predicted: Tensor, prefix_ids: Tensor,
               prefix_mask: Tensor) -> "_Replay | None":
        """A replay for a forward over ``rows`` (indices into the sampled rows) whose input after the
        shared prefix is ``input_ids`` [b, w] (the last prompt token, then the response but its last
        token), or None where the kept products are not that forward's: weights changed since
        sampling, other tokens (in the response or the prompt), more columns. ``predicted`` [b, w]:
        1 where the token a column predicts is part of the row (the response's attention mask);
        ``prefix_ids``, ``prefix_mask`` [b, p]: the shared prefix (the prompts but their last token),
        left-padded to any width.

        A causal forward's outputs at a column, and all after it, matter only up to the row's last
        predicting column; the sampler never fed a row's last token (it stops once it has drawn
        it), and a row that left its batch nothing after it, so only those columns must be the
        sampled ones."""
        if self.versions is None or not self.outputs:
            return None
        width = input_ids.shape[1]
        if (width > self.tokens.shape[1] or rows.numel() != input_ids.shape[0] or self.prompt_ids is None
                or not self._weights_unchanged()):
            return None
        # the prompts, right-aligned: the same tokens, and padding (-1) wherever only one side has a column
        sampled, given = self.prompt_ids[rows], torch.where(prefix_mask.bool(), prefix_ids, -1)
        common = min(sampled.shape[1], given.shape[1])
        if not (torch.equal(sampled[:, sampled.shape[1] - common:], given[:, given.shape[1] - common:])
                and bool((sampled[:, :sampled.shape[1] - common] == -1).all())
                and bool((given[:, :given.shape[1] - common] == -1).all())):
            return None
        columns = torch.arange(width, device=input_ids.device)
        last = torch.where(predicted.bool(), columns, -1).amax(-1, keepdim=True)
        fed = self.tokens[rows, :width]
        if not bool(((fed == input_ids) | (columns > last)).all()):
            return None
        return _Replay(self, rows, width)

    def prefix_replay(self, rows: Tensor, prefix_ids: Tensor, prefix_mask: Tensor) -> "_PrefixReplay | None":
        """A replay for the shared prompt prefix forward over ``rows`` (indices into the sampled
        rows; ``prefix_ids``, ``prefix_mask`` [b, p]: their prompts but the last token), which runs
        its distinct prompts, as ``distinct_prompts`` picks them, or None where the kept prefill is
        not that forward's: weights changed since sampling, rows of several generation chunks, other
        tokens, more padding (chunks padded to a common width), no prefill kept for every projection;
        less padding (a micro-batch's columns that are padding in all its rows dropped) is taken.
        Unlike the response's, a prefix may be taken again (micro-batches holding rows of one group
        each run its prompt): its outputs are copied out and stay until ``release``."""
        from rlhf.models import distinct_prompts

        if self.versions is None or not rows.numel():
            return None
        chunk = next((prefix for prefix in self.prefixes if prefix.first_row <= int(rows.min())
                      and int(rows.max()) < prefix.first_row + prefix.inverse.shape[0]), None)
        shared = distinct_prompts(prefix_ids, prefix_mask)
        if (chunk is None or shared is None or prefix_ids.shape[1] > chunk.ids.shape[1]
                or set(chunk.outputs) != self.written or not self._weights_unchanged()):
            return None
        representatives = shared[0]
        kept = chunk.inverse[rows[representatives] - chunk.first_row]  # the prefill's row for each
        # a micro-batch drops the columns that are padding in all its rows: the prefill's columns
        # before those it kept must be padding there, and the rest the same tokens
        dropped = chunk.ids.shape[1] - prefix_ids.shape[1]
        if not (torch.equal(chunk.ids[kept, dropped:], prefix_ids[representatives])
                and torch.equal(chunk.mask[kept, dropped:], prefix_mask[representatives])
                and not bool(chunk.mask[kept, :dropped].any())):
            return None
        return _PrefixReplay(chunk.outputs, kept, dropped)


def _version(tensor: Tensor) -> int | None:
    """``tensor``'s version counter; None for an inference tensor, which has none."""
    return None if tensor.is_inference() else tensor._version


class _Prefix:
    """One generation chunk's prefill: its rows ``first_row`` on, each one's distinct prompt
    (``inverse`` [b]), those prompts' ids and mask [n, p], and each projection's output [n, p, out]."""

    def __init__(self, first_row: int, inverse: Tensor, ids: Tensor, mask: Tensor):
        self.first_row, self.inverse, self.ids, self.mask = first_row, inverse, ids, mask
        self.outputs: dict[nn.Module, Tensor] = {}


class _PrefixReplay:
    def __init__(self, outputs: dict[nn.Module, Tensor], kept: Tensor, dropped: int):
        self.outputs, self.kept, self.dropped = outputs, kept, dropped

    def output(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """The kept output [n * p, out] of ``module`` for input ``x`` [n, p, in], or None."""
        kept = self.outputs.get(module)
        if kept is None or x.dim() != 3 or x.shape[:2] != (self.kept.shape[0], kept.shape[1] - self.dropped):
            return None
        # indexed: a copy, so the kept outputs are never handed out to be changed
        return kept[self.kept, self.dropped:].reshape(-1, kept.shape[-1])


class _Replay:
    def __init__(self, products: SampledProducts, rows: Tensor, width: int):
        self.products, self.rows, self.width = products, rows, width
        whole = torch.arange(rows.numel(), device=rows.device) + (int(rows[0]) if rows.numel() else 0)
        # consecutive rows are sliced out, others gathered
        self.consecutive = bool(torch.equal(rows, whole))
        self.served: set[nn.Module] = set()  # the modules whose kept outputs this forward took
        self._float_mask: tuple[Tensor, Tensor] | None = None  # (a boolean mask, it as SDPA adds it)

    def output(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """The kept output [b * w, out] of ``module`` for input ``x`` [b, w, in], or None (also
        for rows whose outputs a forward has taken already: a second forward computes its own)."""
        products = self.products
        kept = products.outputs.get(module)
        if (kept is None or module not in products.written or x.dim() != 3 or x.shape[0] != self.rows.numel()
                or x.shape[1] != self.width):
            return None
        taken = products.taken[module]
        if bool(taken[self.rows].any()):
            return None
        taken[self.rows] = True
        self.served.add(module)
        if bool(taken.all()):
            del products.outputs[module]
        # [b * w, out] in the forward's row order, copied once, so the buffer goes as soon as it is
        # let go (a single row, or a single column, is a view of it: nothing writes it, and the
        # row is taken). Rows in another order (a shuffled minibatch) are gathered from the
        # row-first view, which index_select writes straight in that order: gathering the buffer's
        # rows and then transposing copied twice (16 rows x 128 columns x 1536: 3.0 -> 0.44 ms,
        # bitwise the same)
        row_first = kept[:self.width].transpose(0, 1)  # [sampled rows, w, out], a view
        if self.consecutive:
            start = int(self.rows[0])
            return row_first[start:start + self.rows.numel()].reshape(-1, kept.shape[-1])
        return row_first.index_select(0, self.rows).reshape(-1, kept.shape[-1])

    def logits(self, width: int) -> tuple[Tensor, Tensor] | None:
        """The sampler's logits for this forward's rows at its first ``width`` columns, as (a view
        [columns * sampled rows, V] of the kept buffer, the index [b * width] into it of each (row,
        column) in the forward's row-major order), or None: none kept, another width, a row a
        forward has taken already (a second forward projects its own), or a forward that did not
        take every kept projection's output: its hidden states are then not known to be the
        sampler's (a reference pass with the adapters switched off takes none). The caller copies
        out what it needs with ``index_select``, a chunk of rows at a time, so no [b, width, V]
        copy exists."""
        products = self.products
        kept = products.logits
        if (kept is None or width != self.width or not self.served or self.served != products.written
                or bool(products.logits_taken[self.rows].any())):
            return None
        products.logits_taken[self.rows] = True
        if bool(products.logits_taken.all()):
            products.logits = None  # the buffer goes once the caller lets go of the view
        sampled_rows = kept.shape[1]
        columns = torch.arange(width, device=self.rows.device)
        index = (columns.unsqueeze(0) * sampled_rows + self.rows.unsqueeze(1)).reshape(-1)
        return kept.view(-1, kept.shape[-1]), index

    def attention(self, attention: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None,
                  dropout: float, kwargs: dict) -> tuple[Tensor, Tensor, Tensor] | None:
        """The sampler's output [b, heads, w, head dim] and log-sum-exp [b, heads, w] (both laid out
        as SDPA's CPU flash kernel makes them) of ``attention`` at this forward's rows and columns,
        with its boolean mask as SDPA adds it, or None: none kept, another call than the plain SDPA
        the sampler's was (a float or no mask, dropout, a position bias, soft-capping), a row taken
        already, or q, k and v not the sampler's products in this forward (then neither are the scores)."""
        products = self.products
        kept = products.attended.get(attention)
        if (kept is None or dropout != 0.0 or query.dim() != 4 or query.shape[0] != self.rows.numel()
                or query.shape[2] != self.width or query.dtype != torch.float32 or key.dtype != torch.float32
                or attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4
                or attention_mask.shape[1] != 1 or attention_mask.shape[2:] != (self.width, key.shape[2])
                or any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux"))
                or kwargs.get("output_attentions")
                or not all(module in self.served for module in products.attention_inputs[attention])):
            return None
        taken = products.attention_taken[attention]
        if bool(taken[self.rows].any()):
            return None
        taken[self.rows] = True
        heads, width = products.logsumexp[attention].shape[-1], self.width
        # [b, w, heads * head dim] and [b, w, heads]: views of consecutive rows (SDPA's flash backward
        # takes strided ones, bitwise the same), a copy of others
        if self.consecutive:
            start = int(self.rows[0])
            rows = slice(start, start + self.rows.numel())
            attended, logsumexp = kept[rows, :width], products.logsumexp[attention][rows, :width]
        else:
            attended = kept[:, :width].index_select(0, self.rows)
            logsumexp = products.logsumexp[attention][:, :width].index_select(0, self.rows)
        if bool(taken.all()):
            products._drop_attention(attention)
            products.attentions_taken += 1
        if self._float_mask is None or self._float_mask[0] is not attention_mask:
            # every layer of a forward has the same mask
            self._float_mask = (attention_mask, additive_mask(attention_mask, query.dtype))
        output = attended.view(query.shape[0], width, heads, -1).transpose(1, 2)
        return output, logsumexp.transpose(1, 2), self._float_mask[1]


class _KeptAttention(torch.autograd.Function):
    """SDPA whose forward the sampler ran: returns the kept output; the backward is SDPA's CPU
    flash backward, which needs only q, k, v, the output and the log-sum-exp (bitwise autograd's
    through SDPA, given the same ones)."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, output: Tensor, logsumexp: Tensor,
                float_mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(query, key, value, output, logsumexp, float_mask)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        query, key, value, output, logsumexp, float_mask = ctx.saved_tensors
        grad_query, grad_key, grad_value = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, query, key, value, output, logsumexp, 0.0, False, attn_mask=float_mask, scale=ctx.scale)
        return grad_query, grad_key, grad_value, None, None, None, None


def _attention_taking_kept(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' SDPA attention function, but where the forward now replaying has the sampler's
    output of this attention: that output, and SDPA's backward from it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    replay = _replaying
    kept = (replay.attention(module, query, key, attention_mask, dropout, kwargs)
            if isinstance(replay, _Replay) else None)
    if kept is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    output, logsumexp, float_mask = kept
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    attended = _KeptAttention.apply(query, key, value, output, logsumexp, float_mask, scale)
    return attended.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _kept_attention_installed() -> Iterator[None]:
    """Within, models whose attention is transformers' stock SDPA function call
    ``_attention_taking_kept`` instead (through the shared ``ALL_ATTENTION_FUNCTIONS``; a user's own
    "sdpa" function, or a model with an attention registry of its own, is left as it is)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    local = getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", None)
    if not isinstance(local, dict) or ALL_ATTENTION_FUNCTIONS.get("sdpa") is not sdpa_attention_forward:
        yield
        return
    previous = local.get("sdpa")
    local["sdpa"] = _attention_taking_kept
    try:
        yield
    finally:
        if previous is None:
            local.pop("sdpa", None)
        else:
            local["sdpa"] = previous


@contextlib.contextmanager
def replaying(replay: _Replay | _PrefixReplay | None) -> Iterator[None]:
    """Within: LoRA layers of ``replay``'s products return them instead of multiplying, and its
    kept attention outputs are taken (None: plain)."""
    global _replaying
    previous, _replaying = _replaying, replay
    try:
        with (_kept_attention_installed() if isinstance(replay, _Replay) and replay.products.attended
              else contextlib.nullcontext()):
            yield
    finally:
        _replaying = previous


def attention_width(qkv: tuple[nn.Module, ...]) -> int:
    """An attention's output width (heads x head dim) from its q, k, v projections: q's output width."""
    query = qkv[0]
    return (query.get_base_layer() if hasattr(query, "get_base_layer") else query).out_features


def additive_mask(mask: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """A boolean attention mask as SDPA adds it to the scores (0 where True, -inf where False); an
    additive mask or None as it is."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def decode_attention(attention: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float | None) -> tuple[Tensor, Tensor] | None:
    """transformers' SDPA attention function for one query position (a decode step), returning
    also the softmax's log-sum-exp: (output [b, 1, heads, head dim], log-sum-exp [b, heads]), or
    None where SDPA would not take its CPU flash kernel (whose op this calls, to get the
    log-sum-exp; the output is then bitwise SDPA's). query [b, heads, 1, head dim]; key, value
    [b, kv heads, S, head dim]; attention_mask [b, 1, 1, S] boolean or additive, or None."""
    from transformers.integrations.sdpa_attention import pack_gqa, use_gqa_in_sdpa

    if query.shape[2] != 1 or query.device.type != "cpu" or query.dtype != torch.float32:
        return None
    groups = getattr(attention, "num_key_value_groups", 1)
    grouped = False
    if groups > 1:  # as transformers' function does for one query position
        if use_gqa_in_sdpa(attention_mask, key, value):
            grouped = True
        else:
            query, attention_mask = pack_gqa(query, groups), pack_gqa(attention_mask, groups)
    if torch._fused_sdp_choice(query, key, value, attention_mask, 0.0, False, scale=scaling,
                               enable_gqa=grouped) != _FLASH_ATTENTION:
        return None
    attention_mask = additive_mask(attention_mask, query.dtype)
    output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=attention_mask, scale=scaling)
    output = output.reshape(output.shape[0], -1, 1, value.shape[-1]).transpose(1, 2)
    return output, logsumexp.reshape(logsumexp.shape[0], -1)


def kept_output(module: nn.Module, x: Tensor) -> Tensor | None:
    """The kept output of ``module`` for ``x`` in the forward now replaying, if any."""
    return None if _replaying is None else _replaying.output(module, x)


def kept_logits(width: int) -> tuple[Tensor, Tensor] | None:
    """The sampler's logits for the first ``width`` columns of the forward now replaying, if any
    (``_Replay.logits``)."""
    return None if _replaying is None else _replaying.logits(width)


def replayable_modules(policy: nn.Module) -> list[nn.Module]:
    """The policy's LoRA layers whose forward ``rlhf.models.fuse_lora_layers`` replaced (float32,
    one plain adapter): the layers whose forward can take a kept product."""
    return [module for module in policy.modules() if getattr(vars(module).get("forward"), "fused_lora", False)]
