"""Chat messages -> the prompt the model was trained on, and server-sent-event chunking.

Prompt formatting is not re-implemented here. Training renders a chat row with
`tuneship.train.trainer.split_prompt_completion(row, tokenizer)`, which calls the tokenizer's
`apply_chat_template`; the gateway calls that very function with `ChatTemplate`, a stand-in
that has only `apply_chat_template` (rendered the way transformers renders it: a sandboxed
Jinja environment with trim_blocks/lstrip_blocks and the `raise_exception` / `tojson`
helpers), so the gateway needs neither transformers nor the tokenizer files.

The template is the route's `metadata.chat_template` when the release put one there, else
the gateway's `chat_template_path` file, else the embedded base model's template
(`tuneship.basemodel.CHAT_TEMPLATE`). A route whose model was trained on plain
prompt/completion rows (`metadata.prompt_format: "plain"`) takes the single user message
as the prompt: the inverse of `tuneship.datagen.to_chat`.

Training tokenizes the rendered prompt with add_special_tokens=False because the template
already wrote the BOS token; Triton's model encodes PROMPT with add_special_tokens=True.
So the BOS text is removed from the front here and the model sees the same token ids.

Streaming (serving.gateway.app): pieces from a decoupled model are relayed as they are
generated, each split into word-sized chunks (`word_chunks`); a model that is not decoupled
answers whole and is then sent in word-sized chunks.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from tuneship.train.trainer import DataError, split_prompt_completion

_WORDS = re.compile(r"\s*\S+|\s+")


class ChatTemplate:
    """Tokenizer stand-in for `split_prompt_completion`: renders a Jinja chat template."""

    def __init__(self, template: str, bos_token: str = "<s>", eos_token: str = "</s>") -> None:
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled = _compile(template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs: Any) -> str:
        if tokenize:
            raise ValueError("ChatTemplate only renders text (tokenize=False)")
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def default_template() -> str:
    from tuneship.basemodel import CHAT_TEMPLATE

    return CHAT_TEMPLATE


class ChatFormatError(ValueError):
    """The messages cannot be turned into a prompt for this model (answered with 400)."""


def chat_prompt(messages: list[dict[str, str]], template: ChatTemplate) -> str:
    """The generation prompt for `messages`, exactly as training rendered a chat row's prompt."""
    if not messages or messages[-1]["role"] == "assistant":
        raise ChatFormatError("The last message must not be from the assistant: there is nothing to answer.")
    row = {"messages": [*messages, {"role": "assistant", "content": ""}]}
    try:
        prompt, _completion, _templated = split_prompt_completion(row, template)
    except DataError as exc:
        raise ChatFormatError(str(exc)) from None
    except Exception as exc:  # template errors (raise_exception, bad roles, sandbox)
        raise ChatFormatError(f"The chat template rejected the messages: {exc}") from None
    if template.bos_token and prompt.startswith(template.bos_token):
        prompt = prompt[len(template.bos_token):]  # Triton's tokenizer adds BOS itself
    return prompt


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """For models trained on prompt/completion rows: one user message is the prompt."""
    users = [m for m in messages if m["role"] == "user"]
    if len(messages) != 1 or len(users) != 1:
        raise ChatFormatError("This model was trained on single prompts: send exactly one user message.")
    return users[0]["content"]


def word_chunks(text: str) -> list[str]:
    """Word-sized pieces (leading whitespace attached) whose concatenation is `text`."""
    return _WORDS.findall(text)


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
