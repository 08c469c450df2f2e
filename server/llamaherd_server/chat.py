"""Chat templates: the Jinja template from the GGUF metadata, or one from the settings."""

from __future__ import annotations

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
