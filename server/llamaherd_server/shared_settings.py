"""Settings pieces that the server, the operator and the gateway share: field types with their
bounds and descriptions, the comma-separated list reader, and the CLI reading of a settings model.

It lives in the server's package (and needs only pydantic) because every image carries that
package: the operator image installs it without the server's extras, as it does for
:mod:`llamaherd_server.logs` and :mod:`llamaherd_server.metrics`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings

# A field declared as ``log_format: LogFormat = "text"`` gets its bounds and description here
# and its default where it is declared.
LogFormat = Annotated[Literal["text", "json"], Field(description="Log line format.")]
LogLevel = Annotated[Literal["debug", "info", "warning", "error"], Field(description="Log level.")]
ListenHost = Annotated[str, Field(description="Address to listen on.")]

# The Kubernetes API client's, in the operator and the gateway.
KubeRequestTimeout = Annotated[
    float, Field(gt=0, le=600, description="Timeout of one Kubernetes API request.")
]
WatchServerTimeout = Annotated[
    int,
    Field(
        ge=10,
        le=3600,
        description="Server-side timeout of a watch request: watches are renewed this often.",
    ),
]

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def comma_list(text: str) -> list[str]:
    """The items of ``"a, b ,"`` without blanks: ``["a", "b"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def settings_from_cli(
    cls: type[SettingsT],
    prog: str,
    argv: Sequence[str] | None = None,
    on_invalid: Callable[[str], None] | None = None,
) -> SettingsT:
    """``cls`` read from CLI flags (``--hold-timeout-seconds 60``, the field name with dashes)
    and from its environment variables alike; ``argv`` defaults to ``sys.argv[1:]``.

    Invalid settings print pydantic's message as ``<prog>: invalid settings: ...`` on stderr,
    hand ``invalid settings: ...`` to ``on_invalid`` (for a termination message) and exit 2."""
    try:
        return cls(
            _cli_parse_args=list(sys.argv[1:] if argv is None else argv),  # type: ignore[call-arg]
            _cli_prog_name=prog,  # type: ignore[call-arg]
            _cli_kebab_case=True,  # type: ignore[call-arg]
        )
    except ValidationError as exc:
        print(f"{prog}: invalid settings:\n{exc}", file=sys.stderr)
        if on_invalid is not None:
            on_invalid(f"invalid settings: {exc}")
        raise SystemExit(2) from None
