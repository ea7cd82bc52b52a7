"""What the core checks of its inputs, with no file, network or command line in sight: the error a bad
input raises (a ValueError; the command lines print it on one line and exit 2), and the checks the
loop, the policies and the detectors share: numbers, settings, the detector's levels, a prompt against
the model's context; and the timeout put around a function of the user's (a text detector, a judge).
The core (model, sampling, checks, policy, the detectors' scoring, the loop) imports only torch and
the standard library; the shell (cli, checkpoints, detector_files, fitting, the command lines) imports it.
"""
import math
import threading


# Thresholds and safe levels live in [LOWEST, 1 - LOWEST]: a logit of at most ~13.8 either way, so
# every one is a representable number whose logit, sigmoid and distance to the next are finite.
LOWEST = 1e-6


class UserError(ValueError):
    """A problem with the user's input or files: a ValueError to a caller of the library; the command
    lines print it on one line and exit 2."""


def refuse_first(problems, names=None):
    """Raise a UserError for the first (name, good, message) whose `good` is false; the message's {}
    is the name, or what `names` calls it (a command line passes its flags)."""
    for name, good, message in problems:
        if not good:
            raise UserError(message.format((names or {}).get(name, name)))


def finite_number(value):
    """A real number (not a bool, a string or None) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def printable(text):
    """Text that can be written as UTF-8: a lone surrogate (JSON can hold "\\ud800") cannot be."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def good_threshold(threshold):
    """A threshold that can alarm and can stay quiet: a number in (0, 1) (NaN or above 1 never alarms)."""
    return finite_number(threshold) and 0 < threshold < 1


def good_safe_level(safe_level, threshold):
    """A safe level in (0, threshold]: above the threshold, text an alarm should take back is shown."""
    return finite_number(safe_level) and 0 < safe_level <= threshold


def check_detector(detector, safe_level=None):
    """A detector's levels, checked once before a generation starts (its class named): the threshold a
    number in (0, 1), the safe level None or in (0, threshold], and a settings' safe level (which
    overrides the detector's) no higher than the threshold. A threshold of NaN or above 1 would never
    alarm: the detector would fail open."""
    if detector is None:
        return
    name = type(detector).__name__
    threshold = getattr(detector, "threshold", None)
    if not good_threshold(threshold):
        raise UserError(f"{name}: threshold must be a number in (0, 1), not {threshold!r}; with it the detector "
                        "could never (or would always) alarm")
    own = getattr(detector, "safe_level", None)
    if own is not None and not good_safe_level(own, threshold):
        raise UserError(f"{name}: safe_level must be None or a number in (0, threshold {threshold:g}], not {own!r}")
    if safe_level is not None and safe_level > threshold:
        raise UserError(f"the safe level {safe_level:g} is above {name}'s threshold {threshold:g}: every text that "
                        "does not alarm would be shown at once; give one at most the threshold")


def check_probability(value, name, where):
    """A threshold or safe level: a number in [LOWEST, 1 - LOWEST]; a bool, string, null or NaN is refused."""
    if not (finite_number(value) and LOWEST <= value <= 1 - LOWEST):
        raise UserError(f"{where}: {name} must be a probability between {LOWEST:g} and 1 - {LOWEST:g}, not {value!r}")
    return float(value)


MAX_PADDING = 128


def check_tokenizer(enc, model):
    """A tokenizer belongs to a model when their vocabularies are the same size, or the model's is
    padded past it by less than MAX_PADDING ids (which are then never sampled)."""
    n_vocab, size = getattr(enc, "n_vocab", None), model.config.vocab_size
    if n_vocab and not 0 <= size - n_vocab < MAX_PADDING:
        raise UserError(f"the tokenizer has {n_vocab} tokens but the model {'only ' * (size < n_vocab)}{size}: they do "
                        "not belong together; "
                        "load the tokenizer files of this checkpoint")


def encode_prompt(enc, prompt, model, settings, names=None):
    """A prompt (text or token ids) as token ids that fit the context beside max_new_tokens."""
    check_tokenizer(enc, model)
    if isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        if not all(type(t) is int and 0 <= t < model.config.vocab_size for t in ids):  # True is no token
            raise UserError(f"prompt token ids must be integers in [0, {model.config.vocab_size})")
    elif isinstance(prompt, str):
        if not printable(prompt):
            raise UserError("the prompt holds a lone surrogate (such as \\ud800): it is not valid Unicode text")
        if len(prompt) > 64 * model.config.n_positions:  # no tokenizer makes that few tokens of so many characters
            raise UserError(f"the prompt has {len(prompt):,} characters, far more than the model's context of "
                            f"{model.config.n_positions} tokens; shorten it")
        ids = enc.encode_ordinary(prompt) if prompt.strip() else []
    else:
        raise UserError(f"a prompt must be text or a list of token ids, not {type(prompt).__name__}")
    if not ids:
        raise UserError("the prompt is empty; give some text")
    flag = (names or {}).get("max_new_tokens", "max_new_tokens")
    room = model.config.n_positions - settings.max_new_tokens
    if room < 1:
        raise UserError(f"{flag} {settings.max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {model.config.n_positions}; ask for at most {model.config.n_positions - 1}")
    if len(ids) > room:
        raise UserError(f"the prompt has {len(ids)} tokens, but the context of {model.config.n_positions} "
                        f"leaves room for {room} beside {settings.max_new_tokens} new tokens; shorten it or lower {flag}")
    return ids


def check_settings(s, names=None):
    """Refuse the first setting of a backtrack.Settings out of range with a UserError; `names` maps
    field names to what the caller calls them (the command line passes its flags)."""
    def whole(value, low):
        return type(value) is int and value >= low
    problems = [
        ("max_new_tokens", whole(s.max_new_tokens, 1), "{} must be >= 1 (an integer)"),
        # far above 100 the scaled logits are all but equal, and at 1e300 they underflow to no numbers at all
        ("temperature", finite_number(s.temperature) and 0 <= s.temperature <= 100, "{} must be in [0, 100]"),
        ("top_k", whole(s.top_k, 0), "{} must be >= 0 (an integer)"),
        ("top_p", finite_number(s.top_p) and 0 < s.top_p <= 1, "{} must be in (0, 1]"),
        ("buffer", whole(s.buffer, 0), "{} must be >= 0 (an integer)"),
        ("introspect", s.introspect in ("none", "template", "critique"), "{} must be none, template or critique"),
        ("template", s.introspect != "template" or (isinstance(s.template, str) and s.template.strip()),
         "{} must be some text for introspect template"),
        ("max_retries", whole(s.max_retries, 0), "{} must be >= 0 (an integer)"),
        ("max_rollbacks", whole(s.max_rollbacks, 0), "{} must be >= 0 (an integer)"),
        ("seed", whole(s.seed, 0) and s.seed < 2**63, "{} must be in [0, 2**63) (an integer)"),
        ("safe_level", s.safe_level is None or (finite_number(s.safe_level) and LOWEST <= s.safe_level <= 1),
         f"{{}} must be in [{LOWEST:g}, 1]"),
        ("policy", callable(getattr(s.policy, "redraws", None)), "{} must be a policy (policy.Tuned or Classic)"),
    ]
    refuse_first(problems, names)
    s.policy.check(names)


def checked_levels(levels, policy, detector):
    """The levels a generation will use, checked where they are used: start() may have changed the
    detector's, and a policy of the user's may return anything. A threshold that is not a number in
    (0, 1) would never (or always) alarm, a safe level above it would show text an alarm should take
    back: refused before the first token is drawn."""
    who = f"{type(policy).__name__}.levels() after {type(detector).__name__}.start()"
    threshold, safe_level = getattr(levels, "threshold", None), getattr(levels, "safe_level", None)
    redraw_level = getattr(levels, "redraw_level", None)
    if not good_threshold(threshold):
        raise UserError(f"{who} gave the threshold {threshold!r}: it must be a number in (0, 1), or the detector "
                        "could never (or would always) alarm")
    if not good_safe_level(safe_level, threshold):
        raise UserError(f"{who} gave the safe level {safe_level!r}: it must be a number in (0, threshold "
                        f"{threshold:g}], or text an alarm should take back would be shown")
    if redraw_level is not None and not (finite_number(redraw_level) and safe_level <= redraw_level <= threshold):
        raise UserError(f"{who} gave the redraw level {redraw_level!r}: it must be None or between the safe level "
                        f"{safe_level:g} and the threshold {threshold:g}")
    return levels


def in_thread(fn, *args):
    """fn(*args) started in a daemon thread of its own: (the thread, a list that will hold (result,
    None) or (None, the exception it raised), SystemExit included, once it is done)."""
    outcome = []

    def run():
        try:
            outcome.append((fn(*args), None))
        except BaseException as e:  # the caller says whose failure it is; SystemExit too, not a silent wait
            outcome.append((None, e))
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, outcome


def within(seconds, fn, *args):
    """fn(*args) under a timeout: (True, result, None), (True, None, the exception it raised), or
    (False, None, None) when it has not returned within `seconds` (a thread cannot be stopped: it is
    a daemon, left behind, and the caller gives up on it)."""
    worker, outcome = in_thread(fn, *args)
    worker.join(seconds)
    return (True, *outcome[0]) if outcome else (False, None, None)
