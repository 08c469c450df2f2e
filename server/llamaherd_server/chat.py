"""Chat templates: the Jinja template from the GGUF metadata, or one from the settings.

What a client wrote is text, whatever it says: a user who types ``<|im_start|>system`` gets
those characters' text tokens, never the control token that opens a real system turn. Only
the template's own markers become control tokens. :func:`render_chat_parts` renders the
template with a placeholder for each message's content and cuts the result into the
template's text and the clients' text; :func:`tokenize_parts` finds control tokens in the
template's text alone.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """No template, or one that failed on these messages."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=4)
def _compile(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def render_chat(
    template: str | None,
    messages: list[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """The prompt text for ``messages``, ending with the assistant's turn."""
    if not template:
        raise ChatTemplateError(
            "this model has no chat template (tokenizer.chat_template in its GGUF metadata) "
            "and none is configured (LLAMAHERD_CHAT_TEMPLATE): use /v1/completions"
        )
    try:
        return str(
            _compile(template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        )
    except ChatTemplateError:
        raise
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc


# A part of a rendered prompt: its text, and whether a client wrote it.
Part = tuple[str, bool]


def render_chat_parts(
    template: str | None,
    messages: list[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> list[Part] | None:
    """The prompt for ``messages`` as (text, written by the client) parts, or None when the
    template does not copy each message's content through unchanged (it edits or drops it),
    so the clients' text cannot be told from the template's."""
    nonce = secrets.token_hex(8)
    marks = [f"\u27e6{nonce}:{i}\u27e7" for i in range(len(messages))]
    placeheld = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
    text = render_chat(template, placeheld, bos_token=bos_token, eos_token=eos_token)
    pieces = re.split(f"\u27e6{nonce}:(\\d+)\u27e7", text)
    # pieces: template text, index, template text, index, ...
    seen = [int(i) for i in pieces[1::2]]
    if sorted(seen) != list(range(len(messages))):
        return None
    parts: list[Part] = []
    for n, piece in enumerate(pieces):
        if n % 2 == 0:
            if piece:
                parts.append((piece, False))
        else:
            content = messages[int(piece)]["content"]
            if content:
                parts.append((content, True))
    return parts


def split_controls(
    text: str, controls: re.Pattern[str] | None, ids: Mapping[str, int]
) -> list[str | int]:
    """``text`` cut at the control tokens' texts: text runs and control token ids."""
    if controls is None:
        return [text] if text else []
    out: list[str | int] = []
    at = 0
    for found in controls.finditer(text):
        if found.start() > at:
            out.append(text[at : found.start()])
        out.append(ids[found.group()])
        at = found.end()
    if at < len(text):
        out.append(text[at:])
    return out


def controls_pattern(ids: Mapping[str, int]) -> re.Pattern[str] | None:
    """A pattern that finds the control tokens' texts, longest first (as llama.cpp does)."""
    if not ids:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True)))


def tokenize_parts(
    parts: list[Part],
    tokenize: Callable[[str], list[int]],
    controls: re.Pattern[str] | None,
    ids: Mapping[str, int],
) -> list[int]:
    """Tokens of a rendered prompt: control tokens only where the template's text names them,
    and every run of text between two of them (the template's and the clients' together)
    tokenized as one plain text, exactly as llama.cpp would tokenize it between the same
    control tokens (so a prompt without typed markers gets the tokens it always got).
    ``tokenize`` is plain text to tokens: no special tokens added or parsed."""
    tokens: list[int] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            tokens.extend(tokenize("".join(run)))
            run.clear()

    for text, from_client in parts:
        if from_client:
            run.append(text)
            continue
        for piece in split_controls(text, controls, ids):
            if isinstance(piece, int):
                flush()
                tokens.append(piece)
            else:
                run.append(piece)
    flush()
    return tokens
