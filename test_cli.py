"""The command lines: backtrack.py and train_probe.py, run as a user runs them."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import backtrack as B
import backtrack_cli
import checkpoints as CK
import cli
import fitting as FIT
import detector_files as DF
import scorer as S
import train_probe as T
from policy import Classic, Tuned
from conftest import HERE, run_cli

pytestmark = pytest.mark.slow  # command lines run as a user runs them: processes, files, the real tokenizer


def test_cli_json_output_parses(cli_model, capsys):
    code, out, err = run_cli(capsys, "--model-dir", cli_model, "--prompt", "Hello world", "--detector", "keywords",
                             "--wordlist", os.path.join(cli_model, "words.txt"), "--max-new-tokens", "8", "--json",
                             "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt"] == "Hello world" and len(result["tokens"]) <= 8
    assert set(result["stats"]) >= {"tokens_generated", "tokens_kept", "forward_passes", "rollbacks",
                                    "avg_wait_tokens", "seconds", "tokens_per_second"}
    assert all(0 <= s <= 1 for s in result["scores"])
    # which model, weights and detector made it, so saved runs can be told apart
    assert result["source"] == dict(model=cli_model, fingerprint=CK.fingerprint(CK.from_pretrained(cli_model)),
                                    detector="keywords", probe=None)
    assert result["settings"]["max_new_tokens"] == 8 and result["settings"]["policy"]["name"] == "tuned"


def test_cli_streams_trace_and_prompt_files(cli_model, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "--model-dir", cli_model, "--prompt", "Hello", "--no-backtrack", "--max-new-tokens", "5")
    assert code == 0 and out.startswith("Hello")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": {"text": "One"}}) + "\n" + json.dumps({"prompt": "Two"}) + "\n")
    code, out, _ = run_cli(capsys, "--model-dir", cli_model, "--prompt-file", str(prompts), "--json",
                           "--no-backtrack", "--max-new-tokens", "3")
    assert code == 0 and [json.loads(line)["prompt"] for line in out.splitlines()] == ["One", "Two"]
    code, out, _ = run_cli(capsys, "--model-dir", cli_model, "--prompt", "the", "--detector", "keywords",
                           "--wordlist", os.path.join(cli_model, "words.txt"), "--trace", "--max-new-tokens", "6")
    assert code == 0 and "final:" in out and "\033[" not in out  # no colour when not a terminal


def test_cli_bad_inputs_exit_2_with_one_line(cli_model, capsys, tmp_path):
    other = tmp_path / "probe.json"
    DF.save_probe(S.LinearProbe(torch.zeros(16), 0.0, 1, 4, 0.5, meta=dict(model="x", fingerprint="0" * 16)), str(other))
    wide = tmp_path / "wide.json"
    DF.save_probe(S.LinearProbe(torch.zeros(32), 0.0, 1, 4, 0.5, meta=dict(model="x", fingerprint="0" * 16)), str(wide))
    (tmp_path / "bad-utf8.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "fine"}\n\n{"prompt": 42}\n')  # errors name the file's own line
    (tmp_path / "long.txt").write_text("fine\n\n" + "word " * 80 + "\n")
    base = ["--model-dir", cli_model, "--max-new-tokens", "4"]
    cases = [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "word " * 80], "shorten it or lower --max-new-tokens"),
        (["--prompt", "Hi", "--device", "tpu"], "unknown device 'tpu'"),
        (["--prompt", "Hi", "--top-p", "2"], "--top-p must be in (0, 1]"),
        (["--prompt", "Hi", "--buffer", "-1"], "--buffer must be >= 0"),
        (["--prompt", "Hi", "--max-redraws", "-1"], "--max-redraws must be >= 0"),
        (["--prompt", "Hi", "--redraw-gate", "1.5"], "--redraw-gate must be in [0, 1]"),
        (["--prompt", "Hi", "--flag-margin", "inf"], "--flag-margin must be in [0, 10] (logits)"),
        (["--prompt", "Hi", "--policy", "classic", "--redraw-pool", "8"],
         "--redraw-pool is a knob of the tuned policy: it has no effect with --policy classic"),
        (["--prompt", "Hi", "--temperature", "nan"], "--temperature must be in [0, 100]"),
        (["--prompt", "Hi", "--seed", str(2**70)], "--seed must be in [0, 2**63)"),
        (["--prompt", "Hi", "--max-new-tokens", "100000"], "leaves no room for a prompt"),
        (["--prompt", "Hi", "--threshold", "1"], "--threshold must be a probability"),
        (["--prompt", "Hi", "--probe", str(other)], "was fitted on x"),
        (["--prompt", "Hi", "--probe", str(wide)], "reads hidden states of width 32"),
        (["--prompt", "Hi", "--probe", str(tmp_path / "none.json")], "no such probe file"),
        (["--prompt-file", str(tmp_path / "missing.txt")], "cannot read"),
        (["--prompt-file", str(tmp_path / "bad-utf8.txt")], "is not UTF-8 text"),
        (["--prompt-file", str(tmp_path / "p.jsonl")], "p.jsonl:3: expected a JSON object"),
        (["--prompt-file", str(tmp_path / "long.txt")], "long.txt:3: the prompt has"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *base, *argv)
        assert code == 2, argv
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    code, out, err = run_cli(capsys, "--model-dir", str(tmp_path / "nope"), "--prompt", "Hi")
    assert code == 2 and "is not a directory" in err


def test_input_that_needs_no_model_is_refused_before_it_loads(cli_model, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(backtrack_cli, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "  "}\n')
    for argv, message in [(["--prompt", ""], "error: the prompt is empty"), (["--prompt", " \n "], "the prompt is empty"),
                          (["--prompt-file", str(tmp_path / "p.jsonl")], "p.jsonl:2: the prompt is empty")]:
        code, _, err = run_cli(capsys, "--model-dir", cli_model, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_cli_subprocess_exit_code_and_no_traceback(cli_model):
    done = subprocess.run([sys.executable, os.path.join(HERE, "backtrack.py"), "--model-dir", cli_model,
                           "--prompt", "Hi", "--top-p", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "error: --top-p must be in (0, 1]"
    done = subprocess.run([sys.executable, os.path.join(HERE, "backtrack.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and f"(default {B.Settings().buffer})" in done.stdout and "default: None" not in done.stdout
    assert "\n    python backtrack.py --model-dir" in done.stdout  # the docstring keeps its own layout


def test_cli_fits_a_probe_on_first_use_and_caches_it(cli_model, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path))  # a cache of its own: no probe fitted by another test
    argv = ["--model-dir", cli_model, "--prompt", "Hello", "--max-new-tokens", "4", "--json"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "fitting one on" in err and "held-out AUROC" in err
    cached = [f for f in os.listdir(os.path.join(os.environ["BACKTRACK_CACHE"], "probes")) if f.endswith(".json")]
    assert len(cached) == 1
    probe = json.load(open(os.path.join(os.environ["BACKTRACK_CACHE"], "probes", cached[0])))
    assert probe["data"] == "curated,rtp_train,generated" and probe["layers"] == [0, 1, 2] and len(probe["weight"][0]) == 16
    assert 0 < probe["safe_level"] <= probe["threshold"] < 1
    code, out2, err = run_cli(capsys, *argv)
    assert code == 0 and "fitting" not in err and json.loads(out2)["tokens"] == json.loads(out)["tokens"]


def test_train_probe_cli_end_to_end(cli_model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("a.csv", "b.csv"):
        rows = ["text,label"] + [f"{'you idiot fool' if y else 'nice sunny day'} number {i},{y}"
                                 for i, y in enumerate(rng.integers(0, 2, 80))]
        (tmp_path / name).write_text("\n".join(rows) + "\n,1\n")  # one malformed row each
    out = tmp_path / "probe.json"
    code = cli.run_cli(T.main, ["--model-dir", cli_model, "--data", f"{tmp_path / 'a.csv'},{tmp_path / 'b.csv'}",
                              "--text-col", "text", "--label-col", "label", "--positive", "1", "--cross", "--sweep",
                              "--out", str(out), "--device", "cpu"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "a.csv: 80 rows" in err and "1 malformed rows skipped" in err
    assert "| all but a.csv |" in printed and "| 2 |" in printed  # cross table, layer sweep
    probe = DF.load_probe(str(out), CK.from_pretrained(cli_model))
    assert probe.meta["metrics"]["auroc"] > 0.9
    for argv, message in [(["--data", "nope"], "--data nope: neither a preset"),
                          (["--data", "/nope.csv", "--text-col", "t", "--label-col", "l", "--positive", "1"],
                           "--data /nope.csv: no such file"),
                          (["--data", str(tmp_path / "a.csv"), "--text-col", "text", "--label-col", "label"],
                           "give exactly one of --positive"),
                          (["--layers", "7"], "--layers must be in 0..2"),
                          (["--layers", "x"], "give comma-separated integers"),
                          (["--target-fpr", "2"], "need 0 < --target-fpr <= --safe-fpr < 1"),
                          (["--threads", "-2"], "--threads must be >= 1, not -2"),
                          (["--data", str(tmp_path / "a.csv"), "--text-col", "text", "--label-col", "label",
                            "--positive", "1", "--rtp", "select", "--out", str(tmp_path / "p2.json")], "pass --shared")]:
        code = cli.run_cli(T.main, ["--model-dir", cli_model, "--shared", str(tmp_path / "no-shared")] + argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_sigterm_and_closed_pipes_end_without_a_traceback(cli_model, tmp_path):
    """--json lines are flushed one by one: SIGTERM loses no finished line and never leaves half of one."""
    (tmp_path / "many.txt").write_text("Hello there\n" * 400)
    cmd = [sys.executable, os.path.join(HERE, "backtrack.py"), "--model-dir", cli_model, "--prompt-file",
           str(tmp_path / "many.txt"), "--json", "--detector", "keywords", "--wordlist",
           os.path.join(cli_model, "words.txt"), "--max-new-tokens", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(3)]  # it is streaming results
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err and "SIGTERM" in err
    for line in lines + out.splitlines():
        json.loads(line)  # every line that came out is whole
    head = subprocess.run(" ".join(f"'{c}'" for c in cmd) + " | head -1", shell=True, capture_output=True, text=True)
    assert json.loads(head.stdout)["prompt"] == "Hello there" and "Traceback" not in head.stderr



def test_python_api_gives_what_the_command_line_gives(cli_model, capsys):
    """The README's "Use from Python" example: load, detector, generate, read events; the same
    result as the command line for the same seed, because both load and pack the model the same way."""
    model, enc = CK.load(cli_model)
    detector = FIT.default_detector(model, enc, kind="keywords", wordlists=os.path.join(cli_model, "words.txt"))
    result = B.generate(model, enc, "Hello world", detector, B.Settings(seed=3, max_new_tokens=12))
    events = [(e["type"], e["index"]) for e in result.events]
    code, out, err = run_cli(capsys, "--model-dir", cli_model, "--prompt", "Hello world", "--detector", "keywords",
                             "--wordlist", os.path.join(cli_model, "words.txt"), "--seed", "3", "--max-new-tokens",
                             "12", "--json")
    line = json.loads(out)
    assert code == 0 and line["tokens"] == result.tokens and line["text"] == result.text
    assert [(e["type"], e["index"]) for e in line["events"]] == events
    assert line["settings"]["seed"] == 3 and line["threshold"] == 0.5
    assert all(step["text"] == enc.decode([step["token"]]) for step in line["steps"])


def test_the_classic_policy_is_one_flag_and_the_same_as_from_python(cli_model, capsys, tmp_path):
    """`--policy classic` alone runs the papers' loop: every alarm a rollback to the commit point, no
    redraw, what generate() gives with policy.Classic(); without the flag the tuned policy runs."""
    model, enc = CK.load(cli_model)
    code, out, _ = run_cli(capsys, "--model-dir", cli_model, "--prompt", "Hello world", "--no-backtrack", "--seed", "3",
                           "--max-new-tokens", "12", "--json")
    words = str(tmp_path / "words.txt")  # words the plain run writes: the list fires on this run
    with open(words, "w") as f:
        f.write("\n".join(sorted(set(re.findall(r"[a-z0-9]+", json.loads(out)["text"].lower())))[:6]))
    detector = FIT.default_detector(model, enc, kind="keywords", wordlists=words)
    common = ["--model-dir", cli_model, "--prompt", "Hello world", "--detector", "keywords", "--wordlist", words,
              "--seed", "3", "--max-new-tokens", "12", "--json"]
    code, out, err = run_cli(capsys, *common, "--policy", "classic")
    line = json.loads(out)
    alone = B.generate(model, enc, "Hello world", detector, B.Settings(seed=3, max_new_tokens=12, policy=Classic()))
    assert code == 0 and line["tokens"] == alone.tokens and line["settings"]["policy"] == {"name": "classic"}
    assert line["events"] and {e["type"] for e in line["events"]} <= {"rollback", "fallback"}
    assert all(e["index"] == step["committed"] for e, step in zip(
        (e for e in line["events"] if e["type"] == "rollback"),
        (line["steps"][e["step"] - 1] if e["step"] else {"committed": 0} for e in line["events"] if e["type"] == "rollback")))
    code, out, err = run_cli(capsys, *common)
    tuned = json.loads(out)
    assert code == 0 and tuned["settings"]["policy"] == dict(name="tuned", **vars(Tuned()))


def test_trace_and_html_show_why_text_was_rolled_back(cli_model, capsys, tmp_path):
    """A word list that fires on common letters: the trace names the listed word and shows releases;
    the page strikes through every discarded span and plots every score against the threshold."""
    common = ["--model-dir", cli_model, "--prompt", "Hello world", "--max-new-tokens", "16", "--seed", "1"]
    code, out, err = run_cli(capsys, *common, "--no-backtrack", "--json")
    words = re.findall(r"[a-z0-9]+", json.loads(out)["text"].lower())
    (tmp_path / "words.txt").write_text("\n".join(words[:2]) + "\n")  # words this model writes: they will fire
    (tmp_path / "more.txt").write_text(words[2] + "\n")  # a second list: --wordlist can be repeated
    page = tmp_path / "run.html"
    argv = common + ["--detector", "keywords", "--wordlist", str(tmp_path / "words.txt"), "--wordlist",
                     str(tmp_path / "more.txt"), "--buffer", "2",
            "--redraw-pool", "0", "--max-retries", "4"]  # every alarm a rollback: rollbacks to show
    code, out, err = run_cli(capsys, *argv, "--trace", "--html", str(page))
    assert code == 0, err
    assert "alarm at score >= 0.5; shown only up to a score below the safe level 0.5; buffer 2" in out
    assert "is listed)" in out and "released:" in out
    code, json_out, trace_err = run_cli(capsys, *argv, "--json", "--trace")
    result = json.loads(json_out)  # --json with --trace: the JSON on stdout, the trace on stderr
    assert "alarm at score >= 0.5" in trace_err

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.open = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag + "." + dict(attrs).get("class", ""))
            if tag != "meta":
                self.open.append(tag)

        def handle_startendtag(self, tag, attrs):  # <circle ... />
            self.tags.append(tag + ".")

        def handle_endtag(self, tag):
            assert self.open.pop() == tag  # well nested

    parsed = Tags()
    parsed.feed(page.read_text())
    assert not parsed.open and not [t for t in parsed.tags if t.startswith(("script", "link", "img"))]  # self-contained
    discarded = [e for e in result["events"] if e["type"] in ("rollback", "fallback") and e["discarded"]]
    assert discarded and parsed.tags.count("del.discarded") == len(discarded)
    assert parsed.tags.count("circle.") == sum(s["alarm"] for s in result["steps"])
    code, out, err = run_cli(capsys, *argv)  # plain streaming output says the text was steered
    assert code == 0 and "rollback" in err


def test_prompt_files_keep_their_own_lines(tmp_path):
    """Line numbers are the file's own (blank lines count), and only a newline ends a prompt."""
    path = tmp_path / "p.txt"
    path.write_text("one\n\ntwo\x0cstill two\u2028and still\r\nthree", encoding="utf-8")
    assert cli.read_prompts(str(path)) == {1: "one", 3: "two\x0cstill two\u2028and still", 4: "three"}


def test_the_package_installs_and_runs_from_any_directory(cli_model, tmp_path):
    """`pip install -e .` into a fresh virtual environment, as a user does, offline: its packages and build
    tools are this environment's (what requirements.txt installed, seen through a .pth file, whether this
    is a virtual environment or the base interpreter), never the base interpreter's by accident. The
    `backtrack` command and every module then work from another directory, and from the folder above the
    clone, where git's default folder name `backtrack/` would otherwise import as an empty namespace package."""
    import site
    source = tmp_path / "backtrack"
    source.mkdir()
    for name in os.listdir(HERE):
        if name.endswith(".py") or name in ("pyproject.toml", "README.md"):
            shutil.copy(os.path.join(HERE, name), source)
    shutil.copytree(os.path.join(HERE, "probe_data"), source / "probe_data")
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    inner = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    with open(os.path.join(inner, "outer-environment.pth"), "w") as f:
        f.write("\n".join(ours) + "\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--no-build-isolation", "-e", str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    help_text = subprocess.run([str(venv / "bin" / "backtrack"), "--help"], cwd=elsewhere, capture_output=True,
                               text=True, env=env)
    assert help_text.returncode == 0 and "--safe-level" in help_text.stdout
    one = subprocess.run([str(venv / "bin" / "backtrack"), "--model-dir", cli_model, "--prompt", "Hello",
                          "--no-backtrack", "--max-new-tokens", "1", "--json"], cwd=elsewhere, capture_output=True,
                         text=True, env=env)
    assert one.returncode == 0, one.stderr
    assert len(json.loads(one.stdout)["tokens"]) <= 1
    modules = [n[:-3] for n in os.listdir(source) if n.endswith(".py") and not n.startswith(("test_", "conftest"))]
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {', '.join(modules)}; print('ok')"],
                              cwd=elsewhere, capture_output=True, text=True, env=env)
    assert imported.stdout.strip() == "ok", imported.stderr
    beside = subprocess.run([str(venv / "bin" / "python"), "-c", "from backtrack import Settings; print(Settings().buffer)"],
                            cwd=tmp_path, capture_output=True, text=True, env=env)
    assert beside.stdout.strip() == "4", beside.stderr


def test_bench_runs_the_sides_in_turn_and_refuses_bad_counts(capsys):
    """bench.py's ratio pairs run i of plain with run i of the default loop, so both sides must be
    taken in turn; a count it cannot use is a one-line error before any model is built."""
    import bench
    order = []
    seconds = bench.timed_in_turn([lambda: order.append("plain"), lambda: order.append("default")], 3)
    assert order == ["plain", "default"] * 3
    assert [len(runs) for runs in seconds] == [3, 3] and all(t >= 0 for runs in seconds for t in runs)
    for argv, message in [(["--repeats", "0"], "--repeats must be at least 1"),
                          (["--refill", "0"], "--refill must be at least 1"),
                          (["--alarm-rate", "1.5"], "--alarm-rate must be a share in [0, 1]"),
                          (["--first-run", "gpt2,gpt3"], "--first-run 'gpt3': not a GPT-2 size")]:
        code = cli.run_cli(bench.main, argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)


SPIN_WHEN_TORCH_LOADS = """
import os, runpy, sys
seen = {}
class Watch:  # notes GOMP_SPINCOUNT at the moment torch is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen["spin"] = os.environ.get("GOMP_SPINCOUNT")
sys.meta_path.insert(0, Watch())
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print("spin when torch loaded:", seen.get("spin", "torch never loaded"), file=sys.stderr)
"""


@pytest.mark.parametrize("script", ["backtrack.py", "evaluate.py", "train_probe.py", "bench.py"])
@pytest.mark.parametrize("users", [None, "20000"])
def test_command_lines_set_openmps_spin_before_torch_loads(script, users):
    """OpenMP reads GOMP_SPINCOUNT once, when torch loads: each command line sets a short spin by then,
    so it does not collapse beside other work (cli.py), and a user's own setting wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if users:
        env["GOMP_SPINCOUNT"] = users
    done = subprocess.run([sys.executable, "-c", SPIN_WHEN_TORCH_LOADS, script], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300)
    assert f"spin when torch loaded: {users or 1000}" in done.stderr, done.stderr[-2000:]
