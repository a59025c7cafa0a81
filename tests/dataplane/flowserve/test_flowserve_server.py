from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from flowserve_live import LiveServer

from controlplane.wire import GenerateDelta, GenerateDone, InstanceHealth


def generate(
    server: LiveServer, request_id: str, **body: Any
) -> tuple[list[GenerateDelta], GenerateDone]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/generate", json={"request_id": request_id, **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["type"] for line in lines[:-1]] == ["delta"] * (len(lines) - 1)
    return [GenerateDelta.model_validate(x) for x in lines[:-1]], GenerateDone.model_validate(
        lines[-1]
    )


def text_of(deltas: list[GenerateDelta], index: int = 0) -> str:
    return "".join(d.text for d in deltas if d.index == index)


def token_ids_of(deltas: list[GenerateDelta], index: int = 0) -> list[int]:
    return [t for d in deltas if d.index == index for t in d.token_ids]


GREEDY = {"temperature": 0.0, "max_tokens": 20, "ignore_eos": True}


def test_health(live_server: LiveServer) -> None:
    health = InstanceHealth.model_validate(httpx.get(live_server.url + "/health").json())
    assert health.status == "ok"
    assert (health.model, health.instance_id, health.max_model_len) == ("tiny", "inst-1", 2048)


def test_streamed_prompt_matches_the_tokens(live_server: LiveServer) -> None:
    deltas, done = generate(live_server, "p1", prompt="The quick brown fox", sampling=GREEDY)
    ids = token_ids_of(deltas)
    assert len(ids) == done.completion_tokens == 20
    tokenizer = live_server.engine.tokenizer
    assert done.prompt_tokens == len(tokenizer("The quick brown fox")["input_ids"])
    assert text_of(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert [d.finish_reason for d in deltas][-1] == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert all(d.logprobs is None for d in deltas)
    assert done.prompt_text is None


def test_messages_echo_and_logprobs(live_server: LiveServer) -> None:
    sampling = {**GREEDY, "max_tokens": 5, "logprobs": True, "top_logprobs": 2}
    messages = [{"role": "user", "content": "hi there"}]
    deltas, done = generate(live_server, "m1", messages=messages, sampling=sampling, echo=True)
    assert done.prompt_text == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    for d in deltas:
        assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
        for lp in d.logprobs:
            assert len(lp.top_logprobs) == 2 and lp.logprob <= 0.0 and lp.bytes is not None
            assert lp.top_logprobs[0].logprob >= lp.logprob - 1e-6  # greedy: best is chosen


def test_n_choices_with_a_seed_are_reproducible(live_server: LiveServer) -> None:
    sampling = {"temperature": 1.0, "seed": 42, "n": 2, "max_tokens": 12, "ignore_eos": True}
    first, done = generate(live_server, "n1", prompt="Hello", sampling=sampling)
    again, _ = generate(live_server, "n2", prompt="Hello", sampling=sampling)
    assert {d.index for d in first} == {0, 1}
    assert done.completion_tokens == 24
    for index in (0, 1):
        assert token_ids_of(first, index) == token_ids_of(again, index)
        assert [d.finish_reason for d in first if d.finish_reason] == ["length", "length"]
    assert token_ids_of(first, 0) != token_ids_of(first, 1)


def test_stop_string_truncates_and_stops(live_server: LiveServer) -> None:
    sampling = {**GREEDY, "max_tokens": 40}
    deltas, _ = generate(live_server, "s0", prompt="Once upon", sampling=sampling)
    full = text_of(deltas)
    stop = full[12:15]
    assert len(stop) == 3
    deltas, done = generate(
        live_server, "s1", prompt="Once upon", sampling={**sampling, "stop": [stop]}
    )
    assert text_of(deltas) == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert done.completion_tokens < 40


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": "x"}, "request_id", None),
        (
            {"request_id": "b", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            None,
            None,
        ),
        ({"request_id": "b", "prompt": "x", "surprise": 1}, "surprise", None),
        (
            {"request_id": "b", "prompt": "x", "sampling": {"temperature": -1}},
            "sampling.temperature",
            None,
        ),
        (
            {"request_id": "b", "prompt_token_ids": [1] * 2049},
            "messages",
            "context_length_exceeded",
        ),
        ({"request_id": "b", "prompt_token_ids": [10**6]}, "prompt_token_ids", None),
        ({"request_id": "b", "prompt_token_ids": []}, "prompt", None),
    ],
)
def test_bad_requests_get_400(
    live_server: LiveServer, body: dict[str, Any], param: str | None, code: str | None
) -> None:
    response = httpx.post(live_server.url + "/generate", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_invalid_json_gets_400(live_server: LiveServer) -> None:
    response = httpx.post(live_server.url + "/generate", content=b"{nope")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


GENERATED = 'flowserve:generation_tokens_total{model_name="tiny"}'


def metric_samples(server: LiveServer) -> dict[str, float]:
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in response.text.splitlines()
        if line and not line.startswith("#")
    }


def wait_until_idle(server: LiveServer, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while server.engine.has_unfinished() or server.engine.num_running:
        assert time.monotonic() < deadline, "the engine still has the request"
        time.sleep(0.02)


def test_client_disconnect_aborts_the_request(live_server: LiveServer) -> None:
    # Unbounded (up to max_model_len, 2048 tokens): only the abort can end it quickly.
    body = {"request_id": "gone", "prompt": "Hello", "sampling": {"ignore_eos": True}}
    before = metric_samples(live_server)[GENERATED]
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        with client.stream("POST", "/generate", json=body) as response:
            first = json.loads(next(response.iter_lines()))
            assert first["type"] == "delta"
            # Read from this thread while the engine thread steps (a step may be moving the
            # running queue): polled, not sampled once.
            deadline = time.monotonic() + 5
            while live_server.engine.num_running != 1:
                assert time.monotonic() < deadline, "the request is not running"
                time.sleep(0.01)
        # leaving the block closes the connection mid-stream
    wait_until_idle(live_server)
    health = httpx.get(live_server.url + "/health").json()
    assert health["num_requests_running"] == health["num_requests_waiting"] == 0
    assert metric_samples(live_server)[GENERATED] - before < 1000
    # the id is free again
    generate(live_server, "gone", prompt="Hello", sampling={**GREEDY, "max_tokens": 2})


def test_abort_route_and_duplicate_ids(live_server: LiveServer) -> None:
    body = {"request_id": "long", "prompt": "Hello", "sampling": {"ignore_eos": True, "n": 2}}
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        with client.stream("POST", "/generate", json=body) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines))["type"] == "delta"
            duplicate = httpx.post(live_server.url + "/generate", json=body)
            assert duplicate.status_code == 409
            assert duplicate.json()["error"]["code"] == "duplicate_request_id"
            aborted = httpx.post(live_server.url + "/abort/long").json()
            assert aborted == {"request_id": "long", "aborted": True}
            rest = [json.loads(line) for line in lines]
    assert rest[-1]["type"] == "done"
    reasons = [x["finish_reason"] for x in rest if x["type"] == "delta" and x["finish_reason"]]
    assert reasons == ["abort", "abort"]
    assert rest[-1]["completion_tokens"] < 2 * 2000
    assert httpx.post(live_server.url + "/abort/long").json()["aborted"] is False
    wait_until_idle(live_server)


def test_metrics(live_server: LiveServer) -> None:
    generate(live_server, "metrics", prompt="Hello", sampling={**GREEDY, "max_tokens": 3})
    samples = metric_samples(live_server)
    assert samples['flowserve:num_requests_running{model_name="tiny"}'] == 0
    assert samples['flowserve:num_requests_waiting{model_name="tiny"}'] == 0
    assert samples['flowserve:prompt_tokens_total{model_name="tiny"}'] > 0
    assert samples['flowserve:generation_tokens_total{model_name="tiny"}'] >= 3
    key = 'flowserve:request_success_total{finished_reason="length",model_name="tiny"}'
    assert samples[key] >= 1


def test_metrics_with_vllm_names_latencies_and_prefix_cache(live_server: LiveServer) -> None:
    shared = "The same long system prompt, repeated so that it fills several KV blocks. " * 4
    for i in range(2):
        generate(live_server, f"prefix-{i}", prompt=shared, sampling={**GREEDY, "max_tokens": 4})
    samples = metric_samples(live_server)
    name = '{model_name="tiny"}'
    assert 0 <= samples[f"flowserve:kv_cache_usage_perc{name}"] <= 1
    queries = samples[f"flowserve:prefix_cache_queries_total{name}"]
    hits = samples[f"flowserve:prefix_cache_hits_total{name}"]
    assert queries > 0 and hits > 0  # the second request reused the first one's full blocks
    assert f"flowserve:num_preemptions_total{name}" in samples
    assert samples[f"flowserve:time_to_first_token_seconds_count{name}"] >= 2
    assert samples[f"flowserve:inter_token_latency_seconds_count{name}"] >= 6
    assert samples[f"flowserve:e2e_request_latency_seconds_count{name}"] >= 2
