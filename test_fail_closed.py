"""Failing closed: hostile and broken inputs get one line and exit 2 (or the right behaviour), a
detector that cannot score alarms, no input can hang or eat memory, and writes never destroy."""
import dataclasses
import errno
import json
import math
import os
import re
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import backtrack as B
import backtrack_cli
import checkpoints as CK
import cli
import evaluate as E
import model as M
import report
import detector_files as DF
import scorer as S
from batched import generate_batch
from conftest import (HERE, SHARED, CharTokenizer, ScriptedDetector, sample_as, save_hf_checkpoint, tiny_model, uniform,
                      write_tiny_bpe)
from policy import Classic


class FixedDetector(ScriptedDetector):
    """Gives one score to every token: whatever a broken detector might return."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def score(self, token, hidden):
        self.tokens.append(token)
        return self.value


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny checkpoint with a small real BPE: the command line runs on it without ../shared."""
    directory = str(tmp_path_factory.mktemp("tiny"))
    save_hf_checkpoint(tiny_model(vocab_size=260, n_positions=64), directory)
    write_tiny_bpe(directory)
    return directory


def cli_run(capsys, *argv):
    code = cli.run_cli(backtrack_cli.main, list(argv))
    return code, *capsys.readouterr()


def one_line_error(code, err, message):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------------------------
# A detector fails closed


@given(score=st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.5, 1.5, 1e300, -1e-9]))
def test_a_score_that_is_not_a_probability_is_an_alarm(score):
    """NaN >= threshold is false: without this rule a broken probe would let everything through."""
    model = tiny_model()
    s = B.Settings(policy=Classic(), max_new_tokens=6, temperature=0.0, max_retries=2)
    result = B.generate(model, CharTokenizer(), "abc", FixedDetector(score), s)
    assert result.tokens == [] and result.stop_reason == "budget"
    assert all(step["alarm"] and "not a score in [0, 1]" in step["failed"] for step in result.steps)


@given(values=st.lists(st.one_of(st.floats(-1e6, 1e6), st.sampled_from([1e39, -1e39, 3.5e38, 1e308])),
                       min_size=16, max_size=16), bias=st.sampled_from([0.0, -1e308, 1e308, 5.0]))
def test_probe_files_are_checked_in_the_precision_they_run_in(tmp_path_factory, values, bias):
    """Weights finite in float64 but not in float32 (1e39) would make every score NaN: refused on
    load. A loaded probe's score is always a number in [0, 1] or NaN (an alarm), never an exception,
    even with a bias of -1e308."""
    path = tmp_path_factory.mktemp("probe") / "probe.json"
    path.write_text(json.dumps(dict(layers=[1], window=2, threshold=0.5, bias=bias, weight=[values])))
    fits = all(math.isfinite(v) and abs(v) < 3.4028234e38 for v in values)
    if not fits:
        with pytest.raises(cli.UserError, match="finite in float32"):
            DF.load_probe(str(path))
        return
    probe = DF.load_probe(str(path))
    probe.start([])
    for token in range(3):
        score = probe.score(token, probe.read(torch.randn(1, 3, 16) * 1e3)[0])
        assert math.isnan(score) or 0 <= score <= 1


@given(seed=st.integers(0, 2**16), temperature=st.sampled_from([0.0, 1e-6, 1.1e-6, 1e-3, 1.0, 50.0, 100.0]),
       top_k=st.sampled_from([0, 1, 3]), top_p=st.sampled_from([1.0, 0.9, 1e-9]),
       scale=st.sampled_from([1.0, 1e4, 1e30, 3e38]))
def test_sampling_never_draws_a_banned_token(seed, temperature, top_k, top_p, scale):
    """For every accepted setting, extreme logits included: a banned token is never drawn (-1, a
    fallback, when nothing else can be)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 40, generator=gen) * scale
    banned = [set(torch.randint(0, 40, (k,), generator=gen).tolist()) for k in (0, 1, 5, 39, 0, 20)]
    banned[4] = set(range(40))
    s = B.Settings(temperature=temperature, top_k=top_k, top_p=top_p).check()
    drawn = sample_as(s, logits, uniform([torch.Generator().manual_seed(seed + r) for r in range(6)]), banned)
    assert all(t == -1 or (0 <= t < 40 and t not in ban) for t, ban in zip(drawn, banned))
    assert drawn[4] == -1  # every token banned


@pytest.mark.parametrize("change, message", [
    (dict(temperature=float("inf")), "temperature must be in [0, 100]"),
    (dict(temperature=float("nan")), "temperature must be in [0, 100]"),
    (dict(top_p=float("nan")), "top_p must be in (0, 1]"),
    (dict(seed=-1), "seed must be in [0, 2**63)"),
    (dict(seed=1.5), "seed must be in [0, 2**63)"),
    (dict(seed=None), "seed must be in [0, 2**63)"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be >= 1"),
    (dict(safe_level=1e-320), "safe_level must be in"),
])
def test_settings_that_cannot_be_honoured_are_refused(change, message):
    with pytest.raises(cli.UserError, match=re.escape(message)):
        B.Settings(**change).check()


def test_batched_inputs_are_checked_as_generate_checks_them():
    model, enc = tiny_model(), CharTokenizer()
    for kwargs, message in [(dict(prompts="abc"), "prompts must be a list"),
                            (dict(prompts=["a", "b"], seeds=[-1, 2]), "seed must be in"),
                            (dict(prompts=["a", "b"], seeds=[1.5, 2]), "seed must be in"),
                            (dict(prompts=["a", "b"], seeds=[None, 2]), "seed must be in"),
                            (dict(prompts=["a", "b"], seeds=[1]), "1 seeds for 2 prompts"),
                            (dict(prompts=["a"], batch_size=0), "batch_size must be an integer >= 1"),
                            (dict(prompts=["a", "\ud800"]), "lone surrogate")]:
        with pytest.raises(cli.UserError, match=message):
            generate_batch(model, enc, detector=None, settings=B.Settings(max_new_tokens=2), **kwargs)


def test_a_tokenizer_of_another_model_is_refused():
    """A 97-token tokenizer with a 50,257-token model (or the reverse) does not belong to it; a
    model vocabulary padded by fewer than 128 ids does (nanoGPT's 50304)."""
    with pytest.raises(cli.UserError, match="the tokenizer has 97 tokens but the model 500"):
        B.generate(tiny_model(vocab_size=500), CharTokenizer(), "abc", None, B.Settings(max_new_tokens=2))
    assert B.generate(tiny_model(vocab_size=97 + 127), CharTokenizer(), "abc", None, B.Settings(max_new_tokens=2)).tokens


def test_thresholds_are_representable():
    probe = S.LinearProbe(torch.zeros(16), -1e308, 1, 2, 0.5)
    with pytest.raises(cli.UserError, match="threshold must be a probability between 1e-06"):
        probe.with_threshold(1e-320)
    moved = probe.with_threshold(at_logit=-13.8)  # at the edge: the safe level stays representable too
    assert 0 < moved.safe_level <= moved.threshold
    probe.start([])
    assert probe.score(0, probe.read(torch.ones(1, 3, 16))[0]) == 0.0  # sigmoid(-1e308), not an OverflowError


# ----------------------------------------------------------------------------------------------
# Every input is read with a bound


@pytest.mark.parametrize("kind", ["config", "probe", "wordlist", "prompt-file", "vocabulary"])
def test_device_nodes_and_links_to_them_are_refused_before_reading(tmp_path, kind):
    """/dev/zero never ends: reading it whole grew memory without bound. A link to it is no better."""
    link = tmp_path / "link"
    link.symlink_to("/dev/zero")
    read = {"config": lambda p: cli.read_json(p, "model config"), "probe": DF.load_probe,
            "wordlist": DF.load_wordlist, "prompt-file": cli.read_prompts,
            "vocabulary": lambda p: CK.tokenizer_from_files(p, p)}[kind]
    with pytest.raises(cli.UserError, match="is not a regular file"):
        read(str(link))


def test_files_larger_than_their_kind_allows_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(cli.MAX_BYTES, "prompt file", 100)
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n" * 20)
    with pytest.raises(cli.UserError, match="the prompt file has 120 bytes, more than the 100"):
        cli.read_prompts(str(path))


@pytest.mark.parametrize("where", ["config", "probe", "prompt", "wordlist"])
def test_json_nested_too_deeply_is_one_line(tmp_path, where):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / {"config": "config.json", "probe": "probe.json", "prompt": "p.jsonl", "wordlist": "w.json"}[where]
    path.write_text(deep if where != "prompt" else '{"prompt": ' + deep + "}\n")
    read = {"config": lambda p: cli.read_json(p, "model config"), "probe": DF.load_probe,
            "prompt": cli.read_prompts, "wordlist": DF.load_wordlist}[where]
    with pytest.raises(cli.UserError, match="nested too deeply") as err:
        read(str(path))
    assert "\n" not in str(err.value)


@given(data=st.binary(max_size=300))
def test_random_bytes_are_read_or_refused_in_one_line(tmp_path_factory, data):
    """Whatever the bytes, each reader gives a value or a UserError: never another exception."""
    directory = tmp_path_factory.mktemp("bytes")
    for name, read in [("config.json", CK.read_config),
                       ("words.txt", DF.load_wordlist), ("words.json", DF.load_wordlist), ("words.csv", DF.load_wordlist),
                       ("prompts.txt", cli.read_prompts), ("prompts.JSONL", cli.read_prompts),
                       ("probe.json", DF.load_probe)]:
        path = directory / name
        path.write_bytes(data)
        try:
            read(str(path))
        except cli.UserError as e:
            assert "\n" not in str(e)


def test_jsonl_is_known_by_its_extension_in_any_case(tmp_path):
    path = tmp_path / "prompts.JSONL"
    path.write_text('{"prompt": "hello"}\n')
    assert cli.read_prompts(str(path)) == {1: "hello"}


def test_prompt_files_with_lone_surrogates_fail_before_the_model_loads(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800 text"}\n')
    code, out, err = cli_run(capsys, "--model-dir", str(tmp_path / "no-such-model"), "--prompt-file", str(path))
    one_line_error(code, err, "p.jsonl:2: the prompt holds a lone surrogate")


# ----------------------------------------------------------------------------------------------
# Nothing bad is cached; the fingerprint sees every weight


def test_swapping_two_embedding_rows_changes_the_fingerprint():
    """The old fingerprint sampled every 4711th number, so a model with stupid/lovely swapped kept
    the other model's probe."""
    model = tiny_model()
    before = CK.fingerprint(model)
    with torch.no_grad():
        model.wte.weight[[3, 7]] = model.wte.weight[[7, 3]]
    assert CK.fingerprint(model) != before


def test_the_fingerprint_is_computed_once_per_weights_file(tmp_path, monkeypatch):
    directory = save_hf_checkpoint(tiny_model(), str(tmp_path / "m"))
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    first, in_memory = CK.from_pretrained(directory).fingerprint, CK.fingerprint(tiny_model())
    monkeypatch.setattr(CK, "weights_fingerprint", lambda model: pytest.fail("computed twice"))
    assert CK.from_pretrained(directory).fingerprint == first == in_memory
    save_hf_checkpoint(tiny_model(seed=1), directory)  # another file at the same path: computed anew
    monkeypatch.undo()
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    assert CK.from_pretrained(directory).fingerprint != first


@pytest.mark.parametrize("value, message", [("", "BACKTRACK_CACHE is set but empty"),
                                            ("FILE", "is not a directory")])
def test_a_cache_setting_that_cannot_work_is_one_line(tmp_path, monkeypatch, value, message):
    if value == "FILE":
        value = str(tmp_path / "a-file")
        (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("BACKTRACK_CACHE", value)
    with pytest.raises(cli.UserError, match=message):
        cli.cache_root()


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, monkeypatch, capsys):
    """A read-only cache (here: a folder that cannot be made, under a file; root ignores permissions)."""
    import fitting
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(fitting, "fit_automatic", lambda model, enc, **kw: S.LinearProbe(torch.zeros(16), 0, 1, 2, 0.5))
    assert fitting.probe_for(tiny_model(), CharTokenizer()).threshold == 0.5
    assert "warning: cannot use the probe cache" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Writes never destroy


def test_outputs_are_refused_where_a_write_would_destroy(tmp_path):
    (tmp_path / "input.txt").write_text("keep me\n")
    for path, message in [("/dev/null", "is not a regular file"), (str(tmp_path), "is not a regular file"),
                          (str(tmp_path / "input.txt"), "is a file this run reads")]:
        with pytest.raises(cli.UserError, match=message):
            cli.write_output(path, "new", "--html", inputs=[str(tmp_path / "input.txt")])
    assert (tmp_path / "input.txt").read_text() == "keep me\n"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_link_is_followed_and_kept(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    cli.write_output(str(tmp_path / "link.json"), "new", "--out")
    assert os.path.islink(tmp_path / "link.json") and (tmp_path / "real.json").read_text() == "new"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_part(tmp_path, monkeypatch):
    target = tmp_path / "run.html"
    target.write_text("the old report")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(cli.UserError, match="No space left on device.*the old file, if any, is unchanged"):
        cli.write_output(str(target), "<html>" * 1000, "--html")
    assert target.read_text() == "the old report" and os.listdir(tmp_path) == ["run.html"]


def test_a_full_output_device_is_one_line(model_dir):
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, os.path.join(HERE, "backtrack.py"), "--model-dir", model_dir, "--prompt",
                               "ab", "--no-backtrack", "--max-new-tokens", "3"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: cannot write the output (No space left on device)")


# ----------------------------------------------------------------------------------------------
# The command lines: ranges up front, conflicting options, judges that answer wrongly


def test_numeric_flags_have_ranges(model_dir, capsys, tmp_path):
    base = ["--model-dir", model_dir, "--prompt", "ab", "--max-new-tokens", "2"]
    for argv, message in [(["--threads", "5000"], "more than this machine's"),
                          (["--temperature", "inf"], "--temperature must be in [0, 100]"),
                          (["--temperature", "1e300"], "--temperature must be in [0, 100]"),
                          (["--redraw-pool", "50000", "--threshold", "1e-6"], "--redraw-pool must be in [0, 256]"),
                          (["--threshold", "1e-320"], "--threshold must be a probability between 1e-06"),
                          (["--safe-level", "2"], "--safe-level must be in"),
                          (["--no-backtrack", "--probe", "/nonexistent"], "--probe has no effect with --no-backtrack"),
                          (["--html", "/dev/full"], "--html /dev/full is not a regular file")]:
        code, out, err = cli_run(capsys, *base, *argv)
        one_line_error(code, err, message)


def stub_judge(texts):
    return [0.1] * len(texts)


def short_judge(texts):
    return [0.1]


def wild_judge(texts):
    return [7.5] * len(texts)


def test_evaluate_refuses_what_it_would_misreport():
    for argv, message in [(["--prompts", "0"], "must be >= 1"), (["--samples", "0"], "must be >= 1"),
                          (["--sweep", "-1000"], "between -10 and 10"), (["--sweep", "nan"], "between -10 and 10"),
                          (["--threshold", "1e-320"], "--threshold must be a probability"),
                          (["--judge", "test_fail_closed:short_judge"], "returned 1 scores for 2 texts"),
                          (["--judge", "test_fail_closed:wild_judge"], "7.5 is not a probability")]:
        with pytest.raises(cli.UserError, match=message):
            E.main(argv)
    assert E.load_judge("test_fail_closed:stub_judge")(["a", "b", "c"]) == [0.1] * 3


# ----------------------------------------------------------------------------------------------
# Third round: a detector that fails open, outputs over inputs, hangs, tracebacks, silent flags


@pytest.mark.parametrize("threshold", [float("nan"), 1.5, 1.0, 0.0, -0.1, None, "0.5", float("inf")])
def test_a_detector_that_could_never_alarm_is_refused_up_front(threshold):
    """TextDetector(fn, enc, threshold=nan) never alarmed: 0 alarms, text shown. Its levels are
    checked once, before the first token, in generate and generate_batch alike, the detector named."""
    model, enc = tiny_model(), CharTokenizer()
    detector = S.TextDetector(lambda text: 0.9, enc, threshold=threshold)
    for run in (lambda: B.generate(model, enc, "abc", detector, B.Settings(max_new_tokens=3)),
                lambda: generate_batch(model, enc, ["abc"], detector, B.Settings(max_new_tokens=3))):
        with pytest.raises(cli.UserError, match=r"TextDetector: threshold must be a number in \(0, 1\)"):
            run()
    fine = S.TextDetector(lambda text: 0.9, enc, threshold=0.5)
    classic = B.Settings(max_new_tokens=3, max_rollbacks=1, policy=Classic())
    assert B.generate(model, enc, "abc", fine, classic).stop_reason == "budget"  # it alarms
    with pytest.raises(cli.UserError, match="safe level 0.9 is above TextDetector's threshold 0.5"):
        B.generate(model, enc, "abc", fine, B.Settings(max_new_tokens=3, safe_level=0.9))


def test_settings_and_prompts_of_the_wrong_kind_are_one_line():
    model, enc = tiny_model(), CharTokenizer()
    for given_settings, message in [(dict(max_new_tokens=3), "settings must be a backtrack.Settings, not dict"),
                                    (B.Settings(introspect="template", template=""), "template must be some text"),
                                    (B.Settings(introspect="template", template="   "), "template must be some text")]:
        with pytest.raises(cli.UserError, match=message):
            B.generate(model, enc, "abc", ScriptedDetector([1]), given_settings)
    for prompt in ([True], [1, False], [1.0]):
        with pytest.raises(cli.UserError, match="prompt token ids must be integers"):
            B.generate(model, enc, prompt, None, B.Settings(max_new_tokens=2))


def test_a_probe_with_a_layer_twice_is_refused(tmp_path):
    """--layers 6,6 wrote a probe the loop read with one row only: refused when fitting and on load."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(dict(layers=[1, 1], window=2, threshold=0.5, bias=0.0, weight=[[1.0] * 16] * 2)))
    with pytest.raises(cli.UserError, match="layers must be a list of distinct hidden-state numbers"):
        DF.load_probe(str(path))


def test_train_probe_flags_have_ranges_before_any_work(capsys):
    """--window 2000000 ran on and wrote a probe the loop refuses; --max-rows -1, --batch-size 0,
    --seed -1 and --l2 nan were tracebacks or silent. Each is one line before any model is read."""
    import train_probe as T
    for argv, message in [(["--max-rows", "-1"], "--max-rows must be >= 1, not -1"),
                          (["--batch-size", "0"], "--batch-size must be in [1, 4096], not 0"),
                          (["--seed", "-1"], "--seed must be in [0, 4294967295], not -1"),
                          (["--window", "2000000"], "--window must be in [1, 32], not 2000000"),
                          (["--l2", "nan"], "--l2 must be a finite number >= 0, not nan")]:
        code = cli.run_cli(T.main, ["--model-dir", "/nonexistent"] + argv)
        one_line_error(code, capsys.readouterr().err, message)


def test_train_probe_refuses_a_layer_twice(model_dir, tmp_path, capsys):
    import train_probe as T
    code = cli.run_cli(T.main, ["--model-dir", model_dir, "--layers", "1,1", "--out", str(tmp_path / "p.json")])
    one_line_error(code, capsys.readouterr().err, "--layers 1,1: each hidden state at most once")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["shipped word list", "shipped data", "model config", "model weights", "probe",
                              "prompt file", "cache"]))
def test_no_output_is_a_file_the_run_reads(model_dir, tmp_path_factory, capsys, which):
    """--html over the shipped word list replaced it with a page (and the word list stopped firing);
    --html m/config.json overwrote the model's config. Any output that is one of the run's inputs, or
    inside the model's folder, the shipped data or the cache, is refused before anything is written."""
    tmp = tmp_path_factory.mktemp("inputs")
    prompts, probe = tmp / "prompts.txt", tmp / "probe.json"
    prompts.write_text("ab\n")
    probe.write_text("{}")
    cache = cli.cache_root()
    os.makedirs(cache, exist_ok=True)
    target = {"shipped word list": os.path.join(HERE, "probe_data", "ldnoobw-en.txt"),
              "shipped data": os.path.join(HERE, "probe_data", "curated.jsonl"),
              "model config": os.path.join(model_dir, "config.json"),
              "model weights": os.path.join(model_dir, "model.safetensors"),
              "probe": str(probe), "prompt file": str(prompts),
              "cache": os.path.join(cache, "some-page.html")}[which]
    before = open(target, "rb").read() if os.path.exists(target) else None
    code, out, err = cli_run(capsys, "--model-dir", model_dir, "--prompt-file", str(prompts), "--probe", str(probe),
                             "--max-new-tokens", "2", "--html", target)
    one_line_error(code, err, "this run reads; write to another file")
    assert (open(target, "rb").read() if os.path.exists(target) else None) == before


def test_evaluate_and_train_probe_never_write_over_what_they_read(tmp_path, capsys):
    import train_probe as T
    probe = tmp_path / "p.json"
    probe.write_text("{}")
    (tmp_path / "res-tradeoff.png").mkdir()
    for argv, message in [(["--probe", str(probe), "--out", str(probe)], "--out"),
                          (["--out", str(tmp_path / "res.json")], "--out's trade-off plot"),
                          (["--out", os.path.join(HERE, "probe_data", "x.json")], "this run reads")]:
        code = cli.run_cli(E.main, argv)
        one_line_error(code, capsys.readouterr().err, message)
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhi,0\n")
    cases = [(["--data", str(data), "--text-col", "text", "--label-col", "label", "--positive", "1",
               "--out", str(data)], "a file this run reads")]
    if os.path.isdir(SHARED):
        cases.append((["--export-rtp-train", os.path.join(SHARED, "data", "rtp", "toxic.jsonl")], "this run reads"))
    for argv, message in cases:
        code = cli.run_cli(T.main, ["--shared", SHARED] + argv)
        one_line_error(code, capsys.readouterr().err, message)
    assert data.read_text() == "text,label\nhi,0\n"


def fitted_probes(monkeypatch):
    """fit_automatic replaced by a quick probe that can alarm; returns the list of fits made."""
    import fitting
    fits = []

    def fit(model, enc, **kw):
        fits.append(kw.get("cached", True))
        return S.LinearProbe(torch.ones(16), 0.0, 1, 2, 0.5, meta=dict(model="tiny", fingerprint=CK.fingerprint(model)))
    monkeypatch.setattr(fitting, "fit_automatic", fit)
    return fits


def test_the_probe_cache_holds_only_what_the_fit_wrote(tmp_path, monkeypatch, capsys):
    """Hand-edited cached probes that could never fire (bias -1e300, zero weights) or that differ in any
    byte from what the fit wrote are fitted again; a planted link (to a file elsewhere) is never written
    through, neither by the save nor by the lock; a read-only cache with a valid probe is used as it is."""
    import fitting
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    fits, model, enc = fitted_probes(monkeypatch), tiny_model(), CharTokenizer()
    first = fitting.probe_for(model, enc)
    assert fits == [True] and fitting.probe_for(model, enc).threshold == first.threshold and fits == [True]
    path = next((tmp_path / "cache" / "probes").glob("*.json"))
    for edit in (dict(bias=-1e300), dict(weight=[[0.0] * 16]), dict(threshold=0.999999)):
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **edit)))
        fitting.probe_for(model, enc)
        assert "unusable" in capsys.readouterr().err and len(fits) == 2, edit
        fits.pop()
        assert json.loads(path.read_text()).get("bias") == 0.0  # the refit replaced it
    victim = tmp_path / "victim.txt"
    for planted in (path, path.with_name(path.name + ".lock")):
        victim.write_text("precious")
        os.remove(planted)
        os.symlink(victim, planted)
        fitting.probe_for(model, enc)
        assert victim.read_text() == "precious" and not os.path.islink(path), planted
    before = len(fits)
    os.chmod(tmp_path / "cache" / "probes", 0o555)
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if str(p).endswith(".lock") else os_open(p, *a, **k))
    try:
        assert fitting.probe_for(model, enc).threshold == first.threshold and len(fits) == before  # no refit
    finally:
        os.chmod(tmp_path / "cache" / "probes", 0o755)


os_open = os.open


def test_an_unusable_cache_says_the_fit_will_run_again(tmp_path, monkeypatch, capsys):
    """HOME=/dev/null refitted every run while saying "only once": the message now says it is not cached."""
    import fitting
    monkeypatch.setenv("HOME", "/dev/null")
    monkeypatch.delenv("BACKTRACK_CACHE", raising=False)
    fits = fitted_probes(monkeypatch)
    fitting.probe_for(tiny_model(), CharTokenizer())
    assert fits == [False] and "fitting without it, and again on the next run" in capsys.readouterr().err


def test_a_second_first_run_says_it_waits_for_the_first(tmp_path, monkeypatch, capsys):
    import fcntl
    import fitting
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    fitted_probes(monkeypatch)
    model, enc = tiny_model(), CharTokenizer()
    lock_path = os.path.join(str(tmp_path / "cache"), "probes", f"{CK.fingerprint(model)}-{fitting.recipe()}.json.lock")
    os.makedirs(os.path.dirname(lock_path))
    holder = open(lock_path, "w")
    fcntl.flock(holder, fcntl.LOCK_EX)
    worker = threading.Thread(target=fitting.probe_for, args=(model, enc))
    worker.start()
    time.sleep(1.0)
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    worker.join(30)
    assert "another process is fitting this model's probe; waiting" in capsys.readouterr().err


def test_an_edit_in_place_that_keeps_size_and_mtime_changes_the_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    directory = save_hf_checkpoint(tiny_model(), str(tmp_path / "m"))
    weights = os.path.join(directory, "model.safetensors")
    first = CK.from_pretrained(directory).fingerprint
    info = os.stat(weights)
    other = tmp_path / "other"
    save_hf_checkpoint(tiny_model(seed=1), str(other))
    with open(weights, "r+b") as f:  # the same size, written in place, the mtime set back
        f.write((other / "model.safetensors").read_bytes())
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert os.stat(weights).st_mtime_ns == info.st_mtime_ns and os.stat(weights).st_ino == info.st_ino
    assert CK.from_pretrained(directory).fingerprint != first


def test_a_judge_is_called_under_a_guard_and_a_timeout(tmp_path, monkeypatch):
    """A judge module with a syntax error, one that raises on import, a function that raises or hangs
    on the real call: each one line naming the judge (and a hang given up after the timeout)."""
    (tmp_path / "broken_judge.py").write_text("def judge(texts):\n    return [0.1 for t in texts\n")
    (tmp_path / "raising_judge.py").write_text("raise RuntimeError('no model here')\n")
    (tmp_path / "later_judge.py").write_text(
        "import time\ncalls = []\ndef fails(texts):\n    calls.append(1)\n    if len(calls) > 1:\n"
        "        raise RuntimeError('the service went away')\n    return [0.1] * len(texts)\n"
        "def hangs(texts):\n    calls.append(1)\n    if len(calls) > 1:\n        time.sleep(60)\n    return [0.1] * len(texts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, message in [("broken_judge:judge", "importing broken_judge failed (SyntaxError"),
                          ("raising_judge:judge", "importing raising_judge failed (RuntimeError: no model here)")]:
        with pytest.raises(cli.UserError, match=re.escape(message)):
            E.load_judge(name)
    import later_judge
    judge = E.load_judge("later_judge:fails")
    with pytest.raises(cli.UserError, match=r"--judge later_judge:fails failed \(RuntimeError: the service went away\)"):
        judge(["a", "b"])
    later_judge.calls.clear()
    judge = E.load_judge("later_judge:hangs", timeout=1)
    started = time.time()
    with pytest.raises(cli.UserError, match="did not answer within 1 s for 2 texts"):
        judge(["a", "b"])
    assert time.time() - started < 10


@pytest.mark.parametrize("name, value, message", [
    ("HF_HUB_ETAG_TIMEOUT", "2.5", "give a whole number of seconds"),
    ("HF_HUB_ETAG_TIMEOUT", "abc", "give a whole number of seconds"),
    ("HF_HUB_DOWNLOAD_TIMEOUT", "-1", "give a whole number of seconds"),
    ("HF_ENDPOINT", "ftp://mirror", "give an http(s) URL"),
    ("HF_HUB_OFFLINE", "perhaps", "give 1 or 0"),
])
def test_hub_environment_is_checked_before_huggingface_hub_is_imported(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # importing it now would fail: it must not be tried
    with pytest.raises(cli.UserError, match=re.escape(f"{name}={value!r}: {message}")):
        CK.download_checkpoint("openai-community/gpt2")


def test_bench_batch_sizes_are_one_line(capsys):
    import bench
    for value, message in [("x", "give comma-separated integers"), ("0", "each must be in [1, 4096]"),
                           ("8,", "give comma-separated integers"), ("5000", "each must be in [1, 4096]")]:
        code = cli.run_cli(bench.main, ["--batch-sizes", value])
        one_line_error(code, capsys.readouterr().err, message)


def test_evaluate_checks_its_inputs_before_the_first_token(model_dir, monkeypatch, capsys, tmp_path):
    """--ppl-model with a smaller vocabulary or context was found out only after generation and
    judging; --batch-size 500 died under a memory limit; --top-p 0 named a Settings field."""
    small = save_hf_checkpoint(tiny_model(vocab_size=97, n_positions=64), str(tmp_path / "small"))
    model, _ = CK.load(model_dir)
    with pytest.raises(cli.UserError, match="it cannot score these texts"):
        E.check_ppl_model(small, model, "cpu")
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1000}[name])
    with pytest.raises(cli.UserError, match="--batch-size 500 needs a KV cache of .* use at most"):
        E.check_batch_memory(model, 500)
    monkeypatch.undo()
    code = cli.run_cli(E.main, ["--top-p", "0", "--judge", "test_fail_closed:stub_judge", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "--top-p must be in (0, 1]" in err


def test_a_closed_or_ascii_only_stdout_is_no_traceback(model_dir):
    """stdout closed (`>&-`) was an AttributeError with the text silently lost; PYTHONIOENCODING=ascii
    with a non-ASCII prompt was a UnicodeEncodeError, plain and with --trace."""
    script = os.path.join(HERE, "backtrack.py")
    closed = subprocess.run(["sh", "-c", f'"{sys.executable}" "{script}" --help >&-'], capture_output=True, text=True)
    assert closed.returncode == 2 and "Traceback" not in closed.stderr
    assert closed.stderr.strip() == "error: standard output is closed, so nothing could be shown; redirect it to a " \
                                    "file or /dev/null"
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    for extra in ([], ["--trace"]):
        done = subprocess.run([sys.executable, script, "--model-dir", model_dir, "--prompt", "caf\u00e9 \u2615",
                               "--no-backtrack", "--max-new-tokens", "3", *extra], capture_output=True, text=True,
                              env=env)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert "caf\\xe9" in done.stdout


def test_control_characters_are_shown_not_obeyed(model_dir, capsys, monkeypatch, tmp_path):
    """`--prompt $'\\e]0;PWNED\\a\\e[2J'` set the terminal's title and cleared its screen: on a terminal,
    control characters other than newline and tab are shown as escapes; so are ESC, NUL and bidi
    overrides on the page. --json stays exact."""
    hostile = "\x1b]0;PWNED\x07\x1b[2J ab\u202e cd\x00"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = cli_run(capsys, "--model-dir", model_dir, "--prompt", hostile, "--no-backtrack",
                             "--max-new-tokens", "2")
    assert code == 0 and "\\x1b]0;PWNED\\x07\\x1b[2J" in out and "\\u202e" in out
    assert not report.UNSAFE.search(out)
    page = tmp_path / "p.html"
    code, out, err = cli_run(capsys, "--model-dir", model_dir, "--prompt", hostile, "--no-backtrack",
                             "--max-new-tokens", "2", "--json", "--html", str(page))
    assert code == 0 and json.loads(out)["prompt"] == hostile  # exact
    assert not report.UNSAFE.search(page.read_text(encoding="utf-8")) and "\\x1b]0;PWNED" in page.read_text()


def test_json_has_no_bare_nan_and_says_why(capsys):
    """A detector that could not score gave `NaN` in --json (JSON.parse rejects it) and `nan` in the chart."""
    enc = CharTokenizer()
    steps = [dict(index=0, token=33, score=float("nan"), alarm=True, draw=0.5, committed=0,
                  failed="the detector gave nan, not a score in [0, 1]")]
    result = B.Result("", [], [], steps, [], dict(tokens_kept=0, tokens_generated=1, rollbacks=0, redraws=0,
                                                  tokens_per_second=1.0), "budget", [], 0.5, 0.3)
    line = json.dumps(report.json_record("p", result, enc, B.Settings()), allow_nan=False)
    assert json.loads(line)["steps"][0]["score"] is None and "not a score" in json.loads(line)["steps"][0]["failed"]
    chart = report.score_chart(steps, 0.5, 0.3)
    assert not re.search(r'="[^"]*nan', chart) and "<circle" in chart  # coordinates are numbers; the dot stays


def test_flags_the_detector_would_ignore_are_refused(model_dir, capsys, tmp_path):
    words = tmp_path / "w.txt"
    words.write_text("ab\n")
    base = ["--model-dir", model_dir, "--prompt", "ab", "--max-new-tokens", "2"]
    for argv, message in [(["--detector", "keywords", "--wordlist", str(words), "--threshold", "0.5"],
                           "--threshold has no effect with --detector keywords"),
                          (["--detector", "keywords", "--wordlist", str(words), "--probe", "/nonexistent.json"],
                           "--probe has no effect with --detector keywords"),
                          (["--detector", "probe", "--wordlist", str(words)], "--wordlist has no effect with --detector probe")]:
        code, out, err = cli_run(capsys, *base, *argv)
        one_line_error(code, err, message)


def test_a_cr_only_prompt_file_is_three_prompts(tmp_path):
    path = tmp_path / "old-mac.txt"
    path.write_bytes(b"one\rtwo\r\rthree\r")
    assert cli.read_prompts(str(path)) == {1: "one", 2: "two", 4: "three"}


def test_stopped_half_way_the_page_keeps_the_prompts_that_finished(model_dir, capsys, monkeypatch, tmp_path):
    """SIGTERM during --prompt-file ... --html wrote no page: now the finished prompts are on it."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("ab\nba\nab ab\n")
    calls = []
    real = backtrack_cli.generate

    def stopped_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt(143)
        return real(*args, **kwargs)
    monkeypatch.setattr(backtrack_cli, "generate", stopped_on_the_third)
    page = tmp_path / "run.html"
    code, out, err = cli_run(capsys, "--model-dir", model_dir, "--prompt-file", str(prompts), "--no-backtrack",
                             "--max-new-tokens", "2", "--html", str(page))
    assert code == 143 and "(2 of 3 prompts)" in err
    assert page.read_text().count("<section>") == 2


def test_a_text_detectors_function_is_called_under_a_guard():
    """Any callable a user hands in (here: a text detector's function) is called under a guard that
    names it, with a timeout: an exception or a hang is one line; an answer that is not a number is
    an alarm, never text let through."""
    model, enc = tiny_model(), CharTokenizer()
    settings = B.Settings(max_new_tokens=3, max_rollbacks=2, policy=Classic())

    def raises(text):
        raise RuntimeError("the guard service is down")

    def hangs(text):
        time.sleep(30)

    for fn, timeout, message in [(raises, 5, "its function test_a_text_detectors_function_is_called_under_a_guard."
                                              "<locals>.raises failed (RuntimeError: the guard service is down)"),
                                 (hangs, 0.5, "gave no answer within 0.5 s")]:
        with pytest.raises(cli.UserError, match=re.escape(message)):
            B.generate(model, enc, "abc", S.TextDetector(fn, enc, timeout=timeout), settings)
    for answer in ("safe, I think", "0.0", False, None, [0.0]):  # not a number: an alarm at every token
        result = B.generate(model, enc, "abc", S.TextDetector(lambda text: answer, enc), settings)
        assert result.steps and all(s["alarm"] and "not a score" in s["failed"] for s in result.steps), answer
        assert result.tokens == [] and result.stop_reason == "budget"

    def exits(text):
        raise SystemExit(3)
    started = time.time()  # SystemExit in the function waited out the whole timeout
    with pytest.raises(cli.UserError, match=r"failed \(SystemExit: 3\)"):
        B.generate(model, enc, "abc", S.TextDetector(exits, enc, timeout=30), settings)
    assert time.time() - started < 10
    for timeout in (float("nan"), 1e300, -1, 0, True, "5"):  # raw ValueError, OverflowError or a race before
        with pytest.raises(cli.UserError, match="timeout must be a number of seconds in"):
            S.TextDetector(len, enc, timeout=timeout)


def test_memory_limits_below_the_machines_are_respected(model_dir, monkeypatch):
    """A batch whose KV cache fits the machine but not the process's limit (ulimit -v, a container's
    memory.max) was killed mid-run: the limit is read, and an allocation that fails anyway is one line."""
    import resource
    model, _ = CK.load(model_dir)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (64 << 20, resource.RLIM_INFINITY))
    assert cli.memory_available() == 64 << 20
    with pytest.raises(cli.UserError, match="more than half of the 0.1 GiB this process may use"):
        E.check_batch_memory(model, 4096)
    monkeypatch.undo()
    monkeypatch.setattr(M.GPT, "new_cache", lambda self, **kw: (_ for _ in ()).throw(
        RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    with pytest.raises(cli.UserError, match="cannot allocate the KV cache of 2 rows .* use a smaller batch size"):
        generate_batch(tiny_model(), CharTokenizer(), ["ab", "cd"], None, B.Settings(max_new_tokens=2))


def test_counts_that_would_never_finish_are_refused(capsys):
    import bench
    for main, argv, message in [(E.main, ["--samples", "1000000"], "--samples must be >= 1 and at most 1000"),
                                (E.main, ["--batch-size", "100000"], "--batch-size must be >= 1 and at most 4096"),
                                (bench.main, ["--repeats", "1000000"], "at most 100"),
                                (bench.main, ["--refill", "1000"], "at most 64"),
                                (bench.main, ["--flips", "-1"], "--flips must be")]:
        code = cli.run_cli(main, argv)
        one_line_error(code, capsys.readouterr().err, message)


# ----------------------------------------------------------------------------------------------
# The levels a generation uses are checked where they are used


class Misbehaving(ScriptedDetector):
    """A scripted detector (alarms on its chosen tokens) with one fault a user's own detector might have."""

    def __init__(self, alarm_tokens, fault):
        super().__init__(alarm_tokens)
        self.fault = fault

    def __len__(self):  # a detector that tests false: it is still a detector
        return 0 if self.fault == "tests false" else 1

    def start(self, prompt_ids, hidden=None):
        super().start(prompt_ids, hidden)
        self.threshold = {"start: NaN": float("nan"), "start: 2.0": 2.0, "start: 0": 0.0}.get(self.fault, self.threshold)

    def clone(self):
        if self.fault == "clone: None":
            return None  # a missing `return`
        if self.fault == "clone: another kind":
            return ScriptedDetector(self.alarm_tokens)
        if self.fault == "clone: itself":
            return self
        twin = super().clone()
        twin.threshold = {"clone: NaN": float("nan"), "clone: 2.0": 2.0}.get(self.fault, twin.threshold)
        return twin


class LoosePolicy(Classic):
    """A user's policy whose levels could never alarm, or would show what an alarm takes back."""

    def __init__(self, fault):
        self.fault = fault

    def levels(self, detector, verdict, safe_level):
        levels = super().levels(detector, verdict, safe_level)
        changes = {"levels: 5.0": dict(threshold=5.0), "levels: NaN": dict(threshold=float("nan")),
                   "levels: safe above threshold": dict(safe_level=0.9), "levels: None": None}
        if self.fault not in changes:
            return levels
        return None if changes[self.fault] is None else dataclasses.replace(levels, **changes[self.fault])


FAULTS = ["none", "tests false", "start: NaN", "start: 2.0", "start: 0", "clone: None", "clone: another kind",
          "clone: itself", "clone: NaN", "clone: 2.0", "levels: 5.0", "levels: NaN", "levels: safe above threshold",
          "levels: None"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fault=st.sampled_from(FAULTS), alarm_tokens=st.sets(st.integers(0, 95), min_size=5, max_size=60),
       seeds=st.lists(st.integers(0, 1000), min_size=1, max_size=3), buffer=st.integers(0, 3))
def test_misbehaving_detectors_and_policies_never_release_what_a_correct_one_stops(fault, alarm_tokens, seeds, buffer):
    """Whatever the fault (levels changed by start(), a policy's levels, clones that are None, another
    kind, the detector itself or with other levels, a detector that tests false), generate and
    generate_batch either refuse it in one UserError or keep no token the detector alarms on."""
    model, enc = tiny_model(), CharTokenizer()
    policy = LoosePolicy(fault) if fault.startswith("levels") else Classic()
    s = B.Settings(max_new_tokens=8, buffer=buffer, policy=policy, max_retries=3, max_rollbacks=6)
    runs = [lambda: [B.generate(model, enc, "ab", Misbehaving(alarm_tokens, fault), dataclasses.replace(s, seed=seeds[0]))],
            lambda: generate_batch(model, enc, ["ab"] * len(seeds), Misbehaving(alarm_tokens, fault), s, seeds=seeds,
                                   batch_size=2)]
    for run in runs:
        try:
            results = run()
        except cli.UserError as e:
            assert fault != "none" and fault != "tests false" and "\n" not in str(e)
            continue
        assert fault in ("none", "tests false") or (run is runs[0] and fault.startswith("clone")), fault
        for r in results:
            assert not set(r.tokens) & alarm_tokens and r.steps


class ByteChunks:
    """A tokenizer whose token i is the i-th of some byte strings: any split of a text into tokens."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode_single_token_bytes(self, token):
        return self.pieces[token]


@pytest.mark.parametrize("term", ["\U0001F595", "\u6b7b\u306d", "\u50bb\u903c", "fu\u00dfball", "caf\u00e9"])
def test_a_listed_term_ending_in_a_character_split_across_tokens_fires(term):
    """A byte-level BPE splits an emoji or a CJK word into tokens of a byte or a few: the term fires at
    the token that completes its last character, once, whatever the split (defect: the text before the
    newest token was decoded with replacement characters, so the match never looked new)."""
    data = ("a " + term + " b").encode()
    for size in (1, 2, 3, 5):
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        detector = S.KeywordDetector([term], ByteChunks(pieces))
        detector.start([])
        scores = [detector.score(t) for t in range(len(pieces))]
        completes = next(t for t in range(len(pieces)) if len(b"".join(pieces[:t + 1])) >= len(("a " + term).encode()))
        assert scores.index(1.0) == completes and sum(scores) == 1.0, (term, size, scores)


@pytest.mark.parametrize("encoding, bom, refused", [
    ("utf-16-le", b"", True), ("utf-16-be", b"", True), ("utf-32-le", b"\xff\xfe\x00\x00", False),
    ("utf-32-be", b"\x00\x00\xfe\xff", False), ("utf-16-le", b"\xff\xfe", False), ("utf-8", b"\xef\xbb\xbf", False)])
def test_a_word_list_is_read_in_its_own_encoding_or_refused(tmp_path, encoding, bom, refused):
    """A list read in the wrong encoding holds terms with NULs that no text matches: the detector would
    never fire. UTF-16 without a byte-order mark is refused; UTF-32 with one is read as UTF-32."""
    path = tmp_path / "words.txt"
    path.write_bytes(bom + "fuck\nshit\n".encode(encoding))
    if refused:
        with pytest.raises(cli.UserError, match="not clean text"):
            DF.load_wordlist(str(path))
    else:
        assert DF.load_wordlist(str(path)) == ["fuck", "shit"]
    path.write_bytes("fuck\n\ufffd\n".encode())
    with pytest.raises(cli.UserError, match=r"holds \\ufffd"):
        DF.load_wordlist(str(path))


@pytest.mark.parametrize("script, flag, target", [
    ("backtrack", "--html", "scorer.py"), ("backtrack", "--html", "backtrack.py"), ("evaluate", "--out", "report.py"),
    ("train_probe", "--out", "fitting.py"), ("train_probe", "--export-rtp-train", "probe_data/ldnoobw-en.txt"),
    ("train_probe", "--out", "probe_data/insults-en.txt"), ("train_probe", "--out", "probe_data/generated.jsonl"),
    ("train_probe", "--export-generated", "probe_data/insults-en.txt"), ("backtrack", "--html", "a loaded module")])
def test_no_output_replaces_the_programs_own_files(model_dir, tmp_path, monkeypatch, capsys, script, flag, target):
    """--html scorer.py replaced a module (every later run a traceback); --export-rtp-train over the
    shipped obscenity list made `fuck` never fire. The program's modules, every module it loaded and
    probe_data/ are refused before anything runs. The program's folder is a copy here, so that a
    regression breaks the copy, not the checkout (or torch)."""
    import train_probe as T
    program = tmp_path / "program"
    (program / "probe_data").mkdir(parents=True)
    for name in ["scorer.py", "backtrack.py", "report.py", "fitting.py"] + [
            os.path.join("probe_data", n) for n in ("ldnoobw-en.txt", "insults-en.txt", "generated.jsonl")]:
        (program / name).write_bytes(open(os.path.join(HERE, name), "rb").read())
    monkeypatch.setattr(cli, "HERE", str(program))
    (tmp_path / "loaded_here.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import loaded_here  # noqa: F401  (a module of the running program, outside its folder)
    path = str(tmp_path / "loaded_here.py") if target == "a loaded module" else str(program / target)
    before = open(path, "rb").read()
    argv = {"backtrack": ["--model-dir", model_dir, "--prompt", "ab", "--max-new-tokens", "2", "--no-backtrack"],
            "evaluate": ["--model-dir", model_dir], "train_probe": ["--model-dir", model_dir, "--shared", SHARED]}[script]
    main = {"backtrack": backtrack_cli.main, "evaluate": E.main, "train_probe": T.main}[script]
    code = cli.run_cli(main, argv + [flag, path])
    one_line_error(code, capsys.readouterr().err, "write to another file")
    assert open(path, "rb").read() == before
    sys.modules.pop("loaded_here")


@pytest.mark.parametrize("target", ["/dev/stdout", "/dev/stderr", "fifo", "link to stdout"])
def test_an_output_through_a_pipe_is_refused_before_the_run(model_dir, tmp_path, target):
    """--html /dev/stdout | cat passed the check (its real path, pipe:[n], does not exist) and lost the
    page to a traceback after the whole run: what a path stands for is checked, through links, first."""
    if target == "fifo":
        target = str(tmp_path / "fifo")
        os.mkfifo(target)
    elif target == "link to stdout":
        os.symlink("/dev/stdout", tmp_path / "out.json")
        target = str(tmp_path / "out.json")
    for argv in (["backtrack.py", "--model-dir", model_dir, "--prompt", "ab", "--max-new-tokens", "2", "--no-backtrack",
                  "--html", target], ["evaluate.py", "--model-dir", model_dir, "--out", target]):
        done = subprocess.run([sys.executable, *argv], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=300)  # stdout and stderr are pipes, as in `| cat`
        one_line_error(done.returncode, done.stderr, "is not a regular file")


def test_an_output_name_too_long_to_write_beside_is_refused_first(model_dir, tmp_path, capsys):
    """A name of 242-255 bytes is a valid file name, but not its temporary `<name>.<8>.part`: an OSError
    traceback came after the run. 241 bytes are written."""
    code, out, err = cli_run(capsys, "--model-dir", model_dir, "--prompt", "ab", "--max-new-tokens", "2",
                             "--no-backtrack", "--html", str(tmp_path / ("x" * 242)))
    one_line_error(code, err, "the file name is 242 bytes, more than the 241")
    code, out, err = cli_run(capsys, "--model-dir", model_dir, "--prompt", "ab", "--max-new-tokens", "2",
                             "--no-backtrack", "--html", str(tmp_path / ("x" * 241)))
    assert code == 0 and os.path.getsize(tmp_path / ("x" * 241)) > 0, err


def test_a_link_in_the_cache_is_never_written_through(model_dir, tmp_path, monkeypatch, capsys):
    """$BACKTRACK_CACHE/fingerprints.json as a link: every run (even --no-backtrack) overwrote the
    link's target with the fingerprint index. The link is replaced by a file of the cache's own."""
    cache = tmp_path / "cache"
    cache.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    os.symlink(victim, cache / "fingerprints.json")
    monkeypatch.setenv("BACKTRACK_CACHE", str(cache))
    code, out, err = cli_run(capsys, "--model-dir", model_dir, "--prompt", "ab", "--max-new-tokens", "2",
                             "--no-backtrack")
    assert code == 0, err
    assert victim.read_text() == "keep me" and not os.path.islink(cache / "fingerprints.json")
    assert json.loads((cache / "fingerprints.json").read_text())


TIKTOKEN_OFFLINE = """
import os, sys, tiktoken, tiktoken.load
shared = sys.argv[1]
tiktoken.load.read_file = lambda url: open(os.path.join(shared, "gpt2", url.rsplit("/", 1)[1]), "rb").read()
import checkpoints
enc = checkpoints.load_tokenizer(None)
print(enc.encode_ordinary("hello world"), os.environ["TIKTOKEN_CACHE_DIR"])
"""


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "gpt2")), reason="needs ../shared/gpt2 (GPT-2's BPE files)")
def test_tiktokens_cache_is_our_own_and_checked(tmp_path):
    """tiktoken's machine-wide cache (a FIFO there hung every run, a link to /dev/zero read until
    MemoryError, the variable naming a file was a traceback): GPT-2's files go to a cache of our own,
    where anything but a regular file of a few MB is removed before tiktoken reads it."""
    import hashlib
    cache = tmp_path / "cache" / "tiktoken"
    cache.mkdir(parents=True)
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    os.mkfifo(cache / hashlib.sha1((base + "vocab.bpe").encode()).hexdigest())
    os.symlink("/dev/zero", cache / hashlib.sha1((base + "encoder.json").encode()).hexdigest())
    (tmp_path / "a-file").write_text("")
    env = dict(os.environ, BACKTRACK_CACHE=str(tmp_path / "cache"), TIKTOKEN_CACHE_DIR=str(tmp_path / "a-file"))
    done = subprocess.run([sys.executable, "-c", TIKTOKEN_OFFLINE, SHARED], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split("] ") == ["[31373, 995", str(tmp_path / "a-file") + "\n"], done.stderr[-2000:]
    assert all(os.path.isfile(cache / name) and not os.path.islink(cache / name) for name in os.listdir(cache))


def test_settings_changed_while_a_run_goes_take_effect_on_the_next_run():
    """Settings changed from inside on_release took effect mid-run (or raised a raw IndexError): a run
    uses a copy of its settings, generate and generate_batch alike."""
    model, enc = tiny_model(), CharTokenizer()
    s = B.Settings(max_new_tokens=12, buffer=2, seed=4)
    plain = B.generate(model, enc, "abc", ScriptedDetector({5, 9, 40}), s)

    def meddle(text):
        s.buffer, s.max_new_tokens, s.top_p, s.policy.redraw_pool = 0, 1000, 1e-9, 0
    meddled = B.generate(model, enc, "abc", ScriptedDetector({5, 9, 40}), s, on_release=meddle)
    assert meddled.tokens == plain.tokens and meddled.events == plain.events and s.max_new_tokens == 1000


def test_a_probe_is_never_cached_without_its_digest(tmp_path, monkeypatch):
    """Stopped between the two writes (SIGKILL), the cache held a probe without its .sha256: never used,
    fitted again from scratch. The digest is written first, so the cache never holds a probe without
    it; and BACKTRACK_CACHE='~/x' (quoted, so not expanded by the shell) is the home folder's x."""
    import fitting
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("BACKTRACK_CACHE", "~/cache")
    assert cli.cache_root() == str(tmp_path / "cache")
    fits, model, enc = fitted_probes(monkeypatch), tiny_model(), CharTokenizer()
    real = fitting.write_output

    def killed_at_the_probe(path, text, option, *args):
        if option == "probe":
            raise KeyboardInterrupt(137)
        return real(path, text, option, *args)
    monkeypatch.setattr(fitting, "write_output", killed_at_the_probe)
    with pytest.raises(KeyboardInterrupt):
        fitting.probe_for(model, enc)
    probes = tmp_path / "cache" / "probes"
    assert not list(probes.glob("*.json")) and list(probes.glob("*.json.sha256"))
    monkeypatch.setattr(fitting, "write_output", real)
    fitting.probe_for(model, enc)
    path = next(probes.glob("*.json"))
    assert cli.file_digest(str(path)) + "\n" == path.with_name(path.name + ".sha256").read_text() and len(fits) == 2


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="needs ../shared (RTP prompts)")
def test_evaluate_names_its_own_options_and_writes_strict_json(model_dir, cli_model, tmp_path, monkeypatch, capsys):
    """A --sweep offset that moves the threshold out of range named an internal function
    (with_threshold); a run of the same --out over another number of processes started over and left
    the old files; --out held bare NaN (not JSON). Each is now the run's own one line, or null."""
    monkeypatch.setattr(E, "probe_for", lambda model, enc, path=None: S.LinearProbe(torch.ones(16), 0.0, 1, 2, 0.5))
    common = ["--model-dir", model_dir, "--shared", SHARED, "--protocol", "quick", "--prompts", "1", "--samples", "1",
              "--max-new-tokens", "2", "--judge", "test_fail_closed:stub_judge", "--wordlist",
              os.path.join(HERE, "probe_data", "insults-en.txt")]
    code = cli.run_cli(E.main, common + ["--threshold", "0.999", "--sweep", "10", "--out", str(tmp_path / "a.json")])
    err = capsys.readouterr().err.splitlines()[-1] + "\n"  # after the note that one prompt is too few
    one_line_error(code, err, "--sweep +10: the probe's threshold 0.999 moved +10 logits")
    (tmp_path / "b.json.rank1.partial.jsonl").write_text("{}\n")
    code = cli.run_cli(E.main, common + ["--out", str(tmp_path / "b.json")])
    one_line_error(code, capsys.readouterr().err, "made by several processes; resume that run with as many")
    common[1] = cli_model  # a context that holds RTP's prompts
    code = cli.run_cli(E.main, common + ["--strategies", "plain,default", "--sweep", "", "--out", str(tmp_path / "c.json")])
    assert code == 0, capsys.readouterr().err
    strict = json.loads((tmp_path / "c.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in --out"))
    assert strict["metrics"]
