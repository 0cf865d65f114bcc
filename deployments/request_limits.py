"""A request body read safely and held to the application's limits, before any stage works on it.

Parsing: JSON that Python reads but no later stage can handle is refused here with a 400 —
lone UTF-16 surrogates (valid as JSON escapes, but not encodable as UTF-8, so every later
encode would fail), NaN and Infinity (not JSON) and numbers that overflow to them (1e400),
integers beyond 64 bits (no engine field takes them). The costly checks run only when a
cheap scan of the raw bytes finds what they look for, so ordinary bodies pay one regex pass.

Limits: counts (messages, stop strings, prompts, n, tools, max_tokens) and the prompt's
UTF-8 bytes, each a 400 that names the parameter and both numbers. The prompt's tokens are
counted after rendering, in the tokenizer stage.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

from servegraph.deployments.errors import BadRequestError
from servegraph.models.config import RequestLimits

INT64_MAX = 2**63 - 1
# A surrogate escape, a non-finite constant, a 19-digit integer or a 3-digit exponent: only then the careful parse.
SUSPICIOUS = re.compile(r"\\u[dD][89a-fA-F]|NaN|Infinity|\d{19}|[eE][+-]?\d{3}")
PROMPT_FIELDS = ("prompt", "messages", "input")
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# vLLM's default max_tokens for completions; chat and responses use the model's default_max_tokens.
COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_UTF8_BYTES_PER_CHAR = 4
BYTES_PER_TOKEN_FLOOR = 2  # few tokenizers spend fewer bytes per token: the estimate errs high


def refuse_constant(name: str) -> Any:
    raise BadRequestError(f"The request body holds `{name}`, which is not a JSON number.")


def finite_float(digits: str) -> float:
    value = float(digits)
    if not math.isfinite(value):
        raise BadRequestError(f"The number {digits[:24]} is out of range.")
    return value


def parse_body(raw: bytes) -> Any:
    """raw as JSON; 400 for what is not JSON or what no stage could use.

    Decoded as UTF-8 first: json.loads would also take UTF-16 and UTF-32, whose bytes the scan
    for suspicious text cannot see through.
    """
    try:
        text = raw.decode()
        if SUSPICIOUS.search(text) is None:
            return json.loads(text)
        body = json.loads(text, parse_constant=refuse_constant, parse_float=finite_float)
        refuse_lone_surrogates(body)
        refuse_huge_integers(body)
    except ValueError as exc:  # UnicodeDecodeError and too many digits included
        raise BadRequestError(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequestError("The request body is nested too deeply.") from None
    return body


def refuse_lone_surrogates(body: Any) -> None:
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise BadRequestError(
            "The request body holds a lone UTF-16 surrogate (such as \\udc80): text must be valid Unicode."
        ) from None


def refuse_huge_integers(body: Any) -> None:
    """400 naming the field of the first integer beyond 64 bits: no engine field takes one."""
    pending: list[tuple[str, Any]] = [("", body)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > INT64_MAX:
            raise BadRequestError(f"{path or 'body'}: {item} is out of range: integers must fit in 64 bits.",
                                  param=path or None)  # fmt: skip
        if isinstance(item, dict):
            pending.extend((f"{path}.{key}" if path else str(key), value) for key, value in item.items())
        elif isinstance(item, list):
            pending.extend((f"{path}.{index}", value) for index, value in enumerate(item))


def leaves(value: Any) -> Iterator[str | int]:
    """The strings and integers in value, however nested (without recursion: nesting is the client's to choose)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str) or (isinstance(item, int) and not isinstance(item, bool)):
            yield item
        elif isinstance(item, list):
            pending.extend(reversed(item))
        elif isinstance(item, dict):
            pending.extend(reversed(item.values()))


def strings_in(value: Any) -> Iterator[str]:
    return (item for item in leaves(value) if isinstance(item, str))


def as_count(value: Any) -> int | None:
    """value as vLLM's (lax) request models would read an integer field: 5, 5.0 and "5" all count."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isascii() and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def prompt_count(body: dict[str, Any]) -> int:
    """Completions take a list of prompts (strings or token-id lists); a flat list of ints is one prompt."""
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list) else 1


def requested_tokens(body: dict[str, Any]) -> int | None:
    """The largest completion length the body asks for, under any of its names."""
    counts = [count for field in MAX_TOKENS_FIELDS if (count := as_count(body.get(field))) is not None]
    return max(counts, default=None)


def reserved_tokens(body: dict[str, Any], default_max_tokens: int) -> int:
    """What a request may use at most, before it is tokenized: its prompt (estimated from its text,
    counted exactly for token ids) and max_tokens for each prompt and choice. Settling replaces
    it with the exact count."""
    prompt = 0
    for field in PROMPT_FIELDS:
        for item in leaves(body.get(field)):
            prompt += 1 if isinstance(item, int) else len(item.encode()) // BYTES_PER_TOKEN_FLOOR + 1
    requested = requested_tokens(body)
    if requested is None:
        requested = COMPLETION_DEFAULT_MAX_TOKENS if "prompt" in body else default_max_tokens
    choices = max(as_count(body.get("n")) or 1, 1)
    return prompt + max(requested, 0) * choices * prompt_count(body)


def over(param: str, what: str, count: int, limit: int) -> BadRequestError:
    return BadRequestError(f"{param}: {count} {what} is over this server's limit of {limit}.", param=param)


def check_limits(body: dict[str, Any], limits: RequestLimits) -> None:
    """400 naming the first limit body breaks."""
    for field in PROMPT_FIELDS:
        if field in body:
            texts = list(strings_in(body[field]))
            if sum(map(len, texts)) * MAX_UTF8_BYTES_PER_CHAR <= limits.max_prompt_bytes:
                continue  # fits even at 4 bytes a character: no copy of the text is made to count it
            size = sum(len(text.encode()) for text in texts)
            if size > limits.max_prompt_bytes:
                raise over(field, "bytes of prompt text", size, limits.max_prompt_bytes)
    counted = [
        ("messages", "messages", limits.max_messages),
        ("tools", "tools", limits.max_tools),
        ("stop", "stop strings", limits.max_stop_strings),
    ]
    for param, what, limit in counted:
        value = body.get(param)
        if isinstance(value, list) and len(value) > limit:
            raise over(param, what, len(value), limit)
    prompts = prompt_count(body)
    if prompts > limits.max_prompts:
        raise over("prompt", "prompts", prompts, limits.max_prompts)
    n = as_count(body.get("n"))
    if n is not None and n > limits.max_n:
        raise over("n", "choices", n, limits.max_n)
    for param in MAX_TOKENS_FIELDS:
        value = as_count(body.get(param))
        if limits.max_tokens is not None and value is not None and value > limits.max_tokens:
            raise over(param, "tokens", value, limits.max_tokens)
