"""The Llama family: parity with transformers (Llama, Qwen2; grouped-query attention, tied and separate
heads, q/k/v bias, Llama 3's RoPE), the cache after random appends and rollbacks, ragged batches, GGUF
files (written here with llama.cpp's own writer), the tokenizer and chat template, bad input."""
import json
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import checkpoints as CK
import cli
import model as M
import tokenizer as T
from conftest import HERE, SHARED

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the parity oracle)")
gguf = pytest.importorskip("gguf", reason="gguf is not installed")

SMOLLM = os.path.join(SHARED, "models", "smollm2-135m-instruct")
SMOLLM_GGUF = os.path.join(SMOLLM, "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smollm = pytest.mark.skipif(not os.path.exists(SMOLLM_GGUF), reason=f"{SMOLLM_GGUF} is absent")


def tiny_hf(kind="llama", seed=0, vocab_size=101, **kw):
    """A random transformers Llama or Qwen2 with weights at GPT-2-like scale (logits not all near 0)."""
    torch.manual_seed(seed)
    cls, model_cls = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if kind == "llama" else
                      (transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
    config = cls(**dict(dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             rope_theta=1000.0, tie_word_embeddings=False), **kw))
    hf = model_cls(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    return hf


def ours_of(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    return CK.from_pretrained(str(tmp_path))


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
SHAPES = {
    "llama, grouped-query, separate head": ("llama", {}),
    "llama, one key/value head, tied head": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama, as many key/value heads as query heads": ("llama", dict(num_key_value_heads=4)),
    "llama 3 rope": ("llama", dict(rope_scaling=LLAMA3_ROPE)),
    "qwen2, q/k/v bias, tied head": ("qwen2", dict(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_transformers_with_and_without_the_cache(shape, tmp_path):
    kind, kw = SHAPES[shape]
    hf = tiny_hf(kind, **kw)
    ours = ours_of(hf, tmp_path)
    assert isinstance(ours, M.Llama) and ours.config.attention_bias == (kind == "qwen2")
    assert (ours.lm_head.weight is ours.wte.weight) == bool(kw.get("tie_word_embeddings"))
    idx = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        ref = hf(idx, output_hidden_states=True)
        logits, hidden = ours(idx)
        cache = ours.new_cache(40, batch_size=2)
        parts = [ours(idx[:, :17], cache)[0]] + [ours(idx[:, i:i + 1], cache)[0] for i in range(17, 30)]
    assert (logits - ref.logits).abs().max() <= 1e-4
    assert (torch.cat(parts, 1) - ref.logits).abs().max() <= 1e-4
    assert len(hidden) == len(ref.hidden_states) == 3
    assert all((h - r).abs().max() <= 1e-4 for h, r in zip(hidden, ref.hidden_states))
    assert cache.k.shape == (2, 2, hf.config.num_key_value_heads, 40, 8)  # the cache holds the key/value heads only


ops = st.lists(st.one_of(st.tuples(st.just("append"), st.integers(1, 6)),
                         st.tuples(st.just("rollback"), st.floats(0, 1))), min_size=1, max_size=12)


@given(seed=st.integers(0, 2**16), ops=ops, kind=st.sampled_from(["llama", "qwen2"]))
def test_random_appends_and_rollbacks_match_a_fresh_forward(seed, ops, kind):
    model = M.Llama(M.LlamaConfig(vocab_size=53, n_positions=64, n_embd=24, n_layer=2, n_head=6, n_kv_head=2,
                                  n_inner=40, head_dim=4, attention_bias=kind == "qwen2")).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    cache, tokens = model.new_cache(64), []
    for op, arg in ops:
        if op == "rollback":
            cache.rollback(int(arg * len(tokens)))
            tokens = tokens[:cache.length]
            continue
        if len(tokens) + arg > 64:
            continue
        new = torch.randint(0, 53, (1, arg), generator=gen)
        with torch.no_grad():
            logits, hidden = model(new, cache)
            tokens += new[0].tolist()
            fresh, fresh_hidden = model(torch.tensor([tokens]))
        assert (logits - fresh[:, -arg:]).abs().max() <= 1e-5
        assert (hidden[-1] - fresh_hidden[-1][:, -arg:]).abs().max() <= 1e-5
        assert cache.length == len(tokens)


def test_ragged_rows_decode_as_each_row_alone(tmp_path):
    """Rows at different lengths in one forward pass (batched.py's case) give each row's own logits."""
    ours = ours_of(tiny_hf("qwen2"), tmp_path)
    prompts = [torch.randint(0, 101, (1, n)) for n in (5, 11, 8)]
    with torch.no_grad():
        cache = ours.new_cache(32, batch_size=3)
        for row, p in enumerate(prompts):
            ours(p, cache, rows=[row])
        step = torch.randint(0, 101, (3, 1))
        batched, _ = ours(step, cache)
        alone = [ours(torch.cat([p, step[r:r + 1]], 1))[0][:, -1] for r, p in enumerate(prompts)]
    assert cache.lengths == [6, 12, 9]
    assert all((batched[r, -1] - alone[r][0]).abs().max() <= 1e-5 for r in range(3))


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope type 'yarn' is not supported; supported: default, llama3"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(model_type="mistral"), "model_type 'mistral' is not supported; supported: gpt2, llama, qwen2"),
    (dict(num_key_value_heads=3), "n_head 4 is not a multiple of n_kv_head 3"),
    (dict(use_sliding_window=True, model_type="qwen2"), "use_sliding_window is not supported"),
])
def test_what_this_code_does_not_implement_is_refused_in_one_line(change, message, tmp_path):
    raw = dict(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, **change)))
    with pytest.raises(cli.UserError, match=message) as err:
        CK.read_config(str(tmp_path / "config.json"))
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# GGUF files, written with the gguf package as llama.cpp's converter writes them

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_vocabulary(merges=("a b", "ab c", "Ġ t")):
    names = {b: name for name, b in T.byte_names().items()}
    tokens = SPECIAL + [names[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    return tokens, list(merges)


def permute(w, heads):
    """llama.cpp's convert_hf_to_gguf permutation of q and k rows (for its RoPE layout)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, quant="Q8_0", tokens=None, chat_template=CHATML, damage=None):
    """hf's weights as a llama.cpp GGUF: 2-D weights quantized (`quant`), norms F32, Q/K rows permuted."""
    c = hf.config
    tokens, merges = tokens or tiny_vocabulary()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    if chat_template:
        w.add_chat_template(chat_template)
    names = [("model.embed_tokens.", "token_embd."), ("model.norm.", "output_norm."), ("lm_head.", "output."),
             ("model.layers.", "blk."), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
             ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
             ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
             ("mlp.down_proj", "ffn_down")]
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = tensor.numpy().astype(np.float32)
        if "q_proj" in name:
            data = permute(data, c.num_attention_heads)
        if "k_proj" in name:
            data = permute(data, c.num_key_value_heads)
        for old, new in names:
            name = name.replace(old, new)
        if damage == "integer tensor" and name == "blk.0.ffn_up.weight":
            w.add_tensor(name, data.astype(np.int8))
        elif data.ndim == 2 and quant != "F32":
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def gguf_hf(**kw):
    return tiny_hf("llama", vocab_size=len(tiny_vocabulary()[0]), hidden_size=64, intermediate_size=96,
                   num_key_value_heads=2, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("quant, tied", [("Q8_0", False), ("F32", True)])
def test_a_gguf_file_loads_as_transformers_loads_it(quant, tied, tmp_path):
    pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
    path = write_gguf(tmp_path / "tiny.gguf", gguf_hf(tie_word_embeddings=tied), quant)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    ours, enc = CK.load(path)
    by_directory = CK.from_pretrained(str(tmp_path))  # a directory holding one .gguf
    idx = torch.randint(0, 262, (1, 20))
    with torch.no_grad():
        expected = reference(idx).logits
        assert (ours(idx)[0] - expected).abs().max() <= 1e-4
        assert (by_directory(idx)[0] - expected).abs().max() <= 1e-5
    assert enc.encode_ordinary("abc t") == [260, 261] and enc.eot_token == 2  # 3 special, 256 bytes, then the merges
    assert T.chat_ids(enc, "hi") == [1] + enc.encode_ordinary("user\nhi") + [2] + enc.encode_ordinary("\n") + [1] + \
        enc.encode_ordinary("assistant\n")


def test_gguf_files_that_cannot_be_loaded_are_one_line(tmp_path):
    hf = gguf_hf()
    good = write_gguf(tmp_path / "good.gguf", hf)
    data = open(good, "rb").read()
    cases = {}
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) * 3 // 4])
    cases["cut.gguf"] = "truncated or corrupt"
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(100))
    cases["junk.gguf"] = "truncated or corrupt"
    write_gguf(tmp_path / "int.gguf", hf, damage="integer tensor")
    cases["int.gguf"] = "tensor 'blk.0.ffn_up.weight' is quantized as I8, which is not supported; supported: F32"
    tokens, merges = tiny_vocabulary()
    write_gguf(tmp_path / "vocab.gguf", hf, tokens=(tokens + [f"x{i}" for i in range(300)], merges))
    cases["vocab.gguf"] = "the tokenizer has 562 tokens but the embedding 262 rows: they do not belong together"
    for name, message in cases.items():
        with pytest.raises(cli.UserError, match=message) as err:
            CK.load(str(tmp_path / name))
        assert "\n" not in str(err.value), name
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        os.symlink(good, tmp_path / "two" / name)
    with pytest.raises(cli.UserError, match="holds 2 .gguf files; pass the path of the one to load"):
        CK.load(str(tmp_path / "two"))


def test_a_tensor_longer_than_its_room_in_the_file_is_refused(tmp_path, monkeypatch):
    """A tensor whose shape and type make it longer than the file gives it (so it overlaps the next)."""
    path = write_gguf(tmp_path / "t.gguf", gguf_hf(), "F32")
    reader = gguf.GGUFReader(path)
    first = min(reader.tensors, key=lambda t: t.data_offset)
    monkeypatch.setattr(type(first), "n_bytes", property(lambda self: 10**6), raising=False)
    monkeypatch.setattr(gguf, "GGUFReader", lambda p: reader)
    with pytest.raises(cli.UserError, match=f"tensor {first.name!r} runs into the next tensor or past the end"):
        CK.open_gguf(path)


@pytest.mark.slow
def test_the_command_line_chats_with_a_gguf_model_and_refuses_chat_without_a_template(tmp_path):
    good = write_gguf(tmp_path / "chat.gguf", gguf_hf())
    bare = write_gguf(tmp_path / "bare.gguf", gguf_hf(), chat_template=None)
    run = [sys.executable, os.path.join(HERE, "backtrack.py"), "--no-backtrack", "--max-new-tokens", "3", "--json",
           "--chat", "--prompt", "hi", "--model-dir"]
    env = dict(os.environ, BACKTRACK_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(run + [good], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 1 <= len(json.loads(done.stdout)["tokens"]) <= 3
    refused = subprocess.run(run + [bare], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and "Traceback" not in refused.stderr
    assert "--chat needs a chat template" in refused.stderr


# ----------------------------------------------------------------------------------------------
# The shipped SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm():
    return CK.from_pretrained(SMOLLM), CK.load_tokenizer(SMOLLM)


@pytest.mark.slow
@needs_smollm
def test_the_shipped_gguf_is_the_model_transformers_reads(smollm):
    pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
    ours, enc = smollm
    reference = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM, gguf_file=os.path.basename(SMOLLM_GGUF),
                                                                  dtype=torch.float32).eval()
    ids = enc.encode_ordinary("The quick brown fox jumps over the lazy dog, and then it")
    with torch.no_grad():
        expected, ours_logits = reference(torch.tensor([ids])).logits, ours(torch.tensor([ids]))[0]
    assert (ours_logits - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert ours_logits[0, -1].argmax() == expected[0, -1].argmax()


def corpus():
    """RTP prompts, probe texts, and what tokenizers get wrong: digit and whitespace runs, emoji, scripts."""
    texts = ["12345 6789", "a  1", "x   22  3 ", "   ", "\n\n  \t x", "$1,000,000.00", "🖕 死ね 傻逼 操你妈 👍🏽",
             "Привет, мир", "नमस्ते दुनिया", "مرحبا", "I'm you're 'LL 'S", "a\r\nb\rc", "  \n  leading", "tab\there",
             "e\u0301 café", "x\u0004y"]
    for name in ("toxic.jsonl", "nontoxic.jsonl"):
        with open(os.path.join(SHARED, "data", "rtp", name), encoding="utf-8") as f:
            texts += [json.loads(line)["prompt"]["text"] for line in f]
    with open(os.path.join(HERE, "probe_data", "curated.jsonl"), encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f][:1500]
    return texts


@pytest.mark.slow
@needs_smollm
def test_the_tokenizer_gives_transformers_ids(smollm):
    """Ours read from the GGUF against transformers' reading of the same file, with the pre-tokenizer
    the GGUF names ("smollm": digits one at a time, which transformers' GGUF reader leaves out), and
    ours read from transformers' export against that export as it is."""
    tokenizers = pytest.importorskip("tokenizers")
    _, enc = smollm
    export = os.path.join(SMOLLM, "transformers-export")
    raw = json.load(open(os.path.join(export, "tokenizer.json"), encoding="utf-8"))
    exported = tokenizers.Tokenizer.from_str(json.dumps(raw))
    raw["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                  raw["pre_tokenizer"]]}
    with_digits = tokenizers.Tokenizer.from_str(json.dumps(raw))
    from_export = T.from_tokenizer_json(os.path.join(export, "tokenizer.json"),
                                        os.path.join(export, "tokenizer_config.json"))
    texts = corpus()
    assert len(texts) > 3000
    assert [enc.encode_ordinary(t) for t in texts] == [with_digits.encode(t, add_special_tokens=False).ids for t in texts]
    assert [from_export.encode_ordinary(t) for t in texts] == [exported.encode(t, add_special_tokens=False).ids
                                                               for t in texts]
    assert enc.eot_token == 2 and enc.decode([enc.eot_token]) == "<|im_end|>"


@pytest.mark.slow
@needs_smollm
def test_chat_ids_are_transformers_apply_chat_template(smollm):
    _, enc = smollm
    reference = transformers.AutoTokenizer.from_pretrained(os.path.join(SMOLLM, "transformers-export"))
    for prompt in ["Hello there", "Shut up, you", " leading space", "two\nlines", "<|im_end|> is text here"]:
        expected = reference.apply_chat_template([dict(role="user", content=prompt)], add_generation_prompt=True,
                                                 tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        ours = T.chat_ids(enc, prompt)
        if "<|im_end|>" in prompt:  # transformers reads it as the special token; ours keeps the user's text as text
            assert expected.count(2) == 3 and ours.count(2) == 2 and len(ours) == len(expected) + 6
            continue
        assert ours == expected, prompt


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bench_compares_against_transformers_with_the_same_weights(kind, tmp_path):
    import bench
    ours = ours_of(tiny_hf(kind), tmp_path)
    twin, _ = bench.hf_twin(ours, ours.config)
    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert (twin(idx).logits - ours(idx)[0]).abs().max() <= 1e-4


@pytest.mark.slow
@needs_smollm
def test_a_llama_hub_name_downloads_its_family_files_once(tmp_path, monkeypatch):
    """`owner/name` of a LlamaForCausalLM: config.json first, then the family's files (the weights,
    tokenizer.json and tokenizer_config.json), once, into Hugging Face's cache, against a local
    stand-in for the Hub; the model and its tokenizer load as from the directory."""
    from test_checkpoints import Hub
    source = tmp_path / "source"
    hf = tiny_hf(vocab_size=49152, tie_word_embeddings=True)
    hf.save_pretrained(source, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(SMOLLM, "transformers-export", name), source / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with Hub(str(source)) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        model, enc = CK.load("someone/tiny-llama")
        assert hub.requests == dict.fromkeys(CK.HUB_FILES["llama"], 1)
        CK.load("someone/tiny-llama")
        assert hub.requests == dict.fromkeys(CK.HUB_FILES["llama"], 1)  # cached
    local_model, local_enc = CK.load(str(source))
    assert enc.encode_ordinary("Hello 123 world") == local_enc.encode_ordinary("Hello 123 world")
    idx = torch.tensor([enc.encode_ordinary("Hello world")])
    with torch.inference_mode():
        assert torch.equal(model(idx)[0], local_model(idx)[0])


def test_sharded_weights_are_refused_in_one_line(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    os.rename(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(cli.UserError, match="the weights are sharded"):
        CK.from_pretrained(str(tmp_path))
