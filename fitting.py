"""Fitting a linear probe to a model's hidden states: the data, the features, the objective, the
operating point, the metrics, the per-model cache, and default_detector(), the command line's detector.

    detector = default_detector(model, enc)   # probe (fitted and cached on first use) + the word lists
    probe = probe_for(model, enc)     # the cached probe for this model, or fitted now on probe_data/
    probe, test, scores = fit_probe(model, enc, texts, labels, contexts)

The features (Features: each text's own-token hidden states) are held a chunk of texts at a time, in
memory or, for the automatic fit, on disk in the cache as they are computed, so a big model's fit
needs little memory and an interrupted one resumes; the automatic fit reads as many of the shipped
texts as FIT_BUDGET affords the model. train_probe.py wraps the same functions with dataset
presets, reports and options.
"""
import ast
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import safetensors
import safetensors.torch
import torch

from checkpoints import fingerprint
from cli import Progress, UserError, cache_root, file_digest, open_lock, read_bytes, write_output
from checks import LOWEST
from detector_files import DEFAULT_DETECTOR, HERE, WORDLISTS, load_probe, make_detector, probe_text
from scorer import LinearProbe

# The defaults, each chosen by measurement on the RTP select split (docs/detector.md, docs/history.md)
WINDOW, L2, TARGET_FPR, SAFE_FPR = 2, 0.1, 0.40, 0.785
CALIBRATION = ("rtp_train", "generated")  # continuations of prompts, as the loop reads them
MAX_TOKENS = 32  # of each text the fit reads: a probe's window is at most this long
CONTEXT_TOKENS = 16  # of a text's context (its prompt): enough to set the scene, and the fit reads half as many tokens
MAX_LAYERS = 7  # hidden states a probe reads: the stand-in's all; evenly spaced ones of a bigger model
# What the first run spends on hidden states: tokens read x the weights each meets (a block's 12 x
# n_embd^2, n_layer times). The stand-in (10.6M) reads every shipped text within it (394,229 tokens);
# gpt2 (85M) reads 1,500 or so, and no model fewer than MIN_TEXTS: on the stand-in, held-out AUROC
# by texts read is flat from ~1,500 to 2,500 and climbs again only past 3,000 (docs/detector.md).
FIT_BUDGET, MIN_TEXTS = 4.5e12, 1500
CHUNK = 128  # texts whose states the fit holds at a time (gpt2-xl: 128 x 32 tokens x 7 x 1600 in float16, 92 MB)
# The automatic fit's data, shipped with the repo (probe_data/README.md): file, text column, label
# column, and what counts as toxic (with "context": the column of the prompt a continuation follows).
SHIPPED_DATA = {
    "curated": (os.path.join(HERE, "probe_data", "curated.jsonl"), "text", "toxic", {"positive": "1"}),
    "rtp_train": (os.path.join(HERE, "probe_data", "rtp_train.jsonl"), "continuation", "toxic",
                  {"positive": "1", "context": "prompt"}),
    # what the loop sees: a model's own continuations of the train-split prompts, soft-labelled by a
    # teacher probe fitted on the two human-labelled sets above (train_probe.py --export-generated)
    "generated": (os.path.join(HERE, "probe_data", "generated.jsonl"), "continuation", "teacher",
                  {"score": True, "context": "prompt"}),
}
HUMAN_LABELLED = ("curated", "rtp_train")  # the teacher's data; held-out AUROC is reported on these


def default_detector(model, enc, kind=DEFAULT_DETECTOR, probe=None, threshold=None, wordlists=None):
    """The detector the command line uses: `kind` probe+keywords (the default), probe or keywords.
    The probe is `probe` (a file) or the one fitted for this model on first use and cached; the word
    lists are `wordlists` (a file or a list of files) or detector_files.WORDLISTS."""
    fitted = None
    if "probe" in kind:
        fitted = probe_for(model, enc, probe)
        if threshold is not None:
            fitted = fitted.with_threshold(threshold)
    return make_detector(kind, fitted, wordlists or WORDLISTS, enc)


def probe_for(model, enc, probe_path=None):
    """The probe for `model`: the given file, else the cached one, else fitted now and cached. A
    per-model lock makes concurrent first runs fit once (saying so while one waits). The cache holds
    only what the fit wrote: each probe's sha256 sits beside it, links are never followed, and a cached
    probe that was changed, fails its checks or could never alarm is fitted again. A cache that cannot
    be written costs a warning, never the fitted probe; one that can only be read is still used."""
    if probe_path:
        return load_probe(probe_path, model)
    path = os.path.join(cache_root(), "probes", f"{fingerprint(model)}-{recipe()}.json")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = open_lock(path + ".lock")
    except OSError as e:
        probe = cached_probe(path, model)  # a read-only cache still serves what it holds
        if probe:
            return probe
        print(f"warning: cannot use the probe cache {os.path.dirname(path)} ({e.strerror}); fitting without it, "
              "and again on the next run", file=sys.stderr)
        return fit_automatic(model, enc, cached=False)
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("another process is fitting this model's probe; waiting for it to finish", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        probe = cached_probe(path, model)
        if probe:
            return probe
        name = getattr(model, "name_or_path", "this model")
        print(f"no probe for {name} yet: fitting one on {', '.join(SHIPPED_DATA)} in probe_data/ "
              f"(cached in {path})", file=sys.stderr)
        probe = fit_automatic(model, enc)
        try:
            for p in (path, path + ".sha256"):
                if os.path.islink(p):  # never write through a link planted in the cache
                    os.remove(p)
            text = probe_text(probe)  # the digest first: a run killed between the two writes leaves no probe
            write_output(path + ".sha256", hashlib.sha256(text.encode()).hexdigest() + "\n", "probe digest")
            write_output(path, text, "probe")  # without its digest, which would refit it from scratch
        except (UserError, OSError) as e:
            print(f"warning: cannot cache the probe ({e}); it will be fitted again next time", file=sys.stderr)
    return probe


def cached_probe(path, model):
    """The cached probe at `path`, or None (saying why) when there is none, it is a link, its bytes are
    not what the fit wrote (the sha256 beside it), it fails the checks of a probe file, or it could
    never alarm (no weight, or a bias no hidden state could overcome)."""
    if not os.path.lexists(path):
        return None
    why = None
    if os.path.islink(path) or os.path.islink(path + ".sha256"):
        why = "it is a link, not what the fit wrote"
    else:
        try:
            with open(path + ".sha256", encoding="ascii") as f:
                recorded = f.read(100).strip()
        except (OSError, ValueError):
            recorded = None
        if recorded != file_digest(path, follow=False):
            why = "its bytes are not what the fit wrote"
    if why is None:
        try:
            probe = load_probe(path, model)
        except UserError as e:
            why = str(e)
        else:
            if not bool(probe.weight.abs().sum() > 0) or abs(probe.bias) > 1e4:
                why = "it could never alarm"
            else:
                return probe
    print(f"the cached probe {path} is unusable ({why}); fitting it again", file=sys.stderr)
    return None


def recipe():
    """A short name for how the automatic fit works (its settings and the size of its data), so that a
    cached probe from an older recipe is not used: an upgrade that changes the recipe fits again."""
    sizes = [os.path.getsize(path) if os.path.isfile(path) else 0 for path, *_ in SHIPPED_DATA.values()]
    spec = repr((WINDOW, L2, TARGET_FPR, SAFE_FPR, CALIBRATION, CONTEXT_TOKENS, MAX_LAYERS, FIT_BUDGET, MIN_TEXTS, CHUNK,
                 sorted(SHIPPED_DATA), sizes))
    return hashlib.sha256(spec.encode()).hexdigest()[:8]


def fit_automatic(model, enc, sets=tuple(SHIPPED_DATA), cached=True):
    """Fit on the data that ships with the repo (or the named `sets` of it), as much of it as
    FIT_BUDGET affords this model, calibrated on the benign continuations of prompts (RTP's and the
    model's own); held-out AUROC on the human-labelled rows. Says first how long it will take, and
    last how long it took and the most memory it held. The features go to the cache as they are
    computed (a killed fit resumes from them) and are deleted once the probe is fitted."""
    t0 = time.time()
    data = {name: read_dataset(*SHIPPED_DATA[name]) for name in sets}
    texts, labels, contexts, origin = training_set(data, seed=0)
    encoded = encode_texts(enc, texts, contexts, model.config.n_positions)
    tokens = np.array([len(ids) for ids, _ in encoded])
    read = texts_within_budget(model, tokens, origin)
    texts, labels, contexts, origin = ([texts[i] for i in read], [labels[i] for i in read],
                                       [contexts[i] for i in read], origin[read])
    layers = default_layers(model)
    forward, fit = fit_estimate(model, int(tokens[read].sum()), len(read), len(layers))

    def announce(left):  # once the cache says what share of the hidden states is still to compute
        resumed = f" ({1 - left:.0%} of the hidden states already cached)" if left < 1 else ""
        print(f"fitting the probe on {len(read):,} of the {len(tokens):,} texts ({int(tokens[read].sum()):,} tokens; "
              f"hidden states {layers}) takes about {left * forward + fit:.0f} s on this machine{resumed} (the hidden "
              f"states ~{left * forward:.0f} s, then the fit ~{fit:.0f} s); " +
              ("only once for this model" if cached else "not cached: every run fits it again"), file=sys.stderr, flush=True)
    directory = (os.path.join(cache_root(), "features", f"{fingerprint(model)}-{recipe()}") if cached
                 else tempfile.mkdtemp(prefix="backtrack-features-"))
    features = Features(model, enc, texts, contexts, layers, directory, encoded=[encoded[i] for i in read],
                        announce=announce)
    probe, _, _ = fit_probe(model, enc, texts, labels, contexts, layers, source=",".join(data), features=features,
                            calibrate_on=np.isin(origin, CALIBRATION), evaluate_on=np.isin(origin, HUMAN_LABELLED))
    features.remove()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux counts KiB
    print(f"probe: held-out AUROC {probe.meta['metrics']['auroc']:.3f}, threshold {probe.threshold:.6f} "
          f"(logit {probe.logit():.2f}); fitted in {time.time() - t0:.0f} s, peak memory {peak:.1f} GiB",
          file=sys.stderr)
    return probe


def texts_within_budget(model, tokens, origin, seed=0):
    """Indices (in order) of the texts the automatic fit reads, given each text's token count: all of
    them when their hidden states cost at most FIT_BUDGET, else the same random share of each set
    that does (at least MIN_TEXTS texts in all)."""
    per_token = 12 * model.config.n_layer * model.config.n_embd ** 2  # a block's weights, each met once
    share = min(1.0, max(FIT_BUDGET / (per_token * tokens.sum()), MIN_TEXTS / len(tokens)))
    rng = np.random.default_rng(seed)
    read = [rng.permutation(np.flatnonzero(origin == name))[:round(share * np.sum(origin == name))]
            for name in dict.fromkeys(origin)]
    return np.sort(np.concatenate(read))


@torch.inference_mode()
def fit_estimate(model, tokens, texts, layers, keep=4, steps=150):
    """(seconds for the hidden states, seconds for the fit) of `texts` texts of `tokens` tokens in
    all, at `layers` hidden states, from this machine's speed: a forward pass is timed on one batch
    now; the fit streams the kept windows about 1.3 times per L-BFGS step, at ~10 GB/s."""
    batch = torch.randint(0, model.config.vocab_size, (32, MAX_TOKENS + CONTEXT_TOKENS), device=model.wte.weight.device)
    model(batch[:2, :8], which_logits="none")  # the first pass pays one-time costs
    t0 = time.perf_counter()
    model(batch, which_logits="none")
    per_token = (time.perf_counter() - t0) / batch.numel()
    return tokens * per_token, 0.8 * texts * keep * layers * model.config.n_embd * 4 * 2 * 1.3 * steps / 10e9


def read_rows(path, text_col, label_col, positive=None, threshold=None, context_col=None, score=False):
    """(texts, labels, malformed, contexts): labels are 1 for toxic; contexts[i] is the text row i
    follows (its prompt, from context_col) or None. CSV, TSV or JSONL by extension.

    positive: comma-separated label values that mean toxic; threshold: a numeric label >= it is toxic;
    score: the label is a probability of toxic (a teacher's soft label), kept as it is.
    Rows without text or with an unreadable label are counted as malformed and skipped.
    """
    if (positive is None) + (threshold is None) + (not score) != 2:
        raise UserError("give exactly one of --positive (label values that mean toxic) or --threshold")
    positives = set(str(positive).split(",")) if positive is not None else None
    text = read_bytes(path, "data file").decode("utf-8", errors="replace")  # OLID holds a few stray bytes
    kind = os.path.splitext(path)[1].lower()
    if kind == ".jsonl":
        rows = []
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError):
                rows.append(None)
    else:  # TSV files such as OLID hold stray quote characters: no quote handling there
        tsv = kind == ".tsv"
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                                       quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL))
        except csv.Error as e:
            raise UserError(f"{path}: not a readable {'TSV' if tsv else 'CSV'} file ({e}); check the file")
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
            label = str(raw) in positives if positives else float(raw) >= threshold if not score else float(raw)
            if not isinstance(text, str) or not text.strip() or not 0 <= label <= 1:
                raise ValueError("empty text, or a score that is not a probability")
        except (TypeError, KeyError, ValueError, SyntaxError):
            malformed += 1
            continue
        texts.append(text.strip())
        labels.append(label if score else int(label))
        contexts.append(context)
    return texts, labels, malformed, contexts


def read_dataset(path, text_col, label_col, rule):
    """(texts, labels, contexts) of one labelled file, with a line on stderr saying what was read.
    rule: {"positive": ...} or {"threshold": ...} (see read_rows), and "context": a prompt column."""
    rule = dict(rule)
    context_col = rule.pop("context", None)
    texts, labels, malformed, contexts = read_rows(path, text_col, label_col, context_col=context_col, **rule)
    if len(set(toxic(labels))) < 2:
        raise UserError(f"{path}: needs both toxic and benign rows; check --positive/--threshold")
    print(f"{os.path.basename(path)}: {len(texts)} rows, {100 * np.mean(toxic(labels)):.1f}% toxic, "
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


def encode_texts(enc, texts, contexts, n_positions, max_tokens=MAX_TOKENS, context_tokens=CONTEXT_TOKENS):
    """[(ids, own)] per text: its first `max_tokens` tokens after the last `context_tokens` of its
    context (the prompt it follows, read but not the text's own), `own` of the ids being its own."""
    encoded = []
    for text, context in zip(texts, contexts or [None] * len(texts)):
        own = enc.encode_ordinary(text)[:max_tokens] or [enc.eot_token]
        before = enc.encode_ordinary(context)[-context_tokens:] if context else []
        ids = (before + own)[-n_positions:]
        encoded.append((ids, min(len(own), len(ids))))
    return encoded


class Features:
    """The hidden states at `layers` (side by side) of each text's own tokens, in float16, held chunk
    by chunk: the texts in order of length (similar lengths batch well), CHUNK of them to a chunk.
    Every step of the fit reads them a chunk at a time, so none holds every text's tokens x layers x
    width. With a `directory`, each chunk is written there as soon as it is computed and read back
    from there, so memory holds one chunk at a time, and an interrupted fit resumes with the chunks
    already written (a chunk that cannot be read is computed again). `encoded`: the texts already
    encoded by encode_texts, when the caller has them. `announce(share)` hears, before any is
    computed, the share of the tokens still to run through the model (1 on a fresh start)."""

    def __init__(self, model, enc, texts, contexts=None, layers=(-1,), directory=None, batch_size=32, desc="features",
                 encoded=None, announce=None):
        states = model.config.n_layer + 1
        self.layers = [layer % states for layer in ([layers] if isinstance(layers, int) else layers)]  # -1: the last
        self.count, self.directory, self.home, self.held = len(texts), directory, directory, {}
        self.width = len(self.layers) * model.config.n_embd  # of a token's features
        encoded = encoded or encode_texts(enc, texts, contexts, model.config.n_positions)
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i][0]))
        self.parts = [order[i:i + CHUNK] for i in range(0, len(order), CHUNK)]
        if directory:
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as e:
                self.held_instead(f"cannot make it ({e.strerror})")
        todo = [c for c in range(len(self.parts)) if self.read(c) is None]
        if announce:  # the share of the tokens still to run through the model
            announce(sum(len(encoded[i][0]) for c in todo for i in self.parts[c]) / max(sum(len(ids) for ids, _ in encoded), 1))
        if directory and len(todo) < len(self.parts):
            print(f"  {desc}: {len(self.parts) - len(todo)} of {len(self.parts)} chunks already computed in "
                  f"{directory}; computing the rest", file=sys.stderr, flush=True)
        bar = Progress(sum(-(-len(self.parts[c]) // batch_size) for c in todo), desc)
        for c in todo:
            self.store(c, *self.compute(model, [encoded[i] for i in self.parts[c]], batch_size, bar))

    @torch.inference_mode()
    def compute(self, model, encoded, batch_size, bar):
        """(states (n, T, D) float16, own-token counts (n,)) of one chunk, batch by batch. Rows are
        right-padded; causal attention means padding never changes real positions."""
        longest = max(own for _, own in encoded)
        states = torch.zeros(len(encoded), longest, self.width, dtype=torch.float16)
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            idx = torch.zeros(len(batch), max(len(ids) for ids, _ in batch), dtype=torch.long)
            for row, (ids, _) in enumerate(batch):
                idx[row, :len(ids)] = torch.tensor(ids)
            _, hidden = model(idx.to(model.wte.weight.device), which_logits="none", keep=self.layers)
            side_by_side = torch.cat([hidden[layer] for layer in self.layers], -1).cpu()
            for row, (ids, own) in enumerate(batch):
                states[start + row, :own] = side_by_side[row, len(ids) - own:len(ids)]
            bar.advance()
        return states, torch.tensor([own for _, own in encoded])

    def store(self, c, states, lengths):
        if self.directory:
            try:
                if os.path.islink(self.path(c)):  # never write through a link planted in the cache
                    os.remove(self.path(c))
                rows = torch.tensor(self.parts[c])
                return write_output(self.path(c), safetensors.torch.save(dict(rows=rows, states=states, lengths=lengths)),
                                    "feature chunk")
            except UserError as e:
                self.held_instead(str(e))
        self.held[c] = states, lengths

    def held_instead(self, why):
        """No more chunks go to the directory: they are held in memory (the fit goes on, unresumable)."""
        print(f"warning: the feature cache {self.directory} cannot be used ({why}); holding the features in "
              "memory instead", file=sys.stderr)
        self.directory = None

    def path(self, c):
        return os.path.join(self.directory, f"chunk-{c:05d}.safetensors")

    def read(self, c):
        """(states, lengths) of chunk c, or None when it is not computed yet (or its file is unreadable)."""
        if c in self.held or self.directory is None:
            return self.held.get(c)
        if os.path.islink(self.path(c)):  # the cache holds only what the fit wrote
            return None
        try:
            part = safetensors.torch.load(read_bytes(self.path(c), "feature chunk"))
            states, lengths = part["states"], part["lengths"]
            if part["rows"].tolist() != self.parts[c] or states.shape != (len(lengths), int(lengths.max()), self.width):
                return None
        except (UserError, OSError, KeyError, ValueError, RuntimeError, safetensors.SafetensorError):
            return None
        return states, lengths

    def map(self, fn, rows=None):
        """fn(states in float32 (n, T, D), mask (n, T)) of the texts `rows` (default all), a chunk at a
        time, joined in the order of `rows`: fn returns one tensor, or a tuple of them, per text."""
        rows = np.arange(self.count) if rows is None else np.asarray(rows)
        where = np.full(self.count, -1)
        where[rows] = np.arange(len(rows))
        joined = None
        for c, part in enumerate(self.parts):
            picked = where[part] >= 0
            if not picked.any():
                continue
            states, lengths = self.read(c)
            if not picked.all():  # (indexing copies a chunk: a big model's fit holds few at a time)
                states, lengths = states[torch.from_numpy(picked)], lengths[torch.from_numpy(picked)]
            outputs = fn(states.float(), torch.arange(states.shape[1]) < lengths[:, None])
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            if joined is None:
                joined = [torch.empty((len(rows),) + o.shape[1:], dtype=o.dtype) for o in outputs]
            for out, o in zip(joined, outputs):
                out[where[part][picked]] = o
        return joined[0] if len(joined) == 1 else tuple(joined)

    def remove(self):
        """Delete the chunks on disk (once the probe they were computed for is fitted)."""
        if self.home:
            shutil.rmtree(self.home, ignore_errors=True)


def window_means(projections, mask, window):
    """(N, T): at each own token, the mean projection over the newest `window` own tokens up to it
    (fewer at the start), -inf past a text's end: what LinearProbe.score computes while decoding."""
    c = torch.nn.functional.pad((projections * mask).cumsum(1), (1, 0))
    t = torch.arange(1, mask.shape[1] + 1)
    lo = (t - window).clamp(min=0)
    means = (c[:, t] - c[:, lo]) / (t - lo)  # own tokens are left-aligned, so every window is full of them
    return means.masked_fill(~mask, float("-inf"))


def window_max(projections, mask, window):
    """Per text, the highest windowed mean projection: the statistic the loop thresholds."""
    return window_means(projections, mask, window).max(1).values


def fit_probe(model, enc, texts, labels, contexts, layers=None, window=WINDOW, target_fpr=TARGET_FPR,
              safe_fpr=SAFE_FPR, seed=0, l2=L2, test_share=0.2, source="", batch_size=32, features=None,
              calibrate_on=None, evaluate_on=None, progress_to=sys.stderr):
    """Fit on a stratified split, set the operating point on benign held-out text, evaluate.

    contexts[i] is the text that texts[i] is read after (its prompt), or None; labels may be soft
    (a teacher's probabilities). The alarm threshold flags target_fpr of the benign (label < 0.5)
    held-out texts (those where calibrate_on is True, default all), the safe level safe_fpr of
    them; the metrics are those of the held-out rows where evaluate_on is True (default all).
    Returns (probe, test mask, deployed scores of the test rows). `features`: the Features of these
    texts and contexts at `layers`, if already computed.
    """
    layers = default_layers(model) if layers is None else list(layers)
    features = features or Features(model, enc, texts, contexts, layers, batch_size=batch_size)
    train, test = stratified_split(labels, test_share, seed)
    y = np.asarray(labels)
    t0 = time.time()
    print(f"  fitting the probe on {int(train.sum())} texts ...", file=progress_to, flush=True)
    weight, bias = fit_probe_weights(features, y, window, l2, rows=np.flatnonzero(train))
    print(f"  fitted in {time.time() - t0:.0f} s", file=progress_to, flush=True)
    scores = probabilities((features.map(lambda s, m: window_max(s @ weight, m, window), np.flatnonzero(test)) + bias).numpy())
    every = np.ones(len(y), bool)
    benign = ~toxic(y[test]) & (every if calibrate_on is None else np.asarray(calibrate_on))[test]
    judged = (every if evaluate_on is None else np.asarray(evaluate_on))[test]
    threshold = min(max(threshold_for_fpr(scores[benign], target_fpr), LOWEST), 1 - LOWEST)  # representable
    safe_level = min(threshold, max(threshold_for_fpr(scores[benign], safe_fpr), LOWEST))
    meta = dict(model=getattr(model, "name_or_path", None), fingerprint=fingerprint(model), n_embd=model.config.n_embd,
                pooling=f"mean over the newest {window} generated tokens of layers {layers}, side by side",
                training="max over windows (multiple-instance), class-balanced, L2",
                operating_point=f"threshold: {target_fpr:.0%} false alarms, safe level: {safe_fpr:.0%}, on benign "
                                "held-out continuations; both rates chosen by generation on the RTP select split, 25 samples "
                                "per prompt, with the loop's default settings (docs/history.md)",
                target_fpr=target_fpr, safe_fpr=safe_fpr, l2=l2, data=source, n_train=int(train.sum()),
                n_test=int(test.sum()), seed=seed, metrics=binary_metrics(scores[judged], y[test][judged], threshold))
    return LinearProbe(weight.reshape(len(layers), -1), bias, layers, window, threshold, safe_level, meta), test, scores


def default_layers(model):
    """At most MAX_LAYERS hidden states, evenly spaced from the embeddings to the last, side by side
    (still one dot product per token): with the L2 penalty strong enough, the stand-in's every state
    beat each single one and each evenly spaced subset on the RTP select split (docs/history.md,
    docs/detector.md). Capping their number bounds the features of the big GPT-2 sizes."""
    count = min(MAX_LAYERS, model.config.n_layer + 1)
    return sorted({round(i * model.config.n_layer / (count - 1)) for i in range(count)})


def mean_pooled(states, mask):
    """(n, D): the mean of each text's own-token states."""
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def fit_probe_weights(features, y, window, l2=1e-4, steps=150, keep=4, rows=None):
    """(w, b) for sigmoid(window_max(states @ w) + b) = P(toxic), fitted on the texts `rows` of
    `features` (default all): the probe is trained on the very statistic it is thresholded on while
    decoding (a multiple-instance objective: a text is toxic if some window of it is). Warm-started
    from a logistic regression on mean-pooled states.

    A text's max is almost always among the `keep` windows the warm start already scores highest,
    so the objective reads those alone: the same fit as over every window, and what it holds is
    `keep` windows per text, not every token (the fit's slowest part is streaming the states)."""
    rows = np.arange(features.count) if rows is None else np.asarray(rows)
    y = torch.as_tensor(y, dtype=torch.float32)[torch.from_numpy(rows)]
    w0, b0 = fit_logistic(features.map(mean_pooled, rows), y, l2, steps, desc="warm start")

    def best_windows(states, mask):
        short = keep - mask.shape[1]
        if short > 0:  # a chunk of texts shorter than `keep`: padded, never kept
            states, mask = torch.nn.functional.pad(states, (0, 0, 0, short)), torch.nn.functional.pad(mask, (0, short))
        top = window_means(states @ w0, mask, window).topk(keep, 1).indices
        return windowed_states(states, top, window), mask.gather(1, top)
    kept, kept_mask = features.map(best_windows, rows)
    std = kept[kept_mask].std(0) + 1e-6  # penalise standardised weights, as fit_logistic does
    w, b = w0.clone().requires_grad_(True), torch.tensor([b0], requires_grad=True)
    minimise([w, b], lambda: balanced_bce((kept @ w).masked_fill(~kept_mask, float("-inf")).max(1).values + b, y)
             + l2 * ((w * std) ** 2).sum(), steps, desc="fit")
    return w.detach(), float(b.detach())


def windowed_states(states, positions, window):
    """(N, k, D): for each text, the mean of its states over the newest `window` own tokens up to each
    of `positions` (N, k) (fewer at the start), whose projection is window_means at that position."""
    total = sum(states.gather(1, (positions - j).clamp(min=0)[..., None].expand(-1, -1, states.shape[2]))
                * (positions >= j)[..., None] for j in range(window))
    return total / torch.clamp(positions + 1, max=window)[..., None]


def fit_logistic(x, y, l2=1e-4, steps=300, desc=None):
    """Class-balanced, L2-regularised logistic regression; returns (weight, bias) for raw features."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std  # standardised, so one l2 suits every model width
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    minimise([w, b], lambda: balanced_bce(z @ w + b, y) + l2 * (w * w).sum(), steps, desc)
    weight = (w / std).detach()  # fold the standardisation into the probe
    return weight, float(b.detach() - (weight * mean).sum())


def minimise(params, loss, steps, desc=None):
    """Minimise loss() over params: full-batch L-BFGS with a strong Wolfe line search (at most 1.25
    evaluations of the loss per step), with a progress bar when `desc` names it."""
    opt = torch.optim.LBFGS(params, max_iter=steps, line_search_fn="strong_wolfe")
    bar = Progress(opt.defaults["max_eval"], desc) if desc else None

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        if bar and bar.done < bar.total:
            bar.advance()
        return value
    opt.step(closure)
    if bar and bar.done < bar.total:
        bar.advance(bar.total - bar.done)  # converged early: the bar ends


def balanced_bce(logits, y):
    """Binary cross-entropy with both classes given equal total weight; a soft label y counts y toxic
    and 1 - y benign."""
    pos = y.mean().clamp(1e-3, 1 - 1e-3)
    weight = y * 0.5 / pos + (1 - y) * 0.5 / (1 - pos)
    return (weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()


def threshold_for_fpr(benign_scores, target_fpr):
    """The smallest threshold that flags at most target_fpr of the benign scores."""
    s = np.sort(np.asarray(benign_scores))[::-1]
    k = int(math.floor(target_fpr * len(s)))
    return float(np.nextafter(s[k], 1.0)) if k < len(s) else 0.0


def toxic(labels):
    """Which labels mean toxic: 1 or True, or a soft label (a teacher's probability) of at least 0.5."""
    return np.asarray(labels, dtype=np.float64) >= 0.5


def stratified_split(labels, test_share, seed):
    """(train, test) masks, each label (a soft one by its side of 0.5) split in the same shares."""
    rng = np.random.default_rng(seed)
    labels = toxic(labels).astype(int)
    test = np.zeros(len(labels), dtype=bool)
    for value in (0, 1):
        idx = np.flatnonzero(labels == value)
        test[rng.permutation(idx)[:int(round(test_share * len(idx)))]] = True
    return ~test, test


def binary_metrics(scores, labels, threshold):
    pred, labels = np.asarray(scores) >= threshold, toxic(labels)
    tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return dict(auroc=auroc(scores, labels), accuracy=float((pred == labels).mean()),
                precision=float(precision), recall=float(recall),
                f1=float(2 * precision * recall / max(precision + recall, 1e-12)),
                fpr=float((pred & ~labels).sum() / max((~labels).sum(), 1)))


def auroc(scores, labels):
    """Area under the ROC curve: P(a random toxic text outscores a random benign one), ties counting
    one half. From ranks: tied scores share the mean of their ranks."""
    scores, labels = np.asarray(scores, dtype=np.float64), toxic(labels)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, which, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based ranks; a tie shares the middle one
    return float((mean_rank[which][labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def probabilities(logits):
    """Elementwise 1 / (1 + e^-x) of an array of logits, in float64 (scorer.sigmoid is the one-number form)."""
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))
