"""The detectors' files: a probe's file (read, every field checked, and written) and the word lists,
and the detectors the command lines build from them by name. The detectors themselves, what the loop
calls, are scorer.py's; this is the shell around them (files, fingerprints, one-line errors).
"""
import codecs
import csv
import io
import json
import os

import torch

from checkpoints import fingerprint
from checks import UserError, check_probability, finite_number
from cli import parse_json, read_bytes, read_json, write_output
from scorer import KeywordDetector, LinearProbe, ProbeAndKeywords

HERE = os.path.dirname(os.path.abspath(__file__))


def probe_text(probe):
    """A probe file's text: its levels, layers, window, bias and weights, and what the fit recorded."""
    return json.dumps(dict(probe.meta, layers=probe.layers, window=probe.window, threshold=probe.threshold,
                           safe_level=probe.safe_level, bias=probe.bias,
                           weight=[[round(x, 7) for x in row] for row in probe.weight.tolist()]))


def save_probe(probe, path):
    write_output(path, probe_text(probe), "probe")


def load_probe(path, model=None):
    """Read a probe, checking every field in the precision it runs in (float32 weights); with
    `model`, refuse one fitted on another model."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such probe file; check the path, or leave out --probe to fit one")
    try:
        r = read_json(path, "probe")
    except UserError as e:
        raise UserError(f"{path}: not a readable probe ({str(e).removeprefix(path + ': ')}); fit a new one with "
                        "train_probe.py --out FILE")
    if not isinstance(r, dict):
        raise UserError(f"{path}: a probe file holds a JSON object, not {type(r).__name__}")
    layers = r.pop("layers", r.pop("layer", None))
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    window, weight, bias = r.pop("window", None), r.pop("weight", None), r.pop("bias", None)
    if not (isinstance(layers, list) and layers and all(type(x) is int and x >= 0 for x in layers)
            and len(set(layers)) == len(layers)):
        raise UserError(f"{path}: layers must be a list of distinct hidden-state numbers >= 0, not {layers!r}")
    if not (type(window) is int and 1 <= window <= 1 << 20):
        raise UserError(f"{path}: window must be an integer >= 1, not {window!r}")
    if not finite_number(bias):
        raise UserError(f"{path}: bias must be a finite number, not {bias!r}")
    threshold = check_probability(r.pop("threshold", None), "threshold", path)
    safe_level = r.pop("safe_level", None)
    safe_level = threshold if safe_level is None else check_probability(safe_level, "safe_level", path)
    if safe_level > threshold:
        raise UserError(f"{path}: safe_level {safe_level} is above the threshold {threshold}")
    rows = weight if isinstance(weight, list) and weight and all(isinstance(x, list) for x in weight) else [weight]
    try:
        w = torch.tensor(rows, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise UserError(f"{path}: weight must be a list of numbers per layer")
    # checked as float32, the precision the probe runs in: 1e39 is finite in float64, not in float32
    if w.dim() != 2 or w.shape[0] != len(layers) or not torch.isfinite(w.float()).all() or w.shape[1] < 1:
        raise UserError(f"{path}: weight must hold {len(layers)} row(s) of numbers finite in float32, one per "
                        f"layer, not shape {tuple(w.shape)}")
    probe = LinearProbe(w.float(), bias, layers, window, threshold, safe_level, meta=r)
    if model is not None:
        c, name = model.config, getattr(model, "name_or_path", "this model")
        if w.shape[1] != c.n_embd or max(layers) > c.n_layer:
            raise UserError(f"{path} reads hidden states of width {w.shape[1]} at layers {layers}, but "
                            f"{name} has width {c.n_embd} and layers 0..{c.n_layer}: it was fitted "
                            "on another model; fit one with train_probe.py, or leave out --probe")
        if r.get("fingerprint") != fingerprint(model):
            raise UserError(f"{path} was fitted on {r.get('model')} (fingerprint {r.get('fingerprint')}), but "
                            f"{name} has fingerprint {fingerprint(model)}: its weights differ; "
                            "fit one with train_probe.py, or leave out --probe")
    return probe


DETECTORS = ("probe+keywords", "probe", "keywords")
# The default word lists: obscene and offensive words (CC BY 4.0), and insults aimed at a person, which
# that list leaves out and the probe underweights (written for this project, CC0; probe_data/README.md)
WORDLISTS = (os.path.join(HERE, "probe_data", "ldnoobw-en.txt"), os.path.join(HERE, "probe_data", "insults-en.txt"))
DEFAULT_DETECTOR = "probe+keywords"


def make_detector(name, probe, wordlists, enc):
    """A detector by name: "probe", "keywords" (the terms of one or more word list files) or
    "probe+keywords" (either fires)."""
    keywords = None
    if "keywords" in name:
        paths = [wordlists] if isinstance(wordlists, str) else wordlists
        keywords = KeywordDetector(sorted({term for path in paths for term in load_wordlist(path)}), enc)
    return {"probe": probe, "keywords": keywords}.get(name) or ProbeAndKeywords(probe, keywords)


def load_wordlist(path):
    """Terms from .txt (one per line; tab-separated lines give their 2nd field), .csv (`text` column
    or the first), or .json (a list of strings, or an object with a `payloads` list). UTF-8 (with or
    without a byte-order mark), or UTF-16 or UTF-32 with one; anything else is refused, never half-read:
    a list read in the wrong encoding holds terms no text matches (a detector that never fires)."""
    raw = read_bytes(path, "word list")
    boms = {codecs.BOM_UTF32_LE: "utf-32", codecs.BOM_UTF32_BE: "utf-32", codecs.BOM_UTF16_LE: "utf-16",
            codecs.BOM_UTF16_BE: "utf-16"}  # UTF-32-LE's mark begins with UTF-16-LE's: it is looked for first
    encoding = next((name for bom, name in boms.items() if raw.startswith(bom)), "utf-8-sig")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: the word list is not UTF-8, UTF-16 or UTF-32 text (byte {e.start}); save it as UTF-8")
    odd = next((c for c in text if c in "\ufffd" or (ord(c) < 32 and c not in "\t\n\r\f\v")), None)
    if odd is not None:
        raise UserError(f"{path}: the word list holds {odd.encode('unicode_escape').decode()}: it is not clean text "
                        "(UTF-16 without a byte-order mark reads as UTF-8 with NULs); save it as UTF-8")
    kind = os.path.splitext(path)[1].lower()
    data = parse_json(text, path, "word list") if kind == ".json" else None  # its own one-line error
    try:
        if kind == ".json":
            terms = data.get("payloads") if isinstance(data, dict) else data
            if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
                raise ValueError("expected a list of strings, or an object with a \"payloads\" list of strings")
        elif kind == ".csv":
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
