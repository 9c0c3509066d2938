"""A KV cache for sampling that is written in place instead of growing by concatenation.

transformers' ``DynamicLayer`` appends each new token with ``torch.cat``, which copies the whole
cache of every layer on every decoding step: quadratic in the response length. Here each layer
owns a buffer sized for the rest of the response; a step writes its token into the buffer and
attention reads a view of the filled part (no copy, no attention over unused slots).

Measured on the 2-core machine (SmolLM2-135M float32, 16 rows, 40-token prompts, 256 new tokens,
five alternating pairs in one process): 131.7 -> 117.8 ms per token (1.12x), identical tokens.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


@contextlib.contextmanager
def ordinary_tensors() -> Iterator[None]:
    """Tensors made inside are ordinary ones, also within ``torch.inference_mode`` (which the
    sampler's decode steps run in, rlhf.sampling_forward): state that outlives the step, such as a
    cache buffer or a buffer a module re-registers, can then be written in place outside it.
    Gradients stay off there, as inference mode had them."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of buffers with room for more tokens.

    ``keys``/``values`` stay what transformers expects ([B, H, n, D] tensors, n = tokens cached),
    so everything that reads or replaces them (``crop``, ``batch_select_indices``, ``reset``)
    keeps working: when they no longer view the buffer, the next ``update`` copies them into a
    new buffer first.
    """

    def __init__(self, keys: Tensor, values: Tensor, capacity: int):
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self._seat(keys, values, capacity)

    def _seat(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        filled = keys.shape[-2]
        shape = (*keys.shape[:-2], max(capacity, filled), keys.shape[-1])
        # the model's own forward writes into them in place, outside inference mode
        with ordinary_tensors():
            self._key_buffer = keys.new_empty(shape)
            self._value_buffer = values.new_empty((*values.shape[:-2], shape[-2], values.shape[-1]))
            self._key_buffer[..., :filled, :].copy_(keys)
            self._value_buffer[..., :filled, :].copy_(values)
        self.keys = self._key_buffer[..., :filled, :]
        self.values = self._value_buffer[..., :filled, :]

    def _views_buffer(self, new_tokens: int, key_states: Tensor) -> bool:
        return (self.keys.data_ptr() == self._key_buffer.data_ptr()
                and self.values.data_ptr() == self._value_buffer.data_ptr()
                and self.keys.shape[:-2] == key_states.shape[:-2]
                and self.keys.shape[-2] + new_tokens <= self._key_buffer.shape[-2])

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized or self.keys is None or self.keys.dim() != key_states.dim():  # after reset()
            self.lazy_initialization(key_states, value_states)
            self._seat(key_states[..., :0, :], value_states[..., :0, :], key_states.shape[-2])
        filled, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._views_buffer(new, key_states):  # replaced (batch selection, crop) or full: start a new buffer
            self._seat(self.keys, self.values, 2 * (filled + new))
        self._key_buffer[..., filled:filled + new, :].copy_(key_states)
        self._value_buffer[..., filled:filled + new, :].copy_(value_states)
        self.keys = self._key_buffer[..., :filled + new, :]
        self.values = self._value_buffer[..., :filled + new, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the rows ``indices`` in new buffers of the same capacity (the sampler drops finished
        rows): indexing the views would leave tensors the next ``update`` must re-seat at twice the size."""
        if self.keys is None or self.keys.shape[-2] == 0:
            return super().batch_select_indices(indices)
        self._seat(self.keys[indices], self.values[indices], self._key_buffer.shape[-2])


def kv_cache_bytes(model: Any, rows: int, positions: int) -> int:
    """Bytes of the keys and values ``rows`` sequences of ``positions`` tokens hold in ``model``'s
    cache (every layer counted as full attention: an upper bound for sliding-window layers, and
    for caches that store less, such as DeepSeek's compressed latents); 0 where the config does
    not tell (no attention layers, another layout) or cannot be read. The sampler's own memory,
    which the weight copies made for sampling (folded LoRA, packed weights) must leave room for."""
    try:
        config = getattr(model, "config", None)
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)  # the config transformers' DynamicCache reads
        # transformers 5 configs with per-layer settings (Gemma 4) raise on the global attribute
        layers = list(getattr(config, "per_layer_config", None) or [])
        layers = layers or [config] * getattr(config, "num_hidden_layers", 0)
        per_token = 0
        for layer in layers:
            heads = getattr(layer, "num_attention_heads", None)
            kv_heads = getattr(layer, "num_key_value_heads", None) or heads
            head_dim = getattr(layer, "head_dim", None) or layer.hidden_size // heads
            if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (kv_heads, head_dim)):
                return 0
            per_token += 2 * kv_heads * head_dim
        element = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4) if per_token else 0
    except Exception:  # any model this cannot read: no reserve, as before the reserve existed
        return 0
    return per_token * element * rows * positions


def rows_selectable(cache: Any) -> bool:
    """Whether dropping rows from ``cache`` (``batch_select_indices``) keeps every layer's state
    whole: a ``DynamicCache`` of attention layers only (linear-attention and other states of
    hybrid models carry more than keys and values)."""
    return type(cache) is DynamicCache and all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer, PreallocatedLayer) for layer in cache.layers)


def select_cache_rows(cache: Any, rows: Tensor) -> None:
    """``cache.batch_select_indices(rows)`` (rows: [B'] indices into the cache's rows, repeats
    allowed), where each plain ``DynamicLayer`` takes its keys and values by ``index_select``:
    the same tensors, but the backward adds each row's gradient into its source row in one pass
    (``index_add_``, rows in order) where indexing's accumulating ``index_put_`` walks element by
    element: on the 2-core EPYC, [16, 3, 48, 64] from 4 prompts 576 -> 59 us forward and backward,
    about 30 ms of the benchmark's GRPO update (60 such tensors). The two sum a prompt's rows in
    another order, so the prefix's gradients agree up to float rounding. On a CPU only: on CUDA
    ``index_add_`` adds by atomics, in an order that changes from run to run, where indexing's
    backward sorts first. Other layer types (``PreallocatedLayer``'s buffers) and caches with a
    selection of their own (another class, or one set on the instance to carry more per row)
    select their own way."""
    if type(cache) is not DynamicCache or "batch_select_indices" in vars(cache) or rows.device.type != "cpu":
        cache.batch_select_indices(rows)
        return
    for layer in cache.layers:
        if (type(layer).batch_select_indices is DynamicLayer.batch_select_indices
                and isinstance(layer.keys, Tensor) and layer.get_seq_length() > 0):
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        else:
            layer.batch_select_indices(rows)


def carries_mid_sequence_padding(cache: Any) -> bool:
    """Whether pad columns inside the sequence (masked) leave each row's outputs those of its own
    sequence: full-attention layers only. A sliding window counts columns, pads included, so it
    would hold fewer real tokens; conv and recurrent state takes the pads in."""
    return type(cache) is DynamicCache and all(type(layer) in (DynamicLayer, PreallocatedLayer) for layer in cache.layers)


def config_cache_rows_selectable(model: Any) -> bool:
    """Whether the cache ``model`` builds for itself (``DynamicCache(config=model.config)``, as its
    forward does) holds attention layers only, so that ``rows_selectable`` will hold for it; decided
    from the config, before any forward. Hybrid models (Lfm2's conv layers, Qwen3-Next's linear
    attention, Qwen3.5) say no."""
    config = getattr(model, "config", None)
    if config is None:  # a wrapper without one: the caller checks the cache the forward returns
        return True
    try:
        return rows_selectable(DynamicCache(config=config))
    except Exception:  # a config DynamicCache cannot read: not a cache this knows how to index
        return False


def preallocated(cache: Any, more_tokens: int, bounded: bool = False) -> Any:
    """``cache`` with each plain ``DynamicLayer`` replaced by a ``PreallocatedLayer`` with room
    for ``more_tokens`` more tokens (it grows by doubling beyond that). Other caches (static,
    linear-attention layers of hybrid models) are returned unchanged, and so are sliding-window
    layers unless ``bounded``: the caller then adds at most ``more_tokens`` more columns, and a
    sliding layer that has dropped nothing and stays below its window with them is replaced too.
    Below its window a sliding layer holds and returns every column, and its mask sizes are a plain
    layer's, so the model computes the same numbers; at the window's edge its mask would change."""
    if type(cache) is not DynamicCache:
        return cache
    kinds = (DynamicLayer, DynamicSlidingWindowLayer) if bounded else (DynamicLayer,)
    for index, layer in enumerate(cache.layers):
        if not (type(layer) in kinds and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4):
            continue
        if type(layer) is DynamicSlidingWindowLayer and (
                layer.record_past or layer.cumulative_length != layer.keys.shape[-2]
                or layer.cumulative_length + more_tokens >= layer.sliding_window):
            continue  # it has dropped columns, or could reach its window
        cache.layers[index] = PreallocatedLayer(layer.keys, layer.values, layer.keys.shape[-2] + more_tokens)
    return cache


_RETURNS_CACHE: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
_DECODE_MASK: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _probing(model: Any) -> Iterator[None]:
    """No gradients and every module in eval mode (a model in training mode with gradient
    checkpointing turns its cache off), each module's own mode put back afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _device(model: Any) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _step(model: Any, ids: Tensor, mask: Tensor | None, start: int, cache: Any) -> Any:
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                 logits_to_keep=1)


def forward_returns_cache(model: Any) -> bool:
    """Whether ``model(..., use_cache=True)`` hands its cache back (``outputs.cache``), which the
    KV-cache samplers here carry from step to step. RecurrentGemma keeps its recurrent state inside
    its modules and returns none, RWKV returns it under another name; transformers' ``generate``
    drives such models through their own ``prepare_inputs_for_generation``. Found by one forward
    of a single token with the samplers' keywords (in eval mode), once per model; a forward that
    fails on it is left to fail in the sampler."""
    if model not in _RETURNS_CACHE:
        ids = torch.zeros((1, 1), dtype=torch.long, device=_device(model))
        try:
            with _probing(model):
                outputs = _step(model, ids, torch.ones_like(ids), 0, None)
            _RETURNS_CACHE[model] = getattr(outputs, "cache", None) is not None
        except Exception:
            _RETURNS_CACHE[model] = True
    return _RETURNS_CACHE[model]


def decode_steps_take_attention_mask(model: Any) -> bool:
    """Whether a decode step (one new token per row, the rest in the cache) gets the attention mask
    over every column, as transformers' ``generate`` gives it to most models. Mamba, Mamba-2 and
    Falcon-Mamba get none there (their ``prepare_inputs_for_generation`` drops it): their mixer
    multiplies the step's states by the mask, and a mask of every column broadcasts them to that
    many positions (Mamba: the sampled logprobs were off by up to 0.23). Asked of the model's own
    ``prepare_inputs_for_generation``; a model without one (a wrapper) is tried: a prefill of two
    tokens, then the third with and without the mask, against one forward of all three. Either
    way it takes the mask unless leaving it out comes closer to the forward."""
    if model in _DECODE_MASK:
        return _DECODE_MASK[model]
    device = _device(model)
    prepare = getattr(model, "prepare_inputs_for_generation", None)
    if prepare is not None:
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        try:
            inputs = prepare(ids, attention_mask=torch.ones_like(ids), cache=None, use_cache=True,
                             is_first_iteration=False)
            takes = not isinstance(inputs, dict) or inputs.get("attention_mask") is not None
        except Exception:
            takes = True
    else:
        ids = torch.arange(1, 4, device=device).unsqueeze(0)
        mask = torch.ones_like(ids)
        try:
            with _probing(model):
                whole = _step(model, ids, mask, 0, None).logits[:, -1].float()

                def decoded(step_mask: Tensor | None) -> Tensor:
                    cache = _step(model, ids[:, :2], mask[:, :2], 0, None).cache
                    return _step(model, ids[:, 2:], step_mask, 2, cache).logits[:, -1].float()

                with_mask, without = decoded(mask), decoded(None)

            def distance(got: Tensor) -> float:  # no fixed tolerance: bfloat16 rounds far above float32's
                return float((got - whole).abs().max()) if got.shape == whole.shape else math.inf

            takes = distance(with_mask) <= distance(without)
        except Exception:
            takes = True
    _DECODE_MASK[model] = takes
    return takes
