"""Detectors: how unsafe is the text the model has written so far?

Every detector has the same small interface, which the decoding loop (backtrack.py) calls:

    detector.start(prompt_ids)          # a new generation; the prompt itself is never judged
    p = detector.score(token, hidden)   # once per new token: P(unsafe) of the generated text so far
    detector.rollback(n)                # forget all but the first n generated tokens
    detector.threshold                  # p >= threshold is an alarm
    detector.safe_level                 # optional (default: threshold): text is shown only up to a
                                        # token whose score was below it
    detector.clone()                    # the same detector with its own state, for a row of a batch

`hidden` is the list of hidden states the model's forward pass returned for the new token
(model.GPT.forward), so a probe scores a token at the cost of one dot product. Per-token state lives
in a History, whose rollback moves a pointer, like the KV cache.

The detectors:
- LinearProbe: logistic regression on hidden states (one or more layers side by side), mean-pooled
  over the newest `window` generated tokens. Fitted by fit_probe() at the end of this file: once per
  model through probe_for(), or from the command line with train_probe.py.
- KeywordDetector: a word list matched on the decoded text, across token boundaries.
- ProbeAndKeywords: both; an alarm when either fires (the default of backtrack.py).
- TextDetector: any text -> probability function (an external guard model, as in CARE).
"""
import ast
import codecs
import copy
import csv
import fcntl
import io
import json
import math
import os
import random
import re
import sys
import tempfile
import time

import numpy as np
import torch

from model import UserError, cache_root, progress, weights_fingerprint

HERE = os.path.dirname(os.path.abspath(__file__))


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
    """A short hash of the config and of a strided sample of every tensor: any change to any weight
    (a fine-tune, a merged LoRA) gives another fingerprint, so it gets its own probe. A model packed
    for the CPU keeps the fingerprint pack_for_cpu() took just before packing."""
    return getattr(model, "fingerprint", None) or weights_fingerprint(model)


def check_probability(value, name, where, low_open=True):
    """A float in (0, 1) (or [0, 1) with low_open False); a bool, string, null or NaN is refused."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value < 1 if low_open else 0 <= value < 1)
    if not ok:
        raise UserError(f"{where}: {name} must be a probability strictly between 0 and 1, not {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------


class LinearProbe:
    """sigmoid(w . mean(h over the newest `window` generated tokens) + b), where h is the hidden
    states of `layers` side by side (weight holds one row per layer).

    Because the probe is linear, mean-pooling the hidden states and then projecting equals
    projecting each token once and averaging the projections: the per-token state is one number.
    Only generated tokens are pooled, so a toxic prompt does not raise the score by itself.
    `safe_level` (at most the threshold): the loop shows text only up to where the score was below it.
    """

    def __init__(self, weight, bias, layers, window, threshold, safe_level=None, meta=None):
        self.layers = [layers] if isinstance(layers, int) else list(layers)
        self.weight = torch.as_tensor(weight, dtype=torch.float32).reshape(len(self.layers), -1)
        self.bias, self.window, self.threshold = float(bias), int(window), float(threshold)
        self.safe_level = self.threshold if safe_level is None else float(safe_level)
        self.meta = meta or {}
        self.projections = History()

    def start(self, prompt_ids):
        self.projections.rollback(0)

    def project(self, hidden):
        """w . h for one token: hidden is the forward pass's list of per-layer states."""
        h = torch.stack([hidden[layer].reshape(-1) for layer in self.layers])
        return float((h.float() * self.weight.to(h.device)).sum())

    def score(self, token, hidden):
        self.projections.append(self.project(hidden))
        recent = self.projections.last(self.window)
        return 1 / (1 + math.exp(-(sum(recent) / len(recent) + self.bias)))

    def rollback(self, n):
        self.projections.rollback(n)

    def clone(self):
        """The same probe with its own per-token state (one per row of a batch)."""
        return LinearProbe(self.weight, self.bias, self.layers, self.window, self.threshold, self.safe_level, self.meta)

    def logit(self, p=None):
        """The threshold (or p) as a logit: where w . mean(h) + b crosses it."""
        p = self.threshold if p is None else p
        return math.log(p / (1 - p))

    def with_threshold(self, threshold=None, logit=None):
        """A copy alarming at `threshold` (a probability) or at `logit`; the safe level keeps its
        distance in logits below the threshold."""
        threshold = threshold if logit is None else 1 / (1 + math.exp(-logit))
        threshold = check_probability(threshold, "threshold", "with_threshold")
        gap = self.logit() - self.logit(self.safe_level)
        return LinearProbe(self.weight, self.bias, self.layers, self.window, threshold,
                           1 / (1 + math.exp(-(self.logit(threshold) - gap))), self.meta)

    def save(self, path):
        record = dict(self.meta, layers=self.layers, window=self.window, threshold=self.threshold,
                      safe_level=self.safe_level, bias=self.bias,
                      weight=[[round(x, 7) for x in row] for row in self.weight.tolist()])
        write_atomically(path, json.dumps(record))

    @classmethod
    def load(cls, path, model=None):
        """Read a probe, checking every field; with `model`, refuse one fitted on another model."""
        try:
            with open(path, encoding="utf-8") as f:
                r = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path}: no such probe file; check the path, or leave out --probe to fit one")
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable probe ({type(e).__name__}: {e}); fit a new one with "
                            "train_probe.py --out FILE")
        if not isinstance(r, dict):
            raise UserError(f"{path}: a probe file holds a JSON object, not {type(r).__name__}")
        layers = r.pop("layers", r.pop("layer", None))
        layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        window, weight, bias = r.pop("window", None), r.pop("weight", None), r.pop("bias", None)
        if not (isinstance(layers, list) and layers and all(type(x) is int and x >= 0 for x in layers)):
            raise UserError(f"{path}: layers must be a list of hidden-state numbers >= 0, not {layers!r}")
        if not (type(window) is int and window >= 1):
            raise UserError(f"{path}: window must be an integer >= 1, not {window!r}")
        if not (isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias)):
            raise UserError(f"{path}: bias must be a finite number, not {bias!r}")
        threshold = check_probability(r.pop("threshold", None), "threshold", path)
        safe_level = r.pop("safe_level", None)
        safe_level = threshold if safe_level is None else check_probability(safe_level, "safe_level", path)
        if safe_level > threshold:
            raise UserError(f"{path}: safe_level {safe_level} is above the threshold {threshold}")
        rows = weight if isinstance(weight, list) and weight and all(isinstance(x, list) for x in weight) else [weight]
        try:
            w = torch.tensor(rows, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"{path}: weight must be a list of numbers per layer")
        if w.dim() != 2 or w.shape[0] != len(layers) or not torch.isfinite(w).all() or w.shape[1] < 1:
            raise UserError(f"{path}: weight must hold {len(layers)} row(s) of finite numbers, one per layer, "
                            f"not shape {tuple(w.shape)}")
        probe = cls(w.float(), bias, layers, window, threshold, safe_level, meta=r)
        if model is not None:
            c = model.config
            if w.shape[1] != c.n_embd or max(layers) > c.n_layer:
                raise UserError(f"{path} reads hidden states of width {w.shape[1]} at layers {layers}, but "
                                f"{model.name_or_path} has width {c.n_embd} and layers 0..{c.n_layer}: it was fitted "
                                "on another model; fit one with train_probe.py, or leave out --probe")
            if r.get("fingerprint") != model_fingerprint(model):
                raise UserError(f"{path} was fitted on {r.get('model')} (fingerprint {r.get('fingerprint')}), but "
                                f"{model.name_or_path} has fingerprint {model_fingerprint(model)}: its weights differ; "
                                "fit one with train_probe.py, or leave out --probe")
        return probe


def write_atomically(path, text):
    """Write to a unique temporary file beside `path`, then rename it: readers see the old file or
    the new one, never half of one, even with several writers at once."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(part, path)
    except BaseException:
        if os.path.exists(part):
            os.remove(part)
        raise


# ----------------------------------------------------------------------------------------------


DETECTORS = ("probe+keywords", "probe", "keywords")
WORDLIST = os.path.join(HERE, "probe_data", "ldnoobw-en.txt")  # CC BY 4.0
DEFAULT_DETECTOR = "probe+keywords"


def make_detector(name, probe, wordlist, enc):
    """A detector by name: "probe", "keywords" (a word list file) or "probe+keywords" (either fires)."""
    keywords = KeywordDetector(load_wordlist(wordlist), enc) if "keywords" in name else None
    return {"probe": probe, "keywords": keywords}.get(name) or ProbeAndKeywords(probe, keywords)


def default_detector(model, enc, kind=DEFAULT_DETECTOR, probe=None, threshold=None, wordlist=None):
    """The detector the command line uses: `kind` probe+keywords (the default), probe or keywords.
    The probe is `probe` (a file) or the one fitted for this model on first use and cached; the word
    list is `wordlist` or WORDLIST."""
    fitted = None
    if "probe" in kind:
        fitted = probe_for(model, enc, probe)
        if threshold is not None:
            fitted = fitted.with_threshold(threshold)
    return make_detector(kind, fitted, wordlist or WORDLIST, enc)


def load_wordlist(path):
    """Terms from .txt (one per line; tab-separated lines give their 2nd field), .csv (`text` column
    or the first), or .json (a list of strings, or an object with a `payloads` list). UTF-8 (with or
    without a byte-order mark) or UTF-16 with one; anything else is refused, never half-read."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read the word list ({e.strerror}); check the path")
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: the word list is not UTF-8 or UTF-16 text (byte {e.start}); save it as UTF-8")
    try:
        if path.endswith(".json"):
            data = json.loads(text)
            terms = data.get("payloads") if isinstance(data, dict) else data
            if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
                raise ValueError("expected a list of strings, or an object with a \"payloads\" list of strings")
        elif path.endswith(".csv"):
            rows = list(csv.reader(io.StringIO(text)))
            col = rows[0].index("text") if rows and "text" in rows[0] else 0
            terms = [r[col] for r in rows[1:] if len(r) > col]
        else:
            terms = [line.split("\t")[1] if "\t" in line else line for line in text.splitlines()]
    except (ValueError, csv.Error) as e:
        raise UserError(f"{path}: cannot read the word list ({e}); use one term per line, a CSV with a text "
                        "column, or a JSON list of strings")
    terms = sorted({t.strip().lower() for t in terms if t.strip()})
    if not terms:
        raise UserError(f"{path}: the word list holds no terms")
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
        self.matched = None  # the listed term the newest token completed, if any (traces show it)

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
        self.matched = next((m.group() for m in self.pattern.finditer(text) if m.end() > len(before)), None)
        return 1.0 if self.matched else 0.0

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


class ProbeAndKeywords:
    """A probe and a word list together: an alarm when either fires. The score is the probe's, or 1.0
    when the newest token completes a listed word; the probe's threshold and safe level apply."""

    def __init__(self, probe, keywords):
        self.probe, self.keywords = probe, keywords
        self.threshold, self.safe_level = probe.threshold, probe.safe_level

    def start(self, prompt_ids):
        self.probe.start(prompt_ids)
        self.keywords.start(prompt_ids)

    def score(self, token, hidden):
        probe_score = self.probe.score(token, hidden)
        return 1.0 if self.keywords.score(token) else probe_score

    @property
    def matched(self):
        return self.keywords.matched

    def rollback(self, n):
        self.probe.rollback(n)
        self.keywords.rollback(n)

    def clone(self):
        return ProbeAndKeywords(self.probe.clone(), self.keywords.clone())


# ----------------------------------------------------------------------------------------------
# Fitting a probe. default_detector() calls probe_for() when it needs one; train_probe.py wraps the
# same functions with dataset presets, reports and options.


# The defaults, each chosen by measurement on the RTP select split (README: "The detector")
WINDOW, L2, TARGET_FPR, SAFE_FPR = 2, 0.1, 0.1, 0.3
# The automatic fit's data, shipped with the repo (probe_data/README.md): file, text column, label
# column, and what counts as toxic (with "context": the column of the prompt a continuation follows).
SHIPPED_DATA = {
    "curated": (os.path.join(HERE, "probe_data", "curated.jsonl"), "text", "toxic", {"positive": "1"}),
    "rtp_train": (os.path.join(HERE, "probe_data", "rtp_train.jsonl"), "continuation", "toxic",
                  {"positive": "1", "context": "prompt"}),
}


def probe_for(model, enc, probe_path=None):
    """The probe for `model`: the given file, else the cached one, else fitted now and cached. A
    per-model lock makes concurrent first runs fit once; a cached probe that fails its checks is
    fitted again; a cache that cannot be written costs a warning, never the fitted probe."""
    if probe_path:
        return LinearProbe.load(probe_path, model)
    path = os.path.join(cache_root(), "probes", f"{model_fingerprint(model)}.json")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = open(path + ".lock", "w")
    except OSError as e:
        print(f"warning: cannot use the probe cache {os.path.dirname(path)} ({e.strerror}); fitting without it",
              file=sys.stderr)
        return fit_automatic(model, enc)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process fitting this model's probe finishes first
        if os.path.exists(path):
            try:
                return LinearProbe.load(path, model)
            except UserError as e:
                print(f"the cached probe is unusable ({e}); fitting it again", file=sys.stderr)
        print(f"no probe for {model.name_or_path} yet: fitting one on {', '.join(SHIPPED_DATA)} in probe_data/ "
              f"(cached in {path})", file=sys.stderr)
        probe = fit_automatic(model, enc)
        try:
            probe.save(path)
        except OSError as e:
            print(f"warning: cannot cache the probe in {path} ({e.strerror}); it will be fitted again next time",
                  file=sys.stderr)
    return probe


def fit_automatic(model, enc):
    """Fit on the data that ships with the repo, calibrated on the benign RTP continuations."""
    data = {name: read_dataset(*spec) for name, spec in SHIPPED_DATA.items()}
    texts, labels, contexts, origin = training_set(data, seed=0)
    probe, _, _ = fit_probe(model, enc, texts, labels, contexts, source=",".join(data),
                            calibrate_on=origin == "rtp_train")
    print(f"probe: held-out AUROC {probe.meta['metrics']['auroc']:.3f}, threshold {probe.threshold:.6f} "
          f"(logit {probe.logit():.2f})", file=sys.stderr)
    return probe


def read_rows(path, text_col, label_col, positive=None, threshold=None, context_col=None):
    """(texts, labels, malformed, contexts): labels are 1 for toxic; contexts[i] is the text row i
    follows (its prompt, from context_col) or None. CSV, TSV or JSONL by extension.

    positive: comma-separated label values that mean toxic; threshold: a numeric label >= it is toxic.
    Rows without text or with an unreadable label are counted as malformed and skipped.
    """
    if (positive is None) == (threshold is None):
        raise UserError("give exactly one of --positive (label values that mean toxic) or --threshold")
    positives = set(str(positive).split(",")) if positive is not None else None
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            if path.endswith(".jsonl"):
                rows = []
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        rows.append(None)
            else:  # TSV files such as OLID hold stray quote characters: no quote handling there
                tsv = path.endswith(".tsv")
                rows = list(csv.DictReader(f, delimiter="\t" if tsv else ",",
                                           quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL))
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check the path")
    if rows and all(r is not None and text_col not in r for r in rows[:50]):
        raise UserError(f"{path}: no column {text_col!r}; columns are {', '.join(next(r for r in rows if r))}")
    texts, labels, contexts, malformed = [], [], [], 0
    for row in rows:
        try:
            text, raw = row[text_col], row[label_col]
            context = row[context_col] if context_col else None
            if context is not None and not isinstance(context, str):
                raise TypeError("context is not text")
            if isinstance(text, str) and text.startswith(("b'", 'b"')):  # ToxiGen stores bytes literals
                text = ast.literal_eval(text).decode("utf-8", errors="replace")
            label = str(raw) in positives if positives else float(raw) >= threshold
            if not isinstance(text, str) or not text.strip():
                raise ValueError("empty text")
        except (TypeError, KeyError, ValueError, SyntaxError):
            malformed += 1
            continue
        texts.append(text.strip())
        labels.append(int(label))
        contexts.append(context)
    return texts, labels, malformed, contexts


def read_dataset(path, text_col, label_col, rule):
    """(texts, labels, contexts) of one labelled file, with a line on stderr saying what was read.
    rule: {"positive": ...} or {"threshold": ...} (see read_rows), and "context": a prompt column."""
    rule = dict(rule)
    context_col = rule.pop("context", None)
    texts, labels, malformed, contexts = read_rows(path, text_col, label_col, context_col=context_col, **rule)
    if len(set(labels)) < 2:
        raise UserError(f"{path}: needs both toxic and benign rows; check --positive/--threshold")
    print(f"{os.path.basename(path)}: {len(texts)} rows, {100 * np.mean(labels):.1f}% toxic, "
          f"{malformed} malformed rows skipped", file=sys.stderr)
    return texts, labels, contexts


def training_set(data, seed, max_rows=None):
    """(texts, labels, contexts, origin) from {name: (texts, labels, contexts)}: a text without a
    context of its own (a labelled tweet or comment) is read after a random other text of the data,
    so the probe learns to judge what follows a context, whatever the context is."""
    rng = random.Random(seed)
    texts, labels, contexts, origin = [], [], [], []
    for key, (t, lab, ctx) in data.items():
        keep = sorted(rng.sample(range(len(t)), min(max_rows or len(t), len(t))))  # big sets do not dominate
        texts += [t[i] for i in keep]
        labels += [lab[i] for i in keep]
        contexts += [ctx[i] for i in keep]
        origin += [key] * len(keep)
    contexts = [c if c is not None else rng.choice(texts) for c in contexts]
    return texts, labels, contexts, np.asarray(origin)


@torch.inference_mode()
def hidden_batches(model, enc, texts, contexts=None, batch_size=32, max_tokens=32, desc="features"):
    """Yield (text indices, hidden states, mask of each text's own tokens), batch by batch.

    contexts[i], when not None, is read before texts[i] but is not the text's own (the prompt it
    follows). Rows are right-padded; causal attention means padding never changes real positions.
    """
    device = model.wte.weight.device
    contexts = contexts or [None] * len(texts)
    encoded = []
    for text, context in zip(texts, contexts):
        own = enc.encode_ordinary(text)[:max_tokens] or [enc.eot_token]
        before = enc.encode_ordinary(context)[-max_tokens:] if context else []
        ids = (before + own)[-model.config.n_positions:]
        encoded.append((ids, min(len(own), len(ids))))
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i][0]))  # similar lengths batch well
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress(batches, desc):
        width = max(len(encoded[i][0]) for i in batch)
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, i in enumerate(batch):
            ids, own = encoded[i]
            idx[row, :len(ids)] = torch.tensor(ids)
            mask[row, len(ids) - own:len(ids)] = True
        _, hidden = model(idx.to(device), which_logits="none")
        yield batch, [h.float().cpu() for h in hidden], mask


def token_states(model, enc, texts, contexts=None, layers=(-1,), batch_size=32, max_tokens=32, desc="features"):
    """The hidden states at `layers` (concatenated) of each text's own tokens, left-aligned and
    right-padded: (N, T, len(layers) * C), with a mask (N, T) of the real ones."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    states = torch.zeros(len(texts), max_tokens, len(layers) * model.config.n_embd)
    mask = torch.zeros(len(texts), max_tokens, dtype=torch.bool)
    for batch, hidden, own in hidden_batches(model, enc, texts, contexts, batch_size, max_tokens, desc):
        for row, i in enumerate(batch):
            h = torch.cat([hidden[layer][row][own[row]] for layer in layers], -1)
            states[i, :len(h)], mask[i, :len(h)] = h, True
    width = int(mask.sum(1).max())
    return states[:, :width], mask[:, :width]


def window_max(projections, mask, window):
    """Per text, the highest mean projection over `window` consecutive own tokens (fewer at the
    start): the statistic LinearProbe.score thresholds while decoding, one token at a time."""
    c = torch.nn.functional.pad((projections * mask).cumsum(1), (1, 0))
    t = torch.arange(1, mask.shape[1] + 1)
    lo = (t - window).clamp(min=0)
    means = (c[:, t] - c[:, lo]) / (t - lo)  # own tokens are left-aligned, so every window is full of them
    return means.masked_fill(~mask, float("-inf")).max(1).values


def fit_probe(model, enc, texts, labels, contexts, layers=None, window=WINDOW, target_fpr=TARGET_FPR,
              safe_fpr=SAFE_FPR, seed=0, l2=L2, test_share=0.2, source="", batch_size=32, states=None,
              calibrate_on=None, progress_to=sys.stderr):
    """Fit on a stratified split, set the operating point on benign held-out text, evaluate.

    contexts[i] is the text that texts[i] is read after (its prompt), or None. The alarm threshold
    flags target_fpr of the benign held-out texts (those where calibrate_on is True, default all),
    the safe level safe_fpr of them. Returns (probe, test mask, deployed scores of the test rows).
    `states`: token_states() of these texts and contexts at `layers`, if already computed.
    """
    layers = default_layers(model) if layers is None else list(layers)
    if states is None:
        states = token_states(model, enc, texts, contexts, layers, batch_size)
    states, mask = states
    train, test = stratified_split(labels, test_share, seed)
    y = np.asarray(labels)
    t0 = time.time()
    print(f"  fitting the probe on {int(train.sum())} texts ...", file=progress_to, flush=True)
    weight, bias = fit_probe_weights(states[train], mask[train], y[train], window, l2)
    print(f"  fitted in {time.time() - t0:.0f}s", file=progress_to, flush=True)
    scores = sigmoid((window_max(states[test] @ weight, mask[test], window) + bias).numpy())
    benign = (y[test] == 0) & (np.ones(len(y), bool) if calibrate_on is None else np.asarray(calibrate_on))[test]
    threshold = threshold_for_fpr(scores[benign], target_fpr)
    safe_level = min(threshold, threshold_for_fpr(scores[benign], safe_fpr))
    meta = dict(model=model.name_or_path, fingerprint=model_fingerprint(model), n_embd=model.config.n_embd,
                pooling=f"mean over the newest {window} generated tokens of layers {layers}, side by side",
                training="max over windows (multiple-instance), class-balanced, L2",
                operating_point=f"threshold: {target_fpr:.0%} false alarms, safe level: {safe_fpr:.0%}, on benign "
                                "held-out continuations; both rates chosen by generation on the RTP select split (README)",
                target_fpr=target_fpr, safe_fpr=safe_fpr, l2=l2, data=source, n_train=int(train.sum()),
                n_test=int(test.sum()), seed=seed, metrics=binary_metrics(scores, y[test], threshold))
    return LinearProbe(weight.reshape(len(layers), -1), bias, layers, window, threshold, safe_level, meta), test, scores


def default_layers(model):
    """Every hidden state, side by side (still one dot product per token): with the L2 penalty
    strong enough, it beat every single layer on the RTP select split (README)."""
    return list(range(model.config.n_layer + 1))


def fit_probe_weights(states, mask, y, window, l2=1e-4, steps=300):
    """(w, b) for sigmoid(window_max(states @ w) + b) = P(toxic): the probe is trained on the very
    statistic it is thresholded on while decoding (a multiple-instance objective: a text is toxic
    if some window of it is). Warm-started from a logistic regression on mean-pooled states."""
    y = torch.as_tensor(y, dtype=torch.float32)
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    w0, b0 = fit_logistic(pooled, y, l2, steps)
    std = states[mask].std(0) + 1e-6  # penalise standardised weights, as fit_logistic does
    w, b = w0.clone().requires_grad_(True), torch.tensor([b0], requires_grad=True)
    minimise([w, b], lambda: balanced_bce(window_max(states @ w, mask, window) + b, y)
             + l2 * ((w * std) ** 2).sum(), steps)
    return w.detach(), float(b.detach())


def fit_logistic(x, y, l2=1e-4, steps=300):
    """Class-balanced, L2-regularised logistic regression; returns (weight, bias) for raw features."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std  # standardised, so one l2 suits every model width
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    minimise([w, b], lambda: balanced_bce(z @ w + b, y) + l2 * (w * w).sum(), steps)
    weight = (w / std).detach()  # fold the standardisation into the probe
    return weight, float(b.detach() - (weight * mean).sum())


def minimise(params, loss, steps):
    """Minimise loss() over params: full-batch L-BFGS with a strong Wolfe line search."""
    opt = torch.optim.LBFGS(params, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value
    opt.step(closure)


def balanced_bce(logits, y):
    """Binary cross-entropy with both classes given equal total weight."""
    pos = y.mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    return (weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()


def threshold_for_fpr(benign_scores, target_fpr):
    """The smallest threshold that flags at most target_fpr of the benign scores."""
    s = np.sort(np.asarray(benign_scores))[::-1]
    k = int(math.floor(target_fpr * len(s)))
    return float(np.nextafter(s[k], 1.0)) if k < len(s) else 0.0


def stratified_split(labels, test_share, seed):
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    test = np.zeros(len(labels), dtype=bool)
    for value in (0, 1):
        idx = np.flatnonzero(labels == value)
        test[rng.permutation(idx)[:int(round(test_share * len(idx)))]] = True
    return ~test, test


def binary_metrics(scores, labels, threshold):
    pred, labels = np.asarray(scores) >= threshold, np.asarray(labels).astype(bool)
    tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return dict(auroc=auroc(scores, labels), accuracy=float((pred == labels).mean()),
                precision=float(precision), recall=float(recall),
                f1=float(2 * precision * recall / max(precision + recall, 1e-12)),
                fpr=float((pred & ~labels).sum() / max((~labels).sum(), 1)))


def auroc(scores, labels):
    """Area under the ROC curve: P(a random toxic text outscores a random benign one), ties half."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores[np.diff(np.sort(scores), prepend=np.nan) == 0]):  # average tied ranks
        ranks[scores == value] = ranks[scores == value].mean()
    n_pos, n_neg = labels.sum(), len(labels) - labels.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))
