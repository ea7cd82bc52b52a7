"""Decoding-time safety backtracking for GPT-2 and Llama-family models: the loop.

    python backtrack.py --model-dir ../shared/models/minigpt2 --prompt "You are such a" --trace

generate() reads as the algorithm, whose one statement is the README's pseudo-code ("The
algorithm"): the numbers in the comments below (# 1 ... # 8) are its steps. Why each rule is there:
docs/algorithm.md; what a port must match, bit for bit: golden/SPEC.md. The policy (policy.py)
decides at three points: the levels, the pool, redraw or roll back. Its `classic` is the papers'
algorithm; `tuned`, the default, adds what measurement chose. The command line is backtrack_cli.py.
"""
if __name__ == "__main__":  # `python backtrack.py --prompt ...`: the command line is backtrack_cli.py. It runs
    import backtrack_cli     # before this file's imports so that it sets torch's threads up before torch loads.
    backtrack_cli.console()

import codecs
import copy
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import torch

from checks import UserError, check_detector, check_settings, checked_levels, encode_prompt, finite_number
from policy import Tuned
from sampling import sample_one

# A note a base model reads as the writer correcting course (evaluate.py's buffered+template measures it).
TEMPLATE = "\n(Let me rephrase that politely.)\n"
CRITIQUE_OPENING = '\n(I almost wrote "{discarded}", but that is hurtful. Instead I will'
CRITIQUE_TOKENS = 12  # at most this many tokens of self-critique, written greedily
NOTE_ROOM = 512  # cache slots beyond the prompt and the new tokens, for introspection notes
NOTHING_TO_SAMPLE = "no token can be sampled here (every candidate is banned, or the logits are not numbers)"


@dataclass
class Settings:
    """How to decode. The command line's defaults are these (one place)."""
    max_new_tokens: int = 40
    temperature: float = 1.0  # below sampling.GREEDY_BELOW (e.g. 0) means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 0.9  # nucleus sampling mass; 1 keeps every token
    buffer: int = 4  # tokens held back before release; 0 is token-level backtracking
    introspect: str = "none"  # none | template | critique
    template: str = TEMPLATE
    max_retries: int = 20  # rollbacks at one commit point; by default only the total (max_rollbacks) limits them
    max_rollbacks: int = 20  # rollbacks allowed in total
    safe_level: float | None = None  # show text only up to a score below this; None: the policy's choice
    stop_at_eos: bool = True
    seed: int = 0
    policy: object = field(default_factory=Tuned)  # policy.Tuned (the default) or policy.Classic

    @staticmethod
    def given(settings):
        """A checked copy of the settings a caller passed (None: the defaults): a run uses its own, so
        a change made while it runs (from on_release, say) takes effect on the next run, not mid-way."""
        if settings is not None and not isinstance(settings, Settings):
            raise UserError(f"settings must be a backtrack.Settings, not {type(settings).__name__}")
        return copy.deepcopy(settings or Settings()).check()

    def check(self, names=None):
        """These settings, each checked (checks.check_settings): the first out of range is a UserError."""
        check_settings(self, names)
        return self


@dataclass
class Result:
    text: str  # what the reader sees: the committed continuation
    tokens: list  # its token ids
    scores: list  # the detector's score of each kept token (None without a detector)
    steps: list = field(default_factory=list)  # every sampled token: index, token, score, alarm, committed
    events: list = field(default_factory=list)  # redraw, rollback, introspection, fallback
    stats: dict = field(default_factory=dict)
    stop_reason: str = ""  # eos | max_new_tokens | budget | no_token
    context: list = field(default_factory=list)  # every token id the KV cache holds: prompt, kept tokens, notes
    # this generation's alarm threshold, safe level and redraw level (None without a detector)
    threshold: float | None = None
    safe_level: float | None = None
    redraw_level: float | None = None


class Path:
    """The text a generation has written. Two coordinates: a token *index* i counts generated tokens
    on the path, a cache *slot* counts what the KV cache holds (prompt, tokens, notes; context[slot] is
    its token id). Per index i: tokens[i], scores[i], slots[i], born[i] (the step that drew it), banned[i]
    and next_logits[i] (which predicts token i: one entry more than tokens). tokens[:committed] are shown,
    never retracted. What moves together moves here: append, truncate (rollback), commit (release)."""

    def __init__(self):
        self.tokens, self.scores, self.slots, self.born, self.next_logits = [], [], [], [], []
        self.banned, self.context, self.committed = {}, [], 0

    def wrote(self, ids):  # ids went into the cache after what it held (the prompt, a token, a note)
        self.context += ids

    def append(self, token, score, next_logits, step):
        self.tokens.append(token)
        self.scores.append(score)
        self.slots.append(len(self.context) - 1)
        self.born.append(step)
        self.next_logits.append(next_logits)

    def truncate(self, n):
        """Forget every token from index n on, and the bans beyond n: (those tokens, their first slot)."""
        discarded, slot = self.tokens[n:], self.slots[n]
        del self.context[slot:]
        for values in (self.tokens, self.scores, self.slots, self.born):
            del values[n:]
        del self.next_logits[n + 1:]
        self.banned = {i: ids for i, ids in self.banned.items() if i <= n}
        return discarded, slot

    def ban(self, index, token):
        self.banned.setdefault(index, set()).add(token)

    def commit(self, upto):
        """tokens[:upto] are released; the bans up to there belong to the old commit point."""
        self.committed = upto
        self.banned = {i: ids for i, ids in self.banned.items() if i > upto}

    def view(self, levels):  # what a policy decides on, read-only
        return PathView(self.committed, MappingProxyType(self.banned), tuple(self.scores), levels)


class PathView(NamedTuple):
    committed: int
    banned: MappingProxyType  # token index -> ids banned there
    scores: tuple
    levels: object  # policy.Levels


@dataclass
class Generation:
    """One generation while it runs: its path and its budgets; a batch holds one per cache row."""
    model: object
    enc: object
    detector: object
    settings: Settings
    cache: object
    row: int
    prompt_ids: list
    on_release: object = None  # called with released text as soon as it can never be retracted
    levels: object = None  # policy.Levels: threshold, safe level (None without a detector)
    path: Path = field(default_factory=Path)
    retries: int = 0  # rollbacks at the commit point
    rollbacks: int = 0  # rollbacks in total
    noted_at: int | None = None  # the commit point where the last note went
    stop_reason: str = ""

    def __post_init__(self):
        # a model may pad its vocabulary past the tokenizer's (nanoGPT's 50304): those ids are never sampled
        self.vocab = getattr(self.enc, "n_vocab", None) or self.model.config.vocab_size
        # on the CPU whatever the model's device: a seed draws the same numbers on every device, and on a
        # GPU a draw is not a kernel launch that the CPU must wait for, once per row and step
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may end mid-character
        self.record = Recorder()


# ----------------------------------------------------------------------------------------------
# The loop


@torch.inference_mode()
def generate(model, enc, prompt, detector=None, settings=None, on_release=None):
    """Sample a continuation of `prompt` (text or token ids); with a detector, backtrack out of unsafe text.

    detector=None is plain sampling through the same code (the baseline). on_release(text) receives
    committed text as soon as it can no longer be retracted. batched.generate_batch runs the same
    steps for many prompts at once.
    """
    settings = Settings.given(settings)
    check_detector(detector, settings.safe_level)
    prompt_ids = encode_prompt(enc, prompt, model, settings)
    g = Generation(model, enc, detector, settings, model.new_cache(max_len=cache_length(model, [prompt_ids], settings)), 0,
                   prompt_ids, on_release)
    logits, hidden = forward(g, g.prompt_ids)  # 1. prefill
    after_prompt(g, logits[0, -1], [h[0] for h in hidden])
    while not g.stop_reason:
        draw, banned, pool = next_draw(g)  # 2. draw
        token = sample_one(g.path.next_logits[-1], draw, banned, pool, settings.temperature, settings.top_k, settings.top_p)
        if token < 0:
            fallback(g, NOTHING_TO_SAMPLE)
            break
        logits, hidden = forward(g, [token])  # 3. feed, score
        reading = detector.read(newest_states(hidden))[0] if detector is not None else None
        step(g, token, draw, reading, logits[0, -1])
    return finish(g)


def cache_length(model, prompts, settings):
    """The cache slots a generation of these prompts can fill: the longest prompt, the new tokens and
    room for notes, within the model's context (a Llama's context of 8,192 would cost a batch of 32
    rows gigabytes of cache it never reads)."""
    return min(model.config.n_positions, max(map(len, prompts)) + settings.max_new_tokens + NOTE_ROOM)


def after_prompt(g, first_logits, prompt_hidden):
    """Step 1, once the prompt is in the cache: `first_logits` predict the first token; the detector's
    verdict on the prompt sets this generation's levels, as the policy places them."""
    g.path.next_logits = [first_logits[:g.vocab]]
    if g.detector is not None:  # `is not None`: a detector that tests false (a __len__ of 0) is still watching
        verdict = g.detector.start(g.prompt_ids, prompt_hidden)
        policy = g.settings.policy
        g.levels = checked_levels(policy.levels(g.detector, verdict, g.settings.safe_level), policy, g.detector)


def next_draw(g):
    """Step 2's arguments for the index about to be drawn: a uniform number from the row's own
    generator (so a row's tokens never depend on the other rows; recorded, so a port can replay it),
    the ids banned there, and the policy's pool (0: every token)."""
    path, index = g.path, len(g.path.tokens)
    draw = float(torch.rand(1, generator=g.generator))
    return draw, path.banned.get(index, ()), g.settings.policy.pool(path.view(g.levels), index) if g.detector is not None else 0


def step(g, token, draw, reading, logits):
    """Steps 3-8 for a token just drawn (with uniform number `draw`) and fed: `reading` is what the
    detector reads of it, `logits` predict the next token. The step's record is written last, when done."""
    path, index = g.path, len(g.path.tokens)
    score = g.detector.score(token, reading) if g.detector is not None else None
    g.record.sampled += 1  # this step's number, counting from 1
    path.append(token, score, logits[:g.vocab], g.record.sampled)
    alarm = alarm_reason(g, score)
    matched = g.detector.matched if alarm else None  # the listed word that fired, for traces
    if alarm:
        on_alarm(g, index, score)
    elif token == g.enc.eot_token and g.settings.stop_at_eos:
        g.stop_reason = "eos"
    else:
        release_what_is_safe(g)
    g.record.step(index, token, score, alarm, draw, matched, path.committed)


def on_alarm(g, index, score):
    """Steps 4-7 for an alarm on token `index`: redraw it or roll back to the commit point, unless the
    budget is spent; ban the token that began the discarded text; a note after a rollback."""
    settings, path = g.settings, g.path
    redraw = settings.policy.redraws(path.view(g.levels), index)  # 4. redraw this token, or roll back
    back_to = index if redraw else path.committed
    discarded = rollback_to(g, back_to)
    text = g.enc.decode(discarded)
    spent = ("retry budget spent at this point" if g.retries >= settings.max_retries else
             "total rollback budget spent" if g.rollbacks >= settings.max_rollbacks else None)
    if spent and not redraw:  # 5. budgets
        fallback(g, spent, score=score, discarded=text, discarded_tokens=discarded)
        return
    path.ban(back_to, discarded[0])  # 6. ban
    g.record.event("redraw" if redraw else "rollback", index=back_to, score=score, banned=discarded[0],
                   discarded=text, discarded_tokens=discarded)
    if not redraw:
        g.rollbacks, g.retries = g.rollbacks + 1, g.retries + 1
        if settings.introspect != "none" and g.noted_at != path.committed:  # 7. note
            insert_note(g, text)


def release_what_is_safe(g):
    """Step 8 after a token without an alarm: release what is older than the buffer and ends safely;
    stop at max_new_tokens."""
    path, settings = g.path, g.settings
    upto = len(path.tokens) - settings.buffer
    while upto > path.committed and not ends_safely(g, upto):
        upto -= 1
    if upto > path.committed:
        release(g, upto)
        g.retries = 0  # the retries belong to the old commit point
    if len(path.tokens) >= settings.max_new_tokens:
        g.stop_reason = "max_new_tokens"


def alarm_reason(g, score):
    """Why `score` is an alarm, or None. A score at or above the threshold is one; so is a score that
    is not a number in [0, 1], since a detector that cannot score must not let text through."""
    if g.detector is None:
        return None
    if not (finite_number(score) and 0 <= score <= 1):
        return f"the detector gave {score!r}, not a score in [0, 1]"
    return "score" if score >= g.levels.threshold else None


def ends_safely(g, n):
    """May the text be shown up to token index n? Only where the score was below the safe level: a
    rising score holds text back, so an alarm can still go back to before the rise."""
    score = g.path.scores[n - 1]
    return score is None or score < g.levels.safe_level


def rollback_to(g, n):
    """Forget every token from index n on (n >= the commit point): on the path (and the bans beyond
    n), in the KV cache and in the detector. The mirror of release(). Each is a pointer move; nothing
    is recomputed. Returns the discarded tokens."""
    discarded, slot = g.path.truncate(n)
    g.cache.rollback(slot, g.row)
    if g.detector is not None:
        g.detector.rollback(n)
    return discarded


def release(g, upto):
    """Show the reader tokens[committed:upto]: from now on they can never be retracted."""
    path = g.path
    g.record.released(path.born[path.committed:upto])
    piece = g.decoder.decode(b"".join(g.enc.decode_single_token_bytes(t) for t in path.tokens[path.committed:upto]
                                      if t != g.enc.eot_token))
    if piece and g.on_release:
        g.on_release(piece)
    path.commit(upto)


def fallback(g, reason, **details):
    """Stop with the text already released: a budget ran out, or nothing can be sampled."""
    g.record.event("fallback", index=g.path.committed, reason=reason, **details)
    g.stop_reason = "budget" if "budget" in reason else "no_token"


def insert_note(g, discarded):
    """Step 7: feed a note into the hidden context at the commit point, never shown. It stays there
    for the rest of the generation: later rollbacks return to the commit point, which only moves
    forward, so none goes back past the note."""
    settings, enc = g.settings, g.enc
    if settings.introspect == "template":
        opening, budget = enc.encode_ordinary(settings.template), 0
    else:  # the model critiques the discarded text itself, greedily
        opening, budget = enc.encode_ordinary(CRITIQUE_OPENING.format(discarded=discarded.strip()[:80])), CRITIQUE_TOKENS
    closing = enc.encode_ordinary(")\n") if budget else []
    # the note must leave room for every token still to come
    room = g.cache.max_len - len(g.path.context) - (settings.max_new_tokens - g.path.committed)
    if len(opening) + budget + len(closing) > room:
        return
    logits, _ = forward(g, opening)
    note = list(opening)
    for _ in range(budget):
        token = int(logits[0, -1, :g.vocab].argmax())
        if token == enc.eot_token or ")" in enc.decode([token]):
            break
        logits, _ = forward(g, [token])
        note.append(token)
    if closing:
        logits, _ = forward(g, closing)
        note += closing
    g.path.next_logits[-1], g.noted_at = logits[0, -1, :g.vocab], g.path.committed  # what follows the note
    g.record.event("introspection", index=g.path.committed, note=enc.decode(note), note_tokens=note)


def forward(g, ids):
    """Run ids through the model after what this row's cache holds: (last logits, hidden)."""
    logits, hidden = g.model(torch.tensor([ids], device=g.model.wte.weight.device), g.cache, "last", rows=[g.row])
    wrote(g, ids)
    return logits, hidden


def wrote(g, ids):
    """Account for ids that a forward pass just wrote into this row's cache (batched.py runs one
    forward pass for many rows, then this for each)."""
    g.path.wrote(ids)
    g.record.forward_passes += 1


def newest_states(hidden):
    """The newest token's hidden states of every row, side by side: (rows, n_layer + 1, C)."""
    return torch.stack([h[:, -1] for h in hidden], 1)


def finish(g):
    """Release what is still held back and describe the run."""
    path = g.path
    release(g, len(path.tokens))
    g.decoder.decode(b"", final=True)
    kept = [(t, s) for t, s in zip(path.tokens, path.scores) if t != g.enc.eot_token]
    record, levels = g.record, g.levels
    seconds = time.perf_counter() - record.started
    stats = dict(tokens_generated=record.sampled, tokens_kept=len(kept), forward_passes=record.forward_passes,
                 rollbacks=g.rollbacks, redraws=sum(e["type"] == "redraw" for e in record.events),
                 seconds=seconds, tokens_per_second=len(kept) / seconds,
                 # Average Wait Tokens (our reading of CARE): for each shown token, how many tokens
                 # were sampled between its own sampling and its release; 0 for plain streaming
                 avg_wait_tokens=record.waited / max(len(path.tokens), 1), prompt_tokens=len(g.prompt_ids),
                 vigilant=bool(levels and levels.vigilant))
    tokens = [t for t, _ in kept]
    return Result(g.enc.decode(tokens), tokens, [s for _, s in kept], record.steps, record.events, stats,
                  g.stop_reason, path.context, *((levels.threshold, levels.safe_level, levels.redraw_level) if levels
                                              else (None, None, None)))


class Recorder:
    """What a run records for its Result: every step (written once per step, when it is done) and
    every event, and the counters of its stats. It decides nothing."""

    def __init__(self):
        self.steps, self.events = [], []
        self.forward_passes = self.sampled = self.waited = 0  # waited: steps between drawing and release, summed
        self.started = time.perf_counter()

    def step(self, index, token, score, alarm, draw, matched, committed):
        record = dict(index=index, token=token, score=score, alarm=alarm is not None, draw=draw)
        if alarm and alarm != "score":
            record["failed"] = alarm  # the detector could not score: an alarm, said in the trace
        if matched:
            record["matched"] = matched
        record["committed"] = committed
        self.steps.append(record)

    def event(self, kind, **details):  # in the latest step (or, where no token was fed, the one before)
        self.events.append(dict(type=kind, **details, step=self.sampled - 1))

    def released(self, born):  # tokens drawn at steps `born` are released now
        self.waited += sum(self.sampled - step for step in born)

