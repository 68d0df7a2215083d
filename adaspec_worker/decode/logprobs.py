"""Log-probabilities of the emitted tokens (`decoding.logprobs`, `decoding.top_logprobs`), from the logits the
target computed for verification anyway.

The distribution is the target's raw next-token distribution: `log_softmax` of its logits in float32 (or
wider), before temperature, top-k and top-p, as vLLM reports by default (`raw_logprobs`). Why raw rather than
the processed sampling distribution: it is a property of the model and the text alone, so rows decoded with
different per-row temperatures stay comparable, greedy rows get real values (greedy has no sampling
distribution), sampled tokens never get -inf from a truncated tail, and the values equal a plain forward
over prompt + completion (what distillation, scoring and perplexity users compute).

`path_logprobs` picks, inside one round, the logits at the nodes on the accepted path (root, accepted...):
the token emitted after path node j is emitted[:, j] (accepted token j+1, or the bonus), so its
log-probability is read from node j's logits. Fixed shapes, no host sync (CUDA-graph safe). Knows nothing of
trees beyond the path, of batching, or of how the outcome travels to the host (`stats.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprobs:
    """Per row and emitted-token slot of a round (slots past n_accepted + 1 mean nothing)."""

    chosen: torch.Tensor  # [B, P] log p(emitted token) under the raw target distribution
    top_ids: torch.Tensor  # [B, P, k] the k most likely token ids, most likely first (k may be 0)
    top: torch.Tensor  # [B, P, k] their log-probabilities


def path_logprobs(logits: torch.Tensor, path: torch.Tensor, emitted: torch.Tensor, k: int) -> TokenLogprobs:
    """logits [B, N, V] the target's logits at each tree node; path [B, P] node indices root..deepest accepted;
    emitted [B, P] the token emitted after each path node (accepted..., bonus); k: top alternatives per token."""
    V = logits.shape[-1]
    at = torch.gather(logits, 1, path[:, :, None].expand(-1, -1, V))  # [B, P, V] only the path's rows
    lp = at.to(torch.promote_types(at.dtype, torch.float32)).log_softmax(-1)  # [B, P, V]
    chosen = lp.gather(-1, emitted[..., None]).squeeze(-1)  # [B, P]
    top, top_ids = lp.topk(min(k, V), dim=-1)  # [B, P, k] sorted, most likely first
    return TokenLogprobs(chosen=chosen, top_ids=top_ids, top=top)


def next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> TokenLogprobs:
    """One emitted token per row (plain decoding outside the tree engine): logits [B, V], tokens [B]."""
    B = logits.shape[0]
    return path_logprobs(logits[:, None], torch.zeros(B, 1, dtype=torch.long, device=logits.device), tokens[:, None], k)
