"""Built-in reward functions, each ``fn(prompts, completions, **columns) -> list[float]``."""

from __future__ import annotations

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


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "sentiment": sentiment,
}
