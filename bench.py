"""Decode speed of our model vs transformers' generate, and the cost of a rollback, in one run.

    python bench.py                      # GPT-2 124M config, random weights, 2 CPU threads
    python bench.py --model-dir ../shared/models/minigpt2 --tokens 200

Both sides run greedy decoding of the same prompt for the same number of new tokens with the same
weights; the figure that matters is the ratio, measured on this machine in this run.
"""
import argparse
import sys
import time

import torch

from model import GPT, GPTConfig, PRESETS, from_pretrained, run_cli


@torch.inference_mode()
def decode_ours(model, prompt, n_new):
    cache = model.new_cache(prompt.shape[1] + n_new)
    logits, _ = model(prompt, cache, which_logits="last")
    for _ in range(n_new):
        next_id = logits[:, -1].argmax(-1, keepdim=True)
        logits, _ = model(next_id, cache)
    return cache.length


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="checkpoint directory (default: GPT-2 124M config, random weights)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--tokens", type=int, default=100, help="new tokens per run (default 100)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side; the best is kept (default 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model_dir:
        model = from_pretrained(args.model_dir)
    else:
        model = GPT(GPTConfig(**PRESETS["gpt2"])).eval()
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len))
    print(f"model: {args.model_dir or 'gpt2 config, random weights'} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), {args.threads} threads, "
          f"prompt {args.prompt_len} + {args.tokens} new tokens, best of {args.repeats}")

    plain = best_time(lambda: decode_ours(model, prompt, args.tokens), args.repeats)
    print(f"ours, unpacked {args.tokens / plain:7.1f} tokens/s   (nn.Linear)")
    hf_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.pack_for_cpu()
    ours = best_time(lambda: decode_ours(model, prompt, args.tokens), args.repeats)
    print(f"ours          {args.tokens / ours:8.1f} tokens/s   (pack_for_cpu: what backtrack.py runs on CPU)")
    try:
        import transformers
    except ImportError:
        print("transformers   not installed: pip install transformers for the comparison")
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
            n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function=cfg.activation_function)).eval()
        hf.transformer.load_state_dict(
            {k: (v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v)
             for k, v in hf_state.items() if k != "lm_head.weight"}, strict=False)

        def decode_hf():
            with torch.inference_mode():
                hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=args.tokens, min_new_tokens=args.tokens, pad_token_id=0)
        theirs = best_time(decode_hf, args.repeats)
        print(f"transformers  {args.tokens / theirs:8.1f} tokens/s   (transformers {transformers.__version__})")
        print(f"ratio         {theirs / ours:8.2f}x  ours / transformers")

    print("rollback time by cache length (moving the pointer; should be flat):")
    cache = model.new_cache(min(1024, cfg.n_positions))
    for length in (16, 256, 1000):
        if length >= cache.max_len:
            continue
        n = 10000
        t0 = time.perf_counter()
        for _ in range(n):
            cache.lengths[0] = length  # as if `length` tokens were cached
            cache.rollback(length // 2)
        print(f"  {length:5d} tokens  {(time.perf_counter() - t0) / n * 1e6:6.2f} us")


if __name__ == "__main__":
    sys.exit(run_cli(main))
