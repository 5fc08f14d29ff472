"""Where an engine step's time goes on a GPU: host phases against GPU kernel time, per step kind.

Runs the throughput workload (`bench_throughput.py`'s model and prompts) through `LLM.generate`, wraps
the engine's phases with wall-clock timers, and profiles a window of decode steps with
`torch.profiler` to get the GPU's busy time per step. If the GPU is busy for most of a step, the
kernels are the limit; if it is idle, the host is.

    PYTHONPATH=. python3 benchmarks/profile_engine_step.py --model llama-1b
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_throughput import MODELS, build_checkpoint  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.model_runner import TokenReadback  # noqa: E402


def _timed(table: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        result = fn(*args, **kwargs)
        table[name] += time.perf_counter() - begin
        return result

    return wrapper


def _record_triton_compiles(state: dict) -> list[tuple[int, str]]:
    """(step index, kernel signature) of every Triton compile from now on: a compile inside the timed
    run is a stall the engine's warm-up should have taken."""
    compiles: list[tuple[int, str]] = []
    try:
        from triton import knobs
    except ImportError:
        return compiles

    def hook(*args, **kwargs) -> bool:
        compiles.append((state["index"], str(kwargs.get("repr", ""))[:300]))
        return False  # go on compiling

    knobs.runtime.jit_cache_hook = hook
    return compiles


def _record_gc_pauses(state: dict) -> list[tuple[int, float]]:
    """(step index, ms) of every garbage collection from now on."""
    pauses: list[tuple[int, float]] = []
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((state["index"], 1e3 * (time.perf_counter() - started[0])))

    gc.callbacks.append(callback)
    return pauses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-1b")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--profile-steps", type=int, default=20, help="decode steps in the profiled window")
    parser.add_argument("--profile-from", type=int, default=200, help="first step of the profiled window")
    parser.add_argument("--trace", type=Path, default=None, help="write a Chrome trace of the window")
    parser.add_argument(
        "--synchronous", action="store_true", help="async_scheduling=False: read each step before the next"
    )
    args = parser.parse_args()

    config = MODELS[args.model]
    prompts = torch.randint(
        10, config.vocab_size, (args.num_prompts, args.input_len), generator=torch.Generator().manual_seed(0)
    ).tolist()
    with tempfile.TemporaryDirectory(prefix="porter-profile-") as tmp:
        build_checkpoint(config, torch.bfloat16, torch.device("cuda"), Path(tmp))
        torch.cuda.empty_cache()
        llm = LLM(
            tmp,
            dtype="bfloat16",
            device="cuda",
            max_model_len=args.input_len + args.output_len,
            async_scheduling=not args.synchronous,
        )
        engine = llm.engine
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        phases: dict[str, float] = defaultdict(float)
        per_kind: dict[str, list[float]] = defaultdict(list)
        scheduler, driver, runner = engine.scheduler, engine.driver, engine.runner
        scheduler.schedule = _timed(phases, "schedule", scheduler.schedule)
        scheduler.record_launch = _timed(phases, "record_launch", scheduler.record_launch)
        scheduler.record_tokens = _timed(phases, "record_tokens", scheduler.record_tokens)
        TokenReadback.wait = _timed(phases, "wait for sampled tokens", TokenReadback.wait)
        runner.prepare_inputs = _timed(phases, "prepare_inputs", runner.prepare_inputs)
        driver.execute = _timed(phases, "execute (incl. prepare, launch)", driver.execute)
        runner.sample = _timed(phases, "sample (launch)", runner.sample)
        step = engine.step
        state = {"index": 0, "profiler": None, "window": []}
        compiles = _record_triton_compiles(state)
        collections = _record_gc_pauses(state)

        def profiled_step():
            index = state["index"]
            state["index"] += 1
            if index == args.profile_from:
                torch.cuda.synchronize()
                state["profiler"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                state["profiler"].__enter__()
            begin = time.perf_counter()
            outputs = step()
            elapsed = time.perf_counter() - begin
            decode_only = scheduler_last["num_prefill_rows"] == 0
            per_kind["decode" if decode_only else "prefill/mixed"].append(elapsed)
            steps_seen.append(
                (elapsed, index, scheduler_last["num_decodes"], scheduler_last["num_prefill_rows"])
            )
            if state["profiler"] is not None and index < args.profile_from + args.profile_steps:
                state["window"].append((elapsed, decode_only))
            if index == args.profile_from + args.profile_steps - 1:
                torch.cuda.synchronize()
                state["profiler"].__exit__(None, None, None)
            return outputs

        scheduler_last = {"num_prefill_rows": 0, "num_decodes": 0}
        steps_seen: list[tuple[float, int, int, int]] = []
        schedule = scheduler.schedule

        def schedule_and_note():
            out = schedule()
            scheduler_last["num_prefill_rows"] = len(out.scheduled) - out.num_decodes
            scheduler_last["num_decodes"] = out.num_decodes
            return out

        scheduler.schedule = schedule_and_note
        engine.step = profiled_step
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        torch.cuda.synchronize()
        begin = time.perf_counter()
        llm.generate(prompts, params, show_progress=False)
        torch.cuda.synchronize()
        total = time.perf_counter() - begin
        llm.shutdown()

    steps = state["index"]
    tokens = args.num_prompts * args.output_len
    print(f"{args.model}: {tokens / total:,.0f} output tok/s, {total:.2f} s, {steps} steps")
    for kind, times in per_kind.items():
        print(
            f"  {kind:14s} steps {len(times):4d}  mean {1e3 * statistics.mean(times):7.2f} ms"
            f"  median {1e3 * statistics.median(times):7.2f} ms  total {sum(times):6.2f} s"
        )
    print("slowest steps (ms, step index, decode rows, prefill rows):")
    for elapsed, index, decodes, prefills in sorted(steps_seen, reverse=True)[:8]:
        print(f"  {1e3 * elapsed:8.2f}  #{index:<4d} {decodes:4d} {prefills:4d}")
    print(f"Triton compiles during the timed run: {len(compiles)}")
    for index, what in compiles:
        print(f"  step #{index}: {what}")
    long_pauses = [(i, ms) for i, ms in collections if ms > 5]
    print(f"garbage collections during the timed run: {len(collections)}, {len(long_pauses)} over 5 ms")
    for index, ms in long_pauses:
        print(f"  step #{index}: {ms:.1f} ms")
    print("host phases over the whole run (s):")
    for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {name:34s} {seconds:7.3f}  ({1e3 * seconds / steps:6.2f} ms/step)")
    profiler = state["profiler"]
    if profiler is not None:
        window = state["window"]
        events = [e for e in profiler.events() if e.device_type.name == "CUDA"]
        busy = sum(e.device_time for e in events) / 1e3  # ms (overlaps on one stream are rare)
        wall = sum(w for w, _ in window) * 1e3
        print(
            f"profiled window: {len(window)} steps ({sum(d for _, d in window)} decode-only), "
            f"wall {wall:.1f} ms, GPU kernel time {busy:.1f} ms ({100 * busy / wall:.0f}% busy), "
            f"{wall / len(window):.2f} ms/step wall, {busy / len(window):.2f} ms/step GPU"
        )
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        if args.trace:
            profiler.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
