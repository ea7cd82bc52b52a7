"""Detectors and probe fitting (scorer.py), and the data presets of train_probe.py."""
import json
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import checkpoints as CK
import cli
import fitting as FIT
import model as M
import detector_files as DF
import scorer as S
import train_probe as T
from conftest import HERE, SHARED, CharTokenizer, HashDetector, ScriptedDetector, needs_shared, tiny_model
from policy import level_between


def test_probe_fits_a_separable_set_to_auroc_one():
    model, enc = tiny_model(), CharTokenizer()
    rng = np.random.default_rng(0)
    words_bad, words_ok = ["zzz qqq", "qqq xxz", "xzq zzq"], ["abc deb", "bad cab", "eda bce"]
    labels = [int(x) for x in rng.integers(0, 2, 300)]
    texts = [" ".join(rng.choice(words_bad if y else words_ok, 3)) for y in labels]
    contexts = [rng.choice(texts) if rng.random() < 0.5 else None for _ in texts]
    probe, test, scores = FIT.fit_probe(model, enc, texts, labels, contexts, layers=[1, 2], window=4,
                                      target_fpr=0.05, safe_fpr=0.3)
    y = np.asarray(labels)[test]
    assert FIT.auroc(scores, y) >= 0.99 and probe.layers == [1, 2] and probe.weight.shape == (2, 16)
    assert probe.meta["metrics"]["auroc"] >= 0.99 and probe.meta["metrics"]["fpr"] <= 0.06
    assert probe.safe_level <= probe.threshold
    assert (scores[y == 0] >= probe.safe_level).mean() <= 0.31  # the safe level flags ~safe_fpr of benign texts
    assert probe.meta["fingerprint"] == CK.fingerprint(model)


def test_probe_round_trips_and_refuses_another_model(tmp_path):
    model = tiny_model()
    probe = S.LinearProbe(torch.randn(2, 16), 0.25, [1, 2], 4, 0.7, 0.6,
                          meta=dict(model="tiny", fingerprint=CK.fingerprint(model)))
    path = str(tmp_path / "probe.json")
    DF.save_probe(probe, path)
    assert os.path.getsize(path) < 4096
    loaded = DF.load_probe(path, model)
    assert torch.allclose(loaded.weight, probe.weight, atol=1e-6)
    assert (loaded.bias, loaded.layers, loaded.window, loaded.threshold, loaded.safe_level) == (0.25, [1, 2], 4, 0.7, 0.6)
    with pytest.raises(cli.UserError, match="width 16 at layers \\[1, 2\\], but .* has width 24"):
        DF.load_probe(path, tiny_model(head_dim=12))
    with pytest.raises(cli.UserError, match="fingerprint"):
        DF.load_probe(path, tiny_model(seed=1))  # same shape, other weights
    (tmp_path / "bad.json").write_text("{\"weight\": [1, 2]")
    with pytest.raises(cli.UserError, match="not a readable probe"):
        DF.load_probe(str(tmp_path / "bad.json"))
    with pytest.raises(cli.UserError, match="no such probe file"):
        DF.load_probe(str(tmp_path / "none.json"))


GOOD_PROBE = dict(layers=[1], window=2, threshold=0.3, bias=0.0, weight=[[0.1] * 16])


@pytest.mark.parametrize("change, message", [
    (dict(threshold=float("nan")), "threshold must be a probability"),
    (dict(threshold=1e9), "threshold must be a probability"),
    (dict(threshold="0.5"), "threshold must be a probability"),
    (dict(threshold=None), "threshold must be a probability"),
    (dict(threshold=1.0), "threshold must be a probability"),
    (dict(bias=float("nan")), "bias must be a finite number"),
    (dict(bias="1"), "bias must be a finite number"),
    (dict(layers=[-100]), "layers must be a list"),
    (dict(layers=[1.5]), "layers must be a list"),
    (dict(layers=["1"]), "layers must be a list"),
    (dict(layers=[7]), "layers 0..2"),
    (dict(window=0), "window must be an integer >= 1"),
    (dict(window=-3), "window must be an integer >= 1"),
    (dict(window="2"), "window must be an integer >= 1"),
    (dict(weight=[[0.1] * 4] * 4), "weight must hold 1 row"),
    (dict(weight=[[float("inf")] * 16]), "weight must hold 1 row"),
    (dict(weight=[["a"] * 16]), "weight must be a list of numbers"),
    (dict(safe_level=0.9), "safe_level 0.9 is above the threshold"),
])
def test_probe_files_are_checked_field_by_field(tmp_path, change, message):
    """A probe that would never alarm (NaN or huge threshold, NaN bias) or cannot be read is refused
    with one line, never loaded: a detector must fail closed."""
    model = tiny_model()
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(dict(GOOD_PROBE, model="tiny", fingerprint=CK.fingerprint(model), **change)))
    with pytest.raises(cli.UserError, match=message) as err:
        DF.load_probe(str(path), model)
    assert "\n" not in str(err.value)
    path.write_text(json.dumps(dict(GOOD_PROBE, model="tiny", fingerprint=CK.fingerprint(model))))
    assert DF.load_probe(str(path), model).threshold == 0.3  # the same file without the damage loads


def test_fingerprint_sees_a_change_to_any_tensor():
    """A fine-tune that touches only one attention or MLP weight (a merged LoRA) is another model."""
    model = tiny_model()
    base = CK.fingerprint(model)
    for name, param in model.named_parameters():
        kept = param.detach().clone()
        with torch.no_grad():
            param.add_(0.01)
        assert CK.fingerprint(model) != base, name
        with torch.no_grad():
            param.copy_(kept)  # bit for bit: x + 0.01 - 0.01 need not be x
    assert CK.fingerprint(model) == base
    packed = CK.pack_for_cpu(tiny_model())
    assert CK.fingerprint(packed) == base  # packing for the CPU changes no weight


def scored(detector, token, states):
    """The loop's two calls for one token: the detector's reading of its states, then its score."""
    return detector.score(token, detector.read(torch.stack([h.reshape(-1) for h in states])[None])[0])


def test_probe_score_is_the_windowed_mean_of_projections():
    probe = S.LinearProbe(torch.tensor([1.0, 0.0]), -1.0, layers=0, window=2, threshold=0.5)
    probe.start([])
    got = [scored(probe, 0, [torch.tensor([x, 5.0])]) for x in (1.0, 3.0, -3.0)]
    expect = [1 / (1 + math.exp(-(m - 1))) for m in (1.0, 2.0, 0.0)]
    assert got == pytest.approx(expect)
    # several layers: the projections of each layer add up
    two = S.LinearProbe(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 0.0, layers=[0, 1], window=1, threshold=0.5)
    two.start([])
    assert scored(two, 0, [torch.tensor([3.0, 9.0]), torch.tensor([9.0, -1.0])]) == pytest.approx(1 / (1 + math.exp(-1.0)))
    # thresholds in one unit, probability; logits only where asked for
    moved = probe.with_threshold(at_logit=probe.logit() + 2)
    assert moved.threshold == pytest.approx(1 / (1 + math.exp(-2))) and probe.threshold == 0.5


def test_a_batch_reads_each_rows_projection_in_one_product():
    """Detector.read gives a probe every row's w . h at once, equal to the row's own projection; the
    probe scores a batch's reading exactly as a row's own. Detectors of the text read nothing; a
    detector with no read of its own gets its rows' states (the protocol's default)."""
    torch.manual_seed(0)
    probe = S.LinearProbe(torch.randn(2, 8), 0.3, layers=[1, 3], window=2, threshold=0.5)
    states = torch.randn(5, 4, 8)  # 5 rows, 4 hidden states of width 8
    readings = probe.read(states)
    assert readings == pytest.approx([probe.read(states[r:r + 1])[0] for r in range(5)], abs=1e-5)
    assert readings == pytest.approx([float((states[r, [1, 3]] * probe.weight).sum()) for r in range(5)], abs=1e-5)
    by_states, by_reading = probe.clone(), probe.clone()
    by_states.start([]), by_reading.start([])
    for r in range(5):
        assert by_reading.score(0, readings[r]) == pytest.approx(scored(by_states, 0, list(states[r])), abs=1e-6)
    both = S.ProbeAndKeywords(probe, S.KeywordDetector(["darn"], CharTokenizer(vocab_size=200)))
    assert both.read(states) == readings
    assert HashDetector(0.1).read(states) == [None] * 5

    class OwnStates(ScriptedDetector):
        read = S.Detector.read
    assert all(torch.equal(got, row) for got, row in zip(OwnStates().read(states), states))


def test_keyword_detector_catches_words_split_across_tokens():
    enc = CharTokenizer(vocab_size=200)  # one character per token: every word is split
    detector = S.KeywordDetector(["darn", "heck off"], enc)

    def scores(text):
        detector.start([])
        return [detector.score(t) for t in enc.encode_ordinary(text)]
    assert scores("oh darn it") == [0] * 6 + [1.0] + [0] * 3  # fires at the "n" that completes it
    assert scores("well heck off") == [0] * 12 + [1.0]
    assert max(scores("undarned heck")) == 0  # no word boundary before "darn"
    assert max(scores("DARN")) == 1.0


@needs_shared
def test_keyword_detector_with_gpt2_tokens():
    enc = CK.load_tokenizer(os.path.join(SHARED, "gpt2"))
    detector = S.KeywordDetector(DF.load_wordlist(os.path.join(SHARED, "data", "wordlists", "ldnoobw-en.txt")), enc)
    detector.start([])
    ids = enc.encode_ordinary("you dumb bi") + enc.encode_ordinary("tch")  # "bitch" split in two tokens
    assert [detector.score(t) for t in ids] == [0.0] * (len(ids) - 1) + [1.0]


def test_the_default_word_lists_add_insults_to_the_obscene_words(tmp_path):
    """The default keywords are the union of both shipped lists: the obscene words and the insults
    aimed at a person that the obscene list leaves out (a probe trained on tweets underweights them)."""
    enc = CharTokenizer(vocab_size=200)
    detector = DF.make_detector("keywords", None, DF.WORDLISTS, enc)
    assert detector.terms.words == DF.make_detector("keywords", None, list(reversed(DF.WORDLISTS)), enc).terms.words

    def fires(text):
        detector.start([])
        return max(detector.score(t) for t in enc.encode_ordinary(text)) == 1.0
    assert fires("you are an idiot") and fires("such stupid people") and fires("shut up") and fires("morons")
    assert fires("what a bastard")  # still the obscene list's words
    assert not fires("the weather was nice today and we went to the park")
    (tmp_path / "a.txt").write_text("darn\n")
    (tmp_path / "b.txt").write_text("heck\ndarn\n")
    both = DF.make_detector("keywords", None, [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], enc)
    assert both.terms.words == S.KeywordDetector(["darn", "heck"], enc).terms.words


def test_wordlist_formats(tmp_path):
    (tmp_path / "a.txt").write_text("Foo\n\nbar baz\n")
    (tmp_path / "b.csv").write_text("text,severity\nfoo,1\nqux,2\n")
    (tmp_path / "c.json").write_text(json.dumps({"payloads": ["Zed", "foo"]}))
    (tmp_path / "d.txt").write_text("general\tArse\t1\n")
    assert DF.load_wordlist(str(tmp_path / "a.txt")) == ["bar baz", "foo"]
    assert DF.load_wordlist(str(tmp_path / "b.csv")) == ["foo", "qux"]
    assert DF.load_wordlist(str(tmp_path / "c.json")) == ["foo", "zed"]
    assert DF.load_wordlist(str(tmp_path / "d.txt")) == ["arse"]
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(cli.UserError, match="holds no terms"):
        DF.load_wordlist(str(tmp_path / "e.txt"))


def test_wordlists_with_byte_order_marks_or_bad_json_fail_closed(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfdarn\nheck\n")
    assert DF.load_wordlist(str(tmp_path / "bom.txt")) == ["darn", "heck"]  # the first term keeps matching
    (tmp_path / "utf16.txt").write_bytes("darn\nheck\n".encode("utf-16"))
    assert DF.load_wordlist(str(tmp_path / "utf16.txt")) == ["darn", "heck"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for name, content, message in [("a.json", "[1, 2, 3]", "list of strings"), ("b.json", "null", "list of strings"),
                                   ("c.json", '"darn"', "list of strings"), ("d.json", "{not json", "cannot read")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(cli.UserError, match=message):
            DF.load_wordlist(str(tmp_path / name))
    with pytest.raises(cli.UserError, match="not UTF-8, UTF-16 or UTF-32"):
        DF.load_wordlist(str(tmp_path / "latin1.txt"))


def make_detectors():
    enc = CharTokenizer()
    return [S.LinearProbe(torch.randn(16, generator=torch.Generator().manual_seed(1)), 0.1, 1, 3, 0.5),
            S.KeywordDetector(["ab", "cde"], enc),
            S.TextDetector(lambda text: text.count("a") / (1 + len(text)), enc)]


# a small alphabet (' ', a..e as CharTokenizer ids), so the word list really fires
LETTERS = [0] + [ord(c) - 32 for c in "abcde"]


@given(seed=st.integers(0, 2**16), ops=st.lists(st.one_of(st.sampled_from(LETTERS), st.floats(0, 1)), max_size=30))
def test_detector_state_rolls_back_exactly(seed, ops):
    """Any mix of scoring and rollbacks leaves a detector exactly as if it had seen only the survivors:
    the two give the same score sequence from then on."""
    gen = torch.Generator().manual_seed(seed)
    for detector, fresh in zip(make_detectors(), make_detectors()):
        detector.start([1, 2])
        kept = []  # (token, hidden) pairs on the current path
        for op in ops:
            if isinstance(op, float):
                n = int(op * len(kept))
                detector.rollback(n)
                kept = kept[:n]
            else:
                hidden = [torch.randn(16, generator=gen) for _ in range(3)]
                kept.append((op, hidden))
                scored(detector, op, hidden)
        fresh.start([1, 2])
        for token, hidden in kept:
            scored(fresh, token, hidden)
        follow = [LETTERS[(seed + i) % len(LETTERS)] for i in range(8)] + [ord(c) - 32 for c in " ab cde"]
        got, want = [], []
        for token in follow:  # the two now score every next token alike
            hidden = [torch.full((16,), float(token))] * 3
            got.append(scored(detector, token, hidden))
            want.append(scored(fresh, token, hidden))
        assert got == pytest.approx(want)
        if isinstance(detector, S.KeywordDetector):
            assert max(got) == 1.0  # " ab" at least fires: the comparison is not between two silences


def test_read_rows_counts_malformed_rows(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\nhello,1\n,0\n"fine",0\nbad,notanumber\n')
    texts, labels, malformed, _ = FIT.read_rows(str(tmp_path / "d.csv"), "text", "label", threshold=0.5)
    assert (texts, labels, malformed) == (["hello", "fine"], [1, 0], 2)
    (tmp_path / "d.jsonl").write_text('{"t": "a", "y": "OFF", "c": "p"}\nnot json\n{"t": "b", "y": "NOT", "c": 3}\n'
                                      '{"y": "OFF"}\n')
    assert FIT.read_rows(str(tmp_path / "d.jsonl"), "t", "y", positive="OFF") == (["a", "b"], [1, 0], 2, [None, None])
    # a context that is not text makes the row malformed
    assert FIT.read_rows(str(tmp_path / "d.jsonl"), "t", "y", positive="OFF", context_col="c") == (["a"], [1], 3, ["p"])
    (tmp_path / "d.tsv").write_text("id\ttweet\tlab\n1\tsay \"hi\tOFF\n")
    assert FIT.read_rows(str(tmp_path / "d.tsv"), "tweet", "lab", positive="OFF") == (['say "hi'], [1], 0, [None])
    with pytest.raises(cli.UserError, match="no column 'body'"):
        FIT.read_rows(str(tmp_path / "d.csv"), "body", "label", threshold=0.5)
    with pytest.raises(cli.UserError, match="cannot read"):
        FIT.read_rows(str(tmp_path / "missing.csv"), "text", "label", threshold=0.5)


def test_metrics_on_known_inputs():
    assert FIT.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert FIT.auroc([0.5, 0.5], [0, 1]) == 0.5  # ties count half
    m = FIT.binary_metrics([0.9, 0.2, 0.7, 0.6], [1, 0, 0, 1], threshold=0.65)
    assert (m["accuracy"], m["precision"], m["recall"], m["fpr"]) == (0.5, 0.5, 0.5, 0.5)
    # a teacher's soft labels count by their side of 0.5 (0.02 is benign), as the fit's split counts them
    assert FIT.auroc([0.1, 0.4, 0.35, 0.8], [0.02, 0.3, 0.9, 0.6]) == 0.75
    assert FIT.binary_metrics([0.9, 0.2, 0.7, 0.6], [0.97, 0.01, 0.2, 0.5], threshold=0.65) == m
    benign = np.linspace(0, 1, 101)
    t = FIT.threshold_for_fpr(benign, 0.05)
    assert (benign >= t).mean() <= 0.05 and (benign >= 0.95).mean() > 0.05 - 1e-9  # 0.95 flags 6 of 101
    assert 0.95 < t <= 0.96  # the smallest threshold that flags at most 5 of the 101 scores


@needs_shared
def test_shared_datasets_read_with_their_quirks():
    sets = T.load_datasets(list(T.DATASETS), SHARED)
    sizes = {k: len(v[0]) for k, v in sets.items()}
    assert sizes["davidson"] == 24783 and sizes["olid"] == 13240 and sizes["curated"] == 4506
    prompts = sets["rtp_train"][2]
    assert len(prompts) == sizes["rtp_train"] and all(prompts)  # RTP pairs come with their prompts
    texts, labels, _ = sets["toxigen"]
    assert not any(t.startswith("b'") for t in texts[:100])  # bytes literals decoded
    assert abs(np.mean(labels) - 0.378) < 0.01


@given(seed=st.integers(0, 2**16), window=st.integers(1, 5), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_training_statistic_equals_what_the_loop_scores(seed, window, lengths):
    """window_max (batched, used to fit and calibrate) is the max of LinearProbe.score over a text."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.zeros(len(lengths), max(lengths), 6)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        states[i, :n], mask[i, :n] = torch.randn(n, 6, generator=gen), True
    probe = S.LinearProbe(torch.randn(6, generator=gen), 0.3, layers=0, window=window, threshold=0.5)
    batched = FIT.probabilities((FIT.window_max(states @ probe.weight[0], mask, window) + probe.bias).numpy())
    for i, n in enumerate(lengths):
        probe.start([])
        token_by_token = max(scored(probe, 0, [states[i, t]]) for t in range(n))
        assert batched[i] == pytest.approx(token_by_token, rel=1e-5)


@pytest.mark.slow
def test_probe_cache_is_safe_with_concurrent_writers_and_readers(tmp_path):
    """Three processes save the same probe file over and over while this one reads it: every read
    sees a whole file (a temporary file of each writer's own, renamed into place)."""
    path = tmp_path / "probe.json"
    DF.save_probe(S.LinearProbe(torch.randn(2, 16), 0.1, [0, 1], 2, 0.5), str(path))
    code = ("import torch, scorer, detector_files; p = scorer.LinearProbe(torch.randn(2, 16), 0.1, [0, 1], 2, 0.5)\n"
            f"for _ in range(150): detector_files.save_probe(p, {str(path)!r})")
    writers = [subprocess.Popen([sys.executable, "-c", code], cwd=HERE) for _ in range(3)]
    reads = 0
    while any(w.poll() is None for w in writers):
        assert DF.load_probe(str(path)).weight.shape == (2, 16)
        reads += 1
    assert [w.returncode for w in writers] == [0, 0, 0] and reads > 10
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]


@pytest.mark.slow
def test_concurrent_first_runs_fit_the_probe_once_and_a_corrupt_cache_is_refitted(tmp_path, monkeypatch):
    model, enc = tiny_model(), CharTokenizer()
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path))
    fits = []
    real_fit = FIT.fit_automatic
    monkeypatch.setattr(FIT, "fit_automatic", lambda m, e: fits.append(1) or real_fit(m, e))
    got = []
    threads = [threading.Thread(target=lambda: got.append(FIT.probe_for(model, enc))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fits) == 1 and len(got) == 3 and len({p.threshold for p in got}) == 1
    cached = tmp_path / "probes" / f"{CK.fingerprint(model)}-{FIT.recipe()}.json"
    cached.write_text('{"threshold": NaN')  # damaged: fitted again, not an error forever
    assert FIT.probe_for(model, enc).threshold == got[0].threshold and len(fits) == 2
    cached.unlink()

    real = FIT.write_output

    def unwritable(path, text, option, *args):  # the probe and its digest, not the features
        if option.startswith("probe"):
            raise PermissionError(13, "Permission denied")
        return real(path, text, option, *args)
    monkeypatch.setattr(FIT, "write_output", unwritable)  # a read-only cache costs a warning, not the probe
    assert FIT.probe_for(model, enc).threshold == got[0].threshold and not cached.exists()


@settings(max_examples=40, deadline=None)
@given(first=st.lists(st.integers(33, 90), min_size=1, max_size=12), back=st.integers(0, 12),
       then=st.lists(st.integers(33, 90), max_size=8), seed=st.integers(0, 1000))
def test_every_detector_scores_after_a_rollback_as_a_fresh_one(first, back, then, seed):
    """The loop's contract with a detector, checked by behaviour: after start, scores of some tokens,
    a rollback to `back` of them and more scores, each detector here (and its clone) gives what a
    fresh one gives for the path as it stands, token for token."""
    back = min(back, len(first))
    enc = CharTokenizer()
    states = torch.randn(len(first) + len(then), 3, 16, generator=torch.Generator().manual_seed(seed))
    probe = S.LinearProbe(torch.randn(16, generator=torch.Generator().manual_seed(seed + 1)), 0.1, 1, 2, 0.5)
    keywords = S.KeywordDetector(["ab", "c d", "xyz"], enc)
    detectors = [probe, keywords, S.ProbeAndKeywords(probe, keywords), S.TextDetector(lambda t: len(t) / 100, enc),
                 ScriptedDetector([40, 50]), HashDetector(0.3)]

    def scores(detector, tokens, states):  # one token at a time, as the loop reads them
        return [detector.score(t, detector.read(states[i:i + 1])[0]) for i, t in enumerate(tokens)]
    for detector in detectors + [d.clone() for d in detectors]:
        detector.start([1, 2, 3], None)
        scores(detector, first, states[:len(first)])
        detector.rollback(back)
        after = scores(detector, then, states[len(first):])
        fresh = detector.clone()
        fresh.start([1, 2, 3], None)
        expected = scores(fresh, first[:back] + then, torch.cat([states[:back], states[len(first):]]))[back:]
        assert after == expected, type(detector).__name__


@given(scores=st.lists(st.sampled_from([0.0, 0.2, 0.3, 0.5, 0.9, 1.0]), min_size=2, max_size=30), data=st.data())
def test_auroc_is_the_pairwise_count_with_ties_as_one_half(scores, data):
    """Against the definition, pair by pair; few distinct scores, so ties are everywhere (the old
    code built its tie mask from sorted scores and gave [.2, .3, .2] with labels [1, 0, 0] 0.0)."""
    labels = data.draw(st.lists(st.integers(0, 1), min_size=len(scores), max_size=len(scores)))
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        assert math.isnan(FIT.auroc(scores, labels))
        return
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert FIT.auroc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert FIT.auroc([0.2, 0.3, 0.2], [1, 0, 0]) == 0.25


@given(seed=st.integers(0, 2**16), window=st.integers(1, 4), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       keep=st.integers(1, 9))
def test_the_kept_windows_are_the_windows_the_loop_scores(seed, window, lengths, keep):
    """The fit reads each text's `keep` best windows only: their states, projected, are exactly the
    window_means at those positions, and the best of them is the text's window_max."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.zeros(len(lengths), max(lengths), 5)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        states[i, :n], mask[i, :n] = torch.randn(n, 5, generator=gen), True
    w = torch.randn(5, generator=gen)
    means = FIT.window_means(states @ w, mask, window)
    top = means.topk(min(keep, mask.shape[1]), 1).indices
    kept = FIT.windowed_states(states, top, window) @ w
    valid = mask.gather(1, top)
    assert torch.allclose(kept[valid], means.gather(1, top)[valid], atol=1e-5)
    assert torch.allclose(kept.masked_fill(~valid, float("-inf")).max(1).values, FIT.window_max(states @ w, mask, window),
                          atol=1e-5)


@given(seed=st.integers(0, 2**16), window=st.integers(1, 4), n=st.integers(1, 9))
def test_a_probe_scores_a_prompt_as_if_the_model_had_written_it(seed, window, n):
    """start() returns the prompt's highest windowed score: what score() would have reached over the
    prompt's tokens, in the windows that leave out its first token (None if there is none); the
    generation's own state starts empty all the same."""
    gen = torch.Generator().manual_seed(seed)
    probe = S.LinearProbe(torch.randn(2, 6, generator=gen), 0.2, [0, 2], window, 0.5)
    hidden = [torch.randn(n, 6, generator=gen) for _ in range(3)]
    probe.start([])
    scores = [scored(probe, 0, [h[t] for h in hidden]) for t in range(n)]
    verdict = probe.start(list(range(n)), hidden)
    if n <= window:
        assert verdict is None
    else:
        assert verdict == pytest.approx(max(scores[window:]), rel=1e-6)
    assert probe.projections.length == 0
    assert probe.start([1, 2]) is None  # no hidden states: no verdict on the prompt


def test_a_word_list_flags_a_prompt_that_holds_a_listed_word():
    enc = CharTokenizer()
    keywords = S.KeywordDetector(["darn"], enc)
    assert keywords.start(enc.encode_ordinary("oh darn it")) == 1.0
    assert keywords.start(enc.encode_ordinary("undarned")) == 0.0
    both = S.ProbeAndKeywords(S.LinearProbe(torch.zeros(16), -5.0, 1, 2, 0.5), keywords)
    hidden = [torch.zeros(3, 16)] * 3
    assert both.start(enc.encode_ordinary("darn"), hidden) == 1.0
    assert both.start(enc.encode_ordinary("abc"), hidden) == pytest.approx(1 / (1 + math.exp(5)))


@pytest.mark.parametrize("low, high, share, expected", [
    (0.2, 0.5, 0.0, 0.2), (0.2, 0.5, 1.0, 0.5), (0.5, 0.5, 0.25, 0.5), (0.5, 1.0, 0.25, 0.5), (0.5, 1.0, 1.0, 1.0),
    (0.2, 0.5, 0.5, 1 / (1 + math.exp(math.log(4) / 2))),  # logit 0.2 = -log 4, logit 0.5 = 0: halfway is -log(4)/2
])
def test_the_redraw_level_lies_between_the_safe_level_and_the_threshold_in_logits(low, high, share, expected):
    assert level_between(low, high, share) == pytest.approx(expected)


@given(terms=st.lists(st.text(alphabet="ab c-", min_size=1, max_size=5), min_size=1, max_size=8),
       text=st.text(alphabet="ab c-.x", max_size=30))
def test_the_term_index_finds_what_the_pattern_of_its_terms_finds(terms, text):
    """Terms.matches is the word-boundary pattern of the terms, longest first, scanned left to right
    (what the detector used to compile): the same matches, in order, on any text."""
    import re
    words = "|".join(re.escape(t) for t in sorted(set(terms), key=len, reverse=True))
    pattern = re.compile(rf"(?<![a-z0-9])(?:{words})(?![a-z0-9])")
    assert [(m.start(), m.end(), m.group()) for m in pattern.finditer(text)] == list(S.Terms(set(terms)).matches(text))


def test_a_large_word_list_is_ready_in_seconds():
    """A 9.5 MB word list took 31 s and 1.5 GB to compile into one pattern; as an index it is ready at
    once, and a token costs what it costs with the shipped lists."""
    import random
    import string
    import time
    rng = random.Random(0)
    terms = {"".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 14))) for _ in range(700000)}
    started = time.perf_counter()
    detector = S.KeywordDetector(terms | {"darn"}, CharTokenizer(vocab_size=200))
    assert time.perf_counter() - started < 10
    detector.start([])
    assert max(detector.score(ord(c) - 32) for c in "well, darn it") == 1.0


def random_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = [int(x) for x in rng.integers(0, 2, n)]
    texts = ["".join(rng.choice(list("zqx" if y else "abe"), int(rng.integers(1, 40)))) for y in labels]
    contexts = [rng.choice(texts) if rng.random() < 0.5 else None for _ in texts]
    return texts, labels, contexts


def test_features_in_chunks_on_disk_are_the_features_in_memory_and_a_fit_resumes(tmp_path, monkeypatch):
    """Features written chunk by chunk to a directory read back as the ones held in memory; a chunk
    that is missing, corrupt or a link is computed again and no other; and the fit over them, chunk
    by chunk, is the same fit whatever the chunk size."""
    model, enc = tiny_model(), CharTokenizer()
    texts, labels, contexts = random_texts(50)
    monkeypatch.setattr(FIT, "CHUNK", 8)
    held = FIT.Features(model, enc, texts, contexts, [0, 2])
    told = []  # what the fit would announce: the share of tokens still to compute
    on_disk = FIT.Features(model, enc, texts, contexts, [0, 2], directory=str(tmp_path / "f"), announce=told.append)
    chunks = sorted(os.listdir(tmp_path / "f"))
    assert len(chunks) == 7 and held.count == on_disk.count == 50
    pooled = held.map(FIT.mean_pooled)
    assert torch.equal(pooled, on_disk.map(FIT.mean_pooled)) and pooled.shape == (50, 2 * model.config.n_embd)
    rows = np.array([7, 3, 41, 0])
    assert torch.equal(held.map(FIT.mean_pooled, rows), pooled[rows])  # in the order asked for

    os.remove(tmp_path / "f" / chunks[1])
    (tmp_path / "f" / chunks[2]).write_bytes(b"not a chunk")
    os.remove(tmp_path / "f" / chunks[3])
    os.symlink(tmp_path / "f" / chunks[4], tmp_path / "f" / chunks[3])
    forwards = []
    real_forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: forwards.append(1) or real_forward(self, *a, **k))
    again = FIT.Features(model, enc, texts, contexts, [0, 2], directory=str(tmp_path / "f"), announce=told.append)
    encoded = FIT.encode_texts(enc, texts, contexts, model.config.n_positions)
    redone = sum(len(encoded[i][0]) for c in (1, 2, 3) for i in on_disk.parts[c])
    assert told == [1.0, redone / sum(len(ids) for ids, _ in encoded)] and 0 < told[1] < 0.5  # what is left, not all
    assert len(forwards) == 3  # three chunks of 8 texts, one batch each: the other four were read
    assert torch.equal(again.map(FIT.mean_pooled), pooled) and not os.path.islink(tmp_path / "f" / chunks[3])

    y = np.asarray(labels)
    w_small, b_small = FIT.fit_probe_weights(held, y, 2, 0.1, steps=30)
    monkeypatch.setattr(FIT, "CHUNK", 256)
    whole = FIT.Features(model, enc, texts, contexts, [0, 2])
    w_whole, b_whole = FIT.fit_probe_weights(whole, y, 2, 0.1, steps=30)
    # Batches of other sizes round the hidden states differently in the last bits (how much depends on
    # the CPU's kernels), and L-BFGS may carry that to weights 0.03 apart: what is guaranteed is that
    # the features agree to float noise and both fits are equally good, not that they took one path.
    assert torch.allclose(whole.map(FIT.mean_pooled), pooled, atol=1e-4)

    def probe_logits(w, b):
        return whole.map(lambda states, mask: FIT.window_max(states @ w, mask, 2)) + b
    small, large = probe_logits(w_small, b_small), probe_logits(w_whole, b_whole)
    loss_small, loss_large = (float(FIT.balanced_bce(z, torch.as_tensor(y, dtype=torch.float32))) for z in (small, large))
    assert loss_small == pytest.approx(loss_large, rel=0.02, abs=1e-3)
    assert (torch.sigmoid(small) - torch.sigmoid(large)).abs().max() <= 0.05
    assert FIT.auroc(small.numpy(), y) == pytest.approx(FIT.auroc(large.numpy(), y), abs=0.02)
    again.remove()
    assert not (tmp_path / "f").exists()


def test_an_interrupted_first_fit_resumes_from_its_features_and_ends_with_the_same_probe(tmp_path, monkeypatch):
    model, enc = tiny_model(), CharTokenizer()
    texts, labels, contexts = random_texts(120, seed=1)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(dict(text=t, toxic=y)) + "\n" for t, y in zip(texts, labels)))
    monkeypatch.setattr(FIT, "SHIPPED_DATA", {"curated": (str(data), "text", "toxic", {"positive": "1"})})
    monkeypatch.setattr(FIT, "CALIBRATION", ("curated",))
    monkeypatch.setattr(FIT, "CHUNK", 16)
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    uninterrupted = FIT.fit_automatic(model, enc, ("curated",), cached=False)
    features = tmp_path / "cache" / "features" / f"{CK.fingerprint(model)}-{FIT.recipe()}"
    real_forward, forwards, resuming = type(model).forward, [], False

    class Killed(BaseException):
        """As a kill: nothing the fit does catches it."""

    def dies_at_the_fifth_batch(self, *a, **k):
        forwards.append(1)
        if len(forwards) == 5 and not resuming:
            raise Killed
        return real_forward(self, *a, **k)
    monkeypatch.setattr(type(model), "forward", dies_at_the_fifth_batch)
    with pytest.raises(Killed):
        FIT.fit_automatic(model, enc, ("curated",))
    assert len(os.listdir(features)) == 2  # fit_estimate's two passes, then two chunks were written
    forwards.clear()
    resuming = True
    resumed = FIT.fit_automatic(model, enc, ("curated",))
    # 8 chunks of 16 texts, one batch each: the 6 not written are computed now (fit_estimate's 2 aside)
    assert len(forwards) == 2 + 6 and not features.exists()
    assert torch.equal(resumed.weight, uninterrupted.weight) and resumed.threshold == uninterrupted.threshold


class Sized:
    def __init__(self, n_layer, n_embd):
        self.config = M.GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=1)


def test_the_first_run_reads_all_texts_of_a_small_model_and_a_share_of_each_set_of_a_big_one():
    origin = np.array(["a"] * 6000 + ["b"] * 3000 + ["c"] * 1000)
    tokens = np.full(len(origin), 35)
    small = FIT.texts_within_budget(Sized(6, 384), tokens, origin)  # the stand-in's size
    assert np.array_equal(small, np.arange(len(origin)))
    base = FIT.texts_within_budget(Sized(12, 768), tokens, origin)  # gpt2's
    expected = FIT.FIT_BUDGET / (12 * 12 * 768**2 * 35)
    assert abs(len(base) - expected) <= 3 and np.all(np.diff(base) > 0)
    assert [np.sum(origin[base] == k) / len(base) for k in "abc"] == pytest.approx([0.6, 0.3, 0.1], abs=0.01)
    assert np.array_equal(base, FIT.texts_within_budget(Sized(12, 768), tokens, origin))  # the same every run
    assert abs(len(FIT.texts_within_budget(Sized(48, 1600), tokens, origin)) - FIT.MIN_TEXTS) <= 3  # gpt2-xl's


@pytest.mark.parametrize("n_layer, expected", [(1, [0, 1]), (6, [0, 1, 2, 3, 4, 5, 6]), (12, [0, 2, 4, 6, 8, 10, 12]),
                                               (48, [0, 8, 16, 24, 32, 40, 48]), (36, [0, 6, 12, 18, 24, 30, 36])])
def test_a_probe_reads_at_most_seven_evenly_spaced_hidden_states(n_layer, expected):
    assert FIT.default_layers(Sized(n_layer, 8)) == expected
