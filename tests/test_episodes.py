"""Multi-turn episodes with tools and environments (rlhf.episodes, issue 24), on the tiny random
Llama with TRL's Qwen3 chat template (the tiny model's SmolLM2 template cannot render tools).

A random model never writes a tool call, so most tests drive it with ``ScriptedLM``: the tiny
model plus a large logit bias on the next token of a per-turn script. The bias at a position
depends only on the row's tokens up to it, so the wrapper is still a causal LM: a cached and a
full forward give the same logits, and tokens off the script are sampled from the model itself.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache

from rlhf.episodes import (EnvironmentPool, ToolEpisodes, Toolbox, episode_metrics, load_object, pack_episodes,
                           run_tool_calls)
from rlhf.errors import ConfigError, DataError
from rlhf.examples.calculator import calculator
from rlhf.examples.number_guess import NumberGuess

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
BIAS = 40.0  # on a random model's near-flat logits: the scripted token has probability ~1 - 2e-13


def history_cache(config) -> DynamicCache:
    """A plain DynamicCache (so rlhf.kv_cache.preallocated still swaps in its layers) that also
    keeps each row's real tokens for ScriptedLM, selected along with its rows."""
    cache = DynamicCache(config=config)
    cache.histories = []

    def batch_select_indices(indices: torch.Tensor) -> None:
        DynamicCache.batch_select_indices(cache, indices)
        cache.histories = [cache.histories[i] for i in indices.tolist()]

    cache.batch_select_indices = batch_select_indices
    return cache


class ScriptedLM(torch.nn.Module):
    """``inner`` with +BIAS on ``script[k][n]`` at the n-th token of the k-th assistant turn (turns
    counted by the assistant header in the row's own tokens); no bias past a turn's script.
    ``scripts``: one script for every row, or {word: script} for the rows whose prompt holds the word."""

    def __init__(self, inner: torch.nn.Module, tokenizer, scripts: list[list[int]] | dict[str, list[list[int]]]):
        super().__init__()
        self.inner = inner
        by_word = {"": scripts} if isinstance(scripts, list) else scripts
        self.scripts = {tuple(ids(tokenizer, word)) if word else (): s for word, s in by_word.items()}
        self.header = ids(tokenizer, "<|im_start|>assistant\n")
        self.layers_seen: set[str] = set()  # cache layer types the sampler handed in
        self.run_inner = None  # what computes inner's logits (None: inner itself)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """The inner model's (what the sampler asks of a causal LM about its decode steps)."""
        return self.inner.prepare_inputs_for_generation(*args, **kwargs)

    @staticmethod
    def _starts(context: list[int], pattern: tuple[int, ...] | list[int]) -> list[int]:
        size = len(pattern)
        return [i + size for i in range(len(context) - size + 1) if tuple(context[i:i + size]) == tuple(pattern)]

    def scripted(self, context: list[int]) -> int | None:
        turns = next((s for word, s in self.scripts.items() if not word or self._starts(context, word)), None)
        starts = self._starts(context, self.header)
        if turns is None or not starts or len(starts) > len(turns):
            return None
        script, n = turns[len(starts) - 1], len(context) - starts[-1]
        return script[n] if n < len(script) else None

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, logits_to_keep=0, **kwargs):
        if use_cache and cache is None:
            cache = history_cache(self.inner.config)
        elif cache is not None:
            self.layers_seen.add(type(cache.layers[0]).__name__)
        outputs = (self.run_inner or self.inner)(input_ids=input_ids, attention_mask=attention_mask,
                                                 position_ids=position_ids, cache=cache, use_cache=use_cache,
                                                 logits_to_keep=logits_to_keep, **kwargs)
        width = input_ids.shape[1]
        chunk_mask = attention_mask[:, -width:]
        histories = cache.histories if use_cache and cache.histories else [[] for _ in range(len(input_ids))]
        kept = outputs.logits.shape[1]
        bias = torch.zeros_like(outputs.logits)
        for row in range(len(input_ids)):
            context = list(histories[row])
            for column in range(width):
                if chunk_mask[row, column]:
                    context.append(int(input_ids[row, column]))
                logit_column = column - (width - kept)
                if logit_column >= 0 and chunk_mask[row, column]:
                    token = self.scripted(context)
                    if token is not None:
                        bias[row, logit_column, token] = BIAS
            histories[row] = context
        if use_cache:
            cache.histories = histories
        outputs.logits = outputs.logits + bias
        return outputs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's steps are too small to share among threads; on a loaded machine the
    threads' waits dominate (about 4x slower measured here with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def tokenizer(tiny_model_dir):
    """A fresh tokenizer per test (ToolEpisodes sets the template and a response parser on it)."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def char_ids(tokenizer, text: str) -> list[int]:
    """``text`` one character per token: a valid but non-canonical tokenisation."""
    return [ids(tokenizer, ch)[0] for ch in text]


def call_script(tokenizer, name_ids: list[int], arguments: str) -> list[int]:
    """A Qwen3 tool-call turn (``<tool_call>{...}</tool_call><|im_end|>``) with the tool's name as ``name_ids``."""
    closing = ids(tokenizer, f'", "arguments": {arguments}}}\n</tool_call>')
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return ids(tokenizer, '<tool_call>\n{"name": "') + name_ids + closing + [end]


def sampling(tokenizer, **overrides):
    settings = dict(max_completion_length=120, temperature=0.7, top_p=1.0, stop_ids=[tokenizer.eos_token_id],
                    pad_token_id=tokenizer.pad_token_id)
    return {**settings, **overrides}


def user(text: str) -> dict:
    return {"prompt": [{"role": "user", "content": text}]}


def full_forward_logprobs(model, batch, temperature: float) -> torch.Tensor:
    """[B, T] logprobs of the episode tokens under one fresh forward of the whole sequences."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    width = batch.response_ids.shape[1]
    predicting = logits[:, -width - 1:-1].double() / temperature
    return torch.log_softmax(predicting, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)


def test_episode_tokens_are_the_sampled_ones_where_retokenising_would_change_them(tiny, tokenizer):
    """The training sequence holds exactly the sampled ids: the tool name is sampled one character
    per token, which decoding and re-encoding turns into other ids (so does the random second turn),
    and still every sampled token's logprob from one fresh forward of the packed episode equals the
    sampler's. Naive re-rendering of the conversation gives a different sequence."""
    name = char_ids(tokenizer, "calculator")
    assert ids(tokenizer, tokenizer.decode(name)) != name  # re-tokenising changes these ids
    # different results -> tool tokens of different lengths: the rows' turns go out of step
    calls = {"Alpha": call_script(tokenizer, name, '{"expression": "12*7"}'),
             "Beta": call_script(tokenizer, name, '{"expression": "12*7+1000000"}')}
    model = ScriptedLM(tiny, tokenizer, {word: [call] for word, call in calls.items()})
    episodes = ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3)
    rows = [user("Alpha: what is 12*7?"), user("Beta: please compute 12*7 plus a million for me, using the tool.")]
    batch = episodes.sample(model, rows, **sampling(tokenizer, max_completion_length=90, row_seeds=[1, 2]))
    temperature = 0.7
    for episode, call, result in zip(batch.episodes, calls.values(), ("84", "1000084")):
        assert episode.tool_calls == 1 and episode.tool_failures == 0 and episode.turns == 2
        assert episode.messages[1] == {"role": "tool", "name": "calculator", "content": result}
        first_turn = episode.completion_ids[: episode.turn_ends[0] + 1]
        assert first_turn == call  # the non-canonical ids themselves
        tool_span = episode.completion_ids[episode.turn_ends[0] + 1:]
        glue = len(tool_span) - episode.mask[episode.turn_ends[0] + 1:].count(1)
        assert f"<tool_response>\n{result}\n</tool_response>" in tokenizer.decode(tool_span[:glue])
        assert episode.mask == [1] * len(first_turn) + [0] * glue + [1] * (len(tool_span) - glue)
        naive = ids(tokenizer, tokenizer.apply_chat_template(episode.prompt + episode.messages, tools=[calculator],
                                                             chat_template=episodes.chat_template, tokenize=False))
        assert naive[: len(episode.prompt_ids)] == episode.prompt_ids
        assert naive[len(episode.prompt_ids):] != episode.completion_ids
    free_turns = [e.completion_ids[len(e.mask) - e.mask[::-1].index(0):] for e in batch.episodes]  # after the tool
    assert any(ids(tokenizer, tokenizer.decode(turn)) != turn for turn in free_turns)
    packed = pack_episodes(batch.episodes, tokenizer.pad_token_id)
    recomputed = full_forward_logprobs(model, packed, temperature)
    sampled = packed.mask.bool()
    assert torch.allclose(recomputed[sampled].float(), packed.sampler_logprobs[sampled], atol=2e-5, rtol=0)
    assert packed.sampler_logprobs[sampled].min() < -5  # off-script tokens: real draws, not ~0


def test_kv_cache_across_turns_equals_reprefilling_every_turn(tiny, tokenizer):
    """Same uniforms -> same episodes, whether each turn prefills only its new tokens onto the
    carried cache or the whole history again: rows of different lengths and turn counts, one of
    which leaves the batch early, three tool calls then a fourth turn that is sampled freely after
    its first words. Times the 4-turn episode of one row both ways (printed, not asserted)."""
    def turns(expression: str) -> list[list[int]]:
        call = call_script(tokenizer, ids(tokenizer, "calculator"), f'{{"expression": "{expression}"}}')
        return [call, call, call, ids(tokenizer, "The answer is")]

    # results of different lengths put the rows' turns out of step (chunks padded on the left)
    model = ScriptedLM(tiny, tokenizer, {"Alpha": turns("6*7"), "Beta": turns("123456*789"), "Gamma": turns("1")})
    episodes = ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3)
    rows = [user("Alpha: what is 6*7?"), user("Beta: compute 123456*789 three times, please, with the calculator."),
            user("Gamma")]
    uniforms = torch.rand(len(rows), 240, generator=torch.Generator().manual_seed(0))
    uniforms[2, 0] = 0.0  # row 2 draws token 0 first (off-script): no valid call, it leaves after turn 1
    settings = sampling(tokenizer, max_completion_length=240, uniforms=uniforms)
    cached = episodes.sample(model, rows, **settings).episodes
    again = episodes.sample(model, rows, **settings, reprefill_each_turn=True).episodes
    for a, b in zip(cached, again):
        assert a.completion_ids == b.completion_ids and a.mask == b.mask and a.turn_ends == b.turn_ends
        assert a.messages == b.messages
        assert max(abs(x - y) for x, y in zip(a.sampler_logprobs, b.sampler_logprobs)) < 2e-5
    assert [e.turns for e in cached] == [4, 4, 1] and [e.tool_calls for e in cached] == [3, 3, 0]
    assert cached[0].truncated and min(cached[0].sampler_logprobs) < -5  # the free end of turn 4
    assert model.layers_seen == {"PreallocatedLayer"}  # the in-place cache of rlhf.kv_cache, across batch selection

    timings = {}
    for mode in (False, True):
        start = time.perf_counter()
        episodes.sample(model, rows[:1], **dict(settings, uniforms=uniforms[:1]), reprefill_each_turn=mode)
        timings[mode] = time.perf_counter() - start
    print(f"4-turn episode: carried cache {timings[False]:.3f} s, re-prefill {timings[True]:.3f} s, "
          f"speed-up {timings[True] / timings[False]:.2f}x")


def _other_layout(kind: str, tokenizer) -> torch.nn.Module:
    """Tiny random models whose cache cannot carry pads in mid-sequence: a hybrid (LFM2's conv
    layer before its attention layer) and a sliding window shorter than the episodes (Mistral)."""
    from transformers import Lfm2Config, Lfm2ForCausalLM, MistralConfig, MistralForCausalLM

    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if kind == "hybrid":
        return Lfm2ForCausalLM(Lfm2Config(**shape, layer_types=["conv", "full_attention"])).eval()
    return MistralForCausalLM(MistralConfig(**shape, sliding_window=24)).eval()


@pytest.mark.parametrize("kind", ["hybrid", "sliding-window"])
def test_models_that_cannot_carry_mid_sequence_pads_sample_their_own_sequences(kind, tokenizer):
    """Hybrid models (LFM2, Qwen3.5: conv/recurrent state) and sliding windows (Mistral, Gemma 3)
    prefill the histories again where turns go out of step or an episode leaves: each sampled
    token's logprob equals a fresh forward of the packed episode (the update's view). Before,
    the hybrid crashed when the first episode left the batch (no row selection for its conv
    state), and the sliding window, counting pad columns, dropped real tokens from its window."""
    def turns(expression: str) -> list[list[int]]:
        call = call_script(tokenizer, ids(tokenizer, "calculator"), f'{{"expression": "{expression}"}}')
        return [call, call, ids(tokenizer, "The answer is")]

    model = ScriptedLM(_other_layout(kind, tokenizer), tokenizer,
                       {"Alpha": turns("6*7"), "Beta": turns("123456*789"), "Gamma": turns("1")})
    episodes = ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3)
    rows = [user("Alpha: what is 6*7?"), user("Beta: compute 123456*789 twice, please, with the calculator."),
            user("Gamma")]
    uniforms = torch.rand(len(rows), 160, generator=torch.Generator().manual_seed(0))
    uniforms[2, 0] = 0.0  # row 2 draws token 0 first (off-script): it leaves after turn 1
    batch = episodes.sample(model, rows, **sampling(tokenizer, max_completion_length=160, uniforms=uniforms))
    assert [e.turns for e in batch.episodes] == [3, 3, 1] and [e.tool_calls for e in batch.episodes] == [2, 2, 0]
    packed = pack_episodes(batch.episodes, tokenizer.pad_token_id)
    recomputed = full_forward_logprobs(model, packed, 0.7)
    sampled = packed.mask.bool()
    assert torch.allclose(recomputed[sampled].float(), packed.sampler_logprobs[sampled], atol=2e-5, rtol=0)


def _state_space(kind: str, tokenizer) -> torch.nn.Module:
    from transformers import MambaConfig, MambaForCausalLM, RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    shape = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, pad_token_id=tokenizer.pad_token_id,
                 eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if kind == "mamba":
        return MambaForCausalLM(MambaConfig(**shape, state_size=8, expand=2)).eval()
    return RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
        **shape, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8, lru_width=32,
        attention_window_size=8, block_types=["recurrent", "attention"])).eval()


def test_mamba_episodes_decode_without_the_attention_mask(tokenizer):
    """Mamba's decode steps take no attention mask (as in generate; a mask over every column
    broadcast the step's states to that many positions): each sampled logprob equals a fresh
    forward of the packed episode. Before, they were off by up to 0.72 here."""
    model = _state_space("mamba", tokenizer)
    episodes = ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3)
    rows = [user("Hi"), user("Compute 123456*789 with the calculator, please.")]
    uniforms = torch.rand(len(rows), 12, generator=torch.Generator().manual_seed(0))
    batch = episodes.sample(model, rows, **sampling(tokenizer, max_completion_length=12, uniforms=uniforms))
    packed = pack_episodes(batch.episodes, tokenizer.pad_token_id)
    recomputed = full_forward_logprobs(model, packed, 0.7)
    sampled = packed.mask.bool()
    assert sampled.sum() > 12
    assert torch.allclose(recomputed[sampled].float(), packed.sampler_logprobs[sampled], atol=2e-5, rtol=0)


def test_model_that_returns_no_cache_is_a_config_error_for_episodes(tokenizer):
    episodes = ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3)
    with pytest.raises(ConfigError, match="returns no cache") as info:
        episodes.sample(_state_space("recurrent_gemma", tokenizer), [user("Hi")], **sampling(tokenizer))
    assert "\n" not in str(info.value)


def test_sampling_forward_gives_the_same_multi_turn_episodes(tiny, tokenizer):
    """rlhf.sampling_forward under the episode sampler's calls (turn chunks padded on the left in
    mid-sequence, rows leaving the batch, a shared prompt prefill): the same tokens and logprobs,
    bitwise, as the model's own forward; and the sampler runs it when handed one."""
    from rlhf.sampling_forward import sampling_forward

    def turns(expression: str) -> list[list[int]]:
        call = call_script(tokenizer, ids(tokenizer, "calculator"), f'{{"expression": "{expression}"}}')
        return [call, call, ids(tokenizer, "The answer is")]

    scripts = {"Alpha": turns("6*7"), "Beta": turns("123456*789"), "Gamma": turns("1")}
    episodes = ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3)
    rows = [user("Alpha: what is 6*7?"), user("Beta: compute 123456*789 twice"), user("Gamma"), user("Gamma")]
    uniforms = torch.rand(len(rows), 160, generator=torch.Generator().manual_seed(0))
    uniforms[2, 0] = 0.0  # off-script first token: row 2 leaves after one turn
    settings = sampling(tokenizer, max_completion_length=160, uniforms=uniforms, share_prompt_prefix=True)
    plain = episodes.sample(ScriptedLM(tiny, tokenizer, scripts), rows, **settings).episodes
    scripted = ScriptedLM(tiny, tokenizer, scripts)
    scripted.run_inner = sampling_forward(tiny)
    assert scripted.run_inner is not None
    fast = episodes.sample(scripted, rows, **settings).episodes
    for a, b in zip(plain, fast):
        assert a.completion_ids == b.completion_ids and a.sampler_logprobs == b.sampler_logprobs
    assert [e.tool_calls for e in plain][:2] == [2, 2] and plain[2].turns == 1

    calls = []
    forward = sampling_forward(tiny)
    counted = lambda **inputs: calls.append(1) or forward(**inputs)  # noqa: E731
    row_settings = sampling(tokenizer, max_completion_length=8, row_seeds=[1, 2, 3, 4], share_prompt_prefix=True)
    handed = episodes.sample(tiny, rows, **row_settings, fast_forward=counted).episodes
    own = episodes.sample(tiny, rows, **row_settings).episodes
    assert calls and [e.completion_ids for e in handed] == [e.completion_ids for e in own]
    assert [e.sampler_logprobs for e in handed] == [e.sampler_logprobs for e in own]


def test_shared_prompt_prefix_gives_the_same_episodes(tiny, tokenizer):
    """A GRPO group's prompt prefilled once (share_prompt_prefix) samples what separate prefills do."""
    episodes = ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3)
    rows = [user("What is 2+2?"), user("What is 2+2?"), user("Something else entirely")]
    settings = sampling(tokenizer, max_completion_length=12, row_seeds=[5, 6, 7])
    shared = episodes.sample(tiny, rows, **settings, share_prompt_prefix=True).episodes
    alone = episodes.sample(tiny, rows, **settings).episodes
    assert [e.completion_ids for e in shared] == [e.completion_ids for e in alone]
    assert shared[0].completion_ids != shared[1].completion_ids  # the group's rows drew their own tokens
    for a, b in zip(shared, alone):
        assert max(abs(x - y) for x, y in zip(a.sampler_logprobs, b.sampler_logprobs)) < 2e-5


def test_gae_over_actions_skips_tool_tokens():
    """GAE run on compact_actions: V at a turn's last token bootstraps from V at the next turn's
    first sampled token and gamma*lambda decays once per action (reference: a loop over the
    sampled tokens alone); plain GAE over the tokens with holes does not."""
    from rlhf.algorithms.advantages import gae_advantages
    from rlhf.episodes.actions import compact_actions, expand_actions

    generator = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    rewards = torch.randn(mask.shape, generator=generator, dtype=torch.float64) * mask
    values = torch.randn(mask.shape, generator=generator, dtype=torch.float64)
    gamma, lam = 0.9, 0.8
    compact_rewards, compact_mask = compact_actions(rewards, mask)
    compact_values, _ = compact_actions(values, mask)
    advantages, returns = gae_advantages(compact_rewards, compact_mask, values=compact_values, gamma=gamma, lam=lam)
    advantages, returns = expand_actions(advantages, mask), expand_actions(returns, mask)
    for row in range(len(mask)):
        steps = mask[row].nonzero().squeeze(-1).tolist()
        running, expected = 0.0, {}
        for k in reversed(range(len(steps))):
            following = float(values[row, steps[k + 1]]) if k + 1 < len(steps) else 0.0
            delta = float(rewards[row, steps[k]]) + gamma * following - float(values[row, steps[k]])
            running = delta + gamma * lam * running
            expected[steps[k]] = running
        for t in range(mask.shape[1]):
            assert advantages[row, t].item() == pytest.approx(expected.get(t, 0.0), abs=1e-5)
            target = expected[t] + float(values[row, t]) if t in expected else 0.0
            assert returns[row, t].item() == pytest.approx(target, abs=1e-5)
    holes, _ = gae_advantages(rewards, mask, values=values, gamma=gamma, lam=lam)
    assert not torch.allclose(holes.float(), advantages.float(), atol=1e-3)
    assert torch.equal(expand_actions(compact_rewards, mask), rewards)


def test_tool_failures_become_error_observations():
    """Unknown tool, raising tool, bad arguments, sync and async timeouts: an observation in TRL's
    str({"error": ...}) form and a failure each; the reward form carries its reward."""
    import time as clock

    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: first
            b: second
        """
        return a + b

    def broken(x: int) -> int:
        """Always fails.

        Args:
            x: anything
        """
        raise ZeroDivisionError("division by zero")

    def slow(x: int) -> int:
        """Sleeps.

        Args:
            x: anything
        """
        clock.sleep(2)
        return x

    async def later(x: int) -> dict:
        """Async, with a turn reward.

        Args:
            x: anything
        """
        await asyncio.sleep(0)
        return {"observation": f"saw {x}", "reward": 0.5}

    async def stuck(x: int) -> int:
        """Async and slow.

        Args:
            x: anything
        """
        await asyncio.sleep(5)
        return x

    box = Toolbox([add, broken, slow, later, stuck])

    def call(name, arguments):
        return {"type": "function", "function": {"name": name, "arguments": arguments}}

    start = clock.perf_counter()
    outcomes = run_tool_calls([(box, call("add", {"a": 2, "b": 3})), (box, call("nope", {})),
                               (box, call("broken", {"x": 1})), (box, call("add", "not json")),
                               (box, call("add", {"c": 1})), (box, call("slow", {"x": 1})),
                               (box, call("later", {"x": 4})), (box, call("stuck", {"x": 1}))], timeout=0.3)
    assert clock.perf_counter() - start < 2.0  # neither the slow nor the stuck tool was waited for
    assert [o.failed for o in outcomes] == [False, True, True, True, True, True, False, True]
    assert outcomes[0].content == "5"
    assert outcomes[1].content == str({"error": "Tool nope not found."})
    assert outcomes[2].content == str({"error": "division by zero"})
    assert "tool_timeout=0.3" in outcomes[5].content and "tool_timeout=0.3" in outcomes[7].content
    assert (outcomes[6].content, outcomes[6].reward) == ("saw 4", 0.5)


def test_bad_setups_are_one_line_config_errors(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="cannot render tool calls") as info:
        ToolEpisodes(tokenizer, tools=[calculator])  # the tiny model's own (SmolLM2) template
    assert "\n" not in str(info.value)

    def undocumented(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="undocumented.*docstring"):
        ToolEpisodes(tokenizer, tools=[undocumented], chat_template=QWEN3)
    with pytest.raises(ConfigError, match="no tool-call parser is known"):  # tool-capable, but no parser for it
        ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3 + "{#- a local variant #}")
    with pytest.raises(ConfigError, match="has no reset"):
        ToolEpisodes(tokenizer, environment_factory=object, chat_template=QWEN3)
    with pytest.raises(ConfigError, match="tool_timeout"):
        ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3, tool_timeout=0)
    with pytest.raises(ConfigError, match="file not found"):
        load_object(str(tmp_path / "missing.py") + ":fn")
    (tmp_path / "t.py").write_text("def fn():\n    pass\n")
    with pytest.raises(ConfigError, match="has no function or class 'other'"):
        load_object(f"{tmp_path / 't.py'}:other")
    assert load_object("rlhf/examples/calculator.py:calculator")("2+2") == "4"
    assert load_object("rlhf.examples.number_guess:NumberGuess") is NumberGuess


def test_environment_pool_reuses_and_routes_instances():
    class Counter:
        made = 0

        def __init__(self):
            Counter.made += 1
            self.start = 0

        def reset(self, start: int = 0, **row):
            self.start = start
            return f" (start at {start})"

        def step(self, by: int) -> int:
            """Count.

            Args:
                by: how much
            """
            return self.start + by

    class Quiet(Counter):
        def reset(self, **row):
            return None

    pool = EnvironmentPool({"counter": Counter, "quiet": Quiet})
    rows = [{"environment": "counter", "start": 3}, {"environment": "counter"}, {"environment": "quiet"}]
    first = pool.take(pool.names(rows))
    assert [type(e) for e in first] == [Counter, Counter, Quiet] and len(set(map(id, first))) == 3
    assert pool.take(pool.names(rows)) == first  # reused, not rebuilt
    assert Counter.made == 3
    assert pool.reset(first[0], rows[0]) == " (start at 3)" and first[0].start == 3
    with pytest.raises(DataError, match="environment other"):
        pool.names([{"environment": "other"}])


def test_budget_overflow_and_iteration_limit(tiny, tokenizer):
    """Tool results that would not fit end the episode as truncated (rolled back from the
    conversation, still counted); past max_tool_calling_iterations calls are not run."""
    call = call_script(tokenizer, ids(tokenizer, "calculator"), '{"expression": "1+1"}')
    model = ScriptedLM(tiny, tokenizer, [call, call])
    episodes = ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3)
    tight = episodes.sample(model, [user("1+1?")],
                            **sampling(tokenizer, max_completion_length=len(call) + 5)).episodes[0]
    assert tight.truncated and tight.tool_calls == 1 and tight.turns == 1
    assert [m["role"] for m in tight.messages] == ["assistant"] and tight.completion_ids == call

    limited = ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3, max_tool_calling_iterations=1)
    episode = limited.sample(model, [user("1+1?")], **sampling(tokenizer)).episodes[0]
    assert episode.turns == 2 and episode.tool_calls == 1 and not episode.truncated
    assert [m["role"] for m in episode.messages] == ["assistant", "tool", "assistant"]
    assert episode.messages[-1]["tool_calls"]  # the second call was made, not executed

    cut = episodes.sample(model, [user("1+1?")], **sampling(tokenizer, max_completion_length=10)).episodes[0]
    assert cut.truncated and cut.turns == 1 and len(cut.completion_ids) == 10 and cut.tool_calls == 0


def test_calculator_example_scores_with_exact_answer(tiny, tokenizer):
    """The shipped calculator tool and prompt set: a scripted call then answer earns 1 from
    math-verify's exact_answer on the whole conversation; a random model runs without tools."""
    import datasets

    from reward_models.builtins import make_exact_answer

    rows = datasets.load_dataset("json", data_files=str(ROOT / "rlhf/data/calculator_train.jsonl"), split="train")
    assert len(rows) >= 50 and set(rows.column_names) == {"prompt", "solution"}
    row = rows[0]
    expression = row["prompt"][-1]["content"].removeprefix("What is ").removesuffix("?").replace(" divided by ", "/")
    answer = ids(tokenizer, f"The answer is \\boxed{{{row['solution']}}}.") + [tokenizer.eos_token_id]
    model = ScriptedLM(tiny, tokenizer, [call_script(tokenizer, ids(tokenizer, "calculator"),
                                                     f'{{"expression": "{expression}"}}'), answer])
    episodes = ToolEpisodes(tokenizer, tools=["rlhf/examples/calculator.py:calculator"], chat_template=QWEN3)
    batch = episodes.sample(model, [row, rows[1]], **sampling(tokenizer, max_completion_length=200, row_seeds=[0, 1]))
    reward = make_exact_answer(column="solution")
    scores = reward([r["prompt"] for r in (row, rows[1])], [e.messages for e in batch.episodes],
                    solution=[row["solution"], rows[1]["solution"]])
    assert batch.episodes[0].messages[1]["content"] == row["solution"]
    assert scores[0] == 1.0 and batch.episodes[0].turns == 2
    random_run = episodes.sample(tiny, [row, rows[1]], **sampling(tokenizer, max_completion_length=24)).episodes
    assert all(e.tool_calls == 0 and e.turns == 1 for e in random_run)


def test_number_guess_example_pays_turn_and_episode_rewards(tiny, tokenizer):
    """The shipped environment: scripted guesses 10, 5, 6 at secret 6 -> lower, higher, correct;
    turn rewards -0.1, -0.1, 0 land on each turn's last sampled token, get_reward pays 1."""
    import datasets

    rows = datasets.load_dataset("json", data_files=str(ROOT / "rlhf/data/guess_train.jsonl"), split="train")
    row = rows[0]
    assert row["secret"] == 6
    guesses = [call_script(tokenizer, ids(tokenizer, "guess"), f'{{"number": {n}}}') for n in (10, 5, 6)]
    done = ids(tokenizer, "Found it.") + [tokenizer.eos_token_id]
    model = ScriptedLM(tiny, tokenizer, [*guesses, done])
    episodes = ToolEpisodes(tokenizer, environment_factory="rlhf/examples/number_guess.py:NumberGuess",
                            chat_template=QWEN3)
    batch = episodes.sample(model, [row], **sampling(tokenizer, max_completion_length=300))
    episode = batch.episodes[0]
    assert "between 1 and 20" in episode.prompt[-1]["content"]  # the reset observation
    assert [m["content"] for m in episode.messages if m["role"] == "tool"] == ["lower", "higher", "correct"]
    assert episode.turn_rewards == pytest.approx([-0.1, -0.1, 0.0, 0.0]) and episode.turns == 4
    [(name, get_reward)] = episodes.reward_functions()
    assert name == "NumberGuess" and get_reward(environments=batch.environments) == [1.0]
    packed = pack_episodes(batch.episodes, tokenizer.pad_token_id)
    ends = torch.tensor(episode.turn_ends)
    assert torch.allclose(packed.token_rewards[0, ends], torch.tensor([-0.1, -0.1, 0.0, 0.0]))
    assert packed.token_rewards.abs().sum() == pytest.approx(0.2)
    assert packed.mask[0, ends].eq(1).all() and packed.episode_mask.sum() == len(episode.completion_ids)
    assert packed.mask.sum() < packed.episode_mask.sum()  # the tool tokens are context, not actions
    metrics = episode_metrics(batch.episodes)
    assert (metrics["turns_mean"], metrics["tools/call_frequency"], metrics["tools/failure_frequency"]) == (4, 3, 0)
    random_run = episodes.sample(tiny, [rows[1], rows[2]], **sampling(tokenizer, max_completion_length=24)).episodes
    assert all(e.turns == 1 and not e.messages[0].get("tool_calls") for e in random_run)
