"""The OpenAI-compatible server through the official `openai` client on loopback: completions and chat,
streaming and not, the sampling fields, and OpenAI's error JSON with the right HTTP status."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine.server_harness import MODEL_NAME, add_chat_template, running_server
from tests.tiny_model import reference_greedy, write_tiny_model

PROMPT_IDS = [5, 17, 42, 101, 7]
PROMPT_TEXT = " ".join(f"w{token}" for token in PROMPT_IDS)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    model_dir = add_chat_template(write_tiny_model(tmp_path_factory.mktemp("chat_model")))
    with running_server(model_dir, num_kv_blocks=8) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)


def _words(token_ids: list[int]) -> str:
    return " ".join(f"w{token}" for token in token_ids if token > 2)


def test_completion_is_the_reference_greedy_continuation(client, tiny_reference):
    expected = reference_greedy(tiny_reference, PROMPT_IDS, 8, eos_token_id=2)
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT_TEXT, max_tokens=8, temperature=0)
    assert response.choices[0].text == _words(expected)
    assert response.usage.prompt_tokens == len(PROMPT_IDS)
    assert response.usage.completion_tokens == len(expected)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=PROMPT_IDS, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == response.choices[0].text


def test_streamed_text_adds_up_to_the_whole_response(client):
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT_TEXT, max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL_NAME, prompt=PROMPT_TEXT, max_tokens=12, temperature=0, stream=True
        )
    )
    assert len(chunks) > 2  # streamed token by token, not in one piece
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_stop_string_ends_the_text_and_is_never_streamed(client):
    words = client.completions.create(model=MODEL_NAME, prompt=PROMPT_TEXT, max_tokens=8, temperature=0)
    stop = words.choices[0].text.split()[3]
    whole = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT_TEXT, max_tokens=8, temperature=0, stop=[stop]
    )
    assert whole.choices[0].finish_reason == "stop"
    assert stop not in whole.choices[0].text
    streamed = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT_TEXT, max_tokens=8, temperature=0, stop=stop, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text


def test_several_prompts_and_n_completions_get_one_choice_each(client):
    response = client.completions.create(
        model=MODEL_NAME, prompt=["w5 w6", "w7 w8 w9"], max_tokens=4, temperature=0.8, n=2, seed=3
    )
    assert sorted(choice.index for choice in response.choices) == [0, 1, 2, 3]
    again = client.completions.create(
        model=MODEL_NAME, prompt=["w5 w6", "w7 w8 w9"], max_tokens=4, temperature=0.8, n=2, seed=3
    )
    assert [c.text for c in again.choices] == [c.text for c in response.choices]  # seeded: reproducible
    streamed = client.completions.create(
        model=MODEL_NAME,
        prompt=["w5 w6", "w7 w8 w9"],
        max_tokens=4,
        temperature=0.8,
        n=2,
        seed=3,
        stream=True,
    )
    texts: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(4)] == [c.text for c in sorted(response.choices, key=lambda c: c.index)]


def test_logprobs_come_in_each_apis_layout(client):
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT_TEXT, max_tokens=3, temperature=0, logprobs=2
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    # Greedy: the sampled token is the most likely one.
    assert all(
        max(top.values()) == pytest.approx(lp)
        for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs)
    )
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": PROMPT_TEXT}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
    )
    content = chat.choices[0].logprobs.content
    assert [entry.token for entry in content] == chat.choices[0].message.content.split()


def test_chat_uses_the_chat_template(client):
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT_TEXT, max_tokens=6, temperature=0)
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": PROMPT_TEXT}], max_tokens=6, temperature=0
    )
    # The template joins the message words, so the chat prompt is the same tokens.
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": PROMPT_TEXT}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == chat.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_models_health_and_metrics(server, client):
    assert [model.id for model in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    client.completions.create(model=MODEL_NAME, prompt=PROMPT_TEXT, max_tokens=4, temperature=0)
    metrics = httpx.get(server.base_url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.text.splitlines()
        if not line.startswith("#")
    }
    assert values["porter_kv_blocks_total"] == 8
    assert values["porter_kv_blocks_used"] == 0  # nothing runs between requests
    assert values["porter_requests_running"] == values["porter_requests_waiting"] == 0
    assert values["porter_generation_tokens_total"] >= 4
    assert values["porter_requests_finished_total"] >= 1
    assert values["porter_generation_tokens_per_second"] >= 0


@pytest.mark.parametrize(
    "body, status, param, says",
    [
        ({"prompt": "w5", "stop": 5}, 400, "stop", "valid string"),
        ({"prompt": "w5", "temperature": -1}, 400, None, "temperature must be >= 0"),
        ({"prompt": "w5", "top_p": 0}, 400, None, "top_p"),
        ({"prompt": "w5", "n": 0}, 400, None, "n must be"),
        ({"prompt": "w5", "n": 10**20}, 400, None, "n must be at most 128"),
        ({"prompt": "w5", "seed": 2**64}, 400, None, "seed must be None or an integer of at most 64 bits"),
        ({"prompt": "w5", "max_tokens": 0}, 400, None, "max_tokens"),
        ({"prompt": "w5", "logprobs": 50}, 400, None, "top logprobs"),
        ({"prompt": [5, 300]}, 400, "prompt", "outside the vocabulary"),
        ({"prompt": [5] * 300}, 400, "prompt", "max_model_len"),
        ({"prompt": "w5", "max_tokens": 250}, 400, "prompt", "KV blocks"),
        ({"prompt": []}, 400, "prompt", "must not be empty"),
        ({"prompt": "w5", "echo": True}, 400, None, "echo is not supported"),
        ({}, 400, "prompt", "Field required"),
        ({"prompt": "w5", "model": "no-such-model"}, 404, "model", "does not exist"),
    ],
)
def test_bad_requests_get_openai_error_json(server, body, status, param, says):
    response = httpx.post(server.api_url + "/completions", json={"model": MODEL_NAME, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"]
    assert error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_bad_json_and_bad_chat_requests_are_400(server):
    response = httpx.post(
        server.api_url + "/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the request body is not valid JSON"
    for body, says in [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "w5"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text content"),
        ({"messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2}, "top_logprobs needs logprobs"),
    ]:
        response = httpx.post(server.api_url + "/chat/completions", json={"model": MODEL_NAME, **body})
        assert response.status_code == 400, response.text
        assert says in response.json()["error"]["message"]


def test_the_openai_client_raises_its_own_error_classes(client):
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL_NAME, prompt=[5, 999], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="w5", max_tokens=2)


def test_a_model_without_a_chat_template_refuses_chat(tiny_model_dir):
    with running_server(tiny_model_dir, num_kv_blocks=16) as server:
        response = httpx.post(
            server.api_url + "/chat/completions",
            json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "w5"}]},
        )
    assert response.status_code == 400
    assert (
        json.loads(response.text)["error"]["message"]
        == "this model has no chat template: use /v1/completions"
    )


_ANY_JSON = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-3, 400), st.text(max_size=4)), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_COMPLETION_FIELDS = [
    "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "logprobs",
    "stream", "presence_penalty", "min_p", "stop_token_ids", "ignore_eos", "echo", "logit_bias",
]  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(_COMPLETION_FIELDS), _ANY_JSON, max_size=5))
def test_any_request_body_is_answered_or_refused_never_a_server_error(server, body):
    body = {"model": MODEL_NAME, "prompt": [5, 6], "max_tokens": 2, **body}
    response = httpx.post(server.api_url + "/completions", json=body, timeout=60)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]


def test_the_token_rate_covers_the_last_ten_seconds():
    from engine.server.metrics import TokenRate

    rate = TokenRate()
    assert rate.update(0, now=0.0) == 0.0
    assert rate.update(100, now=5.0) == 20.0
    assert rate.update(300, now=10.0) == 30.0
    # At 30 s the samples at 0 and 5 s are over 10 s old and go, except the newest of them (10 s).
    assert rate.update(300, now=30.0) == 0.0
    assert rate.update(500, now=35.0) == pytest.approx(200 / 25)
