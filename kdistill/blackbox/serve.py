"""A small OpenAI-compatible HTTP server over a local causal LM, with optional fault injection.

Endpoints (JSON; errors are ``{"error": {"message", "type", "param", "code"}}``):

- ``POST /v1/completions``: ``prompt`` (string or list of strings), ``max_tokens`` (16),
  ``temperature`` (1), ``top_p`` (1), ``n`` (1), ``stop``, ``logprobs`` (int, 0–20), ``seed``.
  Choices are ordered prompt by prompt, ``n`` each; ``logprobs`` holds ``tokens``,
  ``token_logprobs``, ``top_logprobs`` (``null`` for ``logprobs=0``) and ``text_offset``
  (character offsets counted from the start of the prompt, as OpenAI does).
- ``POST /v1/chat/completions``: ``messages``, ``max_tokens`` / ``max_completion_tokens`` (256),
  ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs`` (bool), ``top_logprobs`` (0–20).
  The prompt is the tokenizer's chat template, or plain ``role: content`` lines without one.
- ``GET /v1/models``.

With an ``api_key``, every request must carry ``Authorization: Bearer <key>`` (else 401).

Generation runs through a :class:`~kdistill.blackbox.backends.LocalTeacher` (one request at a
time; log-probabilities as documented there). A :class:`FaultPlan` makes the server misbehave on
purpose (error statuses, hangs, malformed bodies), deterministically, so that clients' retry paths
can be tested against a real server.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kdistill.blackbox.backends import BlackBoxError, Completion, LocalTeacher, SamplingParams
from kdistill.devices import check_device
from kdistill.errors import ConfigError, KdistillError

logger = logging.getLogger(__name__)

FAULT_KINDS = ("timeout", "malformed", "ok")
"""Fault names besides HTTP status codes (``"429"``, ``"500"``, any 400–599)."""

MALFORMED_BODY = b'{"id": "cmpl-fault", "choices": [{"text": "trunc'
MAX_BODY_BYTES = 64 << 20  # a larger request body is refused before it is read


def _check_fault(kind: str) -> str:
    kind = str(kind).strip().lower()
    if kind in FAULT_KINDS or (kind.isdigit() and 400 <= int(kind) <= 599):
        return kind
    raise ConfigError(f"unknown fault {kind!r}: use an HTTP status 400-599, {', '.join(FAULT_KINDS)}")


@dataclass
class FaultPlan:
    """Faults the server injects into generation requests (``POST``), deterministic for a seed.

    The first requests get the faults of ``sequence`` in order (``"ok"`` for a normal answer);
    every later request draws a fault with the probabilities ``rates`` (fault → probability,
    summing to ≤ 1) from a ``random.Random(seed)``, or is answered normally. Faults: an HTTP
    status (``"429"``, ``"500"``, …) with an OpenAI error body, ``"timeout"`` (the server waits
    ``timeout_s`` seconds, then drops the connection without answering) or ``"malformed"``
    (status 200 and a truncated JSON body).
    """

    sequence: tuple[str, ...] = ()
    rates: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        self.sequence = tuple(_check_fault(k) for k in self.sequence)
        self.rates = {_check_fault(k): float(p) for k, p in self.rates.items()}
        if any(not 0 <= p <= 1 for p in self.rates.values()) or sum(self.rates.values()) > 1 + 1e-9:
            raise ConfigError(f"fault rates must be probabilities summing to at most 1, not {self.rates}")
        if self.timeout_s <= 0:
            raise ConfigError(f"fault timeout_s must be positive, not {self.timeout_s}")
        self._rng = random.Random(self.seed)
        self._count = 0
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """``"429,500,timeout,malformed"`` (a sequence), ``"500=0.2,timeout=0.1,seed=3,sleep=2"``
        (rates, seed and the timeout fault's sleep in seconds), or both mixed."""
        sequence, rates, options = [], {}, {}
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            if "=" in item:
                key, _, value = (s.strip() for s in item.partition("="))
                try:
                    number = float(value)
                except ValueError:
                    raise ConfigError(f"--faults item {item!r}: {value!r} is not a number") from None
                if key in ("seed", "sleep"):
                    options[key] = number
                else:
                    rates[key] = number
            else:
                sequence.append(item)
        return cls(sequence=tuple(sequence), rates=rates, seed=int(options.get("seed", 0)),
                   timeout_s=options.get("sleep", 5.0))

    def next_fault(self) -> str | None:
        """The fault for the next request (``None``: answer normally)."""
        with self._lock:
            index, self._count = self._count, self._count + 1
            if index < len(self.sequence):
                kind = self.sequence[index]
                return None if kind == "ok" else kind
            draw, total = self._rng.random(), 0.0
            for kind, rate in self.rates.items():
                total += rate
                if draw < total:
                    return None if kind == "ok" else kind
            return None


class _RequestError(Exception):
    """A bad request: answered with ``status`` and an OpenAI error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


# --------------------------------------------------------------------------------------------
# Request parsing and response building (pure functions of JSON and completions).
# --------------------------------------------------------------------------------------------


def _number(body: dict, key: str, default: Any, kind: type, low: float | None = None, high: float | None = None):
    value = body.get(key, default)
    if value is None:
        value = default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int:
        ok = float(value).is_integer()
        value = int(value) if ok else value
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" in [{low}, {high}]" if high is not None else (f" ≥ {low}" if low is not None else "")
        raise _RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}{bounds}, not {value!r}",
                            param=key)
    return value


def _sampling(body: dict, default_max_tokens: int) -> tuple[SamplingParams, int]:
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens", default_max_tokens)
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, int, 1)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise _RequestError("'stop' must be a string or a list of non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", None, int)
    n = _number(body, "n", 1, int, 1, 128)
    if body.get("stream"):
        raise _RequestError("'stream' is not supported by this server", param="stream")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, float, 0, 2)),
                                top_p=float(_number(body, "top_p", 1.0, float, 0, 1)), stop=stop, seed=seed)
    except ConfigError as exc:
        raise _RequestError(str(exc)) from exc
    return params, n


def _completion_logprobs(prompt: str, completion: Completion, k: int) -> dict:
    offsets, position = [], len(prompt)
    for token in completion.tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": list(completion.tokens), "token_logprobs": list(completion.token_logprobs),
            "top_logprobs": [dict(d) for d in completion.top_logprobs] if k and completion.top_logprobs is not None
            else None, "text_offset": offsets}


def _chat_logprobs(completion: Completion, k: int) -> dict:
    content = []
    for i, (token, logprob) in enumerate(zip(completion.tokens, completion.token_logprobs)):
        alternatives = completion.top_logprobs[i] if k and completion.top_logprobs is not None else {}
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                                         for t, v in alternatives.items()]})
    return {"content": content, "refusal": None}


class _Model:
    """Generation for the handler: request JSON → response JSON."""

    def __init__(self, teacher: LocalTeacher, name: str) -> None:
        self.teacher, self.name = teacher, name

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.name:
            raise _RequestError(f"model {model!r} not found; this server serves {self.name!r}", 404, "model")

    def completions(self, body: dict) -> dict:
        self._check_model(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise _RequestError("'prompt' must be a string or a non-empty list of strings", param="prompt")
        if body.get("echo"):
            raise _RequestError("'echo' is not supported by this server", param="echo")
        params, n = _sampling(body, 16)
        k = body.get("logprobs")
        if k is not None:
            k = _number(body, "logprobs", None, int, 0, 20)
        results = self.teacher.complete(prompts, params, n=n, logprobs=k)
        choices, completion_tokens = [], 0
        for prompt_text, samples in zip(prompts, results):
            for completion in samples:
                choices.append({"index": len(choices), "text": completion.text,
                                "logprobs": None if k is None else _completion_logprobs(prompt_text, completion, k),
                                "finish_reason": completion.finish_reason})
                completion_tokens += len(completion.tokens)
        prompt_tokens = sum(self.teacher.count_tokens(p) for p in prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    def chat(self, body: dict) -> dict:
        self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _RequestError("'messages' must be a non-empty list", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise _RequestError(f"messages[{i}] must have string 'role' and 'content'", param="messages")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        params, n = _sampling(body, 256)
        want = body.get("logprobs") or False
        if not isinstance(want, bool):
            raise _RequestError("'logprobs' must be a boolean", param="logprobs")
        k = body.get("top_logprobs")
        if k is not None:
            k = _number(body, "top_logprobs", None, int, 0, 20)
            if not want:
                raise _RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        (samples,) = self.teacher.complete_chat([messages], params, n=n, logprobs=k if want else None)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c, k or 0) if want else None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(samples)]
        prompt_tokens = self.teacher.count_tokens(self.teacher.chat_prompt(messages), chat=True)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": _usage(prompt_tokens, sum(len(c.tokens) for c in samples))}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "kdistill"}]}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# --------------------------------------------------------------------------------------------
# HTTP layer.
# --------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections are dropped after this many seconds
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"))

    def _send_error(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def _authorised(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        sent = self.headers.get("Authorization") or ""
        if hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
            return True
        self._send_error(401, "invalid or missing API key", kind="authentication_error")
        return False

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, self.server.model.models())
        else:
            self._send_error(404, f"no route GET {self.path}", kind="not_found_error")

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        header = self.headers.get("Content-Length") or "0"
        length = int(header) if header.strip().isdigit() else -1
        if not 0 <= length <= MAX_BODY_BYTES:  # unread bytes would be taken for the next request: close
            self.close_connection = True
            self._send_error(400, f"Content-Length must be a byte count up to {MAX_BODY_BYTES}, not {header!r}")
            return
        raw = self.rfile.read(length) if length else b""
        if not self._authorised():
            return
        routes = {"/v1/completions": self.server.model.completions, "/v1/chat/completions": self.server.model.chat}
        route = routes.get(self.path.rstrip("/"))
        if route is None:
            self._send_error(404, f"no route POST {self.path}", kind="not_found_error")
            return
        with self.server.lock:
            self.server.requests += 1
        fault = self.server.faults.next_fault() if self.server.faults is not None else None
        if fault is not None:
            with self.server.lock:
                self.server.injected.append(fault)
            self._inject(fault)
            return
        try:
            body = json.loads(raw or b"null")
            if not isinstance(body, dict):
                raise _RequestError("the request body must be a JSON object")
            payload = route(body)
        except _RequestError as exc:
            self._send_error(exc.status, str(exc), exc.param)
            return
        except json.JSONDecodeError as exc:
            self._send_error(400, f"the request body is not JSON: {exc}")
            return
        except UnicodeDecodeError as exc:
            self._send_error(400, f"the request body is not UTF-8 (byte {exc.start})")
            return
        except KdistillError as exc:
            self._send_error(400, str(exc))
            return
        except Exception as exc:  # a server bug: answer 500 and keep serving
            logger.exception("error while serving %s", self.path)
            self._send_error(500, f"internal error: {type(exc).__name__}", kind="server_error")
            return
        self._send_json(200, payload)

    def _inject(self, fault: str) -> None:
        logger.debug("injecting fault %s into %s", fault, self.path)
        if fault == "timeout":
            self.server.closing.wait(self.server.faults.timeout_s)
            self.close_connection = True  # no answer at all
        elif fault == "malformed":
            self._send(200, MALFORMED_BODY)
        else:
            self._send_error(int(fault), f"injected fault: HTTP {fault}", kind="fault_injection")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], model: _Model, faults: FaultPlan | None,
                 api_key: str | None) -> None:
        super().__init__(address, _Handler)
        self.model, self.faults, self.api_key = model, faults, api_key
        self.requests = 0
        self.injected: list[str] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()


class ServerHandle:
    """A running server. ``url`` is the API base (``http://host:port/v1``, an OpenAI ``base_url``);
    ``requests`` counts generation requests received, ``injected`` lists the faults injected."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread
        host, port = server.server_address[:2]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}/v1"
        self.model_name = server.model.name

    @property
    def requests(self) -> int:
        return self._server.requests

    @property
    def injected(self) -> list[str]:
        return list(self._server.injected)

    @property
    def faults(self) -> FaultPlan | None:
        return self._server.faults

    @faults.setter
    def faults(self, plan: FaultPlan | None) -> None:
        self._server.faults = plan

    def wait(self) -> None:
        """Block until the server stops (KeyboardInterrupt propagates)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def close(self) -> None:
        """Stop serving and free the port (hanging fault handlers are woken)."""
        self._server.closing.set()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServerHandle(url={self.url!r}, model={self.model_name!r})"


def serve(
    model_ref: str | LocalTeacher,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: FaultPlan | None = None,
    *,
    name: str | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    api_key: str | None = None,
) -> ServerHandle:
    """Serve a model reference (or a ready :class:`LocalTeacher`) in a background thread.

    ``port=0`` picks a free port; ``name`` is the model id clients send (default: the reference,
    or the teacher's name); ``api_key``, if given, is required of every request.
    """
    if isinstance(model_ref, LocalTeacher):
        teacher = model_ref
        default_name = teacher.name.removeprefix("local:")
    else:
        teacher = LocalTeacher(model_ref, batch_size=batch_size, device=device)
        default_name = str(model_ref)
    try:
        server = _Server((host, port), _Model(teacher, name or default_name), faults, api_key or None)
    except OSError as exc:
        raise BlackBoxError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from exc
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"kdistill-serve-{server.server_address[1]}", daemon=True)
    thread.start()
    handle = ServerHandle(server, thread)
    logger.info("serving %s at %s", handle.model_name, handle.url)
    return handle


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], not {args.port}")
    check_device(args.device)
    faults = FaultPlan.parse(args.faults) if args.faults else None
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    handle = serve(args.model, host=args.host, port=args.port, faults=faults, name=args.name,
                   batch_size=args.batch_size, device=args.device, api_key=api_key)
    print(f"serving {handle.model_name} at {handle.url} (OpenAI base_url); Ctrl-C stops", flush=True)
    try:
        handle.wait()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        handle.close()


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser("serve", help="serve a local causal LM over an OpenAI-compatible HTTP API")
    parser.add_argument("model", help="model reference: alias, local directory or cached hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--name", help="model id clients send (default: MODEL)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="require the API key held in this environment variable (default: none required)")
    parser.add_argument("--faults", metavar="SPEC",
                        help="inject faults for testing clients: '429,500,timeout,malformed' (in order) "
                             "or '500=0.1,timeout=0.05,seed=0,sleep=5' (rates)")
    parser.set_defaults(func=_cmd_serve)
    return parser
