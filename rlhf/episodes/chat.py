"""The chat template's side of an episode: is it able to hold tool calls, the prompt's token ids,
and the tokens it puts between a sampled turn and the next one (tool results and glue).

Sampled tokens never pass through here: the template renders only what the model did not write.
"""

from __future__ import annotations

from typing import Any

from rlhf.errors import ConfigError

Messages = list[dict[str, Any]]


def resolve_chat_template(spec: str) -> str:
    """A chat_template setting -> the template text: a .jinja file, the name of one of TRL's
    templates (``qwen3`` -> trl/chat_templates/qwen3.jinja), or the template text itself."""
    from pathlib import Path

    if "{%" in spec or "{{" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"chat_template {spec} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    import trl

    shipped = Path(trl.__file__).parent / "chat_templates"
    named = shipped / f"{spec.removesuffix('.jinja')}.jinja"
    if named.is_file():
        return named.read_text()
    known = sorted(p.stem for p in shipped.glob("*.jinja") if not p.stem.endswith("_training"))
    raise ConfigError(f"chat_template {spec!r} is neither a file nor one of TRL's templates ({', '.join(known[:12])}, ...)")


def prepare_tool_template(tokenizer: Any, chat_template: str | None = None) -> str | None:
    """Make ``tokenizer`` ready for tool episodes, once per run; returns the template to render
    episodes with (None: the tokenizer's own).

    ``chat_template``: a template to use instead of the tokenizer's (e.g. the text of one of
    ``trl/chat_templates/*.jinja`` for a model whose own template has no tools); it is set on the
    tokenizer. Then, as TRL's GRPOTrainer does: the template must render a whole tool exchange
    (``supports_tool_calling``), else ConfigError in one line; the tokenizer gets a response parser
    for tool calls (``add_response_schema``) unless it has one; and a template that is not
    prefix-preserving (Qwen3's drops the think block of earlier turns) is replaced for rendering
    by TRL's training variant, because a turn's suffix is read off the difference of two renderings.
    """
    from trl.chat_template_utils import (add_response_schema, get_training_chat_template,
                                         is_chat_template_prefix_preserving, supports_tool_calling)

    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not supports_tool_calling(tokenizer):
        raise ConfigError("the chat template cannot render tool calls (user -> assistant with tool_calls -> tool); "
                          "give a tool-capable chat_template, e.g. trl/chat_templates/qwen3.jinja")
    if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
        try:
            add_response_schema(tokenizer)
        except ValueError:
            raise ConfigError("no tool-call parser is known for this chat template; set tokenizer.response_template "
                              "(transformers' chat response parsing) or use a template from trl/chat_templates"
                              ) from None
    if is_chat_template_prefix_preserving(tokenizer):
        return None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        raise ConfigError("the chat template renders earlier turns differently once a tool result follows (not "
                          "prefix-preserving) and TRL has no training variant of it; give a prefix-preserving "
                          "chat_template") from None


def render_ids(tokenizer: Any, messages: Messages, *, tools: list[dict[str, Any]] | None, chat_template: str | None,
               add_generation_prompt: bool, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of ``messages`` under the chat template: the text rendered, then tokenised without
    added special tokens (as rlhf.rollout tokenises prompts). ``tools or None``: Llama's template
    writes tool boilerplate even for an empty list (TRL's note)."""
    text = tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **(template_kwargs or {}))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tool_suffix_ids(tokenizer: Any, conversation: Messages, tool_messages: Messages, *,
                    tools: list[dict[str, Any]] | None, chat_template: str | None, stop_ids: list[int],
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The tokens the template puts after a sampled turn that called tools: the tool results, the
    glue around them and the next generation prompt.

    ``conversation``: the prompt's messages and the episode's messages up to and including the
    assistant message that made the calls; ``tool_messages``: their results. The conversation is
    rendered without and with the tool messages (+ generation prompt); the rendering without them
    is cut after its last stop token (Qwen's "<|im_end|>\\n": the sampled turn ended at
    <|im_end|>, the newline is glue) and must then be a prefix of the other (the template is
    prefix-preserving, as TRL checks); the difference is the suffix. RuntimeError otherwise.
    """
    before = render_ids(tokenizer, conversation, tools=tools, chat_template=chat_template,
                        add_generation_prompt=False, template_kwargs=template_kwargs)
    after = render_ids(tokenizer, conversation + tool_messages, tools=tools, chat_template=chat_template,
                       add_generation_prompt=True, template_kwargs=template_kwargs)
    stops = set(stop_ids)
    ends = [i for i, token in enumerate(before) if token in stops]
    if ends:
        before = before[: ends[-1] + 1]
    if after[: len(before)] != before:
        raise RuntimeError("the chat template rendered the conversation differently once tool results were added "
                           "(not prefix-preserving); the tool tokens of this turn cannot be told apart")
    return after[len(before):]
