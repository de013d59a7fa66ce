"""Kernels against their PyTorch references: time, ratio, memory-bandwidth floor, peak memory.

    python bench/kernels.py                      # GPU: the issue's sizes; CPU: small, references only
    python bench/kernels.py --bandwidth 4800     # H200 HBM (GB/s) for the floor column
    python bench/kernels.py --lp-n 2048 --lp-v 32000 --lp-h 2048  # scale the fused LM-head case down

floor = bytes a kernel must move at least (read its inputs once, write its outputs once) / peak
bandwidth: how far from memory-bound each kernel is. The last lines are the goals of the issue:
    sampling_speedup        Triton sampler vs the sort-based reference       (goal >= 2)
    logprob_peak_mem_ratio  peak memory above the inputs, fused LM head + log-probs (forward and
                            backward) vs logits -> log_softmax -> gather      (goal <= 0.25)
    gae_speedup             Triton GAE vs the Python loop over time, T=2048   (goal >= 10)
Triton timings need CUDA; on CPU they print as n/a and only the references are timed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import advantages as A  # noqa: E402
from kernels import logprobs as L  # noqa: E402
from kernels import sampling as S  # noqa: E402
from kernels._triton import HAS_TRITON  # noqa: E402

CUDA = torch.cuda.is_available()
RUN_TRITON = CUDA and HAS_TRITON
NA = "n/a (no CUDA)"


def timeit(fn, iters: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


HEADER = f"{'kernel':<24} {'size':<26} {'reference ms':>12} {'triton ms':>12} {'speedup':>10} {'floor ms':>10}"


def row(name, size, t_ref, t_tri, nbytes, bw):
    floor = nbytes / (bw * 1e9)
    tri = "needs CUDA" if t_tri is None else f"{t_tri * 1e3:.3f}"
    ratio = "n/a" if t_tri is None else f"{t_ref / t_tri:.1f}x"
    print(f"{name:<24} {size:<26} {t_ref * 1e3:12.3f} {tri:>12} {ratio:>10} {floor * 1e3:10.4f}")
    return None if t_tri is None else t_ref / t_tri


def bench_sampling(a, dev, dtype):
    B, V = a.sample_b, a.sample_v
    x = torch.randn(B, V, device=dev).mul_(3).to(dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    out = None
    for label, kw in [("T.8 k50 p.9", dict(temperature=0.8, top_k=50, top_p=0.9)),
                      ("T1 p.95 minp.05", dict(temperature=1.0, top_p=0.95, min_p=0.05)),
                      ("greedy", dict(temperature=0.0))]:
        t_ref = timeit(lambda: S.sample_ref(x, generator=g, **kw), a.iters)
        t_tri = timeit(lambda: S.sample_triton(x, generator=g, **kw), a.iters) if RUN_TRITON else None
        r = row(f"sample {label}", f"B={B} V={V} {str(dtype)[6:]}", t_ref, t_tri, x.numel() * x.element_size(), a.bandwidth)
        out = r if out is None else out                      # the headline: top-k + top-p
    return out


def bench_token_logprobs(a, dev, dtype):
    N, V = a.tok_n, a.lp_v
    x = torch.randn(N, V, device=dev).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)

    def step(fn):
        def go():
            lp, ent = fn(x, t, 1.0)
            (lp.sum() + ent.sum()).backward()
            x.grad = None
        return go
    t_ref = timeit(step(L.token_logprobs_ref), a.iters)
    t_tri = timeit(step(L.token_logprobs_triton), a.iters) if RUN_TRITON else None
    # forward reads the logits; backward reads them again and writes dlogits
    row("token_logprobs f+b", f"N={N} V={V} {str(dtype)[6:]}", t_ref, t_tri, 3 * x.numel() * x.element_size(), a.bandwidth)


def peak_extra(fn) -> float:
    """Peak CUDA memory above what was allocated before fn ran (bytes)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_linear(a, dev, dtype):
    N, H, V = a.lp_n, a.lp_h, a.lp_v
    h = (torch.randn(N, H, device=dev) * 0.05).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=dev) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)

    def plain():                                   # what the fused head replaces
        logp = torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None])
        logp.sum().backward()
        h.grad = w.grad = None

    def fused():
        logp, _ = L.linear_logprobs_chunked(h, w, t, 1.0, None, use_triton=RUN_TRITON)
        logp.sum().backward()
        h.grad = w.grad = None
    t_ref = timeit(plain, a.iters)
    t_fused = timeit(fused, a.iters)
    # floor: read hidden + weight twice (forward, backward), write both gradients
    nbytes = 3 * (h.numel() + w.numel()) * h.element_size()
    row("linear_logprobs f+b", f"N={N} H={H} V={V}", t_ref, t_fused if RUN_TRITON else None, nbytes, a.bandwidth)
    if not RUN_TRITON:
        print(f"{'  chunked torch path':<24} {'(what CPU runs)':<26} {t_fused * 1e3:12.3f}")
    if not CUDA:
        return None
    m_ref, m_fused = peak_extra(plain), peak_extra(fused)
    print(f"{'  peak memory, GiB':<24} {'above inputs, fwd+bwd':<26} {m_ref / 2**30:12.3f} {m_fused / 2**30:12.3f}"
          f" {m_fused / m_ref:9.3f}x")
    return m_fused / m_ref


def bench_gae(a, dev):
    B, T = a.gae_b, a.gae_t
    r, v = torch.randn(B, T, device=dev), torch.randn(B, T, device=dev)
    m = torch.ones(B, T, device=dev)
    m[:, T - T // 4:] = 0
    t_ref = timeit(lambda: A.gae_ref(r, v, m, 0.99, 0.95), max(3, a.iters // 4), warmup=1)
    t_tri = timeit(lambda: A.gae_triton(r, v, m, 0.99, 0.95), a.iters) if RUN_TRITON else None
    return row("gae (vs Python loop)", f"B={B} T={T}", t_ref, t_tri, 5 * r.numel() * 4, a.bandwidth)


def bench_grpo(a, dev):
    B = a.grpo_b
    r = torch.rand(B, device=dev)
    g = torch.arange(B, device=dev) // 8
    t_ref = timeit(lambda: A.grpo_advantages_ref(r, g), a.iters)
    t_tri = timeit(lambda: A.grpo_advantages_triton(r, g), a.iters) if RUN_TRITON else None
    row("grpo_advantages", f"B={B} groups of 8", t_ref, t_tri, 3 * B * 4, a.bandwidth)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bandwidth", type=float, default=3350.0, help="peak memory bandwidth, GB/s (H100 SXM: 3350)")
    ap.add_argument("--dtype", default="bfloat16" if CUDA else "float32")
    ap.add_argument("--iters", type=int, default=20 if CUDA else 5)
    big = CUDA
    ap.add_argument("--sample-b", type=int, default=64 if big else 16)
    ap.add_argument("--sample-v", type=int, default=128256 if big else 32000)
    ap.add_argument("--tok-n", type=int, default=4096 if big else 256, help="token_logprobs rows")
    ap.add_argument("--lp-n", type=int, default=8192 if big else 512)
    ap.add_argument("--lp-h", type=int, default=4096 if big else 256)
    ap.add_argument("--lp-v", type=int, default=128256 if big else 32000)
    ap.add_argument("--gae-b", type=int, default=64 if big else 16)
    ap.add_argument("--gae-t", type=int, default=2048)
    ap.add_argument("--grpo-b", type=int, default=8192 if big else 1024)
    a = ap.parse_args()
    dev = "cuda" if CUDA else "cpu"
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    if CUDA:
        print(f"device: {torch.cuda.get_device_name()}  triton: {'yes' if HAS_TRITON else 'NO (references only)'}  "
              f"dtype: {a.dtype}  bandwidth for the floor: {a.bandwidth:.0f} GB/s")
    else:
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        print(f"device: CPU, no CUDA: PyTorch reference timings only, at reduced sizes; Triton timings need "
              f"CUDA (the interpreter is for correctness, not speed). floor at {a.bandwidth:.0f} GB/s is the GPU's.")
    print(HEADER)
    s = bench_sampling(a, dev, dtype)
    bench_token_logprobs(a, dev, dtype)
    mem = bench_linear(a, dev, dtype)
    g = bench_gae(a, dev)
    bench_grpo(a, dev)
    fmt = lambda v, unit: NA if v is None else f"{v:.2f}{unit}"
    print(f"sampling_speedup: {fmt(s, 'x')}")
    print(f"logprob_peak_mem_ratio: {fmt(mem, '')}")
    print(f"gae_speedup: {fmt(g, 'x')}")


if __name__ == "__main__":
    main()
