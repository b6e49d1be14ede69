"""``prosa serve``: the model behind an OpenAI-compatible HTTP API (and a web chat page at ``/``).

The server answers at once: ``/health`` says 503 while the model loads in the background, 200 once it is
ready. SIGTERM or Ctrl-C stop accepting connections and let running streams finish (``--drain-timeout``).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import _positive_int, add_model_options, load_model

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
    g.add_argument("--api-key", default=os.environ.get("PROSA_API_KEY"),
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


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_body_mb <= 0 or args.drain_timeout < 0:
        raise ValueError("--max-body-mb must be > 0 and --drain-timeout >= 0")
    import uvicorn

    from ..loader import open_checkpoint
    from ..serve import ServerState, create_app

    open_checkpoint(args.model, args.revision)      # a missing or broken model fails now, not in the background

    state = ServerState(model_id=args.model_name or model_id(args.model), api_key=args.api_key or None,
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
