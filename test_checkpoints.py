"""checkpoints.py: finding, downloading, checking and reading checkpoints and tokenizers; devices."""
import hashlib
import http.server
import json
import math
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save_file

import checkpoints as CK
import cli
from conftest import HERE, SHARED, needs_shared, save_hf_checkpoint, tiny_model, write_tiny_bpe


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_round_trips_a_hugging_face_directory(tmp_path, fmt):
    model = tiny_model()
    loaded = CK.from_pretrained(save_hf_checkpoint(model, str(tmp_path), fmt))
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert loaded.lm_head.weight is loaded.wte.weight



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
    with pytest.raises(cli.UserError, match=message) as err:
        CK.from_pretrained(directory)
    assert "\n" not in str(err.value) and "model.safetensors" in str(err.value)


@pytest.mark.parametrize("fmt, name", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_truncated_weights_give_one_line_error(tmp_path, fmt, name):
    directory = save_hf_checkpoint(tiny_model(), str(tmp_path), fmt)
    path = os.path.join(directory, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(cli.UserError, match=f"{name}: cannot read the weights .*truncated or corrupt") as err:
        CK.from_pretrained(directory)
    assert "\n" not in str(err.value)


def test_missing_files_and_unknown_names(tmp_path):
    with pytest.raises(cli.UserError, match="neither a directory nor a known model"):
        CK.from_pretrained("not-a-model")
    with pytest.raises(cli.UserError, match="no config.json"):
        CK.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 1, "n_head": 1, "n_embd": 8}))
    with pytest.raises(cli.UserError, match="no model.safetensors or pytorch_model.bin"):
        CK.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(cli.UserError, match="cannot read the model config"):
        CK.from_pretrained(str(tmp_path))


@needs_shared
def test_tokenizer_builds_offline_from_vocabulary_files():
    for directory in ("gpt2", os.path.join("models", "minigpt2")):  # encoder.json+vocab.bpe; vocab.json+merges.txt
        enc = CK.load_tokenizer(os.path.join(SHARED, directory))
        assert enc.encode("Hello world") == [15496, 995]
        assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
        assert enc.n_vocab == 50257


@pytest.mark.slow
@needs_shared
def test_local_model_loads_and_matches_transformers():
    """Properties, not one version's shape: the config agrees with the weights, the model is a
    sensible language model, and (with transformers) the logits equal the reference's."""
    directory = os.path.join(SHARED, "models", "minigpt2")
    ours = CK.from_pretrained(directory)
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
    assert CK.pick_device("cpu") == "cpu"
    assert CK.pick_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(cli.UserError, match="unknown device 'tpu'"):
        CK.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(cli.UserError, match="no CUDA GPU"):
            CK.pick_device("cuda")
    assert CK.pick_dtype("float32", "cpu") is torch.float32
    assert CK.pick_dtype("bfloat16", "cuda") is torch.bfloat16
    with pytest.raises(cli.UserError, match="on the CPU use float32"):
        CK.pick_dtype("float16", "cpu")


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
    with pytest.raises(cli.UserError, match=message):
        CK.from_pretrained(directory)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(cli.UserError, match="a model config is a JSON object"):
        CK.from_pretrained(directory)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update({"transformer.wte.weight": s["transformer.wte.weight"].long()}), "holds torch.int64"),
    (lambda s: s.update({"transformer.ln_f.bias": torch.full((16,), float("nan"))}), "NaN or infinite"),
    (lambda s: s.update({"transformer.ln_f.bias": torch.zeros(16).to(torch.float8_e4m3fn)}), "holds torch.float8_e4m3fn"),
])
def test_integer_or_nan_weights_are_refused(tmp_path, damage, message):
    directory = save_hf_checkpoint(tiny_model(), str(tmp_path))
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    damage(state)
    save_file(state, path)
    with pytest.raises(cli.UserError, match=message):
        CK.from_pretrained(directory)



# ----------------------------------------------------------------------------------------------
# Hub names: huggingface_hub against a local server that answers as the Hub does


class Hub:
    """A local stand-in for the Hub in a thread, speaking the protocol huggingface_hub expects (a HEAD
    with X-Repo-Commit and an ETag, then a GET). It serves a checkpoint directory's files, optionally
    cutting a body short, sending a body that does not end (of a file, or of every /api/ call), announcing
    a wrong sha256, serving a web page in a file's place, or never answering; it counts the GETs of each
    file and the requests of every other path."""

    def __init__(self, directory, cut=(), wrong_hash=(), page=(), delay=0.0, silent=False, endless=(),
                 endless_api=False):
        hub = self
        self.requests = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def headers_of_file(self, sized=True):
                if "/resolve/" not in self.path:  # the client's other calls (e.g. /api/...): not a file
                    hub.requests[self.path] = hub.requests.get(self.path, 0) + 1
                    if self.command == "GET" and endless_api and self.path.startswith("/api/"):
                        self.send_response(200)  # a JSON body that never ends, a little at a time
                        self.end_headers()
                        self.close_connection = True
                        try:
                            self.wfile.write(b'{"harnesses": {"x": "')
                            for _ in range(1000):
                                self.wfile.write(b"x" * 64)
                                self.wfile.flush()
                                time.sleep(0.05)
                        except OSError:
                            pass
                        return None, b""
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None, b""
                name = self.path.rsplit("/", 1)[1]
                body = open(os.path.join(directory, name), "rb").read()
                if name in page:
                    body = b"<!doctype html><html><body>Welcome to our mirror</body></html>"
                self.send_response(200)
                if sized:
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Repo-Commit", "a" * 40)
                lfs = name.endswith(".safetensors")  # the Hub's etag of an LFS file is its sha256
                digest = hashlib.sha256(body).hexdigest() if lfs else hashlib.sha1(body).hexdigest()
                self.send_header("ETag", f'"{"0" * 64 if name in wrong_hash else digest}"')
                self.end_headers()
                return name, body

            def do_HEAD(self):
                if silent:
                    time.sleep(120)  # accepts the connection, never answers
                self.headers_of_file()

            def do_GET(self):
                name, body = self.headers_of_file(sized=self.path.rsplit("/", 1)[1] not in endless)
                if name is None:
                    return
                hub.requests[name] = hub.requests.get(name, 0) + 1
                time.sleep(delay)
                if name in endless:  # the headers said its size; the body goes on (for at most 20 s or 64 MB)
                    self.close_connection = True
                    try:
                        for _ in range(1024):
                            self.wfile.write(b"x" * 65536)
                            self.wfile.flush()
                            time.sleep(0.02)
                    except OSError:  # the client hung up: what the test wants
                        pass
                elif name in cut:  # half the body, then the connection closes
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_checkpoint(tmp_path, monkeypatch):
    """A tiny checkpoint to serve, with a small real BPE, and a Hugging Face cache of the test's own."""
    source = save_hf_checkpoint(tiny_model(), str(tmp_path / "source"))
    write_tiny_bpe(source)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    return source


def files_in(directory):
    return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, names in os.walk(directory) for f in names)


def snapshot(name):
    return os.path.join(os.environ["HF_HUB_CACHE"], "models--someone--tiny", "snapshots", "a" * 40, name)


@pytest.mark.slow
def test_hub_names_download_into_the_cache(hub_checkpoint, monkeypatch):
    """A Hub name fetches four files once into Hugging Face's cache; a second load downloads nothing."""
    with Hub(hub_checkpoint) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        model = CK.from_pretrained("someone/tiny")
        assert model.config.n_embd == 16 and hub.requests == dict.fromkeys(CK.HUB_FILES["gpt2"], 1)
        assert CK.from_pretrained("someone/tiny").config.n_embd == 16
        assert hub.requests == dict.fromkeys(CK.HUB_FILES["gpt2"], 1)  # cached
        assert CK.load_tokenizer("someone/tiny").encode("abc") == [257]


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [(dict(cut=("model.safetensors",)), "cannot download model.safetensors"),
                                             (dict(wrong_hash=("model.safetensors",)), "is corrupt"),
                                             (dict(page=("config.json",)), "config.json is not valid"),
                                             (dict(page=("merges.txt",)), "vocab.json and merges.txt are not valid")])
def test_damaged_downloads_are_refused_and_nothing_bad_is_cached(hub_checkpoint, monkeypatch, damage, message):
    """A body cut short, a wrong sha256, a web page served as a file: one line naming the file, nothing
    of it left in the cache, and a later run against a good server downloads it whole."""
    with Hub(hub_checkpoint, **damage) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(cli.UserError, match=message) as err:
            CK.from_pretrained("someone/tiny")
        assert "\n" not in str(err.value)
    bad = (damage.get("cut") or damage.get("wrong_hash") or damage.get("page"))[0]
    assert not os.path.exists(snapshot(bad))
    assert not [f for f in files_in(os.environ["HF_HUB_CACHE"]) if f.endswith(".incomplete")]
    with Hub(hub_checkpoint) as good:
        monkeypatch.setenv("HF_ENDPOINT", good.url)
        assert CK.from_pretrained("someone/tiny").config.n_embd == 16
        assert good.requests.get(bad) == 1


@pytest.mark.slow
def test_a_corrupt_cached_file_is_downloaded_again(hub_checkpoint, monkeypatch):
    with Hub(hub_checkpoint) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        CK.from_pretrained("someone/tiny")
        path = os.path.realpath(snapshot("model.safetensors"))
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        assert CK.from_pretrained("someone/tiny").config.n_embd == 16
        assert hub.requests["model.safetensors"] == 2 and hub.requests["config.json"] == 1


@pytest.mark.slow
def test_a_server_that_never_answers_times_out_and_leaves_nothing_behind(hub_checkpoint, monkeypatch):
    with Hub(hub_checkpoint, silent=True) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        t0 = time.time()
        with pytest.raises(cli.UserError, match="cannot download config.json of someone/tiny from 127.0.0.1"):
            CK.from_pretrained("someone/tiny")
        assert time.time() - t0 < 20
    assert not os.path.exists(os.path.join(os.environ["HF_HUB_CACHE"], "models--someone--tiny"))
    assert not os.path.exists(os.path.join(os.environ["HF_HUB_CACHE"], ".locks", "models--someone--tiny"))


@pytest.mark.slow
def test_concurrent_first_runs_download_once(hub_checkpoint, monkeypatch):
    """Two processes load the same new Hub model at once: the client's lock lets one download, the
    other reuse its files."""
    with Hub(hub_checkpoint, delay=0.3) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, PYTHONPATH=HERE)
        code = "import checkpoints; print(checkpoints.from_pretrained('someone/tiny').config.n_embd)"
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == ["16", "16"]
    assert hub.requests == dict.fromkeys(CK.HUB_FILES["gpt2"], 1)


def no_download(*args, **kwargs):
    pytest.fail("no request may be made")


@pytest.mark.parametrize("name", ["owner/name?x=1#", "has space", "a/b/c", "owner/..", "-bad/name"])
def test_bad_hub_names_are_refused_without_a_request(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(CK, "download_checkpoint", no_download)
    with pytest.raises(cli.UserError, match="not a model name|is not a directory"):
        CK.from_pretrained(name)
    assert not (tmp_path / "hf").exists()


def test_local_looking_names_are_never_fetched(monkeypatch):
    monkeypatch.setattr(CK, "download_checkpoint", no_download)
    for name in ("./missing", "../missing", "/no/such/dir", "~/missing"):
        with pytest.raises(cli.UserError, match="is not a directory"):
            CK.from_pretrained(name)


def write_header(path, header, data=b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@given(offsets=st.one_of(st.integers(-5, 5), st.lists(st.one_of(st.integers(-4, 40), st.floats(), st.text(max_size=2),
                                                              st.none()), max_size=3),
                         st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.none(), st.text(max_size=3)))
def test_any_safetensors_header_is_read_or_refused_in_one_line(tmp_path_factory, offsets):
    """"data_offsets": 4, [], [3], ["a", 1], null, ...: a layout problem named in one line, never a
    TypeError or IndexError from deep inside the reader."""
    directory = tmp_path_factory.mktemp("header")
    save_hf_checkpoint(tiny_model(), str(directory))
    write_header(directory / "model.safetensors", {"transformer.wte.weight": {"dtype": "F32", "shape": [1],
                                                                              "data_offsets": offsets}}, b"\0" * 4)
    with pytest.raises(cli.UserError, match="cannot read the weights|missing tensor|has shape"):
        CK.from_pretrained(str(directory))


def test_a_fifo_or_a_pickle_in_place_of_the_weights_is_one_line(tmp_path):
    """A FIFO named model.safetensors would block the reader forever: refused before it is opened. A
    .bin that pickles Python objects beside its tensors is refused as such, not as "corrupt"."""
    directory = save_hf_checkpoint(tiny_model(), str(tmp_path / "m"))
    os.remove(os.path.join(directory, "model.safetensors"))
    os.mkfifo(os.path.join(directory, "model.safetensors"))
    done = []
    worker = threading.Thread(target=lambda: done.append(pytest.raises(cli.UserError, CK.from_pretrained, directory)))
    worker.start()
    worker.join(30)
    assert done and "not a regular file" in str(done[0].value)
    os.remove(os.path.join(directory, "model.safetensors"))
    state = {k: v for k, v in tiny_model().state_dict().items()}
    torch.save({"state": state, "why": Exception("not a tensor")}, os.path.join(directory, "pytorch_model.bin"))
    with pytest.raises(cli.UserError, match="pickled Python objects beyond tensors"):
        CK.from_pretrained(directory)


def test_a_mirror_that_never_ends_a_body_is_cut_off(hub_checkpoint, monkeypatch):
    """An HF_ENDPOINT mirror that sends an endless body was never cut off: the download is bounded by
    the size the server announced, and given up (nothing left in the cache) once it grows past it."""
    with Hub(hub_checkpoint, endless=("model.safetensors",)) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        started = time.time()
        with pytest.raises(cli.UserError, match="sent more of model.safetensors of owner/tiny than the .* bytes it "
                                                "announced; the download was cut off"):
            CK.from_pretrained("owner/tiny")
        assert hub.requests["model.safetensors"] == 1
        assert time.time() - started < 15
        assert not [p for p in files_in(os.environ["HF_HUB_CACHE"]) if p.endswith(".incomplete")]


def test_the_hub_clients_own_calls_cannot_hang_a_download(hub_checkpoint, tmp_path):
    """huggingface_hub 2.4 asks {HF_ENDPOINT}/api/agent-harnesses for its telemetry header, with no
    bound on the body, before the first file (when ~/.cache/huggingface/.agent_harnesses.json is
    absent): a mirror that never ends that answer hung every first run. The download sends no
    telemetry, so the call is never made. A fresh process, as huggingface_hub reads HF_ENDPOINT on import."""
    with Hub(hub_checkpoint, endless_api=True) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
        started = time.time()
        done = subprocess.run([sys.executable, "-c", "import checkpoints; checkpoints.from_pretrained('owner/tiny')"],
                              cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and time.time() - started < 30, done.stderr[-2000:]
        assert not [path for path in hub.requests if path.startswith("/api/agent-harnesses")], hub.requests


def test_a_loaded_checkpoint_is_the_saved_model_holding_the_files_tensors_once(tmp_path):
    """from_pretrained builds the model on the meta device and takes the file's tensors: every
    parameter is real memory on the CPU, the head is tied to the embeddings again, and the logits
    are those of the model that was saved."""
    saved = tiny_model(seed=3)
    save_hf_checkpoint(saved, str(tmp_path / "ck"))
    loaded = CK.from_pretrained(str(tmp_path / "ck"))
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.wte.weight
    assert all(p.is_contiguous() for p in loaded.parameters())
    idx = torch.randint(0, saved.config.vocab_size, (2, 9))
    with torch.inference_mode():
        assert torch.allclose(loaded(idx)[0], saved(idx)[0], atol=1e-6)


def test_safetensors_byte_ranges_must_tile_the_file():
    """Two tensors over the same bytes (or a gap between them) passed the check that promises the
    ranges tile the file, as long as the last one ended at its end."""
    for offsets, problem in [([[0, 8], [4, 12], [8, 12]], "overlap at byte 4"),
                             ([[0, 4], [8, 12], [4, 4]], "leave a gap at byte 8"), ([[0, 4], [4, 12]], None)]:
        header = {f"t{i}": {"dtype": "F32", "shape": [(b - a) // 4], "data_offsets": [a, b]}
                  for i, (a, b) in enumerate(offsets)}
        with tempfile.TemporaryDirectory() as d:
            write_header(os.path.join(d, "w.safetensors"), header, b"\0" * 12)
            found = CK.safetensors_problem(os.path.join(d, "w.safetensors"))
        assert (problem is None and found is None) or problem in found, (offsets, found)


def test_a_gpt2_head_of_its_own_is_refused_not_dropped(tmp_path):
    """A separate lm_head.weight was silently dropped and the head tied to the embeddings: another model
    than the file's. A head equal to the embeddings (as GPT-2 saves it) loads; any other, or a config
    that says the head is not tied, is refused in one line."""
    import safetensors.torch
    directory = save_hf_checkpoint(tiny_model(), str(tmp_path / "ck"))
    path = os.path.join(directory, "model.safetensors")
    state = safetensors.torch.load_file(path)
    safetensors.torch.save_file(dict(state, **{"lm_head.weight": state["transformer.wte.weight"].clone()}), path)
    assert CK.from_pretrained(directory).lm_head.weight is not None
    safetensors.torch.save_file(dict(state, **{"lm_head.weight": state["transformer.wte.weight"] + 1}), path)
    with pytest.raises(cli.UserError, match="lm_head.weight differs from the embeddings"):
        CK.from_pretrained(directory)
    safetensors.torch.save_file(state, path)
    config = json.loads(open(os.path.join(directory, "config.json")).read())
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(config, tie_word_embeddings=False), f)
    with pytest.raises(cli.UserError, match="tie_word_embeddings is False"):
        CK.from_pretrained(directory)
