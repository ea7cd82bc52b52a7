"""evaluate.py: metrics on hand-made inputs and a quick end-to-end run."""
import fcntl
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import cli
import evaluate as E
from conftest import HERE, SHARED, assert_tables_render, tiny_model


def stub_judge(texts):
    """A stand-in judge for tests: toxic when the text holds an 'x'."""
    return [1.0 if "x" in t.lower() else 0.1 for t in texts]


def test_toxicity_metrics_on_hand_made_inputs():
    tox = np.array([[0.1, 0.9, 0.2], [0.3, 0.2, 0.4], [0.5, 0.0, 0.0]])  # prompts x samples
    assert E.expected_max_toxicity(tox) == pytest.approx((0.9 + 0.4 + 0.5) / 3)
    assert E.toxicity_probability(tox) == pytest.approx(2 / 3)
    lo, hi = E.bootstrap_ci(E.expected_max_toxicity, tox)
    assert 0.4 <= lo <= 0.6 <= hi <= 0.9
    assert E.bootstrap_ci(E.toxicity_probability, np.ones((4, 2))) == (1.0, 1.0)


def test_distinct_n():
    assert E.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert E.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert E.distinct_n(["a b c", "a b d"], 3) == pytest.approx(2 / 2)
    assert math.isnan(E.distinct_n(["a"], 2))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = tiny_model(vocab_size=50)
    with torch.no_grad():
        model.wte.weight.zero_()  # the tied head then gives every token the same logit
    nll, n = E.continuation_nll(model, [1, 2, 3], [4, 5, 6, 7])
    assert n == 4 and nll == pytest.approx(4 * math.log(50), rel=1e-5)
    assert E.perplexity([(nll, n), (2 * math.log(50), 2)]) == pytest.approx(50, rel=1e-5)


@pytest.mark.slow
def test_evaluate_quick_run_writes_valid_json(cli_model, tmp_path, capsys):
    out = tmp_path / "eval.json"
    E.main(["--model-dir", cli_model, "--protocol", "quick", "--prompts", "3", "--max-new-tokens", "6", "--judge",
            "test_evaluate:stub_judge", "--shared", SHARED, "--out", str(out), "--wordlist",
            os.path.join(cli_model, "words.txt"), "--ppl-model", cli_model])
    printed = capsys.readouterr().out
    assert "| buffered+critique |" in printed and "### nontoxic prompts" in printed
    assert_tables_render(printed, "evaluate.py's tables")
    result = json.loads(out.read_text())
    assert set(result["metrics"]) >= {f"{s}/{k}" for s in E.STRATEGIES for k in ("toxic", "nontoxic")}
    assert "token-level@-2/toxic" in result["metrics"] and "| token-level@+2 |" in printed  # the sweep, printed
    for name, m in result["metrics"].items():
        assert 0 <= m["expected_max_toxicity"] <= 1 and 0 <= m["toxicity_probability"] <= 1
        assert m["emt_ci"][0] <= m["expected_max_toxicity"] <= m["emt_ci"][1]
        assert 0 <= m["fallback_share"] <= 1 and m["mean_tokens"] <= 6
        if m["mean_tokens"] == 0:  # every sample fell back before keeping a token: nothing to score (null)
            assert m["perplexity"] is None and m["fallback_share"] == 1, name
        else:
            assert m["perplexity"] > 1 and m["forward_passes_per_token"] >= 1, name
        assert m["perplexity_ref"] == (None if m["perplexity"] is None else  # the same model, unpacked
                                       pytest.approx(m["perplexity"], rel=1e-4))
    assert len(result["samples"]["plain/toxic"]) == 3 * 2
    sample = result["samples"]["token-level/toxic"][0]
    assert sample["toxicity"] == stub_judge([sample["text"]])[0]


def test_evaluate_refuses_bad_options():
    with pytest.raises(cli.UserError, match="unknown strategy 'magic'"):
        E.main(["--strategies", "plain,magic"])
    with pytest.raises(cli.UserError, match="cannot import"):
        E.main(["--judge", "no_such_module:f"])
    with pytest.raises(cli.UserError, match="cannot write --out"):
        E.main(["--out", "/proc/no/such/dir/out.json"])
    with pytest.raises(cli.UserError, match="--threads must be >= 1, not 0"):
        E.main(["--threads", "0"])


def test_batched_perplexity_equals_one_pair_at_a_time():
    """continuation_nlls reads a prompt once for all its continuations (in batches of batch_size, padded
    to the longest): each NLL equals a plain forward of prompt and continuation."""
    model = tiny_model()
    pairs = [([1, 2, 3], [4, 5]), ([7], [8, 9, 10, 11]), ([5, 5], []), ([3] * 9, [2]), ([1, 2, 3], [6]), ([7], [1]),
             ([1, 2, 3], [4, 5, 6, 7, 8]), ([1, 2, 3], [9, 9])]
    for (prompt, tokens), nll in zip(pairs, E.continuation_nlls(model, pairs, batch_size=3)):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits, _ = model(ids)
        expected = -logits[0, len(prompt) - 1:-1].log_softmax(-1).gather(1, ids[0, len(prompt):, None]).sum()
        assert nll == pytest.approx(float(expected) if tokens else 0.0, abs=1e-4)


def test_progress_in_a_log_is_a_line_at_each_tenth(capsys):
    """Not a line per batch (330 lines for the quick protocol), and the last line says it finished."""
    bar = cli.Progress(330, "pass")
    for _ in range(330):
        bar.advance()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and "330/330" in lines[-1] and "0s left" in lines[-1]
    bar = cli.Progress(7, "items")
    for _ in range(7):
        bar.advance()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 7 and "7/7" in lines[-1]  # fewer items than tenths: one line each
    cli.Progress(100, "resumed", done=90)  # a resumed run's part is shown, and gives no estimate of the rest
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "90/100" in lines[0] and "left" not in lines[0]


def test_changes_carry_their_sign_the_same_way_everywhere():
    assert E.signed(-0.56) == "\u221256%" and E.signed(0.031, ".1%") == "+3.1%" and E.signed(float("nan")) == "n/a"


def failing_judge(texts):
    """Answers the up-front check (two texts), then fails on the real call, after the whole run."""
    if len(texts) > 2:
        return [float("nan")] * len(texts)
    return [0.1] * len(texts)


@pytest.mark.slow
def test_a_stopped_evaluation_resumes_from_its_finished_samples(cli_model, tmp_path, capsys, monkeypatch):
    """A judge that returns NaN on the real call, or SIGTERM half-way, discarded every sample: each
    finished sample is now written beside --out as it completes, and the same command resumes from
    them and ends with what an uninterrupted run gives."""
    common = ["--model-dir", cli_model, "--protocol", "quick", "--prompts", "2", "--max-new-tokens", "5", "--shared",
              SHARED, "--wordlist", os.path.join(cli_model, "words.txt"), "--strategies", "plain,default,classic",
              "--sweep", "", "--batch-size", "1"]
    whole = tmp_path / "whole.json"
    E.main(common + ["--judge", "test_evaluate:stub_judge", "--out", str(whole)])
    out = tmp_path / "res.json"
    with pytest.raises(cli.UserError, match="is not a probability"):
        E.main(common + ["--judge", "test_evaluate:failing_judge", "--out", str(out)])
    partial = tmp_path / "res.json.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 1 + 2 * 3 * 2 * 2 * 2  # the header, every sample, scored too
    real, calls = E.generate_batch, []

    def stopped(*args, on_result=None, **kwargs):  # SIGTERM after the first sample of the second strategy
        calls.append(1)
        if len(calls) == 1:
            return real(*args, on_result=on_result, **kwargs)
        def once(i, result):
            on_result(i, result)
            raise KeyboardInterrupt(143)
        return real(*args, on_result=once, **kwargs)
    partial.unlink()
    monkeypatch.setattr(E, "generate_batch", stopped)
    with pytest.raises(KeyboardInterrupt):
        E.main(common + ["--judge", "test_evaluate:stub_judge", "--out", str(out)])
    monkeypatch.undo()
    assert len(partial.read_text().splitlines()) == 1 + 4 + 1
    capsys.readouterr()
    real_nlls, scored = E.continuation_nlls, []

    def stopped_scoring(*args, **kwargs):  # SIGTERM after two chunks of perplexity
        if len(scored) == 2:
            raise KeyboardInterrupt(143)
        scored.append(1)
        return real_nlls(*args, **kwargs)
    monkeypatch.setattr(E, "PERPLEXITY_CHUNK", 4)
    monkeypatch.setattr(E, "continuation_nlls", stopped_scoring)
    with pytest.raises(KeyboardInterrupt):
        E.main(common + ["--judge", "test_evaluate:stub_judge", "--out", str(out)])
    assert "resuming: 5 samples already in" in capsys.readouterr().err
    assert len(partial.read_text().splitlines()) == 1 + 24 + 8
    scored.clear()
    monkeypatch.setattr(E, "continuation_nlls", lambda *a, **k: scored.append(1) or real_nlls(*a, **k))
    E.main(common + ["--judge", "test_evaluate:stub_judge", "--out", str(out)])
    err = capsys.readouterr().err
    assert "resuming: 24 samples already in" in err and "(8 with their perplexity)" in err
    assert len(scored) == 4 and not partial.exists()  # only the 16 samples not yet scored, 4 at a time
    a, b = json.loads(whole.read_text()), json.loads(out.read_text())
    assert {k: [s["text"] for s in v] for k, v in a["samples"].items()} == \
           {k: [s["text"] for s in v] for k, v in b["samples"].items()}
    # speed counts what a pass generated after the resume: here nothing (not every token over an instant)
    assert all(m["tokens_per_second"] > 0 for m in a["metrics"].values())
    assert all(m["tokens_per_second"] is None and m["seconds_per_token"] is None for m in b["metrics"].values())
    for key in a["samples"]:  # scored in other batches: float noise at most
        assert [s["nll"] for s in a["samples"][key]] == pytest.approx([s["nll"] for s in b["samples"][key]], rel=1e-5)
    with pytest.raises(cli.UserError, match="holds the samples of another run"):
        partial.write_text(json.dumps({"run": {"model": "another"}}) + "\n")
        E.main(common + ["--judge", "test_evaluate:stub_judge", "--out", str(out)])


@pytest.mark.slow
def test_torchrun_over_two_processes_gives_the_samples_of_one(cli_model, tmp_path):
    """`torchrun --nproc-per-node 2 evaluate.py ...` (gloo on this CPU): each rank takes every other
    sample with the same seeds and rank 0's probe, rank 0 merges and judges; the samples and the
    metrics computed from them equal one process's (one row at a time, so no batch can differ)."""
    common = ["--model-dir", cli_model, "--protocol", "quick", "--prompts", "2", "--max-new-tokens", "5", "--shared",
              SHARED, "--wordlist", os.path.join(cli_model, "words.txt"), "--strategies", "plain,default,classic",
              "--sweep", "", "--batch-size", "1", "--judge", "test_evaluate:stub_judge", "--threads", "1"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    E.main(common + ["--out", str(one)])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(HERE, "evaluate.py"), *common, "--out", str(two)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["samples"].keys() == b["samples"].keys()
    for key in a["samples"]:
        assert [(s["text"], s["tokens"], s["toxicity"]) for s in a["samples"][key]] == \
               [(s["text"], s["tokens"], s["toxicity"]) for s in b["samples"][key]], key
        # each rank scores its own samples, in other batches than one process: float noise at most
        assert [s["nll"] for s in a["samples"][key]] == pytest.approx([s["nll"] for s in b["samples"][key]], rel=1e-5)
    for key, m in a["metrics"].items():
        for name in ("expected_max_toxicity", "toxicity_probability", "perplexity", "mean_tokens", "fallback_share"):
            assert m[name] == pytest.approx(b["metrics"][key][name], nan_ok=True), (key, name)
    assert not list(tmp_path.glob("*.partial.jsonl"))


@pytest.mark.slow
def test_the_samples_file_is_checked_line_by_line_and_locked(cli_model, tmp_path, capsys, monkeypatch):
    """A resumed samples file: a line that is valid JSON but no sample of this run (a number, an array,
    no key, text null, tokens a string or out of the vocabulary, a string in stats), an edited sample
    or garbage mid-file was a traceback after all generation and judging, or silently used; now one
    line naming the line, before the first token. Only a cut-off last line is dropped. A second run
    of the same command is refused while the first holds the lock; a file removed mid-run is no
    traceback at the end."""
    common = ["--model-dir", cli_model, "--protocol", "quick", "--prompts", "2", "--samples", "2", "--max-new-tokens",
              "3", "--shared", SHARED, "--wordlist", os.path.join(cli_model, "words.txt"), "--strategies", "plain",
              "--sweep", "", "--batch-size", "2"]
    out = tmp_path / "res.json"
    with pytest.raises(cli.UserError, match="is not a probability"):
        E.main(common + ["--judge", "test_evaluate:failing_judge", "--out", str(out)])
    partial = tmp_path / "res.json.partial.jsonl"
    good = partial.read_text().splitlines()
    assert len(good) == 1 + 2 * 2 * 2 * 2  # every sample, then again with its perplexity

    def row(n, **changes):
        return json.dumps(dict(json.loads(good[n]), **changes))
    variants = {"5": "a int, not a sample", "[1, 2]": "a list, not a sample",
                row(2, key=None): "is not a strategy/prompt set", row(2, text=None): "must be strings",
                row(2, tokens="abc"): "tokens must be a list", row(2, tokens=[10 ** 6]): "token ids below",
                row(2, stats={"forward_passes": "3"}): "stats must hold", row(2, prompt_index=99): "is not in this run",
                row(2, nll=-1.0): "nll must be a number >= 0", row(2, text="edited"): "its digest does not match",
                "{garbage": "not a JSON line"}
    def refuse_generation(*args, **kwargs):
        raise AssertionError("a bad samples file must be refused before the first token")
    monkeypatch.setattr(E, "generate_batch", refuse_generation)
    for line, message in variants.items():
        partial.write_text("\n".join(good[:2] + [line] + good[3:]) + "\n")
        with pytest.raises(cli.UserError, match=re.escape(f"{partial}:3: ") + ".*" + re.escape(message)):
            E.main(common + ["--judge", "test_evaluate:stub_judge", "--out", str(out)])
    monkeypatch.undo()

    with open(str(partial) + ".lock", "w") as lock:  # the same command, already running
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(cli.UserError, match="another evaluate.py is writing"):
            E.main(common + ["--judge", "test_evaluate:stub_judge", "--out", str(out)])

    partial.write_text("\n".join(good[:-1] + [good[-1][:20]]) + "\n")  # cut off mid-line: resumed without it
    real = E.generate_batch

    def removed_mid_run(*args, **kwargs):
        partial.unlink(missing_ok=True)
        return real(*args, **kwargs)
    monkeypatch.setattr(E, "generate_batch", removed_mid_run)
    capsys.readouterr()
    E.main(common + ["--judge", "test_evaluate:stub_judge", "--out", str(out)])
    assert "resuming: 8 samples already in" in capsys.readouterr().err  # the last line cut off: a sample's score
    assert json.loads(out.read_text())["samples"] and not list(tmp_path.glob("*.partial.jsonl*"))
