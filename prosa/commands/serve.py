"""``prosa serve``: the model behind an OpenAI-compatible HTTP API (and a web chat page at ``/``).

The server answers at once: ``/health`` says 503 while the model loads in the background, 200 once it is
ready. SIGTERM or Ctrl-C stop accepting connections and let running streams finish (``--drain-timeout``).
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

from . import InputError, _positive_int, add_model_options, load_model

BUNDLED_ID = "SmolLM2-135M-Instruct"
DESCRIPTION = """Serve a model behind an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions)
with a web chat page at /. The server answers at once: /health says 503 while the model loads, 200 once it is
ready. SIGTERM or Ctrl-C stop accepting connections and let running streams finish (--drain-timeout)."""


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a web chat page",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API (default: $PROSA_API_KEY; none: open)")
    g.add_argument("--model-name", default=None,
                   help="the model id clients use (default: the model's folder or file name, or its Hub id)")
    g.add_argument("--max-batch", type=_positive_int, default=None,
                   help="sequences decoded together at most (default 32 on a CPU)")
    g.add_argument("--kv-cache-tokens", type=_positive_int, default=None,
                   help="KV cache budget in tokens (default: a full batch of whole windows, at most 1/4 of RAM)")
    g.add_argument("--max-waiting", type=_positive_int, default=256,
                   help="queued requests beyond which new ones get 429 + Retry-After (default 256)")
    g.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MB (default 4)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeatable; default: no CORS)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM/Ctrl-C (default 30)")
    p.set_defaults(run=run, subparser=p)


def model_id(model: str | None) -> str:
    """The id ``/v1/models`` shows for what ``-m`` names."""
    model = model or os.environ.get("PROSA_MODEL")
    if not model:
        return BUNDLED_ID
    path = Path(model)
    if path.exists():
        name = path.resolve().name
        return name[:-5] if name.endswith(".gguf") else name
    return model


def _check_server_options(args: argparse.Namespace) -> str | None:
    """The server flags, before anything loads; returns the API key (--api-key, else $PROSA_API_KEY, else None).

    Raises:
        ValueError: a value out of range (usage error). InputError: the address cannot be listened on.
    """
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if not 0 < args.max_body_mb < float("inf"):
        raise ValueError(f"--max-body-mb must be a number of MB > 0, got {args.max_body_mb}")
    if not 0 <= args.drain_timeout < float("inf"):
        raise ValueError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty; give a key, or leave the flag out for an API open to all")
    if args.model_name is not None and not args.model_name.strip():
        raise ValueError("--model-name is empty; give the id clients should use, or leave the flag out")
    for origin in args.cors_origin:
        # a browser sends Origin as scheme://host[:port]: anything else (a trailing slash, a path) never matches
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"--cors-origin {origin!r} is not an origin; write it as scheme://host[:port], e.g. "
                             "http://localhost:3000 (no path, no trailing slash), or * for any")
    _check_listen(args.host, args.port)
    return args.api_key if args.api_key is not None else os.environ.get("PROSA_API_KEY") or None


def _check_listen(host: str, port: int) -> None:
    """Bind host:port once and let it go, as uvicorn will bind it, so that a port in use or a bad --host fails
    before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as uvicorn: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise InputError(f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1 "
                             "(this machine only) or 0.0.0.0 (every interface)") from None
        except OSError as e:
            fix = {errno.EACCES: "ports below 1024 need root: pick --port 1024 or above",
                   errno.EADDRNOTAVAIL: "that --host is not an address of this machine; use 127.0.0.1 or 0.0.0.0",
                   }.get(e.errno, "pick another --port, or stop what uses this one")
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror}; {fix}") from None


def run(args: argparse.Namespace) -> int:
    from . import check_model_options, model_probe

    check_model_options(args)
    api_key = _check_server_options(args)
    import uvicorn

    from ..serve import ServerState, create_app

    model_probe(args)       # a missing or broken model or tokenizer fails now, not in the background

    state = ServerState(model_id=args.model_name or model_id(args.model), api_key=api_key,
                        max_body=int(args.max_body_mb * (1 << 20)), max_waiting=args.max_waiting,
                        cors_origins=list(args.cors_origin))
    options = {k: v for k, v in (("max_batch", args.max_batch), ("kv_cache_tokens", args.kv_cache_tokens))
               if v is not None}

    def load() -> None:
        try:
            lm = load_model(args)
            lm.engine_options.update(options)
            lm.engine                                   # built now: the first request does not pay for it
            state.lm = lm
            print(f"prosa: serving {state.model_id} at http://{args.host}:{args.port}/ (OpenAI API under /v1)",
                  file=sys.stderr, flush=True)
        except Exception as e:          # shown by /health; the server keeps answering
            state.load_error = str(e)
            print(f"prosa: error: {e}", file=sys.stderr, flush=True)

    threading.Thread(target=load, name="prosa-load", daemon=True).start()
    logging.getLogger("prosa").setLevel(logging.INFO)
    config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout, access_log=False)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then raises the signal again under the handlers that
    # were installed before it: these ones, which let `run` return, so a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
    print("prosa: server stopped", file=sys.stderr)
    return 0
