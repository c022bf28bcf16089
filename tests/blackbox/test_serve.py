"""The OpenAI client teacher against a real kdistill server on loopback: round trips, retries, budget, secrets."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import urllib.request

import pytest

from kdistill.blackbox import BlackBoxError, Budget, BudgetExhausted, OpenAITeacher, SamplingParams
from kdistill.blackbox.serve import FaultPlan, register_cli, serve
from kdistill.errors import ConfigError

GREEDY = SamplingParams(max_tokens=5, temperature=0)
FAST = dict(backoff=0.001, backoff_max=0.01, jitter_seed=0)  # retry delays of milliseconds


@pytest.fixture(scope="module")
def server(local_teacher):
    with serve(local_teacher, name="tiny") as handle:
        yield handle


@pytest.fixture
def faulty(local_teacher):
    """A fresh server per test; set ``.faults`` on it."""
    with serve(local_teacher, name="tiny") as handle:
        yield handle


def _same(remote, local):
    for r_samples, l_samples in zip(remote, local, strict=True):
        for r, want in zip(r_samples, l_samples, strict=True):
            assert (r.text, r.tokens, r.finish_reason) == (want.text, want.tokens, want.finish_reason)
            assert r.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-4)
            assert [list(d) for d in r.top_logprobs] == [list(d) for d in want.top_logprobs]


def test_completions_round_trip_equals_the_local_teacher(server, local_teacher, prompts):
    client = OpenAITeacher("tiny", server.url, max_concurrency=2, **FAST)
    remote = client.complete(prompts, GREEDY, n=2, logprobs=3)
    _same(remote, local_teacher.complete(prompts, GREEDY, n=2, logprobs=3))
    assert client.budget.requests == len(prompts) and client.budget.tokens > 0

    # the raw JSON has OpenAI's fields, text_offset counted from the start of the prompt
    request = urllib.request.Request(f"{server.url}/completions", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "tiny", "prompt": ["hello", "the"], "max_tokens": 3,
                                                      "temperature": 0, "logprobs": 0, "stop": "zzz"}).encode())
    body = json.loads(urllib.request.urlopen(request, timeout=10).read())
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["object"] == "text_completion"
    lp = body["choices"][0]["logprobs"]
    assert lp["top_logprobs"] is None and lp["text_offset"][0] == len("hello")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] == 2
    models = json.loads(urllib.request.urlopen(f"{server.url}/models", timeout=10).read())
    assert models["data"][0]["id"] == "tiny"


def test_chat_round_trip_equals_the_local_teacher(server, local_teacher, prompts):
    client = OpenAITeacher("tiny", server.url, chat=True, **FAST)
    remote = client.complete(prompts[:2], GREEDY, logprobs=2)
    local = local_teacher.complete_chat([[{"role": "user", "content": p}] for p in prompts[:2]], GREEDY, logprobs=2)
    _same(remote, local)
    no_logprobs = client.complete(prompts[:1], GREEDY)
    assert no_logprobs[0][0].text == local[0][0].text and no_logprobs[0][0].tokens == []


def test_bad_requests_fail_at_once_with_the_servers_message(server):
    client = OpenAITeacher("no-such-model", server.url, max_retries=3, **FAST)
    with pytest.raises(BlackBoxError, match=r"/v1/completions: HTTP 404: model 'no-such-model' not found") as info:
        client.complete(["hello"], GREEDY)
    assert client.attempts == 1 and "\n" not in str(info.value)


def test_retries_429_500_timeout_and_malformed_then_success(faulty, local_teacher, caplog):
    faulty.faults = FaultPlan(sequence=("429", "500", "timeout", "malformed"), timeout_s=5)
    client = OpenAITeacher("tiny", faulty.url, max_retries=5, timeout=0.5, **FAST)
    with caplog.at_level(logging.INFO, logger="kdistill.blackbox.backends"):
        result = client.complete(["hello"], GREEDY, logprobs=2)
    _same(result, local_teacher.complete(["hello"], GREEDY, logprobs=2))
    assert client.attempts == 5 and faulty.requests == 5
    assert faulty.injected == ["429", "500", "timeout", "malformed"]
    reasons = " | ".join(r.getMessage() for r in caplog.records)
    assert "HTTP 429" in reasons and "HTTP 500" in reasons and "timed out" in reasons and "malformed" in reasons


@pytest.mark.parametrize("fault, reason", [("500", "HTTP 500"), ("malformed", "malformed response body")])
def test_persistent_failure_names_the_url_after_max_retries(faulty, fault, reason):
    faulty.faults = FaultPlan(rates={fault: 1.0})
    client = OpenAITeacher("tiny", faulty.url, max_retries=2, max_concurrency=1, **FAST)
    with pytest.raises(BlackBoxError, match=f"{faulty.url}/completions: failed after 3 attempts: {reason}") as info:
        client.complete(["hello", "the"], GREEDY)
    assert client.attempts == 3 and faulty.requests == 3  # the second prompt is never sent
    assert info.value.partial == [None, None] and "\n" not in str(info.value)


def test_unreachable_server_names_the_url():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    client = OpenAITeacher("tiny", url, max_retries=1, timeout=2, **FAST)
    with pytest.raises(BlackBoxError, match=f"{url}/completions: failed after 2 attempts: cannot connect"):
        client.complete(["hello"], GREEDY)


def test_a_budget_spent_on_retries_says_why_they_failed():
    with socket.socket() as s:  # nothing listens on this port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OpenAITeacher("tiny", f"http://127.0.0.1:{port}/v1", max_retries=5, timeout=2,
                           budget=Budget(max_requests=2), **FAST)
    with pytest.raises(BudgetExhausted, match=r"^request budget exhausted: 2 of max_requests 2 used, 2 by failed "
                                              r"attempts at this prompt \(the last: cannot connect") as info:
        client.complete(["hello"], GREEDY)
    assert client.attempts == 2 and "\n" not in str(info.value)


def test_budget_stops_before_the_request_that_would_exceed_it(server, prompts):
    client = OpenAITeacher("tiny", server.url, max_concurrency=1, budget=Budget(max_requests=2), **FAST)
    before = server.requests
    with pytest.raises(BudgetExhausted, match="max_requests 2") as info:
        client.complete(prompts[:3], GREEDY)
    partial = info.value.partial
    assert [p is not None for p in partial] == [True, True, False] and len(partial[0]) == 1
    assert server.requests - before == 2

    # tokens: n · max_tokens plus the prompt estimate must fit before anything is sent
    tight = OpenAITeacher("tiny", server.url, budget=Budget(max_tokens=5 + 4), **FAST)
    with pytest.raises(BudgetExhausted, match="token budget"):
        tight.complete(["the movie was"], GREEDY)  # 5 + 13 bytes + 16 overhead > 9
    assert server.requests - before == 2 and tight.budget.requests == 0
    roomy = OpenAITeacher("tiny", server.url, budget=Budget(max_tokens=100), **FAST)
    roomy.complete(["the movie was"], GREEDY)
    assert 3 <= roomy.budget.tokens <= 3 + 5  # the real usage, prompt + completion


def test_api_key_never_appears_in_repr_logs_or_errors(local_teacher, monkeypatch, caplog):
    secret = "sk-test-5f3c2a9d8e7b6a51"
    monkeypatch.setenv("KDISTILL_TEST_KEY", secret)
    monkeypatch.delenv("KDISTILL_NO_KEY", raising=False)
    with serve(local_teacher, name="tiny", api_key=secret, faults=FaultPlan(sequence=("500",))) as locked:
        client = OpenAITeacher("tiny", locked.url, api_key_env="KDISTILL_TEST_KEY", max_retries=1, **FAST)
        keyless = OpenAITeacher("tiny", locked.url, api_key_env="KDISTILL_NO_KEY", max_retries=1, **FAST)
        with caplog.at_level(logging.DEBUG):
            client.complete(["hello"], GREEDY)  # the server wants the key: one injected 500, then success
            with pytest.raises(BlackBoxError, match=r"HTTP 401: invalid or missing API key \(is \$KDISTILL_NO_KEY set"):
                keyless.complete(["hello"], GREEDY)
        assert client.attempts == 2 and keyless.attempts == 1
    assert secret not in repr(client) and all(secret not in str(value) for value in vars(client).values())
    assert len(caplog.records) > 5 and all(secret not in r.getMessage() for r in caplog.records)


def test_fault_plan_spec_and_cli_registration():
    plan = FaultPlan.parse("429, timeout,500=0.5,seed=3,sleep=0.2")
    assert plan.sequence == ("429", "timeout") and plan.rates == {"500": 0.5} and plan.timeout_s == 0.2
    drawn = [plan.next_fault() for _ in range(12)]
    again = FaultPlan.parse("429, timeout,500=0.5,seed=3,sleep=0.2")
    assert drawn == [again.next_fault() for _ in range(12)] and set(drawn[2:]) == {"500", None}
    with pytest.raises(ConfigError, match="unknown fault 'boom'"):
        FaultPlan.parse("boom")

    parser = argparse.ArgumentParser(prog="kdistill")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "some/model", "--port", "0", "--faults", "429,500"])
    assert args.command == "serve" and args.model == "some/model" and args.port == 0 and callable(args.func)
    assert args.host == "127.0.0.1" and args.api_key_env is None


def _raw_post(url: str, head: str, body: bytes) -> tuple[int, dict]:
    """Send one hand-written POST to /v1/completions; return the status and the JSON error body."""
    from urllib.parse import urlparse

    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as conn:
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and len(data.split(b"\r\n\r\n", 1)[1]) >= int(
                    data.split(b"Content-Length: ")[1].split(b"\r\n")[0]):
                break
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize(("head", "body", "message"), [
    ("Content-Length: abc\r\n", b"{}", "Content-Length must be a byte count"),
    ("Content-Length: -1\r\n", b"{}", "Content-Length must be a byte count"),
    (f"Content-Length: {(64 << 20) + 1}\r\n", b"{}", "Content-Length must be a byte count up to 67108864"),
    ("Content-Length: 31\r\n", b'{"prompt": "\xff\xfe", "max_tokens": 2}'[:31], "not UTF-8 (byte 12)"),
])
def test_malformed_http_requests_get_400_and_the_server_keeps_serving(server, head, body, message):
    status, answer = _raw_post(server.url, head, body)
    assert status == 400 and message in answer["error"]["message"], answer
    ok = OpenAITeacher("tiny", server.url, **FAST).complete(["the movie"], GREEDY)
    assert len(ok) == 1
