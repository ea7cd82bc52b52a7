"""Showing why a generation backtracked: a text trace for the terminal, a one-line note after streamed
text, JSON lines and a self-contained HTML page.

    python backtrack.py --model-dir ../shared/models/minigpt2 --prompt "You are such a" --trace
    python backtrack.py --model-dir ../shared/models/minigpt2 --prompt "You are such a" --html run.html

Each reads a backtrack.Result: its steps (every sampled token with its score, and how much text was
released after it) and its events (redraws, rollbacks, introspection notes, fallbacks).
"""
import codecs
import hashlib
import html
import math
import re
from dataclasses import asdict as as_dict

from cli import write_output
from detector_files import probe_text
from policy import describe
from scorer import LinearProbe

# Bytes that are not (yet) a whole UTF-8 character are shown as the trace shows them, "<bytes e2 80>", never as
# U+FFFD: GPT-2's byte-level tokens split characters, and a discarded span or the end of a run may stop mid-character.
codecs.register_error("backtrack.bytes", lambda e: (f"<bytes {e.object[e.start:e.end].hex(' ')}>", e.end))


# What a terminal or a page would act on rather than show: control characters (ESC starts sequences that set
# the window title or clear the screen; NUL) and bidirectional overrides (U+202E reverses what follows). Shown
# as escapes; newline and tab stay. --json stays exact.
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def visible(text):
    """Text with every character a terminal or a browser would act on shown as its escape (\\x1b)."""
    return UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def token_text(enc, token):
    """A token as a reader can see it: its text, or its bytes and id when it holds part of a character
    (GPT-2's byte-level tokens split multi-byte characters)."""
    data = enc.decode_single_token_bytes(token)
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return f"<bytes {data.hex(' ')} #{token}>"


def readable(enc, tokens, fallback=""):
    """The text of `tokens` for a page, with partial characters as <bytes ..>; `fallback` where none are recorded."""
    if tokens is None:
        return fallback
    return b"".join(enc.decode_single_token_bytes(t) for t in tokens).decode("utf-8", errors="backtrack.bytes")


def plural(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def print_trace(prompt, result, enc, settings, colour, out):
    """Every sampled token with its score, each rollback with what it discarded and banned (and the
    listed word that fired, for a word list), each redraw, each release of text to the reader, and
    why text is held back while it is."""
    threshold, safe_level = result.threshold, result.safe_level
    red, green, dim, off = ("\033[31m", "\033[32m", "\033[2m", "\033[0m") if colour else ("",) * 4
    print(f"prompt: {prompt!r}", file=out)
    flagged = ""
    if result.stats.get("vigilant"):
        vigilance = getattr(settings.policy, "vigilance", 0)
        lower = f", levels {vigilance:g} logits lower" if vigilance else ""
        flagged = f" (the detector flagged the prompt: every alarm beyond the commit point rolls back{lower})"
    watch = ("no detector" if threshold is None else f"alarm at score >= {threshold:.4g}; shown only up to a score "
             f"below the safe level {safe_level:.4g}{flagged}")
    retries = f"{settings.max_retries} retr{'y' if settings.max_retries == 1 else 'ies'}"
    policy = (f"redraw pool {settings.policy.redraw_pool}" if settings.policy.name == "tuned" else
              f"{settings.policy.name} policy")
    print(f"{dim}{watch}; buffer {settings.buffer}, {policy}, {retries} per point, "
          f"introspect {settings.introspect}, seed {settings.seed}{off}", file=out)
    print(f"{dim}step index token                     score{off}", file=out)
    events_after, released, held_note = {}, 0, None
    for e in result.events:
        events_after.setdefault(e["step"], []).append(e)
    scores = {}  # the score of each token index on the current path
    for n, step in enumerate(result.steps):
        scores = {i: s for i, s in scores.items() if i < step["index"]}
        scores[step["index"]] = step["score"]
        score = "" if step["score"] is None else f"{step['score']:.3f}"
        why = (f" ({step['failed']})" if step.get("failed") else
               f" ({step['matched']!r} is listed)" if step.get("matched") else "")
        mark = f"{red}ALARM{why}{off}" if step["alarm"] else ""
        print(f"{n:4d} {step['index']:5d} {token_text(enc, step['token']):24} {score:>6} {mark}", file=out)
        for e in events_after.get(n, []):
            print(event_line(e, enc, red, dim, off), file=out)
        committed = step.get("committed", released)
        if committed > released:
            shown = enc.decode(result.tokens[released:committed])
            print(f"           {green}released: {shown!r}{off}", file=out)
            released, held_note = committed, None
        elif not step["alarm"] and safe_level is not None and step["index"] + 1 - settings.buffer > committed:
            last = step["index"] - settings.buffer  # the newest token old enough to be shown
            note = (f"held back from index {committed}: the score at index {last} ({scores[last]:.3f}) "
                    "is not below the safe level")
            if note != held_note:
                print(f"           {dim}{note}{off}", file=out)
                held_note = note
    st = result.stats
    print(f"{green}final:{off} {result.text!r}", file=out)
    print(f"[{st['tokens_kept']} kept / {st['tokens_generated']} sampled, {plural(st['redraws'], 'redraw')}, "
          f"{plural(st['rollbacks'], 'rollback')}, "
          f"{st['tokens_per_second']:.1f} tokens/s, stop: {result.stop_reason}]\n", file=out)


def event_line(e, enc, red, dim, off):
    if e["type"] in ("rollback", "redraw"):
        where = "rollback to" if e["type"] == "rollback" else "redraw at"
        return (f"           {red}{where} index {e['index']}: discarded {e['discarded']!r}, "
                f"banned {token_text(enc, e['banned'])} there{off}")
    if e["type"] == "introspection":
        return f"           {dim}introspection note at index {e['index']} (hidden): {e['note']!r}{off}"
    return f"           {red}fallback at index {e['index']}: {e['reason']}; stopped{off}"


STOPPED = {"retry budget spent at this point": "the retries at one point ran out (--max-retries)",
           "total rollback budget spent": "the rollback budget ran out (--max-rollbacks)"}


def steering_note(result):
    """One line for a streamed run that backtracked: how often, and why it stopped early if it did."""
    line = plural(result.stats["rollbacks"], "rollback")
    if result.stats["redraws"]:
        line = f"{plural(result.stats['redraws'], 'redraw')}, {line}"
    fallbacks = [e for e in result.events if e["type"] == "fallback"]
    if fallbacks:
        line += f"; stopped: {STOPPED.get(fallbacks[-1]['reason'], fallbacks[-1]['reason'])}"
    return f"[{line}]"


def json_record(prompt, result, enc, settings, source=None):
    """The JSON line of one run: the result, with each step's token decoded, and what produced it (the
    settings, and `source`: the model, its fingerprint and the detector). A score that is not a number
    (the detector failed; the step's "failed" says how) is null: JSON has no NaN."""
    record = dict(prompt=prompt, **as_dict(result), settings=dict(as_dict(settings), policy=describe(settings.policy)),
                  **({"source": source} if source else {}))
    for step in record["steps"]:
        step["text"] = enc.decode([step["token"]])
    return numbers_or_null(record)


def source_of(model, model_name, detector, kind):
    """What produced a run, for its JSON line: the model as named and its weights' fingerprint, the
    detector's kind and, for a probe, the start of the sha256 of its probe file's text (what the
    cache's .sha256 beside the probe holds in full)."""
    probe = getattr(detector, "probe", detector)
    digest = hashlib.sha256(probe_text(probe).encode()).hexdigest()[:16] if isinstance(probe, LinearProbe) else None
    return dict(model=model_name, fingerprint=getattr(model, "fingerprint", None), detector=kind or None, probe=digest)


def numbers_or_null(value):
    """`value` with every float that is not finite replaced by None, at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: numbers_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [numbers_or_null(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# The page


def write_html(path, runs, inputs=()):
    """One self-contained page (no scripts, no downloads) for a list of (heading, prompt, result,
    tokenizer): per run, the text the reader saw (each token tinted by its score; id and score on
    hover), every discarded attempt struck through where it was tried and numbered, a table of the
    attempts (what fired, what was banned, what followed), notes, fallbacks, and a chart of the scores
    against the threshold and the safe level."""
    sections = [run_html(heading, prompt, result, enc) for heading, prompt, result, enc in runs]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>backtrack trace</title>
<style>
body {{ font: 15px/1.6 system-ui, sans-serif; max-width: 52em; margin: 2em auto; color: #222; }}
h2 {{ font-size: 17px; margin: 2em 0 .3em; border-top: 1px solid #ddd; padding-top: .6em; }}
.prompt {{ color: #777; }} .text {{ white-space: pre-wrap; }} .text span.token:hover {{ outline: 1px solid #999; }}
del {{ color: #b00; background: #fee; margin: 0 .15em; padding: 0 .1em; border-left: 2px solid #b00; }}
del sup {{ text-decoration: none; display: inline-block; font-weight: bold; margin-right: .2em; }}
ins.note {{ color: #555; background: #eef; text-decoration: none; font-style: italic; }}
.fallback {{ color: #fff; background: #b00; padding: 0 .3em; }}
table {{ border-collapse: collapse; font-size: 13px; margin: .3em 0; }}
th, td {{ border: 1px solid #ddd; padding: .1em .5em; text-align: left; vertical-align: top; }}
td.discarded {{ color: #b00; white-space: pre-wrap; }}
svg {{ display: block; margin: .5em 0 1em; font: 11px system-ui, sans-serif; }}
.legend {{ color: #777; font-size: 13px; }}
</style></head><body>
<h1>backtrack trace</h1>
<p class="legend">Grey: the prompt. Black: what the reader saw, each token tinted by the detector's score
(white at 0, darkest at the alarm threshold; hover a token for its id and score). <del><sup>1</sup>Struck
through and numbered</del>: an attempt the detector rejected, shown where it was tried and never shown to
the reader; the table under the text says, for each, what fired, what was banned and what followed.
<ins class="note">Italic</ins>: an introspection note in the hidden context. The chart is the detector's
score at every sampled token against the alarm threshold (red dashes) and the safe level (grey dashes):
text is shown only up to a token scored below the safe level; red dots are alarms.</p>
{"".join(sections)}
</body></html>
"""
    write_output(path, page, "--html", inputs)


def run_html(heading, prompt, result, enc):
    tried = {}  # token index -> what was tried and discarded there (and notes, fallbacks), in order
    for e in result.events:
        tried.setdefault(e["index"], []).append(e)
    steps_of = {e["step"]: result.steps[e["step"]] for e in result.events if 0 <= e["step"] < len(result.steps)}
    decoder = codecs.getincrementaldecoder("utf-8")(errors="backtrack.bytes")  # characters split across tokens join
    parts = [f'<span class="prompt">{html.escape(visible(prompt))}</span>']
    attempts = []  # one table row per discarded attempt, numbered as in the text
    for i in range(len(result.tokens) + 1):
        for e in tried.get(i, []):
            if e["type"] in ("rollback", "redraw", "fallback") and e.get("discarded"):
                step = steps_of.get(e["step"], {})
                fired = (f"the listed word {step['matched']!r}" if step.get("matched") else step.get("failed") or
                         f"the probe: score {e.get('score', 0):.3f}")
                banned = token_text(enc, e["banned"]) if "banned" in e else "nothing"
                then = {"rollback": f"rolled back to index {i}", "redraw": "redrawn at this index",
                        "fallback": f"stopped: {e.get('reason', '')}"}[e["type"]]
                text = html.escape(visible(readable(enc, e.get("discarded_tokens"), e["discarded"])))
                attempts.append(f"<tr><td>{len(attempts) + 1}</td><td>{i}</td><td class=\"discarded\">{text}</td>"
                                f"<td>{html.escape(fired)}</td><td>{html.escape(banned)}</td><td>{html.escape(then)}</td></tr>")
                parts.append(f'<del class="discarded"><sup>{len(attempts)}</sup>{text}</del>')
            if e["type"] == "introspection":
                parts.append(f'<ins class="note">{html.escape(visible(readable(enc, e.get("note_tokens"), e["note"])))}</ins>')
            if e["type"] == "fallback":
                parts.append(f'<span class="fallback" title="{html.escape(e["reason"])}">stopped</span>')
        if i < len(result.tokens):
            token, score = result.tokens[i], result.scores[i]
            text = decoder.decode(enc.decode_single_token_bytes(token))
            label = f"token {token} {token_text(enc, token)}" + ("" if score is None else f", score {score:.3f}")
            parts.append(f'<span class="token" title="{html.escape(label)}"{tint(score, result.threshold)}>'
                         f'{html.escape(visible(text))}</span>')
    parts.append(html.escape(visible(decoder.decode(b"", final=True))))
    table = ("<table><tr><th>attempt</th><th>at index</th><th>discarded</th><th>what fired</th><th>banned there</th>"
             f"<th>then</th></tr>{''.join(attempts)}</table>" if attempts else "")
    return (f'<section><h2>{html.escape(visible(heading))}</h2>'
            f'<p class="text">{"".join(parts)}</p>{table}'
            f'{score_chart(result.steps, result.threshold, result.safe_level)}'
            f'<p class="legend">{plural(result.stats["redraws"], "redraw")}, {plural(result.stats["rollbacks"], "rollback")}, '
            f'stop: {result.stop_reason}</p>'
            '</section>\n')


def tint(score, threshold):
    """A released token's background: white at score 0, darkest at the threshold (none without a detector)."""
    if not (finite(score) and finite(threshold) and threshold > 0):
        return ""
    return f' style="background: rgba(230, 80, 0, {0.55 * min(max(score / threshold, 0.0), 1.0):.2f})"'


def score_chart(steps, threshold, safe_level, width=720, height=150):
    """The score of every sampled token (x: its step, y: 0 to 1), with the threshold and safe level."""
    # a score that is not a number (the detector failed: an alarm) is drawn at the top
    scores = [s["score"] if finite(s["score"]) else 1.0 for s in steps if s["score"] is not None]
    if not scores:
        return ""
    left, right, top, bottom = 34, 104, 10, 28
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(n):
        return left + plot_w * n / max(len(scores) - 1, 1)

    def y(value):
        return top + plot_h * (1 - min(max(value, 0.0), 1.0))
    axes = [f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#999"/>',
            f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#999"/>']
    for tick in (0, 0.5, 1):
        axes.append(f'<text x="{left - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for n in sorted({0, len(scores) - 1, *range(0, len(scores), max(1, len(scores) // 8))}):
        axes.append(f'<text x="{x(n):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{n}</text>')
    axes.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 2}" text-anchor="middle">sampled token (step)</text>')
    label_y = top + plot_h + 12  # the levels are labelled right of the plot, never on the line; the lower label
    for value, colour, name in ((safe_level, "#888", "safe level"), (threshold, "#b00", "threshold")):  # goes first
        label_y = min(y(value) + 4, label_y - 12)  # and the upper one stays a line above it
        axes.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="{colour}" '
                    f'stroke-dasharray="4 3"/><text x="{left + plot_w + 4}" y="{label_y:.1f}" '
                    f'fill="{colour}">{name} {value:.3g}</text>')
    points = " ".join(f"{x(n):.1f},{y(s):.1f}" for n, s in enumerate(scores))
    def said(step):  # what a dot's tooltip says of its score
        return f"{step['score']:.3f}" if finite(step["score"]) else html.escape(step.get("failed", "no score"))
    dots = "".join(f'<circle cx="{x(n):.1f}" cy="{y(scores[n]):.1f}" r="3" fill="#b00"><title>step {n}: '
                   f'{said(s)}</title></circle>' for n, s in enumerate(steps) if s["alarm"] and n < len(scores))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="detector score per sampled token">'
            f'{"".join(axes)}<polyline points="{points}" fill="none" stroke="#36c"/>{dots}</svg>')


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)
