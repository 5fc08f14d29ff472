"""Host-side cost of one decode step of the engine loop, on the CPU, with no model forward.

A real `LLMEngine` (scheduler, block manager with prefix caching, stop/finish bookkeeping) is driven
by a fake driver and sampler: `execute` only builds the step's tensors the way `ModelRunner` does
(`prepare_inputs`: input ids, positions, `InputMetadata`) and returns dummy logits; `sample` returns
fixed random tokens. So every microsecond measured is host work that a GPU step cannot hide while the
loop runs synchronously (`async_scheduling=False`; the asynchronous loop does the same work, but
while the device runs the previous step). Sequences are admitted and prefilled first; then `--steps` decode steps of
`--num-seqs` running sequences are timed, their contexts growing from `--context` tokens.

    PYTHONPATH=. python3 benchmarks/bench_host_overhead.py              # 256 seqs, 512-token contexts
    PYTHONPATH=. python3 benchmarks/bench_host_overhead.py --num-seqs 64 --steps 500

Phases (microseconds per step, median over the timed steps):
  schedule        Scheduler.schedule()
  inputs          the engine turning the SchedulerOutput into StepInputs (before execute)
  prepare         ModelRunner.prepare_inputs: host->"device" tensors and InputMetadata (device = cpu)
  sample glue     picking the sampled rows and reading the tokens back, fake sampler excluded
  postprocess     Scheduler.record_launch() + record_tokens()
  finish          stop strings and finished-request collection after record_tokens
  step total      LLMEngine.step() end to end, fake sampler excluded
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.block_manager import BlockManager  # noqa: E402
from engine.layers.sampler import SamplerOutput  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model_runner import ModelRunner, TokenReadback  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402

PHASES = ("schedule", "inputs", "prepare", "sample glue", "postprocess", "finish", "step total")


class PhaseClock:
    """Timestamps taken by the wrapped engine pieces during one `step()`."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()


def build_engine(args: argparse.Namespace, clock: PhaseClock) -> LLMEngine:
    """An `LLMEngine` without a model: real scheduler and bookkeeping, fake driver and sampler."""
    context_blocks = -(-(args.context + args.steps + 64) // args.block_size)
    manager = BlockManager(args.num_seqs * context_blocks + 64, args.block_size, enable_prefix_caching=True)
    scheduler = Scheduler(manager, max_num_seqs=args.num_seqs, max_num_batched_tokens=2048, eos_token_id=2)
    runner_view = SimpleNamespace(device=torch.device("cpu"), block_size=args.block_size)
    generator = torch.Generator().manual_seed(0)
    vocab = 1000
    max_logit_rows = max(args.num_seqs, 2048)
    logits = torch.zeros(max_logit_rows, 8)
    tokens = torch.randint(10, vocab, (max_logit_rows,), generator=generator)

    schedule = scheduler.schedule
    record_launch, record_tokens = scheduler.record_launch, scheduler.record_tokens

    def timed_schedule():
        clock.mark("schedule_begin")
        output = schedule()
        clock.mark("schedule_end")
        return output

    def timed_record_launch(output):
        clock.mark("launch_begin")
        record_launch(output)
        clock.mark("launch_end")

    def timed_record_tokens(*a, **k):
        clock.mark("tokens_begin")
        finished = record_tokens(*a, **k)
        clock.mark("tokens_end")
        return finished

    def execute(step):
        clock.mark("execute_begin")
        _, _, metadata, _ = ModelRunner.prepare_inputs(runner_view, step)
        clock.mark("execute_end")
        return logits[: metadata.num_seqs]

    def sample(rows_logits, seqs):
        clock.mark("sample_begin")
        result = SamplerOutput(token_ids=tokens[: len(seqs)].clone(), logprobs=None)
        clock.mark("sample_end")
        return result

    scheduler.schedule = timed_schedule
    scheduler.record_launch, scheduler.record_tokens = timed_record_launch, timed_record_tokens
    engine = LLMEngine.__new__(LLMEngine)
    engine.config = SimpleNamespace(max_model_len=10**9, model="bench", async_scheduling=False)
    engine.tokenizer = None
    engine.driver = SimpleNamespace(execute=execute)
    engine.runner = SimpleNamespace(sample=sample, read_back=TokenReadback, release=lambda seq_id: None)
    engine._in_flight, engine._penalized = None, set()
    engine.num_kv_blocks = manager.num_blocks
    engine.scheduler = scheduler
    engine.num_preemptions = 0
    engine._requests, engine._request_of_seq, engine._detokenizers = {}, {}, {}
    engine._seq_ids = iter(range(10**9))
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 1000, ignore_eos=True)
    for index in range(args.num_seqs):
        prompt = torch.randint(10, vocab, (args.context,), generator=generator).tolist()
        engine.add_request(str(index), prompt, params)
    return engine


def phase_times(clock: PhaseClock, step_begin: float, step_end: float) -> dict[str, float]:
    m = clock.marks
    sampler = m["sample_end"] - m["sample_begin"]
    return {
        "schedule": m["schedule_end"] - m["schedule_begin"],
        "inputs": m["execute_begin"] - m["schedule_end"],
        "prepare": m["execute_end"] - m["execute_begin"],
        "sample glue": (m["launch_begin"] - m["execute_end"])
        - sampler
        + (m["tokens_begin"] - m["launch_end"]),
        "postprocess": (m["launch_end"] - m["launch_begin"]) + (m["tokens_end"] - m["tokens_begin"]),
        "finish": step_end - m["tokens_end"],
        "step total": (step_end - step_begin) - sampler,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=512, help="prompt length = context at the first step")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300, help="timed decode steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clock = PhaseClock()
    engine = build_engine(args, clock)
    scheduler = engine.scheduler
    while scheduler.num_waiting or any(seq.num_uncomputed_tokens > 1 for seq in scheduler.running):
        engine.step()  # admission and prefill, untimed
    for _ in range(20):
        engine.step()  # warm-up decode steps
    samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for _ in range(args.steps):
        clock.marks.clear()
        begin = time.perf_counter()
        engine.step()
        end = time.perf_counter()
        if len(scheduler.running) != args.num_seqs:
            raise RuntimeError(f"expected {args.num_seqs} running sequences, got {len(scheduler.running)}")
        for phase, seconds in phase_times(clock, begin, end).items():
            samples[phase].append(seconds)

    print(
        f"host work per decode step: {args.num_seqs} sequences, contexts {args.context + 20}.."
        f"{args.context + 20 + args.steps}, block {args.block_size}, {args.steps} steps, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print(f"{'phase':<14}{'median us':>12}{'mean us':>12}{'us/seq':>10}")
    for phase in PHASES:
        values = samples[phase]
        median = statistics.median(values) * 1e6
        mean = statistics.fmean(values) * 1e6
        print(f"{phase:<14}{median:>12.1f}{mean:>12.1f}{median / args.num_seqs:>10.2f}")


if __name__ == "__main__":
    main()
