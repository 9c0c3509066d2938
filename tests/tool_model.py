"""A tiny random Llama taught to call tools, so episodes run through the real trainer, scripts
and evaluation with actual tool calls (a random model never writes one).

``build_tool_model(directory)`` saves a 2-layer Llama (the SmolLM2 vocabulary, TRL's Qwen3 chat
template on its tokenizer) fitted in a few seconds to two scripted episodes of the shipped
examples, chosen by the system prompt:

- calculator rows: turn 1 calls ``calculator("2 + 3")``, turn 2 answers ``\\boxed{5}``;
- number-guess rows: turn 1 calls ``guess(10)``, turn 2 calls ``guess(15)``, turn 3 stops.

Sample it at temperature 0.5 (TOOL_MODEL_TEMPERATURE): most episodes follow the script, some
leave it (no call, a shorter game), so a batch holds tool calls, several turns, and spread.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import trl

from rlhf.episodes.chat import prepare_tool_template, render_ids, tool_suffix_ids
from rlhf.episodes.tools import tool_schema
from rlhf.examples.calculator import calculator
from rlhf.examples.number_guess import NumberGuess

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
TOOL_MODEL_TEMPERATURE = 0.5


def _call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call><|im_end|>"


# (dataset file, tool functions, turns: each (text the model writes, (tool name, arguments) or None))
SCRIPTS = [
    ("calculator_train.jsonl", [calculator],
     [(_call("calculator", {"expression": "2 + 3"}), ("calculator", "5")),
      ("The answer is \\boxed{5}.<|im_end|>", None)]),
    ("guess_train.jsonl", [NumberGuess().guess],
     [(_call("guess", {"number": 10}), ("guess", "lower")),
      (_call("guess", {"number": 15}), ("guess", "higher")),
      ("I give up.<|im_end|>", None)]),
]


def _episode(tokenizer, template: str | None, prompt: list[dict], tools: list, turns: list) -> tuple[list[int], list[int]]:
    """Token ids of a scripted episode and its loss mask (1 on the model's own tokens)."""
    schemas = [tool_schema(t) for t in tools]
    stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = render_ids(tokenizer, prompt, tools=schemas, chat_template=template, add_generation_prompt=True)
    mask = [0] * len(ids)
    conversation = list(prompt)
    for text, result in turns:
        written = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, mask = ids + written, mask + [1] * len(written)
        if result is None:
            break
        name, content = result
        arguments = json.loads(text.split("\n")[1])["arguments"]
        conversation.append({"role": "assistant", "content": "",
                             "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]})
        tool_messages = [{"role": "tool", "name": name, "content": content}]
        suffix = tool_suffix_ids(tokenizer, conversation, tool_messages, tools=schemas, chat_template=template,
                                 stop_ids=stop_ids)
        conversation += tool_messages
        ids, mask = ids + suffix, mask + [0] * len(suffix)
    return ids, mask


def build_tool_model(directory: Path, seed: int = 0, steps: int = 100) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "tokenizer")
    tokenizer.chat_template = QWEN3
    template = prepare_tool_template(tokenizer)  # what episodes render with (Qwen3's training variant)
    rows = []
    for file, tools, turns in SCRIPTS:
        lines = (ROOT / "rlhf" / "data" / file).read_text().splitlines()[:6]
        for line in lines:
            row = json.loads(line)
            prompt = [dict(m) for m in row["prompt"]]
            if "secret" in row:  # what the environment's reset appends to the prompt (rlhf.episodes.runner)
                prompt[-1]["content"] += NumberGuess().reset(**row)
            rows.append(_episode(tokenizer, template, prompt, tools, turns))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, :len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # A sampled softmax: the scripted tokens plus 1024 others standing for the rest of the
    # vocabulary (their logits shifted by log(rest / 1024), so the partition function is estimated
    # whole); the full 49k-way head at every target costs ~10x more and teaches the same thing.
    targets = labels[:, 1:] != -100
    wanted = labels[:, 1:][targets]
    scripted = torch.unique(wanted)
    rest = torch.ones(config.vocab_size, dtype=torch.bool)
    rest[scripted] = False
    others = rest.nonzero().flatten()
    others = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:1024]]
    columns = torch.cat([scripted, others])
    shift = torch.cat([torch.zeros(len(scripted)),
                       torch.full((len(others),), float(torch.log(torch.tensor((config.vocab_size - len(scripted)) / len(others)))))])
    target_index = torch.searchsorted(scripted, wanted)
    for _ in range(steps):
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]
        logits = hidden[targets] @ model.lm_head.weight[columns].T + shift
        loss = torch.nn.functional.cross_entropy(logits, target_index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    tokenizer.chat_template = QWEN3  # the template itself (prepare_tool_template set a response schema too)
    tokenizer.save_pretrained(directory)
    return directory
