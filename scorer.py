"""Detectors: how unsafe is the text the model has written so far?

Every detector has the same small interface, which the decoding loop (backtrack.py) calls:

    detector.start(prompt_ids)          # a new generation; the prompt itself is never judged
    p = detector.score(token, hidden)   # once per new token: P(unsafe) of the generated text so far
    detector.rollback(n)                # forget all but the first n generated tokens
    detector.threshold                  # p >= threshold is an alarm
    detector.clone()                    # the same detector with its own state, for a row of a batch

`hidden` is the list of hidden states the model's forward pass returned for the new token
(model.GPT.forward), so a probe scores a token at the cost of one dot product. Per-token state lives
in a History, whose rollback moves a pointer, like the KV cache.

Three detectors:
- LinearProbe: logistic regression on one layer's hidden state, mean-pooled over the newest
  `window` generated tokens. Fitted by train_probe.py.
- KeywordDetector: a word list matched on the decoded text, across token boundaries.
- TextDetector: any text -> probability function (an external guard model, as in CARE).
"""
import copy
import csv
import hashlib
import json
import math
import os
import re

import torch

from model import UserError


class History:
    """Values per generated token, with a length pointer: rollback is O(1)."""

    def __init__(self):
        self.values, self.length = [], 0

    def append(self, value):
        if self.length < len(self.values):
            self.values[self.length] = value  # overwrite what a rollback discarded
        else:
            self.values.append(value)
        self.length += 1

    def rollback(self, n):
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back to {n} tokens: the history holds {self.length}")
        self.length = n

    def last(self, k):
        return self.values[max(0, self.length - k):self.length]

    def all(self):
        return self.values[:self.length]


def model_fingerprint(model):
    """A short hash of the config and a few weights: tells one checkpoint from another."""
    h = hashlib.sha256(json.dumps(model.config.__dict__, sort_keys=True).encode())
    for tensor in (model.wte.weight[:16], model.h[-1].ln_2.weight, model.ln_f.weight):
        h.update(tensor.detach().float().cpu().numpy().round(5).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------


class LinearProbe:
    """sigmoid(w . mean(h_layer over the newest `window` generated tokens) + b).

    Because the probe is linear, mean-pooling the hidden states and then projecting equals
    projecting each token once and averaging the projections: the per-token state is one number.
    Only generated tokens are pooled, so a toxic prompt does not raise the score by itself.
    """

    def __init__(self, weight, bias, layer, window, threshold, meta=None):
        self.weight = torch.as_tensor(weight, dtype=torch.float32)
        self.bias, self.layer, self.window, self.threshold = float(bias), layer, window, threshold
        self.meta = meta or {}
        self.projections = History()

    def start(self, prompt_ids):
        self.projections.rollback(0)

    def score(self, token, hidden):
        h = hidden[self.layer].reshape(-1)
        self.projections.append(float(h.float() @ self.weight.to(h.device)))
        recent = self.projections.last(self.window)
        return 1 / (1 + math.exp(-(sum(recent) / len(recent) + self.bias)))

    def rollback(self, n):
        self.projections.rollback(n)

    def clone(self):
        """The same probe with its own per-token state (one per row of a batch)."""
        return LinearProbe(self.weight, self.bias, self.layer, self.window, self.threshold, self.meta)

    def save(self, path):
        record = dict(self.meta, layer=self.layer, window=self.window, threshold=self.threshold,
                      bias=self.bias, weight=[round(x, 7) for x in self.weight.tolist()])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".part", "w") as f:
            json.dump(record, f)
        os.replace(path + ".part", path)

    @classmethod
    def load(cls, path, model=None):
        """Read a probe; with `model`, refuse one fitted on another model."""
        try:
            with open(path) as f:
                r = json.load(f)
            probe = cls(r.pop("weight"), r.pop("bias"), r.pop("layer"), r.pop("window"),
                        r.pop("threshold"), meta=r)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a readable probe ({type(e).__name__}: {e}); "
                            "refit it with train_probe.py")
        if model is not None:
            fitted_on = f"{probe.meta.get('model')} (n_embd {probe.weight.numel()}, fingerprint {probe.meta.get('fingerprint')})"
            ours = f"{model.name_or_path} (n_embd {model.config.n_embd}, fingerprint {model_fingerprint(model)})"
            if (probe.weight.numel() != model.config.n_embd or probe.layer > model.config.n_layer
                    or probe.meta.get("fingerprint") != model_fingerprint(model)):
                raise UserError(f"{path} was fitted on {fitted_on}, not on {ours}; fit one for this "
                                "model with train_probe.py, or leave out --probe to fit one automatically")
        return probe


# ----------------------------------------------------------------------------------------------


def load_wordlist(path):
    """Terms from .txt (one per line; tab-separated lines give their 2nd field), .csv (`text` column
    or the first), or .json (a list, or an object with a `payloads` list)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.endswith(".json"):
                data = json.load(f)
                terms = data["payloads"] if isinstance(data, dict) else data
            elif path.endswith(".csv"):
                rows = list(csv.reader(f))
                col = rows[0].index("text") if "text" in rows[0] else 0
                terms = [r[col] for r in rows[1:] if len(r) > col]
            else:
                terms = [line.split("\t")[1] if "\t" in line else line for line in f]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"{path}: cannot read the word list ({type(e).__name__}: {e}); "
                        "use one term per line, a CSV with a text column, or a JSON list")
    terms = sorted({t.strip().lower() for t in terms if t.strip()})
    if not terms:
        raise UserError(f"{path}: the word list is empty")
    return terms


class KeywordDetector:
    """Fires (score 1.0) when a listed word or phrase ends in the newest token's text.

    The generated tokens are decoded together, so a word split across tokens (" f" + "uck") is
    caught at the token that completes it. A match needs a word boundary before it; after it, the
    end of the text counts as a boundary, since the next token may never come ("ass" fires before
    we know whether "assistant" follows: a cautious detector).
    """

    def __init__(self, terms, tokenizer, threshold=0.5):
        self.tokenizer, self.threshold = tokenizer, threshold
        words = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<![a-z0-9])(?:{words})(?![a-z0-9])")
        self.longest = max(len(t) for t in terms)
        self.pieces = History()  # the bytes of each generated token

    def start(self, prompt_ids):
        self.pieces.rollback(0)

    def score(self, token, hidden=None):
        self.pieces.append(self.tokenizer.decode_single_token_bytes(token))
        # every token holds at least one byte: this many recent tokens hold the longest term
        # and the character before it
        recent = self.pieces.last(self.longest + 2)
        before = b"".join(recent[:-1]).decode("utf-8", errors="replace").lower()
        text = b"".join(recent).decode("utf-8", errors="replace").lower()
        # only a match that ends inside the newest token's text is new
        return 1.0 if any(m.end() > len(before) for m in self.pattern.finditer(text)) else 0.0

    def rollback(self, n):
        self.pieces.rollback(n)

    def clone(self):
        twin = copy.copy(self)
        twin.pieces = History()
        return twin


class TextDetector:
    """Wraps any text -> P(unsafe) function; it sees the whole generated text (never the prompt)."""

    def __init__(self, fn, tokenizer, threshold=0.5):
        self.fn, self.tokenizer, self.threshold = fn, tokenizer, threshold
        self.tokens = History()

    def start(self, prompt_ids):
        self.tokens.rollback(0)

    def score(self, token, hidden=None):
        self.tokens.append(token)
        return float(self.fn(self.tokenizer.decode(self.tokens.all())))

    def rollback(self, n):
        self.tokens.rollback(n)

    def clone(self):
        return TextDetector(self.fn, self.tokenizer, self.threshold)
