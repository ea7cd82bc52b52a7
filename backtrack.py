"""Decoding-time safety backtracking for GPT-2-style models.

    python backtrack.py --model-dir ../shared/models/minigpt2 --prompt "You are such a" --trace

The loop, step by step (see generate()):
 1. Prefill the prompt, then sample one token at a time.
 2. Feed each sampled token and let the detector score it, from the hidden state of that same
    forward pass.
 3. A token becomes safe (committed) once it is `buffer` tokens behind the newest one with no alarm
    in between. Only committed tokens are shown, so nothing shown is ever retracted.
 4. On an alarm, roll the KV cache, the detector and the token list back to the last safe position
    (moving pointers: O(1)) and ban the token that began the discarded path at that position.
 5. Optionally insert an introspection note into the hidden context at that position.
 6. Budgets bound the rollbacks per position and in total; when one runs out, stop with the
    committed text. Generation always terminates.
"""
import argparse
import codecs
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from model import UserError, from_pretrained, load_tokenizer, pick_device, pick_dtype, run_cli

# A note a base model reads as the writer correcting course. Measured against "critique" and no
# note in evaluate.py (README).
TEMPLATE = "\n(Let me rephrase that politely.)\n"
CRITIQUE_OPENING = '\n(I almost wrote "{discarded}", but that is hurtful. Instead I will'
CRITIQUE_TOKENS = 12  # at most this many tokens of self-critique, written greedily


@dataclass
class Settings:
    max_new_tokens: int = 40
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    buffer: int = 0  # tokens held back before release; 0 is token-level backtracking
    introspect: str = "none"  # none | template | critique
    template: str = TEMPLATE
    max_retries: int = 4  # rollbacks allowed at any one position (N)
    max_rollbacks: int = 20  # rollbacks allowed in total (M)
    stop_at_eos: bool = True
    seed: int = 0

    def check(self):
        problems = [
            (self.max_new_tokens < 1, "--max-new-tokens must be >= 1"),
            (self.temperature < 0, "--temperature must be >= 0"),
            (self.top_k < 0, "--top-k must be >= 0"),
            (not 0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.buffer < 0, "--buffer must be >= 0"),
            (self.introspect not in ("none", "template", "critique"), "--introspect must be none, template or critique"),
            (self.max_retries < 0 or self.max_rollbacks < 0, "--max-retries and --max-rollbacks must be >= 0"),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(message)
        return self


@dataclass
class Result:
    text: str  # what the reader sees: the committed continuation
    tokens: list  # its token ids
    scores: list  # the detector's score of each kept token (None without a detector)
    steps: list = field(default_factory=list)  # every sampled token: position, token, score, alarm
    events: list = field(default_factory=list)  # rollback, introspection, fallback
    stats: dict = field(default_factory=dict)
    stop_reason: str = ""
    context: list = field(default_factory=list)  # every token id the KV cache holds at the end: prompt, kept tokens, notes


def sample(logits, s, generator, banned):
    """One token id from next-token logits (V,), never one of `banned`."""
    logits = logits.float().clone()
    if banned:
        logits[list(banned)] = float("-inf")
    if s.temperature == 0:
        return int(logits.argmax())
    probs = (logits / s.temperature).softmax(-1)
    ids = None
    if s.top_k or s.top_p < 1:
        # candidates by falling probability. Sorting GPT-2's whole vocabulary takes 3 ms on a CPU, more
        # than a forward pass of a small model, so widen the search until it holds top_p of the mass
        n, k = min(s.top_k or probs.numel(), probs.numel()), 1024
        top, ids = torch.topk(probs, min(n, k))
        while k < n and top.sum() < s.top_p:
            k *= 8
            top, ids = torch.topk(probs, min(n, k))
        if s.top_p < 1:
            keep = top.cumsum(0) - top < s.top_p  # the smallest prefix whose mass reaches top_p
            top, ids = top[keep], ids[keep]
        probs = top
    # inverse CDF with one uniform draw; side="right" never lands on a zero-probability token
    cdf = probs.cumsum(0)
    u = torch.rand(1, generator=generator, device=cdf.device) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, side="right"))
    return i if ids is None else int(ids[i])


def encode_prompt(enc, prompt, model, s):
    ids = list(prompt) if isinstance(prompt, (list, tuple)) else enc.encode_ordinary(prompt)
    if not ids or (isinstance(prompt, str) and not prompt.strip()):
        raise UserError("the prompt is empty; give some text with --prompt or --prompt-file")
    room = model.config.n_positions - s.max_new_tokens
    if len(ids) > room:
        raise UserError(f"the prompt has {len(ids)} tokens, but the context of {model.config.n_positions} "
                        f"leaves room for {room} beside {s.max_new_tokens} new tokens; shorten it or lower --max-new-tokens")
    return ids


@torch.inference_mode()
def generate(model, enc, prompt, detector=None, s=Settings(), on_release=None):
    """Sample a continuation of `prompt` (text or token ids); with a detector, backtrack out of unsafe text.

    detector=None is plain sampling through the same code (the baseline). on_release(text) receives
    committed text as soon as it can no longer be retracted.
    """
    s.check()
    t0 = time.perf_counter()
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(s.seed)
    prompt_ids = encode_prompt(enc, prompt, model, s)
    cache = model.new_cache()
    eos = enc.eot_token
    show = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tokens may split characters

    # 1. prefill
    logits, _ = model(torch.tensor([prompt_ids], device=device), cache, logits="last")
    if detector:
        detector.start(prompt_ids)
    context = list(prompt_ids)  # what the cache holds, token by token
    out, scores = [], []  # generated tokens on the current path and their scores
    starts, born = [], []  # per generated token: its cache position (notes sit between tokens), its sampling step
    next_logits = [logits[0, -1]]  # next_logits[i]: logits that predict out[i]
    committed = 0  # out[:committed] is safe and released
    banned = set()  # tokens banned at position `committed` (the only position a rollback returns to)
    retries, noted_at = 0, None  # rollbacks at `committed`; where the last note was inserted
    steps, events = [], []
    forwards, rollbacks, sampled, wait, stop_reason = 1, 0, 0, 0, "max_new_tokens"

    def release(upto):
        nonlocal committed, banned, retries, wait
        if upto <= committed:
            return
        wait += sum(sampled - b for b in born[committed:upto])  # see stats["avg_wait_tokens"]
        piece = show.decode(b"".join(enc.decode_single_token_bytes(t) for t in out[committed:upto] if t != eos))
        committed, banned, retries = upto, set(), 0  # bans belong to a position: forget them
        if on_release and piece:
            on_release(piece)

    while len(out) < s.max_new_tokens:
        # 1. sample, and 2. feed the token and score it from the same forward pass
        token = sample(next_logits[len(out)], s, generator, banned if len(out) == committed else ())
        starts.append(cache.length)
        logits, hidden = model(torch.tensor([[token]], device=device), cache, logits="last")
        forwards, sampled = forwards + 1, sampled + 1
        out.append(token)
        context.append(token)
        born.append(sampled)
        next_logits.append(logits[0, -1])
        score = detector.score(token, [h[0, -1] for h in hidden]) if detector else None
        scores.append(score)
        alarm = detector is not None and score >= detector.threshold
        steps.append(dict(position=len(out) - 1, token=token, score=score, alarm=alarm))

        if alarm:
            # 4. roll back to the last safe position: cache, detector and token lists
            discarded = out[committed:]
            cache.rollback(starts[committed])
            detector.rollback(committed)
            del context[starts[committed]:], next_logits[committed + 1:]
            for per_token in (out, scores, starts, born):
                del per_token[committed:]
            # 6. budgets: at most max_retries rollbacks at one position, max_rollbacks in all
            if retries >= s.max_retries or rollbacks >= s.max_rollbacks:
                events.append(dict(type="fallback", position=committed, score=score, discarded=enc.decode(discarded),
                                   reason="retry budget spent at this position" if retries >= s.max_retries
                                   else "total rollback budget spent", step=len(steps) - 1))
                stop_reason = "budget"
                break
            # ... and ban the token that began the discarded path, at this position
            banned.add(discarded[0])
            rollbacks, retries = rollbacks + 1, retries + 1
            events.append(dict(type="rollback", position=committed, score=score, discarded=enc.decode(discarded),
                               banned=discarded[0], step=len(steps) - 1))
            # 5. introspection: a note in the hidden context, never shown; a later rollback past it removes it
            if s.introspect != "none" and noted_at != committed:
                room = model.config.n_positions - cache.length - (s.max_new_tokens - committed)
                note = introspect(model, enc, cache, s, enc.decode(discarded), room)
                if note:
                    next_logits[committed], noted_at = note[0], committed
                    context += note[1]
                    forwards += note[2]
                    events.append(dict(type="introspection", position=committed, note=enc.decode(note[1]),
                                       step=len(steps) - 1))
            continue

        # 3. commit what is now `buffer` tokens behind the newest token
        if token == eos and s.stop_at_eos:
            stop_reason = "eos"
            break
        release(len(out) - s.buffer)

    release(len(out))
    if on_release:
        on_release(show.decode(b"", final=True))
    kept = [t for t in out if t != eos]
    seconds = time.perf_counter() - t0
    stats = dict(tokens_generated=sampled, tokens_kept=len(kept), forward_passes=forwards,
                 rollbacks=rollbacks, seconds=seconds, tokens_per_second=len(kept) / seconds,
                 # Average Wait Tokens (our reading of CARE): for each shown token, how many tokens
                 # were sampled between its own sampling and its release; 0 for plain streaming
                 avg_wait_tokens=wait / max(len(out), 1), prompt_tokens=len(prompt_ids))
    return Result(enc.decode(kept), kept, scores[:len(kept)], steps, events, stats, stop_reason, context)


def introspect(model, enc, cache, s, discarded, room):
    """Feed a note at the rollback point: (logits after it, its tokens, forward passes), or None
    when it would not leave `room` for the rest of the generation."""
    device = model.wte.weight.device
    if s.introspect == "template":
        note, budget = enc.encode_ordinary(s.template), 0
    else:  # the model critiques the discarded text itself, greedily, inside the hidden context
        note, budget = enc.encode_ordinary(CRITIQUE_OPENING.format(discarded=discarded.strip()[:80])), CRITIQUE_TOKENS
    closing = enc.encode_ordinary(")\n")
    if len(note) + budget + len(closing) > room:
        return None
    logits, _ = model(torch.tensor([note], device=device), cache, logits="last")
    passes = 1
    if s.introspect == "critique":
        for _ in range(CRITIQUE_TOKENS):
            token = int(logits[0, -1].argmax())
            if token == enc.eot_token or ")" in enc.decode([token]):
                break
            note.append(token)
            logits, _ = model(torch.tensor([[token]], device=device), cache, logits="last")
            passes += 1
        note += closing
        logits, _ = model(torch.tensor([closing], device=device), cache, logits="last")
        passes += 1
    return logits[0, -1], note, passes


# ----------------------------------------------------------------------------------------------
# Command line


def load_detector(args, model, enc):
    """The detector named on the command line; the probe is fitted and cached on first use."""
    if args.detector == "keywords":
        from scorer import KeywordDetector, load_wordlist
        return KeywordDetector(load_wordlist(args.wordlist), enc)
    from train_probe import probe_for
    probe = probe_for(model, enc, args.probe)
    if args.threshold is not None:
        probe.threshold = args.threshold
    return probe


def read_prompts(args):
    if args.prompt is not None:
        return [args.prompt]
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read {args.prompt_file} ({e.strerror}); check the path")
    prompts = []
    for n, line in enumerate(lines, 1):
        if args.prompt_file.endswith(".jsonl"):
            try:
                record = json.loads(line)
                prompt = record["prompt"]
                prompts.append(prompt["text"] if isinstance(prompt, dict) else prompt)
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{args.prompt_file}:{n}: expected a JSON object with a \"prompt\" "
                                "(a string, or an object with \"text\")")
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"{args.prompt_file} holds no prompts")
    return prompts


def print_trace(result, enc, colour):
    red, green, dim, off = ("\033[31m", "\033[32m", "\033[2m", "\033[0m") if colour else ("",) * 4
    events_after = {}
    for e in result.events:
        events_after.setdefault(e["step"], []).append(e)
    for i, step in enumerate(result.steps):
        score = "" if step["score"] is None else f"{step['score']:.3f}"
        mark = f"{red}ALARM{off}" if step["alarm"] else ""
        print(f"{dim}{step['position']:4d}{off} {enc.decode([step['token']])!r:24} {score:>6} {mark}")
        for e in events_after.get(i, []):
            if e["type"] == "rollback":
                print(f"     {red}rollback to position {e['position']}: discarded {e['discarded']!r}, "
                      f"banned {enc.decode([e['banned']])!r}{off}")
            elif e["type"] == "introspection":
                print(f"     {dim}introspection note at position {e['position']}: {e['note']!r}{off}")
            else:
                print(f"     {red}fallback at position {e['position']}: {e['reason']}; stopped{off}")
    print(f"{green}final:{off} {result.text!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompt-file", help="many prompts: one per line, or JSONL with a \"prompt\" field")
    p.add_argument("--model", default="gpt2", help="Hugging Face Hub name (downloaded once)")
    p.add_argument("--model-dir", help="local checkpoint directory in Hugging Face layout (overrides --model)")
    p.add_argument("--detector", choices=["probe", "keywords"], default="probe", help="what scores each token")
    p.add_argument("--probe", help="probe file from train_probe.py (default: fit one for this model and cache it)")
    p.add_argument("--wordlist", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared",
                                                      "data", "wordlists", "ldnoobw-en.txt"),
                   help="word list for --detector keywords")
    p.add_argument("--threshold", type=float, help="alarm threshold (default: the probe's calibrated one)")
    p.add_argument("--no-backtrack", action="store_true", help="plain sampling through the same loop (the baseline)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 keeps all")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--buffer", type=int, default=0, help="tokens held back before release (0: token-level)")
    p.add_argument("--introspect", choices=["none", "template", "critique"], default="none",
                   help="note inserted into the hidden context after a rollback")
    p.add_argument("--max-retries", type=int, default=4, help="rollbacks allowed at one position")
    p.add_argument("--max-rollbacks", type=int, default=20, help="rollbacks allowed per generation")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--dtype", default="float32", help="float32; bfloat16 or float16 on GPUs")
    p.add_argument("--trace", action="store_true", help="show every sampled token, score and rollback")
    p.add_argument("--json", action="store_true", help="print the result object as JSON (one line per prompt)")
    args = p.parse_args(argv)

    s = Settings(max_new_tokens=args.max_new_tokens, temperature=0 if args.greedy else args.temperature,
                 top_k=args.top_k, top_p=args.top_p, buffer=args.buffer, introspect=args.introspect,
                 max_retries=args.max_retries, max_rollbacks=args.max_rollbacks, seed=args.seed).check()
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise UserError("--threshold must be in [0, 1]")
    prompts = read_prompts(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    name = args.model_dir or args.model
    if args.model_dir and not os.path.isdir(args.model_dir):
        raise UserError(f"--model-dir {args.model_dir} is not a directory; point it at a Hugging Face checkpoint")
    model = from_pretrained(name, device=device, dtype=dtype).pack_for_cpu()
    enc = load_tokenizer(name)
    for prompt in prompts:  # fail before any slow work
        encode_prompt(enc, prompt, model, s)
    detector = None if args.no_backtrack else load_detector(args, model, enc)
    stream = not args.json and not args.trace
    for prompt in prompts:
        if stream:
            print(prompt, end="", flush=True)
        result = generate(model, enc, prompt, detector, s,
                          on_release=(lambda piece: print(piece, end="", flush=True)) if stream else None)
        if args.json:
            print(json.dumps(dict(prompt=prompt, **asdict(result))))
        elif args.trace:
            print(f"prompt: {prompt!r}")
            print_trace(result, enc, sys.stdout.isatty())
            st = result.stats
            print(f"[{st['tokens_kept']} kept / {st['tokens_generated']} sampled, {st['rollbacks']} rollbacks, "
                  f"{st['tokens_per_second']:.1f} tokens/s, stop: {result.stop_reason}]\n")
        else:
            print("\n" if result.stop_reason != "budget" else "\n[stopped: rollback budget spent]\n")


if __name__ == "__main__":
    sys.exit(run_cli(main))
