"""model.py: the KV cache, the forward pass, parity with transformers, and sampling."""
import json
import os

import pytest
import torch
from hypothesis import given, strategies as st

import backtrack as B
import checkpoints as CK
import model as M
from conftest import HERE, configs, sample_as, tiny_model, uniform


@given(config=configs, seed=st.integers(0, 2**16), data=st.data())
def test_prefill_then_decode_equals_full_forward(config, seed, data):
    torch.manual_seed(seed)
    model = M.GPT(config).eval()
    n = data.draw(st.integers(2, 40))
    idx = torch.randint(0, config.vocab_size, (1, n))
    split = data.draw(st.integers(1, n - 1))
    with torch.no_grad():
        full, full_hidden = model(idx)
        cache = model.new_cache(48)
        parts = [model(idx[:, :split], cache)]
        parts += [model(idx[:, i:i + 1], cache) for i in range(split, n)]
    logits = torch.cat([p[0] for p in parts], dim=1)
    assert (logits - full).abs().max() <= 1e-5
    for layer in range(config.n_layer + 1):
        hidden = torch.cat([p[1][layer] for p in parts], dim=1)
        assert (hidden - full_hidden[layer]).abs().max() <= 1e-5
    assert cache.length == n

ops = st.lists(st.one_of(st.tuples(st.just("append"), st.integers(1, 6)),
                         st.tuples(st.just("rollback"), st.floats(0, 1))), min_size=1, max_size=12)


@given(seed=st.integers(0, 2**16), ops=ops)
def test_random_appends_and_rollbacks_match_a_fresh_forward(seed, ops):
    model = tiny_model(seed)
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(64)
    buffers = (cache.k.data_ptr(), cache.v.data_ptr())
    tokens = []
    for op, arg in ops:
        if op == "rollback":
            p = int(arg * len(tokens))
            cache.rollback(p)
            tokens = tokens[:p]
            continue
        if len(tokens) + arg > 64:
            continue
        new = torch.randint(0, model.config.vocab_size, (1, arg), generator=gen)
        with torch.no_grad():
            logits, hidden = model(new, cache)
        tokens += new[0].tolist()
        with torch.no_grad():
            fresh, fresh_hidden = model(torch.tensor([tokens]))
        assert (logits - fresh[:, -arg:]).abs().max() <= 1e-5
        assert (hidden[1] - fresh_hidden[1][:, -arg:]).abs().max() <= 1e-5
        assert (hidden[-1] - fresh_hidden[-1][:, -arg:]).abs().max() <= 1e-5
        assert cache.length == len(tokens)
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == buffers  # rollback never reallocates


def test_rollback_past_the_end_is_refused():
    cache = tiny_model().new_cache(16)
    cache.lengths[0] = 5
    with pytest.raises(ValueError):
        cache.rollback(6)
    with pytest.raises(ValueError):
        cache.rollback(-1)


def test_a_shared_prompt_continues_in_every_row_as_it_does_alone():
    """KVCache.share: row 0's prompt copied to the other rows; each row's continuation then gives the
    logits a forward of prompt + continuation gives. A length row 0 does not hold is refused."""
    model = tiny_model()
    prompt, rest = [1, 2, 3, 4], [[5, 6], [7, 8], [9, 1]]
    cache = model.new_cache(16, batch_size=3)
    with torch.no_grad():
        model(torch.tensor([prompt]), cache, "none", rows=[0])
        with pytest.raises(ValueError, match="cannot share slot 5"):
            cache.share(5)
        cache.share(4)
        assert cache.lengths == [4, 4, 4]
        logits, _ = model(torch.tensor(rest), cache)
        for row, tokens in enumerate(rest):
            alone, _ = model(torch.tensor([prompt + tokens]))
            assert (logits[row] - alone[0, -2:]).abs().max() <= 1e-5


def test_overflowing_the_context_or_the_cache_is_a_clear_error():
    model = tiny_model(n_positions=16)
    with pytest.raises(ValueError, match="exceed the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache(8)
    model(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="overflow the KV cache of 8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache)
    assert cache.length == 6  # the failed call wrote nothing
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.new_cache(17)


def test_last_and_none_logits_match_all():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        full, hidden = model(idx)
        last, _ = model(idx, which_logits="last")
        none, hidden_none = model(idx, which_logits="none")
    assert (last - full[:, -1:]).abs().max() <= 1e-6 and none is None
    assert all(torch.equal(a, b) for a, b in zip(hidden, hidden_none))


def test_packed_cpu_model_matches_the_plain_one():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        plain, plain_hidden = model(idx)
        CK.pack_for_cpu(model)
        assert any(isinstance(m, CK.PackedLinear) for m in model.modules())
        cache = model.new_cache(32)  # one row: prefill, then decode one token at a time
        packed = torch.cat([model(idx[:1, :7], cache)[0]] + [model(idx[:1, t:t + 1], cache)[0] for t in range(7, 12)], 1)
        _, packed_hidden = model(idx)  # three rows at once
    assert (packed - plain[:1]).abs().max() <= 1e-4
    assert (packed_hidden[-1] - plain_hidden[-1]).abs().max() <= 1e-4


def test_parity_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=32, n_layer=3, n_head=4)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)  # random weights, written the way Hugging Face writes them
    ours = CK.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        expected = hf(idx, output_hidden_states=True)
        logits, hidden = ours(idx)
    assert (logits - expected.logits).abs().max() <= 1e-4
    for a, b in zip(hidden, expected.hidden_states):
        assert (a - b).abs().max() <= 1e-4


GOLDEN = os.path.join(HERE, "golden")


def reference_outputs():
    with open(os.path.join(GOLDEN, "reference.json")) as f:
        return json.load(f)


def test_forward_matches_the_transformers_reference_fixture():
    """The independent oracle, also where transformers is absent: logits and every hidden state that
    transformers computed for golden/tiny-model (golden/make_reference.py), within 1e-4, with and
    without the KV cache (a prefill of 5 tokens, then one token at a time). A wrong layer-norm eps,
    GELU variant, mask offset or Conv1D orientation moves them by far more."""
    ref = reference_outputs()
    model = CK.from_pretrained(os.path.join(GOLDEN, "tiny-model"))
    ids = torch.tensor(ref["input_ids"])
    logits_ref, hidden_ref = torch.tensor(ref["logits"]), [torch.tensor(h) for h in ref["hidden_states"]]
    with torch.no_grad():
        logits, hidden = model(ids)
        cache = model.new_cache(batch_size=2)
        steps = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, ids.shape[1])]
    cached_logits = torch.cat([s[0] for s in steps], dim=1)
    cached_hidden = [torch.cat([s[1][layer] for s in steps], dim=1) for layer in range(len(hidden))]
    for got_logits, got_hidden in ((logits, hidden), (cached_logits, cached_hidden)):
        assert (got_logits - logits_ref).abs().max() <= 1e-4
        assert len(got_hidden) == len(hidden_ref)
        for a, b in zip(got_hidden, hidden_ref):
            assert (a - b).abs().max() <= 1e-4


def test_the_fixture_is_what_transformers_computes_today():
    """Where transformers is installed (CI installs it), the fixture is checked against it too."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    ref = reference_outputs()
    hf = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(GOLDEN, "tiny-model"), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor(ref["input_ids"]), output_hidden_states=True)
    assert (out.logits - torch.tensor(ref["logits"])).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------------
# sample(): next-token ids from logits


@given(seed=st.integers(0, 2**16), top_k=st.sampled_from([0, 1, 3, 2000]), top_p=st.sampled_from([1.0, 0.5, 0.9]),
       vocab=st.sampled_from([7, 3000]))
def test_sampling_respects_bans_top_k_and_top_p(seed, top_k, top_p, vocab):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=gen) * 3
    banned = {int(logits.argmax())}
    s = B.Settings(top_k=top_k, top_p=top_p)
    probs = logits.clone()
    probs[list(banned)] = float("-inf")
    probs = probs.softmax(-1)
    order = probs.argsort(descending=True)
    allowed = order[:top_k] if top_k else order
    mass_before = probs[order].cumsum(0) - probs[order]
    nucleus = set(order[mass_before < top_p].tolist())
    drawn = sample_as(s, logits.expand(200, vocab), uniform([gen] * 200), [banned] * 200)
    assert not banned & set(drawn)
    assert set(drawn) <= set(allowed.tolist()) & nucleus
    if vocab == 7 and top_k == 0 and top_p == 1.0:  # frequencies follow the distribution
        freq = torch.bincount(torch.tensor(drawn), minlength=vocab).float() / len(drawn)
        assert (freq - probs).abs().max() < 0.12


def textbook_distribution(logits, temperature, top_k, top_p):
    """What sample() must draw from, by the plain recipe: temperature, a full sort, the top-k and
    the smallest prefix holding top_p of the mass, renormalised."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True, stable=True)
    ranked = probs[order]
    keep = (ranked.cumsum(0) - ranked) < top_p
    if top_k:
        keep[top_k:] = False
    out = torch.zeros_like(probs)
    out[order[keep]] = ranked[keep]
    return out / out.sum()


@pytest.mark.parametrize("logits, temperature, top_k, top_p", [
    (torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5]), 0.5, 0, 1.0),  # temperature reshapes the distribution
    (torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5]), 2.0, 3, 1.0),
    (-torch.arange(2000.0) * 1e-3, 1.0, 0, 0.9),  # a nucleus of ~1,800 tokens, far past the first topk of 256
])
def test_sampled_frequencies_follow_the_textbook_distribution(logits, temperature, top_k, top_p):
    """4,000 rows, each with its own generator: the empirical CDF (tokens in falling probability)
    stays within 0.04 of the textbook one (a Kolmogorov-Smirnov bound well past 99.9%), and no token
    outside the nucleus is ever drawn."""
    n = 4000
    expected = textbook_distribution(logits, temperature, top_k, top_p)
    s = B.Settings(temperature=temperature, top_k=top_k, top_p=top_p)
    draws = uniform([torch.Generator().manual_seed(i) for i in range(n)])
    drawn = torch.tensor(sample_as(s, logits.expand(n, -1), draws, [()] * n))
    assert (expected[drawn] > 0).all()
    order = expected.argsort(descending=True, stable=True)
    freq = torch.bincount(drawn, minlength=len(logits)).double() / n
    assert (freq[order].cumsum(0) - expected[order].double().cumsum(0)).abs().max() < 0.04


def test_the_nucleus_stops_where_its_mass_reaches_top_p():
    """Four tokens of probability exactly 1/4 and top_p 0.5: two tokens hold the mass, not three
    (which two of the tied four is the sort's choice)."""
    n = 400
    draws = uniform([torch.Generator().manual_seed(i) for i in range(n)])
    drawn = sample_as(B.Settings(top_p=0.5), torch.zeros(n, 4), draws, [()] * n)
    assert len(set(drawn)) == 2


def test_extreme_uniform_draws_land_on_tokens_with_probability():
    """A draw of exactly 0, just below 1, or exactly 1 (which rand on some backends can return) still
    picks a token that has probability: the first or the last such token, in vocabulary order (no
    top-k or top-p) and by falling probability."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5, 1.5]])
    banned = [{0, 4}]  # probability 0: the first and the last token
    for u, plain_token, nucleus_token in ((0.0, 1, 2), (1 - 2**-24, 3, 3), (1.0, 3, 3)):
        assert sample_as(B.Settings(top_p=1.0), logits, [u], banned) == [plain_token]
        assert sample_as(B.Settings(top_p=0.999), logits, [u], banned) == [nucleus_token]


def test_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(500)
    s = B.Settings(top_p=0.9)
    a = sample_as(s, logits.expand(5, 500), uniform([torch.Generator().manual_seed(3)] * 5), [()] * 5)
    b = sample_as(s, logits.expand(5, 500), uniform([torch.Generator().manual_seed(3)] * 5), [()] * 5)
    assert a == b and len(set(a)) > 1  # one generator, five draws
    assert sample_as(B.Settings(temperature=0.0), logits[None], [0.5], [()]) == [int(logits.argmax())]
    # each row draws from its own generator: a row's token does not depend on its neighbours
    rows = torch.randn(6, 500)
    together = sample_as(s, rows, uniform([torch.Generator().manual_seed(i) for i in range(6)]), [()] * 6)
    alone = [sample_as(s, rows[i:i + 1], uniform([torch.Generator().manual_seed(i)]), [()])[0] for i in range(6)]
    assert together == alone


def test_a_temperature_too_small_to_divide_by_is_greedy():
    logits = torch.randn(3, 50) * 5
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert sample_as(B.Settings(temperature=1e-45), logits, uniform(gens), [()] * 3) == logits.argmax(-1).tolist()
    assert sample_as(B.Settings(temperature=1e-7), logits, uniform(gens), [()] * 3) == logits.argmax(-1).tolist()


@given(seed=st.integers(0, 2**16), pool=st.integers(1, 40), n_banned=st.integers(0, 40),
       temperature=st.sampled_from([0.0, 0.7, 1.0]), top_p=st.sampled_from([0.5, 0.9, 1.0]))
def test_a_pooled_draw_is_among_the_likeliest_and_never_banned(seed, pool, n_banned, temperature, top_p):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 50, generator=gen) * 3
    banned = [set(torch.randperm(50, generator=gen)[:n_banned].tolist()), set()]
    token, free = sample_as(B.Settings(temperature=temperature, top_p=top_p), logits, uniform([gen, gen]), banned, [pool, 0])
    likeliest = set(torch.topk(logits[0], pool).indices.tolist())
    if likeliest <= banned[0]:
        assert token == -1
    else:
        assert token in likeliest - banned[0]
    assert 0 <= free < 50  # a row without a pool draws as before
