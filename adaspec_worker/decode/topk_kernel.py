"""The draft tree's top-k: log-softmax over the vocabulary and its k best entries, in one Triton kernel (and the
plain top-k of a small row, the frontier's and the rerank's, with the same kernel).

What it does: for each row of logits [R, V] (one program per row, the whole row in registers) it computes the
log-sum-exp in float32, then k times takes the row's largest logit and its index (the smallest index among
equal values) and masks it out; the values come back as log-probabilities (logit - log-sum-exp), float32, best
first, the indices as int64. A vocabulary-sized row (more than `SPLIT_MIN` entries) is split in two kernels
instead: one program per `CHUNK` of the row takes the chunk's k best and its max and sum of exponentials, and one
program per row merges the chunks' candidates (the largest value, the smallest index among equal ones, k times)
and log-sum-exps. A batch-1 draft level has 10 rows: ten programs each reducing a whole 8,192-entry row k times
in sequence was 7 us a call, 49 us of a 684 us `eagle2` round (bench/results/h100-split, profile-split); split,
the batch-1 ratios rose 0.8% (T=0) and 1.1% (T=0.7), within the noise (bench/results/memory-fix-sweeps). Whether a
row is split depends on V alone, never on R, so a row's values do not depend on the rows beside it.

The plain path is a log-softmax kernel writing the whole [R, V] float32 table and
`torch.topk` reading it back: two to six kernels by the table's size, and at batch 16 (an EAGLE-2 level
expands 160 nodes) `topk`'s radix select was a quarter of an `eagle2` round's GPU time on an H100
(bench/results/h100-kernel-default, profile-b16).

Where it runs: CUDA rows of at most `MAX_VOCAB` logits (`MAX_SPLIT_VOCAB` split) and k of at most `MAX_K`
(`log_softmax_topk` falls back to the plain ops otherwise, and on the CPU unless Triton's interpreter is on).
Checked equal to the plain ops through the interpreter, alone and in whole engine runs (`tests/test_topk_kernel.py`).

What it does not know: trees, drafters or sampling; which rows are padding.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

MAX_VOCAB = 32768  # a row in registers: 32k float32 over 16 warps is 64 values a thread
MAX_K = 32
SPLIT_MIN = 2048  # rows longer than this are split into chunks (ADARUN_TOPK_SPLIT=0: never, for comparison)
MAX_CHUNKS = 32  # chunks per row: the merge's candidates (chunks x k) stay a few thousand at most
MAX_SPLIT_VOCAB = MAX_CHUNKS * 8192  # the split path's longest row (a 128k vocabulary: 32 chunks of 4,096)

_KERNEL = None  # the jitted kernels once `available()` defined them
_CHUNK_KERNEL = None
_MERGE_KERNEL = None


class TopK(NamedTuple):
    values: torch.Tensor  # [..., k] best first: float32 log-probabilities (log_softmax_topk), or x's values (top_k)
    indices: torch.Tensor  # [..., k] int64 vocabulary ids


@functools.cache
def available() -> bool:
    global _KERNEL, _CHUNK_KERNEL, _MERGE_KERNEL
    try:
        _KERNEL, _CHUNK_KERNEL, _MERGE_KERNEL = _define()
    except ImportError:
        return False
    return True


def _define():
    import triton
    import triton.language as tl

    @triton.jit
    def topk_kernel(x_ptr, val_ptr, idx_ptr, V, stride, K: tl.constexpr, BLOCK: tl.constexpr,
                    LOG_SOFTMAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride + cols, mask=cols < V, other=float("-inf"))
        if LOG_SOFTMAX:  # values as log-probabilities, in float32
            x = x.to(tl.float32)
            top = tl.max(x, 0)
            lse = top + tl.log(tl.sum(tl.exp(x - top), 0))
        else:  # the values themselves, in their dtype (a float64 rerank key keeps its tie-break)
            lse = 0.0
        for j in tl.static_range(K):
            best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            tl.store(val_ptr + row * K + j, (best - lse).to(val_ptr.dtype.element_ty))
            tl.store(idx_ptr + row * K + j, at.to(tl.int64))
            x = tl.where(cols == at, float("-inf"), x)

    @triton.jit
    def chunk_topk_kernel(x_ptr, cval_ptr, cidx_ptr, stat_ptr, V, stride, K: tl.constexpr, CHUNK: tl.constexpr,
                          NCHUNK: tl.constexpr, LOG_SOFTMAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        local = tl.arange(0, CHUNK)
        cols = chunk * CHUNK + local
        x = tl.load(x_ptr + row * stride + cols, mask=cols < V, other=float("-inf"))
        if LOG_SOFTMAX:
            x = x.to(tl.float32)
            top = tl.max(x, 0)
            safe = tl.where(top == float("-inf"), 0.0, top)  # an all -inf chunk adds exp(-inf) = 0, not NaN
            tl.store(stat_ptr + (row * NCHUNK + chunk) * 2, top)
            tl.store(stat_ptr + (row * NCHUNK + chunk) * 2 + 1, tl.sum(tl.exp(x - safe), 0))
        out = (row * NCHUNK + chunk) * K  # this chunk's k candidates [R, NCHUNK, K]
        for j in tl.static_range(K):
            best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            tl.store(cval_ptr + out + j, best.to(cval_ptr.dtype.element_ty))
            tl.store(cidx_ptr + out + j, (chunk * CHUNK + at).to(tl.int64))
            x = tl.where(local == at, float("-inf"), x)

    @triton.jit
    def merge_topk_kernel(cval_ptr, cidx_ptr, stat_ptr, val_ptr, idx_ptr, K: tl.constexpr, NCHUNK: tl.constexpr,
                          BLOCK: tl.constexpr, LOG_SOFTMAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        n = tl.arange(0, BLOCK)
        valid = n < NCHUNK * K
        v = tl.load(cval_ptr + row * NCHUNK * K + n, mask=valid, other=float("-inf"))
        i = tl.load(cidx_ptr + row * NCHUNK * K + n, mask=valid, other=2**62)  # padding: after every real index
        if LOG_SOFTMAX:
            c = tl.arange(0, NCHUNK)
            m = tl.load(stat_ptr + (row * NCHUNK + c) * 2)
            e = tl.load(stat_ptr + (row * NCHUNK + c) * 2 + 1)
            top = tl.max(m, 0)
            lse = top + tl.log(tl.sum(e * tl.exp(m - top), 0))
        else:
            lse = 0.0
        for j in tl.static_range(K):  # the largest value; among equal values the smallest vocabulary index
            best = tl.max(v, 0)
            at = tl.min(tl.where(v == best, i, 2**62), 0)
            tl.store(val_ptr + row * K + j, (best - lse).to(val_ptr.dtype.element_ty))
            tl.store(idx_ptr + row * K + j, at)
            v = tl.where(i == at, float("-inf"), v)
            i = tl.where(i == at, 2**62, i)

    return topk_kernel, chunk_topk_kernel, merge_topk_kernel


def log_softmax_topk(logits: torch.Tensor, k: int) -> TopK:
    """logits [..., V] -> the k largest of log_softmax(logits) in float32 and their indices, [..., k] each."""
    if _fits(logits, k):
        return _reshaped(_topk_op(logits.reshape(-1, logits.shape[-1]).contiguous(), k, True), logits.shape, k)
    values, indices = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
    return TopK(values, indices)


def top_k(x: torch.Tensor, k: int) -> TopK:
    """x [..., C] -> its k largest values (its dtype) and their indices, best first (`torch.topk`, one kernel)."""
    if _fits(x, k):
        return _reshaped(_topk_op(x.reshape(-1, x.shape[-1]).contiguous(), k, False), x.shape, k)
    values, indices = x.topk(k, dim=-1)
    return TopK(values, indices)


def _fits(x: torch.Tensor, k: int) -> bool:
    """CUDA, or any device under Triton's interpreter (the CPU tests); rows and k within the kernel's bounds. (The
    kernel is defined at import where it may run: traced inside a compiled round, `available()` would break it.)"""
    where = (x.is_cuda and _ON) or _INTERPRETED
    V = x.shape[-1]
    return (where and _KERNEL is not None and k <= MAX_K and x.dtype.is_floating_point
            and (V <= MAX_VOCAB or (_chunks(V) is not None and V <= MAX_SPLIT_VOCAB)))


def _chunks(V: int) -> tuple[int, int] | None:
    """(chunk length, chunks) for a row of V entries on the split path; None: one program takes the whole row."""
    if not _SPLIT or V <= SPLIT_MIN:
        return None
    chunk = 1024
    while -(-V // chunk) > MAX_CHUNKS:
        chunk *= 2
    return chunk, 1 << (-(-V // chunk) - 1).bit_length()  # chunks: a power of two (the merge reads them as a block)


def _reshaped(out: tuple[torch.Tensor, torch.Tensor], shape: torch.Size, k: int) -> TopK:
    return TopK(out[0].view(*shape[:-1], k), out[1].view(*shape[:-1], k))


# an opaque custom op: inductor calls it as it is (it cannot analyse a user kernel's reads and writes otherwise)
@torch.library.custom_op("adarun::topk", mutates_args=())
def _topk_op(x: torch.Tensor, k: int, log_softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    R, V = x.shape
    values = torch.empty(R, k, dtype=torch.float32 if log_softmax else x.dtype, device=x.device)
    indices = torch.empty(R, k, dtype=torch.int64, device=x.device)
    if not R:
        return values, indices
    import triton

    split = _chunks(V)
    if split is None:
        block = max(triton.next_power_of_2(V), 128)
        _KERNEL[(R,)](x, values, indices, V, x.stride(0), K=k, BLOCK=block, LOG_SOFTMAX=log_softmax,
                      num_warps=16 if block >= 16384 else (8 if block >= 2048 else 4))
        return values, indices
    chunk, n = split  # chunks past the row's end hold only -inf: their candidates lose every comparison
    cval = torch.empty(R, n, k, dtype=values.dtype, device=x.device)  # [R, chunks, k] each chunk's best
    cidx = torch.empty(R, n, k, dtype=torch.int64, device=x.device)
    stat = torch.empty(R, n, 2, dtype=torch.float32, device=x.device)  # [R, chunks, (max, sum of exp)]
    _CHUNK_KERNEL[(R, n)](x, cval, cidx, stat, V, x.stride(0), K=k, CHUNK=chunk, NCHUNK=n,
                          LOG_SOFTMAX=log_softmax, num_warps=4 if chunk <= 2048 else 8)
    _MERGE_KERNEL[(R,)](cval, cidx, stat, values, indices, K=k, NCHUNK=n,
                        BLOCK=max(triton.next_power_of_2(n * k), 32), LOG_SOFTMAX=log_softmax, num_warps=4)
    return values, indices


@_topk_op.register_fake
def _(x, k, log_softmax):
    R = x.shape[0]
    return x.new_empty(R, k, dtype=torch.float32 if log_softmax else x.dtype), x.new_empty(R, k, dtype=torch.int64)


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_ON = os.environ.get("ADARUN_TOPK_KERNEL", "1") != "0"  # 0: the plain ops on CUDA too, for comparison
_SPLIT = os.environ.get("ADARUN_TOPK_SPLIT", "1") != "0"  # 0: one program per row however long, for comparison
if (torch.cuda.is_available() and _ON) or _INTERPRETED:
    available()
