"""The engine: requests joining and leaving a running batch at any step get exactly the tokens they get alone;
cancellation and failures are per request; scheduling (FIFO queue, batch and KV limits, chunked prompts);
prefix reuse; many threads at once; metrics; the checks at the door."""
from __future__ import annotations

import random
import threading
from collections import defaultdict

import pytest

import prosa
from prosa.engine import Engine, Request
from prosa.engine.paged import PagedBatch

WINDOW = 40          # a short context window, so that sliding happens within a few dozen tokens


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def small(request, tiny_checkpoint):
    """A tiny model in int8 (prosa's kernels: every row's numbers independent of the batch) with a 40-token
    window."""
    lm = prosa.load(tiny_checkpoint(request.param), quantize="int8")
    args = lm.model.args
    if request.param == "gpt2":
        args.n_positions = WINDOW
    else:
        args.max_position_embeddings = WINDOW
    return lm


def manual(lm, **kw) -> Engine:
    """An engine driven step by step from the test (no thread), prefix cache off unless asked."""
    kw.setdefault("prefix_cache", False)
    kw.setdefault("kv_cache_tokens", 4096)
    return Engine(lm.model, lm.tokenizer, background=False, **kw)


def drain(handle) -> list:
    out = []
    while not handle.queue.empty():
        out.append(handle.queue.get())
    return out


def run(engine: Engine, schedule: list[tuple[int, Request, int | None]], max_steps: int = 5000) -> dict:
    """Submit each request at its step (cancelling it at its cancel step, if any); step until all are done.
    Returns {request index: {sample: [events]}}."""
    handles, events = {}, defaultdict(lambda: defaultdict(list))
    for step in range(max_steps):
        for i, (at, req, cancel) in enumerate(schedule):
            if at == step:
                handles[i] = engine.submit(req, tag=i)
            if cancel == step and i in handles:
                handles[i].cancel()
        busy = engine.step()
        for i, h in handles.items():
            for ev in drain(h):
                events[i][ev.sample].append(ev)
        if not busy and len(handles) == len(schedule) and all(h.done for h in handles.values()):
            return events
    raise AssertionError("the schedule did not finish")


def tokens_of(evs) -> list[int]:
    return [e.token for e in evs if e.token >= 0]


def random_request(rng: random.Random, lm) -> Request:
    vocab = lm.tokenizer.vocab_size
    prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
    settings = dict(
        max_new_tokens=rng.choice([0, 1, 3, 8, 20, 30]), seed=rng.randrange(1000),
        temperature=rng.choice([0, 0, 0.8, 1.3]), top_k=rng.choice([0, 5, 50]), top_p=rng.choice([1.0, 0.9]),
        min_p=rng.choice([0.0, 0.05]), repetition_penalty=rng.choice([1.0, 1.3]),
        presence_penalty=rng.choice([0.0, 0.5]), frequency_penalty=rng.choice([0.0, 0.3]),
        no_repeat_ngram_size=rng.choice([0, 0, 2]), logprobs=rng.choice([None, None, 0, 3]), n=rng.choice([1, 1, 2, 3]),
        ignore_eos=rng.random() < 0.5, context_overflow=rng.choice(["error", "slide"]),
        stop=[lm.tokenizer.decode([rng.randrange(vocab)])] if rng.random() < 0.3 else None)
    if settings["context_overflow"] == "error":
        settings["max_new_tokens"] = min(settings["max_new_tokens"], WINDOW)
    (req,) = lm.make_requests([prompt], **settings)
    return req


def same(a: list, b: list, cancelled: bool = False) -> None:
    """Events ``a`` (batched) equal ``b`` (alone): tokens, text, logprobs and ending; a cancelled ``a`` is a
    prefix of ``b``."""
    ta, tb = tokens_of(a), tokens_of(b)
    if cancelled and a[-1].finish_reason == "cancelled":
        assert ta == tb[:len(ta)]
        return
    assert ta == tb
    assert "".join(e.text for e in a) == "".join(e.text for e in b)
    assert [(e.logprob, e.top_logprobs) for e in a] == [(e.logprob, e.top_logprobs) for e in b]
    assert (a[-1].finish_reason, a[-1].stop_reason) == (b[-1].finish_reason, b[-1].stop_reason)


def test_join_and_leave_at_random_steps_equal_solo_runs(small):
    """200 seeded schedules: 2-6 requests with random settings (sampling controls, n, stop strings, logprobs,
    sliding windows) join at random steps, some are cancelled; every sequence equals its run alone."""
    rng = random.Random(1234)
    slid = cancelled = joined_late = 0
    for _ in range(200):
        schedule = []
        for _ in range(rng.randint(2, 6)):
            req = random_request(rng, small)
            at = rng.randint(0, 25)
            cancel = at + rng.randint(0, 20) if rng.random() < 0.15 else None
            schedule.append((at, req, cancel))
        chunk = rng.choice([4, 16, 256])
        batched = run(manual(small, max_batch=rng.choice([2, 4, 16]), prefill_chunk=chunk), schedule)
        for i, (at, req, cancel) in enumerate(schedule):
            alone = run(manual(small, prefill_chunk=chunk), [(0, req, None)])[0]    # the same engine settings
            assert sorted(batched[i]) == list(range(req.n))
            for j in range(req.n):
                same(batched[i][j], alone[j], cancelled=cancel is not None)
                slid += req.context_overflow == "slide" and len(req.prompt) + len(tokens_of(alone[j])) > WINDOW
            cancelled += any(e.finish_reason == "cancelled" for evs in batched[i].values() for e in evs)
            joined_late += at > 0
    assert slid > 20 and cancelled > 10 and joined_late > 400        # the schedules did exercise all of it


def test_cancel_frees_the_row_at_the_next_step(small):
    engine = manual(small)
    long = small.make_requests([[5, 6, 7]], max_new_tokens=WINDOW - 3, temperature=0, ignore_eos=True)[0]
    other = small.make_requests([[8, 9]], max_new_tokens=WINDOW - 2, temperature=0, ignore_eos=True)[0]
    a, b = engine.submit(long), engine.submit(other, tag=1)
    for _ in range(4):
        engine.step()
    assert len(engine.scheduler.running) == 2
    used, reserved = engine.pool.used, engine.pool.reserved
    a.cancel()
    engine.step()
    assert [s.handle for s in engine.scheduler.running] == [b]
    assert engine.pool.used < used and engine.pool.reserved < reserved
    evs = drain(a)
    assert evs[-1].finish_reason == "cancelled" and a.done
    while engine.step():
        pass
    assert engine.pool.used == 0 and engine.pool.reserved == 0 and engine.metrics.snapshot()["running"] == 0
    assert tokens_of(drain(b)) == tokens_of(run(manual(small), [(0, other, None)])[0][0])


def test_a_failing_request_does_not_disturb_its_neighbours(small):
    """Every token banned (bad_words_ids bans all but eos, min_new_tokens bans eos): that request ends with
    "error" and a message; the others get their solo tokens."""
    vocab = small.tokenizer.vocab_size
    bad = small.make_requests([[3, 4, 5]], max_new_tokens=5, bad_words_ids=[[i] for i in range(vocab)],
                              min_new_tokens=3, temperature=0.7, seed=1)[0]
    good = [small.make_requests([[7 + i, 9]], max_new_tokens=12, temperature=0.9, seed=i, ignore_eos=True)[0]
            for i in range(3)]
    schedule = [(0, good[0], None), (1, bad, None), (1, good[1], None), (3, good[2], None)]
    out = run(manual(small), schedule)
    (ev,) = out[1][0]
    assert ev.finish_reason == "error" and "banned" in ev.error and ev.token == -1
    for i, req in ((0, good[0]), (2, good[1]), (3, good[2])):
        same(out[i][0], run(manual(small), [(0, req, None)])[0][0])
    res = small.generate([3, 4, 5], max_new_tokens=5, bad_words_ids=[[i] for i in range(vocab)], min_new_tokens=3)
    assert res.finish_reason == "error" and "banned" in res.error and res.tokens == []


def test_window_slides_per_row(small):
    """One row slides past the window while its neighbours do not: each equals its run alone."""
    slide = small.make_requests([[1, 2, 3, 4, 5]], max_new_tokens=3 * WINDOW, temperature=1.0, seed=3,
                                ignore_eos=True, context_overflow="slide")[0]
    short = [small.make_requests([[6 + i]], max_new_tokens=10, temperature=0.5, seed=i, ignore_eos=True)[0]
             for i in range(4)]
    schedule = [(0, slide, None)] + [(10 * i, r, None) for i, r in enumerate(short)]
    out = run(manual(small), schedule)
    assert len(tokens_of(out[0][0])) == 3 * WINDOW
    same(out[0][0], run(manual(small), [(0, slide, None)])[0][0])
    for i, r in enumerate(short, 1):
        same(out[i][0], run(manual(small), [(0, r, None)])[0][0])


def test_queue_is_fifo_with_positions_and_limits(small):
    engine = manual(small, max_batch=2)
    reqs = [small.make_requests([[10 + i, 11]], max_new_tokens=4, temperature=0, ignore_eos=True)[0]
            for i in range(5)]
    hs = [engine.submit(r, tag=i) for i, r in enumerate(reqs)]
    assert [h.position for h in hs] == [0, 1, 2, 3, 4]
    engine.step()
    assert [h.position for h in hs] == [None, None, 0, 1, 2]
    assert engine.metrics.snapshot()["waiting"] == 3 and engine.metrics.snapshot()["running"] == 2
    order, busy = [], True
    while busy:
        busy = engine.step()
        order += [h.tag for h in hs if h.done and h.tag not in order]
    assert order == [0, 1, 2, 3, 4]


def test_kv_budget_admits_what_fits_and_refuses_what_never_can(small):
    engine = manual(small, kv_cache_tokens=3 * WINDOW + 48, max_batch=16)
    req = small.make_requests([[1, 2]], max_new_tokens=WINDOW - 2, temperature=0, ignore_eos=True)[0]
    hs = [engine.submit(req, tag=i) for i in range(4)]
    engine.step()
    # each reserves its whole window (+ a block for forks): only two fit a three-window budget
    assert sum(h.position is None for h in hs) == 2 and engine.pool.reserved <= engine.pool.num_blocks
    while engine.step():
        assert engine.pool.used <= engine.pool.num_blocks
    assert all(h.done for h in hs)
    with pytest.raises(ValueError, match="KV cache"):
        engine.submit(small.make_requests([[1, 2]], n=8, max_new_tokens=WINDOW - 2)[0])


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps(small):
    """A newcomer's 30-token prompt runs 8 tokens a step; the running stream gets a token at every step."""
    engine = manual(small, prefill_chunk=8)
    stream = small.make_requests([[1, 2]], max_new_tokens=20, temperature=0, ignore_eos=True)[0]
    newcomer = small.make_requests([list(range(3, 33))], max_new_tokens=3, temperature=0, ignore_eos=True)[0]
    calls = []
    begin = PagedBatch.begin

    def counted(cache, input_ids, attention_mask=None):
        calls.append(tuple(input_ids.shape))
        return begin(cache, input_ids, attention_mask)

    PagedBatch.begin = counted
    try:
        out = run(engine, [(0, stream, None), (3, newcomer, None)])
    finally:
        PagedBatch.begin = begin
    assert max(t for _, t in calls) == 8
    chunks = [i for i, c in enumerate(calls) if c == (1, 8)]
    assert len(chunks) == 3
    assert all(calls[i + 1] == (1, 1) for i in chunks)      # the running stream steps after every chunk
    assert len(tokens_of(out[0][0])) == 20 and len(tokens_of(out[1][0])) == 3


def test_prefix_reuse_runs_only_new_tokens(tiny_checkpoint):
    lm = prosa.load(tiny_checkpoint("llama"), quantize="int8")
    engine = Engine(lm.model, lm.tokenizer, background=False)
    bs = engine.pool.block_size
    system = list(range(40, 40 + 3 * bs + 5))          # 53 tokens: three full blocks and a bit
    first = lm.make_requests([system + [7, 8]], max_new_tokens=4, temperature=0)[0]
    second = lm.make_requests([system + [9, 10, 11]], max_new_tokens=4, temperature=0)[0]
    fed = []
    forward = lm.model.forward

    def counting(input_ids, *args, **kwargs):
        fed.append(input_ids.shape[1])
        return forward(input_ids, *args, **kwargs)

    lm.model.forward = counting
    try:
        run(engine, [(0, first, None)])
        assert fed[0] == len(first.prompt)
        fed.clear()
        out = run(engine, [(0, second, None)])
    finally:
        del lm.model.forward
    assert fed[0] == len(second.prompt) - 3 * bs                   # only what follows the cached blocks
    m = engine.metrics.snapshot()
    assert m["prompt_tokens_cached"] == 3 * bs
    assert m["prompt_tokens_computed"] == len(first.prompt) + len(second.prompt) - 3 * bs
    # greedy text equals a cold run (the reused keys are the same numbers up to rounding)
    cold = run(manual(lm), [(0, second, None)])
    assert tokens_of(out[0][0]) == tokens_of(cold[0][0])


def test_eight_threads_equal_eight_sequential_calls(tiny_checkpoint):
    lm = prosa.load(tiny_checkpoint("llama"), quantize="int8")
    prompts = [f"{i} once upon a time, story number {i}" for i in range(8)]
    kw = [dict(max_new_tokens=12 + 2 * i, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=i % 2 == 0,
               logprobs=2 if i == 3 else None) for i in range(8)]
    alone = [lm.generate(p, **k) for p, k in zip(prompts, kw)]
    # every reference ran (a request that fails ends "error" with no tokens: equal to another failure)
    assert all(r.finish_reason in ("length", "stop") and r.tokens for r in alone)
    results: list = [None] * 8
    start = threading.Barrier(8)

    def call(i):
        start.wait()
        results[i] = lm.generate(prompts[i], **kw[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for a, b in zip(results, alone):
        assert (a.tokens, a.text, a.finish_reason, a.logprobs) == (b.tokens, b.text, b.finish_reason, b.logprobs)
    assert lm.engine.metrics.snapshot()["requests"]


def test_stream_close_cancels_and_chunks_are_per_sample(tiny_checkpoint):
    lm = prosa.load(tiny_checkpoint("gpt2"), quantize="int8")
    chunks = list(lm.stream("Once upon", n=3, max_new_tokens=10, temperature=1.0, seed=2, ignore_eos=True))
    results = lm.generate("Once upon", n=3, max_new_tokens=10, temperature=1.0, seed=2, ignore_eos=True)
    for j, res in enumerate(results):
        mine = [c for c in chunks if c.sample == j]
        assert "".join(mine) == res.text and sum(len(c.token_ids) for c in mine) == len(res.tokens)
        assert mine[-1].finish_reason == "length"
    stream = lm.stream("Once upon", max_new_tokens=100, temperature=0, ignore_eos=True)
    next(stream)
    stream.close()
    for _ in range(200):            # the engine drops the request at its next step
        if lm.engine.metrics.snapshot()["running"] == 0:
            break
        threading.Event().wait(0.01)
    assert lm.engine.metrics.snapshot()["running"] == 0
    assert lm.engine.metrics.snapshot()["requests"].get("cancelled") == 1


def test_a_handle_iterates_its_events(tiny_checkpoint):
    lm = prosa.load(tiny_checkpoint("gpt2"), quantize="int8")
    (req,) = lm.make_requests(["Once upon"], n=2, max_new_tokens=4, temperature=0.7, seed=5, ignore_eos=True)
    events = list(lm.engine.submit(req))
    assert sorted(e.sample for e in events if e.finish_reason) == [0, 1] and len(events) == 8
    alone = lm.generate("Once upon", n=2, max_new_tokens=4, temperature=0.7, seed=5, ignore_eos=True)
    assert [e.token for e in events if e.sample == 1] == alone[1].tokens


def test_metrics(tiny_checkpoint):
    lm = prosa.load(tiny_checkpoint("gpt2"), quantize="int8")
    lm.generate(["a b", "c d e"], max_new_tokens=5, temperature=0, ignore_eos=True)
    m = lm.engine.metrics.snapshot()
    assert m["generation_tokens"] == 10 and m["prompt_tokens"] == len(lm.encode("a b")) + len(lm.encode("c d e"))
    assert m["ttft"].count == 2 and m["itl"].count == 8 and m["requests"] == {"length": 2}
    assert m["waiting"] == 0 and m["running"] == 0 and 0 <= m["kv_cache_usage"] <= 1
    assert m["ttft"].cumulative()[-1] == (float("inf"), 2)


def test_the_engine_thread_ends_when_idle_and_restarts(tiny_checkpoint, monkeypatch):
    from prosa.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "IDLE_EXIT_S", 0.05)
    lm = prosa.load(tiny_checkpoint("gpt2"), quantize="int8")
    a = lm.generate("hi", max_new_tokens=3, temperature=0, ignore_eos=True)
    assert len(a.tokens) == 3
    for _ in range(100):
        if lm.engine._thread is None:
            break
        threading.Event().wait(0.02)
    assert lm.engine._thread is None
    assert lm.generate("hi", max_new_tokens=3, temperature=0, ignore_eos=True).tokens == a.tokens


@pytest.mark.parametrize("prompt, kw, word", [
    ("", {}, "prompt is empty"), ([1, 10 ** 6], {}, "prompt"),
    ([1, -1], {}, "prompt"), ("hi", {"logprobs": 21}, "logprobs"), ("hi", {"n": 129}, "n "),
    ("hi", {"max_new_tokens": 10 ** 6}, "max_new_tokens"),
])
def test_checks_at_the_door(tiny_checkpoint, prompt, kw, word):
    lm = prosa.load(tiny_checkpoint("gpt2"), quantize="int8")
    with pytest.raises(ValueError, match=word):
        lm.generate(prompt, **kw)
    with pytest.raises(ValueError, match=word):
        lm.stream(prompt, **kw)                  # checked when called, before iterating
    assert lm._engine is None                    # no model work was done
