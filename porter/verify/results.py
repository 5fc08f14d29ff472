"""The last `porter verify` result of each registered architecture, for `porter list` and the
supported-architectures table.

The results live in the user's cache directory, never inside the installed package (which may be
read-only, and whose files are the ports themselves): `$PORTER_CACHE_DIR/verified.json` when that is
set, else `$XDG_CACHE_HOME/porter/verified.json`, else `~/.cache/porter/verified.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# run -> {"passed": bool, "max_rel": float}, per architecture; a run is "tp2-cpu-float32" plus any
# `--set` variant ("tp1-cpu-float32+alibi=true").
Results = dict[str, dict[str, dict[str, object]]]


def results_path() -> Path:
    """Where verify results are kept (see the module docstring)."""
    if os.environ.get("PORTER_CACHE_DIR"):
        return Path(os.environ["PORTER_CACHE_DIR"]) / "verified.json"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "porter" / "verified.json"


def run_name(tp: int, device: str, dtype: str, variant: str = "") -> str:
    """The key one verify run is recorded under."""
    return f"tp{tp}-{device}-{dtype}{variant}"


def load_results(path: Path | None = None) -> Results:
    """Every recorded result; none when the file is missing or unreadable."""
    path = path or results_path()
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def record_result(
    architecture: str, run: str, max_rel: float, passed: bool, path: Path | None = None
) -> None:
    """Keeps this run's result, replacing the architecture's earlier result for the same run. Best
    effort: a cache that cannot be written never fails a verify."""
    from porter.emit import write_atomically

    path = path or results_path()
    results = load_results(path)
    results.setdefault(architecture, {})[run] = {"passed": passed, "max_rel": float(f"{max_rel:.3g}")}
    try:
        write_atomically(path, json.dumps(results, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass
