"""Advantages: GRPO group normalisation, its broadcast onto agent tokens, and GAE.

grpo_advantages(rewards[B], group_index[B], eps, scale): rollouts of the same task share a group id
(any int64). With mean_g the group's mean reward and n_g its size,
    "group"  (r - mean_g) / (std_g + eps)     std_g: unbiased std of the group's rewards (GRPO)
    "batch"  (r - mean_g) / (std_B + eps)     std_B: unbiased std over all B of the centred values
                                              r - mean_g (singleton groups count, as zeros); this is
                                              our choice for "batch" (TRL's uses the std of the raw
                                              rewards): one scale for the batch, whitening exactly
                                              what is fed to the loss
    "none"   r - mean_g                       (Dr. GRPO: no std, no difficulty bias)
A group of size 1 gets advantage 0 (it is its own mean), and so does a group with equal rewards.

gae(rewards[B,T], values[B,T], mask[B,T], gamma, lam): verl's masked reverse recursion,
    delta_t = r_t + gamma * V_next(t) - V_t,   A_t = delta_t + gamma * lam * A_next(t)
where "next" is the next step with mask 1 (steps with mask 0 are skipped, carrying nothing), and the
step after the last valid one is terminal (V = 0, A = 0). returns = A + V; both are 0 where mask is 0.
The reference is the Python loop over time (vectorised over B), as in verl. The kernel runs one
program per sequence and turns each recursion x_t = b_t + c_t x_{t+1} into an associative scan of
affine maps over a chunk of time steps held in registers, carrying x between chunks.
"""
from __future__ import annotations

import torch

from ._triton import jit, next_pow2, tl, triton

__all__ = ["grpo_advantages_ref", "grpo_advantages_triton", "token_advantages_ref", "token_advantages_triton",
           "gae_ref", "gae_triton", "SCALES"]

SCALES = ("group", "batch", "none")


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: use one of {SCALES}")


def _batch_scale(centred: torch.Tensor, eps: float) -> torch.Tensor:
    std = centred.std() if centred.numel() > 1 else centred.new_zeros(())
    return centred / (std + eps)


# ----------------------------------------------------------------------------- PyTorch references
def grpo_advantages_ref(rewards, group_index, eps: float = 1e-6, scale: str = "group"):
    _check_scale(scale)
    r = rewards.float().reshape(-1)
    _, inv, n = torch.unique(group_index.reshape(-1), return_inverse=True, return_counts=True)
    mean = torch.zeros(len(n), device=r.device).index_add_(0, inv, r) / n
    d = r - mean[inv]                                  # exactly 0 for a singleton group
    if scale == "none":
        return d
    if scale == "batch":
        return _batch_scale(d, eps)
    var = torch.zeros(len(n), device=r.device).index_add_(0, inv, d * d) / (n - 1).clamp(min=1)
    return d / (var.sqrt()[inv] + eps)


def token_advantages_ref(adv, mask):
    """adv[B] -> [B, L]: each sequence's advantage on its agent tokens (mask != 0), 0 elsewhere."""
    return torch.where(mask != 0, adv.float()[:, None], 0.0)


def gae_ref(rewards, values, mask, gamma: float, lam: float):
    r, v, m = rewards.float(), values.float(), mask.float()
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_value = torch.zeros(B, device=r.device)
    last = torch.zeros(B, device=r.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * last
        next_value = m[:, t] * v[:, t] + (1 - m[:, t]) * next_value   # masked steps are skipped
        last = m[:, t] * a + (1 - m[:, t]) * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + v) * m


# ----------------------------------------------------------------------------- Triton kernels
@jit
def _grpo_kernel(r_ptr, order_ptr, start_ptr, count_ptr, out_ptr, eps, DIVIDE: tl.constexpr, BLOCK: tl.constexpr):
    """One program per group; the group's members are order[start : start + n]."""
    g = tl.program_id(0)
    start = tl.load(start_ptr + g)
    n = tl.load(count_ptr + g)
    j = tl.arange(0, BLOCK)
    msk = j < n
    idx = tl.load(order_ptr + start + j, mask=msk, other=0)
    r = tl.load(r_ptr + idx, mask=msk, other=0.0).to(tl.float32)
    nf = n.to(tl.float32)
    d = tl.where(msk, r - tl.sum(r, 0) / nf, 0.0)
    if DIVIDE:
        std = tl.sqrt(tl.sum(d * d, 0) / tl.maximum(nf - 1.0, 1.0))
        d = d / (std + eps)
    tl.store(out_ptr + idx, d, mask=msk)


def grpo_advantages_triton(rewards, group_index, eps: float = 1e-6, scale: str = "group"):
    _check_scale(scale)
    r = rewards.float().reshape(-1).contiguous()
    out = torch.empty_like(r)
    if r.numel() == 0:
        return out
    _, inv, n = torch.unique(group_index.reshape(-1), return_inverse=True, return_counts=True)
    order = torch.argsort(inv, stable=True)            # members of each group made contiguous
    start = torch.cumsum(n, 0) - n
    BLOCK = max(16, next_pow2(int(n.max())))
    _grpo_kernel[(len(n),)](r, order, start, n, out, float(eps), DIVIDE=scale == "group", BLOCK=BLOCK)
    return _batch_scale(out, eps) if scale == "batch" else out


@jit
def _token_adv_kernel(adv_ptr, mask_ptr, out_ptr, L, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(adv_ptr + row).to(tl.float32)
    m = tl.load(mask_ptr + row * L + c, mask=c < L, other=0)
    tl.store(out_ptr + row * L + c, tl.where(m != 0, a, 0.0), mask=c < L)


def token_advantages_triton(adv, mask):
    B, L = mask.shape
    m = mask.contiguous()
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    out = torch.empty((B, L), dtype=torch.float32, device=mask.device)
    if B and L:
        BLOCK = max(16, min(next_pow2(L), 1024))
        _token_adv_kernel[(B, triton.cdiv(L, BLOCK))](adv.contiguous(), m, out, L, BLOCK=BLOCK)
    return out


@jit
def _affine(c1, b1, c2, b2):
    """Compose x -> b1 + c1 x (earlier in scan order, i.e. later in time) with x -> b2 + c2 x."""
    return c1 * c2, b2 + c2 * b1


@jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, T, gamma, lam, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * T
    j = tl.arange(0, BLOCK)
    next_carry = 0.0                  # V_next and A_next entering this chunk from the one after it
    adv_carry = 0.0
    for s0 in range(0, T, BLOCK):
        t = T - 1 - s0 - j            # scan order = time reversed
        inb = t >= 0
        r = tl.load(r_ptr + base + t, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + t, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + base + t, mask=inb, other=0.0).to(tl.float32)
        # V_next(t) = m_{t+1} V_{t+1} + (1 - m_{t+1}) V_next(t+1): a scan over the step after t
        nxt = inb & (t + 1 < T)
        v1 = tl.load(v_ptr + base + t + 1, mask=nxt, other=0.0).to(tl.float32)
        m1 = tl.load(m_ptr + base + t + 1, mask=nxt, other=0.0).to(tl.float32)
        c, b = tl.associative_scan((1.0 - m1, m1 * v1), 0, _affine)
        v_next = b + c * next_carry
        delta = r + gamma * v_next - v
        # A(t) = m_t (delta_t + gamma lam A(t+1)) + (1 - m_t) A(t+1)
        c, b = tl.associative_scan((m * (gamma * lam) + (1.0 - m), m * delta), 0, _affine)
        a = b + c * adv_carry
        tl.store(adv_ptr + base + t, m * a, mask=inb)
        tl.store(ret_ptr + base + t, m * (a + v), mask=inb)
        next_carry = tl.sum(tl.where(j == BLOCK - 1, v_next, 0.0), 0)
        adv_carry = tl.sum(tl.where(j == BLOCK - 1, a, 0.0), 0)


def gae_triton(rewards, values, mask, gamma: float, lam: float):
    r, v = rewards.float().contiguous(), values.float().contiguous()
    m = mask.float().contiguous()
    B, T = r.shape
    adv, ret = torch.empty_like(r), torch.empty_like(r)
    if B and T:
        BLOCK = max(16, min(next_pow2(T), 1024))
        _gae_kernel[(B,)](r, v, m, adv, ret, T, float(gamma), float(lam), BLOCK=BLOCK)
    return adv, ret
