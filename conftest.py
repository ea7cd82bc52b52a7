"""Shared test helpers: tiny random models, a character tokenizer, scripted detectors, Hypothesis profiles.

    python -m pytest -q      # offline; tests that need ../shared skip with a reason when it is absent
"""
import copy
import json
import os
import shutil
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st

import backtrack_cli
import checkpoints as CK
import cli
import model as M
import sampling
import scorer as S

# CI gets a fixed, derandomised set of examples so a red run is a real bug; locally, set
# HYPOTHESIS_PROFILE=explore to search more widely. No test sets its own max_examples.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(1)  # tiny models: threads only add overhead


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: processes, servers, command lines and the local model; "
                            "`pytest -m \"not slow\"` leaves them out for a quick loop over the algorithm")

HERE = os.path.dirname(os.path.abspath(__file__))

SHARED = cli.shared_path()

needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"{SHARED} (local assets) is absent")


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
    """Write `model` in Hugging Face GPT-2 layout, as model.safetensors or (fmt "bin") pytorch_model.bin."""
    CK.save_pretrained(model, directory)
    if fmt != "safetensors":
        os.remove(os.path.join(directory, "model.safetensors"))
        torch.save(CK.hf_state_dict(model), os.path.join(directory, "pytorch_model.bin"))
    return directory


def write_tiny_bpe(directory, merges=("a b", "ab c")):
    """vocab.json + merges.txt of a small but real byte-level BPE (GPT-2's layout: every byte, then
    the merges), so tiktoken builds a tokenizer from them."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    shown = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}  # GPT-2's byte names
    vocab = {shown[b]: rank for rank, b in enumerate(printable + others)}
    for pair in merges:
        vocab["".join(pair.split())] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(p + "\n" for p in merges))


class CharTokenizer:
    """A tokenizer for tiny models: one token per printable ASCII character (id = code - 32);
    the last id is end-of-text."""

    def __init__(self, vocab_size=97):
        self.n, self.eot_token, self.n_vocab = vocab_size - 1, vocab_size - 1, vocab_size

    def encode_ordinary(self, text):
        return [ord(c) - 32 if 32 <= ord(c) < 32 + self.n else ord("?") - 32 for c in text]

    def decode_single_token_bytes(self, token):
        return b"" if token == self.eot_token else chr(token + 32).encode()

    def decode(self, tokens):
        return b"".join(self.decode_single_token_bytes(t) for t in tokens).decode()


class ScriptedDetector(S.TextOnly):
    """Fires on chosen tokens (score 1.0), else 0.0: what a port can replay exactly."""

    threshold, safe_level, matched = 0.5, None, None

    def __init__(self, alarm_tokens=()):
        self.alarm_tokens = set(alarm_tokens)
        self.tokens = S.History()

    def start(self, prompt_ids, hidden=None):
        self.tokens.rollback(0)

    def score(self, token, reading=None):
        self.tokens.append(token)
        return 1.0 if token in self.alarm_tokens else 0.0

    def rollback(self, n):
        self.tokens.rollback(n)

    def clone(self):
        twin = copy.copy(self)
        twin.tokens = S.History()
        return twin


class HashDetector(ScriptedDetector):
    """Fires on a pseudo-random `rate` of prefixes: a deterministic function of the generated text."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def start(self, prompt_ids, hidden=None):
        super().start(prompt_ids, hidden)
        return zlib.crc32(bytes(str(list(prompt_ids)), "ascii")) / 2**32  # the prompt's own verdict, flagged at >= 0.5

    def score(self, token, reading=None):
        self.tokens.append(token)
        u = zlib.crc32(bytes(str(self.tokens.all()), "ascii")) / 2**32  # uniform in [0, 1)
        return 0.5 * u / max(1 - self.rate, 1e-9)  # >= 0.5 exactly when u >= 1 - rate


def uniform(generators):
    """One uniform draw from each generator, in order: what the loop passes to sample()."""
    return [float(torch.rand(1, generator=g)) for g in generators]


def capture_cache(model, monkeypatch):
    caches = []
    new_cache = model.new_cache

    def recording(*args, **kw):
        caches.append(new_cache(*args, **kw))
        return caches[-1]
    monkeypatch.setattr(model, "new_cache", recording)
    return caches


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny model with GPT-2's vocabulary, beside the real tokenizer files from ../shared."""
    if not os.path.isdir(SHARED):
        pytest.skip(f"{SHARED} (GPT-2 tokenizer files) is absent")
    directory = str(tmp_path_factory.mktemp("cli-model"))
    save_hf_checkpoint(tiny_model(vocab_size=50257, n_positions=64), directory)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(os.path.join(SHARED, "gpt2", name), directory)
    with open(os.path.join(directory, "words.txt"), "w") as f:
        f.write("the\nand\n")
    return directory


def run_cli(capsys, *argv):
    code = cli.run_cli(backtrack_cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def sample_as(settings, logits, draws, banned, pools=None):
    """sampling.sample with a Settings' temperature, top-k and top-p."""
    return sampling.sample(logits, draws, banned, pools, settings.temperature, settings.top_k, settings.top_p)


def table_blocks(text):
    """Each run of consecutive lines that start and end with '|' in a markdown text, outside code fences:
    what a reader takes for a table."""
    blocks, current, fenced = [], [], False
    for line in text.splitlines() + [""]:
        fenced ^= line.lstrip().startswith("```")
        if line.strip().startswith("|") and line.strip().endswith("|") and not fenced:
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def assert_tables_render(text, where):
    """Every table in `text` renders as one (GitHub-flavoured markdown, parsed by markdown-it): a header
    row, and every row with the header's number of cells (a separator row of another count, and the
    renderer shows raw pipes)."""
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py is not installed")
    parser = markdown_it.MarkdownIt("commonmark").enable("table")
    for block in table_blocks(text):
        tokens = parser.parse(block)
        assert tokens and tokens[0].type == "table_open", f"{where}: not a table:\n{block[:300]}"
        rows, cells = [], 0
        for token in tokens:
            if token.type == "tr_open":
                cells = 0
            elif token.type in ("th_open", "td_open"):
                cells += 1
            elif token.type == "tr_close":
                rows.append(cells)
        header = block.splitlines()[0].strip().strip("|").split("|")
        assert len(rows) == len(block.splitlines()) - 1 and set(rows) == {len(header)}, f"{where}: {block[:300]}"
