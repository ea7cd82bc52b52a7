"""report.py: traces and pages that explain themselves, read from hand-made results."""
import html
import os
import re
import sys
from html.parser import HTMLParser

from hypothesis import given, settings, strategies as st

import backtrack as B
import checkpoints as CK
import report
from conftest import HERE, assert_tables_render, write_tiny_bpe


def tokenizer(tmp_path):
    write_tiny_bpe(str(tmp_path))
    return CK.tokenizer_from_files(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


def result_of(enc, text, events=(), steps=None):
    tokens = enc.encode_ordinary(text)
    scores = [0.1 * (i % 5) for i in range(len(tokens))]
    steps = steps or [dict(index=i, token=t, score=s, alarm=False, draw=0.5, committed=i + 1)
                      for i, (t, s) in enumerate(zip(tokens, scores))]
    stats = dict(tokens_kept=len(tokens), tokens_generated=len(steps),
                 rollbacks=sum(e["type"] == "rollback" for e in events),
                 redraws=sum(e["type"] == "redraw" for e in events), tokens_per_second=10.0)
    return B.Result(enc.decode(tokens), tokens, scores, steps, list(events), stats, "max_new_tokens", tokens, 0.5, 0.3)


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.open, self.text, self.titles = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag != "meta":
            self.open.append(tag)
        if dict(attrs).get("title"):
            self.titles.append(dict(attrs)["title"])

    def handle_endtag(self, tag):
        assert self.open.pop() == tag  # well nested

    def handle_data(self, data):
        if self.open and self.open[-1] in ("span", "p"):
            self.text.append(data)


def test_the_page_decodes_characters_split_across_tokens(tmp_path):
    """Curly quotes are three bytes, each its own token in a byte-level BPE: decoding token by token
    gave 'it\\ufffd\\ufffd\\ufffds'; the page decodes as the terminal does."""
    enc = tokenizer(tmp_path)
    text = "it\u2019s \u201cfine\u201d, don\u2019t"
    assert len(enc.encode_ordinary("\u2019")) == 3
    page = tmp_path / "run.html"
    report.write_html(str(page), [("Prompt 1", "He said", result_of(enc, text), enc)])
    content = page.read_text(encoding="utf-8")
    parsed = Page()
    parsed.feed(content)
    assert not parsed.open
    assert text in "".join(parsed.text) and "\ufffd" not in content
    hover = [t for t in parsed.titles if t.startswith("token ")]
    assert len(hover) == len(enc.encode_ordinary(text)) and "#" in hover[2]  # a byte token shows its id
    assert re.search(r"threshold 0\.5", content) and re.search(r"safe level 0\.3", content)


def test_the_page_numbers_each_attempt_and_says_what_fired_and_what_was_banned(tmp_path):
    """Two attempts discarded at one index are two struck spans, numbered, and a table row each says
    what fired, what was banned and what followed, without hovering; released tokens are tinted by score."""
    enc = tokenizer(tmp_path)
    bad = enc.encode_ordinary(" darn")
    steps = [dict(index=0, token=bad[0], score=1.0, alarm=True, draw=0.2, committed=0, matched="darn"),
             dict(index=0, token=enc.encode_ordinary(" ok")[0], score=0.1, alarm=False, draw=0.7, committed=1)]
    events = [dict(type="rollback", index=0, score=1.0, discarded=" darn", banned=bad[0], step=0),
              dict(type="redraw", index=0, score=1.0, discarded=" heck", banned=enc.encode_ordinary(" heck")[0], step=1)]
    page = tmp_path / "run.html"
    result = result_of(enc, " ok then fine", events, steps)
    report.write_html(str(page), [("Prompt 2 of 5 (line 7 of p.txt) · m · seed 3 · policy tuned", "Oh", result, enc)])
    content = page.read_text()
    assert "<h2>Prompt 2 of 5 (line 7 of p.txt) · m · seed 3 · policy tuned</h2>" in content
    struck = [tuple(map(html.unescape, d)) for d in re.findall(r'<del class="discarded"><sup>(\d+)</sup>(.*?)</del>', content)]
    assert struck == [("1", " darn"), ("2", " heck")]
    rows = [tuple(map(html.unescape, r)) for r in re.findall(
        r'<tr><td>(\d+)</td><td>(\d+)</td><td class="discarded">(.*?)</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>',
        content)]
    assert rows == [("1", "0", " darn", "the listed word 'darn'", report.token_text(enc, bad[0]), "rolled back to index 0"),
                    ("2", "0", " heck", "the probe: score 1.000", report.token_text(enc, events[1]["banned"]),
                     "redrawn at this index")]
    tints = [float(a) for a in re.findall(r'<span class="token"[^>]*rgba\(230, 80, 0, ([0-9.]+)\)', content)]
    assert tints == [round(0.55 * min(s / 0.5, 1), 2) for s in result.scores]


def test_the_trace_says_why_text_is_held_and_names_byte_tokens(tmp_path, capsys):
    enc = tokenizer(tmp_path)
    tokens = enc.encode_ordinary("ab\u2019cd")
    steps = [dict(index=i, token=t, score=0.4, alarm=False, draw=0.5, committed=0) for i, t in enumerate(tokens)]
    result = B.Result("", [], [], steps, [], dict(tokens_kept=0, tokens_generated=len(tokens), rollbacks=1,
                                                  redraws=2, tokens_per_second=1.0), "max_new_tokens")
    result.threshold, result.safe_level = 0.5, 0.3
    report.print_trace("p", result, enc, B.Settings(buffer=1), False, sys.stdout)
    out = capsys.readouterr().out
    assert "safe level 0.3" in out
    assert "held back from index 0: the score at index 0 (0.400) is not below the safe level" in out
    assert "<bytes e2 #" in out and "2 redraws, 1 rollback," in out


TEXTS = st.text(alphabet=st.sampled_from(list("ab .\u2019\u201c\u201d\u00e9\U0001F600\U0001F44D")), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(kept=TEXTS, cut=st.integers(0, 3), tried=st.lists(st.tuples(TEXTS, st.integers(0, 3), st.booleans()), max_size=4))
def test_no_replacement_character_on_a_page_whatever_the_bytes_split(tmp_path_factory, kept, cut, tried):
    """Every byte is a token here, so curly quotes and emoji arrive a byte at a time: the released text
    may end mid-character (cut), and a discarded span or a note may start or end inside one. The page
    joins what forms characters and shows the rest as <bytes ..>, never U+FFFD."""
    tmp_path = tmp_path_factory.mktemp("page")
    enc = tokenizer(tmp_path)
    byte_tokens = {b: enc.encode_single_token(bytes([b])) for b in range(256)}
    data = kept.encode()
    tokens = [byte_tokens[b] for b in data[:max(1, len(data) - cut)]]
    events = []
    for n, (text, trim, is_note) in enumerate(tried):
        ids = [byte_tokens[b] for b in text.encode()[trim:]] or [byte_tokens[ord("a")]]
        if is_note:
            events.append(dict(type="introspection", index=0, note=enc.decode(ids), note_tokens=ids, step=0))
        else:
            events.append(dict(type="rollback", index=min(n, len(tokens)), score=0.9, discarded=enc.decode(ids),
                               discarded_tokens=ids, banned=ids[0], step=0))
    steps = [dict(index=i, token=t, score=0.1, alarm=False, draw=0.5, committed=i + 1) for i, t in enumerate(tokens)]
    result = B.Result(enc.decode(tokens), tokens, [0.1] * len(tokens), steps, events,
                      dict(tokens_kept=len(tokens), tokens_generated=len(steps), rollbacks=len(events), redraws=0,
                           tokens_per_second=1.0), "max_new_tokens", tokens, 0.5, 0.3)
    page = tmp_path / "run.html"
    report.write_html(str(page), [("Prompt 1", "\u201cIt\u2019s", result, enc)])
    content = page.read_text(encoding="utf-8")
    assert "\ufffd" not in content
    parsed = Page()
    parsed.feed(content)
    kept_bytes = data[:max(1, len(data) - cut)]
    expected = kept_bytes.decode("utf-8", errors="backtrack.bytes")  # whole characters as themselves, the rest as bytes
    assert "\u201cIt\u2019s" + expected in "".join(parsed.text)
    for e in events:
        ids = e.get("discarded_tokens") or e["note_tokens"]
        assert html.escape(report.readable(enc, ids)) in content


def test_every_table_in_the_docs_renders():
    """README.md and every page under docs/ and golden/: each table is one a markdown renderer draws."""
    pages = [os.path.join(HERE, "README.md")] + sorted(
        os.path.join(root, name) for folder in ("docs", "golden") for root, _, names in os.walk(os.path.join(HERE, folder))
        for name in names if name.endswith(".md"))
    for page in pages:
        with open(page, encoding="utf-8") as f:
            assert_tables_render(f.read(), os.path.relpath(page, HERE))
