"""Turns a batch of logits into next tokens: greedy rows by argmax, the rest filtered and sampled together.

Order per row: raw logits (kept for logprobs) -> logits processors (grammar masks) -> logit bias ->
repetition / presence / frequency penalties -> min_tokens EOS ban -> temperature, top-k, top-p,
min-p -> argmax or a draw. Seeded requests draw from their own generator, so the same seed gives
the same text in any batch.
"""

from __future__ import annotations

import torch

from fleetserve.engine.native.sequence import Sequence
from fleetserve.engine.types import TokenLogprob


def token_logprobs(logits: torch.Tensor, token_ids: list[int], k: list[int]) -> list[TokenLogprob]:
    """logits [R, V] raw; the logprob and rank of token_ids[r] in row r, plus the top k[r]."""
    logp = logits.float().log_softmax(dim=-1)
    ids = torch.tensor(token_ids, device=logits.device)
    chosen = logp.gather(1, ids[:, None]).squeeze(1)
    ranks = (logp > chosen[:, None]).sum(dim=1) + 1
    kmax = max(k) if k else 0
    top_v, top_i = (logp.topk(kmax, dim=-1) if kmax else (None, None))
    out = []
    chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
    top_vl = top_v.tolist() if kmax else None
    top_il = top_i.tolist() if kmax else None
    for r, tid in enumerate(token_ids):
        top = list(zip(top_il[r][: k[r]], top_vl[r][: k[r]])) if kmax and k[r] else []
        out.append(TokenLogprob(tid, chosen_l[r], ranks_l[r], top))
    return out


def _apply_controls(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> None:
    for i, seq in enumerate(seqs):
        sp = seq.sampling
        row = logits[i]
        out_ids = seq.output_token_ids
        for proc in sp.logits_processors:
            proc(out_ids, row)
        _add_logit_bias(row, sp)
        if sp.needs_penalties:
            _penalise(row, seq)
        if seq.num_output_tokens < sp.min_tokens:
            _ban_ending(row, sp, eos_ids)


def _add_logit_bias(logits: torch.Tensor, sp) -> None:
    """OpenAI logit_bias, added in place to a row [V] or to every row of [R, V]."""
    if sp.logit_bias:
        idx = torch.tensor(list(sp.logit_bias), device=logits.device)
        logits[..., idx] += torch.tensor(list(sp.logit_bias.values()), device=logits.device, dtype=logits.dtype)


def _ban_ending(logits: torch.Tensor, sp, eos_ids: list[int]) -> None:
    """min_tokens not reached yet: no stop token (nor EOS, unless ignored) may be chosen."""
    banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else eos_ids)
    if banned:
        logits[..., banned] = float("-inf")


def _penalise(row: torch.Tensor, seq: Sequence) -> None:
    sp = seq.sampling
    vocab = row.shape[0]
    if sp.repetition_penalty != 1.0:  # HF/vLLM: over prompt and output tokens
        seen = torch.tensor(sorted(set(seq.token_ids)), device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
    if (sp.presence_penalty or sp.frequency_penalty) and seq.num_output_tokens:  # OpenAI: output only
        counts = torch.bincount(torch.tensor(seq.output_token_ids, device=row.device), minlength=vocab)
        counts = counts[:vocab].to(row.dtype)
        row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(row.dtype)


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] fp32 (modified in place). Returns next tokens and, where asked, their logprobs."""
    want_lp = [i for i, s in enumerate(seqs) if s.sampling.logprobs is not None]
    raw = logits[want_lp].clone() if want_lp else None
    if any(s.sampling.logits_processors or s.sampling.logit_bias or s.sampling.needs_penalties
           or s.num_output_tokens < s.sampling.min_tokens for s in seqs):
        _apply_controls(logits, seqs, eos_ids)
    tokens = _choose(logits, seqs)
    lps: list[TokenLogprob | None] = [None] * len(seqs)
    if want_lp:
        got = token_logprobs(raw, [tokens[i] for i in want_lp], [seqs[i].sampling.logprobs for i in want_lp])
        for i, lp in zip(want_lp, got):
            lps[i] = lp
    return tokens, lps


def _choose(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    greedy = [s.sampling.greedy for s in seqs]
    argmax = logits.argmax(dim=-1)
    if all(greedy):
        return argmax.tolist()
    out = argmax.tolist()
    # Rows are grouped by how much ranking they need, so a row's draw never depends on its neighbours:
    # plain temperature sampling needs none, a small top-k only its k best, top-p/min-p a full sort.
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(seqs):
        if not greedy[i]:
            sp = s.sampling
            kind = ("plain" if sp.top_k <= 0 and sp.top_p >= 1.0 and sp.min_p <= 0.0
                    else "topk" if 0 < sp.top_k <= 1024 else "sort")
            groups.setdefault(kind, []).append(i)
    for kind, rows in groups.items():
        for i, tok in zip(rows, _sample_rows(logits[rows], [seqs[i] for i in rows], kind)):
            out[i] = tok
    return out


def _sample_rows(sub: torch.Tensor, seqs: list[Sequence], kind: str) -> list[int]:
    """sub: a copy of the rows' logits (advanced indexing), so in place is safe."""
    sps = [s.sampling for s in seqs]
    dev = sub.device
    temps = torch.tensor([sp.temperature for sp in sps], device=dev).clamp_min(torch.finfo(torch.float32).tiny)
    # A tiny temperature or repetition penalty must not overflow logits into inf - inf = NaN in the softmax
    # (that fails the whole step, i.e. every request in the batch): penalised logits are kept finite, and each
    # row is shifted by its max before the division (softmax is shift-invariant, so nothing else changes).
    if any(sp.needs_penalties for sp in sps):
        sub.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(sub.dtype).max, neginf=float("-inf"))
    sub.sub_(sub.amax(dim=-1, keepdim=True)).div_(temps[:, None])
    if kind == "plain":
        return _draw(sub.softmax(dim=-1), seqs).tolist()
    vocab = sub.shape[-1]
    if kind == "topk":  # a full sort of the vocabulary costs milliseconds per row
        sorted_logits, sorted_idx = sub.topk(max(sp.top_k for sp in sps), dim=-1)
    else:
        sorted_logits, sorted_idx = sub.sort(dim=-1, descending=True)
    ranks = torch.arange(sorted_logits.shape[-1], device=dev)[None, :]
    top_k = torch.tensor([min(sp.top_k, vocab) if sp.top_k > 0 else vocab for sp in sps], device=dev)
    mask = ranks >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([sp.top_p for sp in sps], device=dev)
    mask |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # keeps at least the top token
    min_p = torch.tensor([sp.min_p for sp in sps], device=dev)
    mask |= probs < min_p[:, None] * probs[:, :1]
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    return sorted_idx.gather(1, _draw(probs, seqs)[:, None]).squeeze(1).tolist()


def _draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One index per row. A seeded request inverts its CDF with one uniform from its own generator, so the
    same seed gives the same text whatever else is in the batch (and however long the candidate list is)."""
    picks = torch.empty(len(seqs), dtype=torch.long, device=probs.device)
    unseeded = [j for j, s in enumerate(seqs) if s.generator is None]
    if unseeded:
        picks[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(1)
    for j, s in enumerate(seqs):
        if s.generator is not None:
            cdf = probs[j].double().cumsum(0).cpu()
            u = torch.rand((), generator=s.generator, dtype=torch.float64) * cdf[-1]
            picks[j] = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
    return picks


def verify_greedy(logits: torch.Tensor, seq: Sequence, drafts: list[int], eos_ids: list[int]
                  ) -> tuple[list[int], list[TokenLogprob] | None]:
    """Speculative verification of one greedy sequence. logits [1 + k, V]: row j follows the sequence's tokens
    plus drafts[:j]. Returns the target's choices up to and including the first that differs from its draft
    (all accepted drafts + one bonus token), with their logprobs when asked for."""
    sp = seq.sampling
    raw = logits.clone() if sp.logprobs is not None else None
    _add_logit_bias(logits, sp)
    banned_rows = sp.min_tokens - seq.num_output_tokens  # row j has num_output_tokens + j outputs before it
    if banned_rows > 0:
        _ban_ending(logits[:banned_rows], sp, eos_ids)
    choice = logits.argmax(dim=-1).tolist()
    a = 0
    while a < len(drafts) and choice[a] == drafts[a]:
        a += 1
    tokens = choice[: a + 1]
    lps = token_logprobs(raw[: a + 1], tokens, [sp.logprobs] * len(tokens)) if raw is not None else None
    return tokens, lps
