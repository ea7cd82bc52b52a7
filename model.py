"""GPT-2 in one file, with a preallocated KV cache whose rollback is moving a pointer.

    model = GPT.from_hf_state_dict(config, state)   # checkpoints.from_pretrained("gpt2") finds and reads the files
    cache = model.new_cache()
    logits, hidden = model(idx, cache)              # prefill: writes positions [0, T) of the cache
    logits, hidden = model(next_idx, cache)         # decode: writes position T
    cache.rollback(p)                               # forget slots >= p; O(1), nothing is copied

Parameter names follow Hugging Face's GPT-2 (wte, wpe, h.N.attn.c_attn, h.N.mlp.c_fc, ln_f, ...) so a
checkpoint maps one to one; HF stores its Conv1D weights as [in, out], we use nn.Linear ([out, in]) and
transpose on load. Nothing here imports the rest of the project: a bad config or checkpoint is a
ValueError, which the command lines turn into their one-line errors.
"""
import math
from dataclasses import dataclass, fields
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

    @classmethod
    def from_dict(cls, raw, where="config"):
        """The fields we use from a Hugging Face config.json (others are ignored), checked."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: a model config is a JSON object, not {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        config.check(where)
        return config

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


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class Ragged(NamedTuple):
    """Where a forward pass for rows at different lengths (or for some cache rows only) writes, and what
    each query may see: built once per forward, used by every layer. Static shapes, as JAX would want."""
    rows: torch.Tensor  # (B,): the cache row of each input row
    places: torch.Tensor  # (B * H * T,): the flat index (cache row, head, slot) of each new key, in k's order
    mask: torch.Tensor  # (B, 1, T, end): 0 where a query may see a cached key, -inf where it may not
    every_row: bool  # rows is every cache row, in order: attend over the cache as it is


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

    def update(self, layer, k, v, start, ragged):
        """Store a layer's new keys and values (B, H, T, D) and return what the queries attend over,
        with the mask. Aligned rows (ragged None) all continue at slot `start`: plain slices."""
        if ragged is None:
            end = start + k.shape[2]
            self.k[layer, :, :, start:end], self.v[layer, :, :, start:end] = k, v
            # query t sits at slot start + t and may see keys 0 .. start + t
            mask = None if k.shape[2] == 1 else torch.ones(k.shape[2], end, dtype=torch.bool, device=k.device).tril(start)
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask
        D = k.shape[-1]
        self.k[layer].view(-1, D)[ragged.places] = k.reshape(-1, D)  # one indexed write per cache
        self.v[layer].view(-1, D)[ragged.places] = v.reshape(-1, D)
        end = ragged.mask.shape[-1]
        if ragged.every_row:
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end], ragged.mask
        return self.k[layer][ragged.rows, :, :end], self.v[layer][ragged.rows, :, :end], ragged.mask


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
        else:
            k, v, mask = cache.update(layer, k, v, start, ragged)
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


# Hugging Face's names: Conv1D weights to transpose, and what old checkpoints carry that is not a
# parameter of ours (the causal mask buffers) or is tied to wte (the head).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


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

    @classmethod
    def from_hf_state_dict(cls, config, state, where="weights"):
        """A model from a Hugging Face GPT-2 state dict: names mapped, Conv1D weights transposed, and
        every tensor checked (known name, floating point, finite, the shape the config asks for). The
        model is built without memory of its own (on the meta device) and takes the file's tensors,
        each popped from `state` as it is mapped: loading costs the checkpoint's size once, not twice."""
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        expected.pop("lm_head.weight")  # tied to wte
        mapped = {}
        for name in list(state):
            key, tensor = name.removeprefix("transformer."), state.pop(name)
            if key.endswith(IGNORED):
                continue
            if key not in expected:
                raise ValueError(f"{where}: unexpected tensor {key!r}; is this a GPT-2 checkpoint?")
            if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                # an integer tensor cast to float would load silently wrong; float8 cannot even be checked
                raise ValueError(f"{where}: tensor {key!r} holds {tensor.dtype}, not float16, bfloat16, float32 or "
                                 "float64 weights; convert the checkpoint, or check that it is a GPT-2 one")
            if not all(torch.isfinite(part).all() for part in tensor.reshape(-1).split(1 << 22)):  # few temporaries
                raise ValueError(f"{where}: tensor {key!r} holds NaN or infinite values; the checkpoint is "
                                 "broken: re-download or re-export it")
            if key.endswith(CONV1D) and tensor.dim() == 2:
                tensor = tensor.t().contiguous()
            if tensor.shape != expected[key].shape:
                raise ValueError(f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                                 f"needs {tuple(expected[key].shape)}; config.json and weights disagree")
            mapped[key] = tensor
        missing = [k for k in expected if k not in mapped]
        if missing:
            raise ValueError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing); "
                             "the checkpoint is incomplete: re-download it")
        model.load_state_dict(mapped, strict=False, assign=True)
        model.lm_head.weight = model.wte.weight  # the file's wte replaced the tied one: tie again
        return model.eval()

    def new_cache(self, max_len=None, batch_size=1):
        max_len = max_len or self.config.n_positions
        if max_len > self.config.n_positions:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's context of "
                             f"{self.config.n_positions}; ask for at most {self.config.n_positions}")
        return KVCache(self.config, batch_size, max_len, self.wte.weight.device, self.wte.weight.dtype)

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
        B, T = idx.shape
        starts = [0] * B
        if cache is not None:
            starts = [cache.lengths[r] for r in (rows if rows is not None else range(len(cache.lengths)))]
            if len(starts) != B:
                raise ValueError(f"{B} rows of tokens for {len(starts)} cache rows")
        end = max(starts) + T
        if end > self.config.n_positions:
            raise ValueError(f"{end} tokens exceed the model's context of {self.config.n_positions}; "
                             "use a shorter prompt or fewer new tokens")
        if cache is not None and end > cache.max_len:
            raise ValueError(f"{end} tokens overflow the KV cache of {cache.max_len} positions; make the cache larger")
        aligned = len(set(starts)) == 1  # every row continues at the same slot
        steps = torch.arange(T, device=idx.device)
        pos = starts[0] + steps if aligned else torch.tensor(starts, device=idx.device)[:, None] + steps
        ragged = None
        if cache is not None and (rows is not None or not aligned):
            ragged = self.ragged(cache, rows, pos.expand(B, T), end)
        x = self.wte(idx) + self.wpe(pos)
        hidden = [x if keep is None or 0 in keep else None]
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer, starts[0], ragged)
            hidden.append(x if keep is None or layer + 1 in keep else None)
        x = self.ln_f(x)
        hidden[-1] = x if keep is None or len(self.h) in keep else None
        if cache is not None:
            for r, start in zip(rows if rows is not None else range(B), starts):
                cache.lengths[r] = start + T
        if which_logits == "none":
            return None, hidden
        return self.lm_head(x if which_logits == "all" else x[:, -1:]), hidden

    def ragged(self, cache, rows, slot, end):
        """The Ragged places and mask of input rows written at slots `slot` (B, T) of cache rows `rows`."""
        B, device, H = slot.shape[0], slot.device, self.config.n_head
        index = torch.arange(B, device=device) if rows is None else torch.tensor(rows, device=device)
        heads = torch.arange(H, device=device)[:, None]
        places = ((index[:, None, None] * H + heads) * cache.max_len + slot[:, None]).reshape(-1)
        seen = torch.arange(end, device=device) <= slot[:, :, None]  # (B, T, end): the keys each query sees
        # as 0 / -inf added to the scores: attention would turn a boolean mask into this in every layer
        mask = torch.zeros_like(seen, dtype=self.wte.weight.dtype).masked_fill(~seen, float("-inf"))[:, None]
        return Ragged(index, places, mask, rows is None)
