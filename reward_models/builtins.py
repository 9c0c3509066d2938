"""Built-in reward functions, each ``fn(prompts, completions, **columns) -> list[float]``.

Each built-in is a factory: its keyword arguments come from the config's ``reward_kwargs``
(e.g. ``reward_kwargs: {length: {target: 40, tolerance: 10}}``) and it returns the reward
function. The range of every reward is stated in its docstring.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable

RewardFn = Callable[..., list[float]]


@lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (1 = most positive).

    A lexicon-and-rules scorer (Hutto & Gilbert 2014): fast on CPU, no model download.
    """
    analyzer = _vader()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]


def make_sentiment() -> RewardFn:
    return sentiment


def make_length(target: int = 50, tolerance: int = 10, unit: str = "words") -> RewardFn:
    """Closeness to a target length, in [0, 1].

    1 within ``tolerance`` of ``target``; beyond that it falls linearly, reaching 0 at a distance
    of tolerance + target. ``unit``: words or chars.
    """
    if unit not in ("words", "chars"):
        raise ValueError(f"length reward: unit must be 'words' or 'chars', got {unit!r}")
    if target <= 0 or tolerance < 0:
        raise ValueError("length reward: target must be > 0 and tolerance >= 0")

    def length(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        sizes = [len(c.split()) if unit == "words" else len(c) for c in completions]
        return [max(0.0, 1.0 - max(0, abs(n - target) - tolerance) / target) for n in sizes]

    return length


def make_format(pattern: str = r"^[A-Z].*[.!?]$", mode: str = "search") -> RewardFn:
    """1.0 when the completion matches the regex ``pattern`` else 0.0, in {0, 1}.

    mode: ``search`` (anywhere) or ``fullmatch`` (the whole stripped completion). The default
    pattern asks for a capitalised answer that ends with sentence punctuation. DOTALL is on.
    """
    if mode not in ("search", "fullmatch"):
        raise ValueError(f"format reward: mode must be 'search' or 'fullmatch', got {mode!r}")
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ValueError(f"format reward: bad pattern {pattern!r}: {exc}") from None
    matcher = regex.search if mode == "search" else regex.fullmatch

    def format_match(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [1.0 if matcher(c.strip()) else 0.0 for c in completions]

    return format_match


def make_keywords(include: list[str] | None = None, avoid: list[str] | None = None) -> RewardFn:
    """Fraction of ``include`` words present minus fraction of ``avoid`` words present, in [-1, 1].

    Case-insensitive whole-word matches. With only one list the range is [0, 1] or [-1, 0].
    """
    include, avoid = list(include or []), list(avoid or [])
    if not include and not avoid:
        raise ValueError("keywords reward: give include and/or avoid word lists in reward_kwargs")

    def found(words: list[str], text: str) -> float:
        if not words:
            return 0.0
        hits = sum(1 for w in words if re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE))
        return hits / len(words)

    def keywords(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [found(include, c) - found(avoid, c) for c in completions]

    return keywords


def make_no_repeat(n: int = 3) -> RewardFn:
    """Penalty for repeated word n-grams: -(repeated n-grams / all n-grams), in [-1, 0].

    0 for text without repeats (or shorter than n words); degenerate loops approach -1.
    """
    if n < 1:
        raise ValueError("no_repeat reward: n must be >= 1")

    def no_repeat(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        scores = []
        for text in completions:
            words = text.lower().split()
            grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
            scores.append(-(len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
        return scores

    return no_repeat


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def extract_final_answer(text: str, pattern: str | None = None) -> str | None:
    """The final answer in a completion: ``pattern``'s first group if given, else the last
    ``\\boxed{...}``, else what follows the last 'answer:' / 'answer is', else the last number."""
    if pattern is not None:
        matches = re.findall(pattern, text, re.DOTALL)
        if not matches:
            return None
        last = matches[-1]
        return last[0] if isinstance(last, tuple) else last
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1]
    stated = re.findall(r"answer\s*(?:is|:)\s*([^\n]+)", text, re.IGNORECASE)
    if stated:
        return stated[-1]
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: Any) -> str:
    text = str(answer).strip().lower().rstrip(".").strip()
    text = text.replace(",", "").replace("$", "")
    try:
        number = float(text)
        return str(int(number)) if number.is_integer() else str(number)
    except ValueError:
        return " ".join(text.split())


def make_exact_answer(column: str = "answer", pattern: str | None = None) -> RewardFn:
    """1.0 when the completion's extracted final answer equals the dataset column, else 0.0.

    A verifiable reward for math-style prompts: numbers compare by value ("1,000" == "1000.0"),
    text case- and whitespace-insensitively. ``pattern``: optional regex whose group 1 is the answer.
    """

    def exact_answer(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        if column not in columns:
            raise KeyError(f"exact_answer needs the dataset column {column!r}; columns here: {sorted(columns)}")
        scores = []
        for completion, expected in zip(completions, columns[column]):
            found = extract_final_answer(completion, pattern)
            scores.append(1.0 if found is not None and normalize_answer(found) == normalize_answer(expected) else 0.0)
        return scores

    return exact_answer


BUILTIN_REWARDS: dict[str, Callable[..., RewardFn]] = {
    "sentiment": make_sentiment,
    "length": make_length,
    "format": make_format,
    "keywords": make_keywords,
    "no_repeat": make_no_repeat,
    "exact_answer": make_exact_answer,
}
