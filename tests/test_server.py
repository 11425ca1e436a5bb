"""The OpenAI-compatible server as a client sees it: a real `infinite-llm serve` process on a free
port, driven by the official `openai` client, raw HTTP, schemathesis and the bench client.

Two servers, each started once per module: the default model (meaningful text; an API key; one
request at a time, so queue limits and long requests to drop mid-way are easy to set up) and a
tiny random model (speed: many requests, fuzzing, the bench client).
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from infinite_llm.entrypoints import cli

API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
DEFAULT_NAME = "SmolLM2-135M-Instruct"
TINY = "tiny"
GREEDY = {"temperature": 0.0, "ignore_eos": True}
TIMEOUT_S = 60.0  # generous: CI machines may be busy
_get = functools.partial(httpx.get, timeout=TIMEOUT_S)
_post = functools.partial(httpx.post, timeout=TIMEOUT_S)
_delete = functools.partial(httpx.delete, timeout=TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(args: list[str], log: Path, timeout_s: float = 240.0) -> Iterator[str]:
    """Run `infinite-llm serve` until /health answers; always killed at exit."""
    port = _free_port()
    cmd = [sys.executable, "-m", "infinite_llm.entrypoints.cli", "serve", "--port", str(port),
           "--log-level", "warning", *args]
    with log.open("w") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()}")
            try:
                if _get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no /health after {timeout_s} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def default_server(default_model_path: Path, tmp_path_factory) -> Iterator[str]:
    """Runs one request at a time and lets at most one wait (the queue-limit tests need that;
    the client tests send one request at a time anyway)."""
    log = tmp_path_factory.mktemp("default-server") / "log.txt"
    args = ["--api-key", API_KEY, "--num-kv-blocks", "256", "--max-num-seqs", "1",
            "--max-waiting", "1"]
    with serve(args, log) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoint: Callable[[str], Path], tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("tiny-server") / "log.txt"
    args = ["--model", str(tiny_checkpoint("llama")), "--served-model-name", TINY,
            "--num-kv-blocks", "256", "--max-model-len", "64", "--max-body-bytes", str(2**20)]
    with serve(args, log) as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path):
    return AutoTokenizer.from_pretrained(default_model_path)


def _metric(url: str, name: str) -> float:
    """One sample from /metrics (0 when the series does not exist yet)."""
    for line in _get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _wait_metric(url: str, name: str, value: float, timeout_s: float = 10.0) -> None:
    """Gauges are updated after each engine step: poll until `name` reads `value`."""
    deadline = time.monotonic() + timeout_s
    while (seen := _metric(url, name)) != value:
        if time.monotonic() > deadline:
            pytest.fail(f"{name} is {seen}, expected {value}")
        time.sleep(0.02)


def _wait_all_blocks_free(url: str, aborted: float, timeout_s: float = 20.0) -> None:
    """Poll /metrics until every KV block is free and `aborted` requests have been aborted."""
    deadline = time.monotonic() + timeout_s
    while True:
        free = _metric(url, 'infinite_llm_kv_blocks_free{instance="0"}')
        total = _metric(url, 'infinite_llm_kv_blocks_total{instance="0"}')
        done = _metric(url, 'infinite_llm_request_finished_total{finish_reason="abort"}')
        if total > 0 and free == total and done >= aborted:
            assert done == aborted
            assert _metric(url, 'infinite_llm_kv_blocks_own{instance="0"}') == 0
            return
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout_s} s: {free}/{total} blocks free, {done} aborted, "
                        f"expected {aborted}")
        time.sleep(0.1)


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize(("flags", "message"), [
    (["--port", "70000"], "port must be in [0, 65535]"),
    (["--max-waiting", "0"], "max_waiting must be >= 1"),
    (["--max-body-bytes", "-5"], "max_body_bytes must be >= 1"),
])
def test_serve_refuses_bad_flags_in_one_line(flags, message) -> None:
    """Before the model loads: no traceback, and no server that would answer every request
    with 503 (max_waiting 0) or 413 (a body limit below 1)."""
    cmd = [sys.executable, "-m", "infinite_llm.entrypoints.cli", "serve", "--port",
           str(_free_port()), *flags]  # a later --port wins
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith("error: ") and message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not run.stdout


# ---- the default model through the official client ------------------------------------------


@pytest.mark.slow
def test_completions_streamed_equals_whole_and_usage_is_exact(default_server, tokenizer) -> None:
    client = openai.OpenAI(base_url=f"{default_server}/v1", api_key=API_KEY)
    prompt = "The capital of France is"
    args = dict(model=DEFAULT_NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
    whole = client.completions.create(**args)
    choice = whole.choices[0]
    assert "Paris" in choice.text
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert whole.usage.completion_tokens == len(choice.logprobs.tokens)
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    assert "".join(choice.logprobs.tokens) == choice.text
    chunks = list(client.completions.create(**args, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


@pytest.mark.slow
def test_chat_streamed_equals_whole_and_usage_is_exact(default_server, tokenizer) -> None:
    client = openai.OpenAI(base_url=f"{default_server}/v1", api_key=API_KEY)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    args = dict(model=DEFAULT_NAME, messages=messages, max_completion_tokens=32, temperature=0,
                logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**args)
    choice = whole.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.completion_tokens == len(choice.logprobs.content)  # EOS included
    for entry in choice.logprobs.content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == entry.top_logprobs[0].logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)
    chunks = list(client.chat.completions.create(**args, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


@pytest.mark.slow
def test_api_key_is_required_on_v1_only(default_server) -> None:
    body = {"model": DEFAULT_NAME, "prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = _post(f"{default_server}/v1/completions", json=body, headers=headers)
        assert _assert_openai_error(response, 401)["code"] == "invalid_api_key"
    assert _get(f"{default_server}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{default_server}/v1", api_key="wrong").models.list()
    models = openai.OpenAI(base_url=f"{default_server}/v1", api_key=API_KEY).models.list()
    assert [m.id for m in models.data] == [DEFAULT_NAME]
    assert _get(f"{default_server}/health").status_code == 200
    assert _get(f"{default_server}/metrics").status_code == 200


# ---- bad input --------------------------------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [  # (endpoint, body, the param the error names)
    ("completions", {"prompt": "hi", "n": 2}, "n"),
    ("completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": -0.5}, "temperature"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("completions", {"prompt": "hi", "presence_penalty": 1.0}, "presence_penalty"),
    ("completions", {"prompt": [1, 2, 10**6]}, "prompt"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [[1, 2], [3, 10**6]]}, "prompt"),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
     "stream_options"),
    ("completions", {"prompt": "hi", "stream": False, "stream_options": {}}, "stream_options"),
    ("completions", {"max_tokens": 4}, "prompt"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": HI, "n": 3}, "n"),
    ("chat/completions", {"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": HI, "stream_options": {"include_usage": False}},
     "stream_options"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("chat/completions", {"messages": HI, "response_format": {"type": "json_object"}},
     "response_format"),
    ("chat/completions", {"messages": HI, "tools": [{"type": "function",
                                                     "function": {"name": "f"}}]}, "tools"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), BAD_REQUESTS)
def test_bad_request_gets_400_with_openai_body(tiny_server, endpoint, body, param) -> None:
    response = _post(f"{tiny_server}/v1/{endpoint}", json=body)
    error = _assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_defaults_of_refused_fields_are_served(tiny_server) -> None:
    """What OpenAI clients send when they mean the default passes: only values that would be
    ignored are refused."""
    body = {"messages": HI, "max_tokens": 1, "response_format": {"type": "text"}, "tools": [],
            "presence_penalty": 0, "n": 1, "logit_bias": {}}
    response = _post(f"{tiny_server}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


def test_unknown_model_gets_404_as_from_openai(tiny_server) -> None:
    client = openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    response = _post(f"{tiny_server}/v1/chat/completions", json={"model": "gpt-4", "messages": HI})
    error = _assert_openai_error(response, 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_prompt_too_long_names_the_limit(tiny_server) -> None:
    for endpoint, body, param in (
        ("completions", {"prompt": list(range(10, 110))}, "prompt"),
        ("chat/completions", {"messages": [{"role": "user", "content": "word " * 100}]},
         "messages"),
    ):
        error = _assert_openai_error(_post(f"{tiny_server}/v1/{endpoint}", json=body), 400)
        assert "at most 64 tokens" in error["message"] and error["param"] == param


def test_max_tokens_past_the_context_gets_400_as_from_vllm(tiny_server, tokenizer) -> None:
    """The tiny server's context is 64 tokens. An explicit max_tokens that doesn't fit is a 400
    (it was silently cut to the room left); without one the answer still stops at the limit."""
    template = ("This model's maximum context length is 64 tokens. However, you requested {} "
                "tokens ({} in the messages, {} in the completion). Please reduce the length of "
                "the messages or completion.")
    prompt = list(range(10, 60))  # 50 tokens: 14 left
    chat_len = len(tokenizer.apply_chat_template(HI, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
    for endpoint, body, param, num_prompt in (
        ("completions", {"prompt": prompt, "max_tokens": 15}, "max_tokens", 50),
        ("completions", {"prompt": [[5, 6], prompt], "max_tokens": 15}, "max_tokens", 50),
        ("chat/completions", {"messages": HI, "max_tokens": 65 - chat_len}, "max_tokens",
         chat_len),
        ("chat/completions", {"messages": HI, "max_completion_tokens": 65 - chat_len},
         "max_completion_tokens", chat_len),
    ):
        error = _assert_openai_error(_post(f"{tiny_server}/v1/{endpoint}", json=body), 400)
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        assert error["message"] == template.format(num_prompt + max_tokens, num_prompt,
                                                   max_tokens)
        assert error["param"] == param
    for body, num_output in (({"prompt": prompt, "max_tokens": 14, **GREEDY}, 14),
                             ({"prompt": prompt, **GREEDY}, 14)):  # the default 16 is cut
        response = _post(f"{tiny_server}/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == num_output
    response = _post(f"{tiny_server}/v1/chat/completions",
                     json={"messages": HI, "max_tokens": 64 - chat_len, **GREEDY})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 64 - chat_len


def test_prompt_with_a_lone_surrogate_gets_400(tiny_server) -> None:
    """JSON's escape "\\ud800" decodes to a str that no tokenizer takes: a 400, not a 500."""
    for body in (b'{"prompt": "\\ud800", "max_tokens": 1}',
                 b'{"prompt": ["ok \\udfff"], "max_tokens": 1}'):
        response = _post(f"{tiny_server}/v1/completions", content=body,
                         headers={"Content-Type": "application/json"})
        error = _assert_openai_error(response, 400)
        assert error["param"] == "prompt" and "not valid Unicode" in error["message"]


def test_malformed_json_and_unknown_routes(tiny_server) -> None:
    response = _post(f"{tiny_server}/v1/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert "JSON" in _assert_openai_error(response, 400)["message"]
    _assert_openai_error(_get(f"{tiny_server}/v1/nothing"), 404)
    _assert_openai_error(_delete(f"{tiny_server}/v1/models"), 405)


def test_oversized_body_gets_413(tiny_server) -> None:
    """The tiny server's limit is 1 MiB: just under is served, just over is refused, whether
    the size is announced (Content-Length) or not (chunked)."""
    headers = {"Content-Type": "application/json"}
    body = {"prompt": "Hi", "max_tokens": 1, "padding": ""}  # an unknown field is ignored
    under = json.dumps({**body, "padding": "x" * (2**20 - 100)}).encode()
    assert len(under) <= 2**20
    response = _post(f"{tiny_server}/v1/completions", content=under, headers=headers)
    assert response.status_code == 200, response.text
    over = json.dumps({**body, "padding": "x" * 2**20}).encode()
    response = _post(f"{tiny_server}/v1/completions", content=over, headers=headers)
    assert _assert_openai_error(response, 413)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        for i in range(0, len(over), 65536):
            yield over[i : i + 65536]

    response = _post(f"{tiny_server}/v1/completions", content=chunks(), headers=headers)
    assert _assert_openai_error(response, 413)["code"] == "request_too_large"


@pytest.mark.slow
def test_full_waiting_queue_gets_503_with_retry_after(default_server) -> None:
    long = {"prompt": "Once upon a time", "max_tokens": 1000, "stream": True, **GREEDY}
    aborted = _metric(default_server, 'infinite_llm_request_finished_total{finish_reason="abort"}')
    with httpx.Client(base_url=default_server, timeout=TIMEOUT_S, headers=AUTH) as client, \
            client.stream("POST", "/v1/completions", json=long) as running:
        lines = running.iter_lines()  # kept: dropping a half-read iterator closes the connection
        assert next(line for line in lines if line.startswith("data: "))
        with client.stream("POST", "/v1/completions", json=long) as waiting:
            assert waiting.status_code == 200  # accepted: it waits for the running one
            _wait_metric(default_server, "infinite_llm_num_requests_waiting", 1)
            response = client.post("/v1/completions", json={"prompt": "Hi", **GREEDY})
            assert _assert_openai_error(response, 503)["code"] == "queue_full"
            assert int(response.headers["Retry-After"]) >= 1
    _wait_all_blocks_free(default_server, aborted + 2)
    response = _post(f"{default_server}/v1/completions", headers=AUTH,
                     json={"prompt": "Hi", "max_tokens": 2, **GREEDY})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


# ---- several prompts in one request ----------------------------------------------------------


def _sse_chunks(client: httpx.Client, body: dict) -> list[dict]:
    """The chunks of one stream; it must end with exactly one `data: [DONE]`."""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    return [json.loads(event[6:]) for event in events[:-1]]


def test_several_prompts_get_one_choice_each_in_order(tiny_server) -> None:
    """As from OpenAI and vLLM: choice i answers prompt i, exactly as if sent alone; usage is
    the sum; a stream's chunks carry their prompt's index."""
    for prompts in ([[i * 7 + 100 for i in range(n)] for n in (5, 12, 3)],
                    ["Hello there", "The sea is", "a"]):
        body = {"max_tokens": 6, "logprobs": 1, **GREEDY}
        with httpx.Client(base_url=tiny_server, timeout=TIMEOUT_S) as client:
            alone = [client.post("/v1/completions", json={**body, "prompt": p}).json()
                     for p in prompts]
            whole = client.post("/v1/completions", json={**body, "prompt": prompts}).json()
            chunks = _sse_chunks(client, {**body, "prompt": prompts,
                                          "stream_options": {"include_usage": True}})
        assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
        assert [c["text"] for c in whole["choices"]] == [a["choices"][0]["text"] for a in alone]
        for choice, a in zip(whole["choices"], alone):  # batched: equal up to float error
            got, expected = choice["logprobs"], a["choices"][0]["logprobs"]
            assert got["tokens"] == expected["tokens"]
            assert got["text_offset"] == expected["text_offset"]
            assert got["token_logprobs"] == pytest.approx(expected["token_logprobs"], abs=1e-3)
        assert whole["usage"] == {key: sum(a["usage"][key] for a in alone)
                                  for key in whole["usage"]}
        texts, finished = ["", "", ""], [[], [], []]
        for chunk in chunks[:-1]:
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["text"]
                finished[choice["index"]].append(choice["finish_reason"])
        assert texts == [c["text"] for c in whole["choices"]]
        assert [[r for r in f if r] for f in finished] == [["length"]] * 3
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_one_refused_prompt_of_several_leaves_nothing_behind(tiny_server) -> None:
    """The first prompt is accepted before the second is refused: it is aborted, not left to
    generate for nobody."""
    aborted = _metric(tiny_server, 'infinite_llm_request_finished_total{finish_reason="abort"}')
    body = {"prompt": [[5, 6, 7], [1, 2, 10**6]], "max_tokens": 60, **GREEDY}
    error = _assert_openai_error(_post(f"{tiny_server}/v1/completions", json=body), 400)
    assert error["param"] == "prompt" and "token ids" in error["message"]
    _wait_all_blocks_free(tiny_server, aborted + 1)


@pytest.mark.slow
def test_more_prompts_than_may_wait_get_400_and_add_nothing(default_server) -> None:
    """Each prompt waits as one request, so with --max-waiting 1 two prompts could never be
    taken at once: a 400 (a 503 would invite retries that always fail), and none is added."""
    aborted = _metric(default_server, 'infinite_llm_request_finished_total{finish_reason="abort"}')
    body = {"prompt": ["Once upon a time", "Hi"], "max_tokens": 1000, **GREEDY}
    response = _post(f"{default_server}/v1/completions", json=body, headers=AUTH)
    error = _assert_openai_error(response, 400)
    assert error["param"] == "prompt" and "--max-waiting" in error["message"]
    _wait_all_blocks_free(default_server, aborted)  # nothing was added, so none was aborted


# ---- clients that leave -----------------------------------------------------------------------


@pytest.mark.slow
def test_client_dropped_mid_stream_frees_its_blocks(default_server) -> None:
    aborted = _metric(default_server, 'infinite_llm_request_finished_total{finish_reason="abort"}')
    body = {"prompt": "Once upon a time", "max_tokens": 1000, "stream": True, **GREEDY}
    with httpx.Client(base_url=default_server, timeout=TIMEOUT_S, headers=AUTH) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            assert json.loads(next(lines)[6:])["choices"][0]["finish_reason"] is None
        _wait_metric(default_server, "infinite_llm_num_requests_running", 1)
        response.close()  # the client goes away with ~1000 tokens to go
    _wait_all_blocks_free(default_server, aborted + 1)


@pytest.mark.slow
def test_client_gone_before_a_whole_answer_frees_its_blocks(default_server) -> None:
    aborted = _metric(default_server, 'infinite_llm_request_finished_total{finish_reason="abort"}')
    body = {"prompt": "Once upon a time", "max_tokens": 1000, **GREEDY}
    with pytest.raises(httpx.ReadTimeout):
        _post(f"{default_server}/v1/completions", json=body, headers=AUTH, timeout=1.0)
    _wait_all_blocks_free(default_server, aborted + 1)


# ---- many clients at once ---------------------------------------------------------------------


async def _stream_text(client: httpx.AsyncClient, body: dict) -> tuple[str, int]:
    text, tokens = "", 0
    async with client.stream("POST", "/v1/completions",
                             json={**body, "stream": True,
                                   "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                text += "".join(c["text"] for c in chunk["choices"])
                tokens = chunk["usage"]["completion_tokens"] if chunk["usage"] else tokens
    return text, tokens


@pytest.mark.slow
def test_64_concurrent_streams_equal_sequential_greedy(tiny_server) -> None:
    rng = random.Random(0)
    bodies = [{"prompt": [rng.randrange(100, 49152) for _ in range(rng.randint(2, 40))],
               "max_tokens": rng.randint(4, 16), **GREEDY} for _ in range(64)]
    with httpx.Client(base_url=tiny_server, timeout=TIMEOUT_S) as client:
        expected = []
        for body in bodies:
            out = client.post("/v1/completions", json=body).json()
            expected.append((out["choices"][0]["text"], out["usage"]["completion_tokens"]))
    assert [n for _, n in expected] == [b["max_tokens"] for b in bodies]

    async def all_at_once() -> list[tuple[str, int]]:
        async with httpx.AsyncClient(base_url=tiny_server, timeout=TIMEOUT_S) as client:
            return await asyncio.gather(*(_stream_text(client, b) for b in bodies))

    assert asyncio.run(all_at_once()) == expected
    _wait_all_blocks_free(tiny_server, _metric(
        tiny_server, 'infinite_llm_request_finished_total{finish_reason="abort"}'))


# ---- fuzzing and the bench client -------------------------------------------------------------


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(tiny_server, tmp_path) -> None:
    cli_path = Path(sys.executable).with_name("schemathesis")
    cmd = [str(cli_path), "run", f"{tiny_server}/openapi.json", "--checks", "not_a_server_error",
           "--max-examples", "30", "--seed", "1", "--generation-database", "none",
           "--workers", "4", "--no-color", "--report-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "5 passed" in run.stdout  # all five operations were exercised


@pytest.mark.slow
def test_bench_serve_random_prompts(tiny_server, tmp_path) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = cli.main(["bench", "serve", "--url", tiny_server, "--random-input-len", "8",
                     "--random-output-len", "6", "--num-prompts", "5", "--request-rate", "50",
                     "--seed", "1", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000",
                     "--output-json", str(out_json), "--output-png", str(out_png)])
    assert code == 0
    report = json.loads(out_json.read_text())
    m = report["metrics"]
    assert (m["completed"], m["failed"]) == (5, 0)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (40, 30)
    assert m["good_requests"] == 5 and m["goodput"] == pytest.approx(5 / m["duration_s"])
    assert m["output_throughput"] == pytest.approx(30 / m["duration_s"])
    assert 0 < m["ttft_ms"]["p50"] <= m["ttft_ms"]["p99"] <= m["e2e_latency_ms"]["p99"]
    assert all(len(r["itl_s"]) == 5 for r in report["requests"])  # one chunk per token
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["--request-rate", "-1"], "--request-rate must be > 0"),
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--trace", "/nonexistent/trace.jsonl"], "/nonexistent/trace.jsonl"),
])
def test_bench_serve_refuses_bad_flags(tiny_server, tmp_path, capsys, flags, message) -> None:
    """An error line and exit code 2, not a hang (--max-concurrency 0) or a traceback."""
    args = ["bench", "serve", "--url", tiny_server, "--random-input-len", "4",
            "--random-output-len", "2", "--num-prompts", "2", *flags,
            "--output-json", str(tmp_path / "b.json"), "--output-png", str(tmp_path / "b.png")]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_bench_serve_without_the_api_key_says_so(default_server, tmp_path, capsys) -> None:
    args = ["bench", "serve", "--url", default_server, "--random-input-len", "4",
            "--random-output-len", "2", "--num-prompts", "1",
            "--output-json", str(tmp_path / "b.json"), "--output-png", str(tmp_path / "b.png")]
    assert cli.main(args) == 2
    assert capsys.readouterr().out == (f"error: {default_server}/v1/models answered HTTP 401 "
                                       "(pass --api-key)\n")


@pytest.mark.slow
def test_bench_serve_trace_keeps_its_arrivals(tiny_server, tmp_path) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [{"prompt_len": 5, "output_len": 3, "arrival_s": 0.0, "request_id": "a"},
            {"prompt_len": 9, "output_len": 4, "arrival_s": 0.6},
            {"prompt_len": 7, "output_len": 5, "arrival_s": 1.2}]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out_json = tmp_path / "bench.json"
    code = cli.main(["bench", "serve", "--url", tiny_server, "--trace", str(trace),
                     "--output-json", str(out_json), "--output-png", str(tmp_path / "b.png")])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["config"]["arrivals"] == "trace"
    assert report["metrics"]["total_output_tokens"] == 12
    assert report["metrics"]["goodput"] is None  # no SLO given
    starts = [r["start_s"] for r in report["requests"]]
    assert all(r["arrival_s"] <= s < r["arrival_s"] + 0.5 for r, s in zip(rows, starts))
