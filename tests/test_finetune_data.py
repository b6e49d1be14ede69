"""prosa.training.data: reading records, what is trained (masks), cutting and packing, and the errors bad data gets."""
from __future__ import annotations

import json

import pytest
import torch

from prosa.training.attention import PackedAttention
from prosa.training.data import IGNORE, DataError, Encoder, Example, pack, pieces, prepare, read_records

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from prosa.loader import open_checkpoint

    return open_checkpoint(tiny_checkpoint("llama")).tokenizer()


def trained_text(tok, ex: Example) -> str:
    return tok.decode([i for i, t in zip(ex.ids, ex.trained) if t])


def test_text_files_every_token_trained_and_eos_last(tmp_path, tok):
    (tmp_path / "a.txt").write_text("Once upon a time there was a dog.")
    (tmp_path / "b.md").write_text("Second.\n\nThird part.")
    (tmp_path / "skip.bin").write_bytes(b"\0\1")
    records = read_records(tmp_path)
    assert [r.where.rsplit("/", 1)[-1] for r in records] == ["a.txt:1", "b.md:1"]
    ex = Encoder(tok)(records[0])
    assert ex.ids[-1] == tok.eos_token_id and ex.trained == [False] + [True] * (len(ex.ids) - 1)
    split = read_records(tmp_path / "b.md", split_on_blank_lines=True)
    assert [r.text for r in split] == ["Second.", "Third part."]
    assert split[1].where.endswith("b.md:3")


def test_prompt_completion_trains_exactly_the_completion(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "Q: dog?\nA:", "completion": " A dog ran."}) + "\n")
    ex = Encoder(tok)(read_records(f)[0])
    n_prompt = len(tok.encode("Q: dog?\nA:"))
    assert ex.trained == [False] * n_prompt + [True] * (len(ex.ids) - n_prompt)
    assert trained_text(tok, ex) == " A dog ran." + "<|endoftext|>"
    all_tokens = Encoder(tok, train_on_prompt=True)(read_records(f)[0])
    assert all_tokens.trained == [False] + [True] * (len(ex.ids) - 1)


def test_chat_trains_assistant_turns_with_their_end_marker(tmp_path, tok):
    f = tmp_path / "chat.jsonl"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "dog?"},
            {"role": "assistant", "content": "A dog."}]
    f.write_text(json.dumps({"messages": msgs}) + "\n")
    record = read_records(f)[0]
    tok.chat_template = CHATML
    try:
        ex = Encoder(tok)(record)
    finally:
        tok.chat_template = None
    # the end-of-turn marker is trained (the model learns to stop); the prompt headers are not
    assert trained_text(tok, ex) == "Hello!<|im_end|>\nA dog.<|im_end|>\n<|endoftext|>"
    assert tok.decode(ex.ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    # a base model without a template: prosa chat's transcript format
    ex = Encoder(tok)(record)
    assert trained_text(tok, ex) == " Hello!\n A dog.\n<|endoftext|>"
    assert "You: dog?\nHe:" in tok.decode(ex.ids)


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "broken"\n', "bad.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1: this conversation has no assistant turn"),
    ('{"prompt": "a"}\n', "bad.jsonl:1: \"prompt\" and \"completion\" must both be strings"),
    ('{"title": "a"}\n', "bad.jsonl:1: a record needs \"text\""),
    ('[1, 2]\n', "bad.jsonl:1: expected a JSON object"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "bad.jsonl:1: each message needs \"role\""),
    ('\n\n', "no documents in"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        read_records(f)


def test_unusable_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        read_records(tmp_path / "empty")
    (tmp_path / "x.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="unknown data format"):
        read_records(tmp_path / "x.bin")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\0\0\0")
    with pytest.raises(DataError, match="binary file"):
        read_records(tmp_path / "bin.txt")
    (tmp_path / "latin.txt").write_bytes("ok\ncaf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt:2: not UTF-8"):
        read_records(tmp_path / "latin.txt")
    (tmp_path / "two.csv").write_text("text\nhello\na,b\n")
    with pytest.raises(DataError, match=r"two.csv:3: 2 columns"):
        read_records(tmp_path / "two.csv")
    (tmp_path / "one.csv").write_text("text\n\"first, with comma\"\nsecond\n")
    assert [r.text for r in read_records(tmp_path / "one.csv")] == ["first, with comma", "second"]


def test_pieces_train_every_token_once_with_context():
    ex = Example(list(range(100)), [False] + [True] * 99)
    cut = list(pieces(ex, 16))
    assert all(len(p.ids) <= 16 and not p.trained[0] for p in cut)
    targets = [tok for p in cut for tok, t in zip(p.ids, p.trained) if t]
    assert targets == list(range(1, 100))


def test_packing_keeps_documents_apart():
    a = Example([1, 2, 3, 4, 5], [False, True, True, True, True])
    b = Example([6, 7, 8], [False, False, True])
    c = Example([9, 10], [False, True])
    rows = pack([a, b, c], 8, pad_id=0)
    assert len(rows) == 2     # 5 + 3 in one row, 2 in another (first fit, longest first)
    assert rows.ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert rows.segments[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    # label i = token i+1 when trained and in the same document; never across the boundary
    assert rows.labels[0].tolist() == [2, 3, 4, 5, IGNORE, IGNORE, 8, IGNORE]
    assert rows.segments[1].tolist() == [0, 0, -1, -1, -1, -1, -1, -1]
    positions = PackedAttention(rows.segments).begin(rows.ids)
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    mask = PackedAttention(rows.segments).mask(None, torch.device("cpu"))[0, 0]
    assert not mask[5, :5].any() and mask[7, 5:8].all() and not mask[1, 2]
    unpacked = pack([a, b, c], 8, pad_id=0, packing=False)
    assert len(unpacked) == 3 and unpacked.trained_tokens == rows.trained_tokens == 6


def test_split_holds_out_documents_and_is_seeded(tmp_path, tok):
    for i in range(20):
        (tmp_path / f"{i:02}.txt").write_text(f"Story number {i}. The dog ran.")
    records = read_records(tmp_path)
    a = prepare(records, Encoder(tok), 32, 0.1, seed=1)
    b = prepare(records, Encoder(tok), 32, 0.1, seed=1)
    c = prepare(records, Encoder(tok), 32, 0.1, seed=2)
    assert a.split_by == "documents" and a.val_documents == 2
    assert torch.equal(a.val.ids, b.val.ids) and not torch.equal(a.val.ids, c.val.ids)
    one = prepare(records[:1], Encoder(tok), 8, 0.2, seed=0)     # one document: held-out pieces instead
    assert one.split_by == "pieces" and one.val.trained_tokens > 0 and one.train.trained_tokens > 0
    assert one.train.trained_tokens + one.val.trained_tokens == one.tokens - 1    # each once; the first is context
    none = prepare(records[:1], Encoder(tok), 64, 0.1, seed=0)
    assert none.split_by == "none" and none.val is None
