"""model.py: the KV cache, the forward pass, loading checkpoints, devices."""
import hashlib
import http.server
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save_file

import model as M
from conftest import HERE, SHARED, configs, needs_shared, save_hf_checkpoint, tiny_model


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
        last, _ = model(idx, which_logits="last")
        none, hidden_none = model(idx, which_logits="none")
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
# Failing closed: downloads, names, configs and weights


class Hub:
    """A local stand-in for the Hub in a thread: serves a checkpoint directory's files, optionally
    cutting bodies short or announcing a wrong sha256, and counts requests per file."""

    def __init__(self, directory, cut=(), wrong_hash=(), delay=0.0):
        hub = self
        self.requests = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[1]
                hub.requests[name] = hub.requests.get(name, 0) + 1
                body = open(os.path.join(directory, name), "rb").read()
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                digest = hashlib.sha256(body).hexdigest()
                self.send_header("X-Linked-Etag", f'"{"0" * 64 if name in wrong_hash else digest}"')
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if name in cut else body)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_checkpoint(tmp_path, monkeypatch):
    source = save_hf_checkpoint(tiny_model(), str(tmp_path / "source"))
    (tmp_path / "source" / "vocab.json").write_text("{}")
    (tmp_path / "source" / "merges.txt").write_text("#version: 0.2\n")
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    return source


@pytest.mark.parametrize("damage, message", [(dict(cut=("model.safetensors",)), "was cut off"),
                                             (dict(wrong_hash=("model.safetensors",)), "is corrupt")])
def test_damaged_downloads_are_refused_and_leave_nothing_behind(hub_checkpoint, monkeypatch, damage, message):
    hub = Hub(hub_checkpoint, **damage)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        with pytest.raises(M.UserError, match=message):
            M.from_pretrained("someone/tiny")
        local = os.path.join(os.environ["BACKTRACK_CACHE"], "someone--tiny")
        assert not os.path.exists(os.path.join(local, "model.safetensors"))
        assert not [f for f in os.listdir(local) if f.endswith(".part")]  # no half file under any name
    finally:
        hub.close()
    good = Hub(hub_checkpoint)
    monkeypatch.setenv("HF_ENDPOINT", good.url)
    try:
        assert M.from_pretrained("someone/tiny").config.n_embd == 16  # a later run downloads it whole
    finally:
        good.close()


def test_a_corrupt_cached_file_is_downloaded_again(hub_checkpoint, monkeypatch):
    hub = Hub(hub_checkpoint)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        M.from_pretrained("someone/tiny")
        path = os.path.join(os.environ["BACKTRACK_CACHE"], "someone--tiny", "model.safetensors")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        assert M.from_pretrained("someone/tiny").config.n_embd == 16
        assert hub.requests["model.safetensors"] == 2 and hub.requests["config.json"] == 2
    finally:
        hub.close()


def test_concurrent_first_runs_download_once(hub_checkpoint, monkeypatch):
    """Two processes load the same new Hub model at once: the lock lets one download, the other reuse."""
    hub = Hub(hub_checkpoint, delay=0.3)
    env = dict(os.environ, HF_ENDPOINT=hub.url, PYTHONPATH=HERE)
    code = "import model; print(model.from_pretrained('someone/tiny').config.n_embd)"
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        hub.close()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == ["16", "16"]
    assert hub.requests == {"config.json": 1, "model.safetensors": 1, "vocab.json": 1, "merges.txt": 1}


@pytest.mark.parametrize("name", ["owner/name?x=1#", "has space", "a/b/c", "owner/..", "-bad/name"])
def test_bad_hub_names_are_refused_without_a_request(name, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(M.urllib.request, "urlopen", lambda *a: pytest.fail("no request may be made"))
    with pytest.raises(M.UserError, match="not a model name|is not a directory"):
        M.from_pretrained(name)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_local_looking_names_are_never_fetched(tmp_path, monkeypatch):
    monkeypatch.setattr(M.urllib.request, "urlopen", lambda *a: pytest.fail("no request may be made"))
    for name in ("./missing", "../missing", "/no/such/dir", "~/missing"):
        with pytest.raises(M.UserError, match="is not a directory"):
            M.from_pretrained(name)


@pytest.mark.parametrize("change, message", [
    (dict(n_layer=10**6), "needs about .* GiB"),
    (dict(n_positions=10**9), "needs about .* GiB"),
    (dict(n_head=0), "n_head must be an integer >= 1"),
    (dict(n_embd=-16), "n_embd must be an integer >= 1"),
    (dict(n_embd=18, n_head=4), "not a multiple of n_head"),
    (dict(vocab_size="97"), "vocab_size must be an integer"),
    (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon must be a positive number"),
    (dict(n_layer=True), "n_layer must be an integer"),
])
def test_bad_configs_are_refused_before_building_the_model(tmp_path, change, message):
    directory = save_hf_checkpoint(tiny_model(), str(tmp_path))
    config = json.load(open(os.path.join(directory, "config.json")))
    (tmp_path / "config.json").write_text(json.dumps(dict(config, **change)))
    with pytest.raises(M.UserError, match=message):
        M.from_pretrained(directory)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(M.UserError, match="a model config is a JSON object"):
        M.from_pretrained(directory)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update({"transformer.wte.weight": s["transformer.wte.weight"].long()}), "holds torch.int64"),
    (lambda s: s.update({"transformer.ln_f.bias": torch.full((16,), float("nan"))}), "NaN or infinite"),
])
def test_integer_or_nan_weights_are_refused(tmp_path, damage, message):
    directory = save_hf_checkpoint(tiny_model(), str(tmp_path))
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    damage(state)
    save_file(state, path)
    with pytest.raises(M.UserError, match=message):
        M.from_pretrained(directory)
