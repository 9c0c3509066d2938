"""Cross-turn KV cache vs re-prefilling every turn (README "Tools and environments", measured), on
the embedded SmolLM2-135M: ``python tests/episode_cache_timing.py``. 4-turn episodes
(3 calculator calls + a final turn, forced by test_episodes.ScriptedLM's logit bias), 8 rows."""
import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import torch
from transformers import AutoTokenizer
from test_episodes import QWEN3, ScriptedLM, call_script, ids
from rlhf.episodes import ToolEpisodes
from rlhf.examples.calculator import calculator
from rlhf.models import load_base_model, resolve_model_path

path = resolve_model_path("smollm2-135m-instruct")
model = load_base_model("smollm2-135m-instruct").eval()
tokenizer = AutoTokenizer.from_pretrained(path)
def turns(expression):
    call = call_script(tokenizer, ids(tokenizer, "calculator"), f'{{"expression": "{expression}"}}')
    return [call, call, call, ids(tokenizer, "The answer is 42, as the calculator said three times.") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]]
words = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta"]
exprs = ["6*7", "123456*789", "1+1", "2**10", "99-1", "7*8*9", "100/4", "3*3"]
scripted = ScriptedLM(model, tokenizer, {w: turns(e) for w, e in zip(words, exprs)})
episodes = ToolEpisodes(tokenizer, tools=[calculator], chat_template=QWEN3)
rows = [{"prompt": [{"role": "user", "content": f"{w}: compute {e} with the calculator, three times to be sure."}]} for w, e in zip(words, exprs)]
stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
uniforms = torch.rand(len(rows), 400, generator=torch.Generator().manual_seed(0))
settings = dict(max_completion_length=400, temperature=1.0, top_p=1.0, stop_ids=stop, pad_token_id=tokenizer.pad_token_id, uniforms=uniforms)
out = episodes.sample(scripted, rows, **settings).episodes
print("turns", [e.turns for e in out], "calls", [e.tool_calls for e in out], "lengths", [len(e.completion_ids) for e in out], "prompt", len(out[0].prompt_ids))
times = {False: [], True: []}
for _ in range(3):
    for mode in (False, True):
        start = time.perf_counter()
        again = episodes.sample(scripted, rows, **settings, reprefill_each_turn=mode).episodes
        times[mode].append(time.perf_counter() - start)
        assert [e.completion_ids for e in again] == [e.completion_ids for e in out]
print("carried", [round(t, 2) for t in times[False]], "re-prefill", [round(t, 2) for t in times[True]],
      "speed-up (median)", round(sorted(times[True])[1] / sorted(times[False])[1], 2))
