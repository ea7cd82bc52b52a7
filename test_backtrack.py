"""The decoding loop (backtrack.py): its invariants, properties and golden traces."""
import ast
import io
import math
import os
import sys
import tokenize

import pytest
import torch
from hypothesis import given, strategies as st

import backtrack as B
import cli
from conftest import HERE, CharTokenizer, HashDetector, ScriptedDetector, capture_cache, sample_as, tiny_model, uniform
from policy import Classic, Tuned, level_between


def passes_per_note(introspect):
    return {"none": 0, "template": 1, "critique": B.CRITIQUE_TOKENS + 2}[introspect]


# Tests of the rollback rules use the classic policy (and max_retries=4), so that every alarm is a
# rollback; the tuned policy's redraws have their own tests near the end.
runs = dict(seed=st.integers(0, 2**16), buffer=st.integers(0, 4), rate=st.sampled_from([0.0, 0.1, 0.3, 0.6]),
            introspect=st.sampled_from(["none", "template", "critique"]), temperature=st.sampled_from([0.0, 1.0]))


@given(**runs)
def test_loop_invariants(seed, buffer, rate, introspect, temperature):
    """After any run: the cache holds exactly a fresh forward of the final context; released text is
    the final text, built append-only; forward passes stay within the stated bound."""
    model = tiny_model(seed % 7, n_positions=128)
    enc = CharTokenizer()
    s = B.Settings(max_new_tokens=24, buffer=buffer, introspect=introspect, temperature=temperature,
                   seed=seed, max_retries=3, max_rollbacks=6, template=" (be nice) ")
    released = []
    with pytest.MonkeyPatch.context() as mp:
        caches = capture_cache(model, mp)
        result = B.generate(model, enc, "hello there", HashDetector(rate), s, on_release=released.append)
    cache = caches[0]
    # the cache is exactly a fresh forward of the final context
    assert cache.length == len(result.context)
    assert result.context[:11] == enc.encode_ordinary("hello there")
    fresh = model.new_cache()
    with torch.inference_mode():  # the loop made its cache under inference mode
        model(torch.tensor([result.context]), fresh)
        L = cache.length
        assert (cache.k[..., :L, :] - fresh.k[..., :L, :]).abs().max() <= 1e-5
        assert (cache.v[..., :L, :] - fresh.v[..., :L, :]).abs().max() <= 1e-5
        a, _ = model(torch.tensor([[3]]), cache)
        b, _ = model(torch.tensor([[3]]), fresh)
    assert (a - b).abs().max() <= 1e-5
    # nothing shown is ever retracted: the releases, in order, build exactly the final text
    assert "".join(released) == result.text
    if introspect == "none":  # without notes the hidden context is the prompt, the text, and any end-of-text
        assert result.context[11:] == result.tokens + [enc.eot_token] * (result.stop_reason == "eos")
    # termination: a stated bound on forward passes. A redraw costs one; each bans a token of the commit
    # point's pool, which a note there can change once: at most 2 pools' worth per commit point
    M_, b_ = s.max_rollbacks, buffer
    redraws = [e["index"] for e in result.events if e["type"] == "redraw"]
    assert all(redraws.count(i) <= 2 * s.policy.redraw_pool for i in redraws)
    bound = 1 + s.max_new_tokens + (M_ + 1) * (b_ + 1) + M_ * passes_per_note(introspect) + len(redraws)
    assert result.stats["forward_passes"] <= bound
    assert result.stats["rollbacks"] <= s.max_rollbacks
    assert len(result.tokens) <= s.max_new_tokens
    assert result.stop_reason in ("eos", "max_new_tokens", "budget", "no_token")  # no_token: the pool used up


@given(**runs, prompt=st.sampled_from(["abc", "hello there"]))  # HashDetector flags the first, not the second
def test_banned_tokens_never_return_at_their_position(seed, buffer, rate, introspect, temperature, prompt):
    rate = rate or 0.3  # without alarms there is no ban to check
    model = tiny_model(seed % 5, n_positions=128)
    s = B.Settings(max_new_tokens=20, buffer=buffer, introspect=introspect, temperature=temperature,
                   seed=seed, max_retries=4, max_rollbacks=10, template=" (be nice) ")
    result = B.generate(model, CharTokenizer(), prompt, HashDetector(rate), s)
    returns = {e["step"]: e["index"] for e in result.events if e["type"] in ("rollback", "redraw")}
    for e in (e for e in result.events if e["type"] in ("rollback", "redraw")):
        # while the text before its index stays as it was and is not released up to it, the banned
        # token is never drawn there again
        committed = result.steps[e["step"]]["committed"]
        for step, n in zip(result.steps[e["step"] + 1:], range(e["step"] + 1, len(result.steps))):
            if step["index"] == e["index"]:
                assert step["token"] != e["banned"]
            if returns.get(n, e["index"]) < e["index"]:
                break  # a rollback before it: another prefix
            if step["committed"] != committed and step["committed"] >= e["index"]:
                break  # released up to it: its bans belonged to the old commit point


@given(seed=st.integers(0, 2**16), buffer=st.integers(0, 3))
def test_a_silent_detector_changes_nothing(seed, buffer):
    model = tiny_model(seed % 3)
    s = B.Settings(max_retries=4, policy=Classic(), max_new_tokens=16, buffer=buffer, seed=seed)
    plain = B.generate(model, CharTokenizer(), "abc", None, s)
    watched = B.generate(model, CharTokenizer(), "abc", ScriptedDetector(), s)
    assert watched.tokens == plain.tokens and watched.stats["rollbacks"] == 0
    assert plain.scores == [None] * len(plain.tokens)


@given(seed=st.integers(0, 2**16), buffer=st.integers(0, 3))
def test_a_token_that_fires_never_appears(seed, buffer):
    model = tiny_model(seed % 3)
    enc = CharTokenizer()
    s = B.Settings(max_retries=4, policy=Classic(), max_new_tokens=16, buffer=buffer, seed=seed, temperature=0.0,
                   stop_at_eos=False)
    plain = B.generate(model, enc, "abc", None, s)
    target = plain.tokens[len(plain.tokens) // 2]  # a token greedy decoding wants (16 of them: no end-of-text stop)
    result = B.generate(model, enc, "abc", ScriptedDetector([target]), s)
    assert target not in result.tokens
    assert any(e["type"] in ("rollback", "fallback") for e in result.events)


def test_budget_exhausted_stops_with_committed_text():
    model = tiny_model()
    s = B.Settings(policy=Classic(), max_new_tokens=10, max_retries=2, max_rollbacks=5, temperature=0.0)
    result = B.generate(model, CharTokenizer(), "abc", HashDetector(1.0), s)  # everything is an alarm
    assert result.stop_reason == "budget" and result.tokens == [] and result.text == ""
    assert [e["type"] for e in result.events] == ["rollback", "rollback", "fallback"]
    assert "retry budget" in result.events[-1]["reason"]


def test_introspection_note_stays_hidden_and_stays_in_the_context():
    """A note is fed at the commit point, never shown; later rollbacks return to a commit point that
    only moves forward, so the note stays in the hidden context for the rest of the generation."""
    model = tiny_model(n_positions=128)
    enc = CharTokenizer()
    s = B.Settings(max_retries=4, policy=Classic(), max_new_tokens=12, buffer=3, introspect="template", template="[ok]",
                   temperature=0.0)
    plain = B.generate(model, enc, "abc", None, s)
    result = B.generate(model, enc, "abc", ScriptedDetector([plain.tokens[2]]), s)
    notes = [e for e in result.events if e["type"] == "introspection"]
    assert notes and notes[0]["note"] == "[ok]"
    assert "[ok]" not in result.text
    note = enc.encode_ordinary("[ok]")
    where = [i for i in range(len(result.context)) if result.context[i:i + 4] == note]
    assert len(where) == len(notes) >= 1
    # the first note sits right after the prompt and the tokens committed before it
    first = notes[0]["index"]
    assert result.context[:where[0]] == enc.encode_ordinary("abc") + result.tokens[:first]


def test_after_a_note_the_next_token_is_predicted_from_the_note():
    """The logits after a note, not those from before it, choose the next token: greedy decoding
    takes the argmax of a fresh forward over prompt + note, with the banned token left out."""
    model, enc = tiny_model(3, n_positions=128), CharTokenizer()
    s = B.Settings(max_retries=4, policy=Classic(), max_new_tokens=6, buffer=0, introspect="template", template="[ok]",
                   temperature=0.0)
    prompt, note = enc.encode_ordinary("abc"), enc.encode_ordinary("[ok]")
    first = B.generate(model, enc, prompt, None, s).tokens[0]
    result = B.generate(model, enc, prompt, ScriptedDetector([first]), s)
    assert result.context[:len(prompt + note)] == prompt + note
    with torch.no_grad():
        after_note = model(torch.tensor([prompt + note]))[0][0, -1].clone()
        before_note = model(torch.tensor([prompt]))[0][0, -1].clone()
    after_note[first] = before_note[first] = float("-inf")
    assert int(after_note.argmax()) != int(before_note.argmax())  # so the test tells the two apart
    assert result.steps[1]["token"] == int(after_note.argmax())


def test_a_critique_ends_where_the_model_closes_its_parenthesis():
    """The model writes the critique greedily until it writes ")" itself; then ")\n" closes the note."""
    model, enc = tiny_model(n_positions=256), CharTokenizer()
    paren = enc.encode_ordinary(")")[0]
    with torch.no_grad():  # a model that always says ")": ln_f outputs one vector, and ")" matches it best
        model.ln_f.weight.zero_()
        model.wte.weight[paren] = 10 * model.ln_f.bias
    s = B.Settings(max_retries=4, policy=Classic(), max_new_tokens=4, buffer=0, introspect="critique", temperature=0.0)
    result = B.generate(model, enc, "abc", ScriptedDetector([paren]), s)
    notes = [e["note"] for e in result.events if e["type"] == "introspection"]
    assert notes and notes[0] == enc.decode(enc.encode_ordinary(B.CRITIQUE_OPENING.format(discarded=")") + ")\n"))


class EndOfTextTokenizer(CharTokenizer):
    """Ends the text at "e" (id 69): end-of-text falls where the model writes that letter."""

    def __init__(self):
        super().__init__()
        self.eot_token = ord("e") - 32


@given(seed=st.integers(0, 2**16), buffer=st.integers(0, 3), rate=st.sampled_from([0.0, 0.2, 0.5]))
def test_scores_stay_aligned_with_tokens_whatever_the_end_of_text(seed, buffer, rate):
    """With stop_at_eos False, end-of-text tokens can fall anywhere on the path; they are dropped from
    the kept tokens, and each kept token keeps its own score (the score the step recorded for it),
    whatever the run's end: max_new_tokens, a budget spent (the fallback cuts the path back to the
    commit point) or nothing left to sample. The path is rebuilt from the steps and the events alone."""
    model, enc = tiny_model(seed % 5), EndOfTextTokenizer()
    with torch.no_grad():
        model.wte.weight[enc.eot_token] *= 3  # the model writes it often
    s = B.Settings(max_retries=4, policy=Classic(), max_new_tokens=16, buffer=buffer, seed=seed, stop_at_eos=False,
                   max_rollbacks=4)
    result = B.generate(model, enc, "abc", HashDetector(rate), s)
    path, events = [], {}
    for e in result.events:
        events.setdefault(e["step"], []).append(e)
    for n, step in enumerate(result.steps):
        assert step["index"] == len(path)  # each token is drawn at the end of the path as it then stands
        path.append((step["token"], step["score"]))
        for e in events.get(n, []):
            if e["type"] in ("rollback", "redraw", "fallback"):
                del path[e["index"]:]  # what the event discarded
    kept = [(t, sc) for t, sc in path if t != enc.eot_token]
    assert result.tokens == [t for t, _ in kept] and result.scores == [sc for _, sc in kept], result.stop_reason


def test_avg_wait_tokens_equals_the_buffer_without_rollbacks():
    model = tiny_model()
    for buffer in (0, 3):
        s = B.Settings(max_new_tokens=20, buffer=buffer, stop_at_eos=False)
        result = B.generate(model, CharTokenizer(), "abc", ScriptedDetector(), s)
        # every token waits `buffer` steps, except the last `buffer` ones, released at the end
        expected = sum(min(buffer, 19 - i) for i in range(20)) / 20
        assert result.stats["avg_wait_tokens"] == pytest.approx(expected)


def test_bad_settings_and_prompts_are_one_line_errors():
    model = tiny_model(n_positions=32)
    enc = CharTokenizer()
    for bad, message in [(dict(top_p=2.0), "top_p"), (dict(buffer=-1), "buffer"), (dict(temperature=-1), "temperature"),
                         (dict(max_new_tokens=0), "max_new_tokens"), (dict(introspect="shout"), "introspect")]:
        with pytest.raises(cli.UserError, match=message):
            B.generate(model, enc, "abc", None, B.Settings(**bad))
    with pytest.raises(cli.UserError, match="prompt is empty"):
        B.generate(model, enc, "   ", None, B.Settings())
    with pytest.raises(cli.UserError, match="the prompt has 30 tokens, but the context of 32 leaves room for 22"):
        B.generate(model, enc, "x" * 30, None, B.Settings(max_new_tokens=10))


def test_nothing_left_to_sample_is_minus_one_and_a_fallback_stop():
    logits = torch.randn(3, 10)
    logits[1] = float("nan")
    every = set(range(10))
    for s in (B.Settings(), B.Settings(temperature=0.0)):
        got = sample_as(s, logits, uniform([torch.Generator().manual_seed(0) for _ in range(3)]), [(), (), every])
        assert got[0] >= 0 and got[1:] == [-1, -1]
    # in the loop: a model whose logits are NaN stops with a fallback event, never a banned or NaN token
    model = tiny_model()
    with torch.no_grad():
        model.ln_f.weight.fill_(float("nan"))
    result = B.generate(model, CharTokenizer(), "abc", None, B.Settings(max_new_tokens=5))
    assert result.stop_reason == "no_token" and result.tokens == []
    assert result.events[-1]["type"] == "fallback" and "no token" in result.events[-1]["reason"]


def test_a_padded_model_vocabulary_is_never_sampled_and_a_smaller_one_is_refused():
    """nanoGPT pads GPT-2's vocabulary to 50304: the ids past the tokenizer's mean nothing."""
    model = tiny_model(vocab_size=120)
    with torch.no_grad():
        model.wte.weight[97:] *= 50  # make the padding ids the likeliest by far
    for s in (B.Settings(temperature=0.0, max_new_tokens=12), B.Settings(max_new_tokens=12, top_p=1.0)):
        result = B.generate(model, CharTokenizer(), "abc", None, s)
        assert result.tokens and max(result.tokens) < 97
    with pytest.raises(cli.UserError, match="the tokenizer has 97 tokens but the model only 50"):
        B.generate(tiny_model(vocab_size=50), CharTokenizer(), "abc", None, B.Settings())


class ConstantDetector(ScriptedDetector):
    """Scores every token the same: where that score sits against the threshold and safe level decides all."""

    def __init__(self, score, threshold, safe_level):
        super().__init__()
        self.value, self.threshold, self.safe_level = score, threshold, safe_level

    def score(self, token, hidden):
        self.tokens.append(token)
        return self.value


def test_a_score_equal_to_the_threshold_is_an_alarm():
    model, enc = tiny_model(), CharTokenizer()
    s = B.Settings(policy=Classic(), max_new_tokens=6, temperature=0.0, max_retries=1)
    at = B.generate(model, enc, "abc", ConstantDetector(0.5, threshold=0.5, safe_level=0.5), s)
    assert at.steps[0]["alarm"] and at.stop_reason == "budget" and at.tokens == []
    below = B.generate(model, enc, "abc", ConstantDetector(0.4999, threshold=0.5, safe_level=0.5), s)
    assert not any(step["alarm"] for step in below.steps) and len(below.tokens) == 6


def test_text_is_held_back_while_the_score_is_not_below_the_safe_level():
    """Buffer 0, no alarms: with every score at the safe level nothing is shown before the end (each
    token waits for the rest); just above it, each token is shown at once."""
    model, enc = tiny_model(), CharTokenizer()
    s = B.Settings(max_new_tokens=8, temperature=0.0, buffer=0, stop_at_eos=False)
    for level, waits in ((0.3, [7, 6, 5, 4, 3, 2, 1, 0]), (0.3001, [0] * 8)):
        released = []
        result = B.generate(model, enc, "abc", ConstantDetector(0.3, threshold=0.5, safe_level=level), s,
                            on_release=released.append)
        assert result.stats["avg_wait_tokens"] == pytest.approx(sum(waits) / 8), level
        assert len(released) == (1 if level == 0.3 else 8) and "".join(released) == result.text
    # a settings value overrides the detector's own
    override = B.generate(model, enc, "abc", ConstantDetector(0.3, 0.5, 0.3), B.Settings(**{**s.__dict__, "safe_level": 0.5}))
    assert override.stats["avg_wait_tokens"] == 0


class FirstTokenDetector(ScriptedDetector):
    """Fires on `token` at index 0 only: the ban it causes must end once index 0 is committed."""

    def __init__(self, token):
        super().__init__()
        self.target = token

    def score(self, token, hidden):
        self.tokens.append(token)
        return 1.0 if token == self.target and self.tokens.length == 1 else 0.0


def test_bans_are_lifted_once_the_commit_point_moves():
    model, enc = tiny_model(), CharTokenizer()
    with torch.no_grad():
        model.wte.weight[40] *= 40  # the tied head makes token 40 the greedy choice everywhere
    s = B.Settings(max_retries=4, policy=Classic(), max_new_tokens=6, temperature=0.0, buffer=0)
    assert B.generate(model, enc, "abc", None, s).tokens == [40] * 6
    result = B.generate(model, enc, "abc", FirstTokenDetector(40), s)
    assert result.tokens[0] != 40 and result.tokens[1:] == [40] * 5  # banned at index 0 only
    assert [e["type"] for e in result.events] == ["rollback"]


def test_one_note_per_commit_point_however_many_rollbacks():
    model, enc = tiny_model(n_positions=128), CharTokenizer()
    s = B.Settings(policy=Classic(), max_new_tokens=6, temperature=0.0, max_retries=3, introspect="template", template="[ok]")
    result = B.generate(model, enc, "abc", HashDetector(1.0), s)  # every token is an alarm
    kinds = [e["type"] for e in result.events]
    assert kinds == ["rollback", "introspection", "rollback", "rollback", "fallback"]
    assert result.context.count(enc.encode_ordinary("[")[0]) == 1


def project_imports(path):
    """The project's modules a file imports, anywhere in it (inside functions too), except under
    `if __name__ == "__main__":`: that block runs only when the file is a script, as the module
    __main__, which nothing imports (backtrack.py starts its command line, backtrack_cli, there)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    script = {id(node) for top in tree.body if isinstance(top, ast.If) and "__main__" in ast.unparse(top.test)
              for node in ast.walk(top)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in script:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_imports_run_one_way():
    """Every module of the project imports only modules below it in this order, at its top or inside
    a function: no import circle, no exception. The runtime modules never import a tool."""
    order = ["checks", "cli", "model", "sampling", "tokenizer", "checkpoints", "policy", "scorer", "detector_files", "report",
             "fitting", "backtrack", "batched", "backtrack_cli", "train_probe", "evaluate", "bench"]
    project = {name[:-3] for name in os.listdir(HERE) if name.endswith(".py") and not name.startswith(("test_", "conftest"))}
    assert project == set(order), project ^ set(order)
    for rank, name in enumerate(order):
        imported = project_imports(os.path.join(HERE, name + ".py")) & project
        assert imported <= set(order[:rank]), (name, imported - set(order[:rank]))


def test_the_core_imports_only_torch_and_the_standard_library():
    """What a porter reads of the algorithm (the network, sampling, the core's checks, the policies and
    the loop) imports, anywhere in its files, nothing of the shell: no files, Hub, fingerprints or
    command lines; only torch, the standard library and the core itself."""
    core = {"model", "sampling", "checks", "policy", "scorer", "backtrack"}
    for name in core:
        imported = project_imports(os.path.join(HERE, name + ".py"))
        outside = {m for m in imported - core if m != "torch" and m not in sys.stdlib_module_names}
        assert not outside, (name, outside)


def code_lines(path):
    """Lines holding code: no blank line, comment or docstring."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstrings |= set(range(body[0].lineno, body[0].end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    return len({line for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type not in skip
                for line in range(token.start[0], token.end[0] + 1)} - docstrings)


def test_the_core_a_porter_reads_stays_small():
    """The network (GPT-2 and the Llama family), sampling, the policies, the detectors' scoring and the
    loop: at most 900 lines of code (881 before the Llama family came in; the shell took the loading)."""
    core = sum(code_lines(os.path.join(HERE, name + ".py")) for name in ("model", "sampling", "policy", "scorer", "backtrack"))
    assert core <= 900, core


def test_the_model_file_is_only_the_model():
    """model.py imports nothing of the project and no private torch API; the loop file holds no argparse."""
    with open(os.path.join(HERE, "model.py"), encoding="utf-8") as f:
        source = f.read()
    assert not project_imports(os.path.join(HERE, "model.py")) - {"math", "dataclasses", "typing", "torch"}
    assert "._C" not in source and "torch._" not in source
    with open(os.path.join(HERE, "backtrack.py"), encoding="utf-8") as f:
        assert "argparse" not in f.read()


class SetDetector(ScriptedDetector):
    """Alarms on any token of `alarm_tokens` at any position: redraws must steer around them."""


class FlaggingSetDetector(SetDetector):
    """The same, flagging every prompt: the generation is vigilant."""

    def start(self, prompt_ids, hidden=None):
        super().start(prompt_ids, hidden)
        return 1.0


@given(seed=st.integers(0, 2**16), buffer=st.integers(0, 3), temperature=st.sampled_from([0.0, 1.0]),
       redraw_pool=st.sampled_from([0, 1, 8, 70]), max_redraws=st.integers(0, 2), flagged=st.booleans())
def test_an_alarm_after_safe_text_is_a_redraw(seed, buffer, temperature, redraw_pool, max_redraws, flagged):
    """With a pool, an alarm on the first token after the commit point, or on a later token whose text
    before it ends safely (at most max_redraws times at one index, never after a flagged prompt),
    discards that one token, bans it there and draws again, without counting as a rollback or spending
    the retry budget; every other alarm rolls back to the commit point. With buffer 0 a token that
    passes is committed at once, so every alarm falls on the first token after the commit point: with a
    pool wide enough, nothing is ever rolled back."""
    model, enc = tiny_model(seed % 5, n_positions=128), CharTokenizer()
    gen = torch.Generator().manual_seed(seed)
    alarm_tokens = set(torch.randperm(96, generator=gen)[:60].tolist())  # most tokens alarm
    s = B.Settings(max_new_tokens=12, buffer=buffer, temperature=temperature, seed=seed, policy=Tuned(redraw_pool=redraw_pool,
                   max_redraws=max_redraws), max_retries=2, max_rollbacks=30, stop_at_eos=False)
    result = B.generate(model, enc, "abc", (FlaggingSetDetector if flagged else SetDetector)(alarm_tokens), s)
    assert not any(t in alarm_tokens for t in result.tokens)
    events = {e["step"]: e for e in result.events if e["type"] in ("redraw", "rollback")}
    committed, redraws_at = 0, {}  # the commit point before each step; redraws per index beyond it
    banned_at_commit = 0  # redraws at the commit point: each bans a token of its pool
    for n, step in enumerate(result.steps):
        e, i = events.get(n), step["index"]
        if step["alarm"] and e:
            # every token scores 0 or 1, so the text before the flagged one ends safely
            ahead = i > committed and not flagged and redraws_at.get(i, 0) < max_redraws
            assert e["type"] == ("redraw" if redraw_pool and (i == committed or ahead) else "rollback")
            if e["type"] == "redraw":  # only the flagged token goes, banned where it was drawn
                assert e["index"] == i and e["banned"] == step["token"] in alarm_tokens
                redraws_at = {j: k for j, k in redraws_at.items() if j <= i}
                redraws_at[i] = redraws_at.get(i, 0) + (i > committed)
            else:  # back to the commit point
                assert e["index"] == committed
                redraws_at = {}
            banned_at_commit += e["type"] == "redraw" and e["index"] == committed
            assert not redraw_pool or banned_at_commit <= redraw_pool
        if step["committed"] > committed:
            committed, banned_at_commit = step["committed"], 0
            redraws_at = {j: k for j, k in redraws_at.items() if j > committed}
    redraws = [e["index"] for e in result.events if e["type"] == "redraw"]
    assert result.stats["rollbacks"] == sum(e["type"] == "rollback" for e in result.events)
    assert result.stats["redraws"] == len(redraws)
    if buffer == 0 and redraw_pool == 70:  # 60 alarm tokens: a passing one is always in the pool
        assert result.stats["rollbacks"] == 0 and result.stop_reason == "max_new_tokens"


def test_when_every_token_of_the_pool_is_banned_nothing_can_be_sampled():
    model, enc = tiny_model(n_positions=128), CharTokenizer()
    s = B.Settings(max_new_tokens=6, temperature=0.0, policy=Tuned(redraw_pool=3), max_retries=1)
    result = B.generate(model, enc, "abc", SetDetector(range(97)), s)
    assert result.stop_reason == "no_token" and result.tokens == [] and result.stats["rollbacks"] == 0
    assert [e["type"] for e in result.events] == ["redraw"] * 3 + ["fallback"]
    assert result.events[-1]["reason"] == B.NOTHING_TO_SAMPLE
    logits = model(torch.tensor([enc.encode_ordinary("abc")]))[0][0, -1].detach()
    top3 = set(torch.topk(logits, 3).indices.tolist())
    assert {e["banned"] for e in result.events[:3]} == top3  # greedy: the pool, likeliest first


def test_the_redrawn_token_follows_the_pool_without_the_flagged_ones():
    """A redraw is rejection sampling: the token finally kept at the commit point is drawn with its own
    probability, renormalised over the pool's tokens that the detector accepts there."""
    model, enc = tiny_model(2, n_positions=128), CharTokenizer()
    s = B.Settings(max_new_tokens=1, buffer=0, top_p=1.0, stop_at_eos=False, policy=Tuned(redraw_pool=5))
    logits = model(torch.tensor([enc.encode_ordinary("abc")]))[0][0, -1].detach()
    top = torch.topk(logits, 5).indices.tolist()
    detector = SetDetector({top[0], top[2]})
    counts = {}
    for i in range(400):
        token = B.generate(model, enc, "abc", detector, B.Settings(**{**s.__dict__, "seed": i})).context[3]
        counts[token] = counts.get(token, 0) + 1
    expected = torch.softmax(logits[[top[1], top[3], top[4]]].float(), 0)
    assert set(counts) <= {top[1], top[3], top[4]}
    for token, p in zip((top[1], top[3], top[4]), expected.tolist()):
        assert abs(counts.get(token, 0) / 400 - p) < 0.07, token


class PromptFlagDetector(ConstantDetector):
    """Scores every token the same, and says how unsafe the prompt is."""

    def __init__(self, score, threshold, prompt_score):
        super().__init__(score, threshold, None)
        self.prompt_score = prompt_score

    def start(self, prompt_ids, hidden=None):
        super().start(prompt_ids, hidden)
        return self.prompt_score


@pytest.mark.parametrize("prompt_score, flag_margin, vigilance, flagged, alarms", [
    (0.9, 0.0, 0.5, True, True),  # flagged: the threshold is 0.5 logits lower, sigmoid(-0.5) = 0.378 <= 0.4
    (0.9, 0.0, 0.0, True, False),  # flagged, the levels kept
    (0.9, 2.0, 0.5, True, True),  # logit(0.9) = 2.20: at least 2 logits above the threshold (logit 0)
    (0.85, 2.0, 0.5, False, False),  # logit(0.85) = 1.73: under the margin
    (0.1, 0.0, 0.5, False, False),  # a calm prompt
    (None, 0.0, 0.5, False, False),  # a detector that does not judge prompts
    (float("nan"), 1.0, 0.5, True, True),  # a prompt score that is not a number counts as flagged (fail closed)
    (0.5, 0.0, 0.5, True, True),  # at the threshold, no margin: flagged
    (1.0, 10.0, 0.5, True, True),  # a score of 1 (a listed word) is flagged whatever the margin
])
def test_a_flagged_prompt_makes_the_generation_vigilant(prompt_score, flag_margin, vigilance, flagged, alarms):
    model, enc = tiny_model(), CharTokenizer()
    s = B.Settings(max_new_tokens=4, temperature=0.0, max_retries=1,
                   policy=Tuned(flag_margin=flag_margin, vigilance=vigilance))
    result = B.generate(model, enc, "abc", PromptFlagDetector(0.4, 0.5, prompt_score), s)
    assert result.stats["vigilant"] == flagged
    assert result.steps[0]["alarm"] == alarms
    expected = 1 / (1 + math.exp(vigilance)) if flagged else 0.5
    assert result.threshold == pytest.approx(expected)


class SafeLevelHashDetector(HashDetector):
    safe_level = 0.2


@given(seed=st.integers(0, 2**16), buffer=st.integers(1, 4), redraw_gate=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       flag_margin=st.sampled_from([0.0, 1.0, 10.0]), max_redraws=st.integers(0, 2), rate=st.sampled_from([0.2, 0.5]))
def test_an_alarm_redraws_only_below_the_redraw_level(seed, buffer, redraw_gate, flag_margin, max_redraws, rate):
    """With graded scores, step by step: an alarm on the first token after the commit point redraws; one
    beyond it redraws exactly when the generation is not vigilant, the token before it scored below the
    redraw level (`redraw_gate` of the way from the safe level to the threshold, in logits) and that
    index was redrawn fewer than max_redraws times; every other alarm rolls back to the commit point.
    The generation is vigilant exactly when the prompt's verdict is flag_margin logits above the threshold."""
    model, enc = tiny_model(seed % 5, n_positions=128), CharTokenizer()
    s = B.Settings(max_new_tokens=12, buffer=buffer, temperature=1.0, seed=seed, max_retries=3, max_rollbacks=30,
                   stop_at_eos=False, policy=Tuned(redraw_pool=16, redraw_gate=redraw_gate, flag_margin=flag_margin,
                                                   max_redraws=max_redraws))
    prompt = "ab" + chr(ord("a") + seed % 26)
    detector = SafeLevelHashDetector(rate)
    verdict = detector.start(enc.encode_ordinary(prompt))
    result = B.generate(model, enc, prompt, detector, s)
    assert result.stats["vigilant"] == (verdict >= 1 / (1 + math.exp(-flag_margin)))  # threshold 0.5: logit 0
    level = level_between(0.2, 0.5, redraw_gate)
    events = {e["step"]: e for e in result.events if e["type"] in ("redraw", "rollback")}
    committed, redraws_at, score_at = 0, {}, {}  # score_at[i]: the score of the token now at index i
    for n, step in enumerate(result.steps):
        e, i = events.get(n), step["index"]
        score_at[i] = step["score"]
        if step["alarm"] and e:
            ahead = (i > committed and not result.stats["vigilant"] and score_at[i - 1] < level
                     and redraws_at.get(i, 0) < max_redraws)
            assert e["type"] == ("redraw" if i == committed or ahead else "rollback"), (n, i, committed)
            if e["type"] == "redraw":  # the bans (and redraws) beyond i go with the discarded token
                redraws_at = {j: k for j, k in redraws_at.items() if j <= i}
                redraws_at[i] = redraws_at.get(i, 0) + (i > committed)
            else:
                redraws_at = {}
        if step["committed"] > committed:
            committed = step["committed"]
            redraws_at = {j: k for j, k in redraws_at.items() if j > committed}
    assert result.stats["redraws"] == sum(e["type"] == "redraw" for e in result.events)
