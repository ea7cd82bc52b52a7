"""batched.py: every row of a batch is what generate() gives for that prompt alone."""
import random
from dataclasses import replace

import pytest
import torch
from hypothesis import given, strategies as st

import backtrack as B
import scorer as S
from batched import generate_batch
from conftest import CharTokenizer, HashDetector, tiny_model
from policy import Classic, Tuned

WORDS = ["hello", "the cat", "a", "once upon a time", "xyz", "we went to the sea and then"]


def alone(model, enc, prompt, detector, s, seed):
    return B.generate(model, enc, prompt, detector.clone() if detector else None, replace(s, seed=seed))


def same_run(a, b):
    assert a.tokens == b.tokens and a.text == b.text and a.stop_reason == b.stop_reason
    assert [{k: e[k] for k in ("type", "index", "banned") if k in e} for e in a.events] == \
           [{k: e[k] for k in ("type", "index", "banned") if k in e} for e in b.events]
    assert [(x["index"], x["token"], x["alarm"], x["committed"]) for x in a.steps] == \
           [(x["index"], x["token"], x["alarm"], x["committed"]) for x in b.steps]
    assert a.context == b.context
    for x, y in zip(a.scores, b.scores):
        assert (x is None and y is None) or abs(x - y) <= 1e-5
    for key in ("tokens_generated", "tokens_kept", "forward_passes", "rollbacks", "avg_wait_tokens"):
        assert a.stats[key] == b.stats[key], key


@given(seed=st.integers(0, 2**16), n_prompts=st.integers(1, 10), batch_size=st.integers(1, 8),
       buffer=st.integers(0, 4), rate=st.sampled_from([0.0, 0.1, 0.3, 0.6]),
       introspect=st.sampled_from(["none", "template", "critique"]), temperature=st.sampled_from([0.0, 1.0]),
       max_retries=st.integers(0, 3), max_rollbacks=st.integers(0, 8), redraw_pool=st.sampled_from([0, 4]),
       vigilance=st.sampled_from([0.0, 1.0]), flag_margin=st.sampled_from([0.0, 1.0]),
       safe_level=st.sampled_from([None, 0.2]), redraw_gate=st.sampled_from([0.0, 0.375, 1.0]))
def test_each_row_equals_generate_alone(seed, n_prompts, batch_size, buffer, rate, introspect, temperature,
                                        max_retries, max_rollbacks, redraw_pool, vigilance, flag_margin, safe_level,
                                        redraw_gate):
    """Mixed prompt lengths, random buffers, notes, budgets, redraws and alarm schedules; more
    prompts than rows, so finished rows take new prompts (continuous batching)."""
    model = tiny_model(seed % 5, n_positions=128)
    enc = CharTokenizer()
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(n_prompts)]
    seeds = [rng.randrange(2**31) for _ in prompts]
    s = B.Settings(max_new_tokens=rng.randint(1, 20), buffer=buffer, introspect=introspect, temperature=temperature,
                   max_retries=max_retries, max_rollbacks=max_rollbacks, safe_level=safe_level, template=" (be nice) ",
                   stop_at_eos=rng.random() < 0.5,
                   policy=Tuned(redraw_pool=redraw_pool, vigilance=vigilance, flag_margin=flag_margin,
                                redraw_gate=redraw_gate) if redraw_pool else Classic())
    detector = HashDetector(rate) if rate else None
    results = generate_batch(model, enc, prompts, detector, s, seeds=seeds, batch_size=batch_size)
    for prompt, seed_i, got in zip(prompts, seeds, results):
        same_run(got, alone(model, enc, prompt, detector, s, seed_i))


def test_results_come_back_in_order_and_each_is_reported():
    model, enc = tiny_model(n_positions=128), CharTokenizer()
    prompts = ["a", "bb bb bb", "c", "dd dd", "e e e e e"]
    seen = []
    results = generate_batch(model, enc, prompts, HashDetector(0.3), B.Settings(max_new_tokens=8), seeds=range(5),
                             batch_size=2, on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(5)) and all(r is not None for r in results)
    assert [r.stats["prompt_tokens"] for r in results] == [len(p) for p in prompts]


@given(seed=st.integers(0, 2**16), ops=st.lists(st.tuples(st.sampled_from(["append", "rollback"]),
                                                       st.integers(0, 3), st.integers(1, 5), st.floats(0, 1)),
                                             min_size=1, max_size=15))
def test_batched_cache_equals_a_fresh_forward_per_row(seed, ops):
    """Rows of one cache at different lengths, appended to in groups and rolled back one by one:
    each row's logits and cache always equal a fresh forward of that row's tokens alone."""
    model = tiny_model(seed % 3, n_positions=64)
    cache = model.new_cache(batch_size=4)
    gen = torch.Generator().manual_seed(seed)
    tokens = [[] for _ in range(4)]
    for op, row, n, frac in ops:
        if op == "rollback":
            keep = int(frac * len(tokens[row]))
            cache.rollback(keep, row)
            tokens[row] = tokens[row][:keep]
            continue
        rows = sorted({row, (row + 1 + int(frac * 3)) % 4}) if frac > 0.3 else [row]
        if any(len(tokens[r]) + n > 64 for r in rows):
            continue
        new = torch.randint(0, model.config.vocab_size, (len(rows), n), generator=gen)
        with torch.no_grad():
            logits, hidden = model(new, cache, rows=rows)
        for j, r in enumerate(rows):
            tokens[r] += new[j].tolist()
            with torch.no_grad():
                fresh, fresh_hidden = model(torch.tensor([tokens[r]]))
            assert (logits[j] - fresh[0, -n:]).abs().max() <= 1e-5
            assert (hidden[-1][j] - fresh_hidden[-1][0, -n:]).abs().max() <= 1e-5
            assert cache.lengths[r] == len(tokens[r])
    with torch.no_grad():  # all rows at once, rows=None: every row at its own length
        if all(0 < len(t) < 64 for t in tokens):
            logits, _ = model(torch.full((4, 1), 5), cache)
            for r in range(4):
                fresh, _ = model(torch.tensor([tokens[r] + [5]]))
                assert (logits[r, -1] - fresh[0, -1]).abs().max() <= 1e-5


def test_rows_with_a_probe_that_judges_prompts_equal_generate_alone():
    """The batched prefill hands each row its own prompt's hidden states (not the padding): a probe's
    verdict on the prompt, and so the vigilance, is the same as alone."""
    model, enc = tiny_model(2, n_positions=128), CharTokenizer()
    probe = S.LinearProbe(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), 0.0, [0, 1, 2], 2, 0.6, 0.4)
    prompts = ["a", "the cat sat on the mat", "xyz xyz", "once upon a time"]
    s = B.Settings(max_new_tokens=10, temperature=0.0, max_retries=1,
                   policy=Tuned(flag_margin=0.0, vigilance=1.0, redraw_pool=4))
    batched = generate_batch(model, enc, prompts, probe, s, seeds=range(4), batch_size=3)
    for i, (prompt, got) in enumerate(zip(prompts, batched)):
        same_run(got, alone(model, enc, prompt, probe, s, i))
        assert got.threshold == pytest.approx(alone(model, enc, prompt, probe, s, i).threshold)
    assert len({r.stats["vigilant"] for r in batched}) == 2  # some prompts flagged, some not
