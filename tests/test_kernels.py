"""kernels/: every Triton kernel against its PyTorch reference (on CPU under TRITON_INTERPRET=1, set
by conftest), the references against hand-computed or independent values, and the dispatcher.
Sizes are small and odd on purpose: the interpreter is slow, and odd sizes exercise masked tails."""
import inspect
import math
import re

import pytest
import torch

import kernels
from kernels import _triton
from kernels import advantages as A
from kernels import logprobs as L
from kernels import sampling as S

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NEG_INF = float("-inf")
CAN_TRITON = kernels.triton_available() and (DEV == "cuda" or _triton.interpreting())
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not CAN_TRITON, reason="no Triton"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(None)


@pytest.fixture
def triton_only():
    if not CAN_TRITON:
        pytest.skip("no Triton")
    kernels.set_backend("triton")
    yield
    kernels.set_backend(None)


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def tricky_logits(B, V, dtype, seed=0):
    """Random logits with a masked tail, a -inf sprinkle, a tied maximum and one all -inf row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 2
    x[1, V - V // 5:] = NEG_INF                         # masked tail
    x[2, ::7] = NEG_INF
    x[3, [5, V // 2, V - 2]] = x[3].max() + 1.0         # a three-way tie at the max
    x[B - 1] = NEG_INF                                  # fully masked row
    return x.to(dtype).to(DEV)


# ============================================================================ sampling
@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.0, top_k=3, top_p=0.5),
                                    dict(temperature=0.7), dict(temperature=1.0), dict(temperature=1.0, top_p=0.9)])
def test_cpu_fast_path_draws_exactly_what_the_reference_draws(params):
    from kernels.sampling import sample_ref, sample_torch
    x = tricky_logits(6, 1000, torch.float32).cpu()
    tok, lp = sample_torch(x, **params, generator=torch.Generator().manual_seed(3))
    tok_r, lp_r = sample_ref(x, **params, generator=torch.Generator().manual_seed(3))
    assert tok.tolist() == tok_r.tolist()
    torch.testing.assert_close(lp, lp_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax_with_unfiltered_t1_logprob(backend, dtype):
    x = tricky_logits(6, 1000, dtype)
    # filters must not touch greedy rows, neither their token nor their logprob
    tok, lp = kernels.sample(x, temperature=0.0, top_k=3, top_p=0.5, min_p=0.2, generator=gen(0))
    xf = x.float()
    assert tok[:-1].tolist() == xf[:-1].argmax(-1).tolist()
    assert tok[3].item() == 5                           # ties -> lowest index
    ref = torch.log_softmax(xf[:-1], -1).gather(1, tok[:-1, None]).squeeze(1)
    torch.testing.assert_close(lp[:-1], ref, rtol=1e-5, atol=1e-5)
    assert tok[-1].item() == 0 and lp[-1].item() == NEG_INF
    assert not lp.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [257, 1000])
def test_sampled_logprob_is_that_of_the_filtered_distribution(backend, dtype, V):
    """Mixed per-row parameters. The returned logprob must equal the reference's filtered,
    renormalised log-prob of the returned token: finite means the token is in the reference's kept
    set, equal means the kept set has the same mass (so the same members, ties included: bf16
    logits are full of ties)."""
    B = 9
    x = tricky_logits(B, V, dtype, seed=V)
    T = torch.tensor([1.0, 0.7, 0.0, 1.0, 1.3, 0.5, 1.0, 2.0, 1.0], device=DEV)
    k = torch.tensor([0, 1, 5, 1, 40, 0, 3, 0, 7], device=DEV, dtype=torch.int32)
    p = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.9, 0.3, 1.0, 0.95, 0.6], device=DEV)
    mp = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.2, 0.1], device=DEV)
    flp = S.filtered_logprobs_ref(x, T, k, p, mp)
    for seed in range(3):
        tok, lp = kernels.sample(x, T, k, p, mp, generator=gen(seed))
        assert tok.dtype == torch.int64 and lp.dtype == torch.float32
        assert ((tok >= 0) & (tok < V)).all() and not lp.isnan().any()
        ref = flp.gather(1, tok[:, None]).squeeze(1)
        assert torch.isfinite(lp[:-1]).all(), "sampled a token outside the kept set"
        torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
        assert tok[2].item() == x[2].float().argmax().item()            # T = 0 row
        assert tok[-1].item() == 0 and lp[-1].item() == NEG_INF       # all -inf row


def test_top_k_1_keeps_only_the_max_and_its_ties(backend):
    x = tricky_logits(5, 257, torch.float32)
    tok, lp = kernels.sample(x, temperature=0.8, top_k=1, generator=gen(1))
    assert tok[0].item() == x[0].argmax().item() and lp[0].item() == pytest.approx(0.0, abs=1e-6)
    assert tok[3].item() in (5, 257 // 2, 255)                        # three tied maxima
    assert lp[3].item() == pytest.approx(-math.log(3), abs=1e-5)


def test_filters_off_sample_the_full_softmax_at_t(backend):
    x = tricky_logits(5, 257, torch.float32)
    tok, lp = kernels.sample(x, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, generator=gen(2))
    ref = torch.log_softmax(x[:-1] / 1.5, -1).gather(1, tok[:-1, None]).squeeze(1)
    torch.testing.assert_close(lp[:-1], ref, rtol=1e-5, atol=1e-5)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; bins expected < 5 are pooled; a draw of a token with
    probability 0 is an immediate failure (p = 0)."""
    n = counts.sum()
    expected, obs = (probs.double() * n).cpu(), counts.double().cpu()
    if (obs[expected == 0] > 0).any():
        return 0.0
    expected, obs = expected[expected > 0], obs[expected > 0]
    small = expected < 5
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
    chi2 = ((obs - expected) ** 2 / expected).sum()
    df = len(expected) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2).item()


CHI2_CASES = [  # (temperature, top_k, top_p, min_p), the "wrong" distribution the draws must reject, draws
    ((1.0, 0, 1.0, 0.0), (0.9, 0, 1.0, 0.0), 10000),   # temperature off by 10% (needs more draws)
    ((0.7, 0, 0.8, 0.0), (0.7, 0, 1.0, 0.0), 3000),    # top-p ignored
    ((1.3, 5, 1.0, 0.0), (1.3, 6, 1.0, 0.0), 3000),    # top-k off by one
    ((1.0, 8, 0.9, 0.3), (1.0, 8, 0.9, 0.0), 3000),    # min-p ignored (with top-k and top-p on)
]


@pytest.mark.parametrize("case", CHI2_CASES, ids=["temperature", "top_p", "top_k", "all"])
def test_sampling_distribution_chi_square(backend, case):
    (T, k, p, mp), wrong, n = case
    logits = torch.tensor([2.0, 1.7, 1.7, 1.2, 0.9, 0.5, 0.1, -0.3, -0.6, -1.0, -1.4, NEG_INF, -2.5],
                          device=DEV)                 # V = 13: a tie and a masked token
    x = logits.expand(n, -1).contiguous()               # n independent draws in one call
    tok, _ = kernels.sample(x, T, k, p, mp, generator=gen(1234))
    counts = torch.bincount(tok, minlength=len(logits))
    probs = S.filtered_logprobs_ref(logits[None], T, k, p, mp)[0].exp()
    assert chi2_pvalue(counts, probs) > 1e-3
    # the same draws must reject the wrong distribution: the test has power
    bad = S.filtered_logprobs_ref(logits[None], *wrong)[0].exp()
    assert chi2_pvalue(counts, bad) < 1e-3


def test_seeded_reproducibility(backend):
    x = tricky_logits(64, 100, torch.float32)
    a = kernels.sample(x, 1.0, 20, 0.95, 0.0, generator=gen(7))
    b = kernels.sample(x, 1.0, 20, 0.95, 0.0, generator=gen(7))
    c = kernels.sample(x, 1.0, 20, 0.95, 0.0, generator=gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    g = gen(7)                                          # the generator advances: next call differs
    first, second = kernels.sample(x, generator=g)[0], kernels.sample(x, generator=g)[0]
    assert not torch.equal(first, second)


def test_sample_rejects_out_of_range_scalars(backend):
    x = torch.zeros(2, 4)
    for kw in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0), dict(top_k=-1)):
        with pytest.raises(ValueError):
            kernels.sample(x, **kw)


def test_triton_sampler_never_sorts():
    for obj in (S.sample_triton, S._sample_kernel, S._threshold_search):
        src = inspect.getsource(getattr(obj, "fn", obj))
        assert not re.search(r"sort\(|argsort|topk\(|cumsum", src), obj


# ============================================================================ log-probs
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("V,T", [(1000, 1.0), (257, 0.7)])
def test_token_logprobs_forward_and_grad(backend, dtype, tol, V, T):
    x = tricky_logits(7, V, dtype, seed=V)[:-1].clone()          # no all -inf row: grads defined
    g = torch.Generator().manual_seed(1)
    tgt = torch.randint(0, V // 2, (6,), generator=g).to(DEV)
    tgt[2] = 1                                                    # x[2, 0] is -inf: not a target
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    lp, ent = kernels.token_logprobs(xa, tgt, temperature=T)
    lr, er = L.token_logprobs_ref(xb, tgt, T)
    assert lp.dtype == torch.float32 and not (lp.isnan().any() or ent.isnan().any())
    torch.testing.assert_close(lp, lr, rtol=tol, atol=tol)
    torch.testing.assert_close(ent, er, rtol=tol, atol=tol)
    g1, g2 = torch.randn(6, generator=g).to(DEV), torch.randn(6, generator=g).to(DEV)
    (ga,) = torch.autograd.grad((lp * g1 + ent * g2).sum(), xa, retain_graph=True)
    (gb,) = torch.autograd.grad((lr * g1 + er * g2).sum(), xb, retain_graph=True)
    assert ga.dtype == dtype and not ga.isnan().any()
    gtol = 1e-5 if dtype == torch.float32 else 1e-2             # bf16 gradient storage
    torch.testing.assert_close(ga.float(), gb.float(), rtol=gtol, atol=gtol)
    # only one of the two outputs used: the other's gradient is skipped, not wrong
    (ga,) = torch.autograd.grad(lp.sum(), xa)
    (gb,) = torch.autograd.grad(lr.sum(), xb)
    torch.testing.assert_close(ga.float(), gb.float(), rtol=gtol, atol=gtol)


def test_token_logprobs_masked_rows_and_batched_shape(backend):
    x = tricky_logits(6, 300, torch.float32).reshape(2, 3, 300)
    tgt = torch.tensor([[0, 1, 2], [3, 4, 5]], device=DEV)
    lp, ent = kernels.token_logprobs(x, tgt)
    assert lp.shape == (2, 3)
    assert lp[1, 2].item() == NEG_INF and ent[1, 2].item() == 0.0     # all -inf row
    assert not (lp.isnan().any() or ent.isnan().any())
    lr, er = L.token_logprobs_ref(x[0], tgt[0])
    torch.testing.assert_close(lp[0], lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[0], er, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frozen", [None, "weight", "hidden"])
def test_linear_logprobs_matches_autograd_of_the_plain_head(backend, dtype, frozen):
    N, H, V = 37, 16, 257
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(N, H, generator=g).to(dtype).to(DEV)
    w0 = (torch.randn(V, H, generator=g) * 0.5).to(dtype).to(DEV)
    tgt = torch.randint(0, V, (N,), generator=g).to(DEV)
    g1, g2 = torch.randn(N, generator=g).to(DEV), torch.randn(N, generator=g).to(DEV)
    h, hr = h0.clone().requires_grad_(frozen != "hidden"), h0.clone().requires_grad_(frozen != "hidden")
    w, wr = w0.clone().requires_grad_(frozen != "weight"), w0.clone().requires_grad_(frozen != "weight")
    lp, ent = kernels.linear_logprobs(h, w, tgt, temperature=0.9, chunk=16)      # 3 chunks, odd tail
    lr, er = L.linear_logprobs_ref(hr, wr, tgt, 0.9)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(lp, lr, rtol=tol, atol=tol)
    torch.testing.assert_close(ent, er, rtol=tol, atol=tol)
    want = [t for t in (h, w) if t.requires_grad]
    got = torch.autograd.grad((lp * g1 + ent * g2).sum(), want)
    ref = torch.autograd.grad((lr * g1 + er * g2).sum(), [t for t in (hr, wr) if t.requires_grad])
    gtol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, ref):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=gtol, atol=gtol * b.abs().max().item())
    # chunking is invisible: one chunk gives the same numbers
    lp1, _ = kernels.linear_logprobs(h.detach(), w.detach(), tgt, temperature=0.9, chunk=N)
    torch.testing.assert_close(lp1, lp.detach(), rtol=tol, atol=tol)


def test_linear_logprobs_no_grad_and_default_chunk(backend):
    h, w = torch.randn(10, 8, device=DEV), torch.randn(50, 8, device=DEV)
    tgt = torch.arange(10, device=DEV)
    with torch.no_grad():
        lp, ent = kernels.linear_logprobs(h, w, tgt)
    lr, er = L.linear_logprobs_ref(h, w, tgt)
    torch.testing.assert_close(lp, lr, rtol=1e-5, atol=1e-5)
    assert L.default_chunk(8192, 128256) * 128256 <= 2 ** 25 + 128256


# ============================================================================ advantages
def grpo_by_dict(r, g, eps, scale):
    """verl-style loop over a dict of groups: an independent check of the reference."""
    groups = {}
    for i, gi in enumerate(g.tolist()):
        groups.setdefault(gi, []).append(i)
    out = [0.0] * len(r)
    for idx in groups.values():
        vals = [r[i].item() for i in idx]
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        for i, v in zip(idx, vals):
            out[i] = (v - mu) / (sd + eps) if scale == "group" else v - mu
    if scale == "batch":
        c = torch.tensor(out, dtype=torch.float64)
        out = (c / (c.std() + eps)).tolist()
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages(backend, scale):
    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([10 ** 12, -3, 7, 7, 10 ** 12, 42, 7, -3, 10 ** 12, 99, 7, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
    r = torch.rand(len(ids), generator=g)
    r[11:] = 1.0                                         # a group with equal rewards -> 0
    adv = kernels.grpo_advantages(r.to(DEV), ids.to(DEV), eps=1e-6, scale=scale)
    assert adv.shape == r.shape and adv.dtype == torch.float32
    assert adv.cpu().tolist() == pytest.approx(grpo_by_dict(r, ids, 1e-6, scale), abs=1e-5)
    assert adv[5].item() == 0.0 and adv[9].item() == 0.0        # singleton groups
    assert adv[11:].abs().max().item() == 0.0


def test_grpo_rejects_unknown_scale(backend):
    with pytest.raises(ValueError):
        kernels.grpo_advantages(torch.zeros(3, device=DEV), torch.zeros(3, dtype=torch.long, device=DEV), scale="std")


def test_token_advantages(backend):
    adv = torch.tensor([1.5, -2.0, 0.25], device=DEV)
    mask = torch.zeros(3, 37, dtype=torch.bool, device=DEV)
    mask[0, 3:9] = True
    mask[2, 30:] = True
    out = kernels.token_advantages(adv, mask)
    want = torch.zeros(3, 37, device=DEV)
    want[0, 3:9] = 1.5
    want[2, 30:] = 0.25
    assert torch.equal(out, want)
    assert torch.equal(kernels.token_advantages(adv, mask.float()), want)


def test_gae_matches_reference_with_holes_and_long_sequences(backend):
    g = torch.Generator().manual_seed(9)
    for B, T in [(5, 37), (2, 1500)]:                    # 1500 > one 1024-step chunk: carries
        r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
        m = (torch.rand(B, T, generator=g) > 0.2).float()
        m[0, T - 5:] = 0                                 # masked tail
        m[1] = 0                                         # empty sequence
        m[:, max(0, T - 1030):T - 1020] = 0              # holes where a 1024-step chunk ends: the carry
        adv, ret = kernels.gae(r.to(DEV), v.to(DEV), m.to(DEV), gamma=0.97, lam=0.9)
        ar, rr = A.gae_ref(r, v, m, 0.97, 0.9)
        torch.testing.assert_close(adv.cpu(), ar, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ret.cpu(), rr, rtol=1e-4, atol=1e-4)
        assert (adv.cpu()[m == 0] == 0).all() and (ret.cpu()[m == 0] == 0).all()


def test_gae_skips_masked_steps(backend):
    """A step with mask 0 in the middle is invisible: same numbers as the sequence without it."""
    r = torch.tensor([[0.0, 0.5, 9.0, 1.0], [0.0, 0.5, 1.0, 0.0]], device=DEV)
    v = torch.tensor([[0.3, 0.2, 7.0, 0.6], [0.3, 0.2, 0.6, 0.0]], device=DEV)
    m = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]], device=DEV)
    adv, ret = kernels.gae(r, v, m, gamma=0.9, lam=0.8)
    assert adv[0, [0, 1, 3]].tolist() == pytest.approx(adv[1, :3].tolist(), abs=1e-6)
    assert ret[0, [0, 1, 3]].tolist() == pytest.approx(ret[1, :3].tolist(), abs=1e-6)
    # the last valid step is terminal: A = r - V there
    assert adv[1, 2].item() == pytest.approx(1.0 - 0.6, abs=1e-6)


# ============================================================================ dispatcher
def test_backend_selection(monkeypatch):
    calls = []
    monkeypatch.setattr(A, "gae_ref", lambda *a: calls.append("torch") or (None, None))
    monkeypatch.setattr(A, "gae_triton", lambda *a: calls.append("triton") or (None, None))
    x = torch.zeros(1, 2)
    monkeypatch.setenv("DREAMGYM_KERNELS", "torch")
    kernels.gae(x, x, x, 1.0, 1.0)
    if CAN_TRITON:
        monkeypatch.setenv("DREAMGYM_KERNELS", "triton")
        kernels.gae(x.to(DEV), x, x, 1.0, 1.0)
        kernels.set_backend("torch")                     # set_backend beats the variable
        kernels.gae(x, x, x, 1.0, 1.0)
        kernels.set_backend(None)
        assert calls == ["torch", "triton", "torch"]
    monkeypatch.setenv("DREAMGYM_KERNELS", "cuda")
    with pytest.raises(ValueError):
        kernels.gae(x, x, x, 1.0, 1.0)
    with pytest.raises(ValueError):
        kernels.set_backend("fast")
    monkeypatch.delenv("DREAMGYM_KERNELS")
    assert kernels.get_backend() == "auto"


@pytest.mark.skipif(DEV == "cuda", reason="auto only falls back without CUDA")
def test_auto_on_cpu_uses_references_and_says_so_once(monkeypatch, capsys):
    monkeypatch.delenv("DREAMGYM_KERNELS", raising=False)
    kernels.set_backend(None)
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(S, "sample_triton", lambda *a: pytest.fail("auto ran Triton on CPU"))
    for _ in range(3):
        kernels.sample(torch.zeros(2, 5), temperature=0.0)
        kernels.gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), 0.9, 0.9)
    err = capsys.readouterr().err
    assert err.count("PyTorch reference") == 1, "one plain line on stderr, once per process"


@pytest.mark.skipif(DEV == "cuda", reason="CPU-only check")
def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernels.set_backend("triton")
    try:
        with pytest.raises(RuntimeError):
            kernels.sample(torch.zeros(2, 5))
    finally:
        kernels.set_backend(None)


# ============================================================================ compiled, not interpreted
AOT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import advantages as A, logprobs as L, sampling as S
F32, I32, I64 = "*fp32", "i32", "*i64"
SAMPLE = dict(logits_ptr="*bf16", stride=I32, temp_ptr=F32, topk_ptr="*i32", topp_ptr=F32, minp_ptr=F32,
              seed_ptr=I64, tok_ptr=I64, logp_ptr=F32, B=I32, V=I32, ROWS="constexpr", BLOCK="constexpr")
BWD = dict(x_ptr="*bf16", stride=I32, dx_ptr="*bf16", dx_stride=I32, tgt_ptr=I64, lse_ptr=F32, ent_ptr=F32,
           glogp_ptr=F32, gent_ptr=F32, V=I32, T="fp32", HAS_GLOGP="constexpr", HAS_GENT="constexpr",
           BLOCK="constexpr")
cases = [
    (S._sample_kernel, SAMPLE, dict(ROWS=1, BLOCK=2048), 8),
    (S._sample_kernel, dict(SAMPLE, logits_ptr=F32), dict(ROWS=64, BLOCK=16), 4),
    (L._fwd_kernel, dict(x_ptr="*bf16", stride=I32, tgt_ptr=I64, logp_ptr=F32, ent_ptr=F32, lse_ptr=F32, V=I32,
                         T="fp32", BLOCK="constexpr"), dict(BLOCK=4096), 8),
    (L._bwd_kernel, BWD, dict(HAS_GLOGP=True, HAS_GENT=True, BLOCK=4096), 8),
    (L._bwd_kernel, BWD, dict(HAS_GLOGP=False, HAS_GENT=True, BLOCK=1024), 4),
    (A._gae_kernel, dict(r_ptr=F32, v_ptr=F32, m_ptr=F32, adv_ptr=F32, ret_ptr=F32, T=I32, gamma="fp32",
                         lam="fp32", BLOCK="constexpr"), dict(BLOCK=1024), 4),
    (A._grpo_kernel, dict(r_ptr=F32, order_ptr=I64, start_ptr=I64, count_ptr=I64, out_ptr=F32, eps="fp32",
                          DIVIDE="constexpr", BLOCK="constexpr"), dict(DIVIDE=True, BLOCK=16), 4),
    (A._token_adv_kernel, dict(adv_ptr=F32, mask_ptr="*u8", out_ptr=F32, L=I32, BLOCK="constexpr"),
     dict(BLOCK=1024), 4),
]
for fn, sig, const, warps in cases:
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert k.asm.get("cubin"), fn
print("compiled", len(cases))
'''


@pytest.mark.skipif(not kernels.triton_available(), reason="no Triton")
def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter accepts code the compiler rejects (loop-carried types, while loops, scalar
    ifs). Compile every kernel down to an H100 cubin, which needs Triton's ptxas but no GPU."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TMPDIR=str(tmp_path), TRITON_CACHE_DIR=str(tmp_path / "cache"))   # ptxas scratch files
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", AOT], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "compiled 8" in out.stdout, out.stderr[-3000:]
