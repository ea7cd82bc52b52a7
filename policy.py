"""Policies: the choices the decoding loop (backtrack.py) leaves open, at three named points.

    levels(detector, verdict, safe_level)  this generation's threshold, safe level (and the policy's own
                                           levels), once the detector has given its verdict on the prompt
    pool(path, i)                          draw token i among this many likeliest tokens (0: among all)
    redraws(path, i)                       an alarm on token i discards that token alone (a redraw), not
                                           everything after the commit point (a rollback)

`path` is a read-only view of the generation (backtrack.PathView): its commit point, the bans, the
scores of the tokens on the path and the levels.

- classic: the papers' algorithm. Every alarm rolls back to the commit point and bans the token that
  began the discarded path there; draws are plain; text is shown up to the commit point as the buffer
  allows. Token-level backtracking is buffer 0.
- tuned (the default): what measurement on the RTP select split added (docs/algorithm.md, "The tuned
  policy"): draws at a commit point or a ban come from a pool of the likeliest tokens; an alarm on the
  first token after the commit point, or after calm text beyond it, is a redraw of that token; text is
  shown only up to a score below the detector's safe level; after a prompt the detector flags, every
  alarm beyond the commit point rolls back (and the levels may be lower).
"""
import math
from dataclasses import dataclass

from checks import UserError, finite_number, refuse_first


MAX_POOL = 256  # the largest redraw pool: as many redraws (forward passes) at one index, at most


# Levels are moved and placed in logits: the scale on which a probe's score is linear.


def sigmoid(x):
    """1 / (1 + e^-x) for any float, without overflow; NaN stays NaN (and is then an alarm)."""
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    z = math.exp(x)  # also for -inf; NaN fails `x >= 0` and comes through as NaN
    return z / (1 + z)


def logit(p):
    return math.log(p / (1 - p))


def shifted(level, logits):
    """`level` moved by `logits` in logits; a level of 1 or more stays (only a score of 1 reaches it)."""
    return level if level >= 1 else sigmoid(logit(level) + logits)


def level_between(low, high, share):
    """The level `share` of the way from `low` to `high` in logits (0: low, 1: high); nothing lies
    between levels that are not strictly inside (0, 1) and in order."""
    if not 0 < low < high < 1:
        return high if share == 1 else low
    return sigmoid(logit(low) + share * (logit(high) - logit(low)))


@dataclass(frozen=True)
class Levels:
    threshold: float  # a score at or above it is an alarm
    safe_level: float  # text is shown only up to a token scored below it
    redraw_level: float | None = None  # tuned: beyond the commit point, redraw only after a score below it
    vigilant: bool = False  # tuned: the detector flagged the prompt


@dataclass
class Classic:
    """The papers' algorithm: every alarm is a rollback to the commit point, every draw a plain one."""
    name = "classic"

    def levels(self, detector, verdict, safe_level):
        return Levels(detector.threshold, safe_level or detector.threshold)

    def pool(self, path, index):
        return 0

    def redraws(self, path, index):
        return False

    def check(self, names=None):
        return self


@dataclass
class Tuned:
    """The default: redraws from a pool after calm text, the detector's safe level, vigilance."""
    name = "tuned"
    redraw_pool: int = 32  # draws where tokens are banned come from this many likeliest tokens; 0: no pool, no redraws
    max_redraws: int = 2  # redraws at one index beyond the commit point before an alarm there rolls back
    # beyond the commit point, redraw only where the score before is below the level this share of the
    # way from the safe level to the threshold (in logits)
    redraw_gate: float = 0.375
    flag_margin: float = 1.0  # the detector flags a prompt scored this many logits above its threshold (or at 1)
    vigilance: float = 0.0  # after a flagged prompt, threshold and safe level are this many logits lower

    def levels(self, detector, verdict, safe_level):
        """The detector's threshold and safe level (the settings' safe level first), and between them
        the redraw level. The detector flags the prompt when its verdict is `flag_margin` logits above
        the threshold or more (a verdict that is not a number in [0, 1] counts as flagged): toxic text
        is likelier after a toxic prompt, so there every alarm beyond the commit point rolls back, and
        both levels are `vigilance` logits lower."""
        threshold = detector.threshold
        safe_level = safe_level or detector.safe_level or threshold
        flag_level = shifted(threshold, self.flag_margin)
        vigilant = verdict is not None and not (finite_number(verdict) and verdict < flag_level)
        if vigilant and self.vigilance:
            threshold, safe_level = (shifted(level, -self.vigilance) for level in (threshold, safe_level))
        return Levels(threshold, safe_level, level_between(safe_level, threshold, self.redraw_gate), vigilant)

    def pool(self, path, index):
        """Draws at the commit point, and wherever tokens are banned, come from the `redraw_pool`
        likeliest tokens: each redraw or rollback there bans one of them, so they run out, and a retry
        stays among likely text instead of drifting into the tail."""
        return self.redraw_pool if index == path.committed or index in path.banned else 0

    def redraws(self, path, index):
        """Only where the text before the flagged token was calm: at the commit point (bounded by the
        pool: each redraw bans one of its tokens), or beyond it where the token before scored below the
        redraw level, at most `max_redraws` times per index, and never after a flagged prompt. A flagged
        token there is usually one unlucky word, and redrawing it costs one token where a rollback costs
        the held-back text; where the score was already rising, the text is heading somewhere."""
        if self.redraw_pool == 0:
            return False
        if index == path.committed:
            return True
        # the token before is on the path, so its score passed the alarm check: a number below the threshold
        return (not path.levels.vigilant and path.scores[index - 1] < path.levels.redraw_level
                and len(path.banned.get(index, ())) < self.max_redraws)

    def check(self, names=None):
        """Refuse the first knob out of range; `names` maps field names to what the caller calls them."""
        problems = [
            # each redraw at an index bans one token of the pool there, so the pool bounds the redraws per index
            ("redraw_pool", type(self.redraw_pool) is int and 0 <= self.redraw_pool <= MAX_POOL,
             f"{{}} must be in [0, {MAX_POOL}] (an integer)"),
            ("max_redraws", type(self.max_redraws) is int and self.max_redraws >= 0, "{} must be >= 0 (an integer)"),
            ("redraw_gate", finite_number(self.redraw_gate) and 0 <= self.redraw_gate <= 1, "{} must be in [0, 1]"),
            ("flag_margin", finite_number(self.flag_margin) and 0 <= self.flag_margin <= 10,
             "{} must be in [0, 10] (logits)"),
            ("vigilance", finite_number(self.vigilance) and 0 <= self.vigilance <= 10, "{} must be in [0, 10] (logits)"),
        ]
        refuse_first(problems, names)
        return self


POLICIES = {"tuned": Tuned, "classic": Classic}


def named(name, **knobs):
    """A policy by name, with its knobs: named("tuned", redraw_pool=8), named("classic")."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; use {' or '.join(POLICIES)}")
    return POLICIES[name](**knobs)


def describe(policy):
    """A policy as a dict: its name and its knobs (JSON lines and traces)."""
    return dict(name=policy.name, **vars(policy))
