"""Runs a port through the engine's loader and paged forward, step by step, beside HF's own model.

The schedule mixes everything a serving step can hold: step 0 prefills two prompts; step 1
decodes those, prefills a third whole and the first chunk of a fourth; step 2 decodes three and
finishes the fourth's prefill; then every sequence decodes. Decode tokens are HF's greedy tokens
(teacher forcing), so a difference in one step cannot hide behind diverging paths later. The HF
reference recomputes each sequence from scratch without a cache, so the engine's KV cache,
block tables and slot mapping are all under test.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty

import torch
import torch.multiprocessing as mp

PROMPT_LENGTHS = (5, 11, 16, 23)
BLOCK_SIZE = 16


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
    with torch.no_grad():
        for step in steps:
            inputs, logits = {}, {}
            for seq, count in step.entries:
                inputs[seq] = sequences[seq][consumed[seq] : consumed[seq] + count]
                consumed[seq] += count
                if consumed[seq] < len(prompts[seq]) and consumed[seq] < len(sequences[seq]):
                    continue  # a prefill chunk that does not reach the end produces no token
                ids = torch.tensor([sequences[seq][: consumed[seq]]])
                out = model(input_ids=ids).logits[0, -1].float()
                logits[seq] = out
                if consumed[seq] == len(sequences[seq]):
                    sequences[seq].append(int(out.argmax()))
            inputs_per_step.append(inputs)
            logits_per_step.append(logits)
    return logits_per_step, inputs_per_step


def engine_logits(
    model_dir: str,
    model_class: str,
    inputs_per_step,
    dtype: torch.dtype,
    device: str,
    trust_remote_code: bool = False,
) -> list[dict[int, torch.Tensor]]:
    """Runs the schedule through the engine at the current tensor-parallel rank."""
    from engine.input_metadata import InputMetadata
    from engine.kv_cache import allocate_kv_caches
    from engine.layers.attention import cache_shape_of
    from engine.model_loader import load_model

    model, _ = load_model(
        model_dir, dtype, device, model_class=model_class, trust_remote_code=trust_remote_code
    )
    num_layers, kv_per_rank, head_dim = cache_shape_of(model)
    num_blocks = 64
    caches = allocate_kv_caches(num_layers, num_blocks, BLOCK_SIZE, kv_per_rank, head_dim, dtype, device)
    pool = list(range(num_blocks))
    random.Random(1234).shuffle(pool)  # block tables far from the identity
    tables: dict[int, list[int]] = {}
    context: dict[int, int] = {}
    results = []
    with torch.inference_mode():
        for inputs in inputs_per_step:
            ids, positions, query_lens, context_lens, block_tables = [], [], [], [], []
            for seq, tokens in inputs.items():
                start = context.get(seq, 0)
                context[seq] = start + len(tokens)
                table = tables.setdefault(seq, [])
                while len(table) * BLOCK_SIZE < context[seq]:
                    table.append(pool.pop())
                ids += tokens
                positions += list(range(start, context[seq]))
                query_lens.append(len(tokens))
                context_lens.append(context[seq])
                block_tables.append(table)
            metadata = InputMetadata.build(query_lens, context_lens, block_tables, BLOCK_SIZE, device)
            hidden = model(
                torch.tensor(ids, device=device), torch.tensor(positions, device=device), caches, metadata
            )
            logits = model.compute_logits(hidden, metadata).float().cpu()
            results.append({seq: logits[i] for i, seq in enumerate(inputs)})
    return results


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
):
    if tp == 1:
        return engine_logits(model_dir, model_class, inputs_per_step, dtype, device, trust_remote_code)
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [
        context.Process(
            target=_rank_main,
            args=(
                rank,
                tp,
                port,
                model_dir,
                model_class,
                inputs_per_step,
                dtype,
                device,
                trust_remote_code,
                queue,
            ),
        )
        for rank in range(tp)
    ]
    for process in processes:
        process.start()
    outcome = None
    while outcome is None:
        try:
            outcome = queue.get(timeout=2)
        except Empty:
            if not any(p.is_alive() for p in processes):  # every rank ended without an answer
                outcome = "tensor-parallel ranks exited without a result: " + ", ".join(
                    f"rank {r} exit code {p.exitcode}" for r, p in enumerate(processes)
                )
    for process in processes:
        process.join(timeout=120)
    if isinstance(outcome, str):
        raise RuntimeError(outcome)
    return [{seq: torch.from_numpy(logits) for seq, logits in step.items()} for step in outcome]


def _rank_main(
    rank, tp, port, model_dir, model_class, inputs_per_step, dtype, device, trust_remote_code, queue
) -> None:
    from engine.distributed import destroy_distributed, init_distributed

    try:
        if device.startswith("cuda"):
            device = f"cuda:{rank}"
            torch.cuda.set_device(rank)
        else:
            os.environ["PORTER_DEVICE"] = "cpu"
        init_distributed(rank, tp, f"tcp://127.0.0.1:{port}", "nccl" if device.startswith("cuda") else "gloo")
        results = engine_logits(model_dir, model_class, inputs_per_step, dtype, device, trust_remote_code)
        if rank == 0:
            # numpy pickles by value; a tensor would travel as shared memory that dies with this process.
            queue.put([{seq: logits.numpy() for seq, logits in step.items()} for step in results])
    except Exception as error:  # surfaced in the parent as one message
        queue.put(f"rank {rank}: {type(error).__name__}: {error}")
    finally:
        destroy_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
