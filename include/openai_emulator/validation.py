"""Checks a fine-tuning file the way OpenAI's validating_files stage does (chat format).

Every non-blank line must be a JSON object with a non-empty ``messages`` list; roles are
system/user/assistant (tool/function for tool calls); contents are strings; every example has an
assistant message and fits the model's token limit; a training file has at least 10 examples.
The first problem found is reported with its line number; the count of bad lines is added.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from openai_emulator.models import BaseModel
from openai_emulator.tokens import count_example_tokens, get_encoding

ROLES = frozenset({"system", "user", "assistant", "tool", "function"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight", "tool_calls", "function_call", "tool_call_id"})
COUNTED_TOP_LEVEL_KEYS = ("tools", "functions")


@dataclass(frozen=True)
class DataReport:
    """The outcome of checking one file: ``error`` is None when it passed."""

    examples: int
    tokens: int  # one pass over the file, as billed per epoch
    error: str | None = None
    bad_lines: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


class _LineProblem(ValueError):
    """What is wrong with one line (the message names the line)."""


def _check_message(line: int, index: int, message: Any) -> bool:
    """Check one message; return whether it is the assistant's."""
    where = f"Line {line}, message {index}"
    if not isinstance(message, dict):
        raise _LineProblem(f"{where}: expected an object with 'role' and 'content', got {_kind(message)}.")
    unknown = sorted(set(message) - MESSAGE_KEYS)
    if unknown:
        raise _LineProblem(f"{where}: unrecognized key(s) {', '.join(repr(k) for k in unknown)}.")
    role = message.get("role")
    if role not in ROLES:
        raise _LineProblem(
            f"{where}: unrecognized role {role!r}; use 'system', 'user' or 'assistant' "
            "('tool' and 'function' only for tool calls)."
        )
    calls_tools = role == "assistant" and ("tool_calls" in message or "function_call" in message)
    content = message.get("content")
    if not isinstance(content, str) and not (calls_tools and content is None):
        raise _LineProblem(f"{where} ({role}): 'content' must be a string, got {_kind(content)}.")
    if "name" in message and not isinstance(message["name"], str):
        raise _LineProblem(f"{where}: 'name' must be a string.")
    if "weight" in message:
        if role != "assistant":
            raise _LineProblem(f"{where}: 'weight' is only allowed on assistant messages.")
        if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
            raise _LineProblem(f"{where}: 'weight' must be 0 or 1.")
    if "tool_calls" in message and not isinstance(message["tool_calls"], list):
        raise _LineProblem(f"{where}: 'tool_calls' must be a list.")
    if "function_call" in message and not isinstance(message["function_call"], dict):
        raise _LineProblem(f"{where}: 'function_call' must be an object.")
    return role == "assistant"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _check_line(line: int, text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Parse and check one line: ``(messages, other counted fields)``."""
    try:
        example = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineProblem(f"Line {line} is not valid JSON: {exc.msg} (column {exc.colno}).") from None
    if not isinstance(example, dict):
        raise _LineProblem(
            f"Line {line}: expected a JSON object with a 'messages' list, got {_kind(example)}."
        )
    messages = example.get("messages")
    if messages is None:
        hint = ""
        if "prompt" in example:
            hint = " (the prompt/completion format is not supported for chat models)"
        raise _LineProblem(f"Line {line}: missing the 'messages' list{hint}.")
    if not isinstance(messages, list) or not messages:
        raise _LineProblem(f"Line {line}: 'messages' must be a non-empty list.")
    has_assistant = False
    for index, message in enumerate(messages, start=1):
        has_assistant = _check_message(line, index, message) or has_assistant
    if not has_assistant:
        raise _LineProblem(
            f"Line {line}: no assistant message; every example needs at least one message "
            "with role 'assistant'."
        )
    return messages, {key: example[key] for key in COUNTED_TOP_LEVEL_KEYS if key in example}


def check_file(
    content: bytes, model: BaseModel, *, min_examples: int = 0, what: str = "training"
) -> DataReport:
    """Check a chat fine-tuning file for ``model``; ``min_examples`` applies to training files."""
    encoding = get_encoding(model.encoding)
    examples = tokens = bad_lines = 0
    first_problem: str | None = None
    for number, raw in enumerate(content.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines += 1
            first_problem = first_problem or f"Line {number} is not UTF-8 text."
            continue
        if not text.strip():
            continue
        try:
            messages, extra = _check_line(number, text)
            example_tokens = count_example_tokens(messages, encoding, extra)
            if example_tokens > model.max_example_tokens:
                raise _LineProblem(
                    f"Line {number}: the example has {example_tokens:,} tokens, over the "
                    f"{model.max_example_tokens:,}-token limit of {model.name}."
                )
        except _LineProblem as problem:
            bad_lines += 1
            first_problem = first_problem or str(problem)
            continue
        examples += 1
        tokens += example_tokens
    if first_problem is not None:
        more = f" ({bad_lines} lines have problems; the first is shown.)" if bad_lines > 1 else ""
        return DataReport(examples, tokens, f"{first_problem}{more}", bad_lines)
    if examples < min_examples:
        return DataReport(
            examples,
            tokens,
            f"The {what} file has {examples} example(s), but must have at least {min_examples} examples.",
        )
    return DataReport(examples, tokens)
