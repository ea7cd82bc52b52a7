"""GPT-2 in one file, with a preallocated KV cache whose rollback is moving a pointer.

    model = checkpoints.from_pretrained("gpt2")   # a Hub name or a local Hugging Face directory
    cache = model.new_cache(max_len=256)
    logits, hidden = model(idx, cache)            # prefill: writes positions [0, T) of the cache
    logits, hidden = model(next_idx, cache)       # decode: writes position T
    cache.rollback(p)                             # forget slots >= p; O(1), nothing is copied
    tokens = sample(logits[:, -1], settings, draws, banned)   # one token id per row

Parameter names follow Hugging Face's GPT-2 (wte, wpe, h.N.attn.c_attn, h.N.mlp.c_fc, ln_f, ...)
so a checkpoint maps one to one (GPT.from_hf_state_dict); HF stores its Conv1D weights as
[in, out], we use nn.Linear ([out, in]) and transpose on load. Finding and reading the files is
checkpoints.py's job.
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError


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
    def from_dict(cls, raw, where="config"):
        """The fields we use from a Hugging Face config.json (others are ignored), checked."""
        if not isinstance(raw, dict):
            raise UserError(f"{where}: a model config is a JSON object, not {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        config.check(where)
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

    def forward(self, x, cache, layer, start, ragged):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif ragged is None:
            # every row of the cache continues at the same slot (always so for one sequence): plain slices
            end = start + T
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
            # query t sits at slot start + t and may see keys 0 .. start + t
            mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # rows at different lengths, or some rows only: each writes at its own slots, sees only its own keys
            index, places, mask, every_row = ragged
            D = C // self.n_head
            cache.k[layer].view(-1, D)[places] = k.reshape(-1, D)  # one indexed write per cache
            cache.v[layer].view(-1, D)[places] = v.reshape(-1, D)
            end = mask.shape[-1]
            k, v = (c[layer, :, :, :end] if every_row else c[layer][index, :, :end] for c in (cache.k, cache.v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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

    def forward(self, x, cache, layer, start, ragged):
        x = x + self.attn(self.ln_1(x), cache, layer, start, ragged)
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


# Hugging Face's names: Conv1D weights to transpose, and what old checkpoints carry that is not a
# parameter of ours (the causal mask buffers) or is tied to wte (the head).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.check()
        self.config = config
        self.name_or_path = None  # set by checkpoints.from_pretrained; probes record it
        self.fingerprint = None  # the weights' fingerprint, once taken (see weights_fingerprint)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    @classmethod
    def from_hf_state_dict(cls, config, state, where="weights"):
        """A model from a Hugging Face GPT-2 state dict: names mapped, Conv1D weights transposed, and
        every tensor checked (known name, floating point, finite, the shape the config asks for)."""
        model = cls(config)
        expected = model.state_dict()
        expected.pop("lm_head.weight")  # tied to wte
        mapped = {}
        for key, tensor in state.items():
            key = key.removeprefix("transformer.")
            if key.endswith(IGNORED):
                continue
            if key not in expected:
                raise UserError(f"{where}: unexpected tensor {key!r}; is this a GPT-2 checkpoint?")
            if not tensor.is_floating_point():  # an integer tensor cast to float would load silently wrong
                raise UserError(f"{where}: tensor {key!r} holds {tensor.dtype}, not floating-point weights; "
                                "the file is not a GPT-2 checkpoint")
            if not torch.isfinite(tensor).all():
                raise UserError(f"{where}: tensor {key!r} holds NaN or infinite values; the checkpoint is "
                                "broken: re-download or re-export it")
            if key.endswith(CONV1D) and tensor.dim() == 2:
                tensor = tensor.t()
            if tensor.shape != expected[key].shape:
                raise UserError(f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                                f"needs {tuple(expected[key].shape)}; config.json and weights disagree")
            mapped[key] = tensor
        missing = [k for k in expected if k not in mapped]
        if missing:
            raise UserError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing); "
                            "the checkpoint is incomplete: re-download it")
        model.load_state_dict(mapped, strict=False)
        return model.eval()

    def pack_for_cpu(self):
        """Swap every nn.Linear (the tied head too, as a packed copy) for a PackedLinear.

        Only for inference on the CPU in float32; elsewhere the model is returned unchanged.
        """
        weight = self.wte.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return self
        self.fingerprint = self.fingerprint or weights_fingerprint(self)  # packed weights leave the state dict
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
        ragged = None
        aligned = len(set(starts)) == 1  # every row continues at the same slot
        if aligned:
            pos = torch.arange(starts[0], starts[0] + T, device=idx.device)
        else:
            pos = torch.tensor(starts, device=idx.device)[:, None] + torch.arange(T, device=idx.device)
        if cache is not None and (rows is not None or not aligned):
            # where each row writes (its cache row, its slots) and which keys it may see, built once for
            # every layer: in each layer they were a host-to-device copy and several kernel launches
            index = torch.arange(B, device=idx.device) if rows is None else torch.tensor(rows, device=idx.device)
            slot = pos.expand(B, T)
            heads = torch.arange(self.config.n_head, device=idx.device)[:, None]
            # where each new key goes in a layer's cache seen as rows x heads x slots vectors, in k's order
            places = ((index[:, None, None] * self.config.n_head + heads) * cache.max_len + slot[:, None]).reshape(-1)
            seen = torch.arange(end, device=idx.device) <= slot[:, :, None]  # (B, T, end): the keys each query sees
            # as 0 / -inf added to the scores: attention turns a boolean mask into this in every layer's call
            mask = torch.zeros_like(seen, dtype=self.wte.weight.dtype).masked_fill(~seen, float("-inf"))[:, None]
            ragged = (index, places, mask, rows is None)
        x = self.wte(idx) + self.wpe(pos)
        hidden = [x]
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer, starts[0], ragged)
            hidden.append(x)
        hidden[-1] = x = self.ln_f(x)
        if cache is not None:
            for r, start in zip(rows if rows is not None else range(B), starts):
                cache.lengths[r] = start + T
        if which_logits == "none":
            return None, hidden
        return self.lm_head(x if which_logits == "all" else x[:, -1:]), hidden


def weights_fingerprint(model):
    """A hash of the config and of every weight, bit for bit (as float32, so the same checkpoint has
    one fingerprint on every device and dtype): any change to any weight (a fine-tune, a merged LoRA,
    two embedding rows swapped) gives another, so it gets its own probe. checkpoints.from_pretrained
    takes it once per weights file, before casting to the device's dtype."""
    h = hashlib.sha256(json.dumps(model.config.__dict__, sort_keys=True).encode())
    state = model.state_dict()
    for name in sorted(state):
        if name == "lm_head.weight":  # tied to wte
            continue
        tensor = state[name].detach().float().cpu().contiguous()
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(memoryview(tensor.numpy()).cast("B"))  # no copy
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Sampling: what the logits become


GREEDY_BELOW = 1e-6  # a temperature this small is greedy: dividing logits by it would overflow


def sample(logits, settings, draws, banned, pools=None):
    """One token id per row of next-token logits (B, V) and uniform draws (B,) in [0, 1], never one of
    that row's `banned` ids and, where pools[row] > 0, always one of its pools[row] likeliest ids (ties
    at the cut included); -1 where nothing can be sampled (every candidate banned, or logits that are
    not numbers). settings: its temperature, top_k and top_p (backtrack.Settings). Greedy decoding
    ignores the draws. The decoding loop (backtrack.py) decides what is banned and pooled where."""
    logits = logits.float()
    vocab = logits.shape[1]
    pools = pools or [0] * len(banned)
    best, greedy = logits.max(-1)  # a NaN anywhere makes the max NaN
    cut = [row for row, (ids, k) in enumerate(zip(banned, pools)) if ids or 0 < k < vocab]
    if cut:  # only these rows are copied and cut: copying every row's logits costs more than the cuts
        rows = logits[cut]
        for j, row in enumerate(cut):
            if 0 < pools[row] < vocab:  # the pool is cut first, so bans use it up
                rows[j].masked_fill_(rows[j] < torch.topk(rows[j], pools[row]).values[-1], float("-inf"))
            rows[j, list(banned[row])] = float("-inf")
        where = torch.tensor(cut, device=logits.device)
        best[where], greedy[where] = rows.max(-1)  # all banned makes the max -inf
    broken = ~torch.isfinite(best)
    if settings.temperature < GREEDY_BELOW:
        return torch.where(broken, -1, greedy).tolist()
    if cut:
        logits = logits.index_copy(0, where, rows)
    if broken.any():
        logits = torch.where(broken[:, None], 0.0, logits)  # sample something harmless; these rows get -1
    probs = (logits / settings.temperature).softmax(-1)
    broken |= ~torch.isfinite(probs).all(-1)  # logits so large that dividing by the temperature overflowed
    ids = None
    if settings.top_k or settings.top_p < 1:
        probs, ids = candidates(probs, settings.top_k, settings.top_p)
    # inverse CDF with one uniform draw per row; side="right" never lands on a zero-probability token
    cdf = probs.cumsum(-1)
    u = torch.tensor(draws, dtype=cdf.dtype, device=cdf.device)
    i = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], side="right")[:, 0]
    i = torch.minimum(i, cdf.argmax(-1))  # a draw of exactly 1 (some backends' rand can return it) stays in range
    tokens = i if ids is None else ids.gather(1, i[:, None])[:, 0]
    tokens = torch.where(broken, -1, tokens).tolist()
    return [-1 if t in ids_banned else t for t, ids_banned in zip(tokens, banned)]  # never a banned token


def candidates(probs, top_k, top_p):
    """The tokens each row may draw under top-k and top-p, by falling probability: (probs, ids), both
    (B, k), with probability 0 past a row's cut. Sorting GPT-2's whole vocabulary takes 3 ms on a CPU,
    more than a forward pass of a small model, so each row widens a topk until it holds top_p of its mass."""
    n = min(top_k or probs.shape[1], probs.shape[1])
    k = min(n, 256)
    top, ids = torch.topk(probs, k)
    short = top.sum(-1) < top_p
    while k < n and bool(short.any()):
        k = min(n, 8 * k)
        top, ids = F.pad(top, (0, k - top.shape[1])), F.pad(ids, (0, k - ids.shape[1]))
        top[short], ids[short] = torch.topk(probs[short], k)
        short = top.sum(-1) < top_p
    if top_p < 1:
        top = top * (top.cumsum(-1) - top < top_p)  # the smallest prefix whose mass reaches top_p
    return top, ids
