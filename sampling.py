"""Sampling: what next-token logits become, one token id per row.

    tokens = sample(logits, draws, banned, pools, temperature=1.0, top_k=0, top_p=0.9)
    token = sample_one(logits[0], draws[0], banned[0], pools[0], ...)  # one row

Every row draws with its own uniform number (the loop's draws, recorded in traces so a port can replay
them), never one of its banned ids, and only among its pool of likeliest ids where it has one. Reads
nothing of the loop: the arguments are all it knows.
"""
import torch
import torch.nn.functional as F

GREEDY_BELOW = 1e-6  # a temperature this small is greedy: dividing logits by it would overflow


def sample(logits, draws, banned, pools=None, temperature=1.0, top_k=0, top_p=1.0):
    """One token id per row of next-token logits (B, V) and uniform draws (B,) in [0, 1], never one of
    that row's `banned` ids and, where pools[row] > 0, always one of its pools[row] likeliest ids (ties
    at the cut included); -1 where nothing can be sampled (every candidate banned, or logits that are
    not numbers). A temperature below GREEDY_BELOW is greedy and ignores the draws; top_k 0 keeps every
    token, top_p 1 the whole mass. The decoding loop (backtrack.py) decides what is banned and pooled where."""
    logits = logits.float()
    vocab = logits.shape[1]
    pools = pools or [0] * len(banned)
    best, greedy = logits.max(-1)  # a NaN anywhere makes the max NaN
    cut = [row for row, (ids, k) in enumerate(zip(banned, pools)) if ids or 0 < k < vocab]
    if cut:  # only these rows are copied and cut: copying every row's logits costs more than the cuts
        rows = logits[cut]
        for j, row in enumerate(cut):
            if 0 < pools[row] < vocab:  # the pool is cut first, so bans use it up
                rows[j].masked_fill_(rows[j] < torch.topk(rows[j], pools[row]).values[-1], float("-inf"))
            rows[j, list(banned[row])] = float("-inf")
        where = torch.tensor(cut, device=logits.device)
        best[where], greedy[where] = rows.max(-1)  # all banned makes the max -inf
    broken = ~torch.isfinite(best)
    if temperature < GREEDY_BELOW:
        return torch.where(broken, -1, greedy).tolist()
    if cut:
        logits = logits.index_copy(0, where, rows)
    if broken.any():
        logits = torch.where(broken[:, None], 0.0, logits)  # sample something harmless; these rows get -1
    probs = (logits / temperature).softmax(-1)
    broken |= ~torch.isfinite(probs).all(-1)  # logits so large that dividing by the temperature overflowed
    ids = None
    if top_k or top_p < 1:
        probs, ids = candidates(probs, top_k, top_p)
    # inverse CDF with one uniform draw per row; side="right" never lands on a zero-probability token
    cdf = probs.cumsum(-1)
    u = torch.tensor(draws, dtype=cdf.dtype, device=cdf.device)
    i = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], side="right")[:, 0]
    i = torch.minimum(i, cdf.argmax(-1))  # a draw of exactly 1 (some backends' rand can return it) stays in range
    tokens = i if ids is None else ids.gather(1, i[:, None])[:, 0]
    tokens = torch.where(broken, -1, tokens).tolist()
    return [-1 if t in ids_banned else t for t, ids_banned in zip(tokens, banned)]  # never a banned token


def sample_one(logits, draw, banned, pool=0, temperature=1.0, top_k=0, top_p=1.0):
    """sample() for one row: next-token logits (V,) -> a token id, or -1."""
    return sample(logits[None], [draw], [banned], [pool], temperature, top_k, top_p)[0]


def candidates(probs, top_k, top_p):
    """The tokens each row may draw under top-k and top-p, by falling probability: (probs, ids), both
    (B, k), with probability 0 past a row's cut. Sorting GPT-2's whole vocabulary on a CPU costs more than
    a forward pass of a small model, so each row widens a topk until it holds top_p of its mass."""
    n = min(top_k or probs.shape[1], probs.shape[1])
    k = min(n, 256)
    top, ids = torch.topk(probs, k)
    short = top.sum(-1) < top_p
    while k < n and bool(short.any()):
        k = min(n, 8 * k)
        top, ids = F.pad(top, (0, k - top.shape[1])), F.pad(ids, (0, k - ids.shape[1]))
        top[short], ids[short] = torch.topk(probs[short], k)
        short = top.sum(-1) < top_p
    if top_p < 1:
        top = top * (top.cumsum(-1) - top < top_p)  # the smallest prefix whose mass reaches top_p
    return top, ids
