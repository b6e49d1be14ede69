"""The web chat page of ``prosa serve`` (prosa/serve/static/index.html) in a real browser.

A real ``prosa serve`` runs the tiny random Llama (no chat template: transcript mode, random text) and Debian's
Chromium, driven by Playwright, chats with it: a streamed reply, a reply stopped half-way (and the server's
``prosa_requests_running`` back to 0), a reload that keeps the conversation and the settings, and "New chat".

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` Python package (never its own
browsers: ``playwright install`` is not needed and must not run); skipped without them.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parent.parent

# The tiny model writes a whole reply in a few tens of milliseconds, faster than anyone could press Stop, and the
# browser would then read it in one piece. The page therefore talks to the server through `Trickle`, a relay that
# passes the chat completion streams on in small pieces a few milliseconds apart, so that the page really reads
# them bit by bit (events split across reads too) and Stop lands half-way.
PIECE_BYTES = 96
PIECE_GAP_S = 0.01
FIRST_MAX_TOKENS = 8          # the tiny model's window is 128 tokens: both exchanges must fit in it
STOP_MAX_TOKENS = 64

ASSISTANT = ".msg[data-role=assistant]"
LAST_ASSISTANT = f"#messages > {ASSISTANT}:last-child"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _running(base: str) -> float:
    """``prosa_requests_running`` from the server's Prometheus text."""
    status, text = _get(base + "/metrics")
    assert status == 200, f"/metrics answered {status}: {text[:300]}"
    m = re.search(r"^prosa_requests_running(?:\{[^}]*\})?\s+(\S+)\s*$", text, re.MULTILINE)
    assert m, f"/metrics has no prosa_requests_running gauge:\n{text[:1000]}"
    return float(m.group(1))


class Trickle:
    """A TCP relay 127.0.0.1:port -> the server; responses to ``POST /v1/chat/completions`` go out in pieces."""

    REQUEST_LINE = re.compile(rb"^[A-Z]+ /")

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets += [client, upstream]
            state = {"trickle": False}
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, state), daemon=True).start()

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:                 # a closed browser connection closes the server's, as it would directly
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _requests(self, client, upstream, state) -> None:
        try:
            while data := client.recv(65536):
                if self.REQUEST_LINE.match(data):           # a new request (Chrome does not pipeline)
                    state["trickle"] = data.startswith(b"POST /v1/chat/completions ")
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            self._close(client, upstream)

    def _responses(self, upstream, client, state) -> None:
        try:
            while data := upstream.recv(65536):
                if not state["trickle"]:
                    client.sendall(data)
                    continue
                for i in range(0, len(data), PIECE_BYTES):
                    client.sendall(data[i:i + PIECE_BYTES])
                    time.sleep(PIECE_GAP_S)
        except OSError:
            pass
        finally:
            self._close(upstream, client)

    def close(self) -> None:
        self._close(self.listener, *self.sockets)


@pytest.fixture
def server(tiny_checkpoint, tmp_path):
    """Port of a ``prosa serve`` subprocess serving the tiny Llama, ready (``/health`` 200)."""
    pytest.importorskip("fastapi", reason="prosa serve needs fastapi")
    pytest.importorskip("uvicorn", reason="prosa serve needs uvicorn")
    model = tiny_checkpoint("llama")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prosa", "serve", "-m", str(model),
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def log_text() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prosa serve exited with {proc.returncode}:\n{log_text()}")
            try:
                if _get(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass                                    # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"prosa serve not healthy after 60 s:\n{log_text()}")
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright package is missing (pip install playwright)")
    with sync_api.sync_playwright() as p:                 # launch() gives a fresh temporary profile
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.slow
def test_chat_page(server, browser):
    api = f"http://127.0.0.1:{server}"                   # the server itself, for /metrics
    relay = Trickle(server)
    try:
        _chat(api, f"http://127.0.0.1:{relay.port}", browser)
    finally:
        relay.close()


def _chat(api: str, base: str, browser) -> None:
    """The chat, on the page at ``base`` (the relay)."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    context.set_default_timeout(15_000)
    page = context.new_page()

    problems: list[str] = []                             # script errors, requests leaving the server
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: r.url.startswith(base + "/") or r.url.startswith("data:")
            or problems.append(f"request outside the server: {r.url}"))
    chats: list = []                                    # the page's chat completion requests
    page.on("request", lambda r: r.url == base + "/v1/chat/completions" and chats.append(r))

    page.goto(base + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    model_id = json.loads(_get(api + "/v1/models")[1])["data"][0]["id"]
    assert page.input_value("#model") == model_id
    assert page.locator(".msg").count() == 0

    page.click("#settings-toggle")
    page.fill("#max-tokens", str(FIRST_MAX_TOKENS))
    page.fill("#seed", "1")
    page.fill("#temperature", "0.8")
    page.fill("#api-key", "test-key")                   # this server wants none: it ignores the header

    # -- a streamed reply ---------------------------------------------------------------------------------------
    page.fill("#prompt", "Hello there")
    page.click("#send")
    page.locator(".msg[data-role=user]").first.wait_for()
    assert page.locator(".msg[data-role=user] .content").first.inner_text() == "Hello there"
    assert page.input_value("#prompt") == ""
    # text shows up while the reply is still streaming, with Send disabled and Stop offered
    page.wait_for_function(f"(() => {{ const m = document.querySelector('{ASSISTANT}.streaming .content');"
                           " return !!m && m.textContent.length > 0; })()")
    assert page.is_disabled("#send")
    assert page.is_visible("#stop")
    page.wait_for_selector(f"{ASSISTANT}.streaming", state="detached")
    first = page.locator(ASSISTANT).first
    assert first.locator(".content").inner_text().strip(), "the reply is empty"
    assert first.locator(".error").count() == 0, first.locator(".error").inner_text()
    assert "stopped" not in (first.get_attribute("class") or "")
    assert not page.is_visible("#stop")

    assert chats[0].headers.get("authorization") == "Bearer test-key"
    body = chats[0].post_data_json
    assert body["model"] == model_id and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    assert body["max_completion_tokens"] == FIRST_MAX_TOKENS and body["seed"] == 1 and body["temperature"] == 0.8

    # -- Stop half-way: Enter sends, Stop aborts the request, nothing keeps running on the server ------------------
    page.fill("#max-tokens", str(STOP_MAX_TOKENS))
    page.fill("#prompt", "Tell me more")
    page.press("#prompt", "Enter")
    page.wait_for_function(f"(() => {{ const m = document.querySelector('{ASSISTANT}.streaming .content');"
                           " return !!m && m.textContent.length > 0; })()")
    page.click("#stop")
    page.wait_for_selector(f"{LAST_ASSISTANT}.stopped")
    stopped = page.locator(ASSISTANT).nth(1)
    assert stopped.locator(".error").count() == 0, stopped.locator(".error").inner_text()
    assert stopped.locator(".content").inner_text().strip(), "the stopped reply kept no text"
    assert not page.is_visible("#stop")
    body = chats[1].post_data_json
    assert body["max_completion_tokens"] == STOP_MAX_TOKENS
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    deadline = time.monotonic() + 2
    while (running := _running(api)) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running == 0, f"prosa_requests_running is {running} 2 s after Stop"

    # -- a reload shows the same conversation and settings -----------------------------------------------------
    texts = page.locator(".msg .content").all_inner_texts()
    roles = [m.get_attribute("data-role") for m in page.locator(".msg").all()]
    assert roles == ["user", "assistant", "user", "assistant"]
    page.reload()
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator(".msg").count() == len(texts)
    assert page.locator(".msg .content").all_inner_texts() == texts
    assert [m.get_attribute("data-role") for m in page.locator(".msg").all()] == roles
    assert "stopped" in (page.locator(ASSISTANT).nth(1).get_attribute("class") or "")
    assert page.input_value("#max-tokens") == str(STOP_MAX_TOKENS)
    assert page.input_value("#seed") == "1" and page.input_value("#temperature") == "0.8"

    # -- New chat empties it, for good ---------------------------------------------------------------------------
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.reload()
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator(".msg").count() == 0

    assert not problems, "\n".join(problems)
    context.close()


MARKDOWN = [   # (model text, the HTML the page shows for it)
    ("<script>alert(1)</script> <img src=x onerror=alert(2)>",
     "<p>&lt;script&gt;alert(1)&lt;/script&gt; &lt;img src=x onerror=alert(2)&gt;</p>"),
    ("**bold**, *italic* and `x<y`", "<p><strong>bold</strong>, <em>italic</em> and <code>x&lt;y</code></p>"),
    ("```py\nif a < b:\n    print('<i>')\n```\nafter",
     '<pre data-lang="py"><code>if a &lt; b:\n    print(&#39;&lt;i&gt;&#39;)</code></pre><p>after</p>'),
    ("```\nnot closed *yet*", "<pre><code>not closed *yet*</code></pre>"),
    ("- one\n- **two**\n\n1. x\n2. y",
     "<ul><li>one</li><li><strong>two</strong></li></ul><ol><li>x</li><li>y</li></ol>"),
    ("a\nb\n\nc", "<p>a<br>b</p><p>c</p>"),
    ("2 * 3 * 4 and snake_case_name", "<p>2 * 3 * 4 and snake_case_name</p>"),
    ('[x](javascript:alert(1)) "q"', "<p>[x](javascript:alert(1)) &quot;q&quot;</p>"),
]


@pytest.mark.slow
def test_chat_page_markdown(browser):
    """Model text is escaped, then a small markdown subset is rendered: never any tag or attribute of its own."""
    page = browser.new_page()
    page.goto((REPO / "prosa" / "serve" / "static" / "index.html").as_uri())   # no server needed for this
    for text, html in MARKDOWN:
        assert page.evaluate("t => window.prosaChat.renderMarkdown(t)", text) == html, text
    tags = page.evaluate("""texts => {
        const div = document.createElement('div');
        const seen = new Set();
        for (const t of texts) {
            div.innerHTML = window.prosaChat.renderMarkdown(t);
            for (const el of div.querySelectorAll('*')) {
                seen.add(el.tagName.toLowerCase());
                for (const a of el.attributes) seen.add('@' + a.name);
            }
        }
        return [...seen].sort();
    }""", [t for t, _ in MARKDOWN])
    assert set(tags) <= {"p", "br", "strong", "em", "code", "pre", "ul", "ol", "li", "@data-lang"}, tags
    page.close()
