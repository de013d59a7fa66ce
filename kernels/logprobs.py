"""Log-probs and entropies of chosen tokens, from logits or fused with the LM head.

For a row of logits x, temperature T, z = x / T, p = softmax(z), lse = logsumexp(z):
    logp   = z[target] - lse
    H      = -sum p log p = lse - sum p z                     (entropy of the tempered distribution)
    dlogp/dz_j = [j = target] - p_j
    dH/dz_j    = -p_j (log p_j + H)
and d/dx = d/dz / T. Both gradients need only lse and H per row, so the backward pass recomputes
p from the logits instead of keeping an N x V softmax alive between forward and backward.

token_logprobs: the Triton kernel reads each row once in vocabulary chunks with an online
log-sum-exp (running max m, s = sum e^(z-m), u = sum e^(z-m)(z-m), rescaled when m grows), so no
N x V fp32 log-softmax is ever materialised; the backward kernel writes dlogits in one more pass.

linear_logprobs: hidden @ weight.T chunk by chunk over tokens (Liger's fused-linear-cross-entropy
idea), so only a chunk x V block of logits exists at a time; the backward recomputes each chunk's
logits and turns them in place into dlogits before the two matmuls of the head's gradient.
"""
from __future__ import annotations

import torch

from ._triton import jit, next_pow2, tl, triton

__all__ = ["token_logprobs_ref", "linear_logprobs_ref", "token_logprobs_triton", "linear_logprobs_chunked",
           "chunk_fwd_torch", "chunk_bwd_torch"]

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- PyTorch references
def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Plain autograd reference: (logprobs[N], entropy[N]) in fp32. Materialises N x V fp32."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    dead = lse == NEG_INF                                      # all-masked rows: -inf, entropy 0
    logp = z.gather(-1, targets[..., None]).squeeze(-1) - lse
    p = torch.exp(z - lse.masked_fill(dead, 0)[..., None])
    z_fin = torch.where(torch.isfinite(z), z, 0.0)             # 0 * -inf would be NaN (and its grad)
    ent = lse - (p * z_fin).sum(-1)
    return logp.masked_fill(dead, NEG_INF), ent.masked_fill(dead, 0.0)


def linear_logprobs_ref(hidden, weight, targets, temperature: float = 1.0):
    """The plain LM head + log_softmax + gather that linear_logprobs replaces (N x V logits)."""
    return token_logprobs_ref(hidden @ weight.T, targets, temperature)


def _log_q(logits, temperature, lse=None):
    """log p of every logit (fp32) and the row lse; fully masked rows get lse -inf, log p -inf."""
    z = logits.float() / temperature
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)
    return z.sub_(lse.masked_fill(lse == NEG_INF, 0)[:, None]), lse


def chunk_fwd_torch(logits, targets, temperature: float):
    """No-grad forward of one chunk -> (logp, entropy, lse): the torch twin of _fwd_kernel."""
    with torch.no_grad():
        logq, lse = _log_q(logits, temperature)
        logp = logq.gather(1, targets[:, None]).squeeze(1)
        ent = -(logq.exp() * logq.nan_to_num(neginf=0.0)).sum(-1)     # p log p -> 0 for masked logits
        dead = lse == NEG_INF
    return logp.masked_fill(dead, NEG_INF), ent.masked_fill(dead, 0.0), lse


def chunk_bwd_torch(logits, targets, temperature, lse, ent, g_logp, g_ent):
    """dlogits of one chunk from the saved lse and entropy (the torch twin of _bwd_kernel):
    dz_j = g_logp ([j = target] - p_j) - g_ent p_j (log p_j + H)."""
    with torch.no_grad():
        logq, _ = _log_q(logits, temperature, lse)
        p = logq.exp()
        coef = torch.zeros_like(lse) if g_logp is None else g_logp.clone()
        if g_ent is not None:
            coef = coef[:, None] + g_ent[:, None] * (logq.nan_to_num_(neginf=0.0) + ent[:, None])
        else:
            coef = coef[:, None]
        dz = p.mul_(coef).neg_()
        if g_logp is not None:
            dz.scatter_add_(1, targets[:, None], g_logp[:, None])
        dz.masked_fill_((lse == NEG_INF)[:, None], 0.0)
        return dz.div_(temperature).to(logits.dtype)


# ----------------------------------------------------------------------------- Triton kernels
@jit
def _fwd_kernel(x_ptr, stride, tgt_ptr, logp_ptr, ent_ptr, lse_ptr, V, T, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = x_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    s = 0.0
    u = 0.0
    for v0 in range(0, V, BLOCK):
        c = v0 + cols
        z = tl.load(ptr + c, mask=c < V, other=float("-inf")).to(tl.float32) / T
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # nothing finite yet: keep sums at 0
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        d = tl.where(e > 0, z - m_safe, 0.0)                      # masked logits add 0, not 0 * -inf
        shift = (tl.where(m == float("-inf"), m_safe, m) - m_safe) * s   # s = 0 while m is -inf
        u = alpha * (u + shift) + tl.sum(e * d, 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    live = s > 0                                                  # s = 0 only for all -inf rows
    s = tl.where(live, s, 1.0)
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(s)
    ent = tl.where(live, tl.log(s) - u / s, 0.0)
    zt = tl.load(ptr + tl.load(tgt_ptr + row)).to(tl.float32) / T
    logp = tl.where(live, zt - lse, float("-inf"))
    lse = tl.where(live, lse, float("-inf"))
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, ent)
    tl.store(lse_ptr + row, lse)


@jit
def _bwd_kernel(x_ptr, stride, dx_ptr, dx_stride, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, V, T,
                HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = x_ptr + row * stride
    dptr = dx_ptr + row * dx_stride
    cols = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    live = lse > float("-inf")
    lse_safe = tl.where(live, lse, 0.0)
    ent = tl.load(ent_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    g_lp = 0.0
    g_h = 0.0
    if HAS_GLOGP:
        g_lp = tl.load(glogp_ptr + row)
    if HAS_GENT:
        g_h = tl.load(gent_ptr + row)
    for v0 in range(0, V, BLOCK):
        c = v0 + cols
        z = tl.load(ptr + c, mask=c < V, other=float("-inf")).to(tl.float32) / T
        logq = z - lse_safe
        p = tl.where(live, tl.exp(logq), 0.0)
        dz = -g_lp * p + tl.where(c == tgt, g_lp, 0.0)
        dz -= g_h * p * (tl.where(p > 0, logq, 0.0) + ent)        # p log p -> 0 for masked logits
        dz = tl.where(live, dz, 0.0)
        # dx may alias x (linear_logprobs reuses the recomputed logits): each element is read
        # before it is written, by this program only.
        tl.store(dptr + c, (dz / T).to(dx_ptr.dtype.element_ty), mask=c < V)


def _block(V: int) -> int:
    return max(16, min(next_pow2(V), 4096))


def chunk_fwd_triton(logits, targets, temperature: float):
    N, V = logits.shape
    logp, ent, lse = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    if N:
        BLOCK = _block(V)
        _fwd_kernel[(N,)](logits, logits.stride(0), targets, logp, ent, lse, V, float(temperature),
                          BLOCK=BLOCK, num_warps=8 if BLOCK >= 4096 else 4)
    return logp, ent, lse


def chunk_bwd_triton(logits, targets, temperature, lse, ent, g_logp, g_ent, out=None):
    """dlogits (dtype of logits); out=logits writes them in place."""
    N, V = logits.shape
    out = torch.empty_like(logits) if out is None else out
    if N:
        BLOCK = _block(V)
        _bwd_kernel[(N,)](logits, logits.stride(0), out, out.stride(0), targets, lse, ent,
                          g_logp if g_logp is not None else lse, g_ent if g_ent is not None else lse,
                          V, float(temperature), HAS_GLOGP=g_logp is not None, HAS_GENT=g_ent is not None,
                          BLOCK=BLOCK, num_warps=8 if BLOCK >= 4096 else 4)
    return out


def _rows(logits, targets):
    """[..., V] logits with unit stride over the vocabulary -> 2-D view, int64 targets."""
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, targets.reshape(-1).long().contiguous()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature):
        x, t = _rows(logits, targets)
        logp, ent, lse = chunk_fwd_triton(x, t, temperature)
        ctx.save_for_backward(x, t, lse, ent)
        ctx.temperature, ctx.shape = temperature, logits.shape
        ctx.set_materialize_grads(False)                 # an unused entropy costs no gradient work
        return logp.view(targets.shape), ent.view(targets.shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        x, t, lse, ent = ctx.saved_tensors
        f = lambda g: None if g is None else g.reshape(-1).float().contiguous()
        if g_logp is None and g_ent is None:
            return None, None, None
        dx = chunk_bwd_triton(x, t, ctx.temperature, lse, ent, f(g_logp), f(g_ent))
        return dx.view(ctx.shape), None, None


def token_logprobs_triton(logits, targets, temperature: float = 1.0):
    return _TokenLogprobs.apply(logits, targets, float(temperature))


# ----------------------------------------------------------------------------- fused LM head
def default_chunk(N: int, V: int) -> int:
    """Tokens per chunk: about 2^25 logits (128 MiB fp32) per chunk, at least 16 tokens."""
    return max(16, min(N, (1 << 25) // max(V, 1)))


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, use_triton):
        fwd = chunk_fwd_triton if use_triton else chunk_fwd_torch
        N = hidden.shape[0]
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        ent, lse = torch.empty_like(logp), torch.empty_like(logp)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            logits = hidden[s:e] @ weight.T                     # the only chunk x V block alive
            logp[s:e], ent[s:e], lse[s:e] = fwd(logits, targets[s:e], temperature)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.chunk, ctx.use_triton = temperature, chunk, use_triton
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        bwd = chunk_bwd_triton if ctx.use_triton else chunk_bwd_torch
        f = lambda g: None if g is None else g.float().contiguous()
        g_logp, g_ent = f(g_logp), f(g_ent)
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulated in the weight's dtype with addmm (fp32 accumulate inside each matmul): no V x H
        # temporaries; for bf16 heads each chunk's contribution is rounded once, as in Liger
        grad_w = torch.zeros_like(weight) if need_w else None
        N = hidden.shape[0]
        for s in range(0, N, ctx.chunk):
            e = min(N, s + ctx.chunk)
            h = hidden[s:e]
            logits = h @ weight.T                              # recomputed, then overwritten by dlogits
            sl = slice(s, e)
            args = (logits, targets[sl], ctx.temperature, lse[sl], ent[sl],
                    None if g_logp is None else g_logp[sl], None if g_ent is None else g_ent[sl])
            dlogits = bwd(*args, out=logits) if ctx.use_triton else bwd(*args)
            if need_h:
                grad_h[sl] = dlogits @ weight
            if need_w:
                grad_w.addmm_(dlogits.T, h)
        return grad_h, grad_w, None, None, None, None


def linear_logprobs_chunked(hidden, weight, targets, temperature: float = 1.0, chunk: int | None = None,
                            use_triton: bool = False):
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    lead = hidden.shape[:-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).long()
    N, V = hidden.shape[0], weight.shape[0]
    chunk = default_chunk(N, V) if chunk is None else max(1, int(chunk))
    # Under autocast the head's matmuls would run in bfloat16 (logits rounded to ~3 digits, and a
    # backward that recomputes them in the weight's dtype): the head runs in the weight's dtype instead,
    # so a float32 model's log-probs are float32 whatever the forward around it autocasts to.
    with torch.autocast(hidden.device.type, enabled=False):
        logp, ent = _LinearLogprobs.apply(hidden, weight, targets, float(temperature), chunk, use_triton)
    return logp.view(lead), ent.view(lead)
