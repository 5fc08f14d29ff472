"""`porter serve` as a user runs it: its own process on loopback, answered by curl-style HTTP and by the
`openai` client, and stopped cleanly by Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import REPO_ROOT, find_free_port
from tests.tiny_model import write_tiny_model

_START_TIMEOUT_S = 120.0


@pytest.mark.slow
def test_porter_serve_answers_http_and_the_openai_client_then_stops_on_ctrl_c(tmp_path):
    model_dir = write_tiny_model(tmp_path / "llama")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]  # the bundled Llama port runs the tiny checkpoint
    (model_dir / "config.json").write_text(json.dumps(config))
    port = find_free_port()
    command = [sys.executable, "-m", "porter.cli", "serve", str(model_dir), "--port", str(port)]
    command += ["--served-model-name", "llama", "--device", "cpu", "--num-kv-blocks", "32"]
    server = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "porter serve did not come up"
            time.sleep(0.25)
        body = {"model": "llama", "prompt": "w5 w6 w7", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        completion = client.completions.create(**body)
        assert completion.choices[0].text == answer["choices"][0]["text"]
        assert len(answer["choices"][0]["text"].split()) == 4
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert "Application shutdown complete" in output
    assert "Traceback" not in output
