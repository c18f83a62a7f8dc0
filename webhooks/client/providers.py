"""What the wrappers read from requests and answers of the OpenAI and Anthropic APIs, as plain functions.

Usage comes from the providers' own fields, never from a total or a guess when they report it:

- Chat Completions ``usage``: ``prompt_tokens`` includes ``prompt_tokens_details.cached_tokens``, so the uncached
  input is the difference; ``completion_tokens`` already includes ``completion_tokens_details.reasoning_tokens``
  (adding them again is the classic phantom spend).
- Responses ``usage``: ``input_tokens`` includes ``input_tokens_details.cached_tokens``; ``output_tokens``
  includes ``output_tokens_details.reasoning_tokens``.
- Anthropic ``usage``: ``input_tokens`` excludes the cache: ``cache_read_input_tokens`` are cached input,
  ``cache_creation_input_tokens`` (cache writes) are charged as input. In a stream, ``message_start`` carries the
  input and a running output count, ``message_delta`` the final output (and, from newer API versions, the input
  fields again, which then win).

Where a provider reported nothing (a stream without a usage chunk, or cut before it), a token is estimated as
four characters of text, rounded up; such charges are marked as estimated in the ledger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Endpoint = Literal["chat", "responses", "messages"]
CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    """Tokens for ``chars`` characters of text: one per four characters, rounded up."""
    return math.ceil(chars / CHARS_PER_TOKEN)


def text_chars(value: Any) -> int:
    """Characters of every string inside a request's messages (content, parts, tool arguments)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(text_chars(v) for k, v in value.items() if k not in ("type", "role", "id", "cache_control"))
    if isinstance(value, list | tuple):
        return sum(text_chars(v) for v in value)
    return 0


def prompt_chars(endpoint: Endpoint, request: Mapping[str, Any]) -> int:
    """The characters of the prompt a request sends."""
    if endpoint == "chat":
        return text_chars(request.get("messages")) + text_chars(request.get("tools"))
    if endpoint == "responses":
        return (
            text_chars(request.get("input"))
            + text_chars(request.get("instructions"))
            + text_chars(request.get("tools"))
        )
    return text_chars(request.get("messages")) + text_chars(request.get("system")) + text_chars(request.get("tools"))


def max_output_tokens(endpoint: Endpoint, request: Mapping[str, Any], default: int) -> int:
    """The most output the request allows (``default`` when it sets no limit)."""
    names = {
        "chat": ("max_completion_tokens", "max_tokens"),
        "responses": ("max_output_tokens",),
        "messages": ("max_tokens",),
    }[endpoint]
    # Chat Completions may ask for n choices: each is as long as the limit allows.
    n = request.get("n") if endpoint == "chat" else 1
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    for name in names:
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value * choices
    return default * choices


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass
class Tokens:
    """Token counts as the ledger takes them: uncached input, output, cached input."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


def chat_usage(usage: Any) -> Tokens | None:
    """Tokens of a Chat Completions ``usage`` object."""
    if usage is None:
        return None
    cached = _int(_get(_get(usage, "prompt_tokens_details"), "cached_tokens"))
    return Tokens(_int(_get(usage, "prompt_tokens")) - cached, _int(_get(usage, "completion_tokens")), cached)


def responses_usage(usage: Any) -> Tokens | None:
    """Tokens of a Responses API ``usage`` object."""
    if usage is None:
        return None
    cached = _int(_get(_get(usage, "input_tokens_details"), "cached_tokens"))
    return Tokens(_int(_get(usage, "input_tokens")) - cached, _int(_get(usage, "output_tokens")), cached)


def anthropic_usage(usage: Any) -> Tokens | None:
    """Tokens of an Anthropic ``usage`` object (cache writes count as input, cache reads as cached)."""
    if usage is None:
        return None
    return Tokens(
        _int(_get(usage, "input_tokens")) + _int(_get(usage, "cache_creation_input_tokens")),
        _int(_get(usage, "output_tokens")),
        _int(_get(usage, "cache_read_input_tokens")),
    )


def response_usage(endpoint: Endpoint, response: Any) -> Tokens | None:
    """Tokens of a complete (not streamed) answer."""
    usage = _get(response, "usage")
    return {"chat": chat_usage, "responses": responses_usage, "messages": anthropic_usage}[endpoint](usage)


def response_model(response: Any) -> str | None:
    """The model that served the answer, as the provider names it."""
    model = _get(response, "model")
    return model if isinstance(model, str) else None


@dataclass
class StreamTracker:
    """What a stream has shown so far: text received, the usage reported (final or partial), the model."""

    endpoint: Endpoint
    chars: int = 0
    events: int = 0
    model: str | None = None
    usage: Tokens | None = None
    final: bool = False
    _anthropic_usage: dict[str, int] = field(default_factory=dict)

    @property
    def received_anything(self) -> bool:
        """Whether any output or usage arrived."""
        return self.chars > 0 or self.usage is not None

    def feed(self, event: Any) -> None:
        """Read one chunk or event."""
        self.events += 1
        if self.endpoint == "chat":
            self._chat(event)
        elif self.endpoint == "responses":
            self._responses(event)
        else:
            self._messages(event)

    def _chat(self, chunk: Any) -> None:
        self.model = response_model(chunk) or self.model
        for choice in _get(chunk, "choices") or ():
            delta = _get(choice, "delta")
            self.chars += text_chars(_get(delta, "content")) + text_chars(_get(delta, "refusal"))
            self.chars += text_chars(_get(delta, "tool_calls"))
        usage = chat_usage(_get(chunk, "usage"))
        if usage is not None:
            self.usage, self.final = usage, True

    def _responses(self, event: Any) -> None:
        kind = _get(event, "type")
        if kind in ("response.output_text.delta", "response.function_call_arguments.delta", "response.refusal.delta"):
            self.chars += text_chars(_get(event, "delta"))
        response = _get(event, "response")
        if response is not None:
            self.model = response_model(response) or self.model
            usage = responses_usage(_get(response, "usage"))
            if usage is not None:
                self.usage, self.final = usage, True

    def _messages(self, event: Any) -> None:
        kind = _get(event, "type")
        if kind == "message_start":
            message = _get(event, "message")
            self.model = response_model(message) or self.model
            self._merge(_get(message, "usage"))
        elif kind == "content_block_delta":
            delta = _get(event, "delta")
            for name in ("text", "partial_json", "thinking"):
                self.chars += text_chars(_get(delta, name))
        elif kind == "message_delta":
            self._merge(_get(event, "usage"))
            self.final = True

    def _merge(self, usage: Any) -> None:
        if usage is None:
            return
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens"):
            value = _get(usage, name)
            if isinstance(value, int) and not isinstance(value, bool):
                self._anthropic_usage[name] = value
        self.usage = anthropic_usage(self._anthropic_usage)
