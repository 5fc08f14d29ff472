"""How many keys a sliding window cut by transformers' own mask helper leaves each query.

4.3x-era files give the window to `_prepare_4d_causal_attention_mask(..., sliding_window=w)`
rather than to the attention. What that helper keeps changed between releases: through 4.38 it
masked keys `w` or more positions back (`triu(..., diagonal=past - w + 1)`), so a query sees `w`
keys, itself included; from 4.39 on it masks those `w + 1` or more back (`tril(...,
diagonal=past - w - 1)`), so a query sees `w + 1`. PagedAttention's `sliding_window` counts the
keys a query sees. A model directory names the release its code was written for in config.json
(`transformers_version`); a file without one is taken to follow the older rule, which the
transformers-tree files of 4.36-4.38 do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

WIDER_FROM = (4, 39)  # the first release whose mask helper keeps w + 1 keys


def extra_window_keys(source_path: Path) -> int:
    """1 where the file's model directory names a transformers release from 4.39 on, else 0."""
    config = source_path.parent / "config.json"
    try:
        version = json.loads(config.read_text()).get("transformers_version", "")
    except (OSError, ValueError, AttributeError):
        return 0
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None:
        return 0
    return 1 if (int(match.group(1)), int(match.group(2))) >= WIDER_FROM else 0


def widened(window: str, extra: int) -> str:
    """The window expression for PagedAttention: `window` plus `extra` keys, None staying None."""
    if not extra:
        return window
    if not re.fullmatch(r"[\w.]+", window):
        window = f"({window})"
    return f"{window} + {extra} if {window} is not None else None"
