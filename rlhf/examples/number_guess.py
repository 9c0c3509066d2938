"""A number-guessing environment for ``--environment rlhf/examples/number_guess.py:NumberGuess``,
with the prompt set ``rlhf/data/guess_train.jsonl`` (a ``secret`` column per row).

The model calls ``guess(number)`` and hears "higher", "lower" or "correct". Turn rewards (the
``{"observation", "reward"}`` form, rlhf.episodes.tools): -0.1 for each wrong guess, 0 for the
right one; the episode reward ``get_reward()`` (TRL's) pays 1.0 when the number was found. So an
episode that finds it in k guesses earns 1 - 0.1 (k - 1).
"""

from __future__ import annotations

from typing import Any

WRONG_GUESS = -0.1


class NumberGuess:
    """One game: a secret integer in [low, high] and the guesses made so far."""

    def __init__(self) -> None:
        self.secret = 0
        self.low, self.high = 1, 100
        self.solved = False
        self.guesses = 0

    def reset(self, secret: int = 50, low: int = 1, high: int = 100, **row: Any) -> str:
        self.secret, self.low, self.high = int(secret), int(low), int(high)
        self.solved = False
        self.guesses = 0
        return f"\nThe secret number is between {self.low} and {self.high}."

    def guess(self, number: int) -> dict[str, Any]:
        """Guess the secret number.

        Args:
            number: Your guess, a whole number in the announced range.

        Returns:
            "higher" if the secret number is larger, "lower" if it is smaller, "correct" if it is the number.
        """
        if self.solved:
            return {"observation": "the game is over: you already found the number", "reward": 0.0}
        self.guesses += 1
        if int(number) == self.secret:
            self.solved = True
            return {"observation": "correct", "reward": 0.0}
        return {"observation": "higher" if self.secret > int(number) else "lower", "reward": WRONG_GUESS}

    def get_reward(self) -> float:
        return 1.0 if self.solved else 0.0
