"""Faults around the server, bounded and self-stopping: requests aborted inside the engine, clients
that leave mid-stream or mid-request, and a tensor-parallel worker killed under a running server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.server_harness import MODEL_NAME, running_server

LONG = {"model": MODEL_NAME, "max_tokens": 240, "ignore_eos": True, "temperature": 0}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_aborting_requests_mid_run_returns_their_blocks(tiny_model_dir):
    with LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=16) as llm:
        engine = llm.engine
        blocks = engine.scheduler.block_manager
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        for index, length in enumerate((20, 35, 3)):
            engine.add_request(str(index), list(range(3, 3 + length)), params)
        for _ in range(4):
            engine.step()
        held = blocks.num_blocks - blocks.num_free_blocks
        assert held > 0 and engine.sequences("1")[0].num_output_tokens > 0
        engine.abort_request("1")  # running, with tokens in flight
        assert blocks.num_blocks - blocks.num_free_blocks < held
        engine.abort_request("0")
        engine.abort_request("2")
        assert not engine.has_unfinished_requests()
        assert blocks.num_free_blocks == blocks.num_blocks
        # The engine goes on serving after the aborts, from the freed blocks.
        finished = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))
        assert len(finished[0].outputs[0].token_ids) == 4
        assert blocks.num_free_blocks == blocks.num_blocks


def test_clients_that_leave_are_aborted_and_their_blocks_freed(tiny_model_dir):
    with running_server(tiny_model_dir, num_kv_blocks=128) as server:
        streams = []
        with httpx.Client(timeout=30) as client:
            for index in range(6):
                request = client.build_request(
                    "POST",
                    server.api_url + "/completions",
                    json={**LONG, "prompt": [5 + index], "stream": True},
                )
                response = client.send(request, stream=True)
                lines = response.iter_lines()
                received = [next(lines) for _ in range(6)]  # three events and their blank lines
                assert sum(line.startswith("data: {") for line in received) == 3
                streams.append(response)
            for response in streams:
                response.close()  # the client hangs up mid-stream
        # A client that gives up on a non-streaming request hangs up too: it closes its connection
        # once the engine has generated for it (not after a time, which a fast machine outruns).
        server.wait_until_idle(timeout_s=10)
        generated = server.engine.engine.num_generated_tokens
        with _raw_post(server.base_url, "/v1/completions", {**LONG, "prompt": [9]}):
            deadline = time.monotonic() + 10
            while server.engine.engine.num_generated_tokens == generated:
                assert time.monotonic() < deadline, "the request never started generating"
                time.sleep(0.002)
        server.wait_until_idle(timeout_s=10)
        llm_engine = server.engine.engine
        blocks = llm_engine.scheduler.block_manager
        assert server.engine.num_aborted_requests == 7
        assert server.engine.num_finished_requests == 0
        assert blocks.num_free_blocks == blocks.num_blocks
        # Far fewer tokens than 7 full completions: the requests stopped when their clients left.
        assert llm_engine.num_generated_tokens < 7 * LONG["max_tokens"] // 2
        answer = httpx.post(server.api_url + "/completions", json={**LONG, "prompt": [5], "max_tokens": 3})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


@contextlib.contextmanager
def _raw_post(base_url: str, path: str, body: dict) -> Iterator[None]:
    """An HTTP POST sent on a bare socket that is closed, unanswered, when the block ends."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(head + payload)
        yield


@pytest.mark.slow
def test_a_killed_tensor_parallel_worker_is_a_clear_error_not_a_hang(tiny_model_dir):
    with running_server(tiny_model_dir, tensor_parallel_size=2, num_kv_blocks=64) as server:
        with httpx.Client(timeout=60) as client:
            ok = client.post(server.api_url + "/completions", json={**LONG, "prompt": [5], "max_tokens": 2})
            assert ok.status_code == 200
            worker = server.engine.engine.driver.workers.processes[0]
            started = time.monotonic()
            stream = {**LONG, "prompt": [7], "stream": True}
            with client.stream("POST", server.api_url + "/completions", json=stream) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: {")
                os.kill(worker.pid, signal.SIGKILL)
                events = [line for line in lines if line.startswith("data: ")]
            assert time.monotonic() - started < 30
            assert events[-1] == "data: [DONE]"
            assert '"engine_dead"' in events[-2] and "worker rank 1" in events[-2]
            health = client.get(server.base_url + "/health")
            assert health.status_code == 503 and "worker rank 1" in health.json()["error"]["message"]
            after = client.post(
                server.api_url + "/completions", json={**LONG, "prompt": [5], "max_tokens": 2}
            )
            assert after.status_code == 500
            assert after.json()["error"]["code"] == "engine_dead"
