"""Turns a batch of logits into next tokens: greedy rows by argmax, the rest filtered and sampled together.

Seeded requests draw from their own generator so the same seed gives the same text in any batch.
"""

from __future__ import annotations

import torch

from fleetserve.engine.native.sequence import Sequence


def _ban_eos_until_min_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> None:
    for i, seq in enumerate(seqs):
        sp = seq.sampling
        if seq.num_output_tokens < sp.min_tokens:
            banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else eos_ids)
            if banned:
                logits[i, banned] = float("-inf")


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> list[int]:
    """logits [B, V] fp32 (modified in place)."""
    _ban_eos_until_min_tokens(logits, seqs, eos_ids)
    greedy = [s.sampling.greedy for s in seqs]
    argmax = logits.argmax(dim=-1)
    if all(greedy):
        return argmax.tolist()
    rows = [i for i, g in enumerate(greedy) if not g]
    sub = logits[rows]
    sps = [seqs[i].sampling for i in rows]
    dev = logits.device
    temps = torch.tensor([sp.temperature for sp in sps], device=dev)
    sub = sub / temps[:, None]
    sorted_logits, sorted_idx = sub.sort(dim=-1, descending=True)
    vocab = sub.shape[-1]
    ranks = torch.arange(vocab, device=dev)[None, :]
    top_k = torch.tensor([sp.top_k if sp.top_k > 0 else vocab for sp in sps], device=dev)
    mask = ranks >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([sp.top_p for sp in sps], device=dev)
    mask |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # keeps at least the top token
    min_p = torch.tensor([sp.min_p for sp in sps], device=dev)
    mask |= probs < min_p[:, None] * probs[:, :1]
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    picks = torch.empty(len(rows), dtype=torch.long, device=dev)
    unseeded = [j for j, i in enumerate(rows) if seqs[i].generator is None]
    if unseeded:
        picks[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(1)
    for j, i in enumerate(rows):
        gen = seqs[i].generator
        if gen is not None:
            picks[j] = torch.multinomial(probs[j].cpu(), 1, generator=gen).item()
    chosen = sorted_idx.gather(1, picks[:, None]).squeeze(1)
    out = argmax.clone()
    out[rows] = chosen
    return out.tolist()
