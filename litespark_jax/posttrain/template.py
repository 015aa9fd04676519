"""Chat templates: a conversation -> token ids plus a mask of the tokens the model is trained to produce.

A template is a few special-token strings around each turn. ``llama3`` (the default) renders

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|>

like Meta's Llama-3 instruct template. The target mask covers exactly the assistant turns' content and their
end-of-turn token (so the model learns to stop); headers, system and user turns are context only.

Special tokens: when the tokenizer knows the string as one token (a Llama-3 tokenizer does), its id is used;
otherwise the template assigns ids after the tokenizer's vocabulary (``vocab_size``, ``vocab_size + 1``, ...), so
``model.vocab_size`` must leave room for them (``TemplateTokens.check_vocab``). The text inside a turn is encoded
with the tokenizer's ordinary ``encode`` and never parsed for special tokens, so user text cannot inject them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from litespark_jax.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str
    begin: str | None
    """Special token opening a conversation (None: the tokenizer's BOS id, when it has one)."""
    header_start: str
    header_end: str
    """Special tokens around the role name."""
    header_suffix: str
    """Plain text after the header (llama3: a blank line)."""
    end_of_turn: str
    """Special token closing every turn (trained on after assistant content)."""
    roles: tuple[str, ...] = ROLES

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.begin, self.header_start, self.header_end, self.end_of_turn) if t)


TEMPLATES = {
    "llama3": ChatTemplate("llama3", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "\n\n",
                           "<|eot_id|>"),
    "chatml": ChatTemplate("chatml", None, "<|im_start|>", "\n", "", "<|im_end|>"),
}
# chatml's header_end is a newline, plain text; handled as a non-special piece below.
_PLAIN_PIECES = {"\n"}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"posttrain.template must be one of {', '.join(TEMPLATES)}, got {name!r}")
    return TEMPLATES[name]


def _token_id(tokenizer, text: str) -> int | None:
    """The tokenizer's id of ``text`` as one special token, or None."""
    inner = getattr(tokenizer, "_tok", None)  # data.tokenizers.HuggingFaceTokenizer wraps a `tokenizers` object
    for owner, attr in ((tokenizer, "token_to_id"), (inner, "token_to_id")):
        fn = getattr(owner, attr, None) if owner is not None else None
        if fn is not None:
            try:
                value = fn(text)
            except (KeyError, ValueError):
                value = None
            if value is not None:
                return int(value)
    return None


class TemplateTokens:
    """A template bound to a tokenizer: special ids resolved once, encoded role headers cached."""

    def __init__(self, template: ChatTemplate, tokenizer, system_prompt: str | None = None):
        self.template = template
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.special_ids: dict[str, int] = {}
        next_id = int(tokenizer.vocab_size)
        for text in template.special_tokens:
            if text in _PLAIN_PIECES:
                continue
            token = _token_id(tokenizer, text)
            if token is None and text == template.begin and getattr(tokenizer, "bos_id", -1) >= 0:
                token = int(tokenizer.bos_id)
            if token is None:
                token, next_id = next_id, next_id + 1
            self.special_ids[text] = token
        self.vocab_size = max([int(tokenizer.vocab_size), *[i + 1 for i in self.special_ids.values()]])
        self._headers = {role: self._header(role) for role in template.roles}

    def check_vocab(self, model_vocab_size: int) -> None:
        if self.vocab_size > model_vocab_size:
            raise ConfigError(
                f"model.vocab_size ({model_vocab_size}) is too small for the tokenizer plus the {self.template.name} "
                f"template's special tokens (ids up to {self.vocab_size - 1}); set model.vocab_size >= {self.vocab_size}")

    def _piece(self, text: str) -> list[int]:
        if text in self.special_ids:
            return [self.special_ids[text]]
        return list(self.tokenizer.encode(text)) if text else []

    def _text(self, text: str) -> list[int]:
        """User-controlled text: always the tokenizer's plain encoding, never a special token."""
        return list(self.tokenizer.encode(text)) if text else []

    def _header(self, role: str) -> list[int]:
        t = self.template
        return self._piece(t.header_start) + self._text(role) + self._piece(t.header_end) + self._piece(
            t.header_suffix)

    def begin_ids(self) -> list[int]:
        if self.template.begin:
            return [self.special_ids[self.template.begin]]
        bos = getattr(self.tokenizer, "bos_id", None)
        return [] if bos is None or bos < 0 else [int(bos)]

    def render(self, messages: Sequence[dict], *, where: str = "conversation",
               require_assistant: bool = True) -> tuple[list[int], list[bool]]:
        """(token ids, is-target per token) of a whole conversation.

        ``messages``: [{"role": ..., "content": ...}, ...]. Raises DataError naming ``where`` for an unknown role,
        non-string content, an empty conversation, or (``require_assistant``) no assistant turn with content.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        messages = list(messages)
        if self.system_prompt is not None and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        tokens, target = list(self.begin_ids()), []
        target = [False] * len(tokens)
        has_answer = False
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
            role, content = message.get("role"), message.get("content")
            if role not in self._headers:
                raise DataError(f"{where}: message {i} has role {role!r}, which the {self.template.name} template "
                                f"does not know (it knows {', '.join(self.template.roles)})")
            if not isinstance(content, str):
                raise DataError(f"{where}: message {i} ({role}) must have string 'content', got "
                                f"{type(content).__name__}")
            header = self._headers[role]
            body = self._text(content) + [self.special_ids[self.template.end_of_turn]]
            is_answer = role == "assistant"
            has_answer |= is_answer and bool(content.strip())
            tokens += header + body
            target += [False] * len(header) + [is_answer] * len(body)
        if require_assistant and not has_answer:
            raise DataError(f"{where}: the conversation has no assistant turn with content (nothing to train on)")
        return tokens, target

    def generation_prompt(self) -> list[int]:
        """The header that asks the model for an assistant turn (append to a rendered prompt at inference)."""
        return list(self._headers["assistant"])
