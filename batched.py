"""Many generations at once, each with its own rollbacks: the engine behind evaluate.py.

    results = generate_batch(model, enc, prompts, detector, settings, seeds=seeds, batch_size=32)

One-token decoding reads every weight of the model for each token, so a forward pass for 32 rows costs
little more than a forward for one. This engine keeps one KV cache of `batch_size` rows, each with
its own length. Every step samples one token for every active row, runs one forward for all of them
(each row writes at its own slot and attends only to its own text), and then runs backtrack.py's
step() on each row: alarm, rollback, budget, ban, note and release happen per row, exactly as in
generate(). A row that finishes takes the next prompt at once (continuous batching), so one long
generation never idles the others.

The contract: results[i] equals generate(model, enc, prompts[i], detector, replace(settings,
seed=seeds[i])) in tokens, events and stop reason, scores within float tolerance. Each row samples
from its own random generator and scores with its own copy of the detector (a probe reads every
row's projection from one product: scorer.batch_readings). Batched matrix products may differ from
one-row ones by ~1e-6, so a choice exactly at a tie could flip; the tests check exactness under
greedy decoding with a scripted detector, and count flips with the probe.
"""
from dataclasses import replace

import torch

from backtrack import (NOTHING_TO_SAMPLE, Generation, Settings, after_prompt, cache_length, fallback, finish,
                       newest_states, next_draw, step, wrote)
from checks import UserError, check_detector, encode_prompt
from sampling import sample


@torch.inference_mode()
def generate_batch(model, enc, prompts, detector=None, settings=None, seeds=None, batch_size=32, on_result=None):
    """A Result per prompt, in order. seeds[i] is prompt i's seed (default: settings.seed for all).
    on_result(i, result) is called as each row finishes (for progress bars)."""
    settings = Settings.given(settings)
    check_detector(detector, settings.safe_level)
    if not isinstance(prompts, (list, tuple)):  # a string would be one prompt per character
        raise UserError(f"prompts must be a list of prompts (each text or token ids), not {type(prompts).__name__}")
    seeds = [settings.seed] * len(prompts) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise UserError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    if not (type(batch_size) is int and batch_size >= 1):
        raise UserError(f"batch_size must be an integer >= 1, not {batch_size!r}")
    row_settings = [replace(settings, seed=seed).check() for seed in seeds]  # a bad seed fails as in generate()
    encoded = [encode_prompt(enc, p, model, settings) for p in prompts]  # every error first
    jobs = iter(enumerate(encoded))
    n_rows = max(1, min(batch_size, len(prompts)))
    try:
        cache = model.new_cache(max_len=cache_length(model, encoded or [[]], settings), batch_size=n_rows)
    except (RuntimeError, MemoryError) as e:  # torch's allocator says so with a RuntimeError
        raise UserError(f"cannot allocate the KV cache of {n_rows} rows ({str(e).splitlines()[0][:120]}); use a smaller "
                        "batch size")
    device = model.wte.weight.device
    rows = [None] * len(cache.lengths)  # rows[r]: (prompt number, Generation) decoding in cache row r
    results = [None] * len(prompts)

    def fill(free):
        """Put the next prompts into the free rows, prefilled together in one forward pass."""
        new = []
        for r in free:
            job = next(jobs, None)
            rows[r] = None
            if job is not None:
                i, ids = job
                cache.rollback(0, r)
                rows[r] = (i, Generation(model, enc, row_detector(detector, settings), row_settings[i], cache, r, ids))
                new.append(rows[r][1])
        if new:
            width = max(len(q.prompt_ids) for q in new)  # shorter prompts are padded at the end,
            ids = torch.tensor([q.prompt_ids + [0] * (width - len(q.prompt_ids)) for q in new], device=device)
            _, hidden = model(ids, cache, "none", rows=[q.row for q in new])  # which causal attention never reads
            last = torch.tensor([len(q.prompt_ids) - 1 for q in new], device=device)
            logits = model.lm_head(hidden[-1][torch.arange(len(new), device=device), last])  # each prompt's last token
            for j, q in enumerate(new):
                cache.rollback(len(q.prompt_ids), q.row)  # forget the padding
                wrote(q, q.prompt_ids)
                after_prompt(q, logits[j, :q.vocab], [h[j, :len(q.prompt_ids)] for h in hidden])

    def end(finished):
        for r in finished:
            i, seq = rows[r]
            results[i] = finish(seq)
            if on_result:
                on_result(i, results[i])
        fill(finished)

    fill(range(len(rows)))
    while any(rows):
        active = [r for r, row in enumerate(rows) if row]
        seqs = [rows[r][1] for r in active]
        draws, banned, pools = zip(*[next_draw(q) for q in seqs])
        tokens = sample(torch.stack([q.path.next_logits[-1] for q in seqs]), draws, banned, pools, settings.temperature,
                        settings.top_k, settings.top_p)
        for q, token in zip(seqs, tokens):
            if token < 0:
                fallback(q, NOTHING_TO_SAMPLE)
        feed = [(r, q, t, draw) for r, q, t, draw in zip(active, seqs, tokens, draws) if t >= 0]
        if feed:
            ids = torch.tensor([[t] for _, _, t, _ in feed], device=device)
            which = [r for r, _, _, _ in feed]
            logits, hidden = model(ids, cache, "last", rows=None if which == list(range(len(rows))) else which)
            readings = detector.read(newest_states(hidden)) if detector is not None else None  # every row at once
            for j, (r, q, token, draw) in enumerate(feed):
                wrote(q, [token])
                step(q, token, draw, readings[j] if detector is not None else None, logits[j, -1])
        end([r for r, row in enumerate(rows) if row and row[1].stop_reason])
    return results


def row_detector(detector, settings):
    """A row's own copy of the detector, checked as the original was: a clone() that returns None (a
    missing `return`), another kind of object or a detector with other levels would leave the row
    unwatched, so it is refused."""
    if detector is None:
        return None
    twin, kind = detector.clone(), type(detector).__name__
    if type(twin) is not type(detector) or twin is detector:
        got = "the detector itself" if twin is detector else type(twin).__name__
        raise UserError(f"{kind}.clone() returned {got}, not a new {kind}: each row of a batch needs its own copy")
    check_detector(twin, settings.safe_level)
    return twin
