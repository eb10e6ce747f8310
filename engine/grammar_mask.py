"""The token mask of a batch's grammar-constrained rows, as one boolean tensor (the torch
half of engine/grammar.py, kept apart so that validation imports no torch)."""

import llguidance
import torch

from engine.grammar import GrammarState

BITS_PER_WORD = 32  # llguidance's mask: one bit per token, packed in int32 words

_executor: llguidance.LLExecutor | None = None


def _mask_executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for computing a batch's masks in parallel (made on first use)."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    return _executor


def allowed_tokens(
    states: list[GrammarState], vocab_size: int, device: torch.device
) -> torch.Tensor:  # [g, vocab_size] bool
    """Which tokens each state allows next, computed for all rows at once on the CPU and
    unpacked on `device`."""
    num_words = -(-vocab_size // BITS_PER_WORD)
    bitmask = torch.empty((len(states), num_words), dtype=torch.int32)  # [g, words]
    _mask_executor().unsafe_compute_mask_ptr(
        [(state.matcher, row) for row, state in enumerate(states)],
        bitmask.data_ptr(), num_words * bitmask.element_size(), len(states),
    )  # fmt: skip
    bitmask = bitmask.to(device, non_blocking=True)
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [g, words, 32], token = word * 32 + bit
    return bits.view(len(states), -1)[:, :vocab_size].bool()
