"""Built-in reward functions, each ``fn(prompts, completions, **columns) -> list[float]``.

Each built-in is a factory: its keyword arguments come from the config's ``reward_kwargs``
(e.g. ``reward_kwargs: {length: {target: 40, tolerance: 10}}``) and it returns the reward
function. The range of every reward is stated in its docstring.

``completions`` (and ``prompts``) may be strings or, in TRL's conversational form, message lists
``[{"role": "assistant", "content": "..."}]``; every built-in reads a completion through
:func:`completion_text`.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from typing import Any, Callable

RewardFn = Callable[..., list[float | None]]  # None: not applicable to that sample (TRL)
Messages = list[dict[str, Any]]


def content_text(content: Any) -> str:
    """A message's ``content`` as text: a string as is, a list of parts (TRL's multimodal form
    ``[{"type": "text", "text": ...}, {"type": "image"}]``) -> its text parts joined, None -> ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if isinstance(part, dict) and part.get("type") == "text")


def completion_text(completion: str | Messages) -> str:
    """The text the policy wrote: a string as is; a message list -> the contents of its assistant
    messages joined by newlines (tool and other turns left out). A message without a role counts as
    the assistant's, as in TRL's examples (``[{"content": ...}]``)."""
    if isinstance(completion, str):
        return completion
    if not isinstance(completion, (list, tuple)):
        raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")
    return "\n".join(content_text(m.get("content")) for m in completion if m.get("role", "assistant") == "assistant")


@lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(prompts: list, completions: list[str | Messages], **columns: Any) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (1 = most positive).

    A lexicon-and-rules scorer (Hutto & Gilbert 2014): fast on CPU, no model download.
    """
    analyzer = _vader()
    return [float(analyzer.polarity_scores(completion_text(c))["compound"]) for c in completions]


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

    def length(prompts: list, completions: list[str | Messages], **columns: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        sizes = [len(t.split()) if unit == "words" else len(t) for t in texts]
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

    def format_match(prompts: list, completions: list[str | Messages], **columns: Any) -> list[float]:
        return [1.0 if matcher(completion_text(c).strip()) else 0.0 for c in completions]

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

    def keywords(prompts: list, completions: list[str | Messages], **columns: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        return [found(include, t) - found(avoid, t) for t in texts]

    return keywords


def make_no_repeat(n: int = 3) -> RewardFn:
    """Penalty for repeated word n-grams: -(repeated n-grams / all n-grams), in [-1, 0].

    0 for text without repeats (or shorter than n words); degenerate loops approach -1.
    """
    if n < 1:
        raise ValueError("no_repeat reward: n must be >= 1")

    def no_repeat(prompts: list, completions: list[str | Messages], **columns: Any) -> list[float]:
        scores = []
        for completion in completions:
            words = completion_text(completion).lower().split()
            grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
            scores.append(-(len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
        return scores

    return no_repeat


# Gold answers written as bare LaTeX or algebra ("x^2+1", "\sqrt{2}") are not found by math-verify's
# default (anchor-free) parse, so they are parsed again as if boxed; a plain word ("Paris") is not.
_MATH_MARKUP = re.compile(r"[\\^_{}=+*/-]")


def _math_verify_timeouts() -> tuple[int | None, int | None]:
    """(parse, verify) timeouts in seconds, as TRL's accuracy_reward sets them. math-verify times out
    with signal.alarm, which only the main thread may call: elsewhere (a reward thread pool, a server
    handler) timeouts are off and math-verify's warnings that say so are silenced."""
    if threading.current_thread() is threading.main_thread():
        return 10, 5
    logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    return None, None


def make_exact_answer(column: str = "answer", pattern: str | None = None) -> RewardFn:
    """1.0 when the completion's final answer is mathematically equal to the dataset column, else
    0.0; None where the gold answer does not parse. In {0, 1} (or None).

    Both sides go through math-verify (``parse`` then ``verify``), as TRL's ``accuracy_reward`` does:
    "1/2", "\\frac{1}{2}" and "0.5" are equal; "50%" equals "50" and "0.5"; "$3.50" equals "3.5";
    "1,000" equals "1000"; "1+x^2" equals "x^2+1". The gold (column ``column``: a number, "42",
    "\\frac{1}{2}", "$x^2+1$", "#### 72", ...) is parsed with math-verify's defaults; a gold with math
    markup that they miss ("x^2+1", "\\sqrt{2}") is parsed again as ``\\boxed{gold}``.

    The completion's answer is its first ``\\boxed{...}``, else what follows an anchor such as
    "answer is" / "answer:" / "final answer" (math-verify's ``first_match`` mode with
    ``try_extract_without_anchor=False``, TRL's settings plus plain-expression answers). A bare number
    with no anchor ("I think 7 then 9") is no answer (0.0): taking the last number would let a list
    of numbers guess. Several answers do not win: ``\\boxed{1} \\boxed{5}`` or ``\\boxed{5 or 6}``
    parse as the set {1, 5} / {5, 6}, which is not 5; after "the answer is 1, 2, 5" only the
    first number counts.

    ``pattern``: a regex (DOTALL) whose group 1 (the whole match if it has no group) is the answer;
    its last match is parsed as ``\\boxed{group}`` and verified. No match scores 0.0.

    A gold that does not parse (text such as "Paris", an empty cell) gives None, "not applicable",
    as in TRL: the sample is left out of this reward instead of scoring every completion 0.
    """
    try:
        from latex2sympy2_extended import NormalizationConfig
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError:
        raise ImportError("exact_answer reward needs math-verify: pip install 'math-verify>=0.7'") from None
    try:
        regex = re.compile(pattern, re.DOTALL) if pattern is not None else None
    except re.error as exc:
        raise ValueError(f"exact_answer reward: bad pattern {pattern!r}: {exc}") from None
    latex = LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
                                  try_extract_without_anchor=False)
    answer_config = [latex, ExprExtractionConfig(try_extract_without_anchor=False)]

    def parse_gold(gold: str, timeout: int | None) -> list:
        parsed = parse(gold, parsing_timeout=timeout)
        if not parsed and _MATH_MARKUP.search(gold):
            parsed = parse(f"\\boxed{{{gold}}}", extraction_config=[latex], parsing_timeout=timeout)
        return parsed

    def parse_answer(text: str, timeout: int | None) -> list:
        if regex is None:
            return parse(text, extraction_config=answer_config, extraction_mode="first_match", parsing_timeout=timeout)
        matches = list(regex.finditer(text))
        if not matches:
            return []
        found = matches[-1].group(1) if regex.groups else matches[-1].group(0)
        return parse(f"\\boxed{{{found}}}", extraction_config=[latex], parsing_timeout=timeout)

    def exact_answer(prompts: list, completions: list[str | Messages], **columns: Any) -> list[float | None]:
        if column not in columns:
            raise KeyError(f"exact_answer needs the dataset column {column!r}; columns here: {sorted(columns)}")
        parse_timeout, verify_timeout = _math_verify_timeouts()
        golds: dict[str, list] = {}  # a GRPO group repeats its gold: parse it once
        scores: list[float | None] = []
        for completion, expected in zip(completions, columns[column]):
            key = str(expected).strip()
            if key not in golds:
                golds[key] = parse_gold(key, parse_timeout)
            if not golds[key]:
                scores.append(None)
                continue
            answer = parse_answer(completion_text(completion), parse_timeout)
            scores.append(float(bool(answer) and verify(golds[key], answer, timeout_seconds=verify_timeout)))
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
