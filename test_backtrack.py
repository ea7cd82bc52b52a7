"""Tests: python -m pytest -q   (offline; tiny random models; ../shared assets skip when absent)."""
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import model as M

# CI gets a fixed, derandomised set of examples so a red run is a real bug; locally, set
# HYPOTHESIS_PROFILE=explore to search more widely.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("BACKTRACK_SHARED", os.path.join(HERE, "..", "shared"))
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"{SHARED} (local assets) is absent")
torch.set_num_threads(1)  # tiny models: threads only add overhead


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Probes fitted during the tests are cached here, never in the user's ~/.cache/backtrack."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BACKTRACK_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def tiny_config(n_layer=2, n_head=2, head_dim=8, vocab_size=97, n_positions=64):
    return M.GPTConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_head * head_dim,
                       n_layer=n_layer, n_head=n_head)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = M.GPT(tiny_config(**kw)).eval()
    with torch.no_grad():  # GPT-2-like scale, so logits are not all near zero
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


configs = st.builds(tiny_config, n_layer=st.integers(1, 3), n_head=st.integers(1, 3),
                    head_dim=st.sampled_from([4, 8]), vocab_size=st.integers(5, 80))


def save_hf_checkpoint(model, directory, fmt="safetensors"):
    """Write `model` in Hugging Face GPT-2 layout: Conv1D weights [in, out], transformer. prefix."""
    os.makedirs(directory, exist_ok=True)
    c = model.config
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(model_type="gpt2", vocab_size=c.vocab_size, n_positions=c.n_positions,
                       n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                       activation_function=c.activation_function), f)
    state = {"transformer." + k: (v.t() if k.endswith(M.CONV1D) else v).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, os.path.join(directory, "model.safetensors"))
    else:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    return directory


# ----------------------------------------------------------------------------------------------
# model.py: the cache


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
    cache.length = 5
    with pytest.raises(ValueError):
        cache.rollback(6)
    with pytest.raises(ValueError):
        cache.rollback(-1)


def test_overflowing_the_context_or_the_cache_is_a_clear_error():
    model = tiny_model(n_positions=16)
    with pytest.raises(M.UserError, match="exceed the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache(8)
    model(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(M.UserError, match="overflow the KV cache of 8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache)
    assert cache.length == 6  # the failed call wrote nothing
    with pytest.raises(M.UserError, match="exceeds the model's context"):
        model.new_cache(17)


def test_last_and_none_logits_match_all():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        full, hidden = model(idx)
        last, _ = model(idx, logits="last")
        none, hidden_none = model(idx, logits="none")
    assert (last - full[:, -1:]).abs().max() <= 1e-6 and none is None
    assert all(torch.equal(a, b) for a, b in zip(hidden, hidden_none))


def test_packed_cpu_model_matches_the_plain_one():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        plain, plain_hidden = model(idx)
        model.pack_for_cpu()
        assert any(isinstance(m, M.PackedLinear) for m in model.modules())
        cache = model.new_cache(32)
        packed = torch.cat([model(idx[:, :7], cache)[0], model(idx[:, 7:], cache)[0]], dim=1)
        _, packed_hidden = model(idx)
    assert (packed - plain).abs().max() <= 1e-4
    assert (packed_hidden[-1] - plain_hidden[-1]).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------------
# model.py: loading


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_round_trips_a_hugging_face_directory(tmp_path, fmt):
    model = tiny_model()
    loaded = M.from_pretrained(save_hf_checkpoint(model, str(tmp_path), fmt))
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert loaded.lm_head.weight is loaded.wte.weight


def test_parity_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=32, n_layer=3, n_head=4)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)  # random weights, written the way Hugging Face writes them
    ours = M.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        expected = hf(idx, output_hidden_states=True)
        logits, hidden = ours(idx)
    assert (logits - expected.logits).abs().max() <= 1e-4
    for a, b in zip(hidden, expected.hidden_states):
        assert (a - b).abs().max() <= 1e-4


def edit_safetensors(directory, change):
    from safetensors.torch import load_file, save_file
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    change(state)
    save_file(state, path)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"), "missing tensor 'h.1.mlp.c_fc.bias'"),
    (lambda s: s.update({"transformer.wpe.weight": torch.zeros(10, 16)}),
     r"tensor 'wpe.weight' has shape \(10, 16\), the config needs \(64, 16\)"),
    (lambda s: s.update({"transformer.h.0.extra.weight": torch.zeros(3)}), "unexpected tensor 'h.0.extra.weight'"),
])
def test_damaged_checkpoints_give_one_line_errors(tmp_path, damage, message):
    directory = save_hf_checkpoint(tiny_model(), str(tmp_path))
    edit_safetensors(directory, damage)
    with pytest.raises(M.UserError, match=message) as err:
        M.from_pretrained(directory)
    assert "\n" not in str(err.value) and "model.safetensors" in str(err.value)


@pytest.mark.parametrize("fmt, name", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_truncated_weights_give_one_line_error(tmp_path, fmt, name):
    directory = save_hf_checkpoint(tiny_model(), str(tmp_path), fmt)
    path = os.path.join(directory, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(M.UserError, match=f"{name}: cannot read the weights .*truncated or corrupt") as err:
        M.from_pretrained(directory)
    assert "\n" not in str(err.value)


def test_missing_files_and_unknown_names(tmp_path):
    with pytest.raises(M.UserError, match="neither a directory nor a known model"):
        M.from_pretrained("not-a-model")
    with pytest.raises(M.UserError, match="no config.json"):
        M.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 1, "n_head": 1, "n_embd": 8}))
    with pytest.raises(M.UserError, match="no model.safetensors or pytorch_model.bin"):
        M.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(M.UserError, match="cannot read the model config"):
        M.from_pretrained(str(tmp_path))


def test_hub_names_download_into_the_cache(tmp_path, monkeypatch):
    """A Hub name fetches four files once, with no network: urlopen is replaced by a local server."""
    source = save_hf_checkpoint(tiny_model(), str(tmp_path / "hub"))
    (tmp_path / "hub" / "vocab.json").write_text("{}")
    (tmp_path / "hub" / "merges.txt").write_text("#version: 0.2\n")
    fetched = []

    class Response:
        def __init__(self, url):
            fetched.append(url)
            self.body = open(os.path.join(source, url.rsplit("/", 1)[1]), "rb")
            self.headers = {"Content-Length": str(os.path.getsize(self.body.name))}

        def read(self, n):
            return self.body.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.body.close()

    monkeypatch.setattr(M.urllib.request, "urlopen", Response)
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    model = M.from_pretrained("gpt2")
    assert model.config.n_embd == 16 and len(fetched) == 4
    assert fetched[0] == "https://huggingface.co/openai-community/gpt2/resolve/main/config.json"
    M.from_pretrained("gpt2")
    assert len(fetched) == 4  # cached


@needs_shared
def test_tokenizer_builds_offline_from_vocabulary_files():
    for directory in ("gpt2", os.path.join("models", "minigpt2")):  # encoder.json+vocab.bpe; vocab.json+merges.txt
        enc = M.load_tokenizer(os.path.join(SHARED, directory))
        assert enc.encode("Hello world") == [15496, 995]
        assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
        assert enc.n_vocab == 50257


@needs_shared
def test_local_model_loads_and_matches_transformers():
    """Properties, not one version's shape: the config agrees with the weights, the model is a
    sensible language model, and (with transformers) the logits equal the reference's."""
    directory = os.path.join(SHARED, "models", "minigpt2")
    ours = M.from_pretrained(directory)
    c = ours.config
    assert c.n_embd % c.n_head == 0 and ours.wte.weight.shape == (c.vocab_size, c.n_embd)
    assert ours.wpe.weight.shape == (c.n_positions, c.n_embd) and len(ours.h) == c.n_layer
    assert ours.wte.weight.dtype == torch.float32  # float16 on disk, upcast on load
    idx = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290]])  # "The quick brown fox jumps..."
    with torch.no_grad():
        logits = ours(idx)[0]
    assert torch.isfinite(logits).all()
    # a trained model predicts " over" after "The quick brown fox jumps" far better than uniform
    assert logits[0, 4].log_softmax(-1)[625] > -math.log(c.vocab_size) + 2
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (logits - hf(idx).logits).abs().max() <= 1e-4


def test_device_and_dtype_choices():
    assert M.pick_device("cpu") == "cpu"
    assert M.pick_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(M.UserError, match="unknown device 'tpu'"):
        M.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(M.UserError, match="no CUDA GPU"):
            M.pick_device("cuda")
    assert M.pick_dtype("float32", "cpu") is torch.float32
    assert M.pick_dtype("bfloat16", "cuda") is torch.bfloat16
    with pytest.raises(M.UserError, match="on the CPU use float32"):
        M.pick_dtype("float16", "cpu")


# ----------------------------------------------------------------------------------------------
# Detectors: scorer.py and train_probe.py

import numpy as np  # noqa: E402

import backtrack as B  # noqa: E402
import scorer as S  # noqa: E402
import train_probe as T  # noqa: E402


class CharTokenizer:
    """A tokenizer for tiny models: one token per printable ASCII character (id = code - 32);
    the last id is end-of-text."""

    def __init__(self, vocab_size=97):
        self.n, self.eot_token = vocab_size - 1, vocab_size - 1

    def encode_ordinary(self, text):
        return [ord(c) - 32 if 32 <= ord(c) < 32 + self.n else ord("?") - 32 for c in text]

    def decode_single_token_bytes(self, token):
        return b"" if token == self.eot_token else chr(token + 32).encode()

    def decode(self, tokens):
        return b"".join(self.decode_single_token_bytes(t) for t in tokens).decode()


def test_probe_fits_a_separable_set_to_auroc_one():
    model, enc = tiny_model(), CharTokenizer()
    rng = np.random.default_rng(0)
    words_bad, words_ok = ["zzz qqq", "qqq xxz", "xzq zzq"], ["abc deb", "bad cab", "eda bce"]
    labels = [int(x) for x in rng.integers(0, 2, 300)]
    texts = [" ".join(rng.choice(words_bad if y else words_ok, 3)) for y in labels]
    probe, test, scores = T.fit_probe(model, enc, texts, labels, layer=2, window=4, context_share=0.5)
    y = np.asarray(labels)[test]
    assert T.auroc(scores, y) >= 0.99
    assert probe.meta["metrics"]["auroc"] >= 0.99 and probe.meta["metrics"]["fpr"] <= 0.06
    assert probe.meta["fingerprint"] == S.model_fingerprint(model)


def test_probe_round_trips_and_refuses_another_model(tmp_path):
    model = tiny_model()
    probe = S.LinearProbe(torch.randn(16), 0.25, 2, 4, 0.7, meta=dict(model="tiny", fingerprint=S.model_fingerprint(model)))
    path = str(tmp_path / "probe.json")
    probe.save(path)
    assert os.path.getsize(path) < 4096
    loaded = S.LinearProbe.load(path, model)
    assert torch.allclose(loaded.weight, probe.weight, atol=1e-6)
    assert (loaded.bias, loaded.layer, loaded.window, loaded.threshold) == (0.25, 2, 4, 0.7)
    with pytest.raises(M.UserError, match="was fitted on tiny .*n_embd 16.* not on .*n_embd 24"):
        S.LinearProbe.load(path, tiny_model(head_dim=12))
    with pytest.raises(M.UserError, match="fingerprint"):
        S.LinearProbe.load(path, tiny_model(seed=1))  # same shape, other weights
    (tmp_path / "bad.json").write_text("{\"weight\": [1, 2]")
    with pytest.raises(M.UserError, match="not a readable probe"):
        S.LinearProbe.load(str(tmp_path / "bad.json"))


def test_probe_score_is_the_windowed_mean_of_projections():
    probe = S.LinearProbe(torch.tensor([1.0, 0.0]), -1.0, layer=0, window=2, threshold=0.5)
    probe.start([])
    got = [probe.score(0, [torch.tensor([x, 5.0])]) for x in (1.0, 3.0, -3.0)]
    expect = [1 / (1 + math.exp(-(m - 1))) for m in (1.0, 2.0, 0.0)]
    assert got == pytest.approx(expect)


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
    enc = M.load_tokenizer(os.path.join(SHARED, "gpt2"))
    detector = S.KeywordDetector(S.load_wordlist(os.path.join(SHARED, "data", "wordlists", "ldnoobw-en.txt")), enc)
    detector.start([])
    ids = enc.encode_ordinary("you dumb bi") + enc.encode_ordinary("tch")  # "bitch" split in two tokens
    assert [detector.score(t) for t in ids] == [0.0] * (len(ids) - 1) + [1.0]


def test_wordlist_formats(tmp_path):
    (tmp_path / "a.txt").write_text("Foo\n\nbar baz\n")
    (tmp_path / "b.csv").write_text("text,severity\nfoo,1\nqux,2\n")
    (tmp_path / "c.json").write_text(json.dumps({"payloads": ["Zed", "foo"]}))
    (tmp_path / "d.txt").write_text("general\tArse\t1\n")
    assert S.load_wordlist(str(tmp_path / "a.txt")) == ["bar baz", "foo"]
    assert S.load_wordlist(str(tmp_path / "b.csv")) == ["foo", "qux"]
    assert S.load_wordlist(str(tmp_path / "c.json")) == ["foo", "zed"]
    assert S.load_wordlist(str(tmp_path / "d.txt")) == ["arse"]
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(M.UserError, match="empty"):
        S.load_wordlist(str(tmp_path / "e.txt"))


def make_detectors():
    enc = CharTokenizer()
    return [S.LinearProbe(torch.randn(16, generator=torch.Generator().manual_seed(1)), 0.1, 1, 3, 0.5),
            S.KeywordDetector(["ab", "cde"], enc),
            S.TextDetector(lambda text: text.count("a") / (1 + len(text)), enc)]


@given(seed=st.integers(0, 2**16), ops=st.lists(st.one_of(st.integers(0, 96), st.floats(0, 1)), max_size=30))
def test_detector_state_rolls_back_exactly(seed, ops):
    """Any mix of scoring and rollbacks leaves a detector exactly as if it had seen only the survivors."""
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
                detector.score(op, hidden)
        fresh.start([1, 2])
        for token, hidden in kept:
            fresh.score(token, hidden)
        for token in (0, 1, 2):  # the two now score every next token alike
            hidden = [torch.full((16,), float(token))] * 3
            assert detector.score(token, hidden) == pytest.approx(fresh.score(token, hidden))


def test_read_rows_counts_malformed_rows(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\nhello,1\n,0\n"fine",0\nbad,notanumber\n')
    texts, labels, malformed = T.read_rows(str(tmp_path / "d.csv"), "text", "label", threshold=0.5)
    assert (texts, labels, malformed) == (["hello", "fine"], [1, 0], 2)
    (tmp_path / "d.jsonl").write_text('{"t": "a", "y": "OFF"}\nnot json\n{"t": "b", "y": "NOT"}\n{"y": "OFF"}\n')
    assert T.read_rows(str(tmp_path / "d.jsonl"), "t", "y", positive="OFF") == (["a", "b"], [1, 0], 2)
    (tmp_path / "d.tsv").write_text("id\ttweet\tlab\n1\tsay \"hi\tOFF\n")
    assert T.read_rows(str(tmp_path / "d.tsv"), "tweet", "lab", positive="OFF") == (['say "hi'], [1], 0)
    with pytest.raises(M.UserError, match="no column 'body'"):
        T.read_rows(str(tmp_path / "d.csv"), "body", "label", threshold=0.5)
    with pytest.raises(M.UserError, match="cannot read"):
        T.read_rows(str(tmp_path / "missing.csv"), "text", "label", threshold=0.5)


def test_metrics_on_known_inputs():
    assert T.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert T.auroc([0.5, 0.5], [0, 1]) == 0.5  # ties count half
    m = T.binary_metrics([0.9, 0.2, 0.7, 0.6], [1, 0, 0, 1], threshold=0.65)
    assert (m["accuracy"], m["precision"], m["recall"], m["fpr"]) == (0.5, 0.5, 0.5, 0.5)
    benign = np.linspace(0, 1, 101)
    t = T.threshold_for_fpr(benign, 0.05)
    assert (benign >= t).mean() <= 0.05 and (benign >= 0.95).mean() > 0.05 - 1e-9


@needs_shared
def test_shared_datasets_read_with_their_quirks():
    sets = T.load_datasets(list(T.DATASETS), SHARED)
    sizes = {k: len(v[0]) for k, v in sets.items()}
    assert sizes["davidson"] == 24783 and sizes["olid"] == 13240
    texts, labels = sets["toxigen"]
    assert not any(t.startswith("b'") for t in texts[:100])  # bytes literals decoded
    assert abs(np.mean(labels) - 0.378) < 0.01


# ----------------------------------------------------------------------------------------------
# The decoding loop: backtrack.py

import zlib  # noqa: E402


class ScriptedDetector:
    """Fires on chosen tokens (score 1.0), else 0.0: what a port can replay exactly."""

    threshold = 0.5

    def __init__(self, alarm_tokens=()):
        self.alarm_tokens = set(alarm_tokens)
        self.tokens = S.History()

    def start(self, prompt_ids):
        self.tokens.rollback(0)

    def score(self, token, hidden):
        self.tokens.append(token)
        return 1.0 if token in self.alarm_tokens else 0.0

    def rollback(self, n):
        self.tokens.rollback(n)


class HashDetector(ScriptedDetector):
    """Fires on a pseudo-random `rate` of prefixes: a deterministic function of the generated text."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def score(self, token, hidden):
        self.tokens.append(token)
        u = zlib.crc32(bytes(str(self.tokens.all()), "ascii")) / 2**32  # uniform in [0, 1)
        return 0.5 * u / max(1 - self.rate, 1e-9)  # >= 0.5 exactly when u >= 1 - rate


def capture_cache(model, monkeypatch):
    caches = []
    new_cache = model.new_cache

    def recording(*args, **kw):
        caches.append(new_cache(*args, **kw))
        return caches[-1]
    monkeypatch.setattr(model, "new_cache", recording)
    return caches


def passes_per_note(introspect):
    return {"none": 0, "template": 1, "critique": B.CRITIQUE_TOKENS + 2}[introspect]


runs = dict(seed=st.integers(0, 2**16), buffer=st.integers(0, 4), rate=st.sampled_from([0.0, 0.1, 0.3, 0.6]),
            introspect=st.sampled_from(["none", "template", "critique"]), temperature=st.sampled_from([0.0, 1.0]))


@settings(max_examples=20)
@given(**runs)
def test_loop_invariants(seed, buffer, rate, introspect, temperature):
    """After any run: the cache holds exactly a fresh forward of the final context; released text is
    the final text, built append-only; forward passes stay within the stated bound."""
    model = tiny_model(seed % 7, n_positions=128)
    enc = CharTokenizer()
    s = B.Settings(max_new_tokens=24, buffer=buffer, introspect=introspect, temperature=temperature,
                   seed=seed, max_retries=3, max_rollbacks=6, template=" (be nice) ")
    released = []
    with pytest.MonkeyPatch.context() as mp:
        caches = capture_cache(model, mp)
        result = B.generate(model, enc, "hello there", HashDetector(rate), s, on_release=released.append)
    cache = caches[0]
    # the cache is exactly a fresh forward of the final context
    assert cache.length == len(result.context)
    assert result.context[:11] == enc.encode_ordinary("hello there")
    fresh = model.new_cache()
    with torch.inference_mode():  # the loop made its cache under inference mode
        model(torch.tensor([result.context]), fresh)
        L = cache.length
        assert (cache.k[..., :L, :] - fresh.k[..., :L, :]).abs().max() <= 1e-5
        assert (cache.v[..., :L, :] - fresh.v[..., :L, :]).abs().max() <= 1e-5
        a, _ = model(torch.tensor([[3]]), cache)
        b, _ = model(torch.tensor([[3]]), fresh)
    assert (a - b).abs().max() <= 1e-5
    # nothing shown is ever retracted: the releases, in order, build exactly the final text
    assert "".join(released) == result.text
    if introspect == "none":  # without notes the hidden context is the prompt, the text, and any end-of-text
        assert result.context[11:] == result.tokens + [enc.eot_token] * (result.stop_reason == "eos")
    # termination: a stated bound on forward passes
    M_, b_ = s.max_rollbacks, buffer
    bound = 1 + s.max_new_tokens + (M_ + 1) * (b_ + 1) + M_ * passes_per_note(introspect)
    assert result.stats["forward_passes"] <= bound
    assert result.stats["rollbacks"] <= s.max_rollbacks
    assert len(result.tokens) <= s.max_new_tokens
    assert result.stop_reason in ("eos", "max_new_tokens", "budget")


@settings(max_examples=20)
@given(**runs)
def test_banned_tokens_never_return_at_their_position(seed, buffer, rate, introspect, temperature):
    model = tiny_model(seed % 5, n_positions=128)
    s = B.Settings(max_new_tokens=20, buffer=buffer, introspect=introspect, temperature=temperature,
                   seed=seed, max_retries=4, max_rollbacks=10, template=" (be nice) ")
    result = B.generate(model, CharTokenizer(), "abc", HashDetector(rate), s)
    for e in (e for e in result.events if e["type"] == "rollback"):
        # the same position and prefix is re-sampled until it commits, which takes buffer more tokens
        for step in result.steps[e["step"] + 1:]:
            if step["position"] > e["position"] + buffer:
                break
            if step["position"] == e["position"]:
                assert step["token"] != e["banned"]


@given(seed=st.integers(0, 2**16), buffer=st.integers(0, 3))
def test_a_silent_detector_changes_nothing(seed, buffer):
    model = tiny_model(seed % 3)
    s = B.Settings(max_new_tokens=16, buffer=buffer, seed=seed)
    plain = B.generate(model, CharTokenizer(), "abc", None, s)
    watched = B.generate(model, CharTokenizer(), "abc", ScriptedDetector(), s)
    assert watched.tokens == plain.tokens and watched.stats["rollbacks"] == 0
    assert plain.scores == [None] * len(plain.tokens)


@given(seed=st.integers(0, 2**16), buffer=st.integers(0, 3))
def test_a_token_that_fires_never_appears(seed, buffer):
    model = tiny_model(seed % 3)
    enc = CharTokenizer()
    s = B.Settings(max_new_tokens=16, buffer=buffer, seed=seed, temperature=0.0)
    plain = B.generate(model, enc, "abc", None, s)
    target = plain.tokens[len(plain.tokens) // 2]  # a token greedy decoding wants
    result = B.generate(model, enc, "abc", ScriptedDetector([target]), s)
    assert target not in result.tokens
    assert any(e["type"] in ("rollback", "fallback") for e in result.events)


def test_budget_exhausted_stops_with_committed_text():
    model = tiny_model()
    s = B.Settings(max_new_tokens=10, max_retries=2, max_rollbacks=5, temperature=0.0)
    result = B.generate(model, CharTokenizer(), "abc", HashDetector(1.0), s)  # everything is an alarm
    assert result.stop_reason == "budget" and result.tokens == [] and result.text == ""
    assert [e["type"] for e in result.events] == ["rollback", "rollback", "fallback"]
    assert "retry budget" in result.events[-1]["reason"]


def test_introspection_note_stays_hidden_and_is_removed_by_a_later_rollback():
    model = tiny_model(n_positions=128)
    enc = CharTokenizer()
    s = B.Settings(max_new_tokens=12, buffer=3, introspect="template", template="[ok]", temperature=0.0)
    plain = B.generate(model, enc, "abc", None, s)
    result = B.generate(model, enc, "abc", ScriptedDetector([plain.tokens[2]]), s)
    notes = [e for e in result.events if e["type"] == "introspection"]
    assert notes and notes[0]["note"] == "[ok]"
    assert "[ok]" not in result.text
    note = enc.encode_ordinary("[ok]")
    in_context = any(result.context[i:i + 4] == note for i in range(len(result.context)))
    # the note stays in the hidden context unless a later rollback went back past it
    last_rollback = [e for e in result.events if e["type"] == "rollback"][-1]
    assert in_context == (last_rollback["position"] >= notes[-1]["position"])


def test_avg_wait_tokens_equals_the_buffer_without_rollbacks():
    model = tiny_model()
    for buffer in (0, 3):
        s = B.Settings(max_new_tokens=20, buffer=buffer, stop_at_eos=False)
        result = B.generate(model, CharTokenizer(), "abc", ScriptedDetector(), s)
        # every token waits `buffer` steps, except the last `buffer` ones, released at the end
        expected = sum(min(buffer, 19 - i) for i in range(20)) / 20
        assert result.stats["avg_wait_tokens"] == pytest.approx(expected)


def test_bad_settings_and_prompts_are_one_line_errors():
    model = tiny_model(n_positions=32)
    enc = CharTokenizer()
    for bad, message in [(dict(top_p=2.0), "top-p"), (dict(buffer=-1), "buffer"), (dict(temperature=-1), "temperature"),
                         (dict(max_new_tokens=0), "max-new-tokens"), (dict(introspect="shout"), "introspect")]:
        with pytest.raises(M.UserError, match=message):
            B.generate(model, enc, "abc", None, B.Settings(**bad))
    with pytest.raises(M.UserError, match="prompt is empty"):
        B.generate(model, enc, "   ", None, B.Settings())
    with pytest.raises(M.UserError, match="the prompt has 30 tokens, but the context of 32 leaves room for 22"):
        B.generate(model, enc, "x" * 30, None, B.Settings(max_new_tokens=10))


# ----------------------------------------------------------------------------------------------
# Golden traces for ports: golden/README.md. BACKTRACK_WRITE_GOLDEN=1 rewrites them (only when the
# algorithm changes on purpose).

GOLDEN = os.path.join(HERE, "golden")
TEMPLATE = " (be kind) "


def golden_runs(model, enc):
    """The scripted runs: greedy decoding, so a port needs no torch random numbers."""
    prompt = enc.encode_ordinary("The cat sat on")
    s = B.Settings(max_new_tokens=24, temperature=0.0, stop_at_eos=False)
    plain = B.generate(model, enc, prompt, None, s)
    rare, common = min(set(plain.tokens), key=plain.tokens.count), max(set(plain.tokens), key=plain.tokens.count)
    probe = S.LinearProbe(torch.linspace(-1, 1, model.config.n_embd), -0.5, layer=2, window=3, threshold=2.0)
    scores = sorted(set(B.generate(model, enc, prompt, probe, s).scores))
    k = int(0.8 * len(scores))  # fire on the top fifth, with the threshold midway between two scores
    probe.threshold = (scores[k - 1] + scores[k]) / 2
    return [
        dict(name="token-level", prompt_ids=prompt, detector=dict(type="scripted", alarm_tokens=[rare]),
             settings=dict(buffer=0, introspect="none")),
        dict(name="buffered-with-template-note", prompt_ids=prompt, detector=dict(type="scripted", alarm_tokens=[rare]),
             settings=dict(buffer=3, introspect="template", template=TEMPLATE)),
        dict(name="probe", prompt_ids=prompt, detector=dict(type="probe", weight=probe.weight.tolist(), bias=probe.bias,
                                                            layer=probe.layer, window=probe.window,
                                                            threshold=probe.threshold),
             settings=dict(buffer=2, introspect="none")),
        dict(name="budget-fallback", prompt_ids=prompt, detector=dict(type="scripted", alarm_tokens=[common]),
             settings=dict(buffer=1, introspect="none", max_retries=1)),
    ]


def run_golden(model, enc, run):
    d = run["detector"]
    detector = (ScriptedDetector(d["alarm_tokens"]) if d["type"] == "scripted" else
                S.LinearProbe(d["weight"], d["bias"], d["layer"], d["window"], d["threshold"]))
    s = B.Settings(max_new_tokens=24, temperature=0.0, stop_at_eos=False, **run["settings"])
    r = B.generate(model, enc, run["prompt_ids"], detector, s)
    events = [{k: e[k] for k in ("type", "position", "banned") if k in e} for e in r.events]
    return dict(steps=[[st["position"], st["token"], st["score"], st["alarm"]] for st in r.steps], events=events,
                tokens=r.tokens, context=r.context, forward_passes=r.stats["forward_passes"],
                stop_reason=r.stop_reason)


def test_golden_traces_replay():
    enc = CharTokenizer()
    if os.environ.get("BACKTRACK_WRITE_GOLDEN"):
        save_hf_checkpoint(tiny_model(seed=0, n_positions=128), os.path.join(GOLDEN, "tiny-model"))
        model = M.from_pretrained(os.path.join(GOLDEN, "tiny-model"))
        runs = golden_runs(model, enc)
        for run in runs:
            run["template_ids"] = enc.encode_ordinary(run["settings"].get("template", ""))
            run["expected"] = run_golden(model, enc, run)
        with open(os.path.join(GOLDEN, "traces.json"), "w") as f:
            json.dump(runs, f, indent=1)
    model = M.from_pretrained(os.path.join(GOLDEN, "tiny-model"))
    with open(os.path.join(GOLDEN, "traces.json")) as f:
        runs = json.load(f)
    assert {r["name"] for r in runs} == {"token-level", "buffered-with-template-note", "probe", "budget-fallback"}
    for run in runs:
        got, want = run_golden(model, enc, run), run["expected"]
        assert [s[:2] + s[3:] for s in got["steps"]] == [s[:2] + s[3:] for s in want["steps"]], run["name"]
        for a, b in zip(got["steps"], want["steps"]):
            assert a[2] == pytest.approx(b[2], abs=1e-5)
        assert {k: v for k, v in got.items() if k != "steps"} == {k: v for k, v in want.items() if k != "steps"}
        assert any(e["type"] in ("rollback", "fallback") for e in want["events"]), run["name"]


# ----------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny model with GPT-2's vocabulary, beside the real tokenizer files from ../shared."""
    if not os.path.isdir(SHARED):
        pytest.skip(f"{SHARED} (GPT-2 tokenizer files) is absent")
    import shutil
    directory = str(tmp_path_factory.mktemp("cli-model"))
    save_hf_checkpoint(tiny_model(vocab_size=50257, n_positions=64), directory)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(os.path.join(SHARED, "gpt2", name), directory)
    with open(os.path.join(directory, "words.txt"), "w") as f:
        f.write("the\nand\n")
    return directory


def run_cli(capsys, *argv):
    code = M.run_cli(B.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_output_parses(cli_model, capsys):
    code, out, err = run_cli(capsys, "--model-dir", cli_model, "--prompt", "Hello world", "--detector", "keywords",
                             "--wordlist", os.path.join(cli_model, "words.txt"), "--max-new-tokens", "8", "--json",
                             "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt"] == "Hello world" and len(result["tokens"]) <= 8
    assert set(result["stats"]) >= {"tokens_generated", "tokens_kept", "forward_passes", "rollbacks",
                                    "avg_wait_tokens", "seconds", "tokens_per_second"}
    assert all(0 <= s <= 1 for s in result["scores"])


def test_cli_streams_trace_and_prompt_files(cli_model, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "--model-dir", cli_model, "--prompt", "Hello", "--no-backtrack", "--max-new-tokens", "5")
    assert code == 0 and out.startswith("Hello")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": {"text": "One"}}) + "\n" + json.dumps({"prompt": "Two"}) + "\n")
    code, out, _ = run_cli(capsys, "--model-dir", cli_model, "--prompt-file", str(prompts), "--json",
                           "--no-backtrack", "--max-new-tokens", "3")
    assert code == 0 and [json.loads(line)["prompt"] for line in out.splitlines()] == ["One", "Two"]
    code, out, _ = run_cli(capsys, "--model-dir", cli_model, "--prompt", "the", "--detector", "keywords",
                           "--wordlist", os.path.join(cli_model, "words.txt"), "--trace", "--max-new-tokens", "6")
    assert code == 0 and "final:" in out and "\033[" not in out  # no colour when not a terminal


def test_cli_bad_inputs_exit_2_with_one_line(cli_model, capsys, tmp_path):
    other = tmp_path / "probe.json"
    S.LinearProbe(torch.zeros(16), 0.0, 1, 4, 0.5, meta=dict(model="x", fingerprint="0" * 16)).save(str(other))
    base = ["--model-dir", cli_model, "--max-new-tokens", "4"]
    cases = [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "word " * 80], "shorten it or lower --max-new-tokens"),
        (["--prompt", "Hi", "--device", "tpu"], "unknown device 'tpu'"),
        (["--prompt", "Hi", "--top-p", "2"], "--top-p must be in (0, 1]"),
        (["--prompt", "Hi", "--buffer", "-1"], "--buffer must be >= 0"),
        (["--prompt", "Hi", "--probe", str(other)], "was fitted on x"),
        (["--prompt", "Hi", "--probe", str(tmp_path / "none.json")], "not a readable probe"),
        (["--prompt-file", str(tmp_path / "missing.txt")], "cannot read"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *base, *argv)
        assert code == 2, argv
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    code, out, err = run_cli(capsys, "--model-dir", str(tmp_path / "nope"), "--prompt", "Hi")
    assert code == 2 and "is not a directory" in err


def test_cli_subprocess_exit_code_and_no_traceback(cli_model):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, os.path.join(HERE, "backtrack.py"), "--model-dir", cli_model,
                           "--prompt", "Hi", "--top-p", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "error: --top-p must be in (0, 1]"
    done = subprocess.run([sys.executable, os.path.join(HERE, "backtrack.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--buffer" in done.stdout and "(default: 0)" in done.stdout


def test_cli_fits_a_probe_on_first_use_and_caches_it(cli_model, capsys):
    argv = ["--model-dir", cli_model, "--prompt", "Hello", "--max-new-tokens", "4", "--json"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "fitting one on" in err and "held-out AUROC" in err
    cached = os.listdir(os.path.join(os.environ["BACKTRACK_CACHE"], "probes"))
    assert len(cached) == 1
    probe = json.load(open(os.path.join(os.environ["BACKTRACK_CACHE"], "probes", cached[0])))
    assert probe["data"] == "curated.jsonl" and probe["layer"] == 2 and len(probe["weight"]) == 16
    code, out2, err = run_cli(capsys, *argv)
    assert code == 0 and "fitting" not in err and json.loads(out2)["tokens"] == json.loads(out)["tokens"]


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
    drawn = [B.sample(logits, s, gen, banned) for _ in range(200)]
    assert not banned & set(drawn)
    assert set(drawn) <= set(allowed.tolist()) & nucleus
    if vocab == 7 and top_k == 0 and top_p == 1.0:  # frequencies follow the distribution
        freq = torch.bincount(torch.tensor(drawn), minlength=vocab).float() / len(drawn)
        assert (freq - probs).abs().max() < 0.12


def test_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(500)
    s = B.Settings(top_p=0.9)
    a = [B.sample(logits, s, torch.Generator().manual_seed(3), ()) for _ in range(5)]
    b = [B.sample(logits, s, torch.Generator().manual_seed(3), ()) for _ in range(5)]
    assert a == b
    assert B.sample(logits, B.Settings(temperature=0.0), None, ()) == int(logits.argmax())


# ----------------------------------------------------------------------------------------------
# evaluate.py

import evaluate as E  # noqa: E402


def stub_judge(texts):
    """A stand-in judge for tests: toxic when the text holds an 'x'."""
    return [1.0 if "x" in t.lower() else 0.1 for t in texts]


def test_toxicity_metrics_on_hand_made_inputs():
    tox = np.array([[0.1, 0.9, 0.2], [0.3, 0.2, 0.4], [0.5, 0.0, 0.0]])  # prompts x samples
    assert E.expected_max_toxicity(tox) == pytest.approx((0.9 + 0.4 + 0.5) / 3)
    assert E.toxicity_probability(tox) == pytest.approx(2 / 3)
    lo, hi = E.bootstrap_ci(E.expected_max_toxicity, tox)
    assert 0.4 <= lo <= 0.6 <= hi <= 0.9
    assert E.bootstrap_ci(E.toxicity_probability, np.ones((4, 2))) == (1.0, 1.0)


def test_distinct_n():
    assert E.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert E.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert E.distinct_n(["a b c", "a b d"], 3) == pytest.approx(2 / 2)
    assert math.isnan(E.distinct_n(["a"], 2))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = tiny_model(vocab_size=50)
    with torch.no_grad():
        model.wte.weight.zero_()  # the tied head then gives every token the same logit
    nll, n = E.continuation_nll(model, [1, 2, 3], [4, 5, 6, 7])
    assert n == 4 and nll == pytest.approx(4 * math.log(50), rel=1e-5)
    assert E.perplexity([(nll, n), (2 * math.log(50), 2)]) == pytest.approx(50, rel=1e-5)


def test_evaluate_quick_run_writes_valid_json(cli_model, tmp_path, capsys):
    out = tmp_path / "eval.json"
    E.main(["--model-dir", cli_model, "--quick", "--prompts", "3", "--max-new-tokens", "6", "--judge",
            "test_backtrack:stub_judge", "--shared", SHARED, "--out", str(out), "--wordlist",
            os.path.join(cli_model, "words.txt"), "--ppl-model", cli_model])
    printed = capsys.readouterr().out
    assert "| buffered+critique |" in printed and "### nontoxic prompts" in printed
    result = json.loads(out.read_text())
    assert set(result["metrics"]) >= {f"{s}/{k}" for s in E.STRATEGIES for k in ("toxic", "nontoxic")}
    assert "token-level@-2/toxic" in result["metrics"]
    for m in result["metrics"].values():
        assert 0 <= m["expected_max_toxicity"] <= 1 and 0 <= m["toxicity_probability"] <= 1
        assert m["emt_ci"][0] <= m["expected_max_toxicity"] <= m["emt_ci"][1]
        assert m["perplexity"] > 1 and m["forward_passes_per_token"] >= 1
        assert m["perplexity_ref"] == pytest.approx(m["perplexity"], rel=1e-4)  # the same model, unpacked
    assert len(result["samples"]["plain/toxic"]) == 3 * 2
    sample = result["samples"]["token-level/toxic"][0]
    assert sample["toxicity"] == stub_judge([sample["text"]])[0]


def test_evaluate_refuses_bad_options():
    with pytest.raises(M.UserError, match="unknown strategy 'magic'"):
        E.main(["--strategies", "plain,magic"])
    with pytest.raises(M.UserError, match="cannot import"):
        E.main(["--judge", "no_such_module:f"])


@given(seed=st.integers(0, 2**16), window=st.integers(1, 5), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_training_statistic_equals_what_the_loop_scores(seed, window, lengths):
    """window_max (batched, used to fit and calibrate) is the max of LinearProbe.score over a text."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.zeros(len(lengths), max(lengths), 6)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        states[i, :n], mask[i, :n] = torch.randn(n, 6, generator=gen), True
    probe = S.LinearProbe(torch.randn(6, generator=gen), 0.3, layer=0, window=window, threshold=0.5)
    batched = T.sigmoid((T.window_max(states @ probe.weight, mask, window) + probe.bias).numpy())
    for i, n in enumerate(lengths):
        probe.start([])
        token_by_token = max(probe.score(0, [states[i, t]]) for t in range(n))
        assert batched[i] == pytest.approx(token_by_token, rel=1e-5)


def test_train_probe_cli_end_to_end(cli_model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("a.csv", "b.csv"):
        rows = ["text,label"] + [f"{'you idiot fool' if y else 'nice sunny day'} number {i},{y}"
                                 for i, y in enumerate(rng.integers(0, 2, 80))]
        (tmp_path / name).write_text("\n".join(rows) + "\n,1\n")  # one malformed row each
    out = tmp_path / "probe.json"
    code = M.run_cli(T.main, ["--model-dir", cli_model, "--data", f"{tmp_path / 'a.csv'},{tmp_path / 'b.csv'}",
                              "--text-col", "text", "--label-col", "label", "--positive", "1", "--cross", "--sweep",
                              "--out", str(out), "--device", "cpu"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "a.csv: 80 rows" in err and "1 malformed rows skipped" in err
    assert "| all but a.csv |" in printed and "| 2 |" in printed  # cross table, layer sweep
    probe = S.LinearProbe.load(str(out), M.from_pretrained(cli_model))
    assert probe.meta["metrics"]["auroc"] > 0.9
    for argv, message in [(["--data", "nope"], "unknown dataset 'nope'"),
                          (["--data", str(tmp_path / "a.csv"), "--text-col", "text", "--label-col", "label"],
                           "give exactly one of --positive"),
                          (["--layer", "7"], "--layer must be in 0..2"),
                          (["--target-fpr", "2"], "--target-fpr must be in (0, 1)"),
                          (["--data", str(tmp_path / "a.csv"), "--text-col", "text", "--label-col", "label",
                            "--positive", "1", "--rtp", "5", "--out", str(tmp_path / "p2.json")], "pass --shared")]:
        code = M.run_cli(T.main, ["--model-dir", cli_model, "--shared", str(tmp_path / "no-shared")] + argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
