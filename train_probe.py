"""Fit a linear toxicity probe on a GPT-2 model's hidden states, and report how well it judges.

    python train_probe.py --model-dir ../shared/models/minigpt2 --rtp evaluate --out probe.json
    python train_probe.py --model-dir ../shared/models/minigpt2 --data davidson,olid,toxigen,wiki_talk --cross
    python train_probe.py --model gpt2 --data my.csv --text-col comment --label-col toxic --positive True

Steps: read labelled text; run the model over it in batches and keep the hidden states of each
text's tokens (at most 7 evenly spaced ones side by side, all of a small model's, unless --layers),
a chunk of texts at a time; on a stratified split (fixed seed), fit w and b so that the statistic
the decoding loop thresholds, sigmoid(max over windows of the mean of w . h + b), predicts the label
(class-balanced, L2-regularised); calibrate the alarm threshold and the safe level for target
false-alarm rates on benign held-out text; report held-out AUROC, accuracy, precision, recall and
F1, and optionally a cross-dataset table, a layer sweep and an evaluation on RealToxicityPrompts
continuations. The fitting itself is fitting.py's (the same code fits the automatic probe); this
script adds the data presets, the reports and the options.

The probe must judge what the model *wrote*, not the prompt it was given. So during training, each
text is read after a context: an RTP continuation after its own prompt, any other text after a
random other text of the data (toxic or not), and only the text's own tokens are pooled; at decode
time only generated tokens are pooled. `--rtp` measures this.
"""
import argparse
import hashlib
import json
import math
import os
import sys

# cli first: it sets OpenMP's spin count before torch loads (see cli.py)
from cli import (THREADS_HELP, Progress, UserError, cache_root, output_path, read_bytes, run_cli, set_threads, shared_path,
                 write_output)

import numpy as np
import torch

from checkpoints import load
from backtrack import Settings
from batched import generate_batch
from detector_files import save_probe
from fitting import (CALIBRATION, HUMAN_LABELLED, L2, MAX_TOKENS, SAFE_FPR, SHIPPED_DATA, TARGET_FPR, WINDOW, Features,
                     auroc, binary_metrics, default_layers, fit_automatic, fit_logistic, fit_probe, fit_probe_weights,
                     mean_pooled, probabilities, read_dataset, training_set, window_max)

# The local labelled sets (../shared/README.md): file, text column, label column, what counts as toxic.
DATASETS = {
    "davidson": ("data/probe/davidson/labeled_data.csv", "tweet", "class", {"positive": "0,1"}),
    "olid": ("data/probe/olid/olid-training-v1.0.tsv", "tweet", "subtask_a", {"positive": "OFF"}),
    "toxigen": ("data/probe/toxigen/toxigen.csv", "text", "toxicity_human", {"threshold": 3.0}),
    "wiki_talk": ("data/probe/wiki_talk/toxicity_nonfuzzed_testset.csv", "comment", "toxic", {"positive": "True"}),
    **SHIPPED_DATA,  # curated and rtp_train: what the automatic fit reads
}


def check_flags(args):
    """Every number of the command line in its range, before any data or model is read."""
    whole = [("--max-rows", args.max_rows, 1, None), ("--batch-size", args.batch_size, 1, 4096),
             ("--seed", args.seed, 0, 2**32 - 1), ("--window", args.window, 1, MAX_TOKENS)]
    for flag, value, low, high in whole:
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            why = f" (texts are read up to {MAX_TOKENS} tokens)" if flag == "--window" else ""
            raise UserError(f"{flag} must be {span}, not {value}{why}")
    if not (math.isfinite(args.l2) and args.l2 >= 0):
        raise UserError(f"--l2 must be a finite number >= 0, not {args.l2}")
    if not (0 < args.target_fpr <= args.safe_fpr < 1):
        raise UserError("need 0 < --target-fpr <= --safe-fpr < 1")


def data_files(args):
    """The files --data reads (its presets' too): inputs no output may overwrite."""
    names = [name for name in (args.data or "").split(",") if name]
    return [os.path.join(args.shared, DATASETS[name][0]) if name in DATASETS else name for name in names]


def load_datasets(names, shared, args=None):
    """{name: (texts, labels, contexts)} for preset names or file paths (with --text-col etc.)."""
    sets = {}
    for name in names:
        if name in DATASETS:
            rel, text_col, label_col, rule = DATASETS[name]
            path = os.path.join(shared, rel)  # an absolute rel (the shipped files) stays as it is
        elif args is not None and args.text_col and args.label_col:
            path, text_col, label_col = name, args.text_col, args.label_col
            rule = {"positive": args.positive, "threshold": args.threshold}
            if not os.path.exists(path):
                raise UserError(f"--data {name}: no such file; check the path")
        else:
            raise UserError(f"--data {name}: neither a preset ({', '.join(DATASETS)}) nor, with --text-col, "
                            "--label-col and --positive or --threshold, a file")
        sets[os.path.basename(name)] = read_dataset(path, text_col, label_col, rule)
    return sets


def export_rtp_train(shared, path):
    """Write the RTP *train* split's scored pairs as the small JSONL file the automatic fit reads."""
    rows = [r for r in read_rtp(shared, "train") if r["toxic"] is not None]
    write_output(path, "".join(json.dumps(dict(prompt=r["prompt"], continuation=r["continuation"], toxic=r["toxic"]))
                               + "\n" for r in rows), "--export-rtp-train")
    return len(rows)


def export_generated(model, enc, shared, path, samples=8, batch_size=32):
    """Write the model's own continuations of every train-split RTP prompt, each with a teacher's soft
    label, as the JSONL file the automatic fit reads (probe_data/generated.jsonl): what the loop sees.

    Continuations: plain sampling as evaluate.py samples (20 new tokens, top-p 0.9), `samples` per
    prompt, seeds 7,000,000 + 1000 * prompt + sample. Teacher: the probe fitted on the human-labelled
    shipped data alone (curated tweets and comments, the RTP train pairs' Perspective labels), reading
    each continuation on its own, after a newline: it judges the text, not the prompt before it. No
    judge labels anything."""
    teacher = fit_automatic(model, enc, HUMAN_LABELLED)
    prompts = list(dict.fromkeys(r["prompt"] for r in read_rtp(shared, "train")))
    jobs = [(i, j) for i in range(len(prompts)) for j in range(samples)]
    bar = Progress(len(jobs), "continuations")
    results = generate_batch(model, enc, [prompts[i] for i, _ in jobs], None,
                             Settings(max_new_tokens=20, top_p=0.9, buffer=0),
                             seeds=[7_000_000 + 1000 * i + j for i, j in jobs], batch_size=batch_size,
                             on_result=lambda *_: bar.advance())
    kept = [(prompts[i], r.text) for (i, _), r in zip(jobs, results) if r.text.strip()]
    scores = deployed_scores(model, enc, teacher, [c for _, c in kept], ["\n"] * len(kept), batch_size, "teacher")
    write_output(path, "".join(json.dumps(dict(prompt=p, continuation=c, teacher=round(float(s), 4))) + "\n"
                               for (p, c), s in zip(kept, scores)), "--export-generated")
    return len(kept)


def pooled_states(model, enc, texts, contexts=None, batch_size=32, desc="features"):
    """Mean over each text's own tokens of every hidden state: (N, n_layer + 1, C)."""
    every = list(range(model.config.n_layer + 1))
    features = Features(model, enc, texts, contexts, every, batch_size=batch_size, desc=desc)
    return features.map(mean_pooled).reshape(len(texts), len(every), -1)


def deployed_scores(model, enc, probe, texts, contexts=None, batch_size=32, desc="scoring"):
    """The highest score the decoding loop would give each text: an alarm if it crosses the threshold."""
    features = Features(model, enc, texts, contexts, probe.layers, batch_size=batch_size, desc=desc)
    weight = probe.weight.reshape(-1)
    return probabilities((features.map(lambda s, m: window_max(s @ weight, m, probe.window)) + probe.bias).numpy())


def with_logit(threshold):
    """Thresholds near 1 print as 1.000; the logit tells them apart."""
    logit = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else float("inf")
    return f"{threshold:.6f} (logit {logit:.2f})"


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
        if not os.path.isfile(path):
            raise UserError(f"cannot read {path} (no such file); pass --shared with the folder that holds data/rtp")
        files[kind] = (path, read_bytes(path, "data file").decode("utf-8", errors="replace").split("\n"))
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
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
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
                 f"toxicity >= 0.5); alarm at score >= {with_logit(probe.threshold)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="Hub name or checkpoint directory (default: gpt2)")
    p.add_argument("--model-dir", help="local checkpoint directory (overrides --model)")
    p.add_argument("--data", default=",".join(SHIPPED_DATA),
                   help=f"comma-separated presets ({', '.join(DATASETS)}) or files (default: {','.join(SHIPPED_DATA)}, "
                   "what the automatic fit uses)")
    p.add_argument("--text-col", help="text column for data files")
    p.add_argument("--label-col", help="label column for data files")
    p.add_argument("--positive", help="comma-separated label values that mean toxic (e.g. OFF or 1)")
    p.add_argument("--threshold", type=float, help="a numeric label >= this means toxic (score columns)")
    p.add_argument("--shared", default=shared_path(), help="folder of local assets (default: ../shared)")
    p.add_argument("--out", default="probe.json", help="where to write the probe (default: probe.json)")
    p.add_argument("--layers", help="comma-separated hidden states to probe, side by side: 0 = embeddings, "
                   "n_layer = final (default: at most 7, evenly spaced; all of a model of up to 6 layers)")
    p.add_argument("--window", type=int, default=WINDOW, help=f"generated tokens pooled when decoding (default {WINDOW})")
    p.add_argument("--target-fpr", type=float, default=TARGET_FPR,
                   help=f"false alarms on benign held-out text that set the threshold (default {TARGET_FPR})")
    p.add_argument("--safe-fpr", type=float, default=SAFE_FPR,
                   help=f"... and the safe level below it (default {SAFE_FPR})")
    p.add_argument("--l2", type=float, default=L2, help=f"L2 penalty on standardised weights (default {L2})")
    p.add_argument("--max-rows", type=int, default=6000, help="rows used per dataset, sampled (default 6000)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and the split (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--cross", action="store_true", help="also print the cross-dataset table")
    p.add_argument("--sweep", action="store_true", help="also print held-out AUROC for every layer")
    p.add_argument("--rtp", choices=["select", "evaluate"], help="also report on that split's RTP pairs")
    p.add_argument("--export-rtp-train", metavar="FILE", help="write the RTP train split's pairs to FILE and stop")
    p.add_argument("--export-generated", metavar="FILE", help="write the model's own continuations of the train "
                   "split's prompts, labelled by the teacher probe, to FILE and stop")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    args = p.parse_args(argv)
    check_flags(args)
    rtp_files = [os.path.join(args.shared, "data", "rtp", f"{kind}.jsonl") for kind in ("toxic", "nontoxic")]
    # what this run reads, never an output: RTP, the --data files, the teacher's data, the model, the cache
    inputs = rtp_files + [SHIPPED_DATA[name][0] for name in HUMAN_LABELLED] + [args.model_dir, cache_root()]
    if args.export_rtp_train:
        output_path(args.export_rtp_train, "--export-rtp-train", inputs=inputs)
        print(f"wrote {export_rtp_train(args.shared, args.export_rtp_train)} pairs to {args.export_rtp_train}")
        return
    if args.export_generated:
        output_path(args.export_generated, "--export-generated", inputs=inputs)
        set_threads(args.threads)
        model, enc = load(args.model_dir or args.model, args.device)
        rows = export_generated(model, enc, args.shared, args.export_generated, batch_size=args.batch_size)
        print(f"wrote {rows} continuations to {args.export_generated}")
        return
    output_path(args.out, "--out", inputs=inputs + data_files(args))  # fail before any slow work
    if args.rtp:
        read_rtp(args.shared)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    name = args.model_dir or args.model
    # loaded as backtrack.py and evaluate.py load it: the fit follows the hidden states to the last bit
    model, enc = load(name, args.device)
    try:
        layers = default_layers(model) if args.layers is None else [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise UserError(f"--layers {args.layers!r}: give comma-separated integers")
    if len(set(layers)) != len(layers):
        raise UserError(f"--layers {args.layers}: each hidden state at most once (a probe holds one row per layer)")
    if not all(0 <= x <= model.config.n_layer for x in layers):
        raise UserError(f"--layers must be in 0..{model.config.n_layer} for this model")
    data = load_datasets(args.data.split(","), args.shared, args)
    texts, labels, contexts, origin = training_set(data, args.seed, args.max_rows)
    sets = list(dict.fromkeys(origin))
    features = Features(model, enc, texts, contexts, layers, batch_size=args.batch_size)
    probe, test, scores = fit_probe(model, enc, texts, labels, contexts, layers, args.window, args.target_fpr,
                                    args.safe_fpr, args.seed, args.l2, source=",".join(sets), features=features,
                                    calibrate_on=np.isin(origin, CALIBRATION) if set(sets) & set(CALIBRATION) else None)
    train, y = ~test, np.asarray(labels)

    print(f"\nprobe on layers {layers} of {name}: {int(train.sum())} train / {int(test.sum())} held-out texts, "
          f"threshold {with_logit(probe.threshold)}, safe level {with_logit(probe.safe_level)}")
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
            w, b = fit_probe_weights(features, y, args.window, args.l2, rows=np.flatnonzero(rows.numpy()))
            s = (features.map(lambda states, mask: window_max(states @ w, mask, args.window)) + b).numpy()
            cells = [f"{auroc(s[test & (origin == k)], y[test & (origin == k)]):.3f}" for k in sets]
            print(f"| {'all' if held_out is None else 'all but ' + held_out} | " + " | ".join(cells) + " |")

    if args.sweep:
        print("\nlayer sweep: held-out AUROC of a logistic regression on mean-pooled states\n\n| layer | AUROC |\n|---|---|")
        pooled = pooled_states(model, enc, texts, contexts, args.batch_size)
        for lay in range(model.config.n_layer + 1):
            w, b = fit_logistic(pooled[train, lay], y[train], l2=args.l2)
            print(f"| {lay} | {auroc((pooled[test, lay] @ w).numpy(), y[test]):.3f} |")

    if args.rtp:
        print(f"\nRealToxicityPrompts, {args.rtp} split: does the probe judge the continuation or the prompt?\n")
        print(rtp_report(model, enc, probe, args.shared, args.rtp, args.batch_size))
    save_probe(probe, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
