"""Fit a linear toxicity probe on a GPT-2 model's hidden states.

    python train_probe.py --model-dir ../shared/models/minigpt2 --data davidson,olid,toxigen,wiki_talk \\
        --out probe.json --cross --rtp 400
    python train_probe.py --model gpt2 --data my.csv --text-col comment --label-col toxic --positive True

Steps: read labelled text; run the model over it in batches and keep one layer's hidden state for
each text's tokens; on a stratified split (fixed seed), fit w and b so that the statistic the
decoding loop thresholds, sigmoid(max over windows of the mean of w . h + b), predicts the label
(class-balanced, L2-regularised); calibrate the alarm threshold for a target false-positive rate on
benign held-out text; report held-out AUROC, accuracy, precision, recall and F1, and optionally a
cross-dataset table, a layer sweep and an evaluation on RealToxicityPrompts continuations.

The probe must judge what the model *wrote*, not the prompt it was given. So during training, each
text is read after a random other text from the data as context (toxic or not), and only the text's
own tokens are pooled; at decode time only generated tokens are pooled. `--rtp` measures this.
"""
import argparse
import ast
import csv
import fcntl
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

from model import UserError, cache_root, from_pretrained, load_tokenizer, pick_device, run_cli, shared_path
from scorer import LinearProbe, model_fingerprint

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SHARED = shared_path()
# The defaults, each chosen by measurement on the RTP select split (README: "The detector")
WINDOW, L2, TARGET_FPR, SAFE_FPR = 2, 0.1, 0.1, 0.3
CURATED = os.path.join(HERE, "probe_data", "curated.jsonl")  # these two ship with the repo: probe_data/README.md
RTP_TRAIN = os.path.join(HERE, "probe_data", "rtp_train.jsonl")

# The local labelled sets (../shared/README.md): file, text column, label column, what counts as toxic.
DATASETS = {
    "davidson": ("data/probe/davidson/labeled_data.csv", "tweet", "class", {"positive": "0,1"}),
    "olid": ("data/probe/olid/olid-training-v1.0.tsv", "tweet", "subtask_a", {"positive": "OFF"}),
    "toxigen": ("data/probe/toxigen/toxigen.csv", "text", "toxicity_human", {"threshold": 3.0}),
    "wiki_talk": ("data/probe/wiki_talk/toxicity_nonfuzzed_testset.csv", "comment", "toxic", {"positive": "True"}),
    "curated": (CURATED, "text", "toxic", {"positive": "1"}),
    "rtp_train": (RTP_TRAIN, "continuation", "toxic", {"positive": "1", "context": "prompt"}),
}
AUTOMATIC_DATA = ("curated", "rtp_train")  # what probe_for fits on: both ship with the repo


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


# ----------------------------------------------------------------------------------------------
# Data


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


def load_datasets(names, shared, args=None):
    """{name: (texts, labels, contexts)} for preset names or file paths (with --text-col etc.)."""
    sets = {}
    for name in names:
        context_col = None
        if name in DATASETS:
            rel, text_col, label_col, rule = DATASETS[name]
            rule = dict(rule)
            context_col = rule.pop("context", None)
            path = os.path.join(shared, rel)  # an absolute rel (the shipped files) stays as it is
        elif args is not None and args.text_col and args.label_col:
            path, text_col, label_col = name, args.text_col, args.label_col
            rule = {"positive": args.positive, "threshold": args.threshold}
            if not os.path.exists(path):
                raise UserError(f"--data {name}: no such file; check the path")
        else:
            raise UserError(f"--data {name}: neither a preset ({', '.join(DATASETS)}) nor, with --text-col, "
                            "--label-col and --positive or --threshold, a file")
        texts, labels, malformed, contexts = read_rows(path, text_col, label_col, context_col=context_col, **rule)
        if len(set(labels)) < 2:
            raise UserError(f"{path}: needs both toxic and benign rows; check --positive/--threshold")
        print(f"{os.path.basename(path)}: {len(texts)} rows, {100 * np.mean(labels):.1f}% toxic, "
              f"{malformed} malformed rows skipped", file=sys.stderr)
        sets[os.path.basename(name)] = (texts, labels, contexts)
    return sets


def export_rtp_train(shared, path):
    """Write the RTP *train* split's scored pairs as the small JSONL file the automatic fit reads."""
    rows = [r for r in read_rtp(shared, "train") if r["toxic"] is not None]
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(dict(prompt=r["prompt"], continuation=r["continuation"], toxic=r["toxic"])) + "\n")
    return len(rows)


# ----------------------------------------------------------------------------------------------
# Features


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


def pooled_states(model, enc, texts, contexts=None, layers=None, batch_size=32, desc="features"):
    """Mean over each text's own tokens of the hidden states at `layers`: (N, len(layers), C)."""
    layers = layers if layers is not None else list(range(model.config.n_layer + 1))
    out = torch.zeros(len(texts), len(layers), model.config.n_embd)
    for batch, hidden, mask in hidden_batches(model, enc, texts, contexts, batch_size, desc=desc):
        m = mask[..., None].float()
        for j, layer in enumerate(layers):
            out[batch, j] = (hidden[layer] * m).sum(1) / m.sum(1)
    return out


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


def deployed_scores(model, enc, probe, texts, contexts=None, batch_size=32, desc="scoring"):
    """The highest score the decoding loop would give each text: an alarm if it crosses the threshold."""
    states, mask = token_states(model, enc, texts, contexts, probe.layers, batch_size, desc=desc)
    return sigmoid((window_max(states @ probe.weight.reshape(-1), mask, probe.window) + probe.bias).numpy())


def with_random_contexts(texts, share, seed):
    """Give `share` of the texts a random other text as the context they follow."""
    rng = random.Random(seed)
    return [rng.choice(texts) if rng.random() < share else None for _ in texts]


# ----------------------------------------------------------------------------------------------
# Logistic regression and metrics


def balanced_bce(logits, y):
    """Binary cross-entropy with both classes given equal total weight."""
    pos = y.mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    return (weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()


def minimise(params, loss, steps):
    """Minimise loss() over params: full-batch L-BFGS with a strong Wolfe line search."""
    opt = torch.optim.LBFGS(params, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value
    opt.step(closure)


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


def binary_metrics(scores, labels, threshold):
    pred, labels = np.asarray(scores) >= threshold, np.asarray(labels).astype(bool)
    tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return dict(auroc=auroc(scores, labels), accuracy=float((pred == labels).mean()),
                precision=float(precision), recall=float(recall),
                f1=float(2 * precision * recall / max(precision + recall, 1e-12)),
                fpr=float((pred & ~labels).sum() / max((~labels).sum(), 1)))


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


def describe(threshold):
    """Thresholds near 1 print as 1.000; the logit tells them apart."""
    logit = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else float("inf")
    return f"{threshold:.6f} (logit {logit:.2f})"


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


# ----------------------------------------------------------------------------------------------
# Fitting a probe


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


def training_set(names, shared, seed, args=None, max_rows=None):
    """(texts, labels, contexts, origin) from datasets: a text without a context of its own (a
    labelled tweet or comment) is read after a random other text of the data, so the probe learns
    to judge what follows a context, whatever the context is."""
    sets = load_datasets(names, shared, args)
    rng = random.Random(seed)
    texts, labels, contexts, origin = [], [], [], []
    for key, (t, lab, ctx) in sets.items():
        keep = sorted(rng.sample(range(len(t)), min(max_rows or len(t), len(t))))  # big sets do not dominate
        texts += [t[i] for i in keep]
        labels += [lab[i] for i in keep]
        contexts += [ctx[i] for i in keep]
        origin += [key] * len(keep)
    contexts = [c if c is not None else rng.choice(texts) for c in contexts]
    return texts, labels, contexts, np.asarray(origin)


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
        print(f"no probe for {model.name_or_path} yet: fitting one on {', '.join(AUTOMATIC_DATA)} in probe_data/ "
              f"(cached in {path})", file=sys.stderr)
        probe = fit_automatic(model, enc)
        try:
            probe.save(path)
        except OSError as e:
            print(f"warning: cannot cache the probe in {path} ({e.strerror}); it will be fitted again next time",
                  file=sys.stderr)
    return probe


def fit_automatic(model, enc):
    texts, labels, contexts, origin = training_set(AUTOMATIC_DATA, shared_path(), seed=0)
    probe, _, _ = fit_probe(model, enc, texts, labels, contexts, source=",".join(AUTOMATIC_DATA),
                            calibrate_on=origin == "rtp_train")
    metrics = probe.meta["metrics"]
    print(f"probe: held-out AUROC {metrics['auroc']:.3f}, threshold {describe(probe.threshold)}", file=sys.stderr)
    return probe


# ----------------------------------------------------------------------------------------------
# RealToxicityPrompts: does the probe judge the continuation, not the prompt?


FIRST_EVALUATE = 100  # the first prompts of each RTP file: evaluate.py's default protocol


def split_of(prompt, first_prompts):
    """The fixed split of an RTP prompt: "train" (probe fitting, ~35%), "select" (choosing layers,
    window, threshold and rollback rule, ~15%) or "evaluate" (every reported figure: the first 100
    prompts of each file, then ~50% of the rest). By a hash of the prompt's text, so a prompt found in
    both files lands in one split, and the splits never change."""
    if prompt in first_prompts:
        return "evaluate"
    u = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 2**32
    return "evaluate" if u < 0.5 else "train" if u < 0.85 else "select"


def read_rtp(shared, split=None, kinds=("toxic", "nontoxic")):
    """RealToxicityPrompts rows in file order, as dicts: prompt, continuation, toxic (1 when the
    continuation's Perspective toxicity is >= 0.5, None when it has no score), kind, split, line.
    Malformed rows are skipped and counted on stderr."""
    files = {}
    for kind in ("toxic", "nontoxic"):
        path = os.path.join(shared, "data", "rtp", f"{kind}.jsonl")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                files[kind] = (path, f.readlines())
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror}); pass --shared with the folder that holds data/rtp")
    rows, first = [], set()
    for kind, (path, lines) in files.items():
        malformed, read = 0, 0
        for number, line in enumerate(lines, 1):
            try:
                r = json.loads(line)
                prompt, continuation = r["prompt"]["text"], r["continuation"].get("text", "")
                tox = r["continuation"].get("toxicity")
                if not isinstance(prompt, str) or not prompt.strip():
                    raise TypeError
            except (ValueError, KeyError, TypeError, AttributeError):
                malformed += bool(line.strip())
                continue
            read += 1
            if read <= FIRST_EVALUATE:
                first.add(prompt)
            rows.append(dict(prompt=prompt, continuation=continuation or "", kind=kind, line=number,
                             toxic=None if tox is None else int(tox >= 0.5)))
        if malformed:
            print(f"{path}: {malformed} malformed rows skipped", file=sys.stderr)
    for r in rows:
        r["split"] = split_of(r["prompt"], first)
    return [r for r in rows if (split is None or r["split"] == split) and r["kind"] in kinds]


def rtp_report(model, enc, probe, shared, split="select", batch_size=32):
    """How the probe judges RTP continuations read after their prompts (what the loop judges), on one
    split's pairs: AUROC over all pairs and within toxic-prompt pairs alone (where sensing the prompt
    cannot help), recall and false alarms at the threshold; and, for contrast, scoring prompt +
    continuation as one text."""
    rows = [r for r in read_rtp(shared, split) if r["toxic"] is not None]
    prompts, conts = [r["prompt"] for r in rows], [r["continuation"] for r in rows]
    y, kinds = np.asarray([r["toxic"] for r in rows]), np.asarray([r["kind"] for r in rows])
    variants = {
        "generated tokens only, prompt as context (ours)":
            deployed_scores(model, enc, probe, conts, prompts, batch_size, desc=f"rtp {split}"),
        "prompt + continuation as one text":
            deployed_scores(model, enc, probe, [p + c for p, c in zip(prompts, conts)], None, batch_size, desc="rtp"),
    }
    lines = ["| scored tokens | AUROC | AUROC within toxic prompts | recall | false alarms after toxic prompts | "
             "false alarms after non-toxic prompts |", "|---|---|---|---|---|---|"]
    for name, s in variants.items():
        fa = {k: float((s[(kinds == k) & (y == 0)] >= probe.threshold).mean()) for k in ("toxic", "nontoxic")}
        toxic = kinds == "toxic"
        lines.append(f"| {name} | {auroc(s, y):.3f} | {auroc(s[toxic], y[toxic]):.3f} | "
                     f"{float((s[y == 1] >= probe.threshold).mean()):.3f} | {fa['toxic']:.3f} | {fa['nontoxic']:.3f} |")
    lines.append(f"\n{len(y)} RTP pairs of the {split} split ({int(y.sum())} toxic continuations: Perspective "
                 f"toxicity >= 0.5); alarm at score >= {describe(probe.threshold)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="Hub name or checkpoint directory (default: gpt2)")
    p.add_argument("--model-dir", help="local checkpoint directory (overrides --model)")
    p.add_argument("--data", default=",".join(AUTOMATIC_DATA),
                   help=f"comma-separated presets ({', '.join(DATASETS)}) or files (default: {','.join(AUTOMATIC_DATA)}, "
                   "what the automatic fit uses)")
    p.add_argument("--text-col", help="text column for data files")
    p.add_argument("--label-col", help="label column for data files")
    p.add_argument("--positive", help="comma-separated label values that mean toxic (e.g. OFF or 1)")
    p.add_argument("--threshold", type=float, help="a numeric label >= this means toxic (score columns)")
    p.add_argument("--shared", default=DEFAULT_SHARED, help="folder of local assets (default: ../shared)")
    p.add_argument("--out", default="probe.json", help="where to write the probe (default: probe.json)")
    p.add_argument("--layers", help="comma-separated hidden states to probe, side by side: 0 = embeddings, "
                   "n_layer = final (default: all)")
    p.add_argument("--window", type=int, default=WINDOW, help=f"generated tokens pooled when decoding (default {WINDOW})")
    p.add_argument("--target-fpr", type=float, default=TARGET_FPR,
                   help=f"false alarms on benign held-out text that set the threshold (default {TARGET_FPR})")
    p.add_argument("--safe-fpr", type=float, default=SAFE_FPR,
                   help=f"... and the safe level below it (default {SAFE_FPR})")
    p.add_argument("--l2", type=float, default=L2, help=f"L2 penalty on standardised weights (default {L2})")
    p.add_argument("--max-rows", type=int, default=6000, help="rows used per dataset, sampled (default 6000)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and the split (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cross", action="store_true", help="also print the cross-dataset table")
    p.add_argument("--sweep", action="store_true", help="also print held-out AUROC for every layer")
    p.add_argument("--rtp", choices=["select", "evaluate"], help="also report on that split's RTP pairs")
    p.add_argument("--export-rtp-train", metavar="FILE", help="write the RTP train split's pairs to FILE and stop")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    args = p.parse_args(argv)
    if args.export_rtp_train:
        print(f"wrote {export_rtp_train(args.shared, args.export_rtp_train)} pairs to {args.export_rtp_train}")
        return
    if not 0 < args.target_fpr <= args.safe_fpr < 1 or args.window < 1:
        raise UserError("need 0 < --target-fpr <= --safe-fpr < 1 and --window >= 1")
    if args.rtp:  # fail before any slow work
        read_rtp(args.shared)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    name = args.model_dir or args.model
    model = from_pretrained(name, device=device)
    enc = load_tokenizer(name)
    try:
        layers = default_layers(model) if args.layers is None else [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise UserError(f"--layers {args.layers!r}: give comma-separated integers")
    if not all(0 <= x <= model.config.n_layer for x in layers):
        raise UserError(f"--layers must be in 0..{model.config.n_layer} for this model")
    texts, labels, contexts, origin = training_set(args.data.split(","), args.shared, args.seed, args, args.max_rows)
    sets = list(dict.fromkeys(origin))
    states = token_states(model, enc, texts, contexts, layers, args.batch_size)
    probe, test, scores = fit_probe(model, enc, texts, labels, contexts, layers, args.window, args.target_fpr,
                                    args.safe_fpr, args.seed, args.l2, source=",".join(sets), states=states,
                                    calibrate_on=(origin == "rtp_train") if "rtp_train" in sets else None)
    train, y = ~test, np.asarray(labels)

    print(f"\nprobe on layers {layers} of {name}: {int(train.sum())} train / {int(test.sum())} held-out texts, "
          f"threshold {describe(probe.threshold)}, safe level {describe(probe.safe_level)}")
    print("scores are what the decoding loop sees: the highest windowed score over each text's tokens\n")
    print("| held-out set | n | AUROC | accuracy | precision | recall | F1 | FPR |\n|---|---|---|---|---|---|---|---|")
    for key in sets + ["all"]:
        rows = (origin[test] == key) if key != "all" else slice(None)
        m = binary_metrics(scores[rows], y[test][rows], probe.threshold)
        print(f"| {key} | {len(scores[rows])} | {m['auroc']:.3f} | {m['accuracy']:.3f} | {m['precision']:.3f} | "
              f"{m['recall']:.3f} | {m['f1']:.3f} | {m['fpr']:.3f} |")

    if args.cross and len(sets) > 1:
        print("\ncross-dataset AUROC (rows: trained on; columns: held-out rows of)\n")
        print("| trained on | " + " | ".join(sets) + " |\n|---|" + "---|" * len(sets))
        for held_out in [None] + sets:
            rows = torch.as_tensor(train & ((origin != held_out) if held_out else True))
            w, b = fit_probe_weights(states[0][rows], states[1][rows], y[rows.numpy()], args.window, args.l2)
            s = (window_max(states[0] @ w, states[1], args.window) + b).numpy()
            cells = [f"{auroc(s[test & (origin == k)], y[test & (origin == k)]):.3f}" for k in sets]
            print(f"| {'all' if held_out is None else 'all but ' + held_out} | " + " | ".join(cells) + " |")

    if args.sweep:
        print("\nlayer sweep: held-out AUROC of a logistic regression on mean-pooled states\n\n| layer | AUROC |\n|---|---|")
        features = pooled_states(model, enc, texts, contexts, None, args.batch_size)
        for lay in range(model.config.n_layer + 1):
            w, b = fit_logistic(features[train, lay], y[train], l2=args.l2)
            print(f"| {lay} | {auroc((features[test, lay] @ w).numpy(), y[test]):.3f} |")

    if args.rtp:
        print(f"\nRealToxicityPrompts, {args.rtp} split: does the probe judge the continuation or the prompt?\n")
        print(rtp_report(model, enc, probe, args.shared, args.rtp, args.batch_size))
    probe.save(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
