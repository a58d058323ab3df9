"""Per-row Kullback-Leibler divergence between the softmax distributions of two weight tensors.

SCF-RKL ([Lin2026] sec. 2.2 and Algorithm 1) reads each row of a weight matrix (the last dimension;
a 1-D tensor is one row) as a categorical distribution ``softmax(row) + ε`` and scores rows by the KL
divergence between the base's and the secondary model's distribution.

Fine-tuned rows are nearly identical, and the textbook sum ``Σ p log(p/q)`` then cancels: its terms are
first order in the change ``r = p/q − 1`` but the divergence is second order (about ``Σ q r²/2``). With
weights around 0.02 and changes of 1 %, the float32 ratio form is wrong by a factor of ten, and float64
keeps only seven or eight digits. Because ``Σ p = Σ q`` exactly, ``KL(p ‖ q) = Σ q φ(r)`` with
``φ(r) = (1 + r) log1p(r) − r ≥ 0``: a sum of non-negative terms without that cancellation. In float64,
with ``r`` from the difference of the two softmaxes (``ε`` cancels there), its relative error is of order
``10^-16 / |r|``; measured against 40-digit arithmetic (tests/test_scf.py) it stays below 1e-10 for logit
changes down to 10^-7, where the textbook float64 form is off by 1e-2.
"""

from __future__ import annotations

import torch


def softmax_kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, epsilon: float,
                    block_elements: int | None = None) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_i p_i log(p_i / q_i)`` per row, with ``p = softmax(p_logits) + ε`` and
    ``q = softmax(q_logits) + ε`` over the last dimension (Algorithm 1's smoothed distributions).

    Returns float64 of shape ``p_logits.shape[:-1]`` (``()`` for 1-D or 0-D inputs) on the inputs' device,
    computed in row blocks of about ``block_elements`` (default: 32K per torch thread), so that each thread's
    float64 work copies stay in its cache (one thread, 256K-element tiles of 1536-wide rows: 5.1 ns per element
    in 32K-element blocks, 27 ns in one block of 256K, 62 ns in 4M-element blocks; BENCHMARKS.md, issue 19).
    Reverse KL of SCF-RKL is ``softmax_kl_rows(base, secondary)``; forward KL (SCF-KL) swaps the arguments.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"KL needs tensors of one shape, got {tuple(p_logits.shape)} and {tuple(q_logits.shape)}")
    width = p_logits.shape[-1] if p_logits.dim() else 1
    p_rows, q_rows = p_logits.reshape(-1, width), q_logits.reshape(-1, width)
    if block_elements is None:
        block_elements = (1 << 15) * torch.get_num_threads()
    rows_per_block = max(1, block_elements // width)
    kl = torch.empty(p_rows.shape[0], dtype=torch.float64, device=p_logits.device)
    for start in range(0, p_rows.shape[0], rows_per_block):
        block = slice(start, start + rows_per_block)
        p_soft = torch.softmax(p_rows[block].double(), dim=-1)
        q_soft = torch.softmax(q_rows[block].double(), dim=-1)
        change = p_soft.sub_(q_soft)  # p − q: ε cancels
        q = q_soft.add_(epsilon)
        change.div_(q)  # r = p/q − 1
        excess = torch.log1p(change)
        excess.addcmul_(excess, change).sub_(change)  # φ(r) = (1 + r) log1p(r) − r
        kl[block] = torch.linalg.vecdot(q, excess)
    return kl.reshape(p_logits.shape[:-1])
