"""A learned reward model: any sequence-classification model with one output logit.

Text is built the way TRL's RewardTrainer built it in training: with the model's chat template
(user prompt + assistant completion) when it has one, else ``prompt + separator + completion +
eos``. Prompts and completions in TRL's conversational form (message lists) go through the chat
template as prompt messages + completion messages, as TRL's GRPOTrainer scores them with a reward
model; without a template their contents are joined. ``scripts/train_reward_model.py`` writes
``rlhf_reward_model.json`` next to the weights with that separator and the score mean/std of a
calibration pass, used when ``normalize`` is on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from reward_models.builtins import Messages, completion_text, content_text
from rlhf.errors import RewardError

METADATA_FILE = "rlhf_reward_model.json"


class LearnedReward:
    def __init__(self, name_or_path: str, device: str | torch.device | None = None, batch_size: int = 16,
                 max_length: int = 512, normalize: bool = False):
        from safetensors import SafetensorError
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
        except (OSError, ValueError, SafetensorError, TypeError, AttributeError) as exc:
            raise RewardError(f"cannot load reward model {name_or_path!r}: {str(exc).splitlines()[0]}") from None
        self._setup(name_or_path, model, tokenizer, device, batch_size, max_length, normalize)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any = None, device: str | torch.device | None = None,
                   batch_size: int = 16, max_length: int = 512, normalize: bool = False) -> "LearnedReward":
        """A loaded sequence-classification model as a reward (TRL's reward_funcs take one); its
        tokenizer comes from the model's name_or_path unless given."""
        from transformers import AutoTokenizer

        name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except (OSError, ValueError, TypeError):
                raise RewardError(f"reward model object {type(model).__name__}: no tokenizer at its name_or_path "
                                  f"{name!r}; save model and tokenizer to a dir and pass that dir") from None
        reward = cls.__new__(cls)
        reward._setup(name or type(model).__name__, model, tokenizer, device, batch_size, max_length, normalize)
        return reward

    def _setup(self, name_or_path: str, model: Any, tokenizer: Any, device: str | torch.device | None,
               batch_size: int, max_length: int, normalize: bool) -> None:
        self.__name__ = Path(name_or_path).name or name_or_path
        self.tokenizer, self.model = tokenizer, model
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != 1:
            raise RewardError(f"reward model {name_or_path!r} has {num_labels} outputs; it needs exactly 1")
        if tokenizer.pad_token_id is None:  # GPT-2-style tokenizers: batches pad with EOS, as TRL's GRPOTrainer does
            if tokenizer.eos_token is None:
                raise RewardError(f"reward model {name_or_path!r}: its tokenizer has neither a pad nor an EOS token "
                                  "to pad a batch with; set tokenizer.pad_token and save it")
            tokenizer.pad_token = tokenizer.eos_token
        # the model scores the last token that is not padding, found through its config's pad id (TRL sets it so)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        text_config.pad_token_id = tokenizer.pad_token_id
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        metadata_path = Path(name_or_path) / METADATA_FILE
        self.metadata: dict[str, Any] = {}
        if metadata_path.exists():  # written by scripts/train_reward_model.py
            try:
                self.metadata = json.loads(metadata_path.read_text())
            except (OSError, ValueError) as exc:
                raise RewardError(f"cannot read {metadata_path}: {exc}; restore it from the reward model's "
                                  "training, or delete it (normalize needs it)") from None
            if not isinstance(self.metadata, dict):
                raise RewardError(f"{metadata_path} must be a JSON object, got {type(self.metadata).__name__}")
        self.separator = self.metadata.get("prompt_separator", "\n")
        self.normalize = normalize
        if normalize and not {"score_mean", "score_std"} <= self.metadata.keys():
            raise RewardError(
                f"reward model {name_or_path!r} has no calibration ({METADATA_FILE} with score_mean/score_std); "
                "train it with scripts/train_reward_model.py or set normalize: false"
            )

    def format(self, prompt: str | Messages, completion: str | Messages) -> str:
        if self.tokenizer.chat_template:
            messages = _as_messages(prompt, "user") + _as_messages(completion, "assistant")
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        eos = self.tokenizer.eos_token or ""
        return plain_prompt(prompt) + self.separator + completion_text(completion) + eos

    def encode(self, texts: list[str]) -> Any:
        """``format``'s texts as token ids, as TRL's RewardTrainer tokenised them in training: text
        from a chat template as it is (the template writes its special tokens; ``tokenize=True``
        adds none), plain text with the tokenizer's special tokens ([CLS]/[SEP], a BOS)."""
        # padded on the right, as TRL's GRPOTrainer pads reward inputs: a model with learned absolute
        # positions (GPT-2) would score a left-padded text at other positions than alone
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                              add_special_tokens=not self.tokenizer.chat_template, padding_side="right")

    @torch.no_grad()
    def __call__(self, prompts: list[str | Messages], completions: list[str | Messages], **columns: Any) -> list[float]:
        texts = [self.format(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.encode(texts[start:start + self.batch_size]).to(self.device)
            scores.extend(self.model(**encoded).logits[:, 0].float().tolist())
        if self.normalize:
            mean, std = self.metadata["score_mean"], self.metadata["score_std"]
            scores = [(s - mean) / max(std, 1e-6) for s in scores]
        return scores


def plain_prompt(prompt: str | Messages) -> str:
    """A prompt as the text a reward model without a chat template reads: a message list's
    contents joined by newlines."""
    return prompt if isinstance(prompt, str) else "\n".join(content_text(m.get("content")) for m in prompt)


def _as_messages(text_or_messages: str | Messages, role: str) -> Messages:
    if isinstance(text_or_messages, str):
        return [{"role": role, "content": text_or_messages}]
    return list(text_or_messages)
