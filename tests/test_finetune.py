"""prosa finetune on tiny models of every architecture: training works (loss falls), the loss is what it claims
(packing, accumulation), runs resume exactly, and what OUT holds loads with the same logits in prosa, transformers
and PEFT."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import prosa
from prosa.training.data import Encoder, pack, pieces, prepare, read_records
from prosa.training.trainer import loss_sum

ARCHS = ["gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "qwen2", "mistral"]
QUICK = dict(val_split=0.0, samples=0, progress=False, dtype="float32", batch_size=4, seq_len=64, threads=1)
PROBE = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 61, 2]])


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    """A folder of 16 short documents written for the test."""
    import tiny

    folder = tmp_path_factory.mktemp("stories")
    for i in range(16):
        (folder / f"story{i:02}.txt").write_text(tiny.CORPUS[i % 6] + f" The end of story {i}.")
    return folder


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, worst


def prosa_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prosa", *args], capture_output=True, text=True, timeout=300, **kw)


# ------------------------------------------------------------------------------------------- every architecture
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_and_exports_merged_folder_and_peft_adapter(arch, tiny_checkpoint, stories, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_checkpoint(arch)
    out = tmp_path / "out"
    result = prosa.finetune(stories, out, str(base), max_steps=12, lr=3e-3, **QUICK)
    curve = losses(out)
    assert result.steps == 12 and len(curve) == 12
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve       # it learns
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "log.jsonl",
            "loss.png", "run.json"} <= {p.name for p in out.iterdir()}
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["method"] == "lora" and len(run["data_sha256"]) == 64

    ours = prosa.load(out, quantize="none", dtype="float32").model(PROBE)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(PROBE).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    before = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert (before(PROBE).logits - theirs).abs().max() > 1e-3                  # the adapters changed something
    peft = PeftModel.from_pretrained(before, out / "adapter").eval()
    torch.testing.assert_close(peft(PROBE).logits, theirs, atol=1e-4, rtol=0)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["peft_type"] == "LORA"
    adapted = prosa.load(base, quantize="none", dtype="float32", adapter=out / "adapter").model(PROBE)
    torch.testing.assert_close(adapted, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_full_finetuning_trains_and_loads_in_transformers(arch, tiny_checkpoint, stories, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    prosa.finetune(stories, out, str(tiny_checkpoint(arch)), method="full", max_steps=10, lr=2e-3, **QUICK)
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve
    assert not (out / "adapter").exists()
    ours = prosa.load(out, quantize="none", dtype="float32").model(PROBE)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(PROBE).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_lora_in_bfloat16_autocast(tiny_checkpoint, stories, tmp_path):
    """bf16 autocast keeps the frozen base in bf16; the export is still the float base plus the changes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_checkpoint("gpt_neox")
    out = tmp_path / "out"
    prosa.finetune(stories, out, str(base), max_steps=12, lr=3e-3, **{**QUICK, "dtype": "bfloat16"})
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve
    assert json.loads((out / "run.json").read_text())["autocast"] == "bfloat16"
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(),
                                     out / "adapter").eval()
    merged = prosa.load(out, quantize="none", dtype="float32").model(PROBE)
    torch.testing.assert_close(peft(PROBE).logits, merged, atol=1e-4, rtol=0)


def test_tied_embeddings_are_one_parameter_in_full_finetuning(tiny_checkpoint, stories, tmp_path):
    out = tmp_path / "out"
    prosa.finetune(stories, out, str(tiny_checkpoint("llama_linear")), method="full", max_steps=3, **QUICK)
    saved = weights(out)
    assert "lm_head.weight" not in saved      # tied: written once, as the embedding
    lm = prosa.load(out, quantize="none", dtype="float32")
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_qlora_trains_on_a_quantized_base(bits, tiny_checkpoint, stories, tmp_path):
    from prosa.quant import QuantizedLinear
    from prosa.training.lora import LoRALinear, add_lora

    out = tmp_path / "out"
    prosa.finetune(stories, out, str(tiny_checkpoint("llama")), method="qlora", quantize=bits, max_steps=12,
                   lr=3e-3, **QUICK)
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve
    # OUT is the float base plus the adapters' changes, as PEFT applies them
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = prosa.load(out, quantize="none", dtype="float32").model(PROBE)
    torch.testing.assert_close(peft(PROBE).logits, merged, atol=1e-4, rtol=0)
    # the gradient through a quantized layer is the one through its dequantized weight
    lm = prosa.load(tiny_checkpoint("llama"), quantize=bits)
    add_lora(lm.model, 4, 8.0)
    layer = lm.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, QuantizedLinear)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref = x2 @ layer.base.dequantize().t() + (x2 @ layer.lora_A.t() @ layer.lora_B.t()) * layer.scale
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("arch", ["gpt_neo", "mistral", "llama"])   # local windows, sliding window, rope
def test_packed_loss_equals_documents_alone(arch, tiny_checkpoint, stories):
    lm = prosa.load(tiny_checkpoint(arch), quantize="none", dtype="float32")
    examples = [p for r in read_records(stories)[:6] for p in pieces(Encoder(lm.tokenizer)(r), 40)]
    packed = pack(examples, 120, pad_id=0)
    alone = pack(examples, 120, pad_id=0, packing=False)
    assert len(packed) < len(alone)
    head = "lm_head" if hasattr(lm.model, "lm_head") else "embed_out"
    with torch.no_grad():
        a, n_a = loss_sum(lm.model, lm.model, head, packed, contextlib.nullcontext)
        b, n_b = loss_sum(lm.model, lm.model, head, alone, contextlib.nullcontext)
    assert n_a == n_b
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-5)
    # and a row alone equals the model's plain forward on the document
    ex = examples[0]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ex.ids]))[0, :-1]
        direct = torch.nn.functional.cross_entropy(logits, torch.tensor(ex.ids[1:]), reduction="none")
    expected = direct[torch.tensor(ex.trained[1:])].sum()
    with torch.no_grad():
        one, _ = loss_sum(lm.model, lm.model, head, pack([ex], 120, pad_id=0), contextlib.nullcontext)
    torch.testing.assert_close(one, expected, atol=1e-4, rtol=1e-5)


def test_gradient_accumulation_equals_the_large_batch(tiny_checkpoint, stories, tmp_path):
    base = str(tiny_checkpoint("llama"))
    settings = {**QUICK, "batch_size": 8, "max_steps": 4, "lr": 1e-3}
    prosa.finetune(stories, tmp_path / "big", base, **settings)
    prosa.finetune(stories, tmp_path / "accum", base, grad_accum=4, **settings)
    assert_same_weights(tmp_path / "big", tmp_path / "accum", 1e-5)
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "accum"), abs=1e-5)


def test_activation_checkpointing_changes_nothing(tiny_checkpoint, stories, tmp_path):
    base = str(tiny_checkpoint("gpt_neo"))
    settings = {**QUICK, "max_steps": 3, "lr": 1e-3, "method": "full"}
    prosa.finetune(stories, tmp_path / "plain", base, **settings)
    prosa.finetune(stories, tmp_path / "ckpt", base, grad_checkpoint=True, **settings)
    assert_same_weights(tmp_path / "plain", tmp_path / "ckpt", 1e-6)


def test_early_stopping_keeps_the_best_weights(tiny_checkpoint, stories, tmp_path):
    out = tmp_path / "out"
    # a learning rate far too high: validation loss gets worse after the first steps
    result = prosa.finetune(stories, out, str(tiny_checkpoint("llama")), **{**QUICK, "val_split": 0.25},
                            method="full", lr=0.5, warmup=0, max_steps=30, eval_every=1, patience=2)
    assert result.stopped_early and result.steps < 30
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
    assert 0 in vals and result.best_step == min((s for s in vals if s), key=vals.get)
    assert_same_weights(out, out / "checkpoints" / "best", 0)
    assert json.loads((out / "run.json").read_text())["stopped_early"] is True


# ------------------------------------------------------------------------------------------- resume, processes
def test_killed_run_resumes_to_the_same_weights(tiny_checkpoint, stories, tmp_path):
    base = str(tiny_checkpoint("gpt2"))
    args = ["finetune", str(stories), "-m", base, "--max-steps", "40", "--save-every", "3", "--batch-size", "4",
            "--seq-len", "64", "--val-split", "0.2", "--eval-every", "5", "--samples", "1", "--dtype", "float32",
            "--threads", "1", "--lr", "1e-3", "--no-progress", "--lora-dropout", "0.1"]
    full = prosa_cli(*args, "-o", str(tmp_path / "whole"))
    assert full.returncode == 0, full.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "prosa", *args, "-o", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-9" / "meta.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    resumed = prosa_cli(*args, "-o", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_same_weights(tmp_path / "whole", killed, 1e-5)
    steps = [r["step"] for r in map(json.loads, (killed / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 41))


def test_sigterm_saves_a_checkpoint_and_exits(tiny_checkpoint, stories, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "prosa", "finetune", str(stories), "-m",
                             str(tiny_checkpoint("llama")), "-o", str(out), "--max-steps", "100000",
                             "--save-every", "100000", "--val-split", "0", "--no-progress", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text().count("\n") >= 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "continue with --resume" in err and "Traceback" not in err
    saved = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert len(saved) == 1 and (out / "checkpoints" / saved[0] / "state.pt").is_file()


def test_two_processes_give_the_weights_of_one(tiny_checkpoint, stories, tmp_path):
    base = str(tiny_checkpoint("llama"))
    common = [str(stories), "-m", base, "--max-steps", "4", "--batch-size", "8", "--seq-len", "64",
              "--val-split", "0.2", "--eval-every", "2", "--samples", "0", "--dtype", "float32", "--no-progress",
              "--lr", "1e-3"]
    one = prosa_cli("finetune", *common, "-o", str(tmp_path / "one"), "--threads", "1")
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "prosa", "finetune", *common, "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_weights(tmp_path / "one", tmp_path / "two", 1e-4)
    log_one, log_two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert log_one == pytest.approx(log_two, abs=1e-4)


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_refuses_bad_settings_before_loading(tiny_checkpoint, stories, tmp_path):
    base = str(tiny_checkpoint("gpt2"))
    cases = [
        (["--val-split", "0.9"], "--val-split must be"),
        (["--max-steps", "3", "--epochs", "1"], "not both"),
        (["--batch-size", "6", "--grad-accum", "4"], "not a multiple"),
        (["--seq-len", "4096"], "longer than the model's context"),
        (["--lr", "-1"], "--lr must be"),
        (["--resume", "--overwrite"], "pass one of them"),
    ]
    for extra, message in cases:
        r = prosa_cli("finetune", str(stories), "-m", base, "-o", str(tmp_path / "o"), *extra)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "x").write_text("keep me")
    r = prosa_cli("finetune", str(stories), "-m", base, "-o", str(tmp_path / "exists"))
    assert r.returncode == 1 and "--overwrite" in r.stderr and (tmp_path / "exists" / "x").read_text() == "keep me"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    r = prosa_cli("finetune", str(bad), "-m", base, "-o", str(tmp_path / "o2"))
    assert r.returncode == 1 and "bad.jsonl:2:" in r.stderr and "assistant" in r.stderr
    assert not (tmp_path / "o2").exists()


def test_dry_run_and_yaml_config(tiny_checkpoint, stories, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_checkpoint('gpt2')}\nlora-rank: 4\nmax_steps: 2\nbatch-size: 2\nseq-len: 32\n")
    r = prosa_cli("finetune", str(stories), "-o", str(tmp_path / "o"), "--config", str(cfg), "--dry-run",
                  "--max-steps", "5")
    assert r.returncode == 0, r.stderr
    assert "16 documents" in r.stdout and "5 steps of 2 rows" in r.stdout and "estimate:" in r.stdout
    assert not (tmp_path / "o").exists()
    cfg.write_text("lora_rank: [1]\n")
    r = prosa_cli("finetune", str(stories), "-o", str(tmp_path / "o"), "--config", str(cfg))
    assert r.returncode != 0 and "--lora-rank must be" in r.stderr
    cfg.write_text("learning_rate: 1\n")
    r = prosa_cli("finetune", str(stories), "-o", str(tmp_path / "o"), "--config", str(cfg))
    assert r.returncode != 0 and "unknown setting(s): learning_rate" in r.stderr


def test_generate_with_adapter_flag(tiny_checkpoint, stories, tmp_path):
    base = tiny_checkpoint("llama")
    out = tmp_path / "out"
    prosa.finetune(stories, out, str(base), max_steps=6, lr=5e-3, **QUICK)
    merged = prosa_cli("generate", "A story", "-m", str(out), "--max-new-tokens", "12", "--temperature", "0")
    adapted = prosa_cli("generate", "A story", "-m", str(base), "--adapter", str(out / "adapter"),
                        "--max-new-tokens", "12", "--temperature", "0", "-q", "none")
    assert merged.returncode == 0 and adapted.returncode == 0, adapted.stderr
    assert merged.stdout == adapted.stdout
    # the training changed the greedy text: an --adapter that were ignored would not match the merged model
    plain = prosa_cli("generate", "A story", "-m", str(base), "--max-new-tokens", "12", "--temperature", "0",
                      "-q", "none")
    assert plain.returncode == 0 and plain.stdout != merged.stdout, plain.stderr
    r = prosa_cli("generate", "A story", "-m", str(base), "--adapter", str(tmp_path))
    assert r.returncode != 0 and "adapter_config.json" in r.stderr and "Traceback" not in r.stderr


def test_data_preparation_counts_trained_tokens(tiny_checkpoint, stories):
    lm_tok = prosa.loader.open_checkpoint(tiny_checkpoint("gpt2")).tokenizer()
    prepared = prepare(read_records(stories), Encoder(lm_tok), 64, 0.25, seed=0)
    assert prepared.val_documents == 4 and prepared.split_by == "documents"
    assert prepared.train.trained_tokens + prepared.val.trained_tokens == prepared.tokens - 16   # first tokens


def test_readme_example_on_the_bundled_model(bundled_gguf, tmp_path):
    """The README's example, shorter: the bundled GGUF learns the tales' style (held-out perplexity falls, the
    greedy continuation takes the style), and OUT (made from a GGUF) loads in prosa and transformers alike."""
    from transformers import AutoModelForCausalLM

    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "examples" / "make_tales.py"),
                    str(tmp_path / "tales")], check=True, capture_output=True)
    out = tmp_path / "tales-model"
    r = prosa_cli("finetune", str(tmp_path / "tales"), "-o", str(out), "--max-steps", "8", "--batch-size", "4",
                  "--seq-len", "128", "--lr", "1e-3", "--eval-every", "8", "--no-progress", "--samples", "1")
    assert r.returncode == 0, r.stderr
    vals = [x["val_loss"] for x in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "val_loss" in x]
    assert len(vals) == 2 and vals[1] < vals[0] - 0.5, vals       # step 0 and step 8
    assert "sample 1: 'In the days of old," in r.stderr
    text = prosa_cli("generate", "In the days of old,", "-m", str(out), "--max-new-tokens", "24",
                     "--temperature", "0").stdout
    assert "there lived" in text or "came down upon" in text, text
    ids = torch.tensor([[1, 504, 2767, 282, 1126, 28, 281]])
    ours = prosa.load(out, quantize="none", dtype="float32").model(ids)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_adapter_on_an_int4_gguf_loads_in_int8(tiny_checkpoint, stories, tmp_path):
    """int4 re-rounding would snap a LoRA change back to the base's grid: auto picks int8 with an adapter."""
    from prosa.weights.gguf_export import export_gguf

    base = tiny_checkpoint("qwen2")     # (the tiny llama's rope scaling has no GGUF spelling)
    out = tmp_path / "out"
    prosa.finetune(stories, out, str(base), max_steps=6, lr=5e-3, **QUICK)
    gguf = tmp_path / "base.gguf"
    export_gguf(str(base), gguf, "q4_1")
    assert prosa.load(gguf).quantize == "int4"
    adapted = prosa.load(gguf, adapter=out / "adapter")
    assert adapted.quantize == "int8" and "adapter" in adapted.weights
    exact = prosa.load(gguf, quantize="none", adapter=out / "adapter").model(PROBE)
    int4 = prosa.load(gguf, quantize="int4", adapter=out / "adapter").model(PROBE)
    err8, err4 = ((x - exact).abs().mean().item() for x in (adapted.model(PROBE), int4))
    assert err8 < 0.5 * err4, (err8, err4)
    r = prosa_cli("generate", "A story", "-m", str(gguf), "--adapter", str(out / "adapter"), "-q", "int4",
                  "--max-new-tokens", "2")
    assert r.returncode == 0 and "erases most of a LoRA change" in r.stderr
