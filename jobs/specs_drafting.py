"""Method specs for drafting without a trained EAGLE head, from what the job already wrote, or by early exit.

`token-recycling` and `retrieval` need no drafter at all; `rasd` fuses retrieval with the EAGLE-2 tree;
`eesd` drafts with an early-exit head on the target's first layers; `eagle-thompson` is the EAGLE chain
under the same Thompson-sampling length controller as `eesd`. Parameters, defaults and sources are on each
class; what a class declares (`needs`, `autotune_grid`) is described in `specs.py`, which re-exports every
class here. Torch-free, like every `jobs` module.
"""

from __future__ import annotations

from .method_spec import MethodSpec, SpecError, _non_negative, _positive, method


@method("token-recycling")
class TokenRecyclingSpec(MethodSpec):
    """Token Recycling (Luo et al., 2024, arXiv 2408.08696): a token-indexed adjacency matrix [V, k] holds,
    for each token, the target's top-k next tokens the last time it was seen (at any node of any verified
    tree: rejected candidates are recycled too); each round drafts a static tree from the root by
    breadth-first lookup through the matrix and writes the round's new top-k back. No drafter, no
    training; the matrix lives per engine (actor) and stays warm across rows and shards; k = 8 as in the
    paper. Ours: the default template is the `nodes` most likely paths (depth <= max_depth) under a fixed
    per-rank acceptance prior (the paper hand-designs an ~80-node tree); `tree` (paths of child ranks,
    each rank < k) overrides it; on a token seen at several nodes of one round, the accepted path wins,
    then the later row, then the later node, so the matrix is deterministic. `matrix` (a local path, empty:
    off) keeps the matrix with the job: loaded when the engine starts if the file exists (safetensors), and
    written back (atomically) after every shard, so a resumed or rerun job starts warm; several actors
    sharing one path each write their own matrix, the last writer wins."""

    k: int = 8
    nodes: int = 64
    max_depth: int = 8
    tree: tuple[tuple[int, ...], ...] = ()
    matrix: str = ""
    autotune_grid = ({"nodes": 24}, {"nodes": 40}, {"nodes": 80})
    since_hash = {"matrix": ""}

    def check(self):
        for n in ("k", "nodes", "max_depth"):
            _positive(n, getattr(self, n))
        for p in self.tree:
            if not isinstance(p, (list, tuple)) or not p or not all(isinstance(r, int) and 0 <= r < self.k for r in p):
                raise SpecError(f"tree: each path must be a non-empty list of ranks in [0, k), got {p!r}")
            if len(p) > 1 and tuple(p[:-1]) not in {tuple(q) for q in self.tree}:
                raise SpecError(f"tree: path {list(p)!r} lacks its parent {list(p[:-1])!r}")
        _local_path("matrix", self.matrix)


@method("retrieval")
class RetrievalSpec(MethodSpec):
    """Prompt lookup (Saxena, 2023; the retrieval half of RASD, arXiv 2503.03434): the longest suffix of
    the row's text (up to max_ngram tokens, at least min_ngram) that occurred earlier in the row's own
    prompt + emitted tokens; the k tokens that followed its most recent occurrence are the draft. No
    drafter, no training. Ours: `branches` > 1 drafts the continuations of the best `branches` matches
    (longest, then the row's own text, then most recent) as chains sharing the root, verified as one tree;
    branches = 1 is plain prompt lookup. `datastore_tokens` > 0 also searches the job's datastore: the
    prompts and completions of every row this engine (actor) has finished, across batches and shards, in a
    ring buffer of that many tokens (REST-like, brute-force suffix match on the device; 0: off).
    `datastore` (a local path, empty: off) keeps it with the job like token-recycling's `matrix`: loaded
    at start if the file exists (safetensors), written after every shard, so tonight's job can draft from
    last night's outputs."""

    k: int = 8
    max_ngram: int = 4
    min_ngram: int = 1
    branches: int = 1
    datastore_tokens: int = 0
    datastore: str = ""
    autotune_grid = ({"k": 4}, {"k": 12}, {"branches": 3})
    since_hash = {"datastore_tokens": 0, "datastore": ""}

    def check(self):
        _check_lookup(self)


@method("rasd")
class RASDSpec(MethodSpec):
    """RASD (Quan et al., 2025, arXiv 2503.03434): a retrieval tree fused with the EAGLE-2 tree, verified as
    one tree in one target pass. Retrieval as `retrieval` (the row's own text, plus the job's datastore of
    finished rows when `datastore_tokens` > 0; `branches` candidates of k tokens, their shared prefixes
    merged into a trie); pruning by the draft head's distribution (the paper's rule: a retrieved candidate
    is kept only when its first token is among the head's `prune_top_k` most likely tokens at the root;
    0 keeps every candidate); fusion by longest common prefix (each kept candidate follows the EAGLE-2 tree
    as far as the tree has its tokens, and only its remaining suffix is added as new nodes). EAGLE-2 part:
    `top_k`, `depth`, `total_tokens` as in `eagle2`; the defaults are a smaller tree than `eagle2`'s, since
    retrieval supplies the long branches (H100, pycoder-22m, batch 1: depth 4 / 30 tokens ran 1.26x faster
    than depth 6 / 60 at the same tau, bench/results/h100-drafters-2). Ours: fixed node bound 1 + total_tokens
    + branches * k (merged or pruned nodes stay as invalid padding), so rounds are graph-static; `datastore`
    as in `retrieval`."""

    top_k: int = 10
    depth: int = 4
    total_tokens: int = 30
    k: int = 8
    max_ngram: int = 4
    min_ngram: int = 1
    branches: int = 4
    prune_top_k: int = 10
    datastore_tokens: int = 65536
    datastore: str = ""
    needs = {"draft": "eagle"}
    autotune_grid = ({"branches": 2}, {"branches": 8}, {"k": 12}, {"depth": 6, "total_tokens": 60})

    def check(self):
        for n in ("top_k", "depth", "total_tokens"):
            _positive(n, getattr(self, n))
        _non_negative("prune_top_k", self.prune_top_k)
        _check_lookup(self)


# ---------------------------------------------------------------- Thompson-sampled chain length


@method("eesd")
class EESDSpec(MethodSpec):
    """EESD (Liu et al., 2024, arXiv 2406.03853): the draft is a chain from an early-exit head on the target's
    first N layers (`model.draft` = a head from `adarun train-draft --early-exit N`: the target's layers < N,
    shared, then the head's trained adapter layer, its norm and the target's lm_head; its own KV cache),
    trained by self-distillation from the target's output distribution. Greedy: the head's argmax chain;
    sampling: tokens drawn from the head's own processed distribution q and verified by min(1, p/q)
    (Leviathan et al., 2023), exact in distribution.
    Length (the paper's Beta-TS): each row keeps a Beta(a, b) posterior on the chance that a drafted token
    is accepted, starting at (prior_accept, prior_reject) and updated after every round with the accepted
    tokens (a += n) and the rejection that ended the chain (b += 1 when it was cut short), both first
    scaled by `decay` (1: a plain posterior). Ours, to keep rounds graph-static: each round draws theta from
    the row's posterior (a counter-based draw from the row's seed, so reproducible) and picks, among
    `lengths`, the chain length L maximising the expected tokens per unit cost under theta,
    (1 - theta^(L+1)) / (1 - theta) / (1 + draft_cost * L); the batch drafts its longest row's choice and
    shorter rows mask the rest, so a round has one of len(lengths) shapes. draft_cost: one head step
    relative to a target pass; 0 = (N + 1) / the target's layer count (ours)."""

    lengths: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    draft_cost: float = 0.0
    prior_accept: float = 1.0
    prior_reject: float = 1.0
    decay: float = 1.0
    needs = {"draft": "early-exit"}
    autotune_grid = ({"draft_cost": 0.1}, {"draft_cost": 0.3}, {"lengths": [2, 4, 6, 8, 10, 12]})

    def check(self):
        _check_thompson(self)


@method("eagle-thompson")
class EagleThompsonSpec(MethodSpec):
    """The EAGLE-1 chain (Li et al., 2024; greedy argmax chain, verified like `eagle`) with EESD's
    Thompson-sampled length per row and round: parameters and rule as on `eesd` (arXiv 2406.03853).
    draft_cost: one head step relative to a target pass (ours: 0.1)."""

    lengths: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    draft_cost: float = 0.1
    prior_accept: float = 1.0
    prior_reject: float = 1.0
    decay: float = 1.0
    needs = {"draft": "eagle"}
    autotune_grid = ({"draft_cost": 0.05}, {"draft_cost": 0.2}, {"lengths": [2, 4, 6, 8, 10, 12]})

    def check(self):
        _check_thompson(self)


def _check_thompson(spec) -> None:
    if not spec.lengths or not all(isinstance(n, int) and 1 <= n <= 64 for n in spec.lengths):
        raise SpecError(f"lengths must be a non-empty list of chain lengths in [1, 64], got {list(spec.lengths)!r}")
    if not (spec.draft_cost >= 0 and spec.prior_accept > 0 and spec.prior_reject > 0 and 0 < spec.decay <= 1):
        raise SpecError("draft_cost must be >= 0, prior_accept and prior_reject > 0, decay in (0, 1]")


def _check_lookup(spec) -> None:
    for n in ("k", "max_ngram", "min_ngram", "branches"):
        _positive(n, getattr(spec, n))
    if spec.min_ngram > spec.max_ngram:
        raise SpecError(f"min_ngram ({spec.min_ngram}) must be <= max_ngram ({spec.max_ngram})")
    _non_negative("datastore_tokens", spec.datastore_tokens)
    _local_path("datastore", spec.datastore)
    if spec.datastore and not spec.datastore_tokens:
        raise SpecError("datastore needs datastore_tokens > 0 (the datastore's capacity in tokens)")


def _local_path(name: str, v: str) -> None:
    if "://" in v:
        raise SpecError(f"{name} must be a local path (on every node), got {v!r}")
