"""Draft proposers for speculative decoding: n-gram prompt lookup and an EAGLE-1 draft head.

Verification is the runner's (`ModelRunner._verify`): whatever a drafter proposes, a greedy request's
output is exactly the one plain decoding gives; a better drafter only means more tokens per step.

EAGLE-1 head (e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B): `fc` maps concat(embedding(token at p + 1),
target feature at p) to the hidden size, then one Llama decoder layer (no input norm, as in EAGLE-1);
its output is a guess of the target feature at p + 1, and the target's own LM head turns it into a
draft token. The head shares the target's embedding and LM head and keeps its K/V in a one-layer
paged cache indexed by the target's block tables (same slots, same positions). After each step the
head first catches up on the positions the target just verified (their features are this step's
hidden states), then drafts k tokens as a top-1 chain; the drafts are verified in the next step.
"""

from __future__ import annotations

import dataclasses
import json
from array import array
from pathlib import Path

import torch
from torch import nn

from fleetserve.engine.native.attention import AttentionMetadata, PrefillSegment
from fleetserve.engine.native.block_manager import BlockManager
from fleetserve.engine.native.kv_cache import KVCache
from fleetserve.engine.native.linear import Linear
from fleetserve.engine.native.loader import activation_dtype
from fleetserve.engine.native.model import DecoderLayer, LlamaModel
from fleetserve.engine.native.model_config import ModelConfig
from fleetserve.engine.native.rope import rope_cache
from fleetserve.engine.native.sequence import Sequence


def ngram_propose(tokens: list[int], k: int, n_max: int = 3, n_min: int = 1) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens (n = n_max down to
    n_min, the longest match wins). Searched as bytes: one C-level rfind instead of a Python loop."""
    length = len(tokens)
    if k <= 0 or length < 2:
        return []
    buf = array("i", tokens).tobytes()
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pat = buf[4 * (length - n):]
        end = 4 * (length - 1)  # an occurrence must end before the last token (it is the suffix itself)
        while True:
            idx = buf.rfind(pat, 0, end)
            if idx < 0:
                break
            if idx % 4 == 0:  # aligned on a token
                i = idx // 4
                return tokens[i + n : i + n + k]
            end = idx + len(pat) - 1
    return []


class _NoNorm(nn.Module):
    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        return x


class EagleHead(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int, fc_bias: bool, input_norm: bool):
        super().__init__()
        self.cfg = cfg
        self.fc = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=fc_bias)
        self.layer = DecoderLayer(cfg)
        if not input_norm:  # EAGLE-1's layer 0 has no input norm
            self.layer.input_layernorm = _NoNorm()
        self.max_len = max_len

    @classmethod
    def load(cls, path: Path, target: LlamaModel, device: torch.device, dtype: torch.dtype) -> EagleHead:
        raw = json.loads((path / "config.json").read_text())
        raw.setdefault("architectures", ["LlamaForCausalLM"])
        cfg = dataclasses.replace(ModelConfig.from_hf_dict(raw), num_layers=1)
        if cfg.hidden_size != target.cfg.hidden_size:
            raise ValueError(f"EAGLE head hidden size {cfg.hidden_size} != target model's {target.cfg.hidden_size}")
        weights = {k.removeprefix("model."): v for k, v in _read_tensors(path).items()}
        head = cls(cfg, target.max_len, "fc.bias" in weights, "layers.0.input_layernorm.weight" in weights)
        w = lambda name: weights[f"layers.0.{name}"]  # noqa: E731
        fused = {
            "fc.weight": weights["fc.weight"],
            "layer.self_attn.qkv_proj.weight": torch.cat([w(f"self_attn.{p}_proj.weight") for p in "qkv"]),
            "layer.self_attn.o_proj.weight": w("self_attn.o_proj.weight"),
            "layer.mlp.gate_up_proj.weight": torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]),
            "layer.mlp.down_proj.weight": w("mlp.down_proj.weight"),
            "layer.post_attention_layernorm.weight": w("post_attention_layernorm.weight"),
        }
        if "fc.bias" in weights:
            fused["fc.bias"] = weights["fc.bias"]
        if "layers.0.input_layernorm.weight" in weights:
            fused["layer.input_layernorm.weight"] = w("input_layernorm.weight")
        if cfg.attention_bias:
            fused["layer.self_attn.qkv_proj.bias"] = torch.cat([w(f"self_attn.{p}_proj.bias") for p in "qkv"])
        if cfg.qk_norm:
            fused["layer.self_attn.q_norm.weight"] = w("self_attn.q_norm.weight")
            fused["layer.self_attn.k_norm.weight"] = w("self_attn.k_norm.weight")
        missing = set(dict(head.named_parameters())) - set(fused)
        if missing:
            raise ValueError(f"EAGLE head at {path} lacks {sorted(missing)}")
        head.load_state_dict(fused, strict=False)
        head = head.to(device=device, dtype=activation_dtype(device, dtype)).eval().requires_grad_(False)
        cos, sin = rope_cache(cfg, head.max_len)
        head.rope_cos, head.rope_sin = cos.to(device), sin.to(device)
        for m in head.modules():
            if isinstance(m, Linear):
                m.prepack(target.matmul_dtype)
        return head

    def forward(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, kv, meta
                ) -> torch.Tensor:
        x = self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        return self.layer(x, cos, sin, kv[0], kv[1], meta)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    binary = path / "pytorch_model.bin"
    if binary.exists():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no *.safetensors or pytorch_model.bin in {path}")


class EagleDrafter:
    """Runs the EAGLE head after each target step and leaves k drafts in `seq.next_drafts`."""

    def __init__(self, head: EagleHead, target: LlamaModel, bm: BlockManager, num_blocks: int, k: int,
                 max_model_len: int, device: torch.device, dtype: torch.dtype):
        self.head, self.target, self.bm, self.k = head, target, bm, k
        self.max_model_len = max_model_len
        self.device = device
        self.bs = bm.block_size
        self.kv = KVCache(head.cfg, num_blocks, self.bs, dtype, device).layers[0]

    def _slots(self, seq: Sequence, positions: range) -> list[int]:
        table = seq.block_table
        return [table[p // self.bs] * self.bs + p % self.bs for p in positions]

    def after_step(self, hidden: torch.Tensor, pairs, starts: list[int], out) -> None:
        new = {id(seq): toks for seq, toks, _ in out if toks}
        dev = self.device
        rows: list[int] = []
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        segments: list[PrefillSegment] = []
        chain: list[tuple[Sequence, int]] = []  # (seq, row of its last catch-up position in the head's batch)
        row0 = 0
        for (seq, n), start in zip(pairs, starts):
            first_row, row0 = row0, row0 + n
            if not seq.can_speculate or not seq.block_table:
                continue
            known = seq.token_ids + new.get(id(seq), [])
            end = min(seq.num_computed_tokens, len(known) - 1)  # positions whose feature and next token are known
            if end <= start:
                continue
            m = end - start
            rows.extend(range(first_row, first_row + m))
            ids.extend(known[start + 1 : end + 1])
            pos.extend(range(start, end))
            slots.extend(self._slots(seq, range(start, end)))
            segments.append(PrefillSegment(len(ids) - m, len(ids), end,
                                           torch.tensor(seq.block_table, dtype=torch.long, device=dev)))
            seq.draft_computed = end
            seq.next_drafts = []
            if id(seq) in new and end == seq.num_computed_tokens:
                chain.append((seq, len(ids) - 1))
        if not segments:
            return
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev), prefills=segments)
        feats = self.head(self.target.embed_tokens(torch.tensor(ids, device=dev)), hidden[rows],
                          torch.tensor(pos, device=dev), self.kv, meta)
        if chain:
            self._chain(chain, feats)

    def _chain(self, chain: list[tuple[Sequence, int]], feats: torch.Tensor) -> None:
        """Top-1 chain: k drafts per sequence, one head step per draft after the first."""
        dev = self.device
        lengths = []
        for seq, _ in chain:
            out_len = len(seq.token_ids) + 1 - seq.num_prompt_tokens  # the new token is not appended yet
            k = min(self.k, seq.sampling.max_tokens - out_len - 1, self.max_model_len - len(seq.token_ids) - 1)
            # the chain writes head K/V at positions num_computed .. num_computed + k - 2: reserve their blocks
            while k > 1 and not self.bm.can_allocate(seq, k - 1):
                k -= 1
            if k > 1:
                self.bm.allocate(seq, k - 1)
            lengths.append(max(k, 0))
        seqs = [seq for seq, _ in chain]
        feat = feats[[r for _, r in chain]]  # rows follow `live`
        tokens = self.target.compute_logits(feat).argmax(dim=-1)
        drafts = [[t] for t in tokens.tolist()]
        pos = [seq.num_computed_tokens for seq in seqs]  # the first chain position (the new token's)
        live = list(range(len(seqs)))
        for step in range(1, max(lengths, default=0)):
            keep = [j for j, i in enumerate(live) if lengths[i] > step]
            if len(keep) < len(live):
                sel = torch.tensor(keep, device=dev)
                feat, tokens, live = feat[sel], tokens[sel], [live[j] for j in keep]
            ss = [seqs[i] for i in live]
            p = [pos[i] + step - 1 for i in live]
            max_blocks = max(len(s.block_table) for s in ss)
            tables = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in ss],
                                  dtype=torch.long, device=dev)
            ctx = torch.tensor([q + 1 for q in p], device=dev)
            span = torch.arange(max_blocks * self.bs, device=dev)
            mask = span[None, :] < ctx[:, None]
            if self.head.cfg.sliding_window:
                mask &= span[None, :] >= (ctx - self.head.cfg.sliding_window)[:, None]
            slots = [self._slots(s, range(q, q + 1))[0] for s, q in zip(ss, p)]
            meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                                     num_decode=len(ss), decode_block_tables=tables,
                                     decode_mask=mask.view(len(ss), 1, 1, -1))
            feat = self.head(self.target.embed_tokens(tokens), feat, torch.tensor(p, device=dev), self.kv, meta)
            tokens = self.target.compute_logits(feat).argmax(dim=-1)
            for i, t in zip(live, tokens.tolist()):
                drafts[i].append(t)
        for seq, d, n in zip(seqs, drafts, lengths):
            seq.next_drafts = d[:n]
