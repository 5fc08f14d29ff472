"""A bounded load test on loopback: 64 concurrent `openai` clients send 2,000 requests of mixed lengths,
streaming and not, to a tiny model whose KV cache is too small for them all, so the scheduler must
preempt. Every greedy answer must equal the same request run alone, no request may be lost or
answered twice, and every KV block must be back in the pool at the end."""

from __future__ import annotations

import asyncio
import random
import resource
import time

import httpx
import pytest
import torch

from tests.engine.server_harness import add_chat_template, running_server
from tests.engine.server_load_clients import run_concurrently_in_subprocess, run_sequentially
from tests.tiny_model import write_tiny_model

NUM_CLIENTS = 64
NUM_REQUESTS = 2000
NUM_DISTINCT = 48
# 64 requests of up to ~50 tokens want ~200 blocks of 16 at once; 40 force preemption.
NUM_KV_BLOCKS = 40
# Generous for a loaded 2-core CI machine; the run is bounded so a hang fails instead of waiting.
TIME_LIMIT_S = 120.0


def _distinct_requests() -> list[dict]:
    rng = random.Random(0)
    requests = []
    for index in range(NUM_DISTINCT):
        prompt = [rng.randrange(3, 300) for _ in range(rng.choice([1, 3, 9, 17, 30]))]
        request = {"max_tokens": rng.choice([1, 2, 4, 8, 16]), "temperature": 0}
        if index % 4 == 3:
            request["messages"] = [{"role": "user", "content": " ".join(f"w{t}" for t in prompt)}]
        else:
            request["prompt"] = prompt
        requests.append(request)
    return requests


@pytest.mark.slow
def test_64_clients_2000_requests_match_each_request_run_alone(tiny_model_dir, tmp_path):
    torch.set_num_threads(1)
    # One layer: the test is of the server and the scheduler, and the CPU attention path costs per layer.
    model_dir = add_chat_template(write_tiny_model(tmp_path / "model", num_hidden_layers=1))
    requests = _distinct_requests()
    rng = random.Random(1)
    plan = [(rng.randrange(NUM_DISTINCT), rng.random() < 0.5) for _ in range(NUM_REQUESTS)]
    with running_server(model_dir, num_kv_blocks=NUM_KV_BLOCKS) as server:
        alone = [answer[1:] for answer in asyncio.run(run_sequentially(server.api_url, requests))]
        started, server_cpu, clients_cpu = time.perf_counter(), time.process_time(), _children_cpu()
        answers = run_concurrently_in_subprocess(server.api_url, requests, plan, NUM_CLIENTS, TIME_LIMIT_S)
        seconds = time.perf_counter() - started
        server_cpu, clients_cpu = time.process_time() - server_cpu, _children_cpu() - clients_cpu
        server.wait_until_idle()
        llm_engine = server.engine.engine
        blocks = llm_engine.scheduler.block_manager
        assert blocks.num_free_blocks == blocks.num_blocks == NUM_KV_BLOCKS
        assert llm_engine.num_preemptions > 0, "the KV cache was meant to force preemption"
        assert server.engine.num_finished_requests == NUM_DISTINCT + NUM_REQUESTS
        assert server.engine.num_aborted_requests == 0
        metrics = httpx.get(server.base_url + "/metrics").text
    assert "porter_kv_blocks_used 0" in metrics
    assert len(answers) == NUM_REQUESTS
    assert len({answer[0] for _, answer in answers}) == NUM_REQUESTS  # every response its own
    assert sorted(index for index, _ in answers) == sorted(index for index, _ in plan)
    mismatches = [
        (index, answer[1:], alone[index]) for index, answer in answers if answer[1:] != alone[index]
    ]
    assert not mismatches, f"{len(mismatches)} answers differ from the request run alone: {mismatches[:3]}"
    print(
        f"{NUM_REQUESTS} requests, {NUM_CLIENTS} clients: {seconds:.1f} s wall, {NUM_REQUESTS / seconds:.0f} req/s; "
        f"CPU {server_cpu:.1f} s in the server's process, {clients_cpu:.1f} s in the clients'"
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
