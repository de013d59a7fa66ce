"""Kernels of the RL loop, each a Triton kernel beside the PyTorch reference it must match.

    sample            temperature / top-k / top-p / min-p / greedy sampling -> (token, logprob)
    token_logprobs    logits -> (logprob of the target, entropy), differentiable
    linear_logprobs   hidden, LM head -> (logprob, entropy), chunked: N x V logits never exist
    grpo_advantages   group-normalised outcome rewards;  token_advantages: broadcast to agent tokens
    gae               generalised advantage estimation over (masked) steps -> (advantages, returns)

Backend per call: "auto" (default) runs Triton for CUDA tensors when triton imports and the
references otherwise (warning once); "triton" forces the kernels (on CPU only under
TRITON_INTERPRET=1, which is how the tests run them); "torch" forces the references. Choose with
the environment variable DREAMGYM_KERNELS or set_backend(name); set_backend(None) defers to the
variable again. linear_logprobs on the "torch" backend is the same chunked algorithm in PyTorch.
"""
from __future__ import annotations

import os
import sys

import torch

from . import advantages as _adv
from . import logprobs as _lp
from . import sampling as _smp
from ._triton import HAS_TRITON, interpreting

__all__ = ["sample", "token_logprobs", "linear_logprobs", "grpo_advantages", "token_advantages", "gae",
           "set_backend", "get_backend", "triton_available", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")
_override: str | None = None
_warned: set[str] = set()


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r}: use one of {BACKENDS}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every later call ("auto", "triton", "torch"); None: back to the env var."""
    global _override
    _override = None if name is None else _validate(name, "backend")


def get_backend() -> str:
    if _override is not None:
        return _override
    return _validate(os.environ.get("DREAMGYM_KERNELS", "auto").strip().lower() or "auto", "DREAMGYM_KERNELS")


def triton_available() -> bool:
    """True when triton imports (compiling needs CUDA; on CPU kernels run only in its interpreter)."""
    return HAS_TRITON


def _warn_once(key: str, msg: str) -> None:
    """A fallback is said once per process, in one plain line on stderr."""
    if key not in _warned:
        _warned.add(key)
        print(msg, file=sys.stderr, flush=True)


def _use_triton(t: torch.Tensor) -> bool:
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("kernels backend 'triton' was forced but triton is not installed")
        if not t.is_cuda and not interpreting():
            raise RuntimeError("kernels backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
                               "(set before triton is imported)")
        return True
    if t.is_cuda and HAS_TRITON:
        return True
    _warn_once("auto", "kernels: no CUDA tensor or no Triton, using the PyTorch reference implementations "
                       "(DREAMGYM_KERNELS=triton with TRITON_INTERPRET=1 runs the kernels on CPU)")
    return False


# ----------------------------------------------------------------------------- the API
def sample(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
           generator: torch.Generator | None = None):
    """logits [B, V] (fp32/bf16/fp16) -> (tokens int64 [B], logprobs fp32 [B]).

    temperature / top_k / top_p / min_p: Python scalars or per-row [B] tensors. temperature 0: greedy
    (argmax, lowest index on ties), logprob = log_softmax(logits)[token] at T = 1, unfiltered.
    Sampled rows: logprob under the filtered, renormalised distribution actually sampled from.
    top_k 0 / top_p 1 / min_p 0: off; ties at a filter's threshold are kept. Masked (-inf) logits
    are fine; an all -inf row gives token 0, logprob -inf. The same generator state gives the same
    tokens (per backend: the two backends draw differently). See kernels/sampling.py."""
    fn = _smp.sample_triton if _use_triton(logits) else _smp.sample_torch
    return fn(logits, temperature, top_k, top_p, min_p, generator)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """logits [..., V], targets [...] -> (logprobs, entropy) fp32 [...], differentiable w.r.t. logits.
    Entropy is that of softmax(logits / temperature)."""
    if _use_triton(logits):
        return _lp.token_logprobs_triton(logits, targets, temperature)
    return _lp.token_logprobs_ref(logits, targets.long(), temperature)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk: int | None = None):
    """hidden [N, H] (or [..., H]), weight [V, H] -> (logprobs, entropy) fp32, as
    token_logprobs(hidden @ weight.T, targets) but chunk tokens at a time (default: ~2^25 logits a
    chunk), so the N x V logits never exist; the backward recomputes each chunk's logits.
    Differentiable w.r.t. hidden and weight (either may be frozen). hidden is cast to weight's dtype."""
    return _lp.linear_logprobs_chunked(hidden, weight, targets, temperature, chunk, use_triton=_use_triton(hidden))


def grpo_advantages(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6, scale: str = "group"):
    """rewards [B], group ids [B] (any int64) -> fp32 [B]. scale: "group" (r - mean_g) / (std_g + eps),
    "batch" (r - mean_g) / (std of all r - mean_g + eps), "none" r - mean_g (Dr. GRPO); stds unbiased;
    groups of one get 0. See kernels/advantages.py."""
    if _use_triton(rewards):
        return _adv.grpo_advantages_triton(rewards, group_index, eps, scale)
    return _adv.grpo_advantages_ref(rewards, group_index, eps, scale)


def token_advantages(adv: torch.Tensor, mask: torch.Tensor):
    """adv [B], mask [B, L] -> fp32 [B, L]: adv on the agent tokens (mask != 0), 0 elsewhere."""
    if _use_triton(mask):
        return _adv.token_advantages_triton(adv, mask)
    return _adv.token_advantages_ref(adv, mask)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """rewards, values, mask [B, T] -> (advantages, returns) fp32 [B, T]. Steps with mask 0 are skipped
    and get 0; the step after a sequence's last valid step is terminal (value 0). returns = adv + values."""
    if _use_triton(rewards):
        return _adv.gae_triton(rewards, values, mask, gamma, lam)
    return _adv.gae_ref(rewards, values, mask, gamma, lam)
