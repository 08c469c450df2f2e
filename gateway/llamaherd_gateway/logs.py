"""Log fields that a client cannot forge: what it sends (a model name) is logged as one token
on one line, whatever characters it holds."""

from __future__ import annotations

import json
import re

_PLAIN = re.compile(r"[A-Za-z0-9._:/@+-]*")


def log_value(value: str) -> str:
    """A text log field's value as it is when plain, else as a JSON string: quoted, with control
    characters (newlines included), quotes, backslashes and non-ASCII escaped, so it can end
    neither its field nor its line."""
    if _PLAIN.fullmatch(value):
        return value
    return json.dumps(value).replace("\x7f", "\\u007f")
