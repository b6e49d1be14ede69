"""The command line a newcomer hits: escapes in text flags, devices, every argument and input file checked before
a model loads, ``-m`` on every verb, ``info`` checking weight files, plain --help texts. Each failure is exit 2
with one error line naming the problem and the fix, never a traceback (issue #12)."""
from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prosa
from prosa.cli import build_parser, main
from prosa.commands import ESCAPES_HELP, unescape

PROSA = [sys.executable, "-m", "prosa"]
MISSING = "/nonexistent/prosa-model"      # a check made before the model is opened fails before this one would
# The real CLI with prosa.load replaced by a tripwire: a check that needs the tokenizer must fail before the weights.
TRIPWIRE = ("import sys, prosa\n"
            "def _load(*a, **k):\n    sys.exit('prosa: test: the weights were loaded before the check')\n"
            "prosa.load = _load\n"
            "from prosa.cli import main\nsys.exit(main(sys.argv[1:]))\n")
NO_CUDA_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


def start(*args: str, stdin: str | None = None, tripwire: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-c", TRIPWIRE] if tripwire else PROSA
    proc = subprocess.Popen([*cmd, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write(stdin or "")
    proc.stdin.close()
    return proc


def finish(procs: dict[str, subprocess.Popen]) -> dict[str, subprocess.CompletedProcess]:
    """Wait for commands started together (each pays prosa's import: in parallel it is paid once in wall time)."""
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.stdout.read(), p.stderr.read()
        p.wait(timeout=300)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def error_line(proc: subprocess.CompletedProcess, *words: str, usage: bool = False) -> str:
    """The one error line of a failed command: exit 2, no traceback; ``usage``: argparse's usage lines before it,
    else nothing else on stderr. Every word must be in the line (case-insensitive)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, proc.stderr
    if usage:
        assert lines[0].startswith("usage: prosa") and lines[-1] == errors[0], proc.stderr
    else:
        assert lines == errors, proc.stderr
    for w in words:
        assert w.lower() in errors[0].lower(), errors[0]
    return errors[0]


def run_main(argv: list[str], capsys, stdin: str = "") -> subprocess.CompletedProcess:
    """``prosa ARGV`` in this process (no import to pay), as a CompletedProcess."""
    saved, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:      # argparse's own errors, --help
        code = e.code
    finally:
        sys.stdin = saved
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


@pytest.fixture
def no_load(monkeypatch):
    """prosa.load made a failure: whatever a test runs must stop before the weights load."""
    monkeypatch.setattr(prosa, "load", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.fixture(scope="module")
def gpt2(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("gpt2"))


# -- escapes ---------------------------------------------------------------------------------------------------------
def test_unescape():
    assert unescape(r"a\nb\tc\\d") == "a\nb\tc\\d"
    assert unescape(r"\d+\s\x41") == r"\d+\s\x41"          # unknown escapes stay as typed
    assert unescape(r"\\n") == "\\n" and unescape("\\") == "\\" and unescape("plain") == "plain"


def test_escapes_in_text_flags(gpt2, capsys):
    """--stop, --bad-words and --system understand \\n, \\t, \\\\ (the shell passes them as two characters)
    and say so in --help; a prompt or a chat message is literal text."""
    procs = finish({
        "gen": start("generate", r"a\nb", "-m", gpt2, "--stop", r"\n\n", "--stop", r"\d", "--json",
                     "--max-new-tokens", "2", "--temperature", "0"),
        "chat_help": start("chat", "--help"),
    })
    assert procs["gen"].returncode == 0, procs["gen"].stderr
    rec = json.loads(procs["gen"].stdout.splitlines()[0])
    assert rec["settings"]["stop"] == ["\n\n", "\\d"] and rec["prompt"] == "a\\nb"
    chat_help = " ".join(procs["chat_help"].stdout.split())
    assert chat_help.count(ESCAPES_HELP) == 3 and "system prompt " + ESCAPES_HELP in chat_help
    gen_help = " ".join(run_main(["generate", "--help"], capsys).stdout.split())
    assert "(repeatable) " + ESCAPES_HELP in gen_help and gen_help.count(ESCAPES_HELP) == 2
    error_line(run_main(["generate", "hi", "-m", MISSING, "--stop", ""], capsys), "--stop", "non-empty",
               usage=True)
    args = build_parser().parse_args(["chat", "--system", r"Be brief.\nNo lists.", "--bad-words", r"a\tb",
                                      "--once", r"C:\new"])
    assert args.system == "Be brief.\nNo lists." and args.bad_words == ["a\tb"] and args.once == r"C:\new"


# -- devices ---------------------------------------------------------------------------------------------------------
DEVICE_VERBS = {"generate": ["generate", "hi"], "chat": ["chat", "--once", "hi"],
                "perplexity": ["perplexity", "--reference"], "serve": ["serve", "--port", "8123"], "info": ["info"],
                "finetune": ["finetune", "{data}", "-o", "{out}"]}


@pytest.mark.parametrize("device", ["tpu", NO_CUDA_DEVICE])
@pytest.mark.parametrize("verb", DEVICE_VERBS)
def test_bad_device_before_the_model(verb, device, tmp_path, capsys, no_load):
    """Every verb that takes --device: a device prosa cannot run on, or a CUDA device this machine lacks, is one
    line naming it and what to use, exit 2, before the model is opened (MISSING would fail otherwise)."""
    data = tmp_path / "data.txt"
    data.write_text("Once upon a time there was a dog.\n" * 20)
    argv = [a.format(data=data, out=tmp_path / "out") for a in DEVICE_VERBS[verb]]
    line = error_line(run_main([*argv, "-m", MISSING, "--device", device], capsys), device, "cpu")
    assert line.startswith("prosa: error: device") and not (tmp_path / "out").exists()


def test_bad_device_on_the_command_line(gpt2):
    """The real command: `--device tpu` and `info --device cuda` on a machine without CUDA (or a GPU index past
    the last) end in one line, exit 2; `info` names the device that would run."""
    procs = finish({"tpu": start("generate", "hi", "-m", MISSING, "--device", "tpu"),
                    "info": start("info", MISSING, "--device", NO_CUDA_DEVICE),
                    "auto": start("info", "-m", gpt2)})
    error_line(procs["tpu"], "device 'tpu'", "use cpu, cuda")
    error_line(procs["info"], NO_CUDA_DEVICE, "cpu")
    rows = dict(ln.split("  ", 1) for ln in procs["auto"].stdout.splitlines() if "  " in ln)
    auto = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert rows["runs on"].strip().startswith(auto) and rows["runs on"].endswith("(auto)"), rows


def test_info_names_the_device_asked_for(gpt2, capsys):
    out = run_main(["info", gpt2, "--device", "cpu", "-q", "bf16"], capsys)
    assert out.returncode == 0, out.stderr
    rows = dict(ln.split("  ", 1) for ln in out.stdout.splitlines() if "  " in ln)
    assert rows["runs on"].strip() == "cpu"
    assert rows["runs as"].strip().startswith("quantize=bf16, activations bfloat16")


def test_resolve_device():
    from prosa.loader import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "mps", "cuda:x", NO_CUDA_DEVICE):
        with pytest.raises(DeviceError, match="cpu"):
            resolve_device(bad)
    with pytest.raises(ValueError):          # a bad parameter value to Python callers too
        prosa.load(MISSING, device="tpu")


# -- every argument and input file checked before the model loads ----------------------------------------------------
M = "{model}"      # the model a case runs with: MISSING, or the tiny gpt2 for the checks that need its tokenizer
CHECKS = [   # (arguments, words of the error line, usage shown: an argument value rather than a file)
    (["generate", "hi", "--logprobs", "-1"], ["--logprobs", "0 to"], True),
    (["generate", "hi", "--max-length", "0"], ["max_length", ">= 1"], True),
    (["generate", "hi", "-n", "0"], ["n ", "1 to"], True),
    (["generate", "hi", "--max-new-tokens", "-3"], ["max_new_tokens"], True),
    (["generate", "hi", "--seed", str(2**64)], ["--seed", "64-bit"], True),
    (["generate", "hi", "--temperature", "-1"], ["temperature"], True),
    (["generate", "hi", "--batch-size", "0"], ["--batch-size", "positive integer"], True),
    (["generate", "hi", "--output", "x.jsonl"], ["--output needs --file"], True),
    (["generate", "hi", "-q", "bf16", "--dtype", "float32"], ["bf16", "--dtype float32"], True),
    (["generate", "--file", "{empty}"], ["--file", "is empty", "one prompt per line"], False),
    (["generate", "--file", "{blank}"], ["--file", "is empty"], False),
    (["generate", "--file", "{folder}"], ["--file", "is a folder"], False),
    (["generate", "--file", "{binary}"], ["--file", "not a text file"], False),
    (["generate", "--file", "{latin1}"], ["--file", "not UTF-8", "iconv"], False),
    (["generate", "--file", "{missing}"], ["cannot read --file", "no such file"], False),
    (["generate", "--file", "{text}", "--output", "{nodir}"], ["--output", "does not exist"], False),
    (["generate", "--file", "{text}", "--output", "{folder}"], ["--output", "is a folder"], False),
    (["generate", "hi", "--adapter", "{folder}"], ["--adapter", "adapter_config.json"], False),
    (["generate", "word " * 300, "-m", M], ["the prompt is", "context window"], True),
    (["generate", "hi", "--logit-bias", "99999=1", "-m", M], ["logit_bias"], True),
    (["generate", "hi", "--max-new-tokens", "500", "-m", M], ["max_new_tokens", "context window"], True),
    (["perplexity", "{empty}"], ["is empty", "nothing to score"], False),
    (["perplexity", "{binary}"], ["not a text file"], False),
    (["perplexity", "{folder}"], ["is a folder"], False),
    (["perplexity", "{missing}"], ["cannot read", "no such file"], False),
    (["perplexity", "-"], ["standard input is empty"], False),
    (["perplexity", "--reference", "--batch-size", "0"], ["--batch-size", "positive integer"], True),
    (["perplexity", "--reference", "--window", "4096", "-m", M], ["window", "context length"], True),
    (["perplexity", "--reference", "--stride", "500", "-m", M], ["stride", "window (128 tokens)"], True),
    (["perplexity", "{one_token}", "-m", M], ["holds 1 token", "at least 2"], False),
    (["chat", "--once", "  "], ["--once", "empty"], True),
    (["chat", "--once", "hi", "--seed", str(-2**64)], ["--seed", "64-bit"], True),
    (["chat", "--once", "hi", "--logit-bias", "99999=1", "-m", M], ["logit_bias"], True),
    (["serve", "--cors-origin", "http://localhost:3000/"], ["--cors-origin", "no trailing slash"], True),
    (["serve", "--api-key", ""], ["--api-key is empty"], True),
    (["serve", "--port", "0"], ["--port"], True),
    (["serve", "--host", "no-such-host.invalid"], ["--host", "127.0.0.1"], False),
    (["info", "-q", "bf16", "--dtype", "float16"], ["bf16", "--dtype float16"], True),
    (["info", "{folder}", "-m", "{text}"], ["two models", "once"], True),
    (["export", "--gguf", "x.bin"], ["end in .gguf"], True),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, gpt2) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    files = {"empty": b"", "blank": b"\n  \n\n", "binary": b"\x00\x01\x02GGUF\x00" * 10, "one_token": b"a",
             "latin1": "café\n".encode("latin-1"), "text": b"Once upon a time\nA story\n"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "folder").mkdir()
    paths = {name: d / name for name in [*files, "folder"]} | {"missing": d / "missing.txt", "nodir": d / "no" / "x"}
    return {k: str(v) for k, v in paths.items()} | {"model": gpt2}


@pytest.mark.parametrize("argv, words, usage", CHECKS, ids=[" ".join(c[0][:4])[:40] for c in CHECKS])
def test_checked_before_the_model(argv, words, usage, inputs, capsys, no_load):
    """Every argument and input file, checked before the weights load (the no_load tripwire) and, but for the
    checks that need the tokenizer or the context length (-m the tiny model), before the model is opened (-m
    names no model)."""
    argv = [a.format(**inputs) for a in argv]
    if "-m" not in argv:
        argv += ["-m", MISSING]
    proc = run_main(argv, capsys)
    error_line(proc, *words, usage=usage)
    assert "no such file or folder" not in proc.stderr


def test_checked_before_the_model_on_the_command_line(inputs, gpt2):
    """The real command, for a sample of the cases: before the model is opened (-m names none), and after its
    tokenizer opens but before the weights load (a tripwire replaces prosa.load)."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    port = str(listening.getsockname()[1])
    procs = {
        "logprobs": start("generate", "hi", "-m", MISSING, "--logprobs", "-1"),
        "max-length": start("generate", "hi", "-m", MISSING, "--max-length", "0"),
        "file": start("generate", "--file", inputs["empty"], "-m", MISSING),
        "ppl-folder": start("perplexity", inputs["folder"], "-m", MISSING),
        "port": start("serve", "-m", MISSING, "--port", port),
        "long": start("generate", "word " * 300, "-m", gpt2, tripwire=True),
        "one-token": start("perplexity", "-", "-m", gpt2, stdin="a", tripwire=True),
    }
    try:
        res = finish(procs)
    finally:
        listening.close()
    error_line(res["logprobs"], "--logprobs", usage=True)
    error_line(res["max-length"], "max_length", usage=True)
    error_line(res["file"], "--file", "is empty")
    error_line(res["ppl-folder"], "is a folder")
    error_line(res["port"], f"127.0.0.1:{port}", "another --port")
    error_line(res["long"], "prompt", "context window", usage=True)
    error_line(res["one-token"], "standard input", "at least 2")


# -- -m everywhere, messages, info's file check, help texts ----------------------------------------------------------
def test_model_option_on_every_verb_and_the_missing_prompt(gpt2, tmp_path, capsys):
    procs = finish({"info": start("info", "-m", gpt2), "nothing": start("generate", "-m", MISSING)})
    assert procs["info"].returncode == 0 and "parameters" in procs["info"].stdout, procs["info"].stderr
    line = error_line(procs["nothing"], "give a PROMPT, '-' for standard input, or --file", usage=True)
    assert "not both" not in line
    error_line(run_main(["generate", "hi", "--file", tmp_path / "x", "-m", MISSING], capsys), "not both", usage=True)
    export = run_main(["export", "-m", MISSING, "--gguf", tmp_path / "out.gguf"], capsys)
    assert export.returncode == 1 and MISSING in export.stderr          # -m named the model to export
    same = run_main(["info", gpt2, "-m", gpt2], capsys)
    assert same.returncode == 0, same.stderr
    extra = {"finetune": ["data"], "export": ["--gguf", "o.gguf"]}
    for verb in ("generate", "chat", "perplexity", "serve", "info", "export", "finetune"):
        assert build_parser().parse_args([verb, "-m", "x", *extra.get(verb, [])]).model == "x"


def test_info_checks_that_weight_files_are_complete(tiny_checkpoint, tmp_path, capsys):
    """A weight file cut short (an interrupted download) is an error naming the file, exit 2, found from the
    headers alone: safetensors, a zip-format pytorch_model.bin, GGUF. Loading fails on it before any weight."""
    import tiny
    from prosa.weights.gguf_export import export_gguf

    src = Path(tiny_checkpoint("gpt2"))
    st = shutil.copytree(src, tmp_path / "st")
    cut = st / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[:-100])             # the header intact, the last tensor short
    error_line(finish({"st": start("info", st)})["st"], "model.safetensors", "truncated", "re-download")
    with pytest.raises(prosa.CorruptModelError, match="spans bytes"):
        prosa.load(st)
    pt = tiny.make_checkpoint("gpt2", tmp_path / "pt", safe_serialization=False)
    (pt / "pytorch_model.bin").write_bytes((pt / "pytorch_model.bin").read_bytes()[:-500])
    capsys.readouterr()                                  # transformers' progress bar
    error_line(run_main(["info", "-m", pt], capsys), "pytorch_model.bin", "truncated", "re-download")
    gguf = export_gguf(src, tmp_path / "model.gguf", "f16").path
    gguf.write_bytes(gguf.read_bytes()[:-100])
    error_line(run_main(["info", gguf], capsys), "model.gguf", "truncated", "re-download")


def test_help_texts_are_plain(capsys):
    """No reST markup (``code``) in any --help: the descriptions are module docstrings."""
    proc = finish({"finetune": start("finetune", "--help")})["finetune"]
    assert proc.returncode == 0 and "``" not in proc.stdout
    assert "several processes: torchrun --nproc_per_node" in " ".join(proc.stdout.lower().split())
    for verb in ("", "generate", "chat", "perplexity", "serve", "info", "export", "finetune"):
        out = run_main([verb, "--help"] if verb else ["--help"], capsys)
        assert out.returncode == 0 and out.stdout.startswith("usage: prosa"), (verb, out.stderr)
        assert "``" not in out.stdout, (verb, out.stdout)
