"""``prosa generate``: continue a prompt (an argument, ``-`` for stdin, or ``--file`` with one prompt per line),
streaming to the terminal, or writing JSON records."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import ESCAPES_HELP, _positive_int, add_model_options, load_model, unescape


def _bias(text: str) -> tuple[int, float]:
    try:
        tok, value = text.split("=", 1)
        return int(tok), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, e.g. 50256=-100, got {text!r}") from None


def _text(text: str) -> str:
    """A --stop / --bad-words value: escapes understood, never empty (an empty stop string would match at once)."""
    value = unescape(text)
    if not value:
        raise argparse.ArgumentTypeError("expected a non-empty TEXT")
    return value


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Every sampling control as a flag (shared by `prosa generate` and `prosa chat`)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate at most (default: the model's generation_config, else 128)")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model's generation_config; greedy if it says nothing, as "
                        "lm.generate; 0.7 gives varied text)")
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
    g.add_argument("--bad-words", type=_text, action="append", default=None, metavar="WORD",
                   help="never generate WORD (repeatable) " + ESCAPES_HELP)
    g.add_argument("--min-new-tokens", type=int, default=None, help="no eos before this many tokens")
    g.add_argument("--stop", type=_text, action="append", default=None, metavar="TEXT",
                   help="stop when TEXT is generated; TEXT is not printed (repeatable) " + ESCAPES_HELP)
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
    p.add_argument("prompt", nargs="?",
                   help="the text to continue, taken as typed ('-' reads standard input; for a newline in it use "
                        "$'...' quoting or standard input)")
    p.add_argument("--file", help="read prompts from this UTF-8 file, one per line; a record's index is its prompt's "
                                  "0-based line number; blank lines are not prompts: each gets a record "
                                  '{"index": i, "skipped": "blank line"} (--json, --output) or is counted on stderr')
    p.add_argument("--output", help="with --file: write one JSON record per sequence to this file (.jsonl)")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt + generated tokens at most (transformers' max_length)")
    p.add_argument("-n", type=int, default=1, help="sequences per prompt (the prompt is processed once)")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="record each token's log-probability and the K most likely alternatives (with --json)")
    p.add_argument("--json", action="store_true", help="print one JSON record per sequence instead of text")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="with --file: prompts decoded together")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.set_defaults(run=run, subparser=p)


def record(res, prompt: str) -> dict[str, Any]:
    """A JSON-ready record of one result."""
    out = {"prompt": prompt, "text": res.text, "tokens": res.tokens, "finish_reason": res.finish_reason,
           "stop_reason": res.stop_reason, "index": res.index, "sample": res.sample, "settings": res.settings}
    if res.logprobs is not None:
        out["logprobs"] = [{"token": lp.token, "logprob": lp.logprob, "top": lp.top} for lp in res.logprobs]
    return out


def _check_counts(args: argparse.Namespace) -> None:
    """The integer flags, checked as ``LanguageModel.make_requests`` would check them once the model is loaded."""
    from . import check_seed
    from ..language_model import MAX_LOGPROBS, MAX_N

    if not 1 <= args.n <= MAX_N:
        raise ValueError(f"n (num_return_sequences) must be an integer from 1 to {MAX_N}, got {args.n}")
    if args.logprobs is not None and not 0 <= args.logprobs <= MAX_LOGPROBS:
        raise ValueError(f"--logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {args.logprobs}")
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"max_length must be an integer >= 1, got {args.max_length}")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {args.max_new_tokens}")
    check_seed(args.seed)


def run(args: argparse.Namespace) -> int:
    # Every argument and input file is checked before the model loads (minutes for a large one): first what
    # needs nothing, then the prompt and settings against the tokenizer and context window (model_probe).
    if args.prompt is None and args.file is None:
        raise ValueError("nothing to continue: give a PROMPT, '-' for standard input, or --file")
    if args.prompt is not None and args.file is not None:
        raise ValueError("give a PROMPT or --file, not both")
    if args.output and not args.file:
        raise ValueError("--output needs --file (for one PROMPT, --json prints the records)")
    import prosa
    from . import check_model_options, check_output_file, model_probe, read_text
    from ..language_model import SAMPLING_FIELDS
    from ..sampling import SamplingParams

    _check_counts(args)
    kw = sampling_kwargs(args)
    kw.update(n=args.n, logprobs=args.logprobs, ignore_eos=args.ignore_eos, max_length=args.max_length)
    SamplingParams(**{k: v for k, v in kw.items() if k in SAMPLING_FIELDS})
    check_model_options(args)
    if args.file:
        read_text(args.file, f"--file {args.file}", "no prompts in it; write one prompt per line")
    if args.output:
        check_output_file(args.output, f"--output {args.output}")
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]    # blank ones too: records keep their line number
            prompts = [line for line in lines if line.strip()]
        except OSError as e:
            raise prosa.ProsaError(f"cannot read --file {args.file}: {e.strerror}") from None
    else:
        prompts = [sys.stdin.read() if args.prompt == "-" else args.prompt]
    probe = model_probe(args)
    if probe is not None:   # every prompt's length and token ids, the settings vs the vocabulary and window
        if args.file:
            for i, line in enumerate(lines):
                if line.strip():
                    try:
                        probe.make_requests([line], **kw)
                    except ValueError as e:
                        raise ValueError(f"--file {args.file} line {i + 1}: {e}") from None
        else:
            probe.make_requests(prompts, **kw)
    lm = load_model(args)
    if args.file:
        return _run_file(lm, lines, kw, args)
    (req,) = lm.make_requests(prompts, **kw)   # validate every setting before any work
    _room_notice(lm, [(None, req)], args)
    if args.json or args.n > 1:
        results = lm.generate(prompts[0], **kw)
        results = results if isinstance(results, list) else [results]
        for res in results:
            if args.json:
                print(json.dumps(record(res, prompts[0]), ensure_ascii=False))
            else:
                print(f"--- sample {res.sample}\n{res.text}")
        _cut_notice(lm, [(None, res.sample, len(res.prompt_tokens), len(res.tokens), res.finish_reason,
                          res.stop_reason) for res in results], args)
        return 0
    new, last = 0, None
    for chunk in lm.stream(prompts[0], **kw):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        new, last = new + len(chunk.token_ids), chunk
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None:
        _cut_notice(lm, [(None, 0, len(req.prompt), new, last.finish_reason, last.stop_reason)], args)
    return 0


def _run_file(lm, lines: list[str], kw: dict, args: argparse.Namespace) -> int:
    """Generate for every non-blank line of --file, ``batch_size`` prompts at a time; a record's ``index`` is its
    prompt's 0-based line number, and each blank line gets a {"index": i, "skipped": "blank line"} record (JSON
    output) or is counted in a notice on stderr (text output)."""
    from collections import deque

    from tqdm import tqdm

    todo = [(i, line) for i, line in enumerate(lines) if line.strip()]
    blank = deque(i for i, line in enumerate(lines) if not line.strip())
    requests = []
    for i, prompt in todo:       # every prompt checked before any work, named by its line
        try:
            requests.append(lm.make_requests([prompt], **kw)[0])
        except ValueError as e:
            raise ValueError(f"--file {args.file} line {i + 1}: {e}") from None
    _room_notice(lm, [(i, r) for (i, _), r in zip(todo, requests)], args)
    as_json = bool(args.json or args.output)
    if blank and not as_json:
        print(f"prosa: notice: {_count(len(blank), 'blank line')} of --file {args.file} skipped (not prompts; "
              f"{_lines(blank)})", file=sys.stderr)
    ended: list[tuple] = []
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        with tqdm(total=len(todo), unit="prompt", disable=None, file=sys.stderr) as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                for res in lm.generate([prompt for _, prompt in batch], **kw):
                    line, prompt = batch[res.index]
                    if as_json:
                        while blank and blank[0] < line:           # records in line order
                            out.write(json.dumps({"index": blank.popleft(), "skipped": "blank line"}) + "\n")
                        rec = record(res, prompt)
                        rec["index"] = line
                        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    else:
                        out.write(f"--- prompt {line} sample {res.sample}\n{res.text}\n")
                    ended.append((line, res.sample, len(res.prompt_tokens), len(res.tokens), res.finish_reason,
                                  res.stop_reason))
                out.flush()
                bar.update(len(batch))
        while as_json and blank:
            out.write(json.dumps({"index": blank.popleft(), "skipped": "blank line"}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    _cut_notice(lm, ended, args)
    return 0


# -- notices: output cut by a limit says so on stderr -------------------------------------------------------------
def _count(k: int, what: str) -> str:
    return f"{k} {what}" + ("" if k == 1 else "s")


def _lines(lines, most: int = 8) -> str:
    """'line 3' / 'lines 3, 7, ...' (1-based, as an editor shows them) of 0-based line numbers."""
    shown = sorted(set(lines))
    text = ", ".join(str(i + 1) for i in shown[:most]) + (", ..." if len(shown) > most else "")
    return ("line " if len(shown) == 1 else "lines ") + text


def _room_notice(lm, requests: list[tuple[int | None, Any]], args: argparse.Namespace) -> None:
    """Before generating: when an explicit --max-new-tokens is more than the context window leaves after a prompt,
    say how many tokens can actually come (``requests``: (line of --file or None, Request))."""
    if args.max_new_tokens is None or args.context_overflow == "slide":
        return
    short = [(line, lm.room(r), len(r.prompt)) for line, r in requests if lm.room(r) < r.max_new_tokens]
    if not short:
        return
    window, slide = lm.context_length, "--context-overflow slide goes on past it"
    if requests[0][0] is None:
        _, room, plen = short[0]
        msg = (f"--max-new-tokens {args.max_new_tokens}, but this {plen}-token prompt leaves room for only {room} "
               f"in the model's {window}-token context window; generation stops there at the latest ({slide})")
    else:
        msg = (f"--max-new-tokens {args.max_new_tokens}, but {len(short)} of {len(requests)} prompts leave room "
               f"for fewer in the model's {window}-token context window (as few as {min(r for _, r, _ in short)}; "
               f"{_lines(line for line, _, _ in short)}); they stop there at the latest ({slide})")
    print(f"prosa: notice: {msg}", file=sys.stderr)


def _cut_notice(lm, ended: list[tuple], args: argparse.Namespace) -> None:
    """After generating: say which sequences the context window or --max-length cut (``ended``: per sequence
    (line of --file or None, sample, prompt tokens, new tokens, finish_reason, stop_reason)). The records carry
    it too: finish_reason "length" with stop_reason "context" (the window) or None (the token limit)."""
    from ..engine import CONTEXT

    by_max_length = args.max_new_tokens is None and args.max_length is not None
    for why in ("context", "max_length"):
        cut = [e for e in ended if e[4] == "length" and (e[5] == CONTEXT if why == "context" else
                                                         by_max_length and e[5] is None)]
        if not cut:
            continue
        limit = (f"the model's {lm.context_length}-token context window" if why == "context"
                 else f"--max-length {args.max_length}")
        hint = "; --context-overflow slide goes on past it" if why == "context" else ""
        if len(ended) == 1:
            _, _, plen, new, _, _ = cut[0]
            msg = f"the output was cut at {limit} ({plen} prompt + {new} new tokens{hint})"
        else:
            where = (_lines(e[0] for e in cut) if cut[0][0] is not None
                     else "samples " + ", ".join(str(e[1]) for e in cut))
            msg = f"{len(cut)} of {_count(len(ended), 'sequence')} were cut at {limit} ({where}{hint})"
        print(f"prosa: notice: {msg}", file=sys.stderr)
