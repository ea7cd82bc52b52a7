"""From a model name to a model and tokenizer in memory: a local Hugging Face directory as it is, a
GGUF file (llama.cpp's format, dequantized to float), or a Hub name through Hugging Face's own client
(downloaded once, into its cache), every file checked before it is used. GPT-2, Llama (SmolLM2,
TinyLlama, Llama 3) and Qwen2 checkpoints.

    model, enc = load("../shared/models/minigpt2")   # what every command line does
    model, enc = load("../shared/models/smollm2-135m-instruct")   # a directory holding one .gguf
    model = from_pretrained("gpt2")                  # the network alone (model.GPT or model.Llama)
    enc = load_tokenizer("gpt2")                     # a tiktoken Encoding, built offline from the files
"""
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import sys
from dataclasses import fields

import numpy as np
import torch

from checks import UserError, check_tokenizer, in_thread
from cli import (cache_root, file_digest, memory_available, read_bytes, read_json, read_text,
                 write_output)
from model import LLAMA3_ROPE, REQUIRED, GPTConfig, LlamaConfig, model_class
from tokenizer import GPT2_PATTERN, from_gguf_metadata, from_tokenizer_json

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
HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
# what a Hub checkpoint is made of, by its config's model_type (GPT-2's tokenizer files, or a tokenizer.json)
HUB_FILES = {"gpt2": ("config.json", "model.safetensors", "vocab.json", "merges.txt"),
             "llama": ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
# A model's vocabulary may be padded past its tokenizer's (nanoGPT rounds 50257 up to 50304), by less than this


def load(name_or_dir="gpt2", device="auto", dtype="float32"):
    """(model, tokenizer) as the command lines load them: a Hub name or a local Hugging Face directory,
    on the best device, weights packed for the CPU's fast kernels when running there."""
    device = pick_device(device)
    model = pack_for_cpu(from_pretrained(name_or_dir, device=device, dtype=pick_dtype(dtype, device)))
    enc = load_tokenizer(name_or_dir)
    check_tokenizer(enc, model)
    return model, enc


def from_pretrained(name_or_dir, device="cpu", dtype=torch.float32):
    """A checkpoint from a Hugging Face directory, a GGUF file (or a directory holding one) or a Hub
    name (downloaded once), checked: the model's own ValueErrors become one-line errors. Sets
    model.name_or_path and model.fingerprint."""
    directory = resolve_checkpoint(name_or_dir)
    gguf_file = find_gguf(directory)
    config_path = os.path.join(directory, "config.json")
    try:
        if gguf_file:
            reader = open_gguf(gguf_file)
            config, weights = gguf_config(reader, gguf_file), gguf_file
            check_memory(config, gguf_file)
            state = gguf_state(reader, config, gguf_file)
        else:
            if os.path.exists(config_path):
                config = read_config(config_path)
            elif name_or_dir in PRESETS:
                config = GPTConfig(**PRESETS[name_or_dir])
            else:
                raise UserError(f"{directory}: no config.json; add the checkpoint's config.json")
            check_memory(config, config_path)
            weights = next((os.path.join(directory, w) for w in WEIGHT_FILES
                            if os.path.exists(os.path.join(directory, w))), None)
            if weights is None and os.path.exists(os.path.join(directory, "model.safetensors.index.json")):
                raise UserError(f"{directory}: the weights are sharded (model.safetensors.index.json), which this "
                                "loader does not read; merge them into one model.safetensors, or use a GGUF file")
            if weights is None:
                raise UserError(f"{directory}: no {' or '.join(WEIGHT_FILES)}; download the checkpoint's weights")
            state = read_state_dict(weights)
        model = from_hf_state_dict(config, state, weights)
    except ValueError as e:  # what model.py or the mapping says of a config or its weights, said on one line
        raise UserError(str(e))
    model.fingerprint = fingerprint_of_file(weights, lambda: weights_fingerprint(model))
    model.name_or_path = name_or_dir
    return model.to(device=device, dtype=dtype)


def hf_state_dict(model):
    """The model's weights as a Hugging Face GPT-2 checkpoint names them: Conv1D weights [in, out],
    a transformer. prefix, the tied lm_head left out."""
    return {"transformer." + k: (v.t() if k.endswith(CONV1D) else v).contiguous()
            for k, v in model.state_dict().items() if k != "lm_head.weight"}


def save_pretrained(model, directory):
    """Write `model` as a Hugging Face GPT-2 directory (config.json and model.safetensors; the tokenizer
    files are the caller's): what from_pretrained reads."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    c = model.config
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(model_type="gpt2", vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd,
                       n_layer=c.n_layer, n_head=c.n_head, activation_function=c.activation_function), f)
    save_file(hf_state_dict(model), os.path.join(directory, "model.safetensors"))
    return directory


def read_config(path, where=None):
    """The config of a config.json (GPT-2, Llama or Qwen2), checked; anything wrong with it is one UserError."""
    try:
        return config_from_dict(read_json(path, "model config"), where or path)
    except ValueError as e:
        raise UserError(str(e))


def check_memory(config, where):
    """Refuse a config whose float32 weights and one row of KV cache would not fit in the memory this
    process may use (cli.memory_available)."""
    C, inner, kv = config.n_embd, config.n_inner or 4 * config.n_embd, config.n_kv_head * config.head_dim
    attention = C * (config.n_head * config.head_dim + 2 * kv) + config.n_head * config.head_dim * C
    params = (config.vocab_size + config.n_positions) * C + config.n_layer * (attention + 3 * C * inner + 13 * C)
    need = 4 * (params + 2 * config.n_layer * min(config.n_positions, 4096) * kv)
    have = memory_available()
    if have and need > 0.8 * have:
        raise UserError(f"{where}: this model needs about {need / 2**30:.1f} GiB, more than this machine's "
                        f"{have / 2**30:.1f} GiB of memory allows; check the config")


def weights_fingerprint(model):
    """A hash of the config and of every weight, bit for bit (as float32, so the same checkpoint has
    one fingerprint on every device and dtype): any change to any weight (a fine-tune, a merged LoRA,
    two embedding rows swapped) gives another, so it gets its own probe. from_pretrained takes it
    once per weights file (fingerprint_of_file), before casting to the device's dtype."""
    h = hashlib.sha256(json.dumps(model.config.__dict__, sort_keys=True).encode())
    state = model.state_dict()
    tied = model.lm_head.weight is model.wte.weight
    for name in sorted(state):
        if tied and name == "lm_head.weight":
            continue
        tensor = state[name].detach().float().cpu().contiguous()
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(memoryview(tensor.numpy()).cast("B"))  # no copy
    return h.hexdigest()[:16]


def fingerprint(model):
    """The fingerprint of a loaded model, or of one built in memory (taken now)."""
    return getattr(model, "fingerprint", None) or weights_fingerprint(model)


class PackedLinear(torch.nn.Module):
    """An nn.Linear with its weight prepacked for oneDNN (CPU, float32).

    One-token decoding on a CPU is bound by streaming the weights from memory, and the default
    one-row matmul streams them slower than oneDNN's kernel reading a weight laid out ahead of time in
    its blocks (bench.py measures what that is worth). Results differ from nn.Linear only by summation
    order (~1e-6 relative). The packing and the kernel are those torch's compiler (inductor) uses for a
    float32 linear whose batch size varies, called directly: the input and output stay plain tensors.
    """

    def __init__(self, linear):
        super().__init__()
        # the layout for 32 rows: here as fast as any other for one row, and 1.1-1.6x their speed for 32
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 32)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_for_cpu(model):
    """On the CPU in float32, swap every nn.Linear (the tied head too, as a packed copy) for a
    PackedLinear; elsewhere the model is returned unchanged. The fingerprint is taken first: packed
    weights leave the state dict."""
    weight = model.wte.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return model
    model.fingerprint = fingerprint(model)
    # (parent, name) pairs, not the Linears themselves: each one is freed as soon as it is packed
    linears = [(module, name) for module in model.modules() for name, child in module.named_children()
               if isinstance(child, torch.nn.Linear)]
    for module, name in linears:
        setattr(module, name, PackedLinear(getattr(module, name)))
    return model


def read_state_dict(path):
    """Every tensor of a weights file, checked: a regular file (a FIFO or device is refused before it is
    opened: it could block forever), a safetensors layout that tiles the file, and nothing pickled
    beyond tensors in a .bin (torch's weights_only loader)."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as e:
        raise UserError(f"cannot read the weights {path} ({e.strerror}); check the path")
    problem = None if regular else "not a regular file"
    if regular and path.endswith(".safetensors"):
        problem = safetensors_problem(path)
    if problem:
        raise UserError(f"{path}: cannot read the weights ({problem}); the file is truncated or corrupt: "
                        "re-download it")
    try:
        if path.endswith(".safetensors"):
            return read_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt files fail in many ways; all mean the same
        reason = str(e).splitlines()[0] if str(e) else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):  # torch's own advice would be to trust it
            raise UserError(f"{path}: the weights file holds pickled Python objects beyond tensors, which are not "
                            "loaded (they could run code); convert the checkpoint to model.safetensors")
        raise UserError(f"{path}: cannot read the weights ({type(e).__name__}: {reason[:200]}); "
                        "the file is truncated or corrupt: re-download it")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Every tensor of a safetensors file whose layout safetensors_problem passed, each read into
    memory of its own with plain reads. safetensors' own loader maps the file, and every page of the
    mapping it touches counts against this process beside the tensors themselves: gpt2-xl's 6.2 GB
    would be held twice while the model takes them."""
    tensors = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            if t.get("dtype") not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} holds {t.get('dtype')!r}, not a dtype of safetensors")
            start, end = t["data_offsets"]
            data = torch.empty(end - start, dtype=torch.uint8)
            f.seek(8 + n + start)
            if f.readinto(memoryview(data.numpy())) != end - start:
                raise ValueError(f"tensor {name!r} is cut short")
            tensors[name] = data.view(SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])
    return tensors


def safetensors_problem(path):
    """What is wrong with a safetensors file's layout, or None: an 8-byte header length, a JSON header
    of tensors whose byte ranges tile the rest of the file exactly. Cheap: the tensors are not read."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
            if not 2 <= n <= min(size - 8, 100 << 20):
                return f"a header of {n} bytes in a file of {size}"
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError) as e:
        return f"unreadable header: {type(e).__name__}"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    tensors = {k: t for k, t in header.items() if k != "__metadata__"}
    for name, t in tensors.items():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int and x >= 0 for x in offsets)
                and offsets[0] <= offsets[1]):
            return f"tensor {name!r} has data_offsets {offsets!r}, not [start, end]"
    end = 0  # sorted by where they start, each tensor begins where the one before ends: no overlap, no gap
    for start, stop in sorted(tuple(t["data_offsets"]) for t in tensors.values()):
        if start != end:
            return f"tensor bytes {'overlap' if start < end else 'leave a gap'} at byte {start} (the tensors before end at {end})"
        end = stop
    if end != size - 8 - n:
        return f"tensors end at byte {end} of {size - 8 - n}"
    return None


# ----------------------------------------------------------------------------------------------
# GGUF files (llama.cpp's format), read with llama.cpp's own reader, the gguf package

GGUF_ARCHITECTURES = ("llama", "qwen2")
# the types gguf's reader dequantizes to float (the K-quants too)
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp's tensor names -> Hugging Face's: the prefixes, then the parts
GGUF_PREFIXES = (("token_embd.", "model.embed_tokens."), ("output_norm.", "model.norm."), ("output.", "lm_head."),
                 ("blk.", "model.layers."))
GGUF_PARTS = ((".attn_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
              (".attn_q.", ".self_attn.q_proj."), (".attn_k.", ".self_attn.k_proj."), (".attn_v.", ".self_attn.v_proj."),
              (".attn_output.", ".self_attn.o_proj."), (".ffn_gate.", ".mlp.gate_proj."), (".ffn_up.", ".mlp.up_proj."),
              (".ffn_down.", ".mlp.down_proj."))


def find_gguf(location):
    """The GGUF file a model location names: the path of one, or the one .gguf in a directory that
    holds no Hugging Face weights; None for a Hugging Face directory."""
    if location.endswith(".gguf") and not os.path.isdir(location):
        return location
    if any(os.path.exists(os.path.join(location, w)) for w in WEIGHT_FILES):
        return None
    found = sorted(glob.glob(os.path.join(glob.escape(location), "*.gguf")))
    if len(found) > 1:
        raise UserError(f"{location} holds {len(found)} .gguf files; pass the path of the one to load")
    return found[0] if found else None


def open_gguf(path):
    """gguf's reader of a GGUF file, checked: a regular file whose tensors lie inside it, one after another,
    each the size its shape and type give. The tensors are mapped, not read, until dequantized."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: not a regular file; point at a GGUF file")
    return read_gguf(os.path.realpath(path), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=2)  # the model and its tokenizer read the same file: parse it once
def read_gguf(path, size, mtime):
    """open_gguf's work, once per file version (its size and modification time)."""
    try:
        import gguf
    except ImportError:
        raise UserError("a GGUF file needs the gguf package (llama.cpp's reader): pip install gguf")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a truncated or corrupt file fails in many ways; all mean the same
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {reason}); the file is truncated or "
                        "corrupt: re-download it")
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in reader.tensors)
    for (_, end, name), (next_start, _, _) in zip(spans, spans[1:] + [(size, 0, "")]):
        if end > next_start:  # its shape and type make it longer than the room the file gives it
            raise UserError(f"{path}: tensor {name!r} runs into the next tensor or past the end of the file; the file "
                            "is truncated or corrupt: re-download it")
    return reader


def gguf_field(reader, key, path, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise UserError(f"{path}: the GGUF metadata has no {key}; the file is not a complete model")
        return default
    return field.contents()


def gguf_config(reader, path):
    """The LlamaConfig of a GGUF file's metadata, checked as a config.json would be."""
    arch = gguf_field(reader, "general.architecture", path)
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"{path}: architecture {arch!r} is not supported; supported in GGUF: "
                        f"{', '.join(GGUF_ARCHITECTURES)} (GPT-2 as a Hugging Face directory)")
    names = {t.name for t in reader.tensors}
    scaling = gguf_field(reader, f"{arch}.rope.scaling.type", path, "none")
    if "rope_freqs.weight" in names or scaling != "none":
        raise UserError(f"{path}: scaled rotary positions ({scaling}, rope_freqs) are not supported in GGUF; load "
                        "the Hugging Face checkpoint instead")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens", path)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    rows = int(embedding.shape[-1]) if embedding is not None else len(tokens)  # GGUF lists a matrix as (ne0, rows)
    if rows != len(tokens):
        raise UserError(f"{path}: the tokenizer has {len(tokens)} tokens but the embedding {rows} rows: they do not "
                        "belong together; re-convert the file")

    def get(key, default=None):
        return gguf_field(reader, f"{arch}.{key}", path, default)
    raw = dict(model_type=arch, vocab_size=rows, hidden_size=get("embedding_length"),
               num_hidden_layers=get("block_count"), num_attention_heads=get("attention.head_count"),
               num_key_value_heads=get("attention.head_count_kv"), intermediate_size=get("feed_forward_length"),
               max_position_embeddings=get("context_length"), rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
               rope_theta=get("rope.freq_base", 10000.0), tie_word_embeddings="output.weight" not in names)
    raw = {k: int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v for k, v in raw.items()}
    config = config_from_dict(raw, path)
    if get("rope.dimension_count", config.head_dim) != config.head_dim:
        raise UserError(f"{path}: rotary positions on part of each head are not supported")
    return config


def gguf_state(reader, config, path):
    """Every tensor of a GGUF file dequantized to float32 under Hugging Face's names, with llama.cpp's
    permutation of a Llama's q and k rows undone (its RoPE pairs dimensions (2i, 2i+1); Hugging Face's,
    and ours, pair i with i + head_dim/2). Qwen2 files are stored unpermuted."""
    import gguf
    for t in reader.tensors:
        if t.tensor_type.name not in GGUF_TYPES:
            raise UserError(f"{path}: tensor {t.name!r} is quantized as {t.tensor_type.name}, which is not supported; "
                            f"supported: {', '.join(GGUF_TYPES)}")
    permuted = gguf_field(reader, "general.architecture", path) == "llama"
    state = {}
    for t in reader.tensors:
        name = next((new + t.name[len(old):] for old, new in GGUF_PREFIXES if t.name.startswith(old)), t.name)
        for old, new in GGUF_PARTS:
            name = name.replace(old, new)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-moving dimension first
        tensor = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.n_head if "q_proj" in name else config.n_kv_head
            tensor = tensor.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
        state[name] = tensor
    return state


def gguf_tokenizer(reader, path):
    """The tokenizer a GGUF file's metadata holds (tokenizer.ggml.*: byte-level BPE, "gpt2" in llama.cpp)."""
    kind = gguf_field(reader, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise UserError(f"{path}: tokenizer {kind!r} is not supported; only byte-level BPE ('gpt2') is")
    return from_gguf_metadata(path, gguf_field(reader, "tokenizer.ggml.tokens", path),
                              gguf_field(reader, "tokenizer.ggml.token_type", path),
                              gguf_field(reader, "tokenizer.ggml.merges", path),
                              gguf_field(reader, "tokenizer.ggml.pre", path, "gpt-2"),
                              gguf_field(reader, "tokenizer.ggml.eos_token_id", path),
                              gguf_field(reader, "tokenizer.chat_template", path, ""))


def fingerprint_of_file(path, compute):
    """weights_fingerprint of the model in a weights file, computed once per file: cached under its
    path, size, modification time and inode, so a second load costs nothing."""
    info = os.stat(path)
    # ctime too: an edit in place that keeps the size and resets the mtime still changes it
    key = f"{os.path.realpath(path)}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:{info.st_ino}"
    index = os.path.join(cache_root(), "fingerprints.json")
    try:  # a link planted in the cache is neither read nor written through
        known = json.loads(read_text(index, "fingerprint index", 16 << 20)) if not os.path.islink(index) else {}
    except (UserError, ValueError):
        known = {}  # a damaged (or missing) index is rebuilt
    if not isinstance(known, dict):
        known = {}
    if key not in known:
        known[key] = compute()
        try:
            if os.path.islink(index):
                os.remove(index)
            write_output(index, json.dumps(known), "fingerprint index")
        except (UserError, OSError):
            pass  # an unwritable cache only costs the time to compute it again
    return known[key]


# ----------------------------------------------------------------------------------------------
# Hub names


def resolve_checkpoint(name_or_dir):
    """A local directory or GGUF file as is; a Hub name is downloaded once into Hugging Face's cache
    (HF_HUB_CACHE, HF_ENDPOINT and HF_HUB_OFFLINE apply) and its snapshot directory returned."""
    if os.path.isdir(name_or_dir) or (name_or_dir.endswith(".gguf") and os.path.exists(name_or_dir)):
        return name_or_dir
    looks_local = name_or_dir.startswith(("./", "../", "/", "~", ".\\")) or os.path.exists(name_or_dir)
    if looks_local:
        raise UserError(f"{name_or_dir} is not a directory or a .gguf file; point it at a Hugging Face checkpoint "
                        "directory or a GGUF file")
    if not HUB_NAME.fullmatch(name_or_dir) or ".." in name_or_dir:
        raise UserError(f"{name_or_dir!r} is not a model name: use a local directory, one of {', '.join(HUB_REPOS)}, "
                        "or a Hub repo 'owner/name' (letters, digits, '.', '_', '-')")
    if name_or_dir not in HUB_REPOS and "/" not in name_or_dir:
        raise UserError(f"{name_or_dir!r} is neither a directory nor a known model; use one of "
                        f"{', '.join(HUB_REPOS)}, a Hub repo 'owner/name', or a local directory")
    return download_checkpoint(HUB_REPOS.get(name_or_dir, name_or_dir))


HUB_SECONDS = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")  # whole seconds, as huggingface_hub parses them


def check_hub_environment():
    """The environment variables a download reads, checked before huggingface_hub is imported: the
    timeouts whole numbers of seconds, the endpoint an http(s) URL, offline mode a yes or a no."""
    for name in HUB_SECONDS:
        value = os.environ.get(name)
        if value is not None and not (value.strip().isdigit() and 1 <= int(value) <= 3600):
            raise UserError(f"{name}={value!r}: give a whole number of seconds in [1, 3600], or unset it")
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint):
        raise UserError(f"HF_ENDPOINT={endpoint!r}: give an http(s) URL such as https://huggingface.co, or unset it")
    offline = os.environ.get("HF_HUB_OFFLINE")
    if offline is not None and offline.strip().upper() not in ("", "0", "1", "TRUE", "FALSE", "YES", "NO", "ON", "OFF"):
        raise UserError(f"HF_HUB_OFFLINE={offline!r}: give 1 or 0, or unset it")


def download_checkpoint(repo):
    """Fetch the HUB_FILES of `repo`'s family with huggingface_hub (atomic writes, file locks, timeouts), then check
    each for what it claims to be. A file that fails is removed from the cache and fetched once more;
    nothing that failed stays cached, and a repo folder left with no file in it is removed."""
    check_hub_environment()  # huggingface_hub reads some of these as it is imported, and fails there with a traceback
    try:
        import huggingface_hub
        import huggingface_hub.constants
    except ImportError:
        raise UserError("a Hub name needs the huggingface_hub package: pip install huggingface_hub "
                        "(or pass a local directory with config.json, model.safetensors, vocab.json and merges.txt)")
    # huggingface_hub 2.4 builds its telemetry header by asking {HF_ENDPOINT}/api/agent-harnesses, with no
    # bound on the answer: a mirror that never ends it hangs the download. We send no telemetry.
    huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now, not when huggingface_hub was imported
    paths = {}
    try:
        for force in (False, True):
            if "config.json" not in paths:  # first: it says what else the checkpoint is made of
                paths["config.json"] = fetch(huggingface_hub, repo, "config.json", endpoint, cache_dir, force)
            for name in hub_files(paths["config.json"]):
                if name not in paths:
                    paths[name] = fetch(huggingface_hub, repo, name, endpoint, cache_dir, force)
            bad = checkpoint_problems(paths)
            if not bad:
                return os.path.dirname(paths["config.json"])
            for names, problem in bad.items():
                for name in names:
                    forget(paths.pop(name))
                problem = problem.replace(os.path.dirname(paths.get("config.json", "")) + os.sep, "")
                what = " and ".join(names) + (" are" if len(names) > 1 else " is")
                if force:
                    raise UserError(f"{endpoint}/{repo}: {what} not valid ({problem}); check HF_ENDPOINT and your "
                                    "connection, or pass a local directory")
                print(f"{repo}: the cached {what} not valid ({problem}); downloading again", file=sys.stderr)
    except UserError:
        remove_if_empty(huggingface_hub, repo, cache_dir)
        raise


def hub_files(config_path):
    """The files of a checkpoint whose config.json is at `config_path`, by its family (GPT-2's when the
    config is broken: checkpoint_problems then says what is wrong with it)."""
    try:
        kind = read_json(config_path, "model config").get("model_type", "gpt2")
    except (UserError, AttributeError):
        kind = "gpt2"
    return HUB_FILES["gpt2" if kind == "gpt2" else "llama"]


# The most bytes a checkpoint's file may have: a server announcing more is refused, one sending more is cut off
DOWNLOAD_LIMITS = {"config.json": 1 << 20, "vocab.json": 64 << 20, "merges.txt": 64 << 20, "model.safetensors": 64 << 30,
                   "tokenizer.json": 64 << 20, "tokenizer_config.json": 16 << 20}


def fetch(huggingface_hub, repo, name, endpoint, cache_dir, force):
    """One file through huggingface_hub, its errors (HTTP, timeouts, offline mode) as one line, its size
    bounded by what the server announced (a body that never ends is cut off). A file whose Hub etag is
    its sha256 (the large ones, in LFS) is checked against it when it arrives."""
    before = huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=cache_dir)
    timeout = int(os.environ.get("HF_HUB_ETAG_TIMEOUT", 10))  # checked by check_hub_environment
    host = endpoint.split("//")[-1]
    try:
        limit, etag = DOWNLOAD_LIMITS[name], ""
        if not isinstance(before, str) or force:
            # nothing cached to fall back on: ask once, so a server that never answers fails in `timeout`
            # seconds (hf_hub_download would retry with backoff for minutes)
            meta = huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, name, endpoint=endpoint),
                                                        timeout=timeout)
            if meta.size is None or not 0 <= meta.size <= limit:
                raise UserError(f"{host} announces {name} of {repo} at {meta.size} bytes, not at most the {limit:,} "
                                f"such a file may have; check HF_ENDPOINT")
            limit, etag = meta.size, (meta.etag or "").strip('"')
        root = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        blobs = os.path.join(root, "models--" + repo.replace("/", "--"), "blobs")
        path = bounded(lambda: huggingface_hub.hf_hub_download(repo, name, cache_dir=cache_dir, endpoint=endpoint,
                                                               force_download=force, etag_timeout=timeout),
                       os.path.join(blobs, etag + "*.incomplete" if etag else "*.incomplete"), limit,
                       f"{host} sent more of {name} of {repo} than the {limit:,} bytes it announced; the download was "
                       "cut off: check HF_ENDPOINT")
    except UserError:
        raise
    except Exception as e:  # the client raises many kinds; each means this file could not be had
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot download {name} of {repo} from {host} ({type(e).__name__}: {reason}); check your "
                        "connection and HF_ENDPOINT, or pass a local directory with config.json, "
                        "model.safetensors, vocab.json and merges.txt")
    blob = os.path.realpath(path)
    etag = os.path.basename(blob)
    if (force or before != path) and re.fullmatch(r"[0-9a-f]{64}", etag):
        digest = file_digest(blob)
        if digest != etag:
            forget(path)
            raise UserError(f"the download of {name} of {repo} is corrupt (sha256 {digest[:12]}..., the Hub says "
                            f"{etag[:12]}...); run again to retry")
    return path


def bounded(download, partial, limit, message):
    """Run download() in a thread while watching the files it writes (the glob `partial`): one that
    grows past `limit` bytes is removed and the download given up with `message` (a server that never
    ends its body would otherwise fill the disk). Returns what download() returns, or raises what it raised."""
    worker, outcome = in_thread(download)  # what it raises is raised here, in the caller's thread
    while worker.is_alive():
        worker.join(0.2)
        for path in glob.glob(partial):
            try:
                too_big = os.path.getsize(path) > limit
            except OSError:  # finished and renamed meanwhile
                continue
            if too_big:
                os.remove(path)
                raise UserError(message)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


def checkpoint_problems(paths):
    """{files: what is wrong} for downloaded checkpoint files: the config, the weights' layout, and
    whether the two tokenizer files form a BPE (a web page served in their place does not)."""
    problems = {}
    try:
        read_config(paths["config.json"], "config.json")
    except UserError as e:
        problems["config.json",] = str(e)
    problem = safetensors_problem(paths["model.safetensors"])
    if problem:
        problems["model.safetensors",] = problem
    tokenizer_files = tuple(name for name in paths if name not in ("config.json", "model.safetensors"))
    try:
        if "tokenizer.json" in paths:
            from_tokenizer_json(paths["tokenizer.json"], paths["tokenizer_config.json"])
        else:
            tokenizer_from_files(paths["vocab.json"], paths["merges.txt"])
    except UserError as e:
        problems[tokenizer_files] = str(e)
    return problems


def forget(path):
    """Remove a downloaded file from Hugging Face's cache: the blob and the snapshot's link to it."""
    blob = os.path.realpath(path)
    for p in {path, blob}:
        if os.path.lexists(p):
            os.remove(p)


def remove_if_empty(huggingface_hub, repo, cache_dir):
    """After a failed download of a repo with no file in the cache (a typo, a server that never
    answered), remove its empty cache folder and the client's lock folder beside it: nothing is left
    behind. A repo with any file cached keeps both, since another process may be using them."""
    root = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
    folder = os.path.join(root, "models--" + repo.replace("/", "--"))
    if os.path.isdir(folder) and not any(names for _, _, names in os.walk(folder)):
        shutil.rmtree(folder, ignore_errors=True)
    if not os.path.exists(folder):
        shutil.rmtree(os.path.join(root, ".locks", os.path.basename(folder)), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(name_or_dir=None):
    """GPT-2's BPE as a tiktoken Encoding, built offline from a checkpoint's vocabulary files.

    Falls back to tiktoken.get_encoding("gpt2"), which downloads the same files once (into our cache).
    """
    import tiktoken
    directory = resolve_checkpoint(name_or_dir) if name_or_dir else None
    gguf_file = directory and find_gguf(directory)
    if gguf_file:
        return gguf_tokenizer(open_gguf(gguf_file), gguf_file)
    if directory and os.path.exists(os.path.join(directory, "tokenizer.json")) and not is_gpt2(directory):
        config = os.path.join(directory, "tokenizer_config.json")
        return from_tokenizer_json(os.path.join(directory, "tokenizer.json"), config if os.path.exists(config) else None)
    for vocab, merges in TOKENIZER_FILES:
        if directory and all(os.path.exists(os.path.join(directory, f)) for f in (vocab, merges)):
            return tokenizer_from_files(os.path.join(directory, vocab), os.path.join(directory, merges))
    # tiktoken downloads GPT-2's files once into a cache: ours, checked, never the machine-wide one in the
    # system's temp folder (anyone may plant a FIFO there, which hangs every run) or its variable's
    own = os.path.join(cache_root(), "tiktoken")
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    try:
        os.makedirs(own, exist_ok=True)
        for name in os.listdir(own):  # what tiktoken reads whole: a regular file of a few MB, nothing else
            info = os.lstat(os.path.join(own, name))
            if not stat.S_ISREG(info.st_mode) or info.st_size > 16 << 20:
                os.remove(os.path.join(own, name))
        os.environ["TIKTOKEN_CACHE_DIR"] = own
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"cannot fetch the GPT-2 tokenizer ({type(e).__name__}); pass a directory that "
                        "holds vocab.json + merges.txt (or encoder.json + vocab.bpe)")
    finally:
        if previous is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


def is_gpt2(directory):
    """Is this a GPT-2 checkpoint (its config says so, or says no model_type), read with tiktoken's GPT-2
    BPE? Other families read their tokenizer.json."""
    path = os.path.join(directory, "config.json")
    return not os.path.exists(path) or read_json(path, "model config").get("model_type", "gpt2") == "gpt2"


def tokenizer_from_files(vocab, merges):
    import tiktoken
    import tiktoken.load
    # tiktoken reads the files itself and caches them by path; the content hash keeps that cache honest
    sha = {p: hashlib.sha256(read_bytes(p, kind)).hexdigest() for p, kind in ((vocab, "vocabulary"), (merges, "merges"))}
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(merges, vocab, sha[merges], sha[vocab])
    except (AssertionError, ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:
        raise UserError(f"{vocab} and {merges} do not form a GPT-2 BPE ({type(e).__name__}); re-download them")
    return tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


# ----------------------------------------------------------------------------------------------
# Device and dtype

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


# ----------------------------------------------------------------------------------------------
# Hugging Face's configs and names, mapped onto model.py's


def gpt2_config(raw, where="config"):
    """A GPT-2 config.json: the fields GPTConfig has (others are ignored), checked."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a model config is a JSON object, not {type(raw).__name__}")
    if raw.get("tie_word_embeddings", True) is not True:  # GPT-2's head is its embeddings, here always
        raise ValueError(f"{where}: tie_word_embeddings is {raw['tie_word_embeddings']!r}: a GPT-2 with a head "
                         "of its own is not supported (only the tied head GPT-2 has)")
    known = {f.name for f in fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in raw.items() if k in known})
    config.check(where)
    return config


ROPE_TYPES = ("default", "llama3")


# a Llama config.json's names for ours
LLAMA_CONFIG_NAMES = dict(vocab_size="vocab_size", max_position_embeddings="n_positions", hidden_size="n_embd",
                          num_hidden_layers="n_layer", num_attention_heads="n_head", num_key_value_heads="n_kv_head",
                          intermediate_size="n_inner", head_dim="head_dim", rms_norm_eps="rms_norm_eps",
                          tie_word_embeddings="tie_word_embeddings", attention_bias="attention_bias")


def llama_config(raw, where="config"):
    """A LlamaForCausalLM or Qwen2ForCausalLM config.json, checked; what this code does not
    implement (another activation, a sliding window, a RoPE variant) is refused, never ignored."""
    given = {ours: raw[theirs] for theirs, ours in LLAMA_CONFIG_NAMES.items() if raw.get(theirs) is not None}
    given.setdefault("n_kv_head", given.get("n_head"))
    if isinstance(given.get("n_embd"), int) and isinstance(given.get("n_head"), int) and given["n_head"] > 0:
        given.setdefault("head_dim", given["n_embd"] // given["n_head"])
    missing = [theirs for theirs, ours in LLAMA_CONFIG_NAMES.items() if ours not in given and ours in REQUIRED]
    if missing:
        raise ValueError(f"{where}: {missing[0]} is missing; is this a Llama or Qwen2 config.json?")
    if raw.get("model_type") == "qwen2":
        given["attention_bias"] = True  # Qwen2's q, k and v always have biases
        if raw.get("use_sliding_window"):
            raise ValueError(f"{where}: use_sliding_window is not supported; only full attention is")
    for name, supported in (("hidden_act", "silu"), ("mlp_bias", False)):
        if raw.get(name, supported) != supported:
            raise ValueError(f"{where}: {name} {raw[name]!r} is not supported; only {supported!r} is")
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling
    rope = dict(raw.get("rope_parameters") or dict(raw.get("rope_scaling") or {}, rope_theta=raw.get("rope_theta")))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where}: rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    given["rope_theta"] = rope.get("rope_theta") or 10000.0
    if kind == "llama3":
        given["rope_scaling"] = {k: rope.get(k) for k in LLAMA3_ROPE}
    config = LlamaConfig(**given)
    config.check(where)
    return config


def config_from_dict(raw, where="config"):
    """The config of a Hugging Face config.json, by its model_type (none: GPT-2, as old ones say)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a model config is a JSON object, not {type(raw).__name__}")
    kind = raw.get("model_type", "gpt2")
    if kind not in FAMILIES:
        raise ValueError(f"{where}: model_type {kind!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[kind](raw, where)


FAMILIES = {"gpt2": gpt2_config, "llama": llama_config, "qwen2": llama_config}  # config.json's model_type


def checked(name, tensor, where):
    """A checkpoint's tensor as weights: floating point (an integer tensor cast to float would load
    silently wrong; float8 cannot even be checked) and finite."""
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{where}: tensor {name!r} holds {tensor.dtype}, not float16, bfloat16, float32 or "
                         "float64 weights; convert the checkpoint, or check that it is one this code loads")
    if not all(torch.isfinite(part).all() for part in tensor.reshape(-1).split(1 << 22)):  # few temporaries
        raise ValueError(f"{where}: tensor {name!r} holds NaN or infinite values; the checkpoint is "
                         "broken: re-download or re-export it")
    return tensor


# Hugging Face's names: Conv1D weights to transpose, and what old checkpoints carry that is not a
# parameter of ours (the causal mask buffers) or is tied to wte (the head).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED = (".attn.bias", ".attn.masked_bias")


def from_hf_state_dict(config, state, where="weights"):
    """A model from a Hugging Face state dict of its family: names mapped (gpt2_names, llama_names), and
    every tensor checked (known name, floating point, finite, the shape the config asks for). The
    model is built without memory of its own (on the meta device) and takes the file's tensors,
    each popped from `state` as it is mapped: loading costs the checkpoint's size once, not twice."""
    with torch.device("meta"):
        model = model_class(config)(config)
    tied = model.lm_head.weight is model.wte.weight
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    mapped = {}
    family, names = ("Llama", llama_names) if isinstance(config, LlamaConfig) else ("GPT-2", gpt2_names)
    for key, tensor in names(state, where):
        if key not in expected:
            raise ValueError(f"{where}: unexpected tensor {key!r}; is this a {family} checkpoint?")
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                             f"needs {tuple(expected[key].shape)}; config.json and weights disagree")
        mapped[key] = tensor
    missing = [k for k in expected if k not in mapped]
    if missing:
        raise ValueError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing); "
                         "the checkpoint is incomplete: re-download it")
    model.load_state_dict(mapped, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.wte.weight  # the file's wte replaced the tied one: tie again
    return model.eval()


def gpt2_names(state, where):
    """(our name, tensor) for each tensor of a Hugging Face GPT-2 state dict, popped as it goes:
    the transformer. prefix dropped, Conv1D weights transposed, mask buffers skipped. A head in the
    file is taken only as what it is in GPT-2, a copy of the embeddings: any other would be dropped."""
    head = state.pop("lm_head.weight", None)
    embeddings = state.get("transformer.wte.weight", state.get("wte.weight"))
    if head is not None and not (embeddings is not None and torch.equal(head, embeddings)):
        raise ValueError(f"{where}: lm_head.weight differs from the embeddings (a head of its own): GPT-2 here "
                         "ties them, and this one would be dropped; use a checkpoint with the tied head")
    for name in list(state):
        key, tensor = name.removeprefix("transformer."), state.pop(name)
        if key.endswith(IGNORED):
            continue
        checked(key, tensor, where)
        yield key, (tensor.t().contiguous() if key.endswith(CONV1D) and tensor.dim() == 2 else tensor)


# Hugging Face's Llama names -> ours, part by part; the parts fused into one of our matmuls; the
# frequencies some old checkpoints store (we compute them)
LLAMA_NAMES = (("model.embed_tokens.", "wte."), ("model.norm.", "ln_f."), ("model.layers.", "h."),
               (".input_layernorm.", ".ln_1."), (".post_attention_layernorm.", ".ln_2."),
               (".self_attn.o_proj.", ".attn.c_proj."), (".mlp.down_proj.", ".mlp.c_proj."))
LLAMA_FUSED = (((".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj."), ".attn.c_attn."),
               ((".mlp.gate_proj.", ".mlp.up_proj."), ".mlp.c_fc."))


def llama_names(state, where):
    """(our name, tensor) for each tensor of a Hugging Face Llama or Qwen2 state dict, popped as it
    goes: q, k and v concatenated into c_attn, gate and up into c_fc, the rest renamed."""
    for name in list(state):
        if name not in state:  # fused into an earlier tensor
            continue
        if name.endswith("rotary_emb.inv_freq"):
            state.pop(name)
            continue
        key, tensor = name, checked(name, state.pop(name), where)
        for parts, ours in LLAMA_FUSED:
            part = next((p for p in parts if p in name), None)
            if part:
                siblings = [name.replace(part, p) for p in parts]
                absent = [s for s in siblings if s != name and s not in state]
                if absent:
                    raise ValueError(f"{where}: missing tensor {absent[0]!r}; the checkpoint is incomplete: "
                                     "re-download it")
                tensor = torch.cat([tensor if s == name else checked(s, state.pop(s), where) for s in siblings])
                key = name.replace(part, ours)
        for theirs, ours in LLAMA_NAMES:
            key = key.replace(theirs, ours)
        yield key, tensor
