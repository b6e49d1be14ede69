"""The server's answer when the engine itself fails (the model cannot run a prompt or a step): a 500 in OpenAI's
error shape with type "server_error" (it is not the request's fault, so not a 400), or an error event mid-stream;
the server keeps serving. In-process (FastAPI's TestClient), with the runner's methods made to raise."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import prosa  # noqa: E402
from prosa.serve.app import ServerState, create_app  # noqa: E402


@pytest.fixture(scope="module")
def app_and_lm(tiny_checkpoint):
    lm = prosa.load(tiny_checkpoint("llama"), threads=1)
    with TestClient(create_app(ServerState(model_id="tiny", lm=lm))) as client:
        yield client, lm


def broken(lm, monkeypatch, method: str) -> None:
    def fail(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(lm.engine.runner, method, fail)


@pytest.mark.parametrize("method", ["prefill", "decode"])
def test_an_engine_failure_is_a_500_server_error(app_and_lm, monkeypatch, method):
    client, lm = app_and_lm
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 4, "temperature": 0}
    assert client.post("/v1/completions", json=body).status_code == 200
    with monkeypatch.context() as m:
        broken(lm, m, method)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "boom" in err["message"] and set(err) == {"message", "type",
                                                                                           "param", "code"}
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                 "stream": True}) as s:
            events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
        assert s.status_code == 200                          # the stream had started: the error is its last event
        assert json.loads(events[-1])["error"]["type"] == "server_error" and "[DONE]" not in events
    assert client.post("/v1/completions", json=body).status_code == 200          # and the server goes on


def test_the_engine_says_whose_failure_it_was(app_and_lm, monkeypatch):
    """``Event.internal``: False when a request's own settings leave no token (every token banned, which no OpenAI
    field can ask for, so the server's 400 "generation failed" stays for such cases), True when the model failed."""
    from prosa.serve.app import _generation_failed

    _, lm = app_and_lm
    vocab = lm.tokenizer.vocab_size
    _, events = lm.events([[3, 4, 5]], max_new_tokens=3, bad_words_ids=[[i] for i in range(vocab)], min_new_tokens=2)
    (ev,) = list(events)
    assert ev.finish_reason == "error" and "banned" in ev.error and not ev.internal
    assert _generation_failed(ev.error, ev.internal).status == 400
    with monkeypatch.context() as m:
        broken(lm, m, "prefill")
        _, events = lm.events([[3, 4, 5]], max_new_tokens=3)
        (ev,) = list(events)
    assert ev.finish_reason == "error" and "boom" in ev.error and ev.internal
    err = _generation_failed(ev.error, ev.internal)
    assert err.status == 500 and err.kind == "server_error"
