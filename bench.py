"""Decode speed of our model vs transformers' generate, batched and not, and the cost of backtracking.

    python bench.py                                    # GPT-2 124M config, random weights
    python bench.py --model-dir ../shared/models/minigpt2 --batch-sizes 1,8,32
    python bench.py --model-dir ../shared/models/minigpt2 --batch-sizes 32 --refill 4   # 4 prompts per batch slot
    python bench.py --model-dir ../shared/models/minigpt2 --batch-sizes 32 --flagged    # as after toxic prompts
    python bench.py --model-dir ../shared/models/minigpt2 --flips 1000    # batched vs alone, with the probe
    python bench.py --first-run gpt2,gpt2-xl      # what the first run (the probe's fit) costs at each size

--first-run writes a checkpoint of each size's config with random weights (which cost what real ones
cost to read), in Hugging Face layout with the shared tokenizer, and runs `backtrack.py --model-dir`
on it as a new user's first run, with an empty cache: the table gives its wall time, peak memory and
the texts the fit read (its own lines are on stderr).

Every figure is a ratio measured on this machine in this run: plain and backtracking run in turn
(plain, backtracking, plain, ...; transformers after them), tokens/s is each side's best run and
"backtracking / plain" the median of the pairs' ratios, so a slow spell of a shared machine cannot
favour one side. Both sides decode the same prompts greedily for the same number of new tokens with
the same weights. When other work shared the machine (a load above its cores), the output says so.

"With backtracking" runs batched.generate_batch with the default settings (buffer, safe level, redraws,
budgets) and a probe on every layer whose score is computed for every token but whose alarms fall on a
fixed 5% of prefixes (--alarm-rate), after prompts it does not flag (--flagged: after flagged ones,
where every alarm beyond the commit point rolls back), so it includes scoring, holding text back,
redraws, rollbacks and resampling; tokens/s counts kept tokens. "Tokens drawn per kept" says where the
time goes: the tokens each rollback discards are drawn again, and a fixed batch runs as many steps as
its slowest row (with --refill K each batch slot decodes K prompts in turn, as evaluate.py runs: a
finished row takes the next prompt at once, so only the last prompts wait for the slowest).
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import replace

# cli first: it sets OpenMP's spin count before torch loads (see cli.py)
from cli import UserError, provenance, run_cli, set_threads, shared_path

import torch

from backtrack import Settings, generate
from batched import generate_batch
from checkpoints import (PRESETS, from_pretrained, load_tokenizer, pack_for_cpu, pick_device, pick_dtype,
                         save_pretrained)
from fitting import probe_for
from model import GPT, GPTConfig, Llama
from scorer import History, LinearProbe
from train_probe import read_rtp


class IdTokenizer:
    """Enough of a tokenizer for token-id prompts: nothing is decoded for a reader here."""
    eot_token = -1

    def decode(self, tokens):
        return ""

    def decode_single_token_bytes(self, token):
        return b""


def timed_in_turn(fns, repeats):
    """Seconds of each function's runs, taken in turn (a, b, a, b, ...), so that a slow spell of a
    shared machine falls on every side rather than on one: run i of each side forms pair i."""
    seconds = [[] for _ in fns]
    for _ in range(repeats):
        for fn, runs in zip(fns, seconds):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
    return seconds


class FixedRateProbe(LinearProbe):
    """A random linear probe whose score is computed (its cost is part of the measurement), but whose
    alarms fall on a fixed pseudo-random share `rate` of prefixes, so every run backtracks the same amount.
    Its verdict flags every prompt or none (`flagged`): after a flagged prompt every alarm beyond the commit
    point rolls back, after another one an alarm after calm text redraws one token."""

    def __init__(self, rate, flagged, *probe):
        super().__init__(*probe)
        self.rate, self.flagged = rate, flagged

    def start(self, prompt_ids, hidden=None):
        self.hashes = History()  # a hash of each prefix of the generated tokens, chained token by token
        super().start(prompt_ids, hidden)
        return 1.0 if self.flagged else 0.0

    def score(self, token, reading):
        super().score(token, reading)
        self.hashes.append(zlib.crc32(token.to_bytes(4, "little"), (self.hashes.last(1) or [0])[0]))
        return 1.0 if self.hashes.last(1)[0] < self.rate * 2**32 else 0.0

    def rollback(self, n):
        super().rollback(n)
        self.hashes.rollback(n)

    def clone(self):
        return FixedRateProbe(self.rate, self.flagged, self.weight, self.bias, self.layers, self.window, self.threshold)


def batch_sizes(text):
    """--batch-sizes: comma-separated integers in [1, 4096] (None: the device's default list)."""
    if text is None:
        return None
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes {text!r}: give comma-separated integers, e.g. 1,8,32")
    if not sizes or not all(1 <= b <= 4096 for b in sizes):
        raise UserError(f"--batch-sizes {text!r}: each must be in [1, 4096]")
    return sizes


def hf_twin(model, cfg):
    """transformers' model of the same family with the same weights (ours unfused for a Llama)."""
    import transformers
    if isinstance(model, Llama):
        # Qwen2 is the Llama with q/k/v biases; transformers' Llama would put one on the output too
        config_class, model_class = ((transformers.Qwen2Config, transformers.Qwen2ForCausalLM) if cfg.attention_bias else
                                     (transformers.LlamaConfig, transformers.LlamaForCausalLM))
        hf = model_class(config_class(
            vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.n_inner, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.n_positions, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=cfg.tie_word_embeddings))
        hf.load_state_dict(hf_llama_state(model.state_dict(), cfg), strict=False)
        return hf.eval().to(model.wte.weight.device), transformers.__version__
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function=cfg.activation_function)).eval().to(model.wte.weight.device)
    hf.transformer.load_state_dict({k: (v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v)
                                    for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    return hf, transformers.__version__


def hf_llama_state(state, cfg):
    """Our Llama's state dict under Hugging Face's names: c_attn split into q, k, v and c_fc into gate, up."""
    out = {}
    for key, tensor in state.items():
        name = "model." + key if not key.startswith("lm_head") else key
        for ours, theirs in ((".wte.", ".embed_tokens."), (".ln_f.", ".norm."), (".h.", ".layers."),
                             (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
                             (".attn.c_proj.", ".self_attn.o_proj."), (".mlp.c_proj.", ".mlp.down_proj.")):
            name = name.replace(ours, theirs)
        if ".attn.c_attn." in name:
            sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.split(sizes)):
                out[name.replace("attn.c_attn", "self_attn." + part)] = piece
        elif ".mlp.c_fc." in name:
            for part, piece in zip(("gate_proj", "up_proj"), tensor.chunk(2)):
                out[name.replace("c_fc", part)] = piece
        else:
            out[name] = tensor
    return out


def first_runs(names, threads):
    """A new user's first run at each GPT-2 size in `names` (random weights): a row per size."""
    print(f"`python bench.py --first-run {','.join(names)}` ({provenance()}); {threads} CPU threads\n")
    print("| size | parameters | texts read | hidden states | fit | first run (wall) | peak memory | held-out AUROC |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as scratch:
            torch.manual_seed(0)
            model = GPT(GPTConfig(**PRESETS[name]))
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        p.normal_(0, 0.02)  # GPT-2's initialisation: activations stay in range through 48 blocks
            params = sum(p.numel() for p in model.parameters())
            save_pretrained(model, os.path.join(scratch, name))
            del model
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(shared_path("models", "minigpt2", f), os.path.join(scratch, name))
            command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "backtrack.py"),
                       "--model-dir", os.path.join(scratch, name), "--prompt", "Hello", "--max-new-tokens", "1",
                       "--threads", str(threads)]
            t0 = time.time()
            child = subprocess.Popen(command, env=dict(os.environ, BACKTRACK_CACHE=os.path.join(scratch, "cache")),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            lines = []
            for line in child.stderr:  # the fit's own lines, passed on as they come
                sys.stderr.write(line)
                lines.append(line)
            _, status, usage = os.wait4(child.pid, 0)
            if status:
                raise UserError(f"the first run of {name} failed (status {status}): {lines[-1].strip() if lines else ''}")
            said = "".join(lines)
            read = re.search(r"fitting the probe on ([\d,]+) of the [\d,]+ texts \(([\d,]+) tokens; hidden states "
                             r"(\[[\d, ]+\])", said)
            fit = re.search(r"held-out AUROC ([\d.]+).*fitted in (\d+) s", said)
            print(f"| {name} | {params / 1e6:.0f}M | {read[1]} ({read[2]} tokens) | {read[3]} | {fit[2]} s | "
                  f"{time.time() - t0:.0f} s | {usage.ru_maxrss / 2**20:.1f} GiB | {fit[1]} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="checkpoint directory (default: GPT-2 124M config, random weights)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per row (default 64)")
    p.add_argument("--batch-sizes", help="comma-separated (default 1,8,32 on a CPU; 1,8,32,64,128 on a GPU)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each side (plain and backtracking in turn); tokens/s is the best run's, "
                   "backtracking / plain the median of the pairs' ratios (default 3)")
    p.add_argument("--flips", type=int, default=0, metavar="N",
                   help="also count rows of N sampled generations with the probe where batched != alone")
    p.add_argument("--alarm-rate", type=float, default=0.05,
                   help="share of prefixes on which the default loop's probe alarms (default 0.05)")
    p.add_argument("--flagged", action="store_true",
                   help="the probe flags every prompt (default: none): the loop after a toxic prompt, where every "
                   "alarm beyond the commit point rolls back")
    p.add_argument("--refill", type=int, default=1, metavar="K",
                   help="prompts per batch slot: a finished row takes the next prompt at once, as evaluate.py runs "
                   "(default 1: each batch runs until its slowest row is done)")
    p.add_argument("--first-run", metavar="SIZES",
                   help=f"comma-separated GPT-2 sizes ({', '.join(PRESETS)}): time and memory of a new user's first run "
                   "(the probe's fit) on random weights of each, instead of the decode benchmark")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--dtype", default="float32", help="float32, or bfloat16 / float16 on a GPU (default float32)")
    args = p.parse_args(argv)
    if not 0 <= args.alarm_rate <= 1:
        raise UserError(f"--alarm-rate must be a share in [0, 1], not {args.alarm_rate}")
    if not 1 <= args.repeats <= 100:
        raise UserError(f"--repeats must be at least 1 run of each side (and at most 100), not {args.repeats}")
    if not 0 <= args.flips <= 100000:
        raise UserError(f"--flips must be a number of rows in [0, 100000], not {args.flips}")
    if not 1 <= args.refill <= 64:
        raise UserError(f"--refill must be at least 1 prompt per batch slot (and at most 64), not {args.refill}")
    if not (1 <= args.tokens <= 4096 and 1 <= args.prompt_len <= 4096):
        raise UserError("--tokens and --prompt-len must be in [1, 4096]")
    if args.first_run:
        names = args.first_run.split(",")
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            raise UserError(f"--first-run {unknown[0]!r}: not a GPT-2 size; choose from {', '.join(PRESETS)}")
        return first_runs(names, args.threads)
    sizes = batch_sizes(args.batch_sizes)
    set_threads(args.threads)
    torch.manual_seed(0)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = from_pretrained(args.model_dir, device=device) if args.model_dir else GPT(GPTConfig(**PRESETS["gpt2"])).eval()
    model = model.to(device=device, dtype=dtype)
    cfg = model.config
    sizes = sizes or ([1, 8, 32, 64, 128] if device == "cuda" else [1, 8, 32])
    prompts = torch.randint(0, cfg.vocab_size, (max(sizes) * args.refill, args.prompt_len)).tolist()
    greedy = Settings(max_new_tokens=args.tokens, temperature=0, stop_at_eos=False, buffer=0)
    watched = replace(Settings(), max_new_tokens=args.tokens, temperature=0, stop_at_eos=False)  # the default loop
    print(f"`python bench.py {' '.join(argv if argv is not None else sys.argv[1:])}` ({provenance()})\n")
    print(f"model: {args.model_dir or 'gpt2 config, random weights'} ({sum(q.numel() for q in model.parameters()) / 1e6:.1f}M "
          f"params) on {device} {args.dtype}, {args.threads} CPU threads (GOMP_SPINCOUNT "
          f"{os.environ.get('GOMP_SPINCOUNT', 'unset')}), prompt {args.prompt_len} + {args.tokens} "
          f"new tokens, {args.refill} prompt(s) per batch slot, {args.repeats} runs of each side in turn; the default loop's "
          f"probe alarms on {args.alarm_rate:.0%} of prefixes")
    try:
        hf, version = hf_twin(model, cfg)
    except ImportError:
        hf, version = None, None
    enc = IdTokenizer()
    pack_for_cpu(model)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    # batch 1: the reference loop (backtrack.generate) beside the batched engine with one row
    one = prompts[:1]
    t_gen, t_b1 = map(min, timed_in_turn([lambda: (generate(model, enc, one[0], None, greedy), sync()),
                                          lambda: (generate_batch(model, enc, one, None, greedy, batch_size=1), sync())],
                                         args.repeats))
    print(f"\nbatch 1: generate {args.tokens / t_gen:.1f} tokens/s, generate_batch {args.tokens / t_b1:.1f} tokens/s "
          f"(ratio {t_gen / t_b1:.3f})\n")

    probe = FixedRateProbe(args.alarm_rate, args.flagged, torch.randn(cfg.n_layer + 1, cfg.n_embd), 0.0,
                           list(range(cfg.n_layer + 1)),
                           2, 0.5)
    print(f"| batch | ours, plain | ours, backtracking | tokens drawn per kept (slowest row) | backtracking / plain "
          "(median of pairs) "
          f"| transformers {version or '(not installed)'} | ours / transformers |\n|---|---|---|---|---|---|---|")
    loads = []
    for b in sizes:
        rows = prompts[:b * args.refill]
        kept = []

        def decode_hf():
            with torch.inference_mode():
                for start in range(0, len(rows), b):  # transformers' generate has no refill: batch after batch
                    ids = torch.tensor(rows[start:start + b], device=device)
                    hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.tokens,
                                min_new_tokens=args.tokens, pad_token_id=0)
            sync()
        plain, backtracking = timed_in_turn(
            [lambda: (generate_batch(model, enc, rows, None, greedy, batch_size=b), sync()),
             lambda: (kept.append(generate_batch(model, enc, rows, probe, watched, batch_size=b)), sync())], args.repeats)
        # transformers runs after, not in turn: on a GPU its allocations between ours slowed the run after it
        theirs = timed_in_turn([decode_hf], args.repeats) if hf is not None else []
        kept_tokens = sum(len(r.tokens) for r in kept[-1])  # greedy: every run keeps the same tokens
        rollbacks = sum(r.stats["rollbacks"] for r in kept[-1]) / len(rows)
        redraws = sum(r.stats["redraws"] for r in kept[-1]) / len(rows)
        # every rollback's discarded tokens are drawn again, and a fixed batch runs until its slowest row is done
        drawn = [r.stats["tokens_generated"] for r in kept[-1]]
        tokens = len(rows) * args.tokens
        # the ratio of each pair (run i of both sides), the median of them: robust to a slow spell
        ratio = statistics.median((kept_tokens / bt) / (tokens / pl) for pl, bt in zip(plain, backtracking))
        print(f"| {b} | {tokens / min(plain):.0f} | {kept_tokens / min(backtracking):.0f} ({rollbacks:.1f} rollbacks, "
              f"{redraws:.1f} redraws/row) | {sum(drawn) / kept_tokens:.2f} ({max(drawn) / args.tokens:.2f}) | {ratio:.2f} | "
              + (f"{tokens / min(theirs[0]):.0f} | {min(theirs[0]) / min(plain):.2f}x |" if theirs else " | |"))
        loads.append(os.getloadavg()[0])
    if max(loads) > (os.cpu_count() or 1) + 0.5:  # more runnable processes than cores over the last minute
        print(f"\nwarning: the machine's load reached {max(loads):.1f} on {os.cpu_count()} cores during this run: other "
              "work shared it, so these speeds say more about the machine than about the code; rerun when it is quiet")

    print("\nrollback time by cache length (moving the pointer; should be flat):")
    cache = model.new_cache(min(1024, cfg.n_positions))
    for length in (16, 256, 1000):
        if length < cache.max_len:
            t0 = time.perf_counter()
            for _ in range(10000):
                cache.lengths[0] = length  # as if `length` tokens were cached
                cache.rollback(length // 2)
            print(f"  {length:5d} tokens  {(time.perf_counter() - t0) / 10000 * 1e6:6.2f} us")

    if args.flips:
        count_flips(model, args)


def count_flips(model, args):
    """Sampled generations with the probe, batched vs alone: rows whose tokens or events differ.
    Batched matrix products differ from one-row ones by ~1e-6, so only a draw or a score exactly at
    a boundary can flip."""
    enc = load_tokenizer(args.model_dir)
    probe = probe_for(model, enc)
    rows = read_rtp(shared_path())[:args.flips]
    prompts = [r["prompt"] for r in rows]
    s = Settings(max_new_tokens=20)
    batched = generate_batch(model, enc, prompts, probe, s, seeds=range(len(prompts)), batch_size=32)
    flips = sum((a.tokens, [e["type"] for e in a.events]) != (b.tokens, [e["type"] for e in b.events])
                for i, (p, a) in enumerate(zip(prompts, batched))
                for b in [generate(model, enc, p, probe.clone(), replace(s, seed=i))])
    print(f"\nflips: {flips} of {len(prompts)} sampled rows (probe, buffer {s.buffer}, top-p {s.top_p}) differ "
          "between generate_batch and generate alone")
    print(json.dumps(dict(flips=flips, rows=len(prompts))))


if __name__ == "__main__":
    sys.exit(run_cli(main))
