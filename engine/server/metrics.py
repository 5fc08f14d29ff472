"""GET /metrics: the engine's state in Prometheus' text exposition format (version 0.0.4).

Gauges are read at scrape time. The token rate compares the generated-token count with the one of
the newest scrape at least `_RATE_WINDOW_S` old (or the oldest there is), so it shows the current
throughput rather than a lifetime average.
"""

from __future__ import annotations

import time
from collections import deque

from engine.server.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# How far back the generated-tokens rate looks.
_RATE_WINDOW_S = 10.0


class TokenRate:
    """Generated tokens per second over the last `_RATE_WINDOW_S` seconds, from cumulative counts."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, total_tokens: int, now: float | None = None) -> float:
        """Records the count at `now` (monotonic seconds) and returns the rate up to it."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, total_tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= _RATE_WINDOW_S:
            self._samples.popleft()
        first_time, first_total = self._samples[0]
        elapsed = now - first_time
        return (total_tokens - first_total) / elapsed if elapsed > 0 else 0.0


def render_metrics(engine: AsyncEngine, rate: TokenRate) -> str:
    """The current metrics as Prometheus text."""
    llm_engine = engine.engine
    scheduler = llm_engine.scheduler
    blocks = scheduler.block_manager
    generated = llm_engine.num_generated_tokens
    rows = [
        (
            "porter_requests_running",
            "gauge",
            "Sequences admitted to the running batch.",
            scheduler.num_running,
        ),
        ("porter_requests_waiting", "gauge", "Sequences queued for admission.", scheduler.num_waiting),
        ("porter_requests_in_server", "gauge", "HTTP requests the server is serving.", engine.num_requests),
        (
            "porter_kv_blocks_used",
            "gauge",
            "KV-cache blocks held by sequences.",
            blocks.num_blocks - blocks.num_free_blocks,
        ),
        ("porter_kv_blocks_total", "gauge", "KV-cache blocks in the pool.", blocks.num_blocks),
        (
            "porter_generation_tokens_per_second",
            "gauge",
            f"Generated tokens per second over the last {_RATE_WINDOW_S:g} s.",
            round(rate.update(generated), 3),
        ),
        ("porter_generation_tokens_total", "counter", "Generated tokens.", generated),
        (
            "porter_requests_finished_total",
            "counter",
            "Requests that completed.",
            engine.num_finished_requests,
        ),
        (
            "porter_requests_aborted_total",
            "counter",
            "Requests dropped because their client left.",
            engine.num_aborted_requests,
        ),
        (
            "porter_preemptions_total",
            "counter",
            "Sequences preempted and recomputed.",
            llm_engine.num_preemptions,
        ),
        (
            "porter_engine_healthy",
            "gauge",
            "1 while the engine can serve requests.",
            int(engine.error is None),
        ),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
