"""Stripe's form encoding: ``a[b]=c``, ``expand[]=x``, ``expand[0]=x``, decoded into nested dicts and lists."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART = re.compile(r"\[([^\[\]]*)\]")


class FormError(ValueError):
    """A key that is not valid Stripe form syntax."""


def decode_form(body: str) -> dict[str, Any]:
    """Decode an ``application/x-www-form-urlencoded`` body (or query string) the way Stripe reads it."""
    root: dict[str, Any] = {}
    for raw_key, value in parse_qsl(body, keep_blank_values=True):
        match = _KEY.match(raw_key)
        if match is None:
            raise FormError(f"Invalid parameter name: {raw_key}")
        parts = [match.group(1), *_PART.findall(match.group(2))]
        _assign(root, parts, value, raw_key)
    return _listify(root)


_APPEND = object()


def _assign(node: dict[str, Any], parts: list[str], value: str, raw_key: str) -> None:
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        key: Any = part
        if part == "":
            # ``x[]=a&x[]=b``: an append; a nested ``x[][k]`` starts a new element when k repeats.
            appended = node.setdefault("\0append", [])
            if last:
                appended.append(value)
                return
            nxt = parts[index + 1]
            if not appended or not isinstance(appended[-1], dict) or nxt in appended[-1]:
                appended.append({})
            node = appended[-1]
            continue
        if last:
            node[key] = value
            return
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if "\0append" in node and len(node) == 1:
        return [_listify(v) for v in node["\0append"]]
    converted = {k: _listify(v) for k, v in node.items() if k != "\0append"}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted
