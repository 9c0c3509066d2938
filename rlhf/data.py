"""Prompt datasets: files, `datasets` dirs or the built-in set; chat templates; resumable order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import torch

from rlhf.errors import ConfigError, DataError
from rlhf.paths import looks_local

# Package data lives in rlhf/data/ next to this module (a plain folder, not a package).
BUILTIN_DIR = Path(__file__).parent / "data"
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = {
    "prompts": {"train": "prompts_train.jsonl", "eval": "prompts_eval.jsonl"},
    "preferences": {"train": "preferences_train.jsonl", "eval": "preferences_eval.jsonl"},
    # Arithmetic in TRL's conversational prompt-only format with a `solution` column (what
    # trl.rewards.accuracy_reward and our exact_answer with column: solution read).
    "math": {"train": "math_train.jsonl", "eval": "math_eval.jsonl"},
    # Episodes (rlhf.examples): arithmetic for the calculator tool (`solution` column), and games
    # of the number-guessing environment (`secret`, `low`, `high` columns for its reset).
    "calculator": {"train": "calculator_train.jsonl", "eval": "calculator_eval.jsonl"},
    "guess": {"train": "guess_train.jsonl", "eval": "guess_eval.jsonl"},
}
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _builtin_file(name: str, split: str) -> Path:
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset {name!r}; available: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)}")
    files = BUILTIN_DATASETS[name]
    if split not in files:
        raise DataError(f"built-in dataset {name!r} has splits {', '.join(files)}, not {split!r}")
    return BUILTIN_DIR / files[split]


def _load_any(spec: Any, split: str, config_name: str | None = None) -> datasets.Dataset:
    """A dataset from a ``datasets.Dataset`` object, ``builtin:<name>``, a local file or dir, or
    the Hugging Face hub (any name that is not a local path), as one split."""
    datasets.disable_progress_bars()
    if isinstance(spec, (datasets.DatasetDict, datasets.Dataset)):
        return _pick_split(spec, split, "the given DatasetDict")
    if isinstance(spec, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError("streaming (iterable) datasets are not supported: the prompt order is resumable only over "
                        "a map-style dataset; load it without streaming=True")
    if not isinstance(spec, str):
        raise DataError(f"dataset must be a path, a hub id, builtin:<name> or a datasets.Dataset, got {type(spec).__name__}")
    if spec.startswith(BUILTIN_PREFIX) or spec in BUILTIN_DATASETS:
        return _load_file(_builtin_file(spec.removeprefix(BUILTIN_PREFIX), split))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_dir(path, split, config_name)
    if path.is_file():
        return _load_file(path)
    if looks_local(spec):
        raise DataError(f"dataset not found: {spec} (give a .jsonl/.json/.csv/.parquet file, a dir, builtin:<name>, "
                        "or a Hugging Face hub dataset id)")
    return _load_hub(spec, split, config_name)


def _load_hub(name: str, split: str, config_name: str | None) -> datasets.Dataset:
    """``datasets.load_dataset(name, config_name, split=split)`` with one-line errors."""
    try:
        return datasets.load_dataset(name, config_name, split=split)
    except ConnectionError as exc:  # also raised offline (HF_HUB_OFFLINE=1), before any request
        raise DataError(f"dataset {name!r} is not a local file or dir, so it was looked up as a Hugging Face hub "
                        f"dataset, and the hub cannot be reached ({str(exc).splitlines()[0]}); where there is network, "
                        f"save it with datasets.load_dataset({', '.join(map(repr, [name, config_name] if config_name else [name]))})"
                        ".save_to_disk(DIR) and pass DIR") from None
    except datasets.exceptions.DatasetNotFoundError:
        raise DataError(f"dataset not found: {name} is neither a local file or dir nor a dataset on the Hugging Face "
                        "hub (private? log in with `hf auth login`)") from None
    except ValueError as exc:  # unknown split or config name: datasets lists the valid ones
        raise DataError(f"hub dataset {name}: {str(exc).splitlines()[0]} (set dataset_split / dataset_config)") from None


def _pick_split(loaded: Any, split: str, where: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"dataset {where} has splits {', '.join(loaded)}, not {split!r}; set dataset_split "
                            "(training) or eval_dataset_split (evaluation)")
        return loaded[split]
    return loaded


def load_preference_dataset(spec: str, split: str = "train") -> datasets.Dataset:
    """Preference pairs in any of TRL's preference formats, returned with an explicit prompt
    (columns prompt, chosen, rejected, nothing else):

    - standard, explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``
    - conversational, explicit prompt: ``prompt`` a list of messages, ``chosen`` / ``rejected`` the
      assistant's messages
    - implicit prompt (no prompt column, or a text prompt beside conversational replies): the
      shared beginning of chosen and rejected is the prompt, as TRL's ``maybe_extract_prompt``
      finds it (``trl-lib/ultrafeedback_binarized``, ``Anthropic/hh-rlhf`` style), text cut
      between words (``_extract_prompt``)
    """
    dataset = _preference_split(spec, split)
    missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise DataError(f"preference dataset {spec} lacks column(s) {', '.join(missing)}; it needs chosen and rejected, "
                        "and prompt unless both begin with it (TRL's preference formats)")
    if len(dataset) == 0:
        raise DataError(f"preference dataset {spec} has no rows")
    dataset = dataset.select_columns([c for c in PREFERENCE_COLUMNS if c in dataset.column_names])
    first = None
    for index, row in enumerate(dataset):  # checked before the prompt is extracted: the rows as the file holds them
        form = _check_preference_row(row, f"preference dataset {spec} row {index}")
        first = first or form
        if form != first:  # one form for every row: how the pairs are framed is decided once
            raise DataError(f"preference dataset {spec} row {index} is {form}, row 0 {first}; use one form for every row")
    if "prompt" not in dataset.column_names or isinstance(dataset[0]["prompt"], str) != isinstance(dataset[0]["chosen"], str):
        dataset = dataset.map(_extract_prompt, remove_columns=dataset.column_names)
        for index, row in enumerate(dataset):
            if not _is_valid_prompt(row["prompt"]) or not row["chosen"] or not row["rejected"] \
                    or row["chosen"] == row["rejected"]:
                raise DataError(f"preference dataset {spec} row {index}: chosen and rejected must begin with the same "
                                "prompt and then differ (no prompt column, so the prompt is their shared beginning"
                                f"{', up to a space between words' if isinstance(row['chosen'], str) else ''}), "
                                f"got prompt {str(row['prompt'])[:60]!r}")
    return dataset


def _preference_split(spec: str, split: str) -> datasets.Dataset:
    """``split`` of a preference dataset; held-out pairs ("eval") of a dataset with splits come from
    its eval, test or validation split, whichever it has (DPO and reward-model training have no
    split setting: a hub-style DatasetDict holds train and test)."""
    names = (split, "test", "validation") if split == "eval" else (split,)
    for name in names[:-1]:
        try:
            return _load_any(spec, name)
        except DataError as exc:
            if "has splits" not in str(exc):
                raise
    try:
        return _load_any(spec, names[-1])
    except DataError as exc:
        if "has splits" not in str(exc) or len(names) == 1:
            raise
        raise DataError(f"preference dataset {spec} has no split named {', '.join(names[:-1])} or {names[-1]} "
                        "for the held-out pairs; save those as a dataset of their own and give it as --eval_dataset") from None


def _extract_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """TRL's ``maybe_extract_prompt``, with text cut between words: TRL's shared beginning of two
    texts ends where they first differ, mid-word ("...Assistant: Blue" / "...Assistant: Bright" ->
    prompt "...Assistant: B"), and the prompt and reply are framed apart here (a chat turn or a
    separator between them). The cut moves back to the last space of the shared beginning."""
    from trl.data_utils import maybe_extract_prompt

    pair = maybe_extract_prompt(row)
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if isinstance(prompt, str) and prompt and not prompt[-1].isspace() \
            and chosen[:1].strip() and rejected[:1].strip():  # both replies go on mid-word
        cut = max(prompt.rfind(" "), prompt.rfind("\n"), prompt.rfind("\t")) + 1
        prompt, chosen, rejected = prompt[:cut], prompt[cut:] + chosen, prompt[cut:] + rejected
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def preference_conversations(pairs: datasets.Dataset) -> datasets.Dataset:
    """prompt/chosen/rejected strings -> TRL's conversational format, so the chat template the
    RL rollouts use (``format_prompt``) also frames the pairs in DPO and reward-model training;
    conversational pairs stay as they are."""
    if not isinstance(pairs[0]["chosen"], str):
        return pairs
    return pairs.map(lambda row: {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }, remove_columns=[c for c in pairs.column_names if c not in ("prompt", "chosen", "rejected")])


def _check_preference_row(row: dict[str, Any], where: str) -> str:
    """Every column a non-empty string, or every column a list of {role, content} messages (a text
    prompt may stand beside message replies: TRL then reads the prompt from the replies). Returns
    the row's form, for the check that all rows share it."""
    conversational = isinstance(row["chosen"], list)
    for column in PREFERENCE_COLUMNS:
        if column not in row or (column == "prompt" and conversational and isinstance(row[column], str)):
            continue
        value = row[column]
        if not isinstance(value, (str, list)):
            raise DataError(f"{where}: {column} must be a non-empty string or a list of {{role, content}} messages, "
                            f"got {type(value).__name__} {str(value)[:40]!r}")
        if isinstance(value, list) != conversational:
            raise DataError(f"{where}: {column} is {'chat messages' if isinstance(value, list) else 'a string'} "
                            f"but chosen is {'chat messages' if conversational else 'a string'}; use one form for "
                            "chosen, rejected and prompt")
        if not _is_valid_prompt(value):
            raise DataError(f"{where}: {column} must be a non-empty string or a list of {{role, content}} messages "
                            f"with non-empty content, got {str(value)[:60]!r}")
    text_prompt = "prompt" in row and isinstance(row["prompt"], str)
    return ("chat messages" + (" beside a text prompt" if text_prompt else "")) if conversational else "strings"


def load_prompt_dataset(spec: Any, split: str = "train", prompt_column: str = "prompt",
                        config_name: str | None = None) -> datasets.Dataset:
    """Load prompts (a file, a dir, ``builtin:<name>``, a hub id or a ``datasets.Dataset``) and check them.

    TRL's prompt-only formats: every row's ``prompt_column`` holds a non-empty string or a list of
    chat messages ({"role", "content"}); other columns are kept and reach reward functions as
    keyword args.
    """
    dataset = _load_any(spec, split, config_name)
    _check_prompts(dataset, prompt_column, describe_dataset(spec))
    return dataset


def describe_dataset(spec: Any) -> str:
    """How messages and config.yaml name a dataset: its spec, or a Dataset object's shape."""
    if isinstance(spec, str):
        return spec
    rows = getattr(spec, "num_rows", "?")
    return f"<{type(spec).__name__} {rows} rows>"


def _load_file(path: Path) -> datasets.Dataset:
    loader = FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DataError(f"unsupported dataset file type {path.suffix!r} for {path}; use one of {', '.join(FILE_LOADERS)}")
    if path.suffix.lower() == ".jsonl":
        _check_jsonl_lines(path)
    try:
        return datasets.load_dataset(loader, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parser errors in many types; all mean a malformed file
        cause = exc.__cause__ or exc
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise DataError(f"cannot read dataset {path}: {first_line}") from None


def _check_jsonl_lines(path: Path) -> None:
    """Name the file and line of the first malformed row (the datasets parser reports neither)."""
    rows = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON row ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            rows += 1
    if rows == 0:
        raise DataError(f"dataset {path} has no rows")


def _load_dir(path: Path, split: str, config_name: str | None = None) -> datasets.Dataset:
    """A dir written by ``save_to_disk``, else a dir of data files (train.jsonl, data/test-*.parquet,
    ...) through datasets' folder loaders, which map file names to splits."""
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path} is not a directory saved by datasets.save_to_disk: {str(exc).splitlines()[0]}") from None
        return _pick_split(loaded, split, str(path))
    try:
        loaded = datasets.load_dataset(str(path), config_name)
    except Exception as exc:  # no data files, mixed formats, a parser error: all mean "not a dataset dir"
        first_line = (str(exc.__cause__ or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read dataset dir {path}: {first_line} (a dir needs .jsonl/.json/.csv/.parquet files "
                        "or to be written by datasets' save_to_disk)") from None
    return _pick_split(loaded, split, str(path))


def _check_prompts(dataset: datasets.Dataset, prompt_column: str, spec: str) -> None:
    if prompt_column not in dataset.column_names:
        raise DataError(
            f"dataset {spec} has no column {prompt_column!r} (columns: {', '.join(dataset.column_names)}); set prompt_column"
        )
    if len(dataset) == 0:
        raise DataError(f"dataset {spec} has no rows")
    prompts = dataset[prompt_column]
    for index, prompt in enumerate(prompts):
        if not _is_valid_prompt(prompt):
            raise DataError(
                f"dataset {spec} row {index}: {prompt_column!r} must be a non-empty string or a list of "
                f"{{role, content}} messages with non-empty content, got {str(prompt)[:60]!r}"
            )
        if isinstance(prompt, str) != isinstance(prompts[0], str):  # rewards get one form per batch
            kinds = ("a string", "chat messages") if isinstance(prompts[0], str) else ("chat messages", "a string")
            raise DataError(f"dataset {spec}: row 0's {prompt_column!r} is {kinds[0]} but row {index}'s is {kinds[1]}; "
                            "use one form for every row")


def _is_valid_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                and bool(m["content"].strip()) for m in prompt)  # empty messages, like empty strings, are no prompt
    )


def adds_special_tokens(tokenizer: Any) -> bool:
    """Whether a prompt's text (``format_prompt``'s) is tokenised with the tokenizer's own special
    tokens (a base model's BOS): plain text is, as TRL and transformers tokenise a prompt that is
    not a chat; a chat template writes its special tokens into the text itself, which is then
    tokenised as it is (a second BOS otherwise)."""
    return not tokenizer.chat_template


def check_room_for_prompt(tokenizer: Any, max_prompt_length: int) -> None:
    """ConfigError where ``max_prompt_length`` holds no more than the special tokens the tokenizer
    adds to a plain-text prompt (``adds_special_tokens``): transformers cannot cut a prompt below
    them and then passes it whole, uncut, or keeps only them."""
    count = getattr(tokenizer, "num_special_tokens_to_add", None)  # tokenizers have it (a processor may not)
    special = count() if count is not None and adds_special_tokens(tokenizer) else 0
    if max_prompt_length <= special:
        raise ConfigError(f"max_prompt_length {max_prompt_length} leaves no room for a prompt: the tokenizer adds "
                          f"{special} special token(s) (its BOS/EOS) to each one; raise max_prompt_length")


def format_prompt(prompt: str | list[dict[str, str]], tokenizer: Any) -> str:
    """Text the policy sees: the chat template with a generation prompt when the tokenizer has
    one (plain strings become one user message), else the raw string.

    Messages ending in an assistant message are a prefill: the response continues that message
    (TRL's continue_final_message) instead of opening a new turn. A template that rejects the
    system role (Gemma's raises 'System role not supported') gets the system message folded into
    the first user message, as Gemma's own templates do with it.
    """
    if tokenizer.chat_template:
        from jinja2 import TemplateError

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            return _apply_template(tokenizer, messages)
        except TemplateError:
            if not messages or messages[0]["role"] != "system":
                raise
        system, rest = messages[0]["content"], list(messages[1:])
        if rest and rest[0]["role"] == "user":
            rest[0] = {**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}
        else:
            rest.insert(0, {"role": "user", "content": system})
        return _apply_template(tokenizer, rest)
    if isinstance(prompt, str):
        return prompt
    ends_in_prefill = prompt[-1]["role"] == "assistant"
    lines = [f"{m['role']}: {m['content']}" for m in prompt]
    return "\n".join(lines) if ends_in_prefill else "\n".join(lines) + "\nassistant:"


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if messages and messages[-1]["role"] == "assistant":
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_text(prompt: str | list[dict[str, str]]) -> str:
    """The user's words without template, as reward functions receive them (TRL convention)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


class PromptSampler:
    """Yields global batches of dataset indices in a seeded order, reshuffled every epoch.

    The order depends only on (seed, epoch), and the state is just (epoch, position), so a
    resumed run sees exactly the prompts the uninterrupted run would have seen.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int):
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.position : self.position + self.batch_size - len(batch)]
            batch.extend(take)
            self.position += len(take)
            if self.position >= self.dataset_size:
                self.epoch += 1
                self.position = 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def prompt_token_lengths(prompts: list[Any], tokenizer: Any) -> list[int]:
    """Tokens of each prompt as the rollout feeds it (``format_prompt``, then ``adds_special_tokens``)."""
    texts = [format_prompt(prompt, tokenizer) for prompt in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=adds_special_tokens(tokenizer))["input_ids"]]


def check_prompt_lengths(dataset: datasets.Dataset, tokenizer: Any, config: Any, name: str, warn: bool,
                         episodes: Any = None) -> None:
    """Count prompts that max_prompt_length cuts (their beginning would silently disappear):
    refused with prompt_overflow error, else a warning (when ``warn``) with the count.
    ``episodes`` (rlhf.episodes.ToolEpisodes): prompts are measured as episodes render them, with
    the tools' schemas the chat template writes into them."""
    import warnings

    check_room_for_prompt(tokenizer, config.max_prompt_length)
    if episodes is not None:
        lengths = [episodes.prompt_length(row, config.prompt_column) for row in dataset]
    else:
        lengths = prompt_token_lengths(dataset[config.prompt_column], tokenizer)
    too_long = [i for i, length in enumerate(lengths) if length > config.max_prompt_length]
    if not too_long:
        return
    first = f"first: row {too_long[0]}, {lengths[too_long[0]]} tokens"
    if config.prompt_overflow == "error":
        raise DataError(f"{len(too_long)} of {len(lengths)} prompts in {name} are longer than max_prompt_length "
                        f"{config.max_prompt_length} tokens ({first}); raise max_prompt_length or set "
                        "prompt_overflow: truncate")
    if warn:
        warnings.warn(f"{len(too_long)} of {len(lengths)} prompts in {name} are longer than max_prompt_length "
                      f"{config.max_prompt_length} tokens ({first}) and lose their beginning; raise "
                      "max_prompt_length, or set prompt_overflow: error to refuse them", stacklevel=2)


def load_eval_dataset(config: Any, eval_dataset: Any = None) -> datasets.Dataset:
    """Prompts for periodic evaluation: ``eval_dataset`` (a Dataset given to the trainer) or the
    config's eval_dataset, each in split eval_dataset_split (default dataset_split); else the
    eval_dataset_split of dataset itself (default: 'eval' for built-ins, 'test' otherwise)."""
    from rlhf.errors import ConfigError

    given = eval_dataset if eval_dataset is not None else config.eval_dataset
    if given is not None:
        return load_prompt_dataset(given, config.eval_dataset_split or config.dataset_split, config.prompt_column,
                                   config.dataset_config)
    split = default_eval_split(config.dataset)
    if split is None:
        raise ConfigError("eval_steps > 0 needs eval_dataset (prompts to evaluate on) when dataset is a single file "
                          "or a Dataset; or give a dataset with a test split (eval_dataset_split)")
    return load_prompt_dataset(config.dataset, config.eval_dataset_split or split, config.prompt_column,
                               config.dataset_config)


def default_eval_split(spec: Any) -> str | None:
    """The held-out split of ``spec`` that evaluations read unless a split is named: 'eval' of a
    built-in set, 'test' of a dir, a hub dataset or a DatasetDict; None for a single file or a
    Dataset, which have no splits to choose from."""
    if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX):
        return "eval"
    if (isinstance(spec, str) and Path(spec).is_file()) or not isinstance(spec, (str, datasets.DatasetDict)):
        return None
    return "test"
