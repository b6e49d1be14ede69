"""Memory comes back down: the engine's KV pool shrinks once a long sequence has ended and only short ones follow,
``Chat.reset`` releases the conversation's cached keys/values, and undoing aten's int4 packing keeps nothing. The
pool tests count blocks and bytes (deterministic); one test measures the resident memory of a child process."""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import prosa
import tiny
from prosa.chat import Chat
from prosa.engine import Engine
from prosa.engine.blocks import MIN_BLOCKS, ROOT, BlockPool
from prosa.quant import QuantizedLinear
from prosa.quant.layout import ATEN_ROWS, _aten_int4_unpack

BS = 2               # tokens per block in these tests: a 128-token window then spans 64 blocks
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"    # short: a 128-token window
            "{% if add_generation_prompt %}assistant:{% endif %}")


# -- the pool alone ----------------------------------------------------------------------------------------------
def make_pool(num_blocks: int = 1024) -> BlockPool:
    return BlockPool(1, 1, 1, torch.float32, "cpu", block_size=BS, num_blocks=num_blocks)


def fill(pool: BlockPool, tokens: list[int]) -> list[int]:
    """A sequence of ``tokens`` (whole blocks): allocated, each block's keys set to its first token, registered
    as a chain. Returns its block table."""
    table, parent = [], ROOT
    for i in range(0, len(tokens), BS):
        block = pool.allocate()
        pool.keys[0][block * BS:(block + 1) * BS] = tokens[i]
        parent = pool.register(block, parent, tokens[i:i + BS])
        table.append(block)
    return table


def cached_chain(pool: BlockPool, tokens: list[int]) -> int:
    """How many leading blocks of ``tokens`` the prefix cache holds, checking each one's keys (then let go)."""
    parent, n = ROOT, 0
    for i in range(0, len(tokens), BS):
        hit = pool.lookup(parent, tokens[i:i + BS])
        if hit is None:
            break
        block, parent = hit
        assert bool((pool.keys[0][block * BS:(block + 1) * BS] == tokens[i]).all()), "a moved block lost its keys"
        pool.release([block])
        n += 1
    return n


def test_the_pool_shrinks_when_only_short_sequences_follow_a_long_one():
    pool = make_pool()
    long = list(range(1000, 1200))                            # 100 blocks
    pool.release(fill(pool, long)[::-1])
    assert pool.capacity == 128 and pool.cached == 100
    assert not pool.settle()                                  # the long sequence was the demand: nothing shrinks
    assert pool.capacity == 128
    short = list(range(2000, 2006))                           # 3 blocks
    pool.release(fill(pool, short)[::-1])
    assert pool.settle()                                      # demand 3 blocks: room for MIN_BLOCKS
    assert pool.capacity == MIN_BLOCKS and pool.nbytes == MIN_BLOCKS * BS * pool.bytes_per_token
    assert pool.keys[0].shape[0] == MIN_BLOCKS * BS
    # the most recently used cached blocks were kept (moved below the new size, keys and all): the short
    # sequence and the long one's first blocks (released last); the rest was forgotten
    assert pool.cached == MIN_BLOCKS
    assert cached_chain(pool, short) == 3
    assert cached_chain(pool, long) == MIN_BLOCKS - 3
    assert sorted(pool._free[:3]) == [MIN_BLOCKS, MIN_BLOCKS + 1, MIN_BLOCKS + 2]
    assert not pool.settle()


def test_a_steady_workload_neither_grows_nor_shrinks_the_pool():
    """Cached blocks live in the room the running sequences leave: a new block evicts the oldest cached one
    rather than growing the tensors, so a stream of similar requests keeps the same size (no grow/shrink
    copies)."""
    pool = make_pool()
    sizes = []
    for i in range(50):
        pool.release(fill(pool, list(range(100 * i, 100 * i + 10)))[::-1])
        assert not pool.settle()
        sizes.append(pool.capacity)
    assert sizes == [MIN_BLOCKS] * 50
    assert pool.cached == MIN_BLOCKS


def test_referenced_blocks_never_move():
    pool = make_pool()
    running = fill(pool, list(range(500, 520)))               # 10 blocks referenced, ids 0..9
    pool.release(fill(pool, list(range(400)))[::-1])          # 200 blocks cached, ids 10..209
    assert pool.capacity == 256 and not pool.settle()
    pool.release(fill(pool, list(range(900, 904)))[::-1])
    assert pool.settle()                                      # demand 12 blocks: room for 32
    assert pool.capacity == 32 and pool.cached == 22
    assert running == list(range(10)) and all(pool._refs[b] == 1 for b in running)
    assert cached_chain(pool, list(range(500, 520))) == 10    # still found (and shared) where they were
    assert cached_chain(pool, list(range(400))) == 20
    assert all(pool._refs[b] == 1 for b in running)


def test_forget_drops_a_conversation_and_what_follows_it_but_not_its_shared_start():
    pool = make_pool()
    system = [1, 2, 3, 4]                                     # two blocks every conversation starts with
    mine = system + list(range(10, 30))
    other = system + list(range(50, 60))
    tables = [fill(pool, mine + [7, 7, 8, 8]),                # the conversation and a reply after it
              fill(pool, mine[:12] + [9, 9]),                 # a retry branching off it
              fill(pool, other)]
    for table in tables:
        pool.release(table[::-1])
    before = pool.cached
    assert pool.forget(mine, keep=5) == len(mine) // BS - 2 + 2 + 1
    assert pool.cached == before - (len(mine) // BS - 2 + 2 + 1)
    assert cached_chain(pool, mine) == 2                      # the system prompt's whole blocks stay
    assert cached_chain(pool, other) == len(other) // BS      # another conversation is untouched
    held = fill(pool, [5, 5, 6, 6])
    assert pool.forget([5, 5, 6, 6]) == 0                     # a running sequence's blocks stay
    pool.release(held[::-1])
    assert cached_chain(pool, [5, 5, 6, 6]) == 2


# -- the engine ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return prosa.load(tiny_checkpoint("llama"), dtype="float32")


def greedy(engine: Engine, lm, prompt: list[int], tokens: int) -> list[int]:
    (req,) = lm.make_requests([prompt], max_new_tokens=tokens, temperature=0, ignore_eos=True)
    h = engine.submit(req)
    while engine.step():
        pass
    out = []
    while not h.queue.empty():
        ev = h.queue.get()
        out += [ev.token] if ev.token >= 0 else []
    return out


def test_engine_memory_comes_back_after_a_long_then_short_generation(lm):
    engine = Engine(lm.model, lm.tokenizer, background=False, block_size=BS, kv_cache_tokens=4096)
    pool = engine.pool
    long_prompt = [(7 * i) % 300 + 1 for i in range(90)]
    first = greedy(engine, lm, long_prompt, 30)               # 120 tokens: 60 blocks
    assert pool.capacity == 64
    greedy(engine, lm, [5, 6, 7], 4)
    assert pool.capacity == MIN_BLOCKS and pool.nbytes == MIN_BLOCKS * BS * pool.bytes_per_token
    # the cache kept the long prompt's start, moved and intact: the same greedy tokens as a cold engine
    cached = engine.metrics.snapshot()["prompt_tokens_cached"]
    again = greedy(engine, lm, long_prompt, 30)
    assert engine.metrics.snapshot()["prompt_tokens_cached"] - cached > 0
    assert again == first
    cold = Engine(lm.model, lm.tokenizer, background=False, block_size=BS, prefix_cache=False)
    assert greedy(cold, lm, long_prompt, 30) == first


@pytest.fixture(scope="module")
def chat_lm(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory_chat")
    shutil.copytree(tiny_checkpoint("llama"), folder, dirs_exist_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    lm = prosa.load(folder, dtype="float32")
    lm.engine_options = {"block_size": BS}
    return lm


def wait_for(condition, timeout: float = 20.0) -> None:
    """The background engine applies a reset at its next step."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the engine did not settle"
        time.sleep(0.01)


def test_chat_keeps_its_conversation_between_turns_and_reset_releases_it(chat_lm):
    engine = chat_lm.engine
    pool = engine.pool
    chat = Chat(chat_lm, system="Be nice.", max_new_tokens=8, temperature=0)
    chat.send("hello there, how are you?")
    first = list(chat.last_prompt)
    cached = engine.metrics.snapshot()["prompt_tokens_cached"]
    chat.send("fine")
    reused = engine.metrics.snapshot()["prompt_tokens_cached"] - cached
    assert reused >= len(first) // BS * BS > 0                # turn 2 ran only what followed turn 1's blocks
    assert pool.capacity > MIN_BLOCKS                         # the conversation is what the pool holds
    keep = chat._shared_start(chat.last_prompt)
    assert 0 < keep < len(chat.last_prompt)
    chat.reset()
    assert chat.history == [] and chat.last_prompt == []
    wait_for(lambda: pool.capacity == MIN_BLOCKS and pool.cached == keep // BS)
    cached = engine.metrics.snapshot()["prompt_tokens_cached"]
    chat.send("hi")                                            # a new conversation reuses the system prompt only
    assert 0 < engine.metrics.snapshot()["prompt_tokens_cached"] - cached <= keep // BS * BS


def test_loading_a_conversation_releases_the_old_one(chat_lm):
    """``Chat.from_dict`` (and so ``Chat.load``) replaces the conversation: its cached blocks go as on reset."""
    pool = chat_lm.engine.pool
    chat = Chat(chat_lm, system="Be nice.", max_new_tokens=8, temperature=0)
    before = pool.cached                                      # other tests' conversations, the system prompt's
    chat.send("hello there, how are you? " * 4)
    keep = chat._shared_start(chat.last_prompt)
    assert pool.cached > before + keep // BS
    chat.from_dict({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert chat.last_prompt == [] and len(chat.history) == 2
    wait_for(lambda: pool.cached <= before + keep // BS)


# -- resident memory, in a child process ----------------------------------------------------------------------------
BOUND = 16           # MB above the starting RSS allowed once the pool has shrunk back (the pool is 4 MB then)
CHILD = textwrap.dedent("""
    import json, sys, time
    import prosa
    from prosa.chat import Chat

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    def settled(below):
        # the engine thread shrinks the pool and trims the heap just after the step that emitted the last event:
        # give it a moment (what stays above the bound after it is what the test is about)
        deadline = time.monotonic() + 5
        while (pool.capacity > 16 or rss() > below) and time.monotonic() < deadline:
            time.sleep(0.01)
        return rss(), pool.capacity

    lm = prosa.load(sys.argv[1], dtype="float32")
    pool = lm.engine.pool
    out = {}
    lm.generate([1, 2, 3], max_new_tokens=4)
    warm = Chat(lm, max_new_tokens=4, temperature=0)      # the chat template and the tokenizer's first use
    warm.send("A story about a man and a dog. " * 8)       # (their own allocations are not the pool's)
    warm.reset()
    settled(float("inf"))
    time.sleep(0.3)                                       # the engine's heap trim after the reset
    out["base"] = rss()
    lm.generate([(7 * i) % 300 + 1 for i in range(3000)], max_new_tokens=4)
    out["long"], out["long_blocks"] = rss(), pool.capacity
    for i in range(2):
        lm.generate([4, 5, 6 + i], max_new_tokens=4)
    out["short"], out["short_blocks"] = settled(out["base"] + BOUND)
    chat = Chat(lm, max_new_tokens=4, temperature=0)
    chat.send("A story about a man and a dog. The dog ran to the park and the man followed him. " * 70)
    out["chat"], out["chat_blocks"] = rss(), pool.capacity
    chat.reset()
    out["reset"], out["reset_blocks"] = settled(out["base"] + BOUND)
    out["kv_mb_per_block"] = pool.block_size * pool.bytes_per_token / 2**20
    print(json.dumps(out))
""").replace("BOUND", str(BOUND))


@pytest.fixture(scope="module")
def wide_kv_checkpoint(tmp_path_factory):
    """A tiny Llama whose keys/values are wide (2 layers x 4 heads x 256 wide: 16 KB a token) with a 4096-token
    window, so that a long sequence's KV memory is plain in the process's RSS while the weights stay tiny."""
    spec = ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                head_dim=256, intermediate_size=96, max_position_embeddings=4096,
                                tie_word_embeddings=True))
    tiny.SPECS["wide_kv"] = spec
    try:
        return tiny.make_checkpoint("wide_kv", tmp_path_factory.mktemp("wide_kv"))
    finally:
        del tiny.SPECS["wide_kv"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_resident_memory_comes_back_down(wide_kv_checkpoint):
    """A 3000-token prompt grows the KV pool to 256 blocks (64 MB); after two short generations, and after a
    long chat is reset, the process's RSS is back within a few MB of where it started."""
    run = subprocess.run([sys.executable, "-c", CHILD, str(wide_kv_checkpoint)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    grown = m["long_blocks"] * m["kv_mb_per_block"]
    assert grown >= 60 and m["long"] - m["base"] >= 0.5 * grown, m       # the long sequence's KV is resident
    assert m["short_blocks"] == MIN_BLOCKS and m["short"] - m["base"] < BOUND, m
    assert m["chat_blocks"] > 4 * MIN_BLOCKS and m["chat"] - m["base"] >= 20, m
    assert m["reset_blocks"] == MIN_BLOCKS and m["reset"] - m["base"] < BOUND, m


# -- aten's int4 packing ------------------------------------------------------------------------------------------
needs_aten_int4 = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                     reason="this torch has no aten int4 CPU kernel")


def live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")               # isinstance on torch's deprecated aliases warns
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        try:
            ptr = obj.untyped_storage().data_ptr()
        except RuntimeError:                          # a fake tensor an earlier compile test left: no memory
            continue
        if ptr not in seen:
            seen.add(ptr)
            total += obj.untyped_storage().nbytes()
    return total


@needs_aten_int4
def test_unpacking_an_aten_int4_layer_keeps_nothing():
    n, k = 4096, 1024                                         # a whole-layer permutation would be 32 MB of int64
    layer = QuantizedLinear.from_float(torch.randn(n, k), bits=4, group_size=32, backend="aten")
    q0, _, _ = QuantizedLinear.from_float(torch.randn(16, 32), bits=4, group_size=32, backend="aten").to_int()
    del q0
    before = live_tensor_bytes()
    q, d, m = layer.to_int()
    w = layer.dequantize()
    del q, d, m, w
    assert live_tensor_bytes() - before < 1 << 20


@needs_aten_int4
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_aten_int4_unpacking_by_chunks_equals_the_whole_permutation(capability):
    """The permutation found on one chunk of rows, applied to every chunk (and found again for the rows left
    over), equals the one found for the whole layer, on each of aten's CPU kernels (row blocks of 32 or 64, a
    partial last block packed apart): checked in a child process per ATEN_CPU_CAPABILITY."""
    code = textwrap.dedent(f"""
        import torch
        import prosa.quant.layout as layout
        from prosa.quant.layout import ATEN_ROWS, _aten_int4_order, _aten_int4_unpack
        shapes = []
        layout._aten_int4_order = lambda n, k: shapes.append((n, k)) or _aten_int4_order(n, k)
        g = torch.Generator().manual_seed(0)
        for n, k in [(16, 32), (48, 64), (80, 32), (ATEN_ROWS, 64), (ATEN_ROWS + 48, 96), (3 * ATEN_ROWS + 16, 32),
                     (2 * ATEN_ROWS, 128)]:
            q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            shapes.clear()
            assert torch.equal(_aten_int4_unpack(packed, n, k), q.to(torch.uint8)), (n, k)
            assert all(rows <= ATEN_ROWS for rows, _ in shapes), ("the chunked permutation failed its check", n, k)
            whole = torch.empty(n * k, dtype=torch.uint8)
            p = packed.reshape(-1)
            whole[_aten_int4_order(n, k)] = torch.stack((p & 15, p >> 4), -1).reshape(-1)
            assert torch.equal(whole.reshape(n, k), q.to(torch.uint8)), (n, k)
        print(torch.backends.cpu.get_cpu_capability())
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
    assert run.returncode == 0, run.stderr[-3000:]
    ran = run.stdout.split()[-1].lower()
    if capability != "default" and capability not in ran:
        pytest.skip(f"this CPU runs {ran}, not {capability}")


@needs_aten_int4
def test_a_build_that_packs_otherwise_still_unpacks_exactly(monkeypatch):
    """If aten's rows were not packed in independent blocks, the chunked result would fail its check and the whole
    permutation is used instead."""
    import prosa.quant.layout as layout

    n, k = ATEN_ROWS + 32, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    real = layout._aten_int4_order
    monkeypatch.setattr(layout, "_aten_int4_order",
                        lambda rows, cols: real(rows, cols).flip(0) if rows != n else real(rows, cols))
    assert torch.equal(_aten_int4_unpack(packed, n, k), q.to(torch.uint8))
