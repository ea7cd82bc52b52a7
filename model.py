"""GPT-2 in one file, with a preallocated KV cache whose rollback is moving a pointer.

    model = from_pretrained("gpt2")              # Hub name, or a local Hugging Face directory
    enc = load_tokenizer("gpt2")                  # tiktoken Encoding, built offline when possible
    cache = model.new_cache(max_len=256)
    logits, hidden = model(idx, cache)            # prefill: writes positions [0, T) of the cache
    logits, hidden = model(next_idx, cache)       # decode: writes position T
    cache.rollback(p)                             # forget slots >= p; O(1), nothing is copied

Parameter names follow Hugging Face's GPT-2 (wte, wpe, h.N.attn.c_attn, h.N.mlp.c_fc, ln_f, ...)
so a checkpoint maps one to one; HF stores its Conv1D weights as [in, out], we use nn.Linear
([out, in]) and transpose on load.
"""
import fcntl
import hashlib
import http.client
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A problem with the user's input or files: the CLIs print it on one line and exit 2."""


def run_cli(main, argv=None):
    """Run a script's main(argv) as a command line tool: a UserError becomes one line on stderr and
    exit code 2; Ctrl-C and SIGTERM end it between two output lines with 130 and 143, and a closed
    pipe (`| head -1`) quietly with 141: never a traceback."""
    def terminate(signum, frame):
        raise KeyboardInterrupt(143)
    previous = signal.signal(signal.SIGTERM, terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        code = e.args[0] if e.args else 130
        print(f"\nstopped ({'SIGTERM' if code == 143 else 'interrupted'})", file=sys.stderr)
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def check_writable(path, option):
    """Refuse an output path that cannot be written before any slow work; create nothing there yet."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {option} {path} ({e.strerror}); choose another path")
    if os.path.isdir(path) or not os.access(path if os.path.exists(path) else directory, os.W_OK):
        raise UserError(f"cannot write {option} {path}; choose another path")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024  # the model's context length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"

    @classmethod
    def from_json(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read the model config ({e}); fix or re-download it")
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a model config is a JSON object, not {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        config.check(path)
        return config

    def check(self, where="config"):
        """Types and ranges, and whether the model fits in this machine's memory, before building it."""
        def whole(name, low=1):
            value = getattr(self, name)
            if type(value) is not int or value < low:
                raise UserError(f"{where}: {name} must be an integer >= {low}, not {value!r}")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            whole(name)
        if self.n_inner is not None:
            whole("n_inner")
        if self.n_embd % self.n_head:
            raise UserError(f"{where}: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        eps = self.layer_norm_epsilon
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0):
            raise UserError(f"{where}: layer_norm_epsilon must be a positive number, not {eps!r}")
        if self.activation_function not in ACTIVATIONS:
            raise UserError(f"{where}: unsupported activation_function {self.activation_function!r}; "
                            f"supported: {', '.join(ACTIVATIONS)}")
        C, inner = self.n_embd, self.n_inner or 4 * self.n_embd
        params = (self.vocab_size + self.n_positions) * C + self.n_layer * (4 * C * C + 2 * C * inner + 13 * C)
        cache = 2 * self.n_layer * self.n_positions * C  # one row of the KV cache
        need = 4 * (params + cache)  # float32 bytes
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        if have and need > 0.8 * have:
            raise UserError(f"{where}: this model needs about {need / 2**30:.1f} GiB, more than this machine's "
                            f"{have / 2**30:.1f} GiB of memory allows; check the config")


PRESETS = {  # the published GPT-2 family; all share vocab_size 50257 and n_positions 1024
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
}
HUB_REPOS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
             "distilgpt2": "distilbert/distilgpt2"}
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class KVCache:
    """Keys and values of every layer, preallocated once: (n_layer, batch, n_head, max_len, head_dim).

    Each row holds its own text: slots [0, lengths[row]) of that row are valid. A forward pass writes
    a row's new tokens at its length and moves it forward; rollback moves it back. Stale entries past
    a row's length are never read and are overwritten later.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        # one row only ever reads slots it wrote. Rows of a batch attend over the longest row's slots
        # with the rest masked out, and a masked weight of 0 times uninitialised NaN is still NaN: zeros
        new = torch.empty if batch_size == 1 else torch.zeros
        self.k = new(shape, device=device, dtype=dtype)
        self.v = new(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * batch_size

    @property
    def length(self):
        """The length of a one-row cache (the single-sequence case)."""
        (length,) = self.lengths
        return length

    def rollback(self, slot, row=0):
        """Forget slots >= `slot` of `row`: O(1), nothing is copied."""
        if not 0 <= slot <= self.lengths[row]:
            raise ValueError(f"cannot roll back to slot {slot}: the cache holds {self.lengths[row]}")
        self.lengths[row] = slot


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, cache, layer, rows, starts):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif rows is None and len(set(starts)) == 1:
            # every row continues at the same slot (always so for one sequence): plain slices
            start, end = starts[0], starts[0] + T
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
            # query t sits at slot start + t and may see keys 0 .. start + t
            mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # rows at different lengths: each writes at its own slots and sees only its own keys
            slot = torch.tensor(starts, device=x.device)[:, None] + torch.arange(T, device=x.device)  # (B, T)
            index = torch.arange(B, device=x.device) if rows is None else torch.tensor(rows, device=x.device)
            cache.k[layer][index[:, None], :, slot] = k.transpose(1, 2)
            cache.v[layer][index[:, None], :, slot] = v.transpose(1, 2)
            end = max(starts) + T
            k, v = (c[layer, :, :, :end] if rows is None else c[layer][index, :, :end] for c in (cache.k, cache.v))
            mask = torch.arange(end, device=x.device) <= slot[:, :, None]  # (B, T, end)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cache, layer, rows, starts):
        x = x + self.attn(self.ln_1(x), cache, layer, rows, starts)
        return x + self.mlp(self.ln_2(x))


class PackedLinear(nn.Module):
    """An nn.Linear with its weight prepacked for oneDNN (CPU, float32).

    One-token decoding on a CPU is bound by streaming the weights from memory, and the default
    one-row matmul streams them at about half the speed oneDNN's kernel does (bench.py shows the
    result: ~1.6x more tokens/s). Results differ from nn.Linear only by summation order (~1e-6 relative).
    """

    def __init__(self, linear):
        super().__init__()
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        self.weight = linear.weight.detach().to_mkldnn()
        self.bias = bias.detach().to_mkldnn()

    def forward(self, x):
        return torch._C._nn.mkldnn_linear(x.to_mkldnn(), self.weight, self.bias).to_dense()


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.check()
        self.config = config
        self.name_or_path = None  # set by from_pretrained; probes record it
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def pack_for_cpu(self):
        """Swap every nn.Linear (the tied head too, as a packed copy) for a PackedLinear.

        Only for inference on the CPU in float32; elsewhere the model is returned unchanged.
        """
        weight = self.wte.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return self
        self.fingerprint = weights_fingerprint(self)  # packed weights leave the state dict
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, PackedLinear(child))
        return self

    def new_cache(self, max_len=None, batch_size=1):
        max_len = max_len or self.config.n_positions
        if max_len > self.config.n_positions:
            raise UserError(f"a cache of {max_len} positions exceeds the model's context of "
                            f"{self.config.n_positions}; ask for at most {self.config.n_positions}")
        return KVCache(self.config, batch_size, max_len, self.wte.weight.device, self.wte.weight.dtype)

    def forward(self, idx, cache=None, which_logits="all", rows=None):
        """idx (B, T) -> (logits, hidden).

        With a cache, idx continues the cached text: row i of idx is written at the slots after what
        cache row rows[i] holds (rows=None: every cache row, in order), so rows of different lengths
        decode together, each attending only to its own text.
        which_logits: "all" positions (B, T, V), "last" position only (B, 1, V), or "none" (None),
        which spares the vocabulary projection when only hidden states are wanted.
        hidden: n_layer + 1 tensors (B, T, C), as Hugging Face's output_hidden_states: hidden[0] is
        the embeddings, hidden[l] the residual stream after block l, and hidden[-1] the final state
        after ln_f. Detectors read them, so scoring a token costs no extra forward pass.
        """
        B, T = idx.shape
        if cache is None:
            starts = [0] * B
        else:
            starts = [cache.lengths[r] for r in (rows if rows is not None else range(len(cache.lengths)))]
            if len(starts) != B:
                raise ValueError(f"{B} rows of tokens for {len(starts)} cache rows")
        end = max(starts) + T
        if end > self.config.n_positions:
            raise UserError(f"{end} tokens exceed the model's context of {self.config.n_positions}; "
                            "use a shorter prompt or fewer new tokens")
        if cache is not None and end > cache.max_len:
            raise UserError(f"{end} tokens overflow the KV cache of {cache.max_len} positions; "
                            "make the cache larger")
        if len(set(starts)) == 1:
            pos = torch.arange(starts[0], starts[0] + T, device=idx.device)
        else:
            pos = torch.tensor(starts, device=idx.device)[:, None] + torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        hidden = [x]
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer, rows, starts)
            hidden.append(x)
        hidden[-1] = x = self.ln_f(x)
        if cache is not None:
            for r, start in zip(rows if rows is not None else range(B), starts):
                cache.lengths[r] = start + T
        if which_logits == "none":
            return None, hidden
        return self.lm_head(x if which_logits == "all" else x[:, -1:]), hidden


def weights_fingerprint(model):
    """A short hash of the config and of a strided sample of every tensor (scorer.model_fingerprint)."""
    h = hashlib.sha256(json.dumps(model.config.__dict__, sort_keys=True).encode())
    state = model.state_dict()
    for name in sorted(state):
        flat = state[name].detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)].float().cpu().numpy().round(4)
        h.update(name.encode() + str(tuple(state[name].shape)).encode() + sample.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading checkpoints in Hugging Face layout

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# buffers that old checkpoints carry (the causal mask) and the tied head: not parameters of ours
IGNORED = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def cache_root():
    """Where downloads and fitted probes are kept: $BACKTRACK_CACHE, else ~/.cache/backtrack."""
    return os.environ.get("BACKTRACK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "backtrack"))


def shared_path(*parts):
    """A path inside the local assets folder: $BACKTRACK_SHARED, else ../shared beside this file."""
    root = os.environ.get("BACKTRACK_SHARED", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared"))
    return os.path.join(root, *parts)


def progress(items, desc):
    """A progress bar on stderr: redrawn in place on a terminal, a line every 10% in a log."""
    total, start, tty = len(items), time.time(), sys.stderr.isatty()
    for i, item in enumerate(items, 1):
        yield item
        if i == total or i % max(1, total // (50 if tty else 10)) == 0:
            rate = i / max(time.time() - start, 1e-9)
            print(f"{chr(13) if tty else ''}  {desc} {i}/{total} [{'#' * (30 * i // total):<30}] "
                  f"{(total - i) / rate:4.0f}s left ", end="\n" if i == total or not tty else "",
                  file=sys.stderr, flush=True)


def download(url, path):
    """Fetch url to path with a progress bar on stderr, verified: the body must have the announced
    Content-Length and, for files the Hub stores in LFS, the sha256 it announces (X-Linked-Etag).
    The body goes to a temporary file of this process's own, renamed into place only when whole,
    so a reader never sees half a file and concurrent downloaders never mix their bytes."""
    directory = os.path.dirname(path)
    fd, part = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".part")
    try:
        with urllib.request.urlopen(url) as r, os.fdopen(fd, "wb") as f:
            total, done, sha = int(r.headers.get("Content-Length") or 0), 0, hashlib.sha256()
            while chunk := r.read(1 << 20):
                f.write(chunk)
                sha.update(chunk)
                done += len(chunk)
                if total:
                    bar = "#" * min(30, 30 * done // total)
                    print(f"\r  {os.path.basename(path)} [{bar:<30}] {done >> 20}/{total >> 20} MB",
                          end="", file=sys.stderr, flush=True)
            expected = (r.headers.get("X-Linked-Etag") or "").strip('"').removeprefix("W/").strip('"')
        print(file=sys.stderr)
        if total and done != total:
            raise UserError(f"the download of {url} was cut off ({done} of {total} bytes); run again to retry")
        if len(expected) == 64 and sha.hexdigest() != expected:
            raise UserError(f"the download of {url} is corrupt (sha256 {sha.hexdigest()[:12]}..., the Hub says "
                            f"{expected[:12]}...); run again to retry")
        os.replace(part, path)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError; InvalidURL a ValueError
        raise UserError(f"cannot download {url} ({type(e).__name__}: {e}); check your connection, or pass a local "
                        "directory with config.json, model.safetensors, vocab.json and merges.txt")
    finally:
        if os.path.exists(part):
            os.remove(part)


def hub_url():
    """The Hub, or the mirror $HF_ENDPOINT names (the variable Hugging Face's own tools read)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def resolve_checkpoint(name_or_dir, refetch=False):
    """A local directory as is; a Hub name is downloaded once into the cache directory (again with
    refetch, after a cached file failed to load). Concurrent first runs take a lock, so one downloads
    and the others wait and reuse its files."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    looks_local = name_or_dir.startswith(("./", "../", "/", "~", ".\\")) or os.path.exists(name_or_dir)
    if looks_local:
        raise UserError(f"{name_or_dir} is not a directory; point it at a Hugging Face checkpoint directory")
    if not HUB_NAME.fullmatch(name_or_dir) or ".." in name_or_dir:
        raise UserError(f"{name_or_dir!r} is not a model name: use a local directory, one of {', '.join(HUB_REPOS)}, "
                        "or a Hub repo 'owner/name' (letters, digits, '.', '_', '-')")
    if name_or_dir not in HUB_REPOS and "/" not in name_or_dir:
        raise UserError(f"{name_or_dir!r} is neither a directory nor a known model; use one of "
                        f"{', '.join(HUB_REPOS)}, a Hub repo 'owner/name', or a local directory")
    repo = HUB_REPOS.get(name_or_dir, name_or_dir)
    local = os.path.join(cache_root(), repo.replace("/", "--"))
    files = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
    if not refetch and all(os.path.exists(os.path.join(local, name)) for name in files):
        return local
    os.makedirs(cache_root(), exist_ok=True)
    with open(os.path.join(cache_root(), repo.replace("/", "--") + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        created = not os.path.isdir(local)
        os.makedirs(local, exist_ok=True)
        try:
            for name in files:
                path = os.path.join(local, name)
                if refetch or not os.path.exists(path):
                    print(f"downloading {repo}/{name} into {local}", file=sys.stderr)
                    download(f"{hub_url()}/{repo}/resolve/main/{name}", path)
        except UserError:
            if created and not os.listdir(local):
                os.rmdir(local)  # no empty folders left behind for a typo
            raise
    return local


def read_state_dict(path):
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt files fail in many ways; all mean the same
        raise UserError(f"{path}: cannot read the weights ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "the file is truncated or corrupt: re-download it")


def from_pretrained(name_or_dir, device="cpu", dtype=torch.float32):
    """Load a GPT-2 checkpoint from a Hugging Face directory or Hub name (downloaded once)."""
    directory = resolve_checkpoint(name_or_dir)
    try:
        return load_checkpoint(directory, name_or_dir, device, dtype)
    except UserError as e:
        if directory == name_or_dir or "truncated or corrupt" not in str(e):
            raise
        print(f"{e}: downloading it again", file=sys.stderr)  # a damaged file in our own cache
        return load_checkpoint(resolve_checkpoint(name_or_dir, refetch=True), name_or_dir, device, dtype)


def load_checkpoint(directory, name_or_dir, device, dtype):
    config_path = os.path.join(directory, "config.json")
    if os.path.exists(config_path):
        config = GPTConfig.from_json(config_path)
    elif name_or_dir in PRESETS:
        config = GPTConfig(**PRESETS[name_or_dir])
    else:
        raise UserError(f"{directory}: no config.json; add the checkpoint's config.json")
    weights = next((os.path.join(directory, w) for w in WEIGHT_FILES
                    if os.path.exists(os.path.join(directory, w))), None)
    if weights is None:
        raise UserError(f"{directory}: no {' or '.join(WEIGHT_FILES)}; download the checkpoint's weights")
    loaded = read_state_dict(weights)

    model = GPT(config)
    expected = model.state_dict()
    expected.pop("lm_head.weight")  # tied to wte
    state = {}
    for key, tensor in loaded.items():
        key = key.removeprefix("transformer.")
        if key.endswith(IGNORED):
            continue
        if key not in expected:
            raise UserError(f"{weights}: unexpected tensor {key!r}; is this a GPT-2 checkpoint?")
        if not tensor.is_floating_point():  # an integer tensor cast to float would load silently wrong
            raise UserError(f"{weights}: tensor {key!r} holds {tensor.dtype}, not floating-point weights; "
                            "the file is not a GPT-2 checkpoint")
        if not torch.isfinite(tensor).all():
            raise UserError(f"{weights}: tensor {key!r} holds NaN or infinite values; the checkpoint is "
                            "broken: re-download or re-export it")
        if key.endswith(CONV1D) and tensor.dim() == 2:
            tensor = tensor.t()
        if tensor.shape != expected[key].shape:
            raise UserError(f"{weights}: tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                            f"needs {tuple(expected[key].shape)}; config.json and weights disagree")
        state[key] = tensor
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(f"{weights}: missing tensor {missing[0]!r} ({len(missing)} missing); "
                        "the checkpoint is incomplete: re-download it")
    model.load_state_dict(state, strict=False)
    model.name_or_path = name_or_dir
    return model.to(device=device, dtype=dtype).eval()


def load(name_or_dir="gpt2", device="auto", dtype="float32"):
    """(model, tokenizer) as the command line loads them: a Hub name or a local Hugging Face directory,
    on the best device, weights packed for the CPU's fast kernels when running there."""
    device = pick_device(device)
    model = from_pretrained(name_or_dir, device=device, dtype=pick_dtype(dtype, device)).pack_for_cpu()
    return model, load_tokenizer(name_or_dir)


def load_tokenizer(name_or_dir=None):
    """GPT-2's BPE as a tiktoken Encoding, built offline from a checkpoint's vocabulary files.

    Falls back to tiktoken.get_encoding("gpt2"), which downloads the same files once.
    """
    import tiktoken
    import tiktoken.load
    directory = resolve_checkpoint(name_or_dir) if name_or_dir else None
    for vocab, merges in TOKENIZER_FILES:
        if directory and all(os.path.exists(os.path.join(directory, f)) for f in (vocab, merges)):
            vocab, merges = os.path.join(directory, vocab), os.path.join(directory, merges)
            # tiktoken caches files by path; passing the content hash keeps that cache honest
            sha = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (vocab, merges)}
            try:
                ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(merges, vocab, sha[merges], sha[vocab])
            except (AssertionError, ValueError, KeyError) as e:
                raise UserError(f"{vocab} and {merges} do not form a GPT-2 BPE ({type(e).__name__}); "
                                "re-download them")
            return tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": len(ranks)})
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"cannot fetch the GPT-2 tokenizer ({type(e).__name__}); pass a directory that "
                        "holds vocab.json + merges.txt (or encoder.json + vocab.bpe)")


# GPT-2's pre-tokeniser split (tiktoken's r50k pattern)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


# ---------------------------------------------------------------------------------------------
# Device and dtype

def set_threads(n):
    """--threads of every script: torch's CPU threads, or torch's own choice when n is None."""
    if n is not None:
        if n < 1:
            raise UserError(f"--threads must be >= 1, not {n}")
        torch.set_num_threads(n)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    return name


def pick_dtype(name, device):
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
    if name != "float32" and device == "cpu":
        raise UserError(f"--dtype {name} is for GPUs; on the CPU use float32")
    return DTYPES[name]
