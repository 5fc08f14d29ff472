"""Offline throughput: porter's engine against HF `generate_batch` and `generate`, and the roofline.

The protocol: a random-weight model of a real shape, built from its
transformers config class and saved as safetensors to a temp dir; random prompts, 256 tokens in and
256 out, EOS ignored; output and total tokens/s of each system, on the same model and prompts, in one
run, next to the floor set by the copy bandwidth and matmul rate measured in the same run.

    PYTHONPATH=. python3 benchmarks/bench_throughput.py --model llama-1b --json llama.json
    PYTHONPATH=. python3 benchmarks/bench_throughput.py --smoke      # tiny config, 8 prompts, CPU
    PYTHONPATH=. python3 benchmarks/bench_throughput.py --model opt-1.3b --engine-only  # no HF baselines

`--hf-prompts N` runs both HF baselines on the first N prompts only (they are slow), `--generate-prompts N`
and `--generate-batch-prompts N` one of them; the table says how many prompts each row ran.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, PretrainedConfig, Qwen3MoeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.hf_baselines import run_generate, run_generate_batch  # noqa: E402
from benchmarks.roofline import ModelCost, copy_bandwidth, matmul_rate, workload_roofline  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, attention_shape  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
MODELS: dict[str, PretrainedConfig] = {
    "llama-1b": LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "opt-1.3b": OPTConfig(
        hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32, vocab_size=50272
    ),
    # Qwen3-30B-A3B's layer (128 experts, 8 per token, GQA 32/4, head 128), 12 of its 48 layers, so
    # the engine, HF's copy of the weights and both KV caches fit one 80 GB GPU.
    "qwen3-moe-12l": Qwen3MoeConfig(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=12,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    "tiny-llama": LlamaConfig(**TINY, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny-qwen3-moe": Qwen3MoeConfig(
        **TINY,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "tiny-opt": OPTConfig(**TINY, ffn_dim=128, word_embed_proj_dim=64),
}
SMOKE_MODEL = {"llama-1b": "tiny-llama", "opt-1.3b": "tiny-opt", "qwen3-moe-12l": "tiny-qwen3-moe"}


def build_checkpoint(config: PretrainedConfig, dtype: torch.dtype, device: torch.device, directory: Path):
    """A random-weight HF model of `config` on `device`, saved (safetensors) to `directory`; returned for
    the HF baselines, which run on the same weights."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.save_pretrained(directory)
    return model


def model_cost(model: torch.nn.Module, config: PretrainedConfig, dtype: torch.dtype) -> ModelCost:
    unique = {id(p): p for p in model.parameters()}.values()  # a tied head counts once
    params = sum(p.numel() for p in unique)
    shape = attention_shape(config)
    element = torch.empty((), dtype=dtype).element_size()
    kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * element
    # Routed experts: the parameters under an `experts` module (transformers' naming for both the
    # per-expert ModuleList and the batched experts module); shared experts are read every step.
    expert_params = sum(
        p.numel() for name, p in model.named_parameters() if ".experts." in f".{name}" and "shared" not in name
    )
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    return ModelCost(
        params=params,
        weight_bytes=params * element,
        kv_bytes_per_token=kv_per_token,
        expert_bytes=expert_params * element if experts else 0,
        experts=experts,
        experts_per_token=getattr(config, "num_experts_per_tok", 0) if experts else 0,
    )


def run_engine(
    directory: Path,
    prompts: list[list[int]],
    args: argparse.Namespace,
    enforce_eager: bool,
    async_scheduling: bool = True,
) -> dict:
    """Start-up, then a short warm-up (kernel compiles), then the timed `LLM.generate` over all prompts."""
    start = time.perf_counter()
    llm = LLM(
        str(directory),
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.input_len + args.output_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=enforce_eager,
        async_scheduling=async_scheduling,
    )
    startup = time.perf_counter() - start
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(
            prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), show_progress=False
        )
        engine = llm.engine
        # Host time inside the model step (prepare, launches, logits) and the sampler; neither waits for
        # the GPU, which the engine does when it reads the sampled tokens back.
        timers = {"execute_host_s": 0.0, "sample_host_s": 0.0, "steps": 0, "graph_replays": 0}
        execute, sample = engine.driver.execute, engine.runner.sample
        graphs = engine.runner.decode_graphs

        def timed_execute(step):
            timers["steps"] += 1
            begin = time.perf_counter()
            logits = execute(step)
            timers["execute_host_s"] += time.perf_counter() - begin
            return logits

        def timed_sample(logits, seqs):
            begin = time.perf_counter()
            result = sample(logits, seqs)
            timers["sample_host_s"] += time.perf_counter() - begin
            return result

        engine.driver.execute, engine.runner.sample = timed_execute, timed_sample
        if graphs is not None:
            replay = graphs.replay
            graphs.replay = lambda *a: (
                timers.__setitem__("graph_replays", timers["graph_replays"] + 1) or replay(*a)
            )
        _sync(args.device)
        begin = time.perf_counter()
        if args.profile is None:
            outputs = llm.generate(prompts, params, show_progress=False)
        else:
            profiler = cProfile.Profile()
            outputs = profiler.runcall(llm.generate, prompts, params, show_progress=False)
            with open(args.profile, "w") as stream:
                pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(40)
        _sync(args.device)
        seconds = time.perf_counter() - begin
    finally:
        llm.shutdown()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"startup_s": startup, "output_tokens": tokens, "seconds": seconds, **timers}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rates(tokens: int, prompts: int, input_len: int, seconds: float) -> dict:
    return {
        "prompts": prompts,
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tokens_per_s": tokens / seconds,
        "total_tokens_per_s": (tokens + prompts * input_len) / seconds,
    }


def _subset_label(subset: list, total: int) -> str:
    return "" if len(subset) == total else f" [{len(subset)} prompts]"


def print_table(results: dict) -> None:
    """One row per system; the last columns are output tokens/s over each HF baseline's."""
    rows = results["systems"]
    baselines = {
        short: next((n for n in rows if n.startswith(prefix) and "error" not in rows[n]), None)
        for short, prefix in (("x gen_batch", "HF generate_batch"), ("x generate", "HF generate ("))
    }
    print(
        f"\n{results['model']} on {results['device_name']}: {results['num_prompts']} prompts, "
        f"{results['input_len']} in / {results['output_len']} out, {results['dtype']}"
    )
    print(
        f"{'system':<40}{'prompts':>8}{'out tok/s':>12}{'total tok/s':>13}{'x gen_batch':>13}{'x generate':>12}"
    )
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<40}  failed: {row['error']}")
            continue
        line = f"{name:<40}{row['prompts']:>8}{row['output_tokens_per_s']:>12,.0f}{row['total_tokens_per_s']:>13,.0f}"
        for short, base in baselines.items():
            width = len(short) + 2
            ratio = row["output_tokens_per_s"] / rows[base]["output_tokens_per_s"] if base else None
            line += f"{ratio:>{width}.2f}" if ratio else f"{'-':>{width}}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-1b")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--hf-prompts", type=int, default=None, help="HF baselines on the first N prompts")
    parser.add_argument("--generate-prompts", type=int, default=None, help="HF generate on the first N")
    parser.add_argument(
        "--generate-batch-prompts", type=int, default=None, help="generate_batch on the first N"
    )
    parser.add_argument("--hf-batch", type=int, default=128, help="static batch of HF generate")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["generate_batch", "generate", "sync", "eager"]
    )
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="the engine with CUDA graphs only: same as --skip generate_batch generate sync eager",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny config, 8 prompts of 32/16, CPU, float32")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--profile", type=Path, default=None, help="cProfile the engine's timed run to this file"
    )
    args = parser.parse_args()
    if args.engine_only:
        args.skip = sorted({*args.skip, "generate_batch", "generate", "sync", "eager"})
    if args.smoke:
        args.model = SMOKE_MODEL.get(args.model, args.model)
        args.num_prompts, args.input_len, args.output_len = 8, 32, 16
        args.device, args.dtype, args.hf_batch = "cpu", "float32", 4

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = MODELS[args.model]
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(
        10, config.vocab_size, (args.num_prompts, args.input_len), generator=generator
    ).tolist()
    hf_count = args.hf_prompts or args.num_prompts
    batch_prompts = prompts[: args.generate_batch_prompts or hf_count]
    generate_prompts = prompts[: args.generate_prompts or hf_count]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: dict = {
        "model": args.model,
        "device_name": device_name,
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "systems": {},
    }
    systems = results["systems"]
    with tempfile.TemporaryDirectory(prefix="porter-bench-") as tmp:
        start = time.perf_counter()
        hf_model = build_checkpoint(config, dtype, device, Path(tmp))
        results["build_s"] = time.perf_counter() - start
        cost = model_cost(hf_model, config, dtype)
        results["cost"] = cost.__dict__
        bandwidth, flops = copy_bandwidth(device), matmul_rate(device, dtype)
        roof = workload_roofline(
            cost, args.num_prompts, args.input_len, args.output_len, args.max_num_seqs, bandwidth, flops
        )
        systems["roofline"] = {"prompts": args.num_prompts, **roof.as_dict()}
        # The HF model stays on the device: the engine sizes its KV cache from the memory left.
        variants = (
            ("engine (LLM.generate)", "engine", False, True),
            ("engine, synchronous loop", "sync", False, False),
            ("engine, enforce_eager", "eager", True, True),
        )
        for name, key, eager, overlap in variants:
            if key in args.skip:
                continue
            try:
                run = run_engine(Path(tmp), prompts, args, enforce_eager=eager, async_scheduling=overlap)
            except Exception as error:  # reported in the table; the baselines still run
                systems[name] = {"error": repr(error)}
                continue
            finally:
                # The engine's timing hooks form reference cycles with it: collect them here, after
                # run_engine's frame is gone, or its KV cache stays allocated for the next engine.
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            systems[name] = {
                **run,
                **_rates(run["output_tokens"], args.num_prompts, args.input_len, run["seconds"]),
            }
            print(f"{name}: {systems[name]}", flush=True)

        if "generate_batch" not in args.skip:
            name = "HF generate_batch" + _subset_label(batch_prompts, args.num_prompts)
            try:
                tokens, seconds = run_generate_batch(hf_model, batch_prompts, args.output_len)
                systems[name] = _rates(tokens, len(batch_prompts), args.input_len, seconds)
            except Exception as error:  # a baseline that breaks is reported, not fatal
                systems[name] = {"error": repr(error)}
            gc.collect()
        if "generate" not in args.skip:
            name = f"HF generate (batch {args.hf_batch})" + _subset_label(generate_prompts, args.num_prompts)
            try:
                tokens, seconds = run_generate(hf_model, generate_prompts, args.output_len, args.hf_batch)
                systems[name] = _rates(tokens, len(generate_prompts), args.input_len, seconds)
            except Exception as error:
                systems[name] = {"error": repr(error)}
    print_table(results)
    print(
        f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s, {args.dtype} matmul {flops / 1e12:,.1f} TFLOP/s; "
        f"roofline: {roof.memory_bound_steps} of {roof.decode_steps} decode steps memory-bound"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
