"""Worker side of ``bench/run.py``: build the benchmark's extra checkpoints, and measure one configuration of one
system (prosa, transformers, CTranslate2, llama.cpp) inside a fresh process.

Every ``run_*`` function is called in a child process started by ``bench/run.py --worker``. It imports its
libraries itself (so their import time counts towards time to first token), loads the model, generates greedily
with end-of-sequence ignored, and returns a dict:

    ttft_s        process start (``t0``, taken by the parent just before spawning) -> first token's text available
    decode_tok_s  aggregate tokens/s after the first step: (tokens generated after step 1) / (time after step 1)
    peak_rss_mb   this process's peak resident set (VmHWM)
    weights       what the weights are stored as; weight_bytes: their size in memory (or on disk when mapped)
    prompt_tokens, tokens, sample: prompt length, tokens generated in all, the start of sequence 0's text
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

PROMPT = "A story about a man and a dog"
CACHE = Path(os.environ.get("PROSA_BENCH_CACHE", Path.home() / ".cache" / "prosa" / "bench"))
READY = ".bench-ready"   # written last, so that a half-built folder (interrupted run) is rebuilt, not used


# ----------------------------------------------------------------------------------------------- measurement
def rss_mb(key: str = "VmRSS") -> float:
    """This process's resident set (``VmRSS``) or its peak (``VmHWM``) in MB, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set of this process in MB, from /proc/self/status's VmHWM. (``ru_maxrss`` is not used: on
    Linux it survives exec, so a child spawned by a big parent would report the parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Clock:
    """Collects the times at which decode steps finish.

    ``first(n, text)`` is called once, when the first step's tokens (n of them, one per sequence) are available
    and its text decoded; ``step(n)`` after every later step.
    """

    def __init__(self, t0: float):
        self.t0 = t0
        self.t_first: float | None = None
        self.t_last = 0.0
        self.n_first = 0
        self.n = 0
        self.sample = ""

    def first(self, n: int, text: str) -> None:
        self.t_first = self.t_last = time.time()
        self.n_first = self.n = n
        self.sample = text

    def step(self, n: int, text: str = "") -> None:
        self.t_last = time.time()
        self.n += n
        if len(self.sample) < 60:
            self.sample += text

    def result(self, **extra: Any) -> dict[str, Any]:
        if self.t_first is None:
            raise RuntimeError("no token was generated")
        after = self.n - self.n_first
        span = self.t_last - self.t_first
        return {"ttft_s": self.t_first - self.t0, "decode_tok_s": after / span if span > 0 and after else float("nan"),
                "tokens": self.n, "sample": self.sample[:60], "peak_rss_mb": peak_rss_mb(), **extra}


def module_bytes(module: Any) -> int:
    """Bytes held by a torch module's parameters and buffers, each storage counted once (tied weights)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t is not None and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------ the systems
def run_prosa(spec: dict[str, Any]) -> dict[str, Any]:
    """prosa's ``events`` (what ``stream`` and ``generate`` are built on), timed per token.

    ``stream`` is not timed directly: it only yields once text is final, and a random model's byte tokens may
    never form valid UTF-8 until the end, which would hide every step but the last.
    """
    # issue #13's baselines, in this same process: `import torch` alone (time from the process start, resident
    # memory); prosa's own imports and load come on top of them
    import torch  # noqa: F401

    torch_s, torch_rss = time.time() - spec["t0"], rss_mb()
    import prosa

    # "int4+a8": int4 weights with int8 activations (llama.cpp's arithmetic), the opt-in fast kernels
    fmt, _, act = spec["format"].partition("+a")
    lm = prosa.load(spec["path"], quantize=fmt, threads=spec["threads"])
    if act:
        from prosa.quant import set_activations
        set_activations(lm.model, "int8")
    clock, b, n = Clock(spec["t0"]), spec["seqs"], spec["tokens"]
    prompt_tokens = len(lm.encode(PROMPT))
    # Events come per token and per sequence; the model only runs again once a step's b events are consumed,
    # so "first step done" is the first event, and the rest of that step is counted with it.
    _, events = lm.events([PROMPT] * b, max_new_tokens=n, temperature=0, ignore_eos=True)
    seen = 0
    for ev in events:
        seen += 1
        if seen == 1:
            clock.first(b, ev.text)
        elif seen > b:
            clock.step(1, ev.text if ev.seq == 0 else "")
    return clock.result(weights=lm.weights, weight_bytes=module_bytes(lm.model), prompt_tokens=prompt_tokens,
                        import_torch_s=torch_s, import_torch_rss_mb=torch_rss)


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """transformers ``generate`` (greedy, min_new_tokens = max_new_tokens) with a streamer that timestamps
    each step; a GGUF file is dequantized to float32 at load, which counts towards its time to first token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    path = Path(spec["path"])
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if kw else path
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    clock, b, n = Clock(spec["t0"]), spec["seqs"], spec["tokens"]
    inputs = tok([PROMPT] * b, return_tensors="pt")

    class Stamp(BaseStreamer):
        calls = 0

        def put(self, value: torch.Tensor) -> None:
            Stamp.calls += 1
            if Stamp.calls == 1:
                return                          # generate() first hands over the prompt
            ids = value.reshape(-1)
            text = tok.decode(ids[:1])
            clock.first(ids.numel(), text) if clock.t_first is None else clock.step(ids.numel(), text)

        def end(self) -> None:
            pass

    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=Stamp(),
                       pad_token_id=tok.eos_token_id)
    return clock.result(weights="float32" + (" (dequantized from GGUF)" if kw else ""),
                        weight_bytes=module_bytes(model), prompt_tokens=inputs["input_ids"].shape[1])


def run_ctranslate2(spec: dict[str, Any]) -> dict[str, Any]:
    """CTranslate2 ``generate_batch`` with a per-token callback (greedy: sampling_topk=1; exactly N tokens:
    min_length = max_length); the prompt is forwarded at once (include_prompt_in_result=False)."""
    import ctranslate2
    import tokenizers

    folder = Path(spec["path"])
    gen = ctranslate2.Generator(str(folder), device="cpu", compute_type=spec["format"],
                                intra_threads=spec["threads"])
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = tok.encode(PROMPT).tokens
    clock, b, n = Clock(spec["t0"]), spec["seqs"], spec["tokens"]
    state = {"seen": 0}

    def callback(step: Any) -> bool:
        text = tok.decode([step.token_id]) if step.batch_id == 0 else ""
        if clock.t_first is None:
            clock.first(b, text)
            state["seen"] = 1
        elif state["seen"] < b:
            state["seen"] += 1                  # rest of step 1
        else:
            clock.step(1, text)
        return False

    gen.generate_batch([prompt] * b, max_length=n, min_length=n, sampling_topk=1, beam_size=1,
                       include_prompt_in_result=False, callback=callback)
    return clock.result(weights=f"{spec['format']} (CTranslate2 model.bin)",
                        weight_bytes=(folder / "model.bin").stat().st_size, prompt_tokens=len(prompt))


def run_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    """llama-cpp-python on the GGUF file itself: ``Llama.generate`` (greedy) yields token ids and never stops on
    its own, so taking N of them forces N tokens regardless of eos."""
    from llama_cpp import Llama

    if spec["seqs"] != 1:
        raise ValueError("llama-cpp-python decodes one sequence per Llama object")
    llm = Llama(model_path=spec["path"], n_threads=spec["threads"], n_threads_batch=spec["threads"], n_ctx=512,
                verbose=False)
    ids = llm.tokenize(PROMPT.encode())
    clock, n = Clock(spec["t0"]), spec["tokens"]
    for i, tok in enumerate(llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)):
        text = llm.detokenize([tok]).decode("utf-8", "replace")
        clock.first(1, text) if clock.t_first is None else clock.step(1, text)
        if i + 1 >= n:
            break
    return clock.result(weights="GGUF Q4_1 (llama.cpp, mmap)", weight_bytes=Path(spec["path"]).stat().st_size,
                        prompt_tokens=len(ids))


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "prosa": run_prosa, "transformers": run_transformers, "CTranslate2": run_ctranslate2,
    "llama.cpp": run_llama_cpp}


# ------------------------------------------------------------------------------------------ building models
def gpt2_byte_tokenizer(folder: Path) -> None:
    """Save a byte-level BPE tokenizer with exactly GPT-2's vocabulary size (50257) to ``folder``.

    There is no network to fetch GPT-2's own, and a trained one on a small corpus stops far short of 50257 ids.
    Instead: the 256 byte symbols, then 50000 two-symbol merges (printable ASCII pairs first, so English text
    merges like real BPE does), then <|endoftext|> at id 50256, as in GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Printable ASCII stands for itself in the byte-level alphabet, and "Ġ" is the space.
    order = sorted(alphabet, key=lambda s: (not (33 <= ord(s) <= 126 or s == "Ġ"), s))
    vocab = {s: i for i, s in enumerate(sorted(alphabet))}
    merges = []
    for a in order:
        for b in order:
            if len(vocab) >= 50256:
                break
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = 50256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos).save_pretrained(folder)


def make_gpt2(folder: Path, n_layer: int = 12) -> Path:
    """A GPT-2-124M-shaped checkpoint (``GPT2Config`` defaults, n_layer as given) with random weights, written
    with transformers' ``save_pretrained`` (safetensors) plus a 50257-id tokenizer. Built once, then reused."""
    if (folder / READY).is_file():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).save_pretrained(folder)
    gpt2_byte_tokenizer(folder)
    (folder / READY).write_text("")
    return folder


def make_smollm2_hf(gguf: Path, folder: Path) -> Path:
    """The bundled GGUF as a Hugging Face folder (float32, via transformers' GGUF loader) for the CTranslate2
    converter."""
    if (folder / READY).is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(folder, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF ("quantized with gguf"); its dequantized weights go
    # into a plain model built from the same config instead.
    config = type(loaded.config).from_dict({k: v for k, v in loaded.config.to_dict().items()
                                            if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    (folder / READY).write_text("")
    return folder


def make_ct2(hf_folder: Path, folder: Path, quantization: str) -> Path:
    """Convert a Hugging Face folder with ``ct2-transformers-converter`` (int8 or float32 weights); the
    tokenizer.json is copied alongside for the worker."""
    if (folder / READY).is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    converter = Path(sys.executable).parent / "ct2-transformers-converter"
    subprocess.run([str(converter), "--model", str(hf_folder), "--output_dir", str(folder),
                    "--quantization", quantization, "--force"], check=True, stdout=subprocess.DEVNULL)
    shutil.copy(hf_folder / "tokenizer.json", folder / "tokenizer.json")
    (folder / READY).write_text("")
    return folder


def checkpoint(what: str) -> Path:
    """Where the cached checkpoint ``what`` lives: "gpt2", "gpt2-<layers>", "ct2-int8" or "ct2-float32"."""
    if what == "gpt2":
        return CACHE / "gpt2-124m"
    if what.startswith("gpt2-"):
        return CACHE / f"gpt2-124m-{int(what.split('-')[1])}layer"
    if what.startswith("ct2-"):
        return CACHE / f"smollm2-{what}"
    raise ValueError(f"unknown checkpoint {what!r}")


def prepare(what: str, gguf: str) -> None:
    """Build the cached checkpoint ``what`` (see ``checkpoint``); run in a child process, so that the memory it
    takes is returned before the measurements start."""
    if what.startswith("gpt2"):
        make_gpt2(checkpoint(what), int(what.split("-")[1]) if "-" in what else 12)
    else:
        hf = make_smollm2_hf(Path(gguf), CACHE / "smollm2-hf")
        make_ct2(hf, checkpoint(what), what.split("-", 1)[1])
