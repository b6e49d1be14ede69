"""``Run``: one fine-tuning run from settings to OUT (``prosa.finetune()`` and ``prosa finetune``).

Order: check settings and OUT, read and tokenize the data (no weights yet), print the plan (``dry_run`` stops
here), load the model, add adapters, train (evaluate, sample, checkpoint), write OUT. A checkpoint is written
every ``save_every`` steps and when Ctrl-C / SIGTERM arrives; ``resume`` continues from the newest one.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import compiled
from .model_prep import adamw, checkpoint_blocks, frozen_in, set_threads, tie_parameters
from .config import Settings, SettingsError
from .data import Encoder, data_hash, prepare, read_records
from .. import heap
from .export import write_json
from .progress import Progress, duration, estimate, run_record
from .trainer import Dist, Signals, Stream, TrainingInterrupted, loss_sum, lr_lambda, native_bf16, sample, \
    trainable_summary


@dataclass
class Result:
    """What a finished run reports."""

    out: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    best_step: int | None
    stopped_early: bool


class Run:
    def __init__(self, settings: Settings):
        self.settings = s = settings
        self.dist = Dist(s.device)
        set_threads(s.threads)
        self.out = Path(s.out)
        self.checkpoints = self.out / "checkpoints"
        self.per_micro = s.check_world(self.dist.world)
        self._check_out()
        from ..loader import open_checkpoint

        self.records = read_records(s.data, s.split_on_blank_lines)
        self.ck = open_checkpoint(s.model, s.revision)
        self.context = int(self.ck.config.get("max_position_embeddings") or self.ck.config.get("n_positions")
                           or self.ck.config.get("n_ctx") or 2048)
        if s.seq_len is None:
            s.seq_len = min(512, self.context)
        if s.seq_len > self.context:
            raise SettingsError(f"--seq-len {s.seq_len} is longer than the model's context ({self.context} tokens)")
        self.tokenizer = self.ck.tokenizer()
        self.data = prepare(self.records, Encoder(self.tokenizer, s.train_on_prompt), s.seq_len, s.val_split,
                            s.seed, s.packing)
        rows = len(self.data.train)
        self.total = s.max_steps or max(1, math.ceil((s.epochs or 3) * rows / s.batch_size))
        self.eval_every = s.eval_every or max(1, self.total // 10)
        self.save_every = s.save_every or max(25, self.total // 10)    # a checkpoint writes the whole model
        self.warmup = s.warmup if s.warmup is not None else max(1, round(0.05 * self.total)) if self.total > 1 else 0
        use_bf16 = s.dtype == "bfloat16" or (s.dtype == "auto" and native_bf16(self.dist.device))
        self.amp_dtype = torch.bfloat16 if use_bf16 else None
        self.compile, self.compile_why = False, "off"        # decided by plan(), from its time estimate

    def say(self, message: str) -> None:
        if self.dist.main:
            print(message, flush=True)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    # ----------------------------------------------------------------------------------------------- checks
    def _check_out(self) -> None:
        s, out = self.settings, self.out
        if out.exists() and not out.is_dir():
            raise SettingsError(f"-o {out} is a file; pass a folder for the fine-tuned model")
        busy = out.is_dir() and any(out.iterdir())
        if busy and not (s.resume or s.overwrite):
            raise SettingsError(f"{out} already exists; pass --resume to continue its run or --overwrite to start "
                                "over (its contents are replaced)")
        if s.resume and not ckpt.steps(self.checkpoints):
            self.say(f"prosa: --resume: no checkpoint in {self.checkpoints}; starting from step 0")
        if s.resume and (last := ckpt.steps(self.checkpoints)):
            saved = ckpt.read_meta(last[-1][1]).get("settings", {})
            changed = [k for k in ckpt.FIXED if k in saved and saved[k] != getattr(s, k) and k != "seq_len"]
            if changed:
                raise SettingsError(f"--resume: {', '.join(changed)} differ from the run being resumed "
                                    f"({', '.join(f'{k}={saved[k]!r}' for k in changed)}); use the same settings, "
                                    "or --overwrite to start over")

    # ------------------------------------------------------------------------------------------------- plan
    def plan(self) -> None:
        """Print the data, the split and an estimate of time and memory."""
        s, d = self.settings, self.data
        shapes = self.ck.tensor_shapes() or {}
        cfg = self.ck.config
        layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 12
        hidden = cfg.get("hidden_size") or cfg.get("n_embd") or 768
        seconds, mb = estimate(s, shapes, self.total, layers, hidden, cfg.get("vocab_size", 50000), self.amp_dtype)
        split = {"documents": f"{d.documents - d.val_documents} training / {d.val_documents} held-out documents",
                 "pieces": f"{d.documents} document(s), held out {len(d.val or [])} of their {s.seq_len}-token pieces",
                 "none": "no held-out split (too little data or --val-split 0): no validation loss"}[d.split_by]
        self.say(f"data: {d.documents} documents, {d.tokens:,} tokens; {split}")
        self.say(f"rows: {len(d.train)} training rows of {s.seq_len} tokens ({d.train.trained_tokens:,} trained "
                 f"tokens){f', {len(d.val)} validation rows' if d.val is not None else ''}")
        self.say(f"plan: {s.method} on {self.ck.source}, {self.total} steps of {s.batch_size} rows "
                 f"(~{self.total * s.batch_size / max(1, len(d.train)):.1f} epochs), lr {s.peak_lr:g}, "
                 f"{self.dist.world} process(es), {'bfloat16 autocast' if self.amp_dtype else 'float32'} on "
                 f"{self.dist.device.type}")
        self.say(f"estimate: ~{duration(seconds)} and ~{mb:,.0f} MB of memory (rough: from the model's shapes)")
        self.compile, self.compile_why = compiled.decide(s.compile, self.dist.device, s.method, seconds)
        self.say(f"compile: {self.compile_why}")

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Load the model, add adapters, build the optimizer; restore a checkpoint when resuming."""
        from .. import loader
        from .lora import add_lora, output_layer

        s = self.settings
        torch.manual_seed(s.seed)
        quantize = s.quantize if s.method == "qlora" else "none"
        lm = loader.load(self.ck.source if s.model is None else s.model, dtype="float32", quantize=quantize,
                         revision=s.revision, device=str(self.dist.device))
        self.model = model = lm.model
        tie_parameters(model)
        if s.method == "full":
            model.requires_grad_(True)
        else:
            add_lora(model, s.lora_rank, s.alpha, s.lora_dropout, s.seed)
        self.loss_head = None
        if s.method == "lora" and self.amp_dtype is not None:
            self.loss_head = frozen_in(model, self.amp_dtype, output_layer(model))
            heap.trim()        # the float32 copies just dropped
        self.compiler = compiled.Compiler(model, self.compile)
        if s.grad_checkpoint:
            checkpoint_blocks(model)        # outside the compiled forward: its recomputation runs compiled too
        self.head_name = output_layer(model)
        model.train()
        params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
        self.optimizer = adamw(params, s.peak_lr, s.weight_decay, self.dist.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.warmup, self.total))
        self.ddp = model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[self.dist.device] if self.dist.device.type == "cuda"
                                               else None)
        trained, total = trainable_summary(model)
        self.say(f"model: {total:,} parameters, {trained:,} trained ({100 * trained / total:.2f}%)")
        self.start, self.best, self.best_step, self.bad_evals = 0, math.inf, None, 0
        self.elapsed = 0.0          # seconds spent in optimizer steps, over resumptions
        if s.resume and (last := ckpt.steps(self.checkpoints)):
            step, folder = last[-1]
            ckpt.load_trainable(folder, model)
            ckpt.load_state(folder, self)
            meta = ckpt.read_meta(folder)
            self.start, self.best_step, self.bad_evals = step, meta.get("best_step"), meta.get("bad_evals", 0)
            self.elapsed = meta.get("elapsed_s", 0.0)
            self.best = meta.get("best_val", math.inf) if meta.get("best_val") is not None else math.inf
            self.say(f"resumed from {folder} (step {step})")
        elif self.dist.main and s.overwrite and self.out.exists():
            for child in self.out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.dist.barrier()

    # ------------------------------------------------------------------------------------------------- loop
    def train(self) -> Result:
        s, dist = self.settings, self.dist
        stream = Stream(self.data.train, s.batch_size, s.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        progress = Progress(self.out, self.total, self.start, dist.main, s.progress)
        self.progress = progress
        signals = Signals()
        train_loss, stopped_early, step = None, False, self.start
        try:
            with heap.keep_freed():     # CPU: the step's big tensors reuse their pages
                if self.start == 0 and self.data.val is not None:
                    self.evaluate(0)            # the starting point of the validation curve
                for step in range(self.start + 1, self.total + 1):
                    start = time.perf_counter()
                    train_loss, tokens, trained = self.optimizer_step(stream, step - 1)
                    took = time.perf_counter() - start
                    self.elapsed += took
                    progress.step(step=step, loss=train_loss, lr=self.scheduler.get_last_lr()[0], tokens=tokens,
                                  trained_tokens=trained, step_s=round(took, 4), tok_s=tokens / took,
                                  elapsed_s=round(self.elapsed, 3), epoch=round(stream.epoch(step), 4))
                    if self.data.val is not None and (step % self.eval_every == 0 or step == self.total):
                        stopped_early = self.evaluate(step)
                    caught = int(dist.sum(float(signals.caught or 0))[0]) if dist.world > 1 else signals.caught
                    if step % self.save_every == 0 or caught or stopped_early:
                        self.save(step)
                    if caught:
                        raise TrainingInterrupted(f"stopped at step {step}/{self.total}; checkpoint saved in "
                                                  f"{self.checkpoints / f'step-{step}'}; continue with --resume",
                                                  int(caught))
                    if stopped_early:
                        progress.say(f"early stop: validation loss has not improved for {s.patience} evaluations; "
                                     f"keeping step {self.best_step}")
                        break
        finally:
            signals.restore()
            progress.close()
        return self.finish(step, train_loss, stopped_early)

    def optimizer_step(self, stream: Stream, step: int) -> tuple[float, int, int]:
        """One optimizer step; returns (loss over the step's trained tokens, tokens processed, trained tokens).

        The first compiled step compiles; if that fails, the failure is said once and the step runs eagerly."""
        if self.compiler.verified:
            return self._step(stream, step)
        self.progress.say("compiling the training step (torch.compile, once; --compile off skips it)")
        try:
            out = self._step(stream, step)
        except (KeyboardInterrupt, TrainingInterrupted, torch.OutOfMemoryError):
            raise
        except Exception as e:       # Dynamo / Inductor / the C++ compiler: any of them may fail on some setup
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            self.progress.say(f"prosa: torch.compile failed ({type(e).__name__}: {reason}); training continues "
                              "without it (about 1.5x slower)")
            self.compiler.disable()
            self.optimizer.zero_grad(set_to_none=True)
            out = self._step(stream, step)
        self.compiler.verified = True
        return out

    def _step(self, stream: Stream, step: int) -> tuple[float, int, int]:
        s, dist = self.settings, self.dist
        rows = self.data.train.select(stream.indices(step))
        micro = [rows.select(torch.arange(o, o + self.per_micro))
                 for k in range(s.grad_accum) for o in [(k * dist.world + dist.rank) * self.per_micro]]
        local = sum(r.trained_tokens for r in micro)
        tokens = sum(int((r.segments >= 0).sum()) for r in micro)
        count, tokens = dist.sum(local, tokens)
        total_loss = 0.0
        for k, batch in enumerate(micro):
            sync = k == len(micro) - 1 or dist.world == 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                summed, _ = loss_sum(self.ddp, self.model, self.head_name, batch, self.autocast, self.loss_head,
                                     self.compiler.loss, explicit_attention=self.compiler.enabled)
                # DDP averages gradients over processes: scale so that the result is sum / (all trained tokens)
                (summed * (dist.world / max(count, 1))).backward()
            total_loss += float(summed.detach())
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], s.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return dist.sum(total_loss)[0] / max(count, 1), int(tokens), int(count)

    @torch.no_grad()
    def evaluate(self, step: int) -> bool:
        """Validation loss (and samples, on rank 0); returns True when early stopping should end the run."""
        s, dist, val = self.settings, self.dist, self.data.val
        self.model.eval()
        mine = torch.arange(dist.rank, len(val), dist.world)
        total, count = 0.0, 0
        for i in range(0, len(mine), self.per_micro):
            summed, n = loss_sum(self.model, self.model, self.head_name, val.select(mine[i:i + self.per_micro]),
                                 self.autocast, self.loss_head)
            total, count = total + float(summed), count + n
        total, count = dist.sum(total, count)
        val_loss = total / max(count, 1)
        texts = []
        if dist.main and s.samples:
            for i, prompt in enumerate(self.data.sample_prompts[:s.samples]):
                cont = sample(self.model, self.head_name, self.tokenizer, prompt, s.sample_tokens, s.seed + i,
                              self.autocast, self.loss_head)
                texts.append(self.tokenizer.decode(prompt, skip_special_tokens=True) + cont)
        self.model.train()
        self.progress.evaluation(step, val_loss, texts)
        if step == 0:
            pass            # the base model: a reference point, not a candidate
        elif val_loss < self.best:
            self.best, self.best_step, self.bad_evals = val_loss, step, 0
            if dist.main:
                ckpt.save(self.checkpoints / "best", self, self.meta(step), with_state=False)
                heap.trim()
        else:
            self.bad_evals += 1
        dist.barrier()
        return bool(s.patience) and self.bad_evals >= s.patience

    def meta(self, step: int) -> dict[str, Any]:
        return {"step": step, "best_val": None if math.isinf(self.best) else self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "settings": self.settings.as_dict(), "total_steps": self.total,
                "elapsed_s": self.elapsed}

    def save(self, step: int) -> None:
        if self.dist.main:
            ckpt.save(self.checkpoints / f"step-{step}", self, self.meta(step))
            ckpt.prune(self.checkpoints, self.settings.keep_checkpoints)
            heap.trim()        # the merged copy just written: give its memory back
        self.dist.barrier()

    # ------------------------------------------------------------------------------------------------ finish
    def finish(self, step: int, train_loss: float | None, stopped_early: bool) -> Result:
        """Write OUT: the merged folder (the best weights when early stopping ended the run), adapter/, the
        loss plot and run.json."""
        if stopped_early and self.best_step is not None and self.best_step != step:
            ckpt.load_trainable(self.checkpoints / "best", self.model)
        if self.dist.main:
            ckpt.write_model(self.out, self)
            self.progress.plot()
            write_json(self.out / "run.json", run_record(self.settings, data_hash(self.settings.data), {
                "model": self.ck.source, "steps": step, "total_steps": self.total, "processes": self.dist.world,
                "device": str(self.dist.device), "compiled": self.compiler.enabled, "autocast": str(self.amp_dtype).replace("torch.", "")
                if self.amp_dtype else "float32", "train_loss": train_loss,
                "best_val_loss": None if math.isinf(self.best) else self.best, "best_step": self.best_step,
                "stopped_early": stopped_early, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            self.say(f"done: {self.out} (merged model{', adapter/' if self.settings.method != 'full' else ''}, "
                     "log.jsonl, loss.png, run.json)")
        self.dist.barrier()
        return Result(self.out, step, train_loss, None if math.isinf(self.best) else self.best, self.best_step,
                      stopped_early)


def finetune(data: str | Path, out: str | Path, model: str | None = None, *, config: str | Path | None = None,
             **settings: Any) -> Result:
    """Fine-tune a model on your texts; see ``prosa.training.config.Settings`` for every setting.

    Args:
        data: a .txt/.md/.jsonl/.csv file or a folder of them.
        out: the output folder (a merged Hugging Face model, ``adapter/`` for LoRA, log.jsonl, loss.png, run.json).
        model: the base model (None = the default model).
        config: a YAML file of settings (the arguments given here win).
    Returns:
        a ``Result`` (None when ``dry_run``).
    Raises:
        ProsaError: bad settings or data (before any training); TrainingInterrupted after Ctrl-C / SIGTERM.
    """
    s = Settings.from_sources(config, data=str(data), out=str(out), model=model, **settings)
    run = Run(s)
    run.plan()
    if s.dry_run:
        return None
    run.setup()
    return run.train()

