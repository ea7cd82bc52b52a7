"""Showing why a generation backtracked: a text trace for the terminal, a one-line note after streamed
text, JSON lines and a self-contained HTML page.

    python backtrack.py --model-dir ../shared/models/minigpt2 --prompt "You are such a" --trace
    python backtrack.py --model-dir ../shared/models/minigpt2 --prompt "You are such a" --html run.html

Both read a backtrack.Result: its steps (every sampled token with its score, and how much text was
released after it) and its events (rollbacks, introspection notes, fallbacks).
"""
import html
from dataclasses import asdict as as_dict

from cli import write_output


def print_trace(prompt, result, enc, threshold, settings, colour, out):
    """Every sampled token with its score, each rollback with what it discarded and banned (and the
    listed word that fired, for a word list), and each release of text to the reader."""
    red, green, dim, off = ("\033[31m", "\033[32m", "\033[2m", "\033[0m") if colour else ("",) * 4
    print(f"prompt: {prompt!r}", file=out)
    shown = "none (no detector)" if threshold is None else f"{threshold:.4g}"
    print(f"{dim}alarm at score >= {shown}; buffer {settings.buffer}, introspect {settings.introspect}, "
          f"seed {settings.seed}{off}", file=out)
    print(f"{dim}step index token                     score{off}", file=out)
    events_after, released = {}, 0
    for e in result.events:
        events_after.setdefault(e["step"], []).append(e)
    for n, step in enumerate(result.steps):
        score = "" if step["score"] is None else f"{step['score']:.3f}"
        why = f" ({step['matched']!r} is listed)" if step.get("matched") else ""
        mark = f"{red}ALARM{why}{off}" if step["alarm"] else ""
        print(f"{n:4d} {step['index']:5d} {enc.decode([step['token']])!r:24} {score:>6} {mark}", file=out)
        for e in events_after.get(n, []):
            if e["type"] == "rollback":
                print(f"           {red}rollback to index {e['index']}: discarded {e['discarded']!r}, "
                      f"banned {enc.decode([e['banned']])!r} there{off}", file=out)
            elif e["type"] == "introspection":
                print(f"           {dim}introspection note at index {e['index']} (hidden): {e['note']!r}{off}", file=out)
            else:
                print(f"           {red}fallback at index {e['index']}: {e['reason']}; stopped{off}", file=out)
        if step.get("committed", released) > released:
            shown = enc.decode(result.tokens[released:step["committed"]])
            print(f"           {green}released: {shown!r}{off}", file=out)
            released = step["committed"]
    st = result.stats
    print(f"{green}final:{off} {result.text!r}", file=out)
    print(f"[{st['tokens_kept']} kept / {st['tokens_generated']} sampled, {st['rollbacks']} rollbacks, "
          f"{st['tokens_per_second']:.1f} tokens/s, stop: {result.stop_reason}]\n", file=out)


def steering_note(result):
    """One line for a streamed run that backtracked: how often, and why it stopped early if it did."""
    rollbacks = result.stats["rollbacks"]
    stopped = {"budget": "; stopped: the rollback budget ran out",
               "no_token": "; stopped: no token could be sampled"}.get(result.stop_reason, "")
    return f"[{rollbacks} rollback{'s' * (rollbacks != 1)}{stopped}]"


def write_html(path, runs, threshold):
    """One self-contained page (no scripts, no downloads) for a list of (prompt, result, tokenizer):
    the text the reader saw, every discarded span struck through where it was tried, notes, fallbacks,
    and the scores as a heat line against the threshold."""
    sections = [run_html(prompt, result, enc, threshold) for prompt, result, enc in runs]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>backtrack trace</title>
<style>
body {{ font: 15px/1.6 system-ui, sans-serif; max-width: 52em; margin: 2em auto; color: #222; }}
.prompt {{ color: #777; }} .text {{ white-space: pre-wrap; }}
del {{ color: #b00; background: #fee; }} ins.note {{ color: #555; background: #eef; text-decoration: none; font-style: italic; }}
.fallback {{ color: #fff; background: #b00; padding: 0 .3em; }} svg {{ display: block; margin: .5em 0 2em; }}
.legend {{ color: #777; font-size: 13px; }}
</style></head><body>
<h1>backtrack trace</h1>
<p class="legend">Grey: the prompt. Black: what the reader saw. <del>Struck through</del>: text the detector
rejected, shown where it was tried and never shown to the reader. <ins class="note">Italic</ins>: an
introspection note in the hidden context. The line under each run is the detector's score at every
sampled token; the dashed line is the alarm threshold ({threshold if threshold is None else f"{threshold:.4g}"});
red dots are alarms.</p>
{"".join(sections)}
</body></html>
"""
    write_output(path, page, "--html")


def run_html(prompt, result, enc, threshold):
    tried = {}  # token index -> what was tried and discarded there, in order
    for e in result.events:
        tried.setdefault(e["index"], []).append(e)
    parts = [f'<span class="prompt">{html.escape(prompt)}</span>']
    for i in range(len(result.tokens) + 1):
        for e in tried.get(i, []):
            if e["type"] in ("rollback", "fallback") and e.get("discarded"):
                parts.append(f'<del class="discarded" title="score {e.get("score", 0):.3f}">{html.escape(e["discarded"])}</del>')
            if e["type"] == "introspection":
                parts.append(f'<ins class="note">{html.escape(e["note"])}</ins>')
            if e["type"] == "fallback":
                parts.append(f'<span class="fallback" title="{html.escape(e["reason"])}">stopped</span>')
        if i < len(result.tokens):
            parts.append(html.escape(enc.decode([result.tokens[i]])))
    return (f'<section><p class="text">{"".join(parts)}</p>{heat_line(result.steps, threshold)}'
            f'<p class="legend">{result.stats["rollbacks"]} rollbacks, stop: {result.stop_reason}</p></section>\n')


def heat_line(steps, threshold, width=640, height=80):
    scores = [s["score"] for s in steps if s["score"] is not None]
    if not scores:
        return ""
    x = [8 + (width - 16) * n / max(len(scores) - 1, 1) for n in range(len(scores))]
    y = [height - 8 - (height - 16) * s for s in scores]
    ty = height - 8 - (height - 16) * threshold
    dots = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="#b00"/>'
                   for a, b, s in zip(x, y, steps) if s["alarm"])
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="detector score per sampled token">'
            f'<line x1="0" x2="{width}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#b00" stroke-dasharray="4 3"/>'
            f'<polyline points="{points}" fill="none" stroke="#36c"/>{dots}</svg>')


def json_record(prompt, result, enc, threshold, settings):
    """The JSON line of one run: the result, with each step's token decoded, and what produced it."""
    record = dict(prompt=prompt, **as_dict(result), threshold=threshold, settings=as_dict(settings))
    for step in record["steps"]:
        step["text"] = enc.decode([step["token"]])
    return record
