"""Greedy pick with its logprob in two small launches (Triton, CUDA only).

A greedy step needs, per row, the top token and its logprob (max - logsumexp). torch does that
with a full log_softmax, an argmax and a gather over the vocabulary; at batch 1 each of those
reductions runs its one row on a few SMs: ~58 us of an H200's ~4.8 ms batch-1 step for
Llama-3-8B's 128,256 tokens. Here each row's vocabulary is cut into chunks, one program each
keeps its chunk's max, first argmax and sum of exp(x - max), and a second kernel merges the
chunks of a row in order.

Imported only on CUDA (engine/sampling.py).
"""

import torch
import triton
import triton.language as tl

CHUNK = 4096  # vocabulary entries per program


@triton.jit
def _chunk_max_kernel(
    chunk_max_ptr,  # [b, num_chunks] fp32
    chunk_argmax_ptr,  # [b, num_chunks] int64
    chunk_sum_ptr,  # [b, num_chunks] fp32: sum of exp(x - chunk max)
    scores_ptr,  # [b, vocab], rows row_stride apart
    vocab,
    row_stride,
    num_chunks,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(scores_ptr + row * row_stride + cols, mask=cols < vocab,
                other=float("-inf")).to(tl.float32)  # fmt: skip
    top = tl.max(x, axis=0)
    first = tl.min(tl.where(x == top, cols, vocab), axis=0)  # the first index of the max
    # A chunk masked whole (-inf) adds nothing; exp(-inf - -inf) would be NaN.
    total = tl.where(top == float("-inf"), 0.0, tl.sum(tl.exp(x - top), axis=0))
    out = row * num_chunks + chunk
    tl.store(chunk_max_ptr + out, top)
    tl.store(chunk_argmax_ptr + out, first.to(tl.int64))
    tl.store(chunk_sum_ptr + out, total)


@triton.jit
def _merge_chunks_kernel(
    token_ids_ptr,  # [b] int64
    logprobs_ptr,  # [b] fp32
    chunk_max_ptr,  # [b, num_chunks]
    chunk_argmax_ptr,
    chunk_sum_ptr,
    num_chunks,
    CHUNKS_POW2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, CHUNKS_POW2)
    ok = chunks < num_chunks
    top = tl.load(chunk_max_ptr + row * num_chunks + chunks, mask=ok, other=float("-inf"))
    best = tl.max(top, axis=0)
    winner = tl.min(tl.where(top == best, chunks, CHUNKS_POW2), axis=0)  # earliest chunk
    token_id = tl.load(chunk_argmax_ptr + row * num_chunks + winner)
    sums = tl.load(chunk_sum_ptr + row * num_chunks + chunks, mask=ok, other=0.0)
    weights = tl.where(top == float("-inf"), 0.0, tl.exp(top - best))
    tl.store(token_ids_ptr + row, token_id)
    tl.store(logprobs_ptr + row, -tl.log(tl.sum(sums * weights, axis=0)))


def argmax_logprob(
    scores: torch.Tensor,  # [b, vocab], last dimension contiguous; at least one finite per row
) -> tuple[torch.Tensor, torch.Tensor]:  # [b] int64 first argmax, [b] fp32 its log_softmax
    batch, vocab = scores.shape
    num_chunks = triton.cdiv(vocab, CHUNK)
    chunk_max = scores.new_empty((batch, num_chunks), dtype=torch.float32)
    chunk_argmax = scores.new_empty((batch, num_chunks), dtype=torch.int64)
    chunk_sum = torch.empty_like(chunk_max)
    _chunk_max_kernel[(batch, num_chunks)](
        chunk_max, chunk_argmax, chunk_sum, scores, vocab, scores.stride(0), num_chunks,
        CHUNK=CHUNK,
    )  # fmt: skip
    token_ids = scores.new_empty(batch, dtype=torch.int64)
    logprobs = scores.new_empty(batch, dtype=torch.float32)
    _merge_chunks_kernel[(batch,)](
        token_ids, logprobs, chunk_max, chunk_argmax, chunk_sum, num_chunks,
        CHUNKS_POW2=triton.next_power_of_2(num_chunks),
    )  # fmt: skip
    return token_ids, logprobs
