"""Decoding-time safety backtracking for GPT-2-style models.

    python backtrack.py --model-dir ../shared/models/minigpt2 --prompt "You are such a" --trace

The loop (generate(), and after_token() for what follows each token):
 1. Prefill the prompt, then sample one token at a time.
 2. Feed each sampled token and let the detector score it, from the hidden state of that same
    forward pass.
 3. On an alarm, roll the KV cache, the detector and the path back (moving pointers: O(1)): to the
    flagged token itself when the text before it was calm (a *redraw*: one token discarded, never
    counted as a rollback), else to the commit point (a *rollback*) ...
 4. ... spend budget: a redraw happens at the commit point itself (where draws come from the
    `redraw_pool` likeliest tokens, so the pool bounds them) or beyond it where the token before
    scored below the redraw level (`redraw_gate` of the way from the safe level up to the threshold),
    at most `max_redraws` times per index and never after a flagged prompt;
    any other alarm is a rollback. When the retries at this point or the rollbacks in total run out,
    stop with the committed text. Generation always terminates ...
 5. ... ban the token that began the discarded path at that index (bans hold there, with the pool) ...
 6. ... and, after a rollback, optionally insert an introspection note into the hidden context there.
 7. Otherwise commit (release to the reader) what is now `buffer` tokens behind the newest and ends
    where the score was below the detector's safe level. Nothing shown is ever retracted.
Before the first token the detector gives its verdict on the prompt: it flags a prompt it scores
`flag_margin` logits above the threshold (or holds a listed word), and after such a prompt every
alarm beyond the commit point rolls back (and the levels are `vigilance` logits lower, default 0).

Two coordinates, two names: a token *index* i counts generated tokens on the current path
(path.tokens[i]); a cache *slot* counts what the KV cache holds (prompt, tokens and notes), so
path.slots[i] is where token i sits in the cache.
"""
import argparse
import codecs
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields

import torch

import report
from checkpoints import encode_prompt, load, pick_device, pick_dtype
from cli import UserError, finite_number, output_path, read_prompts, run_cli, set_threads
from model import sample
from scorer import DEFAULT_DETECTOR, DETECTORS, LOWEST, default_detector, level_between, shifted

# A note a base model reads as the writer correcting course. Measured against "critique" and no
# note in evaluate.py (README).
TEMPLATE = "\n(Let me rephrase that politely.)\n"
CRITIQUE_OPENING = '\n(I almost wrote "{discarded}", but that is hurtful. Instead I will'
CRITIQUE_TOKENS = 12  # at most this many tokens of self-critique, written greedily
NOTHING_TO_SAMPLE = "no token can be sampled here (every candidate is banned, or the logits are not numbers)"


@dataclass
class Settings:
    """How to decode. The command line's defaults are these (one place)."""
    max_new_tokens: int = 40
    temperature: float = 1.0  # below model.GREEDY_BELOW (e.g. 0) means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 0.9  # nucleus sampling mass; 1 keeps every token
    buffer: int = 4  # tokens held back before release; 0 is token-level backtracking
    introspect: str = "none"  # none | template | critique
    template: str = TEMPLATE
    redraw_pool: int = 32  # draws where tokens are banned come from this many likeliest tokens; 0: no pool, no redraws
    max_redraws: int = 2  # redraws at one index beyond the commit point before an alarm there rolls back
    max_retries: int = 20  # rollbacks at one commit point; by default only the total (max_rollbacks) limits them
    max_rollbacks: int = 20  # rollbacks allowed in total
    safe_level: float | None = None  # show text only up to a score below this; None: the detector's own
    # beyond the commit point, redraw only where the score before is below the level this share of the
    # way from the safe level to the threshold (in logits)
    redraw_gate: float = 0.375
    flag_margin: float = 1.0  # the detector flags a prompt scored this many logits above its threshold (or at 1)
    vigilance: float = 0.0  # after a flagged prompt, threshold and safe level are this many logits lower
    stop_at_eos: bool = True
    seed: int = 0

    def check(self, names=None):
        """Refuse the first setting out of range with a UserError; `names` maps field names to what
        the caller calls them (the command line passes its flags)."""
        def whole(value, low):
            return type(value) is int and value >= low
        problems = [
            ("max_new_tokens", whole(self.max_new_tokens, 1), "{} must be >= 1 (an integer)"),
            ("temperature", finite_number(self.temperature) and self.temperature >= 0, "{} must be a number >= 0, and finite"),
            ("top_k", whole(self.top_k, 0), "{} must be >= 0 (an integer)"),
            ("top_p", finite_number(self.top_p) and 0 < self.top_p <= 1, "{} must be in (0, 1]"),
            ("buffer", whole(self.buffer, 0), "{} must be >= 0 (an integer)"),
            ("introspect", self.introspect in ("none", "template", "critique"), "{} must be none, template or critique"),
            ("redraw_pool", whole(self.redraw_pool, 0), "{} must be >= 0 (an integer)"),
            ("max_redraws", whole(self.max_redraws, 0), "{} must be >= 0 (an integer)"),
            ("max_retries", whole(self.max_retries, 0), "{} must be >= 0 (an integer)"),
            ("max_rollbacks", whole(self.max_rollbacks, 0), "{} must be >= 0 (an integer)"),
            ("seed", whole(self.seed, 0) and self.seed < 2**63, "{} must be in [0, 2**63) (an integer)"),
            ("safe_level", self.safe_level is None or (finite_number(self.safe_level) and LOWEST <= self.safe_level <= 1),
             f"{{}} must be in [{LOWEST:g}, 1]"),
            ("redraw_gate", finite_number(self.redraw_gate) and 0 <= self.redraw_gate <= 1, "{} must be in [0, 1]"),
            ("flag_margin", finite_number(self.flag_margin) and 0 <= self.flag_margin <= 10, "{} must be in [0, 10] (logits)"),
            ("vigilance", finite_number(self.vigilance) and 0 <= self.vigilance <= 10, "{} must be in [0, 10] (logits)"),
        ]
        for name, good, message in problems:
            if not good:
                raise UserError(message.format((names or {}).get(name, name)))
        return self


@dataclass
class Result:
    text: str  # what the reader sees: the committed continuation
    tokens: list  # its token ids
    scores: list  # the detector's score of each kept token (None without a detector)
    steps: list = field(default_factory=list)  # every sampled token: index, token, score, alarm, committed
    events: list = field(default_factory=list)  # rollback, introspection, fallback
    stats: dict = field(default_factory=dict)
    stop_reason: str = ""  # eos | max_new_tokens | budget | no_token
    context: list = field(default_factory=list)  # every token id the KV cache holds: prompt, kept tokens, notes
    # this generation's alarm threshold, safe level and redraw level (None without a detector)
    threshold: float | None = None
    safe_level: float | None = None
    redraw_level: float | None = None


class Path:
    """The generated tokens on the current path and what the loop keeps per token index i:
    tokens[i], scores[i], slots[i] (its cache slot), born[i] (the sampling step that drew it), and
    next_logits[i], the logits that predict token i: one entry more than tokens, the last one
    predicts the next token. A rollback is one call: truncate(n)."""

    def __init__(self, first_logits):
        self.tokens, self.scores, self.slots, self.born = [], [], [], []
        self.next_logits = [first_logits]

    def __len__(self):
        return len(self.tokens)

    def append(self, token, score, slot, born, logits):
        for values, value in ((self.tokens, token), (self.scores, score), (self.slots, slot),
                              (self.born, born), (self.next_logits, logits)):
            values.append(value)

    def truncate(self, n):
        for values in (self.tokens, self.scores, self.slots, self.born):
            del values[n:]
        del self.next_logits[n + 1:]


@dataclass
class LoopState:
    """What the algorithm decides with."""
    path: Path = None  # the tokens on the current path (set once the prompt is in the cache)
    threshold: float = None  # this generation's alarm threshold and safe level (see after_prompt)
    safe_level: float = None
    redraw_level: float = None  # an alarm beyond the commit point may redraw where the score before is below it
    vigilant: bool = False  # the detector flagged the prompt: no redraws beyond the commit point
    committed: int = 0  # path.tokens[:committed] is released: shown, never retracted
    banned: dict = field(default_factory=dict)  # token index -> ids banned there (at the commit point or beyond)
    retries: int = 0  # rollbacks at the commit point
    noted_at: int | None = None  # the commit point where the last note went
    stop_reason: str = ""


@dataclass
class Record:
    """What a run records for its Result: every step and event, and the counters of its stats."""
    steps: list = field(default_factory=list)
    events: list = field(default_factory=list)
    forward_passes: int = 0
    rollbacks: int = 0
    sampled: int = 0  # tokens drawn so far; the step each token was born at
    draw: float | None = None  # the uniform number of the latest draw (each step records its own)
    waited: int = 0  # summed over released tokens: steps between drawing and release (stats["avg_wait_tokens"])
    started: float = field(default_factory=time.perf_counter)


class Reader:
    """Where released text goes: decoded incrementally (a token may end mid-character) and handed to
    on_release(text) as soon as it can no longer be retracted."""

    def __init__(self, on_release):
        self.on_release = on_release
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(self, data):
        piece = self.decoder.decode(data)
        if piece and self.on_release:
            self.on_release(piece)


class Sequence:
    """One generation while it runs; a batch holds one per cache row. Where it runs (model,
    tokenizer, detector, cache row, random generator, and `context`: the token id of every cache
    slot), and its three parts by role: `state` (what the algorithm decides with), `record` (what it
    records for the Result) and `reader` (where released text goes)."""

    def __init__(self, model, enc, prompt_ids, detector, settings, cache, row=0, on_release=None):
        self.model, self.enc, self.detector, self.settings = model, enc, detector, settings
        self.cache, self.row, self.prompt_ids, self.context = cache, row, list(prompt_ids), []
        # a model may pad its vocabulary past the tokenizer's (nanoGPT's 50304): those ids are never sampled
        self.vocab = getattr(enc, "n_vocab", None) or model.config.vocab_size
        # on the CPU whatever the model's device: a seed draws the same numbers on every device, and on a
        # GPU a draw is not a kernel launch that the CPU must wait for, once per row and step
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.state, self.record, self.reader = LoopState(), Record(), Reader(on_release)


# ----------------------------------------------------------------------------------------------
# The loop


@torch.inference_mode()
def generate(model, enc, prompt, detector=None, settings=None, on_release=None):
    """Sample a continuation of `prompt` (text or token ids); with a detector, backtrack out of unsafe text.

    detector=None is plain sampling through the same code (the baseline). on_release(text) receives
    committed text as soon as it can no longer be retracted. batched.generate_batch runs the same
    steps for many prompts at once.
    """
    settings = (settings or Settings()).check()
    seq = Sequence(model, enc, encode_prompt(enc, prompt, model, settings), detector, settings, model.new_cache(),
                   on_release=on_release)
    prefill(seq)  # 1
    while not seq.state.stop_reason:
        token = sample(seq.state.path.next_logits[-1][None], settings, [draw(seq)], [banned_now(seq)],
                       [pool_now(seq)])[0]
        if token < 0:
            stop_with_fallback(seq, NOTHING_TO_SAMPLE)
            break
        logits, hidden = feed(seq, [token])  # 2
        after_token(seq, token, detector.score(token, hidden) if detector else None, logits)
    return finish(seq)


def prefill(seq):
    """Step 1: run the prompt through the model; its last logits predict the first token."""
    rows = None if len(seq.cache.lengths) == 1 else [seq.row]
    logits, hidden = seq.model(torch.tensor([seq.prompt_ids], device=seq.model.wte.weight.device), seq.cache,
                               "last", rows=rows)
    wrote(seq, seq.prompt_ids)
    after_prompt(seq, logits[0, -1, :seq.vocab], [h[0] for h in hidden])


def after_prompt(seq, first_logits, prompt_hidden):
    """The prompt is in the cache: an empty path whose next token `first_logits` predict, and this
    generation's levels. The detector's threshold and safe level (the settings' safe level first),
    and between them the redraw level. The detector flags the prompt when its verdict is
    `flag_margin` logits above the threshold or more (a verdict that is not a number in [0, 1]
    counts as flagged): toxic text is likelier after a toxic prompt, so there every alarm beyond the
    commit point rolls back, and both levels are `vigilance` logits lower."""
    state, detector, settings = seq.state, seq.detector, seq.settings
    state.path = Path(first_logits)
    if detector:
        prompt_score = detector.start(seq.prompt_ids, prompt_hidden)
        state.threshold = detector.threshold
        state.safe_level = settings.safe_level or detector.safe_level or detector.threshold
        flag_level = shifted(detector.threshold, settings.flag_margin)
        state.vigilant = prompt_score is not None and not (finite_number(prompt_score) and prompt_score < flag_level)
        if state.vigilant and settings.vigilance:
            state.threshold, state.safe_level = (shifted(level, -settings.vigilance)
                                                 for level in (state.threshold, state.safe_level))
        state.redraw_level = level_between(state.safe_level, state.threshold, settings.redraw_gate)


def feed(seq, ids):
    """Run ids through the model after what this row's cache holds: (last logits, hidden)."""
    device = seq.model.wte.weight.device
    rows = None if len(seq.cache.lengths) == 1 else [seq.row]
    logits, hidden = seq.model(torch.tensor([ids], device=device), seq.cache, "last", rows=rows)
    wrote(seq, ids)
    return logits[0, -1, :seq.vocab], [h[0, -1] for h in hidden]


def wrote(seq, ids):
    """Account for ids that a forward pass just wrote into this row's cache (batched.py runs one
    forward pass for many rows, then this for each)."""
    seq.context += ids
    seq.record.forward_passes += 1


def pool_now(seq):
    """Draws at the commit point, and wherever tokens are banned, come from the `redraw_pool` likeliest
    tokens (0: every token): each redraw or rollback there bans one of them, so they run out, and a
    retry stays among likely text instead of drifting into the tail."""
    state = seq.state
    index = len(state.path)  # about to be drawn: at the commit point it is the first token or a retry
    here = index == state.committed or index in state.banned
    return seq.settings.redraw_pool if seq.detector is not None and here else 0


def banned_now(seq):
    """The ids banned at the index about to be drawn: where a redraw or rollback returned."""
    return seq.state.banned.get(len(seq.state.path), ())


def draw(seq):
    """The step's one uniform number in [0, 1) from the row's own generator (so a row's tokens never
    depend on the other rows); recorded in the step, so a port can replay it without our generator."""
    seq.record.draw = float(torch.rand(1, generator=seq.generator))
    return seq.record.draw


def alarm_reason(seq, score):
    """Why `score` is an alarm, or None. A score at or above the threshold is one; so is a score that
    is not a number in [0, 1], since a detector that cannot score must not let text through."""
    if seq.detector is None:
        return None
    if not (finite_number(score) and 0 <= score <= 1):
        return f"the detector gave {score!r}, not a score in [0, 1]"
    return "score" if score >= seq.state.threshold else None


def after_token(seq, token, score, logits):
    """Steps 3-7 for a token just fed to the model: `logits` predict the next token, `score` is
    the detector's verdict on the text so far."""
    settings, state, record = seq.settings, seq.state, seq.record
    path = state.path
    record.sampled += 1
    path.append(token, score, len(seq.context) - 1, record.sampled, logits)
    reason = alarm_reason(seq, score)
    record.steps.append(dict(index=len(path) - 1, token=token, score=score, alarm=reason is not None, draw=record.draw))
    if reason and reason != "score":
        record.steps[-1]["failed"] = reason  # the detector could not score: an alarm, said in the trace
    if reason and seq.detector.matched:
        record.steps[-1]["matched"] = seq.detector.matched  # the listed word that fired, for traces

    if reason:
        redraw = may_redraw(seq, len(path) - 1)
        back_to = len(path) - 1 if redraw else state.committed
        discarded = rollback_to(seq, back_to)  # 3
        out_of_retries = state.retries >= settings.max_retries
        if not redraw and (out_of_retries or record.rollbacks >= settings.max_rollbacks):  # 4
            stop_with_fallback(seq, "retry budget spent at this point" if out_of_retries
                               else "total rollback budget spent", score=score, discarded=seq.enc.decode(discarded),
                               discarded_tokens=discarded)
        else:
            state.banned.setdefault(back_to, set()).add(discarded[0])  # 5
            event = dict(index=back_to, score=score, discarded=seq.enc.decode(discarded), banned=discarded[0],
                         step=len(record.steps) - 1, discarded_tokens=discarded)
            if redraw:
                record.events.append(dict(type="redraw", **event))
            else:
                record.rollbacks, state.retries = record.rollbacks + 1, state.retries + 1
                record.events.append(dict(type="rollback", **event))
                if settings.introspect != "none" and state.noted_at != state.committed:  # 6
                    insert_note(seq, seq.enc.decode(discarded))
    elif token == seq.enc.eot_token and settings.stop_at_eos:
        state.stop_reason = "eos"
    else:
        upto = len(path) - settings.buffer  # 7
        while upto > state.committed and not ends_safely(seq, upto):
            upto -= 1
        if upto > state.committed:
            release(seq, upto)
            # bans up to the new commit point and the retries belong to the old one
            state.banned, state.retries = {i: ids for i, ids in state.banned.items() if i > upto}, 0
        if len(path) >= settings.max_new_tokens:
            state.stop_reason = "max_new_tokens"
    record.steps[-1]["committed"] = state.committed


def ends_safely(seq, n):
    """May the text be shown up to token index n? Only where the score was below the safe level: a
    rising score holds text back, so an alarm can still go back to before the rise."""
    score = seq.state.path.scores[n - 1]
    return score is None or score < seq.state.safe_level


def may_redraw(seq, index):
    """Step 4: may an alarm on token `index` discard that token alone? Only where the text before it
    was safe enough: at the commit point, or beyond it where the token before scored below the
    redraw level. A flagged token there is usually one unlucky word, and redrawing it costs one
    token where a rollback costs the held-back text; where the score was already rising, the text
    is heading somewhere and rolls back. After a flagged prompt every alarm beyond the commit point
    rolls back, and so does one at an index already redrawn `max_redraws` times."""
    state, settings = seq.state, seq.settings
    if settings.redraw_pool == 0:
        return False
    if index == state.committed:
        return True  # bounded by the pool: each redraw bans one of its tokens
    # the token before is on the path, so its score passed alarm_reason(): a number below the threshold
    return (not state.vigilant and state.path.scores[index - 1] < state.redraw_level
            and len(state.banned.get(index, ())) < settings.max_redraws)


def rollback_to(seq, n):
    """Forget every token from index n on (n >= the commit point): in the KV cache, the detector, the
    path and the bans beyond n. The mirror of release(). Each is a pointer move; nothing is
    recomputed. Returns the discarded tokens."""
    state = seq.state
    discarded = state.path.tokens[n:]
    slot = state.path.slots[n]
    seq.cache.rollback(slot, seq.row)
    del seq.context[slot:]
    if seq.detector:
        seq.detector.rollback(n)
    state.path.truncate(n)
    state.banned = {i: ids for i, ids in state.banned.items() if i <= n}
    return discarded


def release(seq, upto):
    """Show the reader path.tokens[committed:upto]: from now on they can never be retracted."""
    state, path = seq.state, seq.state.path
    seq.record.waited += sum(seq.record.sampled - b for b in path.born[state.committed:upto])
    seq.reader.show(b"".join(seq.enc.decode_single_token_bytes(t) for t in path.tokens[state.committed:upto]
                             if t != seq.enc.eot_token))
    state.committed = upto


def stop_with_fallback(seq, reason, **details):
    seq.record.events.append(dict(type="fallback", index=seq.state.committed, reason=reason,
                                  step=len(seq.record.steps) - 1, **details))
    seq.state.stop_reason = "budget" if "budget" in reason else "no_token"


def insert_note(seq, discarded):
    """Step 6: feed a note into the hidden context at the commit point, never shown. It stays there
    for the rest of the generation: later rollbacks return to the commit point, which only moves
    forward, so none goes back past the note."""
    settings, enc = seq.settings, seq.enc
    if settings.introspect == "template":
        opening, budget = enc.encode_ordinary(settings.template), 0
    else:  # the model critiques the discarded text itself, greedily
        opening, budget = enc.encode_ordinary(CRITIQUE_OPENING.format(discarded=discarded.strip()[:80])), CRITIQUE_TOKENS
    closing = enc.encode_ordinary(")\n") if budget else []
    # the note must leave room for every token still to come
    room = seq.model.config.n_positions - len(seq.context) - (settings.max_new_tokens - seq.state.committed)
    if len(opening) + budget + len(closing) > room:
        return
    logits, _ = feed(seq, opening)
    note = list(opening)
    for _ in range(budget):
        token = int(logits.argmax())
        if token == enc.eot_token or ")" in enc.decode([token]):
            break
        logits, _ = feed(seq, [token])
        note.append(token)
    if closing:
        logits, _ = feed(seq, closing)
        note += closing
    seq.state.path.next_logits[-1], seq.state.noted_at = logits, seq.state.committed  # what follows the note
    seq.record.events.append(dict(type="introspection", index=seq.state.committed, note=enc.decode(note), note_tokens=note,
                                  step=len(seq.record.steps) - 1))


def finish(seq):
    """Release what is still held back and describe the run."""
    path, record = seq.state.path, seq.record
    release(seq, len(path))
    seq.reader.decoder.decode(b"", final=True)
    kept = [(t, s) for t, s in zip(path.tokens, path.scores) if t != seq.enc.eot_token]
    seconds = time.perf_counter() - record.started
    stats = dict(tokens_generated=record.sampled, tokens_kept=len(kept), forward_passes=record.forward_passes,
                 rollbacks=record.rollbacks, redraws=sum(e["type"] == "redraw" for e in record.events),
                 seconds=seconds, tokens_per_second=len(kept) / seconds,
                 # Average Wait Tokens (our reading of CARE): for each shown token, how many tokens
                 # were sampled between its own sampling and its release; 0 for plain streaming
                 avg_wait_tokens=record.waited / max(len(path), 1), prompt_tokens=len(seq.prompt_ids),
                 vigilant=seq.state.vigilant)
    tokens = [t for t, _ in kept]
    return Result(seq.enc.decode(tokens), tokens, [s for _, s in kept], record.steps, record.events, stats,
                  seq.state.stop_reason, seq.context, seq.state.threshold, seq.state.safe_level, seq.state.redraw_level)


# ----------------------------------------------------------------------------------------------
# Command line


# the command line's name of each Settings field that has a flag
FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in fields(Settings) if f.name not in ("template", "stop_at_eos")}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as written: the docstring's own layout, and every default that exists."""

    def _get_help_string(self, action):
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        return action.help + (" (default %(default)s)" if shown else "")


def main(argv=None):
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompt-file", help="many prompts: one per line, or JSONL with a \"prompt\" field")
    p.add_argument("--model", default="gpt2", help="Hugging Face Hub name, downloaded once")
    p.add_argument("--model-dir", help="local checkpoint directory in Hugging Face layout (overrides --model)")
    p.add_argument("--detector", choices=DETECTORS, help="what scores each token: the probe, a word list, or both "
                   f"(default {DEFAULT_DETECTOR})")
    p.add_argument("--probe", help="probe file from train_probe.py (by default one is fitted for the model and cached)")
    p.add_argument("--wordlist", action="append", help="word list of the keyword detector; repeat it for several "
                   "(by default probe_data/ldnoobw-en.txt and probe_data/insults-en.txt)")
    p.add_argument("--threshold", type=float, help=f"alarm threshold, a probability in [{LOWEST:g}, 1 - {LOWEST:g}] "
                   "(by default the probe's own)")
    p.add_argument("--safe-level", type=float, help="show text only up to a token scored below this probability "
                   "(by default the probe's own, below its threshold)")
    p.add_argument("--no-backtrack", action="store_true", help="plain sampling through the same loop (the baseline)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature, finite; 0 (or below 1e-6) is greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="keep the k likeliest tokens; 0 keeps all")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--buffer", type=int, default=d.buffer, help="tokens held back before release; 0 is token-level")
    p.add_argument("--introspect", choices=["none", "template", "critique"], default=d.introspect,
                   help="note inserted into the hidden context after a rollback")
    p.add_argument("--redraw-pool", type=int, default=d.redraw_pool, metavar="K",
                   help="at a commit point, and wherever tokens are banned, draw among the K likeliest tokens; a "
                   "flagged token after calm text is redrawn (banned there; not a rollback); 0: no pool, every "
                   "alarm is a rollback")
    p.add_argument("--max-redraws", type=int, default=d.max_redraws, metavar="N",
                   help="redraws at one index beyond the commit point before an alarm there rolls back (0: none)")
    p.add_argument("--max-retries", type=int, default=d.max_retries, help="rollbacks at one commit point")
    p.add_argument("--max-rollbacks", type=int, default=d.max_rollbacks, help="rollbacks allowed per generation")
    p.add_argument("--redraw-gate", type=float, default=d.redraw_gate, metavar="SHARE",
                   help="beyond the commit point, an alarm redraws only where the token before scored below the level "
                   "this share of the way from the safe level (0) to the threshold (1), in logits")
    p.add_argument("--flag-margin", type=float, default=d.flag_margin, metavar="LOGITS",
                   help="the detector flags a prompt it scores at least this many logits above its threshold (a "
                   "listed word always): after it, every alarm beyond the commit point rolls back")
    p.add_argument("--vigilance", type=float, default=d.vigilance, metavar="LOGITS",
                   help="after a flagged prompt, lower the threshold and safe level by this many logits")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed, in [0, 2**63)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--dtype", default="float32", help="float32; bfloat16 or float16 on GPUs")
    p.add_argument("--threads", type=int, help="torch CPU threads, at most this machine's cores (by default torch's choice)")
    p.add_argument("--trace", action="store_true", help="show every sampled token, score, rollback and release "
                   "(on stderr with --json)")
    p.add_argument("--json", action="store_true", help="print each result as one JSON line: text, tokens, steps "
                   "(decoded), events, stats, threshold and settings")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained page showing what was shown, what was "
                   "discarded where, and the scores against the threshold")
    args = p.parse_args(argv)

    chosen = {name: value for name, value in vars(args).items() if name in FLAGS}  # the flags of Settings fields
    settings = Settings(**dict(chosen, temperature=0 if args.greedy else args.temperature)).check(FLAGS)
    if args.no_backtrack:
        given = [flag for flag, value in (("--detector", args.detector), ("--probe", args.probe),
                                          ("--wordlist", args.wordlist), ("--threshold", args.threshold),
                                          ("--safe-level", args.safe_level)) if value is not None]
        if given:
            raise UserError(f"{given[0]} has no effect with --no-backtrack; leave one of them out")
    if args.threshold is not None and not (finite_number(args.threshold) and LOWEST <= args.threshold <= 1 - LOWEST):
        raise UserError(f"--threshold must be a probability between {LOWEST:g} and 1 - {LOWEST:g}")
    inputs = [args.prompt_file, args.probe, *(args.wordlist or [])]
    if args.html:
        output_path(args.html, "--html", inputs=inputs)  # now, not after the run
    prompts = {None: args.prompt} if args.prompt is not None else read_prompts(args.prompt_file)
    pick_dtype(args.dtype, pick_device(args.device))  # bad options fail before any slow work
    set_threads(args.threads)
    if args.model_dir and not os.path.isdir(args.model_dir):
        raise UserError(f"--model-dir {args.model_dir} is not a directory; point it at a Hugging Face checkpoint")
    model, enc = load(args.model_dir or args.model, args.device, args.dtype)
    for n, prompt in prompts.items():  # fail before any slow work
        try:
            encode_prompt(enc, prompt, model, settings, FLAGS)
        except UserError as e:
            raise UserError(f"{args.prompt_file}:{n}: {e}" if n else str(e))
    detector = None if args.no_backtrack else default_detector(model, enc, args.detector or DEFAULT_DETECTOR,
                                                               args.probe, args.threshold, args.wordlist)
    stream = not args.json and not args.trace
    runs = []
    for prompt in prompts.values():
        if stream:
            print(prompt, end="", flush=True)
        result = generate(model, enc, prompt, detector, settings,
                          on_release=(lambda piece: print(piece, end="", flush=True)) if stream else None)
        runs.append((prompt, result, enc))
        if args.trace:
            out = sys.stderr if args.json else sys.stdout
            report.print_trace(prompt, result, enc, settings, out.isatty(), out)
        if args.json:  # one whole line at a time, flushed: a reader of the stream never sees half of one
            print(json.dumps(report.json_record(prompt, result, enc, settings)), flush=True)
        elif stream:
            print()
            if result.events:  # the reader should know the text was steered, and why it may end early
                print(report.steering_note(result), file=sys.stderr)
            print()
    if args.html:
        report.write_html(args.html, runs, inputs=inputs)
        print(f"wrote {args.html}", file=sys.stderr)


def console():
    """The `backtrack` command that `pip install -e .` puts on the PATH."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    console()
