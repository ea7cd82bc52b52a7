"""GPT-2 and the Llama family (Llama, SmolLM2, Qwen2) in one file, with a preallocated KV cache whose
rollback is moving a pointer.

    model = GPT(GPTConfig())                        # random weights; checkpoints.from_pretrained("gpt2") loads them
    model = Llama(config)                           # the same for a Llama, Qwen2 or SmolLM2 checkpoint
    cache = model.new_cache()
    logits, hidden = model(idx, cache)              # prefill: writes positions [0, T) of the cache
    logits, hidden = model(next_idx, cache)         # decode: writes position T
    cache.rollback(p)                               # forget slots >= p; O(1), nothing is copied

Parameter names follow Hugging Face's GPT-2 (wte, wpe, h.N.attn.c_attn, h.N.mlp.c_fc, ln_f, ...) so a
checkpoint maps one to one (HF's Conv1D weights are transposed on load). A Llama is the same network
with three parts swapped (RMSNorm for LayerNorm, a gated SiLU MLP, rotary positions instead of learned
ones) and fewer key/value heads than query heads; its checkpoint's names are mapped onto GPT-2's (q, k,
v fused into c_attn, as GPT-2 stores them; gate and up fused into c_fc), so one forward pass and one
cache serve both. Reading config.json and mapping a checkpoint's names is checkpoints.py's work. Nothing
here imports the rest of the project: a bad config is a ValueError, which the command lines turn into
their one-line errors.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def check(self, where="config"):
        """Types and ranges, before a model is built from them."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if not (name == "n_inner" and value is None) and (type(value) is not int or value < 1):
                raise ValueError(f"{where}: {name} must be an integer >= 1, not {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"{where}: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        eps = self.layer_norm_epsilon
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"{where}: layer_norm_epsilon must be a positive number, not {eps!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"{where}: unsupported activation_function {self.activation_function!r}; "
                             f"supported: {', '.join(ACTIVATIONS)}")

    # what the attention and the cache read of every family's config
    n_kv_head = property(lambda self: self.n_head)
    head_dim = property(lambda self: self.n_embd // self.n_head)


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class KVCache:
    """Keys and values of every layer, preallocated once: (n_layer, rows, n_kv_head, max_len, head_dim).

    Slots [0, length) are valid. A forward pass claims the slots its new tokens take (the length moves
    past them) and each layer writes its keys and values there; rollback moves the length back.
    Stale entries past the length are never read and are overwritten later. One row: one text, as
    gpt-fast's cache; BatchCache (below) holds many texts at different lengths.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        # one row only ever reads slots it wrote. Rows of a batch attend over the longest row's slots
        # with the rest masked out, and a masked weight of 0 times uninitialised NaN is still NaN: zeros
        new = torch.empty if batch_size == 1 else torch.zeros
        self.k = new(shape, device=device, dtype=dtype)
        self.v = new(shape, device=device, dtype=dtype)
        self.max_len, self.n_positions = max_len, config.n_positions
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

    def share(self, length):
        """Row 0's first `length` slots copied to every other row, each row cut to them: continuations
        of one prompt read it once (evaluate.py's perplexity)."""
        if not 0 <= length <= self.lengths[0]:
            raise ValueError(f"cannot share slot {length} of row 0: it holds {self.lengths[0]}")
        self.k[:, 1:, :, :length], self.v[:, 1:, :, :length] = self.k[:, :1, :, :length], self.v[:, :1, :, :length]
        self.lengths = [length] * len(self.lengths)

    def claim(self, T, rows=None):
        """The slots of T new tokens, claimed before a forward writes them: (their positions (T,), the
        first of them, for update()). The length moves past them now."""
        if rows not in (None, [0]):
            raise ValueError(f"a one-row cache has no rows {rows}; use model.new_cache(batch_size=...)")
        start = self.fits(self.lengths, T)
        self.lengths[0] = start + T
        return torch.arange(start, start + T, device=self.k.device), start

    def fits(self, starts, T):
        """The first slot of T tokens after the longest of `starts`, checked against the model's
        context and the cache's room."""
        end = max(starts) + T
        if end > self.n_positions:
            raise ValueError(f"{end} tokens exceed the model's context of {self.n_positions}; "
                             "use a shorter prompt or fewer new tokens")
        if end > self.max_len:
            raise ValueError(f"{end} tokens overflow the KV cache of {self.max_len} positions; make the cache larger")
        return end - T

    def update(self, layer, k, v, start):
        """Store a layer's new keys and values (B, H, T, D) at slot `start` and return what the queries
        attend over, with the mask (none for one query: it sees every key)."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end], self.v[layer, :, :, start:end] = k, v
        # query t sits at slot start + t and may see keys 0 .. start + t
        mask = None if k.shape[2] == 1 else torch.ones(k.shape[2], end, dtype=torch.bool, device=k.device).tril(start)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask


class Ragged(NamedTuple):
    """Where a forward pass for rows at different lengths (or for some cache rows only) writes, and what
    each query may see: built once per forward, used by every layer. Static shapes, as JAX would want."""
    rows: torch.Tensor  # (B,): the cache row of each input row
    places: torch.Tensor  # (B * H * T,): the flat index (cache row, head, slot) of each new key, in k's order
    mask: torch.Tensor  # (B, 1, T, end): 0 where a query may see a cached key, -inf where it may not
    every_row: bool  # rows is every cache row, in order: attend over the cache as it is


class BatchCache(KVCache):
    """Many texts, a row each, every row with its own length (batched.py's engine). A forward writes
    row i of its input after what cache row rows[i] holds (rows None: every row, in order); rows at
    different lengths decode together, each attending only to its own text."""

    def claim(self, T, rows=None):
        """(positions (T,) or (B, T), where update() writes: the first slot when every row continues at
        one slot, else a Ragged); each row's length moves past its new tokens."""
        index = range(len(self.lengths)) if rows is None else rows
        starts = [self.lengths[r] for r in index]
        end = self.fits(starts, T) + T
        for r in index:
            self.lengths[r] += T
        device = self.k.device
        steps = torch.arange(T, device=device)
        if rows is None and len(set(starts)) == 1:  # every row continues at the same slot: plain slices
            return starts[0] + steps, starts[0]
        slot = torch.tensor(starts, device=device)[:, None] + steps  # (B, T)
        H = self.k.shape[2]
        row_index = torch.tensor(list(index), device=device)
        heads = torch.arange(H, device=device)[:, None]
        places = ((row_index[:, None, None] * H + heads) * self.max_len + slot[:, None]).reshape(-1)
        seen = torch.arange(end, device=device) <= slot[:, :, None]  # (B, T, end): the keys each query sees
        # as 0 / -inf added to the scores: attention would turn a boolean mask into this in every layer
        mask = torch.zeros_like(seen, dtype=self.k.dtype).masked_fill(~seen, float("-inf"))[:, None]
        return slot, Ragged(row_index, places, mask, rows is None)

    def update(self, layer, k, v, where):
        if not isinstance(where, Ragged):
            return super().update(layer, k, v, where)
        D = k.shape[-1]
        self.k[layer].view(-1, D)[where.places] = k.reshape(-1, D)  # one indexed write per cache
        self.v[layer].view(-1, D)[where.places] = v.reshape(-1, D)
        end = where.mask.shape[-1]
        if where.every_row:
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end], where.mask
        return self.k[layer][where.rows, :, :end], self.v[layer][where.rows, :, :end], where.mask


class Attention(nn.Module):
    """Causal self-attention over the cache. GPT-2 has as many key/value heads as query heads; a Llama
    may have fewer (grouped-query attention: each key/value head serves n_head // n_kv_head query
    heads, and the cache holds only those), and rotates queries and keys by their positions (rope)."""

    def __init__(self, config, qkv_bias=True, out_bias=True):
        super().__init__()
        self.heads = (config.n_head, config.n_kv_head, config.head_dim)
        H, KH, D = self.heads
        self.c_attn = nn.Linear(config.n_embd, (H + 2 * KH) * D, bias=qkv_bias)
        self.c_proj = nn.Linear(H * D, config.n_embd, bias=out_bias)

    def forward(self, x, cache, layer, where, rope=None):
        B, T, _ = x.shape
        H, KH, D = self.heads
        q, k, v = self.c_attn(x).split([H * D, KH * D, KH * D], dim=2)
        q, k, v = q.view(B, T, H, D).transpose(1, 2), k.view(B, T, KH, D).transpose(1, 2), v.view(B, T, KH, D).transpose(1, 2)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KH != H)
        else:
            k, v, mask = cache.update(layer, k, v, where)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=KH != H)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))


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

    def forward(self, x, cache, layer, where, rope=None):
        x = x + self.attn(self.ln_1(x), cache, layer, where, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.check()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def new_cache(self, max_len=None, batch_size=1):
        max_len = max_len or self.config.n_positions
        if max_len > self.config.n_positions:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's context of "
                             f"{self.config.n_positions}; ask for at most {self.config.n_positions}")
        kind = KVCache if batch_size == 1 else BatchCache
        return kind(self.config, batch_size, max_len, self.wte.weight.device, self.wte.weight.dtype)

    def forward(self, idx, cache=None, which_logits="all", rows=None, keep=None):
        """idx (B, T) -> (logits, hidden).

        With a cache, idx continues the cached text: row i of idx is written at the slots after what
        cache row rows[i] holds (rows=None: every cache row, in order), so rows of different lengths
        decode together, each attending only to its own text.
        which_logits: "all" positions (B, T, V), "last" position only (B, 1, V), or "none" (None),
        which spares the vocabulary projection when only hidden states are wanted.
        hidden: n_layer + 1 tensors (B, T, C), as Hugging Face's output_hidden_states: hidden[0] is
        the embeddings, hidden[l] the residual stream after block l, and hidden[-1] the final state
        after ln_f. Detectors read them, so scoring a token costs no extra forward pass. keep: the
        indices of the states to hold (None where not kept; default every one): gpt2-xl's 49 states
        of a batch are half a GB, and a probe's fit reads 7.
        """
        T = idx.shape[1]
        if cache is None:
            if T > self.config.n_positions:
                raise ValueError(f"{T} tokens exceed the model's context of {self.config.n_positions}; "
                                 "use a shorter prompt or fewer new tokens")
            pos, where = torch.arange(T, device=idx.device), None
        else:
            if len(cache.lengths if rows is None else rows) != idx.shape[0]:
                raise ValueError(f"{idx.shape[0]} rows of tokens for {len(cache.lengths if rows is None else rows)} "
                                 "cache rows")
            pos, where = cache.claim(T, rows)  # the slots the new tokens take; the cache's length moves past them
        x, rope = self.embed(idx, pos)
        hidden = [x if keep is None or 0 in keep else None]
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer, where, rope)
            hidden.append(x if keep is None or layer + 1 in keep else None)
        x = self.ln_f(x)
        hidden[-1] = x if keep is None or len(self.h) in keep else None
        if which_logits == "none":
            return None, hidden
        return self.lm_head(x if which_logits == "all" else x[:, -1:]), hidden

    def embed(self, idx, pos):
        """The first residual stream, and the rotary angles a Llama's attention needs (GPT-2: None)."""
        return self.wte(idx) + self.wpe(pos), None


# ----------------------------------------------------------------------------------------------
# The Llama family: Llama 2/3, SmolLM2, TinyLlama, Qwen2 (q/k/v with bias)

@dataclass
class LlamaConfig:
    vocab_size: int
    n_positions: int  # max_position_embeddings
    n_embd: int  # hidden_size
    n_layer: int  # num_hidden_layers
    n_head: int  # num_attention_heads
    n_kv_head: int  # num_key_value_heads: fewer than n_head is grouped-query attention
    n_inner: int  # intermediate_size
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3's stretched frequencies ("llama3"), or None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k and v (Qwen2)

    def check(self, where="config"):
        for name in REQUIRED:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{where}: {name} must be an integer >= 1, not {value!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"{where}: n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        for name, value in dict(rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
                                **(self.rope_scaling or {})).items():
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
                raise ValueError(f"{where}: {name} must be a positive number, not {value!r}")
        for name in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{where}: {name} must be true or false, not {getattr(self, name)!r}")


REQUIRED = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head", "n_inner", "head_dim")
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_frequencies(config):
    """The rotary angle per position of each pair of a head's dimensions (head_dim // 2), as Hugging
    Face computes them (float32, on the CPU even while the model is built on the meta device); Llama 3
    stretches the low frequencies for its long context."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
    if config.rope_scaling:
        factor, low, high, old = (config.rope_scaling[k] for k in LLAMA3_ROPE)
        wavelen = 2 * math.pi / inv_freq
        stretched = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        between = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = torch.where(between, (1 - smooth) * stretched / factor + smooth * stretched, stretched)
    return inv_freq


def rotate(x, rope):
    """Rotate each pair (x[i], x[i + D/2]) of x (B, H, T, D) by its position's angle (Hugging Face's
    rotate-half layout)."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up are one matmul (c_fc), as q, k, v are."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.n_inner, bias=False)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class LlamaBlock(Block):
    """GPT-2's block (the same forward) with RMSNorm and the gated MLP, and no bias on the output."""

    def __init__(self, config):
        nn.Module.__init__(self)
        self.ln_1 = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.attn = Attention(config, qkv_bias=config.attention_bias, out_bias=False)
        self.ln_2 = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config)


class Llama(GPT):
    def __init__(self, config):
        nn.Module.__init__(self)
        config.check()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def embed(self, idx, pos):
        angles = pos[..., None].float() * self.inv_freq  # (T, D/2), or (B, T, D/2) for ragged rows
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(-3)  # broadcast over the heads
        x = self.wte(idx)
        return x, (angles.cos().to(x.dtype), angles.sin().to(x.dtype))


def model_class(config):
    """The network a config describes: model_class(config)(config) has random weights."""
    return Llama if isinstance(config, LlamaConfig) else GPT
