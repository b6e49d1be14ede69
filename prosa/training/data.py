"""Training data: files -> records -> token examples (ids + which tokens are trained) -> packed rows.

Records (``read_records``) come in three kinds, as in TRL / mlx-lm:
- ``{"text"}``: every token trained (from .txt/.md files, one-column .csv files, or .jsonl);
- ``{"prompt", "completion"}``: only the completion (and the end-of-text token) trained, unless ``train_on_prompt``;
- ``{"messages"}``: rendered with the model's chat template (transcript mode for a model without one), only the
  assistant turns (with the template's end-of-turn marker) trained.

Every example ends with the end-of-text token, trained, so that the model learns to stop (for chat records the
template's end-of-turn token does that when it is an end token). An example longer than ``seq_len`` is cut into
windows that overlap by one token, so every trained token is predicted exactly once, always with context.
Pieces are packed into rows of ``seq_len`` tokens (first fit, longest first); a row carries a segment id per
token so that attention never crosses documents and positions restart at each one
(``prosa.training.attention.PackedAttention``): the loss of a packed row is the sum of its documents' losses.
"""
from __future__ import annotations

import bisect
import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import ProsaError

TEXT_SUFFIXES = (".txt", ".md")
DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".csv")
IGNORE = -100            # label of a token that is not trained (torch's cross_entropy ignore_index)


class DataError(ProsaError):
    """Training data that cannot be used: the message names the file (and line) and the fix."""


@dataclass
class Record:
    """One document: exactly one of ``text``, ``prompt``+``completion`` or ``messages``; ``where`` = file:line."""

    where: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class Example:
    """A tokenized record: ``trained[i]`` says token ``i`` is a target (predicted from ``ids[:i]``)."""

    ids: list[int]
    trained: list[bool]


# ------------------------------------------------------------------------------------------------------- reading
def data_files(path: Path) -> list[Path]:
    """The files a DATA argument names: the file itself, or every .txt/.md/.jsonl/.csv under a folder (sorted).

    Raises:
        DataError: missing path, unknown suffix, or a folder with no data files.
    """
    if not path.exists():
        raise DataError(f"training data {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path} holds no {'/'.join(DATA_SUFFIXES)} files; put your texts there")
        return files
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(f"{path}: unknown data format {path.suffix or '(no suffix)'}; use .txt, .md, .jsonl "
                        "(text, prompt/completion or messages records) or a one-column .csv")
    return [path]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if b"\0" in raw[:8192]:
        raise DataError(f"{path} is a binary file, not text; training data must be UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}); convert the file to UTF-8") from None


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for m in value:
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise DataError(f"{where}: each message needs \"role\" (system, user or assistant) and a string "
                            f"\"content\"; got {json.dumps(m)[:80]}")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where}: this conversation has no assistant turn, so nothing would be trained; "
                        "add the assistant's reply or drop the record")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _jsonl_record(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Record(where, messages=_messages(obj["messages"], where))
    if "prompt" in obj or "completion" in obj:
        p, c = obj.get("prompt"), obj.get("completion")
        if not isinstance(p, str) or not isinstance(c, str) or not c:
            raise DataError(f"{where}: \"prompt\" and \"completion\" must both be strings (completion non-empty)")
        return Record(where, prompt=p, completion=c)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: \"text\" must be a string")
        return Record(where, text=obj["text"])
    raise DataError(f"{where}: a record needs \"text\", \"prompt\"+\"completion\" or \"messages\"; "
                    f"got keys {sorted(obj)}")


def read_records(path: str | Path, split_on_blank_lines: bool = False) -> list[Record]:
    """Every record of the training data at ``path`` (a file or a folder).

    Args:
        split_on_blank_lines: a .txt/.md file holds one document per blank-line-separated block (else one).
    Raises:
        DataError: unreadable, empty or malformed data (with file and line).
    """
    records: list[Record] = []
    for file in data_files(Path(path)):
        text = _read_text(file)
        suffix = file.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            if split_on_blank_lines:
                line = 1
                for block in text.replace("\r\n", "\n").split("\n\n"):
                    if block.strip():
                        records.append(Record(f"{file}:{line + len(block) - len(block.lstrip(chr(10)))}",
                                              text=block.strip("\n")))
                    line += block.count("\n") + 2
            elif text.strip():
                records.append(Record(f"{file}:1", text=text))
        elif suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                records.append(_jsonl_record(obj, f"{file}:{n}"))
        else:   # .csv: one column; a first row reading "text" is a header
            for n, row in enumerate(csv.reader(text.splitlines()), 1):
                cells = [c for c in row if c.strip()]
                if len(cells) > 1:
                    raise DataError(f"{file}:{n}: {len(cells)} columns; a training .csv has one column of texts")
                if cells and not (n == 1 and cells[0].strip().lower() == "text"):
                    records.append(Record(f"{file}:{n}", text=cells[0]))
    if not records:
        raise DataError(f"no documents in {path}: the files are empty")
    return records


def data_hash(path: str | Path) -> str:
    """sha256 over the data files' names and contents (recorded in run.json)."""
    h = hashlib.sha256()
    root = Path(path)
    for file in data_files(root):
        h.update(str(file.relative_to(root) if root.is_dir() else file.name).encode() + b"\0")
        h.update(file.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- tokenizing
class Encoder:
    """Turns records into ``Example``s with one tokenizer (and chat template) for the whole run.

    Args:
        tokenizer: a ``prosa.tokenizer.Tokenizer``.
        train_on_prompt: train prompt and user/system tokens too.
    """

    def __init__(self, tokenizer, train_on_prompt: bool = False):
        self.tok, self.train_on_prompt = tokenizer, train_on_prompt
        if tokenizer.eos_token_id is None:
            raise DataError("the model's tokenizer has no end-of-text token; prosa cannot mark where documents end")
        self.eos = tokenizer.eos_token_id

    def __call__(self, record: Record) -> Example:
        if record.text is not None:
            ids = self.tok.encode(record.text) + [self.eos]
            return Example(ids, [False] + [True] * (len(ids) - 1))
        if record.messages is not None:
            return self._chat(record)
        prompt = self.tok.encode(record.prompt)
        completion = self.tok.encode(record.completion, add_special_tokens=False) + [self.eos]
        return self._join([(prompt, self.train_on_prompt), (completion, True)])

    def _join(self, segments: Sequence[tuple[list[int], bool]]) -> Example:
        ids = [i for seg, _ in segments for i in seg]
        trained = [t for seg, t in segments for _ in seg]
        if trained:
            trained[0] = False      # nothing to predict the first token from
        return Example(ids, trained)

    def _chat(self, record: Record) -> Example:
        """Render prefix by prefix: the text an assistant turn adds after the generation prompt is exactly what
        ``prosa chat`` would ask the model to write (reply and end-of-turn marker)."""
        from ..chat import render_transcript
        from ..chat_template import ChatTemplateError, render

        msgs = record.messages
        if self.tok.chat_template:
            special = {n: getattr(self.tok, n, None) for n in ("bos_token", "eos_token", "unk_token", "pad_token")}

            def show(upto: int, gen: bool) -> str:
                try:
                    return render(self.tok.chat_template, msgs[:upto], add_generation_prompt=gen,
                                  special_tokens=special)
                except ChatTemplateError as e:
                    raise DataError(f"{record.where}: {e}") from None
        else:   # a base model: the transcript format prosa chat uses for it
            def show(upto: int, gen: bool) -> str:
                return render_transcript(msgs[:upto], add_generation_prompt=gen)
        texts: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head, whole = show(i, True), show(i + 1, False)
            if not head.startswith(done) or not whole.startswith(head):
                raise DataError(f"{record.where}: the chat template does not render this conversation "
                                "incrementally (a later turn changes earlier text), so assistant turns cannot be "
                                "located; use prompt/completion records instead")
            texts += [(head[len(done):], self.train_on_prompt), (whole[len(head):], True)]
            done = whole
        segments = [(self.tok.encode(t, add_special_tokens=False), trained) for t, trained in texts if t]
        if not self.tok.chat_template:
            segments[0] = (self.tok.encode(texts[0][0]), segments[0][1])     # the model's bos, if it has one
        if not self.tok.eos_token_ids & set(segments[-1][0]):
            segments.append(([self.eos], True))
        return self._join(segments)


def pieces(example: Example, seq_len: int) -> Iterator[Example]:
    """``example`` cut into pieces of at most ``seq_len`` tokens that overlap by one: each trained token is a
    target in exactly one piece, with the previous token in the same piece."""
    ids, trained = example.ids, example.trained
    if len(ids) <= seq_len:
        yield example
        return
    for start in range(0, len(ids) - 1, seq_len - 1):
        t = trained[start:start + seq_len]
        yield Example(ids[start:start + seq_len], [False] + t[1:])


# ------------------------------------------------------------------------------------------------------- packing
@dataclass
class Rows:
    """Packed training rows, (N, T) each: token ids, labels (``IGNORE`` where untrained; label i is the target
    of position i, i.e. token i + 1) and segment ids (-1 for padding)."""

    ids: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def select(self, index: torch.Tensor) -> "Rows":
        return Rows(self.ids[index], self.labels[index], self.segments[index])


def pack(examples: Sequence[Example], seq_len: int, pad_id: int, packing: bool = True) -> Rows:
    """Rows of ``seq_len`` tokens; with ``packing``, several examples per row (first fit, longest first), else
    one per row. Examples must be at most ``seq_len`` long (see ``pieces``)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids)) if packing else range(len(examples))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []     # (free slots, row) sorted, for rows that still have room
    for i in order:
        n = len(examples[i].ids)
        at = bisect.bisect_left(free, (n, -1)) if packing else len(free)
        if at < len(free):
            room, r = free.pop(at)
            rows[r].append(i)
            if room - n:
                bisect.insort(free, (room - n, r))
        else:
            rows.append([i])
            if packing and seq_len - n:
                bisect.insort(free, (seq_len - n, len(rows) - 1))
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    segments = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            ex = examples[i]
            n = len(ex.ids)
            ids[r, at:at + n] = torch.tensor(ex.ids)
            segments[r, at:at + n] = s
            target = torch.tensor(ex.ids[1:])
            keep = torch.tensor(ex.trained[1:], dtype=torch.bool)
            labels[r, at:at + n - 1] = torch.where(keep, target, torch.full_like(target, IGNORE))
            at += n
    return Rows(ids, labels, segments)


@dataclass
class Prepared:
    """What ``prepare`` made of the data: rows to train on, rows to validate on, and counts to print."""

    train: Rows
    val: Rows | None
    documents: int
    tokens: int
    val_documents: int
    split_by: str                   # "documents", "pieces" or "none"
    sample_prompts: list[list[int]]


def _hold_out(items: list[Example], fraction: float, rng: random.Random) -> tuple[list[Example], list[Example]]:
    """(kept, held out): a seeded ``fraction`` of ``items`` held out, both in their original order; nothing held
    out when that would leave either side empty."""
    n = int(round(len(items) * fraction))
    if fraction <= 0 or n < 1 or len(items) - n < 1:
        return list(items), []
    order = list(range(len(items)))
    rng.shuffle(order)
    held = set(order[:n])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def prepare(records: Sequence[Record], encoder: Encoder, seq_len: int, val_split: float, seed: int,
            packing: bool = True) -> Prepared:
    """Tokenize, hold out ``val_split`` of the documents (of the pieces when there are too few documents),
    cut and pack.

    Returns:
        a ``Prepared``; its ``sample_prompts`` are the first tokens of a few held-out documents (or training ones),
        the prompts of the sample generations printed at each evaluation.
    """
    examples = [encoder(r) for r in records]
    tokens = sum(len(e.ids) for e in examples)
    rng = random.Random(seed)
    train_ex, val_ex = _hold_out(examples, val_split, rng)
    if val_ex:
        split_by = "documents"
        train_p = [p for e in train_ex for p in pieces(e, seq_len)]
        val_p = [p for e in val_ex for p in pieces(e, seq_len)]
    else:   # too few documents to hold whole ones out: hold out pieces
        train_p, val_p = _hold_out([p for e in examples for p in pieces(e, seq_len)], val_split, rng)
        split_by = "pieces" if val_p else "none"
    if not any(any(p.trained) for p in train_p):
        raise DataError("no token of the training data is trained (every one is a prompt token); check the "
                        "records or pass --train-on-prompt")
    pad = encoder.tok.pad_token_id if encoder.tok.pad_token_id is not None else encoder.eos
    source = val_ex or val_p or train_p
    prompts = []
    for p in source[:3]:
        prompt_len = next((i for i, t in enumerate(p.trained) if t), len(p.ids))   # the prompt of a chat record
        prompts.append(p.ids[:max(prompt_len, min(8, len(p.ids) - 1), 1)])
    return Prepared(pack(train_p, seq_len, pad, packing), pack(val_p, seq_len, pad, packing) if val_p else None,
                    len(examples), tokens, len(val_ex), split_by, prompts)
