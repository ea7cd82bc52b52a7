"""Detectors: how unsafe is the text the model has written so far?

Every detector is a Detector (the protocol below), which the decoding loop (backtrack.py) calls once
per token: read() takes what the detector needs from the hidden states of the forward pass that fed
the token (model.GPT.forward), for every row of a batch at once, and score() turns one row's reading
into P(unsafe). A probe's reading is one dot product. Per-token state lives in a History, whose
rollback moves a pointer, like the KV cache.

The detectors:
- LinearProbe: logistic regression on hidden states (one or more layers side by side), mean-pooled
  over the newest `window` generated tokens. Fitted by fitting.py: once per model through
  fitting.default_detector(), or from the command line with train_probe.py; its file is read and
  written by detector_files.py, as are the word lists.
- KeywordDetector: a word list matched on the decoded text, across token boundaries.
- ProbeAndKeywords: both; an alarm when either fires (the default of backtrack.py).
- TextDetector: any text -> probability function (an external guard model, as in CARE).
"""
import codecs
import copy
import numbers
from typing import Protocol, runtime_checkable

import torch

from checks import LOWEST, UserError, check_probability, finite_number, within
from policy import logit, shifted, sigmoid


@runtime_checkable
class Detector(Protocol):
    """What the decoding loop calls. Every detector here and the tests' scripted ones derive from it,
    and so inherit read()'s default; each row of a batch gets its own clone(). The contract, checked
    by behaviour (test_scorer): after a rollback a detector scores as a fresh one would."""

    threshold: float  # a score >= threshold is an alarm; so is a score that is not a number in [0, 1]
    safe_level: float | None = None  # text is shown only up to a token scored below it; None: the threshold
    matched: str | None = None  # the listed word the newest token completed (word lists); None otherwise

    def start(self, prompt_ids, hidden):
        """A new generation after this prompt (hidden: the prompt's hidden states, a (T, C) tensor per
        layer). The prompt is never judged as text the model wrote, but a detector may say how unsafe it
        is (a number, or None): a policy may be more vigilant after a prompt it flags."""

    def read(self, states):
        """What score() needs of each row's newest token, from a (rows, n_layer + 1, C) tensor of their
        hidden states: one reading per row, taken for every row at once (on a GPU, reading row by row
        would cost more than the loop's other work). Stateless. By default each row's own states, on
        the CPU."""
        return list(states.cpu())

    def score(self, token, reading):
        """P(unsafe) of the generated text so far, once per new token, from that token's reading."""

    def rollback(self, n):
        """Forget all but the first n generated tokens."""

    def clone(self):
        """The same detector with its own per-token state (one per row of a batch)."""


class TextOnly(Detector):
    """A detector of the decoded text alone: it reads nothing of the hidden states."""

    def read(self, states):
        return [None] * len(states)


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


# ----------------------------------------------------------------------------------------------


class LinearProbe(Detector):
    """sigmoid(w . mean(h over the newest `window` generated tokens) + b), where h is the hidden
    states of `layers` side by side (weight holds one row per layer).

    Because the probe is linear, mean-pooling the hidden states and then projecting equals
    projecting each token once and averaging the projections: the per-token state is one number.
    Only generated tokens are pooled, so a toxic prompt does not raise the score by itself.
    `safe_level` (at most the threshold): the loop shows text only up to where the score was below it.
    """

    matched = None

    def __init__(self, weight, bias, layers, window, threshold, safe_level=None, meta=None):
        self.layers = [layers] if isinstance(layers, int) else list(layers)
        self.weight = torch.as_tensor(weight, dtype=torch.float32).reshape(len(self.layers), -1)
        self.bias, self.window, self.threshold = float(bias), int(window), float(threshold)
        self.safe_level = self.threshold if safe_level is None else float(safe_level)
        self.meta = meta or {}
        self.projections = History()
        self.spread = None  # the weight over every hidden state, laid out by read()

    def start(self, prompt_ids, hidden=None):
        """Forget the last generation; the prompt's score is its own highest windowed score, as if
        the model had written it, over the windows after its first token (None without its hidden
        states or such a window). The first token's states are unlike any other's (with nothing
        before it to attend to, it draws all of the attention: the "attention sink"); scored, they flag
        far more harmless prompts (docs/history.md has the measurement)."""
        self.projections.rollback(0)
        if hidden is None or len(prompt_ids) <= self.window:
            return None
        h = torch.stack([hidden[layer].reshape(-1, self.weight.shape[1]) for layer in self.layers])  # (L, T, C)
        projections = (h.float() * self.weight.to(h.device)[:, None]).sum((0, 2)).tolist()
        return max(sigmoid(sum(window) / len(window) + self.bias)
                   for window in (projections[t - self.window + 1:t + 1] for t in range(self.window, len(projections))))

    def read(self, states):
        """w . h of every row's newest token, in one product on the states' device: the weight is spread
        over every hidden state (zeros where the probe reads none), so a token costs one dot product."""
        if self.spread is None or self.spread.shape != states.shape[1:] or self.spread.device != states.device:
            self.spread = torch.zeros(states.shape[1:], device=states.device)
            self.spread[self.layers] = self.weight.to(states.device)
        return (states.flatten(1).float() @ self.spread.reshape(-1)).tolist()

    def score(self, token, reading):
        self.projections.append(reading)
        recent = self.projections.last(self.window)
        return sigmoid(sum(recent) / len(recent) + self.bias)

    def rollback(self, n):
        self.projections.rollback(n)

    def clone(self):
        """The same probe with its own per-token state (one per row of a batch)."""
        return LinearProbe(self.weight, self.bias, self.layers, self.window, self.threshold, self.safe_level, self.meta)

    def logit(self, p=None):
        """The threshold (or p) as a logit: where w . mean(h) + b crosses it."""
        return logit(self.threshold if p is None else p)

    def with_threshold(self, threshold=None, at_logit=None):
        """A copy alarming at `threshold` (a probability) or at the logit `at_logit`; the safe level keeps
        its distance in logits below the threshold (never below LOWEST)."""
        threshold = threshold if at_logit is None else sigmoid(at_logit)
        threshold = check_probability(threshold, "threshold", "with_threshold")
        gap = self.logit() - self.logit(self.safe_level)
        safe_level = max(LOWEST, shifted(threshold, -gap))
        return LinearProbe(self.weight, self.bias, self.layers, self.window, threshold, min(safe_level, threshold),
                           self.meta)


# ----------------------------------------------------------------------------------------------


WORD_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")  # what a word boundary is not


class Terms:
    """A word list, indexed to find its terms in lowercased text: each match has a word boundary before
    it and after it (the end of the text counts), the longest term wins at a position, and matches are
    found left to right without overlapping: what the pattern (?<![a-z0-9])(?:term|term|...)(?![a-z0-9])
    with the terms longest first finds (tested), without compiling it: a large list compiles into one
    pattern for minutes, an index is ready at once."""

    def __init__(self, terms):
        self.words = set(terms)
        lengths = {}
        for term in self.words:
            lengths.setdefault(term[0], set()).add(len(term))
        self.lengths = {first: sorted(ks, reverse=True) for first, ks in lengths.items()}  # by first character
        self.longest = max(map(len, self.words))

    def matches(self, text):
        """(start, end, term) of every match in `text`, left to right."""
        pos = 0
        while pos < len(text):
            found = None
            if pos == 0 or text[pos - 1] not in WORD_CHARACTERS:
                found = next((text[pos:pos + k] for k in self.lengths.get(text[pos], ()) if pos + k <= len(text)
                              and text[pos:pos + k] in self.words and text[pos + k:pos + k + 1] not in WORD_CHARACTERS
                              ), None)
            if found:
                yield pos, pos + len(found), found
                pos += len(found)
            else:
                pos += 1


class KeywordDetector(TextOnly):
    """Fires (score 1.0) when a listed word or phrase ends in the newest token's text.

    The generated tokens are decoded together, so a word split across tokens (" f" + "uck") is
    caught at the token that completes it. A match needs a word boundary before it; after it, the
    end of the text counts as a boundary, since the next token may never come ("ass" fires before
    we know whether "assistant" follows: a cautious detector).
    """

    safe_level = None

    def __init__(self, terms, tokenizer, threshold=0.5):
        self.tokenizer, self.threshold = tokenizer, threshold
        self.terms = Terms(terms)
        # the recent tokens that hold the longest term and the character before it: a lowercased term
        # of k characters comes from at most k characters of at most 4 bytes, and a token holds one
        # byte or more (a byte-level BPE splits an emoji or a CJK word into byte tokens)
        self.window = 4 * (self.terms.longest + 1)
        self.pieces = History()  # the bytes of each generated token
        self.matched = None  # the listed term the newest token completed, if any (traces show it)

    def start(self, prompt_ids, hidden=None):
        """Forget the last generation; the prompt's score is 1.0 when it holds a listed word."""
        self.pieces.rollback(0)
        text = b"".join(self.tokenizer.decode_single_token_bytes(t) for t in prompt_ids)
        return 1.0 if next(self.terms.matches(text.decode("utf-8", errors="replace").lower()), None) else 0.0

    def score(self, token, reading=None):
        self.pieces.append(self.tokenizer.decode_single_token_bytes(token))
        recent = self.pieces.last(self.window)
        # the text before the newest token, up to its last whole character: a character that the
        # newest token completes (the last bytes of an emoji) is new, so a term ending in it is too
        before = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(b"".join(recent[:-1])).lower()
        text = b"".join(recent).decode("utf-8", errors="replace").lower()
        # only a match that ends inside the newest token's text is new
        self.matched = next((term for _, end, term in self.terms.matches(text) if end > len(before)), None)
        return 1.0 if self.matched else 0.0

    def rollback(self, n):
        self.pieces.rollback(n)

    def clone(self):
        twin = copy.copy(self)
        twin.pieces = History()
        return twin


class TextDetector(TextOnly):
    """Wraps any text -> P(unsafe) function; it sees the whole generated text (never the prompt). The
    function is called under a guard that names it: an exception, or no answer within `timeout`
    seconds, stops the run with one line; an answer that is not a number is NaN, an alarm."""

    def __init__(self, fn, tokenizer, threshold=0.5, timeout=60.0):
        if not (finite_number(timeout) and 0 < timeout <= 3600):
            raise UserError(f"TextDetector: timeout must be a number of seconds in (0, 3600], not {timeout!r}")
        self.fn, self.tokenizer, self.threshold, self.timeout = fn, tokenizer, threshold, float(timeout)
        self.tokens = History()

    def start(self, prompt_ids, hidden=None):
        """Forget the last generation; the prompt's score is the function's verdict on it."""
        self.tokens.rollback(0)
        return self.ask(self.tokenizer.decode(list(prompt_ids)))

    def score(self, token, reading=None):
        self.tokens.append(token)
        return self.ask(self.tokenizer.decode(self.tokens.all()))

    def ask(self, text):
        done, value, error = within(self.timeout, self.fn, text)
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        if not done:
            raise UserError(f"TextDetector: its function {name} gave no answer within {self.timeout:g} s; fix it, "
                            "or give it a longer timeout")
        if error is not None:
            raise UserError(f"TextDetector: its function {name} failed ({type(error).__name__}: {error}); fix it")
        # not a number (a string such as "0.0", a bool, None): NaN, an alarm the loop names, never text let through
        return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else float("nan")

    def rollback(self, n):
        self.tokens.rollback(n)

    def clone(self):
        return TextDetector(self.fn, self.tokenizer, self.threshold, self.timeout)


class ProbeAndKeywords(Detector):
    """A probe and a word list together: an alarm when either fires. The score is the probe's, or 1.0
    when the newest token completes a listed word; the probe's threshold and safe level apply."""

    def __init__(self, probe, keywords):
        self.probe, self.keywords = probe, keywords
        self.threshold, self.safe_level = probe.threshold, probe.safe_level

    def start(self, prompt_ids, hidden=None):
        """Both start; the prompt's score is 1.0 when it holds a listed word, else the probe's."""
        probe_score = self.probe.start(prompt_ids, hidden)
        return 1.0 if self.keywords.start(prompt_ids) else probe_score

    def read(self, states):
        return self.probe.read(states)

    def score(self, token, reading):
        probe_score = self.probe.score(token, reading)
        return 1.0 if self.keywords.score(token) else probe_score

    @property
    def matched(self):
        return self.keywords.matched

    def rollback(self, n):
        self.probe.rollback(n)
        self.keywords.rollback(n)

    def clone(self):
        return ProbeAndKeywords(self.probe.clone(), self.keywords.clone())
