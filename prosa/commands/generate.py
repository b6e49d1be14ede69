"""``prosa generate``: continue a prompt (an argument, ``-`` for stdin, or ``--file`` with one prompt per line),
streaming to the terminal, or writing JSON records."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import add_model_options, load_model

PIPELINE_TEMPERATURE, PIPELINE_TOP_K = 0.7, 50   # transformers' pipeline defaults when sampling


def _bias(text: str) -> tuple[int, float]:
    try:
        tok, value = text.split("=", 1)
        return int(tok), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, e.g. 50256=-100, got {text!r}") from None


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Every sampling control as a flag (shared by `prosa generate` and `prosa chat`)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default 128)")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model's generation_config; if it says nothing, 0.7 with top-k 50, "
                        "as transformers' pipeline)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass, in (0, 1]")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    g.add_argument("--typical-p", type=float, default=None, help="locally typical sampling mass, in (0, 1]")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages any seen token")
    g.add_argument("--presence-penalty", type=float, default=None, help="subtract from tokens already generated")
    g.add_argument("--frequency-penalty", type=float, default=None, help="subtract x count of each generated token")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size")
    g.add_argument("--logit-bias", type=_bias, action="append", default=None, metavar="TOKEN=BIAS",
                   help="add BIAS to a token's logit (repeatable)")
    g.add_argument("--bad-words", action="append", default=None, metavar="WORD", help="never generate WORD (repeatable)")
    g.add_argument("--min-new-tokens", type=int, default=None, help="no eos before this many tokens")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when TEXT is generated; TEXT is not printed (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--context-overflow", choices=["error", "slide"], default="error",
                   help="past the context window: stop (error) or keep the most recent tokens and go on (slide)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generation keyword arguments the flags of ``add_sampling_options`` set (unset flags left out)."""
    names = ["max_new_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "no_repeat_ngram_size", "min_new_tokens", "stop", "seed",
             "bad_words"]
    kw = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if args.logit_bias:
        kw["logit_bias"] = dict(args.logit_bias)
    kw["context_overflow"] = args.context_overflow
    return kw


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt", description=__doc__)
    p.add_argument("prompt", nargs="?", help="the text to continue ('-' reads standard input)")
    p.add_argument("--file", help="read prompts from this file, one per line")
    p.add_argument("--output", help="with --file: write one JSON record per sequence to this file (.jsonl)")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt + generated tokens at most (transformers' max_length)")
    p.add_argument("-n", type=int, default=1, help="sequences per prompt (the prompt is processed once)")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="record each token's log-probability and the K most likely alternatives (with --json)")
    p.add_argument("--json", action="store_true", help="print one JSON record per sequence instead of text")
    p.add_argument("--batch-size", type=int, default=8, help="with --file: prompts decoded together")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.set_defaults(run=run, subparser=p)


def record(res, prompt: str) -> dict[str, Any]:
    """A JSON-ready record of one result."""
    out = {"prompt": prompt, "text": res.text, "tokens": res.tokens, "finish_reason": res.finish_reason,
           "stop_reason": res.stop_reason, "index": res.index, "sample": res.sample, "settings": res.settings}
    if res.logprobs is not None:
        out["logprobs"] = [{"token": lp.token, "logprob": lp.logprob, "top": lp.top} for lp in res.logprobs]
    return out


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.file is None):
        raise ValueError("give a PROMPT (or '-' for standard input) or --file, not both")
    if args.output and not args.file:
        raise ValueError("--output needs --file")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    import prosa
    from ..language_model import SAMPLING_FIELDS
    from ..sampling import SamplingParams

    kw = sampling_kwargs(args)
    kw.update(n=args.n, logprobs=args.logprobs, ignore_eos=args.ignore_eos, max_length=args.max_length)
    # Check what can be checked before spending seconds on loading the model.
    SamplingParams(**{k: v for k, v in kw.items() if k in SAMPLING_FIELDS})
    if args.n < 1:
        raise ValueError(f"n must be an integer >= 1, got {args.n}")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {args.max_new_tokens}")
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise prosa.ProsaError(f"cannot read --file {args.file}: {e.strerror}") from None
    else:
        prompts = [sys.stdin.read() if args.prompt == "-" else args.prompt]
    lm = load_model(args)
    if args.temperature is None and "do_sample" not in lm.generation_config:
        # A model that states no default samples as transformers' text-generation pipeline does (greedy text
        # from small models loops); `--temperature 0` asks for greedy.
        kw["temperature"] = PIPELINE_TEMPERATURE
        kw.setdefault("top_k", PIPELINE_TOP_K)
    lm.make_requests(prompts[:1], **kw)   # validate every setting before any work
    if args.file:
        return _run_file(lm, prompts, kw, args)
    if args.json or args.n > 1:
        results = lm.generate(prompts[0], **kw)
        for res in results if isinstance(results, list) else [results]:
            if args.json:
                print(json.dumps(record(res, prompts[0]), ensure_ascii=False))
            else:
                print(f"--- sample {res.sample}\n{res.text}")
        return 0
    for chunk in lm.stream(prompts[0], **kw):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _run_file(lm, prompts: list[str], kw: dict, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        with tqdm(total=len(prompts), unit="prompt", disable=None, file=sys.stderr) as bar:
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start:start + args.batch_size]
                for res in lm.generate(batch, **kw):
                    rec = record(res, batch[res.index])
                    rec["index"] = start + res.index
                    if args.json or args.output:
                        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    else:
                        out.write(f"--- prompt {start + res.index} sample {res.sample}\n{res.text}\n")
                out.flush()
                bar.update(len(batch))
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
