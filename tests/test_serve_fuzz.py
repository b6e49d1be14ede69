"""Property-based fuzz of ``prosa serve``'s POST routes from OpenAI's own API description (schemathesis +
hypothesis): valid and invalid bodies alike get a 2xx or a 4xx in OpenAI's error shape, never a 5xx, and the
server stays healthy."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from test_serve import MODEL, chat_model, serving  # noqa: F401  (fixture)

SPEC = Path(__file__).parent / "data" / "openai-openapi" / "openapi.json"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_server(chat_model):  # noqa: F811
    with serving(chat_model, "--max-batch", "16") as (base, _):
        yield base


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_fuzzed_requests_never_get_a_5xx(fuzz_server, path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_path(str(SPEC))
    op = next(r.ok() for r in schema.get_all_operations() if r.ok().path == path and r.ok().method == "post")
    seen: dict[int, int] = {}
    errors: list[str] = []

    # derandomize: the same 60 bodies on every run (CI must not depend on a lucky draw; a random run once
    # produced no body the model could answer)
    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy())
    def check(case):
        body = case.body
        # four bodies in five name the served model, so that most reach it rather than the 404 (by count, not
        # by the body: hypothesis sends some small bodies many times)
        if isinstance(body, dict) and sum(seen.values()) % 5:
            body = {**body, "model": MODEL}
            # keep generations short: a fuzzed max_tokens is either refused or small
            for key in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(key), int) and body[key] > 8:
                    body[key] = 8
            if isinstance(body.get("n"), int) and body["n"] > 4:
                body["n"] = 4
        r = httpx.post(fuzz_server + "/v1" + path, json=body, timeout=120) if not isinstance(body, (bytes, str)) \
            else httpx.post(fuzz_server + "/v1" + path, content=body, timeout=120)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        if r.status_code == 400 and len(errors) < 40:
            errors.append(r.json()["error"]["message"][:160])
        assert r.status_code < 500, (r.status_code, r.text[:500], body)
        # the engine's own failures (a crashed prompt or step) are 500s (tests/test_serve_failures.py), which the
        # check above catches; a 400 "generation failed" is a request the step refused, which no OpenAI field can
        # ask for on purpose
        if r.status_code == 400:
            assert not r.json()["error"]["message"].startswith("generation failed"), (r.text[:500], body)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        elif r.headers.get("content-type", "").startswith("application/json"):
            assert "choices" in r.json()

    check()
    assert httpx.get(fuzz_server + "/health").status_code == 200
    # both halves of the claim ran: some bodies were refused, some reached the model and were answered
    assert any(code >= 400 for code in seen), (seen, errors)
    assert any(200 <= code < 300 for code in seen), (seen, errors)
