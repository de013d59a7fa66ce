"""Token sampling: temperature, top-k, top-p, min-p, greedy rows, one token and its log-prob per row.

Semantics (shared by the reference and the kernel, so they can be compared exactly):
  * temperature T <= 0 makes a row greedy: argmax of the logits (ties -> lowest index, as torch.argmax)
    and its log-prob is log_softmax(logits)[token] at T = 1, unfiltered: the "old log-prob" that the
    policy update compares against.
  * otherwise every filter is a threshold on the raw logit x (dividing by T > 0 keeps the order):
    a token is kept iff x >= max(t_k, t_p, t_m); ties at a threshold are all kept.
      t_k  top-k: the k-th largest logit (k = 0, or k >= number of finite logits: off)
      t_p  top-p, on the distribution already restricted to top-k and renormalised: the largest
           logit t such that the mass of {x >= t} is >= p  (the smallest prefix of the sorted
           distribution whose mass reaches p; p >= 1: off)
      t_m  min-p: prob >= min_p * max prob, i.e. x >= max(x) + T * log(min_p)  (min_p = 0: off)
    The token is drawn from softmax(x / T) restricted to the kept set, and its log-prob is the
    log-prob under that renormalised distribution (what the sampler actually used).
  * -inf logits are masked tokens. A row whose logits are all -inf returns token 0, log-prob -inf.
    +inf and NaN logits are not supported.

The reference sorts every row (the usual sort + cumsum + multinomial). The Triton kernel never sorts:
each threshold is found by a bisection over the row (see `_threshold_search`), and the token is drawn
by the Gumbel-max trick with Philox random numbers keyed by a seed drawn from the caller's generator.
Cost per row, in passes over its logits (all but the first re-read from L2): 1 (max, normaliser;
greedy rows stop here) + the top-k bisection (at most 32; 10-17 on 128k random logits) + 1 (top-p
bracket) + the top-p bisection (at most 32; 5-20, fewer with min-p) + 1 (the draw). Disabled
filters cost no pass. The sort-based reference moves the row through a radix sort, a softmax, a
cumsum, masks and a multinomial, each a full pass over B x V in HBM.
"""
from __future__ import annotations

import torch

from ._triton import KEY_MAX, KEY_MIN, NEG_INF, jit, next_pow2, tl, triton

__all__ = ["sample_ref", "sample_triton", "filtered_logprobs_ref", "row_params"]


# ----------------------------------------------------------------------------- parameters
def _check_scalar(name, v, lo, hi, lo_open=False):
    if isinstance(v, torch.Tensor):
        return                              # per-row tensors are not checked (would need a GPU sync)
    bad = (v <= lo) if lo_open else (v < lo)
    if bad or v > hi:
        raise ValueError(f"{name}={v!r} is out of range")


def row_params(B: int, device, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Scalars or per-row tensors -> four [B] tensors (float32 T, int32 k, float32 p, float32 min_p)."""
    _check_scalar("temperature", temperature, 0.0, float("inf"))
    _check_scalar("top_k", top_k, 0, float("inf"))
    _check_scalar("top_p", top_p, 0.0, 1.0, lo_open=True)
    _check_scalar("min_p", min_p, 0.0, 1.0)

    def row(v, dtype):
        t = torch.as_tensor(v, dtype=dtype, device=device)
        return t.expand(B).contiguous() if t.dim() == 0 else t.reshape(B).to(dtype).contiguous()

    return (row(temperature, torch.float32), row(top_k, torch.int32), row(top_p, torch.float32),
            row(min_p, torch.float32))


# ----------------------------------------------------------------------------- PyTorch reference
def filtered_logprobs_ref(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """[B, V] log-probs of the distribution each row samples from: -inf outside the kept set;
    greedy rows get the unfiltered log_softmax at T = 1; all -inf rows are all -inf."""
    x = logits.float()
    B, V = x.shape
    T, k, p, mp = row_params(B, x.device, temperature, top_k, top_p, min_p)
    greedy = T <= 0
    Ts = torch.where(greedy, torch.ones_like(T), T)[:, None]
    xmax = x.max(dim=-1).values
    n_finite = (x > float("-inf")).sum(-1)
    xs = x.sort(dim=-1, descending=True).values                  # the reference may sort
    neg_inf = torch.full_like(xmax, float("-inf"))

    # top-k: keep x >= the k-th largest logit
    use_k = ~greedy & (k > 0) & (k < n_finite)
    t_k = xs.gather(1, (k.long() - 1).clamp(0, V - 1)[:, None]).squeeze(1)
    thr = torch.where(use_k, t_k, neg_inf)

    # top-p on the top-k distribution: smallest sorted prefix whose mass reaches p
    ps = torch.softmax(torch.where(xs >= thr[:, None], xs / Ts, float("-inf")), dim=-1)
    before = ps.cumsum(-1) - ps                                   # mass strictly before each token
    n_keep = (before < p[:, None]).sum(-1).clamp(min=1)
    t_p = xs.gather(1, (n_keep - 1)[:, None]).squeeze(1)
    use_p = ~greedy & (p < 1)
    thr = torch.where(use_p, torch.maximum(thr, t_p), thr)

    # min-p: prob >= min_p * max prob
    use_m = ~greedy & (mp > 0)
    t_m = xmax + Ts.squeeze(1) * torch.log(mp.clamp(min=1e-30))
    thr = torch.where(use_m, torch.maximum(thr, t_m), thr)

    lp = torch.log_softmax(torch.where(x >= thr[:, None], x / Ts, float("-inf")), dim=-1)
    lp = torch.where(greedy[:, None], torch.log_softmax(x, dim=-1), lp)
    return torch.where((xmax == float("-inf"))[:, None], float("-inf"), lp)


def sample_ref(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    """Sort-based reference: filtered log-probs, then torch.multinomial. -> (tokens int64, logprobs fp32)."""
    B = logits.shape[0]
    T = row_params(B, logits.device, temperature)[0]
    lp = filtered_logprobs_ref(logits, temperature, top_k, top_p, min_p)
    dead = logits.float().max(-1).values == float("-inf")         # all-masked rows: nothing to sample
    probs = torch.where(dead[:, None], 1.0, lp.exp())
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    tok = torch.where(T <= 0, logits.float().argmax(-1), drawn)
    tok = torch.where(dead, 0, tok)
    return tok, lp.gather(1, tok[:, None]).squeeze(1)


def sample_torch(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    """The CPU path: sample_ref, minus the work its common cases do not need. With scalar
    parameters, an all-greedy batch is argmax + log_softmax, and an unfiltered one is log_softmax +
    multinomial (same draws as sample_ref for the same generator); no vocabulary sort. This is most
    of an engine step on CPU at tiny-model sizes."""
    scalar = not any(torch.is_tensor(v) for v in (temperature, top_k, top_p, min_p))
    if not scalar or (temperature > 0 and (top_k or top_p < 1 or min_p)):
        return sample_ref(logits, temperature, top_k, top_p, min_p, generator)
    row_params(logits.shape[0], logits.device, temperature, top_k, top_p, min_p)   # validate
    x = logits.float()
    dead = x.amax(-1) == float("-inf")             # amax: ~10x faster than max(-1) (no indices)
    lp = torch.log_softmax(x if temperature in (0, 1) else x / temperature, dim=-1)
    if temperature > 0:
        tok = torch.multinomial(torch.where(dead[:, None], 1.0, lp.exp()), 1, generator=generator).squeeze(1)
    else:
        tok = x.argmax(-1)
    tok = torch.where(dead, 0, tok)
    out = lp.gather(1, tok[:, None]).squeeze(1)
    return tok, torch.where(dead, float("-inf"), out)


# ----------------------------------------------------------------------------- Triton kernel
# One program handles ROWS rows (ROWS > 1 only for small vocabularies) in [ROWS, BLOCK] tiles and
# walks the vocabulary in BLOCK-wide chunks. Every pass accumulates per lane (one accumulator per
# tile element) and reduces across lanes once at its end: no cross-warp reduction per chunk.
# A row of 128k fp32 logits is 512 KiB, so after the first pass the row is re-read from L2.

@jit
def _ordered_key(x):
    """fp32 -> int32 whose signed order is the float order (-inf lowest). Flipping the 31 low bits
    of negative floats reverses their (sign-magnitude) order, so the bisection can run over
    integers: exact, at most 32 steps, never stuck between two adjacent floats."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@jit
def _key_value(k):
    """Inverse of _ordered_key (int64 key in int32 range -> fp32)."""
    b = k.to(tl.int32)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True)


@jit
def _load_tile(row_ptr, rmask, c, V):
    """One [ROWS, BLOCK] tile of logits at columns c, as fp32, -inf outside the rows/vocabulary;
    and its validity mask. Every pass over a row reads it this way."""
    valid = rmask[:, None] & (c < V)[None, :]
    x = tl.load(row_ptr + c[None, :], mask=valid, other=float("-inf")).to(tl.float32)
    return x, valid


@jit
def _threshold_search(row_ptr, rmask, V, lo, hi, target, m_safe, inv_t,
                      MASS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row, the largest key t in [lo, hi] with F(t) >= target, where F(t) is the count
    (MASS=False) or the softmax mass exp((x - max) / T) (MASS=True) of the logits with key >= t.
    Invariant: lo is a key present in the row with F(lo) >= target; the answer lies in [lo, hi].
    The probe is the midpoint in value (fewer passes on real logit spreads), or in key space
    when that is not strictly inside the bracket (e.g. -1e9 masks). Every pass also snaps the
    bracket onto keys present in the row (smallest key >= probe, largest key < probe), so a row
    ends as soon as no logit lies strictly inside its bracket. Rows with lo == hi on entry (filter
    off) cost nothing; the loop runs while any row of the program is open."""
    cols = tl.arange(0, BLOCK)
    while tl.max(hi - lo, 0) > 0:
        mid = lo + (hi - lo + 1) // 2
        vmid = _ordered_key(0.5 * _key_value(lo) + 0.5 * _key_value(hi)).to(tl.int64)
        mid = tl.where((vmid > lo) & (vmid <= hi), vmid, mid)
        f = tl.zeros([ROWS, BLOCK], tl.float32)
        above = tl.full([ROWS, BLOCK], KEY_MAX, tl.int32)
        below = tl.full([ROWS, BLOCK], KEY_MIN, tl.int32)
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            x, valid = _load_tile(row_ptr, rmask, c, V)
            key = _ordered_key(x)
            ge = valid & (key.to(tl.int64) >= mid[:, None])
            if MASS:
                f += tl.where(ge, tl.exp((x - m_safe[:, None]) * inv_t[:, None]), 0.0)
            else:
                f += ge.to(tl.float32)
            above = tl.minimum(above, tl.where(ge, key, KEY_MAX))
            below = tl.maximum(below, tl.where(valid & ~ge, key, KEY_MIN))
        ok = tl.sum(f, 1) >= target
        lo = tl.where(ok, tl.min(above, 1).to(tl.int64), lo)
        hi = tl.where(ok, hi, tl.max(below, 1).to(tl.int64))
    return lo


@jit
def _sample_kernel(logits_ptr, stride, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr,
                   tok_ptr, logp_ptr, B, V, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    cols = tl.arange(0, BLOCK)
    row_ptr = logits_ptr + rows.to(tl.int64)[:, None] * stride

    T = tl.load(temp_ptr + rows, mask=rmask, other=0.0)
    sampled = T > 0                                   # per-row: greedy rows skip every filter
    inv_t = 1.0 / tl.where(sampled, T, 1.0)           # greedy rows: T = 1, as their logprob needs

    # pass 1, per lane: online max + first argmax + softmax normaliser at T, finite count, min key
    m_l = tl.full([ROWS, BLOCK], NEG_INF, tl.float32)
    arg_l = tl.zeros([ROWS, BLOCK], tl.int32)
    s_l = tl.zeros([ROWS, BLOCK], tl.float32)
    nfin_l = tl.zeros([ROWS, BLOCK], tl.float32)
    kmin_l = tl.full([ROWS, BLOCK], KEY_MAX, tl.int32)
    for v0 in range(0, V, BLOCK):
        c = v0 + cols
        x, valid = _load_tile(row_ptr, rmask, c, V)
        arg_l = tl.where(x > m_l, c[None, :], arg_l)   # strictly greater: the earlier index keeps ties
        m_new = tl.maximum(m_l, x)
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)  # nothing finite yet: sums stay 0, no NaN
        s_l = s_l * tl.exp((m_l - m_safe) * inv_t[:, None]) + tl.exp((x - m_safe) * inv_t[:, None])
        m_l = m_new
        fin = valid & (x > NEG_INF)
        nfin_l += fin.to(tl.float32)
        kmin_l = tl.minimum(kmin_l, tl.where(fin, _ordered_key(x), KEY_MAX))
    m = tl.max(m_l, 1)
    dead = m == NEG_INF                               # all-masked row (or a padding row)
    m_safe = tl.where(dead, 0.0, m)
    s = tl.sum(s_l * tl.exp((m_l - m_safe[:, None]) * inv_t[:, None]), 1)
    tok = tl.min(tl.where(m_l == m[:, None], arg_l, V), 1)
    n_fin = tl.sum(nfin_l, 1)
    kmin = tl.min(kmin_l, 1)
    logp = -tl.log(tl.where(dead, 1.0, s))            # greedy: log_softmax at T = 1 of the argmax

    if tl.max((sampled & ~dead).to(tl.int32), 0) > 0:
        kmax = _ordered_key(m).to(tl.int64)
        # top-k: the k-th largest logit, searched between the smallest finite logit and the max
        k = tl.load(topk_ptr + rows, mask=rmask, other=0)
        use_k = sampled & ~dead & (k > 0) & (k.to(tl.float32) < n_fin)
        t_k = _threshold_search(row_ptr, rmask, V, tl.where(use_k, kmin.to(tl.int64), kmax), kmax,
                                tl.where(use_k, k.to(tl.float32), 0.0), m_safe, inv_t, False, ROWS, BLOCK)
        t_k = tl.where(use_k, t_k, KEY_MIN)

        # min-p is a closed-form threshold
        mp = tl.load(minp_ptr + rows, mask=rmask, other=0.0)
        use_m = sampled & ~dead & (mp > 0)
        t_m = tl.where(use_m, _ordered_key(m + T * tl.log(tl.where(use_m, mp, 1.0))), KEY_MIN).to(tl.int64)

        # top-p: a cheap lower bracket first. Tokens whose probability (within top-k) is below
        # eps = (1 - p) / (2 n) hold less than (1 - p) / 2 of the mass together, so the top-p set
        # never needs them: its threshold is >= max + T log eps. With min-p and top-k also as lower
        # bounds, one pass gives the mass Z_k of the top-k set and the mass above the bracket.
        p = tl.load(topp_ptr + rows, mask=rmask, other=1.0)
        use_p = sampled & ~dead & (p < 1)
        eps = (1.0 - tl.where(use_p, p, 0.5)) / (2.0 * tl.maximum(n_fin, 1.0))
        t_e = tl.where(use_p, _ordered_key(m + T * tl.log(eps)), KEY_MIN).to(tl.int64)
        lb = tl.maximum(tl.maximum(t_k, t_m), t_e)
        zk_l = tl.zeros([ROWS, BLOCK], tl.float32)
        flb_l = tl.zeros([ROWS, BLOCK], tl.float32)
        alb_l = tl.full([ROWS, BLOCK], KEY_MAX, tl.int32)
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            x, valid = _load_tile(row_ptr, rmask, c, V)
            key = _ordered_key(x)
            w = tl.exp((x - m_safe[:, None]) * inv_t[:, None])
            zk_l += tl.where(valid & (key.to(tl.int64) >= t_k[:, None]), w, 0.0)
            ge = valid & (key.to(tl.int64) >= lb[:, None])
            flb_l += tl.where(ge, w, 0.0)
            alb_l = tl.minimum(alb_l, tl.where(ge, key, KEY_MAX))
        target = p * tl.sum(zk_l, 1)
        # mass above the bracket < target: the top-p threshold lies below min-p's, which decides alone
        search = use_p & (tl.sum(flb_l, 1) >= target)
        t_p = _threshold_search(row_ptr, rmask, V, tl.where(search, tl.min(alb_l, 1).to(tl.int64), kmax), kmax,
                                tl.where(search, target, 0.0), m_safe, inv_t, True, ROWS, BLOCK)
        thr = tl.where(search, t_p, lb)

        # Gumbel-max over the kept set: argmax(z + G) ~ softmax(z) restricted to the set, in one
        # pass, with no normalised probabilities and no cumulative sum; the same pass sums the
        # set's mass for the logprob. Philox streams are keyed by the call's seed and counted by
        # (row, token), so a token's noise never depends on the tiling.
        seed = tl.load(seed_ptr)
        best_l = tl.full([ROWS, BLOCK], NEG_INF, tl.float32)
        tok_l = tl.zeros([ROWS, BLOCK], tl.int32)
        z_l = tl.full([ROWS, BLOCK], NEG_INF, tl.float32)
        zs_l = tl.zeros([ROWS, BLOCK], tl.float32)
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            x, valid = _load_tile(row_ptr, rmask, c, V)
            kept = valid & (_ordered_key(x).to(tl.int64) >= thr[:, None])
            z = (x - m_safe[:, None]) * inv_t[:, None]
            zs_l += tl.where(kept, tl.exp(z), 0.0)
            u = tl.rand(seed, rows.to(tl.int64)[:, None] * V + c[None, :])
            score = tl.where(kept, z - tl.log(-tl.log(u)), NEG_INF)     # u = 0 gives -inf, never NaN
            upd = score > best_l
            best_l = tl.where(upd, score, best_l)
            tok_l = tl.where(upd, c[None, :], tok_l)
            z_l = tl.where(upd, z, z_l)
        best = tl.max(best_l, 1)
        s_tok = tl.min(tl.where(best_l == best[:, None], tok_l, V), 1)
        s_z = tl.max(tl.where(tok_l == s_tok[:, None], z_l, NEG_INF), 1)
        z_s = tl.sum(zs_l, 1)
        tok = tl.where(sampled, s_tok, tok)
        logp = tl.where(sampled, s_z - tl.log(tl.where(dead, 1.0, z_s)), logp)

    tok = tl.where(dead, 0, tok)
    logp = tl.where(dead, NEG_INF, logp)
    tl.store(tok_ptr + rows, tok.to(tl.int64), mask=rmask)
    tl.store(logp_ptr + rows, logp, mask=rmask)


def _seed(generator, device) -> torch.Tensor:
    """One 62-bit Philox key per call, drawn from the caller's generator on its own device (no host
    sync when both are on the GPU): the same generator state gives the same tokens."""
    gdev = generator.device if generator is not None else device
    s = torch.randint(0, 2 ** 62, (1,), generator=generator, device=gdev, dtype=torch.int64)
    return s.to(device)


def sample_triton(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    T, k, p, mp = row_params(B, logits.device, temperature, top_k, top_p, min_p)
    tok = torch.empty(B, dtype=torch.int64, device=logits.device)
    logp = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return tok, logp
    # 2048-wide chunks keep the per-lane accumulators (and Philox state) of a pass in registers
    BLOCK = max(16, min(next_pow2(V), 2048))
    ROWS = max(1, min(next_pow2(B), 1024 // BLOCK))          # small vocabularies: several rows a program
    _sample_kernel[(triton.cdiv(B, ROWS),)](
        logits, logits.stride(0), T, k, p, mp, _seed(generator, logits.device), tok, logp, B, V,
        ROWS=ROWS, BLOCK=BLOCK, num_warps=8 if ROWS * BLOCK >= 2048 else 4)
    return tok, logp
