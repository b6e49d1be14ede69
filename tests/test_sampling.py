"""Sampling controls: each processor on hand-built distributions, parity with transformers' processors, the
per-row sampler (independence from the batch, greedy ties), a chi-square test of the sampled distribution, and
SamplingParams validation."""
from __future__ import annotations


import pytest
import torch

from prosa import sampling as S
from prosa.sampling import SamplingParams, TokenHistory, apply, make_logits_processors, make_sampler
from prosa.sampling.params import check_temperature
from prosa.sampling.sampler import draw

INF = float("inf")


def history(prompts, vocab=10, generated=()):
    """A TokenHistory of ``prompts`` after appending each step of ``generated`` (a list of per-row tokens)."""
    h = TokenHistory(prompts, vocab)
    for step in generated:
        h.append(torch.tensor(step))
    return h


def make_generators(seeds) -> list[torch.Generator]:
    """One seeded CPU generator per row (what ``prosa.engine`` gives each sample)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def sample(params, logits: torch.Tensor, generators) -> torch.Tensor:
    """The tokens ``make_sampler(params)`` picks; every row must have had something to pick."""
    tokens, dead = make_sampler(params).pick(logits, generators)
    assert dead is None, dead
    return tokens


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero()[:, 0].tolist() for row in logits]


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-6) -> None:
    """Same -inf positions, finite values equal up to atol."""
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (ours, theirs)
    assert torch.equal(ours[torch.isinf(ours)], theirs[torch.isinf(theirs)])
    fin = torch.isfinite(ours)
    torch.testing.assert_close(ours[fin], theirs[fin], atol=atol, rtol=0)


# -- warpers on hand-built distributions -----------------------------------------------------------------------------
def test_temperature_scales_sampled_rows_and_leaves_greedy_rows():
    logits = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    out = S.temperature([0.5, 0.0])(logits, history([[0], [0]], 3))
    assert torch.equal(out, torch.tensor([[2.0, 4.0, 8.0], [1.0, 2.0, 4.0]]))


def test_top_k_per_row_larger_than_vocab_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [1.0, 5.0, 3.0, 4.0], [1.0, 5.0, 3.0, 4.0], [2.0, 3.0, 3.0, 1.0]])
    out = S.top_k([1, 0, 99, 2])(logits, history([[0]] * 4, 4))
    assert kept(out) == [[1], [0, 1, 2, 3], [0, 1, 2, 3], [1, 2]]
    assert torch.equal(out[1], logits[1]) and torch.equal(out[2], logits[2])
    # ties with the k-th value are kept (transformers: `scores < topk[..., -1]`)
    out = S.top_k([1])(torch.tensor([[3.0, 3.0, 1.0]]), history([[0]], 3))
    assert kept(out) == [[0, 1]]


def test_top_p_boundary_and_ties():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    out = S.top_p([0.5, 0.8, 0.81])(probs.log(), history([[0]] * 3, 3))
    # cumulative mass from the least likely: 0.2, 0.5, 1.0; tokens are dropped while it is <= 1 - top_p
    assert kept(out) == [[0], [0, 1], [0, 1, 2]]
    # a tie straddling the boundary: both tied tokens stay (transformers keeps an arbitrary one of them)
    tie = torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert kept(S.top_p([0.6])(tie, history([[0]], 3))) == [[0, 1, 2]]
    assert kept(S.top_p([0.5])(tie, history([[0]], 3))) == [[2]]
    # the most likely token always survives, and top_p = 1 leaves a row untouched (zero-probability tokens too)
    assert kept(S.top_p([1e-9])(torch.tensor([[0.0, 1.0, 2.0]]), history([[0]], 3))) == [[2]]
    row = torch.tensor([[0.0, -200.0, 5.0]])
    assert torch.equal(S.top_p([1.0])(row, history([[0]], 3)), row)


def test_min_p_flat_and_peaked():
    flat = torch.zeros(1, 8)
    assert torch.equal(S.min_p([1.0])(flat, history([[0]], 8)), flat)          # all tied with the top: all kept
    peaked = torch.tensor([[0.6, 0.3, 0.07, 0.03]]).log()
    out = S.min_p([0.1, 0.4, 1.0, 0.0])(peaked.repeat(4, 1), history([[0]] * 4, 4))
    assert kept(out) == [[0, 1, 2], [0, 1], [0], [0, 1, 2, 3]]


def test_typical_p_on_a_known_distribution():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    entropy = float(-(p * p.log()).sum())                   # 1.2799
    distance = (-p.log() - entropy).abs()                   # ranks tokens 1 (0.076), 2 (0.33), 0 (0.36), 3 (1.02)
    assert distance.argsort().tolist() == [1, 2, 0, 3]
    logits = p.log().repeat(4, 1)
    out = S.typical_p([0.2, 0.5, 0.55, 1.0])(logits, history([[0]] * 4, 4))
    # mass of the ranked tokens: 0.3, 0.5, 0.9, 1.0 -> keep the ranked prefix that first reaches typical_p
    assert kept(out) == [[1], [1, 2], [0, 1, 2], [0, 1, 2, 3]]
    # the most likely token can be dropped: typical_p is not a warper for greedy rows (see the factory test)
    assert 0 not in kept(out)[1]


# -- penalties and bans ------------------------------------------------------------------------------------------------
def test_repetition_penalty_covers_prompt_and_generated_once():
    h = history([[1, 1, 1]], 5, generated=[[2], [2]])
    logits = torch.tensor([[1.0, 2.0, -2.0, 3.0, 0.0]])
    out = S.repetition_penalty([2.0])(logits, h)
    assert torch.equal(out, torch.tensor([[1.0, 1.0, -4.0, 3.0, 0.0]]))     # each seen id once, whatever its count


def test_presence_and_frequency_penalties_count_generated_ids_only():
    h = history([[1, 1, 1]], 5, generated=[[2], [2], [3]])
    logits = torch.zeros(1, 5)
    pres = S.presence_frequency_penalty([0.5], [0.0])(logits, h)
    freq = S.presence_frequency_penalty([0.0], [0.5])(logits, h)
    both = S.presence_frequency_penalty([1.0], [-0.25])(logits, h)
    assert pres.tolist() == [[0.0, 0.0, -0.5, -0.5, 0.0]]          # prompt id 1 is not penalised
    assert freq.tolist() == [[0.0, 0.0, -1.0, -0.5, 0.0]]
    assert both.tolist() == [[0.0, 0.0, -0.5, -0.75, 0.0]]


def test_penalties_compared():
    """Prompt id 1 (x3), generated id 2 (x2): only repetition_penalty touches 1; frequency grows with the count."""
    h = history([[1, 1, 1]], 4, generated=[[2], [2]])
    logits = torch.full((1, 4), 2.0)
    procs = make_logits_processors([SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                                                   frequency_penalty=0.25)], [], 4)
    assert [p.name for p in procs] == ["repetition_penalty", "presence_frequency_penalty"]
    assert apply(procs, logits, h).tolist() == [[2.0, 1.0, 1.0 - 0.5 - 0.5, 2.0]]


def test_no_repeat_ngram():
    h = history([[1, 2, 3, 1]], 6)
    logits = torch.zeros(1, 6)
    assert kept(S.no_repeat_ngram([2])(logits, h)) == [[0, 1, 3, 4, 5]]      # "1 2" occurred: 2 is banned after 1
    assert kept(S.no_repeat_ngram([3])(logits, h)) == [[0, 1, 2, 3, 4, 5]]   # "3 1" never continued
    assert kept(S.no_repeat_ngram([1])(logits, h)) == [[0, 4, 5]]            # n = 1: every seen token
    h.append(torch.tensor([2]))                                               # "... 1 2", now "2 3" is banned
    assert kept(S.no_repeat_ngram([3])(logits, h)) == [[0, 1, 2, 4, 5]]
    # rows of different lengths and sizes in one batch; a short row bans nothing
    h = history([[4, 4], [1, 2, 1], [5]], 6)
    out = S.no_repeat_ngram([2, 2, 0])(torch.zeros(3, 6), h)
    assert kept(out) == [[0, 1, 2, 3, 5], [0, 1, 3, 4, 5], [0, 1, 2, 3, 4, 5]]


def test_bad_words_single_and_multi_token():
    words = [((3,), (1, 2), (7, 8, 9)), ()]
    proc = S.bad_words(words, eos_ids=[0])
    h = history([[5, 1], [5, 1]], 10)
    assert kept(proc(torch.zeros(2, 10), h)) == [[0, 1, 4, 5, 6, 7, 8, 9], list(range(10))]
    h.append(torch.tensor([7, 7]))
    assert kept(proc(torch.zeros(2, 10), h)) == [[0, 1, 2, 4, 5, 6, 7, 8, 9], list(range(10))]
    h.append(torch.tensor([8, 8]))
    assert kept(proc(torch.zeros(2, 10), h)) == [[0, 1, 2, 4, 5, 6, 7, 8], list(range(10))]
    # a single-token bad word equal to an eos id is ignored (transformers' NoBadWordsLogitsProcessor)
    assert kept(S.bad_words([((0,), (4,))], eos_ids=[0])(torch.zeros(1, 5), history([[1]], 5))) == [[0, 1, 2, 3]]
    # a prefix longer than any row never matches
    long = S.bad_words([((1, 2, 3, 4, 5, 6),)])
    assert kept(long(torch.zeros(1, 7), history([[1]], 7))) == [list(range(7))]


def test_logit_bias_per_row():
    proc = S.logit_bias([{1: 5.0, 3: -100.0}, None, {0: 0.5}])
    out = proc(torch.zeros(3, 4), history([[0]] * 3, 4))
    assert out.tolist() == [[0.0, 5.0, 0.0, -100.0], [0.0] * 4, [0.5, 0.0, 0.0, 0.0]]


def test_min_new_tokens_bans_every_eos_then_lifts():
    proc = S.min_new_tokens([2, 0, 3], eos_ids=[0, 4])
    h = history([[1], [1], [1]], 5)
    for step in range(4):
        out = proc(torch.zeros(3, 5), h)
        banned = [[t for t in range(5) if t not in row] for row in kept(out)]
        assert banned == [[0, 4] if step < 2 else [], [], [0, 4] if step < 3 else []]
        h.append(torch.tensor([2, 2, 2]))
    assert kept(S.min_new_tokens([5], eos_ids=[])(torch.zeros(1, 3), history([[1]], 3))) == [[0, 1, 2]]


# -- make_logits_processors ------------------------------------------------------------------------------------------
def test_neutral_settings_build_no_processor():
    assert make_logits_processors([SamplingParams(), SamplingParams(temperature=0)], [0], 50) == []
    # warpers are neutral for greedy rows; k >= vocab is off; min_new_tokens without eos ids does nothing
    greedy = SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.2, typical_p=0.5)
    assert make_logits_processors([greedy, SamplingParams(top_k=50)], [0], 50) == []
    assert make_logits_processors([SamplingParams(min_new_tokens=3)], [], 50) == []
    assert make_logits_processors([SamplingParams(bad_words_ids=((0,),))], [0], 50) == []


def test_processor_order():
    every = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, typical_p=0.9, repetition_penalty=1.2,
                           presence_penalty=0.1, frequency_penalty=0.1, no_repeat_ngram_size=2, logit_bias={1: 1.0},
                           bad_words_ids=((2,),), min_new_tokens=1)
    names = [p.name for p in make_logits_processors([every], [0], 10)]
    assert names == ["logit_bias", "repetition_penalty", "presence_frequency_penalty", "no_repeat_ngram",
                     "bad_words", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p"]


def test_greedy_rows_feel_penalties_and_bans_but_not_warpers():
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0, -1.0]]).repeat(2, 1)
    h = history([[1], [1]], 5)
    greedy = SamplingParams(temperature=0, typical_p=0.2, top_k=1)
    out = apply(make_logits_processors([greedy, greedy], [0], 5), logits, h)
    assert torch.equal(out, logits)                       # typical_p would have dropped token 1; not for greedy
    banned = SamplingParams(temperature=0, bad_words_ids=((2,),), repetition_penalty=10.0, logit_bias={3: 1.5})
    out = apply(make_logits_processors([banned, greedy], [0], 5), logits, h)
    assert sample([banned, greedy], out, make_generators([0, 0])).tolist() == [3, 1]


def test_mixed_rows_in_one_batch():
    """Row 0 top_k=1, row 1 plain sampling, row 2 greedy with a penalty, row 3 min_p: each gets its own."""
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(temperature=0, repetition_penalty=100.0),
              SamplingParams(min_p=0.5, temperature=2.0)]
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]]).repeat(4, 1)
    h = history([[2]] * 4, 4)
    out = apply(make_logits_processors(params, [], 4), logits, h)
    assert kept(out) == [[2], [0, 1, 2, 3], [0, 1, 2, 3], [1, 2]]
    assert torch.equal(out[1], logits[1])
    assert out[2, 2] == 3.0 / 100
    tokens = sample(params, out, make_generators(range(4)))
    assert tokens[0] == 2 and tokens[2] == 1 and tokens[3] in (1, 2)


# -- token history ---------------------------------------------------------------------------------------------------
def test_history_grows_past_its_buffer_and_handles_empty_prompts():
    h = history([[], [1]], 5)
    for i in range(40):
        h.append(torch.tensor([i % 5, 4]))
    assert h.ids[0].tolist() == [-1] + [i % 5 for i in range(40)] and h.ids[1].tolist() == [1] + [4] * 40
    assert h.counts[0].tolist() == [8] * 5 and h.seen[1].tolist() == [False, True, False, False, True]


def test_history_counts_only_the_generated_ids():
    """Rows joining a running batch bring ids they generated before: counts cover those, seen covers all."""
    h = TokenHistory([[1, 2, 3, 3], [4, 2]], 5, generated=[2, 0])
    assert h.counts.tolist() == [[0, 0, 0, 2, 0], [0] * 5] and h.num_generated.tolist() == [2, 0]
    assert h.seen.tolist() == [[False, True, True, True, False], [False, False, True, False, True]]
    h.append(torch.tensor([2, 2]))
    assert h.counts.tolist() == [[0, 0, 1, 2, 0], [0, 0, 1, 0, 0]] and h.num_generated.tolist() == [3, 1]
    with pytest.raises(ValueError, match="generated"):
        TokenHistory([[1, 2]], 5, generated=[3])


# -- the sampler -----------------------------------------------------------------------------------------------------
def test_greedy_ties_take_the_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert sample([SamplingParams(temperature=0)] * 2, logits, []).tolist() == [1, 0]


def test_a_rows_sample_does_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 30, generator=gen)
    params = [SamplingParams(temperature=0.9), SamplingParams(temperature=0), SamplingParams(top_k=5),
              SamplingParams(top_p=0.8), SamplingParams(), SamplingParams(temperature=1.5, min_p=0.1)]
    seeds = [11, 12, 13, 14, 15, 16]

    def run(rows):
        h = history([[1, 2]] * len(rows), 30)
        ps = [params[i] for i in rows]
        gens = make_generators([seeds[i] for i in rows])
        out = []
        for _ in range(20):
            x = apply(make_logits_processors(ps, [0], 30), logits[rows], h)
            t = sample(ps, x, gens)
            h.append(t)
            out.append(t)
        return torch.stack(out, 1)

    together = run(list(range(6)))
    for i in range(6):
        assert torch.equal(run([i])[0], together[i])
    assert torch.equal(run([5, 3, 0])[[2, 1, 0]], together[[0, 3, 5]])
    assert len(set(together[4].tolist())) > 3             # it really samples


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([[-INF, 0.0, -INF, 0.0, -INF]]).repeat(2000, 1)
    tokens = sample([SamplingParams()] * 2000, logits, make_generators(range(2000)))
    assert set(tokens.tolist()) == {1, 3}
    assert 900 < int((tokens == 1).sum()) < 1100
    gen = torch.Generator().manual_seed(0)
    one = torch.tensor([[-INF, -INF, 7.0]])
    assert all(int(sample([SamplingParams()], one, [gen])) == 2 for _ in range(50))


def test_rows_with_nothing_to_pick_are_reported_not_drawn():
    logits = torch.tensor([[0.0, 1.0], [-INF, -INF], [float("nan")] * 2])
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0)]
    tokens, dead = make_sampler(params).pick(logits, make_generators([0, 1, 2]))
    assert dead.tolist() == [False, True, True] and tokens[0] in (0, 1)
    assert make_sampler(params[:1]).pick(logits[:1], make_generators([0]))[1] is None


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for a chi-square with ``dof`` degrees of freedom (regularised upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_chi2_sf_known_values():
    assert abs(chi2_sf(3.841459, 1) - 0.05) < 1e-5
    assert abs(chi2_sf(18.307038, 10) - 0.05) < 1e-5


def test_sampled_distribution_matches_the_filtered_one():
    """20,000 draws under temperature 0.7, top_k 20, top_p 0.9 follow the analytically filtered distribution."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1234)) * 2
    # The analytic distribution, in float64: temperature, the 20 best, then the smallest nucleus reaching 0.9.
    z = logits.double() / 0.7
    order = z.argsort(descending=True)
    p = torch.zeros(50, dtype=torch.float64)
    top = order[:20]
    q = torch.softmax(z[top], 0)
    n_keep = int((q.cumsum(0) < 0.9).sum()) + 1
    p[top[:n_keep]] = q[:n_keep] / q[:n_keep].sum()
    assert 2 < n_keep < 20                                 # both filters matter for this vector

    n = 20_000
    params = [SamplingParams(temperature=0.7, top_k=20, top_p=0.9)] * n
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(5)).tolist()
    x = apply(make_logits_processors(params[:1], [], 50), logits[None], history([[0]], 50))
    assert kept(x) == [sorted(top[:n_keep].tolist())]
    tokens = sample(params, x.expand(n, 50), make_generators(seeds))
    counts = torch.bincount(tokens, minlength=50).double()
    assert counts[p == 0].sum() == 0
    # bins with expected count >= 5; the rest pooled into one bin
    expected = p * n
    big = expected >= 5
    obs, exp = counts[big].tolist(), expected[big].tolist()
    if expected[~big & (p > 0)].sum() > 0:
        obs.append(float(counts[~big].sum()))
        exp.append(float(expected[~big].sum()))
    assert min(exp) >= 5
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    assert chi2_sf(stat, len(obs) - 1) > 1e-3, (stat, len(obs))


# -- parity with transformers ----------------------------------------------------------------------------------------
tlp = pytest.importorskip("transformers.generation.logits_process")


def random_logits(b=4, v=64, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def random_ids(b=4, length=40, v=12, seed=0):
    """Token rows with lots of repetition (small alphabet), shape (b, length)."""
    return torch.randint(0, v, (b, length), generator=torch.Generator().manual_seed(seed))


def per_row(theirs_of, values, ids, logits):
    return torch.cat([theirs_of(v)(ids[i:i + 1], logits[i:i + 1].clone()) for i, v in enumerate(values)])


@pytest.mark.parametrize("seed", range(3))
def test_parity_warpers(seed):
    logits = random_logits(seed=seed)
    ids = random_ids(seed=seed)
    h = TokenHistory(ids.tolist(), 64)
    temps = [0.3, 0.7, 1.0, 2.5]
    assert_same(S.temperature(temps)(logits, h), per_row(lambda t: tlp.TemperatureLogitsWarper(t), temps, ids, logits))
    ks = [1, 5, 20, 63]
    assert_same(S.top_k(ks)(logits, h), per_row(lambda k: tlp.TopKLogitsWarper(k), ks, ids, logits))
    ps = [0.1, 0.5, 0.9, 0.99]
    assert_same(S.top_p(ps)(logits, h), per_row(lambda p: tlp.TopPLogitsWarper(p), ps, ids, logits))
    mps = [0.0, 0.05, 0.2, 1.0]
    assert_same(S.min_p(mps)(logits, h), per_row(lambda p: tlp.MinPLogitsWarper(p), mps, ids, logits))
    tps = [0.2, 0.5, 0.9, 0.95]
    assert_same(S.typical_p(tps)(logits, h), per_row(lambda p: tlp.TypicalLogitsWarper(p), tps, ids, logits))
    # on a flatter distribution (temperature 4) the filters keep many tokens
    flat = logits / 4
    assert_same(S.top_p(ps)(flat, h), per_row(lambda p: tlp.TopPLogitsWarper(p), ps, ids, flat))
    assert_same(S.typical_p(tps)(flat, h), per_row(lambda p: tlp.TypicalLogitsWarper(p), tps, ids, flat))


@pytest.mark.parametrize("seed", range(3))
def test_parity_penalties_and_bans(seed):
    v = 64
    logits = random_logits(v=v, seed=seed)
    ids = random_ids(v=12, seed=seed)
    prompt_len = 25
    h = TokenHistory(ids[:, :prompt_len].tolist(), v)
    for col in range(prompt_len, ids.shape[1]):
        h.append(ids[:, col])
    pens = [0.5, 1.0, 1.3, 2.0]
    assert_same(S.repetition_penalty(pens)(logits, h),
                per_row(lambda p: tlp.RepetitionPenaltyLogitsProcessor(p), pens, ids, logits))
    for n in (1, 2, 3, 4):
        assert_same(S.no_repeat_ngram([n] * 4)(logits, h), tlp.NoRepeatNGramLogitsProcessor(n)(ids, logits.clone()))
    sizes = [2, 0, 3, 1]
    assert_same(S.no_repeat_ngram(sizes)(logits, h),
                per_row(lambda n: tlp.NoRepeatNGramLogitsProcessor(n) if n else (lambda i, s: s), sizes, ids, logits))
    # bad words: single tokens, an eos single token (ignored by both), sequences ending in each row's tail
    # (a word whose prefix ends a row bans its last token there)
    words = ([[5], [0], [60, 61]] + [ids[0, -k:].tolist() + [40 + k] for k in (1, 2)]
             + [ids[1, -1:].tolist() + [50], [7, 7, 7, 7, 7]])
    theirs = tlp.NoBadWordsLogitsProcessor(words, eos_token_id=0)(ids, logits.clone())
    ours = S.bad_words([tuple(map(tuple, words))] * 4, eos_ids=[0])(logits, h)
    assert_same(ours, theirs)
    assert torch.isinf(ours[0, [5, 41, 42]]).all() and torch.isinf(ours[1, [5, 50]]).all()
    mins = [0, 10, 15, 16]
    assert_same(S.min_new_tokens(mins, eos_ids=[0, 3])(logits, h),
                per_row(lambda n: tlp.MinNewTokensLengthLogitsProcessor(prompt_len, n, [0, 3]), mins, ids, logits))
    bias = {1: 2.5, 7: -3.0, 63: 100.0}
    assert_same(S.logit_bias([bias] * 4)(logits, h),
                tlp.SequenceBiasLogitsProcessor([[[k], b] for k, b in bias.items()])(ids, logits.clone()), atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_parity_full_pipeline(seed):
    """Every control at once == transformers' processors in ``_get_logits_processor``'s order."""
    v = 64
    logits = random_logits(b=1, v=v, seed=seed) / 3
    ids = random_ids(b=1, v=12, seed=seed)
    h = TokenHistory(ids[:, :30].tolist(), v)
    for col in range(30, ids.shape[1]):
        h.append(ids[:, col])
    params = SamplingParams(temperature=0.8, top_k=30, top_p=0.95, min_p=0.02, typical_p=0.97,
                            repetition_penalty=1.2, no_repeat_ngram_size=3, bad_words_ids=((5,), (9, 9)),
                            min_new_tokens=20, logit_bias={2: 1.5})
    theirs = tlp.LogitsProcessorList([
        tlp.SequenceBiasLogitsProcessor([[[2], 1.5]]),
        tlp.RepetitionPenaltyLogitsProcessor(1.2),
        tlp.NoRepeatNGramLogitsProcessor(3),
        tlp.NoBadWordsLogitsProcessor([[5], [9, 9]], eos_token_id=0),
        tlp.MinNewTokensLengthLogitsProcessor(30, 20, [0]),
        tlp.TemperatureLogitsWarper(0.8),
        tlp.TopKLogitsWarper(30),
        tlp.TopPLogitsWarper(0.95),
        tlp.MinPLogitsWarper(0.02),
        tlp.TypicalLogitsWarper(0.97),
    ])(ids, logits.clone())
    ours = apply(make_logits_processors([params], [0], v), logits, h)
    assert_same(ours, theirs)
    assert 1 < int(torch.isfinite(ours).sum()) < v


# -- validation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")),
    ("min_p", -0.1), ("min_p", 1.1),
    ("typical_p", 0.0), ("typical_p", 1.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
    ("no_repeat_ngram_size", -1), ("min_new_tokens", -1),
    ("logit_bias", {1: float("nan")}), ("logit_bias", {1: 101.0}), ("logit_bias", {-1: 1.0}), ("logit_bias", [1]),
    ("bad_words_ids", ((),)), ("bad_words_ids", (1, 2)), ("bad_words_ids", ((1, -2),)), ("bad_words_ids", "bad"),
])
def test_validation_names_the_parameter(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate(100)


def test_validation_against_the_vocabulary():
    with pytest.raises(ValueError, match="logit_bias.*100.*outside the vocabulary"):
        SamplingParams(logit_bias={100: 1.0}).validate(100)
    with pytest.raises(ValueError, match="bad_words_ids.*outside the vocabulary"):
        SamplingParams(bad_words_ids=((3, 100),)).validate(100)
    with pytest.raises(ValueError, match="top_p must be in \\(0, 1\\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="logit_bias"):
        make_logits_processors([SamplingParams(logit_bias={100: 1.0})], [], 100)


def test_params_normalise_and_stay_hashable():
    p = SamplingParams(temperature=1, top_k=3, bad_words_ids=[[1, 2], [3]], logit_bias={4: 1}).validate(10)
    assert p.temperature == 1.0 and isinstance(p.temperature, float)
    assert p.bad_words_ids == ((1, 2), (3,)) and p.logit_bias == {4: 1.0} and dict(p.logit_bias) == {4: 1.0}
    assert hash(p) == hash(SamplingParams(temperature=1.0, top_k=3, bad_words_ids=((1, 2), (3,)), logit_bias={4: 1.0}))
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.1).greedy
    assert check_temperature(0) == 0.0
    with pytest.raises(ValueError, match="temperature"):
        check_temperature(-1)


def test_factories_check_their_arguments():
    for factory, bad in [(S.temperature, [-1.0]), (S.top_k, [-2]), (S.top_p, [0.0]), (S.min_p, [2.0]),
                         (S.typical_p, [0.0]), (S.repetition_penalty, [0.0]), (S.no_repeat_ngram, [-1]),
                         (S.logit_bias, [{1: INF}]), (S.bad_words, [[[]]])]:
        with pytest.raises(ValueError):
            factory(bad)
    with pytest.raises(ValueError, match="min_new_tokens"):
        S.min_new_tokens([-1], [0])
    with pytest.raises(ValueError, match="frequency_penalty"):
        S.presence_frequency_penalty([0.0], [9.0])
    with pytest.raises(ValueError, match="built for 2"):
        S.top_k([1, 2])(torch.zeros(3, 4), history([[0]] * 3, 4))


def test_processors_do_not_modify_their_input():
    """generate.py relies on it: the raw logits are reused for logprobs after processing."""
    params = [SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.05, typical_p=0.9, repetition_penalty=1.3,
                             presence_penalty=0.5, frequency_penalty=0.5, no_repeat_ngram_size=2,
                             logit_bias={1: 2.0}, bad_words_ids=((4,), (2, 3)), min_new_tokens=5)]
    history = TokenHistory([[1, 2, 3, 2]], 10)
    history.append(torch.tensor([3]))
    logits = torch.randn(1, 10)
    before = logits.clone()
    out = apply(make_logits_processors(params, [0], 10), logits, history)
    assert torch.equal(logits, before) and not torch.equal(out, before)


def test_compiled_draw_equals_the_pytorch_draw(monkeypatch):
    """``draw`` uses prosa's C++ ``sample_rows`` when built: the same token as the PyTorch path (float64 cumsum and
    searchsorted) for every row, including rows with banned tokens and rows of a single token."""
    from prosa import quant

    if quant.kernels() is None or not hasattr(quant.kernels(), "sample_rows"):
        pytest.skip("prosa's kernels are not built")
    torch.manual_seed(0)
    for trial in range(60):
        vocab = [1, 7, 300, 50000][trial % 4]
        logits = torch.randn(6, vocab) * (1 + trial % 5)
        logits[logits < -1.5] = float("-inf")
        logits[:, 0] = torch.where(torch.isinf(logits).all(-1), torch.zeros(6), logits[:, 0])
        seeds = [trial * 10 + i for i in range(6)]
        fast = draw(logits, make_generators(seeds))
        monkeypatch.setattr(quant, "kernels", lambda: None)
        slow = draw(logits, make_generators(seeds))
        monkeypatch.undo()
        assert torch.equal(fast, slow), trial
        assert bool((logits.gather(1, fast[:, None]) > float("-inf")).all())
