"""Timing GPU work as a decode step runs it: calls captured back to back in one CUDA graph.

A graph replays with no host launch overhead between its calls, as the engine's decode steps do,
so a kernel is charged only for its own time and the gaps the GPU itself leaves. Callers cycle the
calls through enough distinct inputs that none finds its data in L2.

Do not time a plain same-dtype `copy_` this way: captured, it becomes a memcpy node that the copy
engine runs, far slower than PyTorch's copy kernel run eagerly (2.8 against 4.2 TB/s on an H200).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

WARMUP_REPLAYS = 3


def graph_time_us(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Median microseconds per call, over `replays` replays of `calls` captured in one CUDA graph."""
    for call in calls:  # eager first: compiles and lazy allocations must not happen inside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(WARMUP_REPLAYS + replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[WARMUP_REPLAYS:]) * 1e3 / len(calls)
