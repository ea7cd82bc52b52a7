"""The byte-level BPE tokenizers of the Llama family (SmolLM2, Llama 3, Qwen2) as tiktoken Encodings,
built offline from a Hugging Face tokenizer.json or from a GGUF file's metadata, and chat templates.

    enc = from_tokenizer_json("tokenizer.json", "tokenizer_config.json")
    enc = from_gguf_metadata(tokens, token_types, merges, pre, eos_id, chat_template)
    ids = chat_ids(enc, "Hello")   # the prompt in the user's turn, as apply_chat_template would write it

tiktoken merges the adjacent pair whose bytes form the lowest-ranked token; a Hugging Face BPE merges
the pair earliest in its merges list. The two agree when the merges are in token-id order (the token
id is the rank), which from_* check: the same ids as transformers' tokenizer, at tiktoken's speed.
GPT-2's own tokenizer stays in checkpoints.py (tiktoken's gpt2 encoding from vocab.json + merges.txt).
"""
import datetime
import json
import os
import unicodedata

import regex
import tiktoken

from cli import UserError, read_text

# GPT-2's pre-tokeniser split (tiktoken's r50k pattern)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# SmolLM2 splits every digit off before GPT-2's split: so no digit joins a space or another digit, and
# a run of spaces before a digit ends its piece (where GPT-2's split would leave the last space apart)
SMOLLM_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++|\p{N}| ?[^\s\p{L}\p{N}]++|\s++$|\s++(?=\p{N})|\s+(?!\S)|\s"""
# Llama 3 (tiktoken's cl100k split) and Qwen2 (the same, with digits one at a time)
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's names of the pre-tokenizers (GGUF tokenizer.ggml.pre) that these patterns are
GGUF_PRE = {"gpt-2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN, "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN,
            "qwen2": QWEN2_PATTERN}
GGUF_NFC = ("qwen2",)  # Qwen2's tokenizer normalises text to NFC first
NORMAL, BYTE = 1, 6  # GGUF token types; the others (control, user-defined, unused) are special tokens


def byte_names():
    """{character: byte}: GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies
    spell their tokens (the byte itself where printable, 256 + n for the n-th other byte)."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    names = {b: chr(b) for b in shown}
    names.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in names)})
    return {name: b for b, name in names.items()}


class Tokenizer(tiktoken.Encoding):
    """A tiktoken Encoding with the model's own stop token and chat template.

    eot_token: where generation stops, the model's end-of-sequence token (a chat model's end of
    turn, as transformers' generate stops there). Text is NFC-normalised first where the model's
    tokenizer does that (Qwen2). An ASCII character the vocabulary has no token for (SmolLM2 has none
    for 6 control characters, such as U+0004) is left out after the split, as transformers leaves it
    out. (Its other 15 byte gaps are bytes that UTF-8 text never holds, or start characters of
    unassigned planes.)"""
    eot_token = None  # tiktoken's is a property that looks up <|endoftext|>; ours is the model's own

    def __init__(self, name, pattern, ranks, special, eos, chat_template=None, nfc=False):
        super().__init__(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        self.eot_token, self.chat_template, self.nfc = eos, chat_template, nfc
        self.special_tokens = special
        unspelled = [chr(b) for b in range(128) if bytes([b]) not in ranks]
        self.unspelled = regex.compile(f"[{regex.escape(''.join(unspelled))}]") if unspelled else None

    def encode_ordinary(self, text):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self.unspelled is None or not self.unspelled.search(text):
            return super().encode_ordinary(text)
        # split as usual, then drop the bytes no token spells from each piece before its merges
        pieces = (self.unspelled.sub("", piece) for piece in regex.findall(self._pat_str, text))
        return [token for piece in pieces if piece for token in self._encode_single_piece(piece)]


def build(name, pattern, vocab, special, eos, chat_template=None, nfc=False):
    """A Tokenizer of `vocab` ({spelled token: id}, GPT-2's byte spelling) beside its special tokens,
    checked: every byte a token of its own, ids unique."""
    names = byte_names()
    try:
        ranks = {bytes(names[c] for c in token): i for token, i in vocab.items() if token not in special}
    except KeyError as e:
        raise UserError(f"{name}: token spelling {e.args[0]!r} is not byte-level BPE's; only byte-level BPE "
                        "tokenizers (GPT-2, SmolLM2, Llama 3, Qwen2) are supported")
    if len(set(ranks.values())) != len(ranks) or sum(len(token) == 1 for token in ranks) < 128:
        raise UserError(f"{name}: not a byte-level BPE vocabulary (an id twice, or few bytes with a token)")
    if eos not in set(ranks.values()) | set(special.values()):
        raise UserError(f"{name}: the end-of-sequence id {eos} is not in the vocabulary")
    return Tokenizer(name, pattern, ranks, special, eos, chat_template, nfc)


def check_merge_order(name, merges, vocab):
    """tiktoken ranks a token by its id: refuse a BPE whose merges do not make tokens in id order."""
    last = -1
    for merge in merges:
        made = vocab.get(merge.replace(" ", "", 1) if isinstance(merge, str) else "".join(merge))  # "a b" or [a, b]
        if made is None or made <= last:
            raise UserError(f"{name}: its merges do not make tokens in id order (at {merge!r}); this tokenizer "
                            "cannot be held by tiktoken")
        last = made


def from_tokenizer_json(path, config_path=None):
    """A Hugging Face tokenizer.json (and tokenizer_config.json beside it, for the end-of-sequence
    token and the chat template) of a byte-level BPE with one of the pre-tokenizers above."""
    raw = json.loads(read_text(path, "tokenizer", 64 << 20))
    extra = json.loads(read_text(config_path, "tokenizer config", 16 << 20)) if config_path else {}
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or raw["model"].get("type") != "BPE":
        raise UserError(f"{path}: not a BPE tokenizer.json; only byte-level BPE tokenizers are supported")
    model, normalizer = raw["model"], raw.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}) or model.get("byte_fallback"):
        raise UserError(f"{path}: normalizer {normalizer!r} / byte fallback is not supported; only byte-level BPE "
                        "with no normalizer or NFC is")
    pattern = pre_tokenizer_pattern(raw.get("pre_tokenizer"), path)
    special = {t["content"]: t["id"] for t in raw.get("added_tokens", [])}
    check_merge_order(path, model.get("merges", []), model["vocab"])
    eos = extra.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos not in special:
        raise UserError(f"{config_path or path}: no eos_token among the special tokens; add the checkpoint's "
                        "tokenizer_config.json")
    template = extra.get("chat_template") or read_template_beside(config_path)
    return build(path, pattern, model["vocab"], special, special[eos], template, normalizer is not None)


def read_template_beside(config_path):
    """transformers 4.43 and later write the chat template to chat_template.jinja beside the config."""
    path = os.path.join(os.path.dirname(config_path), "chat_template.jinja") if config_path else None
    return read_text(path, "chat template", 1 << 20) if path and os.path.exists(path) else None


def pre_tokenizer_pattern(pre, where):
    """The one regex that splits text as a tokenizer.json's pre-tokenizer does: GPT-2's ByteLevel,
    SmolLM2's digits-then-ByteLevel, or a Split regex followed by a ByteLevel that splits no further."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return SMOLLM_PATTERN
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and "Regex" in steps[0].get("pattern", {})):
        return steps[0]["pattern"]["Regex"]
    raise UserError(f"{where}: pre-tokenizer {kinds} is not supported; supported: ByteLevel (GPT-2), Digits + "
                    "ByteLevel (SmolLM2), Split + ByteLevel (Llama 3, Qwen2)")


def from_gguf_metadata(where, tokens, token_types, merges, pre, eos, chat_template=None):
    """A GGUF file's tokenizer.ggml.* metadata (model "gpt2": byte-level BPE) as a Tokenizer."""
    if pre not in GGUF_PRE:
        raise UserError(f"{where}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(GGUF_PRE)}")
    vocab = {token: i for i, token in enumerate(tokens)}
    special = {token: i for i, (token, kind) in enumerate(zip(tokens, token_types)) if kind not in (NORMAL, BYTE)}
    check_merge_order(where, merges, vocab)
    return build(where, GGUF_PRE[pre], vocab, special, eos, chat_template, pre in GGUF_NFC)


def chat_ids(enc, prompt):
    """The prompt as the user's turn of the model's chat template, with the assistant's turn opened:
    the ids of transformers' apply_chat_template(..., add_generation_prompt=True). The template is
    rendered as transformers does (a sandboxed Jinja environment); the prompt is encoded as ordinary
    text, so a prompt that spells a special token (<|im_end|>) cannot end its turn early."""
    template = getattr(enc, "chat_template", None)
    if not template:
        raise UserError("--chat needs a chat template, and this model's tokenizer has none; leave out --chat")
    import jinja2.sandbox
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    marker = "\x00prompt\x00"
    env.globals.update(raise_exception=refuse, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    names = {v: k for k, v in enc.special_tokens.items()}
    try:
        text = env.from_string(template).render(messages=[dict(role="user", content=marker)],
                                                add_generation_prompt=True, eos_token=names.get(enc.eot_token, ""),
                                                bos_token="")
    except jinja2.TemplateError as e:
        raise UserError(f"the model's chat template cannot be rendered ({type(e).__name__}: {e}); leave out --chat")
    if text.count(marker) != 1:
        raise UserError("the model's chat template does not place the user's message once; leave out --chat")
    before, after = text.split(marker)
    return (enc.encode(before, allowed_special="all") + enc.encode_ordinary(prompt)
            + enc.encode(after, allowed_special="all"))


def refuse(message):
    """What a chat template calls when it refuses its messages."""
    raise UserError(f"the model's chat template refuses the prompt: {message}")
