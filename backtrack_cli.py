"""The command line of backtrack.py: `python backtrack.py --prompt "..."` (or the `backtrack` command).

    python backtrack.py --model-dir ../shared/models/minigpt2 --prompt "Shut up, you" --seed 3 --trace
    python backtrack.py --model-dir ../shared/models/minigpt2 --prompt "..." --policy classic   # the papers' loop
    python backtrack.py --model-dir ../shared/models/smollm2-135m-instruct --chat --prompt "..."   # a chat model

Loads the model and the detector (the probe is fitted on first use and cached), runs backtrack.generate
for each prompt, and streams the released text, or writes a trace, JSON lines or an HTML page.
Every input is checked before the model loads or any token is drawn; bad input is one line, exit 2.
"""
import argparse
import json
import os
import sys
from dataclasses import fields

# cli first: it sets OpenMP's spin count before torch loads (see cli.py)
from cli import THREADS_HELP, UserError, cache_root, finite_number, output_path, read_prompts, run_cli, set_threads
import report
from backtrack import Settings, generate
from checkpoints import load, pick_device, pick_dtype
from checks import LOWEST, encode_prompt
from fitting import default_detector
from policy import POLICIES, Tuned
from tokenizer import chat_ids
from detector_files import DEFAULT_DETECTOR, DETECTORS, HERE

# the command line's name of each Settings field and tuned-policy knob
KNOBS = [f.name for f in fields(Tuned)]
FLAGS = {name: "--" + name.replace("_", "-")
         for name in [f.name for f in fields(Settings) if f.name not in ("template", "stop_at_eos")] + KNOBS}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as written: the docstring's own layout, and every default that exists."""

    def _get_help_string(self, action):
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        return action.help + (" (default %(default)s)" if shown else "")


def parser():
    d, t = Settings(), Tuned()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompt-file", help="many prompts: one per line, or JSONL with a \"prompt\" field")
    p.add_argument("--model", default="gpt2", help="Hugging Face Hub name of a GPT-2, Llama or Qwen2 checkpoint "
                   "(gpt2, HuggingFaceTB/SmolLM2-135M-Instruct, Qwen/Qwen2.5-0.5B-Instruct, ...), downloaded once")
    p.add_argument("--model-dir", help="local checkpoint: a Hugging Face directory, a GGUF file, or a directory "
                   "holding one .gguf (overrides --model)")
    p.add_argument("--chat", action="store_true", help="put the prompt in the user's turn of the model's chat "
                   "template and generate the assistant's answer (stops at the end of its turn)")
    p.add_argument("--detector", choices=DETECTORS, help="what scores each token: the probe, a word list, or both; "
                   f"both are English: other languages are not covered (default {DEFAULT_DETECTOR})")
    p.add_argument("--probe", help="probe file from train_probe.py (by default one is fitted for the model and cached)")
    p.add_argument("--wordlist", action="append", help="word list of the keyword detector; repeat it for several "
                   "(by default probe_data/ldnoobw-en.txt and probe_data/insults-en.txt)")
    p.add_argument("--threshold", type=float, help=f"alarm threshold, a probability in [{LOWEST:g}, 1 - {LOWEST:g}] "
                   "(by default the probe's own)")
    p.add_argument("--safe-level", type=float, help="show text only up to a token scored below this probability "
                   "(by default: tuned, the probe's own, below its threshold; classic, the threshold)")
    p.add_argument("--no-backtrack", action="store_true", help="plain sampling through the same loop (the baseline)")
    p.add_argument("--policy", choices=list(POLICIES), default="tuned",
                   help="classic: the papers' algorithm (every alarm rolls back to the commit point, plain draws); "
                   "tuned: redraws from a pool after calm text, the probe's safe level, vigilance after a flagged "
                   "prompt (policy.py)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature, finite; 0 (or below 1e-6) is greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="keep the k likeliest tokens; 0 keeps all")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--buffer", type=int, default=d.buffer, help="tokens held back before release; 0 is token-level")
    p.add_argument("--introspect", choices=["none", "template", "critique"], default=d.introspect,
                   help="note inserted into the hidden context after a rollback")
    p.add_argument("--max-retries", type=int, default=d.max_retries, help="rollbacks at one commit point")
    p.add_argument("--max-rollbacks", type=int, default=d.max_rollbacks, help="rollbacks allowed per generation")
    tuned = p.add_argument_group("the tuned policy's knobs (refused with --policy classic)")
    tuned.add_argument("--redraw-pool", type=int, metavar="K", help="at a commit point, and wherever tokens are "
                       f"banned, draw among the K likeliest tokens; a flagged token after calm text is redrawn (banned "
                       f"there; not a rollback); 0: no pool, every alarm is a rollback (default {t.redraw_pool})")
    tuned.add_argument("--max-redraws", type=int, metavar="N", help="redraws at one index beyond the commit point "
                       f"before an alarm there rolls back (0: none) (default {t.max_redraws})")
    tuned.add_argument("--redraw-gate", type=float, metavar="SHARE", help="beyond the commit point, an alarm redraws "
                       "only where the token before scored below the level this share of the way from the safe level "
                       f"(0) to the threshold (1), in logits (default {t.redraw_gate})")
    tuned.add_argument("--flag-margin", type=float, metavar="LOGITS", help="the detector flags a prompt it scores at "
                       "least this many logits above its threshold (a listed word always): after it, every alarm "
                       f"beyond the commit point rolls back (default {t.flag_margin})")
    tuned.add_argument("--vigilance", type=float, metavar="LOGITS", help="after a flagged prompt, lower the threshold "
                       f"and safe level by this many logits (default {t.vigilance})")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed, in [0, 2**63)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--dtype", default="float32", help="float32; bfloat16 or float16 on GPUs")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--trace", action="store_true", help="show every sampled token, score, rollback and release "
                   "(on stderr with --json)")
    p.add_argument("--json", action="store_true", help="print each result as one JSON line: text, tokens, steps "
                   "(decoded), events, stats, threshold and settings")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained page showing what was shown, what was "
                   "discarded where, and the scores against the threshold")
    return p


def settings_of(args):
    """Settings from the flags, the policy with its knobs; a knob given to the classic policy is refused."""
    knobs = {name: getattr(args, name) for name in KNOBS if getattr(args, name) is not None}
    if args.policy == "classic" and knobs:
        raise UserError(f"{FLAGS[next(iter(knobs))]} is a knob of the tuned policy: it has no effect with --policy "
                        "classic; leave one of them out")
    policy = Tuned(**knobs) if args.policy == "tuned" else POLICIES[args.policy]()
    chosen = {f.name: getattr(args, f.name) for f in fields(Settings) if f.name in FLAGS and f.name != "policy"}
    return Settings(**dict(chosen, temperature=0 if args.greedy else args.temperature, policy=policy)).check(FLAGS)


def main(argv=None):
    args = parser().parse_args(argv)
    settings = settings_of(args)
    # a detector flag the run would not read is refused, never silently dropped
    kind = "" if args.no_backtrack else args.detector or DEFAULT_DETECTOR
    ignored = [flag for flag, value, read in (("--detector", args.detector, bool(kind)),
                                              ("--probe", args.probe, "probe" in kind),
                                              ("--wordlist", args.wordlist, "keywords" in kind),
                                              ("--threshold", args.threshold, "probe" in kind),
                                              ("--safe-level", args.safe_level, "probe" in kind))
               if value is not None and not read]
    if ignored and not kind:
        raise UserError(f"{ignored[0]} has no effect with --no-backtrack; leave one of them out")
    if ignored:
        raise UserError(f"{ignored[0]} has no effect with --detector {kind}; leave it out, or use a detector that "
                        "reads it")
    if args.threshold is not None and not (finite_number(args.threshold) and LOWEST <= args.threshold <= 1 - LOWEST):
        raise UserError(f"--threshold must be a probability between {LOWEST:g} and 1 - {LOWEST:g}")
    # what the run reads, no output may overwrite: its files, and the model's, the shipped data's and the cache's folders
    inputs = [args.prompt_file, args.probe, *(args.wordlist or []), args.model_dir, os.path.join(HERE, "probe_data"),
              cache_root()]
    if args.html:
        output_path(args.html, "--html", inputs=inputs)  # now, not after the run
    prompts = {None: args.prompt} if args.prompt is not None else read_prompts(args.prompt_file)
    for n, prompt in prompts.items():  # what needs no model is checked before it loads
        if not prompt.strip():
            raise UserError(f"{args.prompt_file}:{n}: the prompt is empty; give some text" if n else
                            "the prompt is empty; give some text")
    pick_dtype(args.dtype, pick_device(args.device))  # bad options fail before any slow work
    set_threads(args.threads)
    if args.model_dir and not (os.path.isdir(args.model_dir) or args.model_dir.endswith(".gguf") and
                               os.path.isfile(args.model_dir)):
        raise UserError(f"--model-dir {args.model_dir} is not a directory or a .gguf file; point it at a Hugging Face "
                        "checkpoint directory or a GGUF file")
    model, enc = load(args.model_dir or args.model, args.device, args.dtype)
    # what the model reads: the prompt itself, or the prompt in the chat template's user turn (token ids)
    model_prompts = {n: chat_ids(enc, prompt) if args.chat else prompt for n, prompt in prompts.items()}
    for n, prompt in model_prompts.items():  # fail before any slow work
        try:
            encode_prompt(enc, prompt, model, settings, FLAGS)
        except UserError as e:
            raise UserError(f"{args.prompt_file}:{n}: {e}" if n else str(e))
    detector = None if args.no_backtrack else default_detector(model, enc, args.detector or DEFAULT_DETECTOR,
                                                               args.probe, args.threshold, args.wordlist)
    source = report.source_of(model, args.model_dir or args.model, detector, kind)
    stream = not args.json and not args.trace
    terminal = stream and sys.stdout.isatty()  # control characters from the prompt or the model, shown as escapes

    def show(text):
        print(report.visible(text) if terminal else text, end="", flush=True)
    runs = []
    try:
        for n, prompt in prompts.items():
            if stream:
                show(prompt + "\n" if args.chat else prompt)
            result = generate(model, enc, model_prompts[n], detector, settings, on_release=show if stream else None)
            where = f"line {n} of {args.prompt_file}" if n else "--prompt"
            runs.append((f"Prompt {len(runs) + 1} of {len(prompts)} ({where}) · {args.model_dir or args.model} · seed "
                         f"{settings.seed} · policy {'none' if detector is None else settings.policy.name}",
                         prompt, result, enc))
            if args.trace:
                out = sys.stderr if args.json else sys.stdout
                report.print_trace(prompt, result, enc, settings, out.isatty(), out)
            if args.json:  # one whole line at a time, flushed: a reader of the stream never sees half of one
                print(json.dumps(report.json_record(prompt, result, enc, settings, source), allow_nan=False), flush=True)
            elif stream:
                print()
                if result.events:  # the reader should know the text was steered, and why it may end early
                    print(report.steering_note(result), file=sys.stderr)
                print()
    finally:  # stopped half-way (SIGTERM, Ctrl-C): the page still shows every prompt that finished
        if args.html and runs:
            report.write_html(args.html, runs, inputs=inputs)
            print(f"wrote {args.html} ({len(runs)} of {len(prompts)} prompts)", file=sys.stderr)


def console():
    """The `backtrack` command that `pip install -e .` puts on the PATH."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    console()
