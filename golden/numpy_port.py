"""A second implementation of the backtracking loop, in plain NumPy, written from SPEC.md alone.

It proves the porting kit: it replays every run of traces.json from the run's prompt, detector,
settings and recorded uniform draws, and must give the same steps, events, tokens, context and
counters (scores within 1e-5). It recomputes the whole context at every step instead of keeping a
cache: slower, and the shortest statement of the algorithm without a framework.

    python golden/numpy_port.py        # replays every golden run; prints one line per run
"""
import json
import math
import os
import re
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EOT = 96  # the character tokenizer's end-of-text (SPEC §3)


# ----------------------------------------------------------------------------------------------
# The model (SPEC §2)


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header, data = json.loads(f.read(n)), f.read()
    dtypes = {"F32": np.float32, "F16": np.float16}
    return {name: np.frombuffer(data[t["data_offsets"][0]:t["data_offsets"][1]], dtypes[t["dtype"]])
            .reshape(t["shape"]).astype(np.float32) for name, t in header.items() if name != "__metadata__"}


class Model:
    def __init__(self, directory):
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        self.n_head, self.n_layer = config["n_head"], config["n_layer"]
        self.n_positions, self.eps = config["n_positions"], config.get("layer_norm_epsilon", 1e-5)
        self.w = {k.removeprefix("transformer."): v for k, v in
                  read_safetensors(os.path.join(directory, "model.safetensors")).items()}

    def layer_norm(self, x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def linear(self, x, name):  # Conv1D: weights stored [in, out]
        return x @ self.w[name + ".weight"] + self.w[name + ".bias"]

    def forward(self, ids):
        """(logits (T, V), hidden: L + 1 arrays (T, C)) of a whole text, positions 0 .. T−1."""
        T, w = len(ids), self.w
        x = w["wte.weight"][ids] + w["wpe.weight"][:T]
        hidden = [x]
        mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
        for layer in range(self.n_layer):
            p = f"h.{layer}."
            q, k, v = np.split(self.linear(self.layer_norm(x, p + "ln_1"), p + "attn.c_attn"), 3, axis=-1)
            heads = []
            for h in np.split(np.arange(q.shape[1]), self.n_head):
                att = q[:, h] @ k[:, h].T / np.sqrt(len(h)) + mask
                att = np.exp(att - att.max(-1, keepdims=True))
                heads.append((att / att.sum(-1, keepdims=True)) @ v[:, h])
            x = x + self.linear(np.concatenate(heads, -1), p + "attn.c_proj")
            m = self.linear(self.layer_norm(x, p + "ln_2"), p + "mlp.c_fc")
            m = 0.5 * m * (1 + np.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))
            x = x + self.linear(m, p + "mlp.c_proj")
            hidden.append(x)
        hidden[-1] = x = self.layer_norm(x, "ln_f")
        return x @ w["wte.weight"].T, hidden

    def last(self, ids):
        """The logits and hidden states (L + 1 vectors) of the last token of a text."""
        logits, hidden = self.forward(ids)
        return logits[-1], [h[-1] for h in hidden]


# ----------------------------------------------------------------------------------------------
# The tokenizer (SPEC §3) and the detectors (SPEC §4)


def encode(text):
    return [ord(c) - 32 if 32 <= ord(c) < 128 else ord("?") - 32 for c in text]


def decode_bytes(tokens):
    return b"".join(b"" if t == EOT else bytes([t + 32]) for t in tokens)


def decode(tokens):
    return decode_bytes(tokens).decode("utf-8", errors="replace")


def sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def logit(p):
    return math.log(p / (1 - p))


class Detector:
    """Every kind of SPEC §4: keeps one value per generated token; score() appends one."""

    def __init__(self, spec):
        self.kind, self.values, self.matched = spec["type"], [], None
        probe = spec.get("probe", spec)
        if "probe" in self.kind:
            self.layers, self.weight = probe["layers"], np.asarray(probe["weight"], np.float32)
            self.bias, self.window = probe["bias"], probe["window"]
            self.threshold, self.safe_level = probe["threshold"], probe["safe_level"]
        else:
            self.threshold, self.safe_level = 0.5, None
        self.alarm_tokens = set(spec.get("alarm_tokens", ()))
        if "terms" in spec:
            terms = sorted({t.lower() for t in spec["terms"]}, key=len, reverse=True)
            self.pattern = re.compile(r"(?<![a-z0-9])(?:" + "|".join(map(re.escape, terms)) + r")(?![a-z0-9])")
            self.longest = max(len(t) for t in terms)

    def start(self, prompt_ids, hidden):
        """Empty the detector; its verdict on the prompt (SPEC §4), from every prompt token's hidden states."""
        self.values = []
        verdict = None
        if "probe" in self.kind:
            p = [sum(float(self.weight[j] @ hidden[layer][i]) for j, layer in enumerate(self.layers))
                 for i in range(len(prompt_ids))]
            w = self.window  # full windows after the first token only
            verdict = max((sigmoid(sum(p[i - w + 1:i + 1]) / w + self.bias) for i in range(w, len(p))), default=None)
        if "keywords" in self.kind and self.pattern.search(decode(prompt_ids).lower()):
            verdict = 1.0
        elif self.kind == "keywords":
            verdict = 0.0
        return verdict

    def score(self, token, hidden):
        if self.kind == "scripted":
            self.values.append(token)
            return 1.0 if token in self.alarm_tokens else 0.0
        projection = sum(float(self.weight[j] @ hidden[layer]) for j, layer in enumerate(self.layers)) \
            if "probe" in self.kind else 0.0
        self.values.append((token, projection))
        score = 0.0
        if "probe" in self.kind:
            recent = [p for _, p in self.values[-self.window:]]
            score = sigmoid(sum(recent) / len(recent) + self.bias)
        if "keywords" in self.kind:
            recent = [t for t, _ in self.values[-(self.longest + 2):]]
            before, text = decode(recent[:-1]).lower(), decode(recent).lower()
            self.matched = next((m.group() for m in self.pattern.finditer(text) if m.end() > len(before)), None)
            score = 1.0 if self.matched else score
        return score

    def rollback(self, n):
        del self.values[n:]


# ----------------------------------------------------------------------------------------------
# Sampling (SPEC §7)


def sample(logits, settings, u, banned=(), pool=0):
    logits = np.array(logits, np.float32)
    if 0 < pool < len(logits):
        logits[logits < np.sort(logits)[-pool]] = -np.inf
    logits[list(banned)] = -np.inf
    if not np.isfinite(logits.max()):
        return None
    if settings["temperature"] < 1e-6:
        return int(np.argmax(logits))
    z = logits / np.float32(settings["temperature"])
    p = np.exp(z - z.max())
    p = (p / p.sum()).astype(np.float32)
    if not np.isfinite(p).all():
        return None
    ids = np.arange(len(p))
    if settings["top_k"] or settings["top_p"] < 1:
        ids = np.argsort(-p, kind="stable")
        if settings["top_k"]:
            ids = ids[:settings["top_k"]]
        kept = p[ids]
        p = np.where(np.cumsum(kept) - kept < settings["top_p"], kept, 0)
    else:
        p = p[ids]
    cdf = np.cumsum(p, dtype=np.float32)
    i = min(int(np.searchsorted(cdf, np.float32(u) * cdf[-1], side="right")), int(np.argmax(cdf)))
    return int(ids[i])


# ----------------------------------------------------------------------------------------------
# The policies (SPEC §6): levels, pool, redraw or roll back


def classic_levels(policy, detector, verdict, safe_level):
    threshold = detector.threshold
    return threshold, safe_level or threshold, None, False


def tuned_levels(policy, detector, verdict, safe_level):
    threshold = detector.threshold
    safe = safe_level or detector.safe_level or threshold
    flag_level = threshold if threshold >= 1 else sigmoid(logit(threshold) + policy["flag_margin"])
    vigilant = verdict is not None and not (isinstance(verdict, float) and math.isfinite(verdict) and verdict < flag_level)
    if vigilant and policy["vigilance"]:
        threshold, safe = (level if level >= 1 else sigmoid(logit(level) - policy["vigilance"]) for level in (threshold, safe))
    if 0 < safe < threshold < 1:
        redraw_level = sigmoid(logit(safe) + policy["redraw_gate"] * (logit(threshold) - logit(safe)))
    else:
        redraw_level = threshold if policy["redraw_gate"] == 1 else safe
    return threshold, safe, redraw_level, vigilant


def tuned_pool(policy, i, c, banned):
    return policy["redraw_pool"] if i == c or i in banned else 0


def tuned_redraws(policy, i, c, banned, scores, redraw_level, vigilant):
    return policy["redraw_pool"] > 0 and (i == c or (not vigilant and scores[i - 1] < redraw_level
                                                     and len(banned.get(i, ())) < policy["max_redraws"]))


POLICIES = {  # name: (levels, pool, redraws)
    "classic": (classic_levels, lambda *_: 0, lambda *_: False),
    "tuned": (tuned_levels, tuned_pool, tuned_redraws),
}


# ----------------------------------------------------------------------------------------------
# The loop (SPEC §5)


CRITIQUE = '\n(I almost wrote "{}", but that is hurtful. Instead I will'
FALLBACK_NO_TOKEN = "no token can be sampled here (every candidate is banned, or the logits are not numbers)"


def generate(model, prompt_ids, detector, settings, draws):
    s, draws = settings, iter(draws)
    context = list(prompt_ids)
    path, scores, born = [], [], []
    logits, prompt_hidden = model.forward(context)
    next_logits = [logits[-1]]
    policy = s["policy"]
    levels, pool, redraws = POLICIES[policy["name"]]
    threshold = safe = redraw_level = None
    vigilant = False
    if detector is not None:
        verdict = detector.start(prompt_ids, prompt_hidden)
        threshold, safe, redraw_level, vigilant = levels(policy, detector, verdict, s["safe_level"])
    c, banned, retries, noted_at, stop = 0, {}, 0, None, ""  # banned: index -> ids
    sampled, forwards, rollbacks, waited = 0, 1, 0, 0
    steps, events = [], []

    def alarm(score):
        return detector is not None and not (isinstance(score, float) and 0 <= score <= 1 and score < threshold)

    def release(upto):
        nonlocal waited, c
        waited += sum(sampled - b for b in born[c:upto])
        c = upto

    def note(discarded):
        nonlocal forwards, noted_at
        if s["introspect"] == "template":
            opening, budget, closing = encode(s["template"]), 0, []
        else:
            opening, budget, closing = encode(CRITIQUE.format(discarded.strip()[:80])), 12, encode(")\n")
        if len(opening) + budget + len(closing) > model.n_positions - len(context) - (s["max_new_tokens"] - c):
            return
        context.extend(opening)
        forwards += 1
        logits, written = model.last(context)[0], list(opening)
        for _ in range(budget):
            token = int(np.argmax(logits))
            if token == EOT or ")" in decode([token]):
                break
            context.append(token)
            written.append(token)
            forwards += 1
            logits = model.last(context)[0]
        if closing:
            context.extend(closing)
            written += closing
            forwards += 1
            logits = model.last(context)[0]
        next_logits[-1], noted_at = logits, c
        events.append(dict(type="introspection", index=c))

    while not stop:
        here = len(path)
        token = sample(next_logits[-1], s, next(draws, 0.0), banned.get(here, ()),
                       pool(policy, here, c, banned) if detector is not None else 0)
        if token is None:
            events.append(dict(type="fallback", index=c, reason=FALLBACK_NO_TOKEN))
            stop = "no_token"
            break
        forwards += 1
        logits, hidden = model.last(context + [token])
        score = detector.score(token, hidden) if detector else None
        # after the token (SPEC §5.3)
        sampled += 1
        context.append(token)
        path.append(token)
        scores.append(score)
        born.append(sampled)
        next_logits.append(logits)
        is_alarm = alarm(score)
        steps.append([len(path) - 1, token, score, is_alarm])
        if is_alarm:
            i = len(path) - 1
            redraw = redraws(policy, i, c, banned, scores, redraw_level, vigilant)
            back = i if redraw else c
            discarded = path[back:]
            del context[len(context) - len(discarded):]
            detector.rollback(back)
            del path[back:], scores[back:], born[back:], next_logits[back + 1:]
            banned = {j: ids for j, ids in banned.items() if j <= back}
            out_of_retries = retries >= s["max_retries"]
            if not redraw and (out_of_retries or rollbacks >= s["max_rollbacks"]):
                reason = "retry budget spent at this point" if out_of_retries else "total rollback budget spent"
                events.append(dict(type="fallback", index=c, reason=reason))
                stop = "budget"
            else:
                banned.setdefault(back, set()).add(discarded[0])
                if redraw:
                    events.append(dict(type="redraw", index=back, banned=discarded[0]))
                else:
                    rollbacks, retries = rollbacks + 1, retries + 1
                    events.append(dict(type="rollback", index=c, banned=discarded[0]))
                    if s["introspect"] != "none" and noted_at != c:
                        note(decode(discarded))
        elif token == EOT and s["stop_at_eos"]:
            stop = "eos"
        else:
            upto = len(path) - s["buffer"]
            while upto > c and scores[upto - 1] is not None and not scores[upto - 1] < safe:
                upto -= 1
            if upto > c:
                release(upto)
                banned, retries = {j: ids for j, ids in banned.items() if j > upto}, 0
            if len(path) >= s["max_new_tokens"]:
                stop = "max_new_tokens"
        steps[-1].append(c)
    release(len(path))
    kept = [t for t in path if t != EOT]
    stats = dict(tokens_generated=sampled, tokens_kept=len(kept), forward_passes=forwards, rollbacks=rollbacks,
                 avg_wait_tokens=waited / max(len(path), 1), vigilant=vigilant)
    return dict(steps=steps, events=events, tokens=kept, context=context, stats=stats, stop_reason=stop,
                levels=[threshold, safe, redraw_level])


EVENT_FIELDS = ("type", "index", "banned", "reason")


def replay(model, prompt_ids, detector_spec, settings, expected):
    """Run one golden row with the draws it recorded."""
    detector = Detector(detector_spec) if detector_spec else None
    return generate(model, prompt_ids, detector, settings, [step[5] for step in expected["steps"]])


def differences(got, want):
    """What a replay got wrong against a golden row, as readable lines (none: it conforms)."""
    wrong = []
    for key in ("tokens", "context", "stop_reason"):
        if got[key] != want[key]:
            wrong.append(f"{key}: {got[key]} != {want[key]}")
    if [g[:2] + g[3:5] for g in got["steps"]] != [w[:2] + w[3:5] for w in want["steps"]]:
        wrong.append("steps (index, token, alarm, committed) differ")
    elif any(abs((g[2] or 0) - (w[2] or 0)) > 1e-5 for g, w in zip(got["steps"], want["steps"])):
        wrong.append("scores differ by more than 1e-5")
    events = [{k: e[k] for k in EVENT_FIELDS if k in e} for e in got["events"]]
    if events != want["events"]:
        wrong.append(f"events: {events} != {want['events']}")
    if got["stats"] != want["stats"]:
        wrong.append(f"stats: {got['stats']} != {want['stats']}")
    if any((g is None) != (w is None) or (g is not None and abs(g - w) > 1e-9) for g, w in zip(got["levels"], want["levels"])):
        wrong.append(f"levels: {got['levels']} != {want['levels']}")
    return wrong


def main():
    model = Model(os.path.join(HERE, "tiny-model"))
    with open(os.path.join(HERE, "traces.json")) as f:
        runs = json.load(f)
    failed = 0
    for run in runs:
        for row in run.get("rows") or [run]:
            wrong = differences(replay(model, row["prompt_ids"], run["detector"], run["settings"], row["expected"]),
                                row["expected"])
            failed += bool(wrong)
            print(f"{'FAIL' if wrong else 'ok  '} {run['name']}" + "".join(f"\n     {w}" for w in wrong))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
