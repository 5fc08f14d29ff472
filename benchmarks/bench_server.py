"""Online serving: `porter serve` under concurrent streaming clients of the OpenAI API.

The protocol: a random-weight model of a real shape (as bench_throughput.py builds it) with a
word-level tokenizer (token i is the word "w<i>", so every token is one streamed word), served by
`porter serve` in its own process on loopback; `--clients` concurrent clients (the official `openai`
client, streaming) send `--requests` completions of `--input-len` random tokens, `--output-len`
tokens each, EOS ignored. Reported: requests/s and output tokens/s over the whole run, time to first
token (TTFT) and time per output token after the first (TPOT), p50 and p99.

    PYTHONPATH=. python3 benchmarks/bench_server.py --model llama-1b --json server.json
    PYTHONPATH=. python3 benchmarks/bench_server.py --smoke     # tiny config, CPU, a few requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_throughput import MODELS, SMOKE_MODEL, build_checkpoint  # noqa: E402
from engine.distributed import find_free_port  # noqa: E402

_SERVED_NAME = "bench"


def save_word_tokenizer(vocab_size: int, directory: Path) -> None:
    """A tokenizer whose token i >= 3 is the word "w<i>" (0-2 are unk, bos, eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {name: i for i, name in enumerate(specials)} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)


def start_server(directory: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "porter.cli", "serve", str(directory), "--port", str(port),
        "--served-model-name", _SERVED_NAME, "--device", args.device, "--dtype", args.dtype,
        "--max-model-len", str(args.input_len + args.output_len), "--tp", str(args.tp),
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent)


def wait_until_healthy(port: int, server: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not healthy within {timeout_s:g} s")


async def one_request(
    client: openai.AsyncOpenAI, prompt: list[int], output_len: int
) -> tuple[float, float, int]:
    """(time to first token, seconds from first to last token, tokens) of one streamed completion."""
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.completions.create(
        model=_SERVED_NAME,
        prompt=prompt,
        max_tokens=output_len,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        words = len(chunk.choices[0].text.split()) if chunk.choices else 0
        if words:
            now = time.perf_counter()
            first = now if first is None else first
            last = now
            tokens += words
    if first is None or last is None:
        raise RuntimeError("a request streamed no tokens")
    return first - sent, last - first, tokens


async def drive(port: int, prompts: list[list[int]], args: argparse.Namespace) -> tuple[list, float]:
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[tuple[float, float, int]] = []
    base_url = f"http://127.0.0.1:{port}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:

        async def client_loop() -> None:
            while not queue.empty():
                results.append(await one_request(client, queue.get_nowait(), args.output_len))

        await one_request(client, prompts[0], 4)  # warm-up: first-step compiles and graph captures
        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
        return results, time.perf_counter() - start


def summarize(results: list[tuple[float, float, int]], seconds: float) -> dict:
    def percentile(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    ttft = [r[0] * 1000 for r in results]
    tpot = [r[1] / (r[2] - 1) * 1000 for r in results if r[2] > 1]
    tokens = sum(r[2] for r in results)
    return {
        "requests": len(results),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(results) / seconds, 2),
        "output_tokens_per_s": round(tokens / seconds, 1),
        "ttft_ms_p50": round(statistics.median(ttft), 2),
        "ttft_ms_p99": round(percentile(ttft, 99), 2),
        "tpot_ms_p50": round(statistics.median(tpot), 3) if tpot else None,
        "tpot_ms_p99": round(percentile(tpot, 99), 3) if tpot else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-1b")
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU, few requests")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.model = SMOKE_MODEL.get(args.model, args.model)
        args.device, args.dtype = "cpu", "float32"
        args.clients, args.requests, args.input_len, args.output_len = 8, 32, 16, 16
    config = MODELS[args.model]
    rng = random.Random(0)
    prompts = [
        [rng.randrange(3, config.vocab_size) for _ in range(args.input_len)] for _ in range(args.requests)
    ]
    with tempfile.TemporaryDirectory(prefix="porter-bench-server-") as work:
        directory = Path(work)
        dtype = getattr(torch, args.dtype)
        build_checkpoint(config, dtype, torch.device("cpu"), directory)
        save_word_tokenizer(config.vocab_size, directory)
        port = find_free_port()
        server = start_server(directory, port, args)
        try:
            wait_until_healthy(port, server, timeout_s=600)
            results, seconds = asyncio.run(drive(port, prompts, args))
        finally:
            server.terminate()
            server.wait(timeout=60)
    summary = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "tp": args.tp,
        "clients": args.clients,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        **summarize(results, seconds),
    }
    print(
        "| model | clients | requests | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {args.model} ({args.device}, {args.dtype}, tp={args.tp}) | {args.clients} | {summary['requests']} "
        f"| {summary['requests_per_s']} | {summary['output_tokens_per_s']} "
        f"| {summary['ttft_ms_p50']} / {summary['ttft_ms_p99']} | {summary['tpot_ms_p50']} / {summary['tpot_ms_p99']} |"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
