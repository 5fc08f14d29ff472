"""Runs a port through the engine's loader and paged forward, step by step, beside HF's own model.

The schedule mixes everything a serving step can hold: step 0 prefills two prompts; step 1
decodes those, prefills a third whole and the first chunk of a fourth; step 2 decodes three and
finishes the fourth's prefill; then every sequence decodes. Decode tokens are HF's greedy tokens
(teacher forcing), so a difference in one step cannot hide behind diverging paths later. The HF
reference recomputes each sequence from scratch without a cache, so the engine's KV cache,
block tables and slot mapping are all under test.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROMPT_LENGTHS = (5, 11, 16, 23)
BLOCK_SIZE = 16
NUM_BLOCKS = 64


@dataclass(slots=True)
class StepResult:
    step: int
    kind: str  # what the step held, e.g. "prefill 2", "decode 2 + prefill 1 + chunk 1"
    max_abs: float
    max_rel: float
    tokens_agree: int
    tokens: int
    near_ties: int = 0  # of the agreeing tokens, those that differ but HF itself rates within tolerance


@dataclass(slots=True)
class ParityReport:
    tp: int
    dtype: str
    device: str
    steps: list[StepResult] = field(default_factory=list)

    @property
    def max_rel(self) -> float:
        return max((s.max_rel for s in self.steps), default=0.0)

    @property
    def all_tokens_agree(self) -> bool:
        return all(s.tokens_agree == s.tokens for s in self.steps)


@dataclass(slots=True)
class Step:
    """Per sequence in the step: (sequence index, number of new tokens)."""

    entries: list[tuple[int, int]]
    kind: str


def schedule(decode_steps: int) -> list[Step]:
    first_chunk = PROMPT_LENGTHS[3] - 14
    steps = [
        Step([(0, PROMPT_LENGTHS[0]), (1, PROMPT_LENGTHS[1])], "prefill 2"),
        Step([(0, 1), (1, 1), (2, PROMPT_LENGTHS[2]), (3, first_chunk)], "decode 2 + prefill 1 + chunk 1"),
        Step([(0, 1), (1, 1), (2, 1), (3, PROMPT_LENGTHS[3] - first_chunk)], "decode 3 + last chunk"),
    ]
    steps += [Step([(i, 1) for i in range(4)], "decode 4") for _ in range(decode_steps)]
    return steps


def make_prompts(vocab_size: int, seed: int) -> list[list[int]]:
    generator = random.Random(seed)
    return [[generator.randrange(vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


def hf_reference(model: torch.nn.Module, prompts: list[list[int]], steps: list[Step]):
    """Per step: {sequence: (logits of its last token, greedy token)}, and the tokens fed each step."""
    sequences = [list(p) for p in prompts]
    consumed = [0] * len(prompts)
    logits_per_step, inputs_per_step = [], []
    # Each call runs the whole sequence, so no cache is wanted; remote code that insists on a Cache
    # object whenever use_cache is on would refuse the default None.
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        for step in steps:
            inputs, logits = {}, {}
            for seq, count in step.entries:
                inputs[seq] = sequences[seq][consumed[seq] : consumed[seq] + count]
                consumed[seq] += count
                if consumed[seq] < len(prompts[seq]) and consumed[seq] < len(sequences[seq]):
                    continue  # a prefill chunk that does not reach the end produces no token
                ids = torch.tensor([sequences[seq][: consumed[seq]]])
                out = model(input_ids=ids, **extra).logits[0, -1].float()
                logits[seq] = out
                if consumed[seq] == len(sequences[seq]):
                    sequences[seq].append(int(out.argmax()))
            inputs_per_step.append(inputs)
            logits_per_step.append(logits)
    return logits_per_step, inputs_per_step


def compare(
    reference, engine, steps: list[Step], tp: int, dtype: str, device: str, near_tie: float = 0.0
) -> ParityReport:
    """Per step errors and greedy agreement. `near_tie` (relative to the logits' scale) excuses a
    different greedy token only when HF itself rates the two tokens that close: the precision of a
    bf16 run cannot order them, while float32 (near_tie 0) must agree exactly."""
    report = ParityReport(tp, dtype, device)
    for number, (step, ref, got) in enumerate(zip(steps, reference, engine)):
        max_abs = max_rel = 0.0
        agree = ties = 0
        for seq, expected in ref.items():
            actual = got[seq]
            if actual.shape != expected.shape:
                raise ValueError(
                    f"step {number}: logits of shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
                )
            error = (actual - expected).abs().max().item()
            max_abs = max(max_abs, error)
            max_rel = max(max_rel, error / max(expected.abs().max().item(), 1e-12))
            ours, theirs = int(actual.argmax()), int(expected.argmax())
            margin = (expected[theirs] - expected[ours]).item()
            tie = ours != theirs and margin <= near_tie * expected.abs().max().item()
            agree += int(ours == theirs or tie)
            ties += int(tie)
        report.steps.append(StepResult(number, step.kind, max_abs, max_rel, agree, len(ref), ties))
    return report


def run_engine(
    model_dir: str,
    model_class: str,
    inputs_per_step,
    tp: int,
    dtype: torch.dtype,
    device: str,
    trust_remote_code: bool = False,
) -> list[dict[int, torch.Tensor]]:
    """Runs the schedule through the engine as `LLM` runs a model: its own rank start-up (this
    process is rank 0, the others spawned workers; gloo on CPU, NCCL on GPUs), its model runner,
    a cache of NUM_BLOCKS blocks handed out in a shuffled order. Per step: {sequence: logits}."""
    from engine.config import EngineConfig
    from engine.model_runner import StepInputs
    from engine.worker import start_driver

    config = EngineConfig(
        model=model_dir,
        tensor_parallel_size=tp,
        dtype=dtype,
        device=device,
        block_size=BLOCK_SIZE,
        num_kv_blocks=NUM_BLOCKS,
        enforce_eager=True,
        model_class=model_class,
        trust_remote_code=trust_remote_code,
    )
    pool = list(range(NUM_BLOCKS))
    random.Random(1234).shuffle(pool)  # block tables far from the identity
    tables: dict[int, list[int]] = {}
    context: dict[int, int] = {}
    results = []
    driver = start_driver(config)
    try:
        for inputs in inputs_per_step:
            step = StepInputs([], [], [], [], [])
            for seq, tokens in inputs.items():
                start = context.get(seq, 0)
                context[seq] = start + len(tokens)
                table = tables.setdefault(seq, [])
                while len(table) * BLOCK_SIZE < context[seq]:
                    table.append(pool.pop())
                step.input_ids += tokens
                step.positions += list(range(start, context[seq]))
                step.query_lens.append(len(tokens))
                step.context_lens.append(context[seq])
                step.block_tables.append(list(table))
            logits = driver.execute(step).float().cpu()
            results.append({seq: logits[i] for i, seq in enumerate(inputs)})
    finally:
        driver.shutdown()
    return results


def verify_model(
    reference: str,
    architecture: str,
    model_class: str,
    work_dir: Path,
    tp: int,
    device: str,
    dtype: torch.dtype,
    decode_steps: int,
    seed: int = 0,
    near_tie: float = 0.0,
    overrides: dict[str, object] | None = None,
    reference_python: str | None = None,
) -> ParityReport:
    """Writes a small random checkpoint of `architecture` (its small config changed by `overrides`,
    a variant of the architecture), runs it through HF and the port, compares. `reference` is a
    transformers model type, a remote-code model directory or a modeling file; `reference_python`
    runs that side in another interpreter (porter.verify.reference)."""
    from porter.verify.reference import ReferenceSpec, run_reference

    spec = ReferenceSpec(reference, architecture, seed, decode_steps, dict(overrides or {}))
    hf = run_reference(spec, work_dir, reference_python)
    steps = schedule(decode_steps)
    engine = run_engine(
        str(work_dir), model_class, hf.inputs_per_step, tp, dtype, device, hf.trust_remote_code
    )
    return compare(hf.logits_per_step, engine, steps, tp, str(dtype).removeprefix("torch."), device, near_tie)
