"""Batched multi-turn decoding with a KV cache, for the agent and the experience model.

In the spirit of nano-vllm, for one process and any Hugging Face causal LM:

* rows are sorted by prompt length and cut into batches of `max_batch` (less padding); every
  row writes its next token to the same cache column, the pads before it are masked out, and
  positions continue after the shared prefix without counting pads (see `_layout`);
* a shared `prefix` (BOS, a chat-template system header) is prefilled once and its KV reused
  for every row (LRU cache keyed by the prefix ids and the weights' state, see `_weights_key`:
  the model is trained between calls, and KV of old weights is dropped);
* decoding samples with `kernels.sample`, whose log-probs are returned, so training needs no
  second forward pass for the old policy; per-row sampling params, stop strings and lengths.
  Stop strings are matched on decoded text (skip_special_tokens), in a window of recent tokens
  long enough to hold them; an incomplete UTF-8 character decodes as U+FFFD meanwhile;
* finished rows leave the batch: the KV cache is compacted (index_select on the batch dim) once
  a quarter of the rows are done, so the batch never decodes much padding.

Forward paths:
* lean (CPU, plain Llama / Qwen2 / Mistral layers: nn.Linear projections, RMSNorms, SiLU MLP, no
  hooks): `_lean_forward`, the decoder in a few ops per layer with fused QKV and gate/up linears
  (`_LeanModel`, built once per weights version) and a preallocated cache (`KVCache`: written in
  place, no torch.cat per step). It computes in the dtype `cpu_plan` chose for this CPU: bfloat16 for
  a float32 model where the CPU has AMX / AVX512-BF16 and it measured faster, with autocast's numerics
  (bfloat16 linears, attention and KV cache; float32 residual stream, norms and RoPE), else the
  model's dtype. Prompts are right-padded, so without a cached prefix the prefill is plain causal
  SDPA, in row chunks so that activations stay in CPU caches; the final layer's attention and MLP run
  on each row's last position only (the only logits used);
* fast (the same cache and masks through the decoder layers' own modules: LoRA and 4-bit layers,
  hooks, Qwen3; SDPA or eager attention): the layers are called directly with our own boolean mask;
* generic (any other model, flash-attention-2, sliding windows longer than the window): the
  model's forward with a `DynamicCache`, a 2D attention mask and explicit position_ids.
On CUDA the fast path's decode step runs with static shapes (attention over the whole preallocated
cache, unwritten columns zero and masked) and is captured in a CUDA graph (`cuda_graphs=True`),
recaptured after each compaction; a failed capture falls back to eager. The capture/replay is NOT
tested (no GPU on the test machines); the static-shape step it captures is, on CPU. On CPU the step
attends over the columns written so far, the KV buffers are kept between calls, and what is fastest
differs by CPU, so `cpu_plan` measures it once per process and model shape (0.1-1 s):
the compute dtype, F.linear or oneDNN's packed linear (`_onednn_linears` on the module path;
PyTorch's MKL GEMMs run AVX2 code on AMD, where oneDNN was ~2.5x faster, and are the faster ones on
Intel), and the decode attention: SDPA or the engine's own two bmm (`_cpu_decode_attention`, V
stored transposed; faster on AMD, slower than SDPA on Intel Xeons). Concurrent `generate` calls
take turns (one process-wide lock).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import sample


@dataclass
class SamplingParams:
    temperature: float = 1.0      # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                # 0: off
    min_p: float = 0.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()    # generation ends after the token that completes one of them


@dataclass
class Generation:
    text: str                     # skip_special_tokens=True; ends with the stop string that ended it
    token_ids: list[int]          # every sampled token, the stop-completing / EOS token included
    logprobs: list[float]         # of each token under the distribution it was sampled from
    finish_reason: str            # "stop" (stop string or EOS) | "length"


FAST_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
LEAN_MODEL_TYPES = ("llama", "qwen2", "mistral")      # Qwen3's per-head q/k norms go through its modules


class KVCache:
    """Preallocated keys/values per layer, [B, H, L, D] as the attention modules see them. They call
    `update`; we set `rows` (prefill chunk) and `start` (first column written) before each forward.
    In `static` mode (CUDA graphs) the column is a device tensor and the whole buffer is returned.
    `v_transposed` (CPU): V is stored [B, H, D, L] and handed out as a transposed view, so the decode
    step's p @ V reads V along memory rows (1.6x faster there, measured; see _cpu_decode_attention).
    `buffers`: storage to reuse (one flat tensor per K/V and layer, grown when too small); on CPU a
    fresh 100 MB cache per call costs page faults, as large frees go back to the OS."""

    def __init__(self, n_layers, B, H, L, D, dtype, device, zero=False, v_transposed=False, buffers=None):
        # static decoding attends over the whole buffer (masked): unwritten columns must not be NaN
        def new(i, shape):
            n = B * H * L * D
            if buffers is None:
                return (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
            if i not in buffers or buffers[i].numel() < n or buffers[i].dtype != dtype:
                buffers[i] = torch.empty(n, dtype=dtype, device=device)
            return buffers[i][:n].view(shape).zero_() if zero else buffers[i][:n].view(shape)
        self.vt = v_transposed
        self.k = [new(2 * i, (B, H, L, D)) for i in range(n_layers)]
        self.v = [new(2 * i + 1, (B, H, D, L) if self.vt else (B, H, L, D)) for i in range(n_layers)]
        self.rows, self.start, self.static, self.col = slice(None), 0, False, None

    def values(self, layer):
        """V of `layer` as [B, H, L, D] (a view)."""
        return self.v[layer].transpose(2, 3) if self.vt else self.v[layer]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.k[layer_idx], self.values(layer_idx)
        if self.static:
            k.index_copy_(2, self.col, key_states)
            v.index_copy_(2, self.col, value_states)
            return k, v
        end = self.start + key_states.shape[2]
        k[self.rows, :, self.start:end] = key_states
        v[self.rows, :, self.start:end] = value_states
        if self.start == 0:         # nothing cached before: attend to the new states as they are
            return key_states, value_states
        return k[self.rows, :, :end], v[self.rows, :, :end]

    def select(self, keep):
        self.k = [t.index_select(0, keep) for t in self.k]
        self.v = [t.index_select(0, keep) for t in self.v]


class _Row:
    __slots__ = ("prompt", "p", "tokens", "logprobs", "reason", "window")

    def __init__(self, prompt, p):
        self.prompt, self.p, self.tokens, self.logprobs, self.reason = prompt, p, [], [], None
        # tokens whose text can hold a stop string: >= 1 byte per token, <= 4 bytes per char
        self.window = 4 * max(map(len, p.stop)) + 4 if p.stop else 0


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 64, prefix_cache_size: int = 8,
                 prefill_tokens: int | None = None, compact_fraction: float = 0.25, cuda_graphs: bool = True,
                 fast_path: bool = True, eos_token_ids=None, onednn_linear="auto", dtype: str = "auto",
                 decode_attention: str = "auto", lean: bool = True):
        """max_batch: rows decoded together; prefill_tokens: tokens per prefill chunk (fast path;
        default 1024 on CPU, 16384 on GPU); compact_fraction: share of finished rows in the batch
        that triggers KV compaction (0: at every finish); fast_path=False forces the generic HF
        forward; eos_token_ids: None = the tokenizer's EOS plus generation_config's (read at each
        call), () = never stop on EOS (benchmarks).
        CPU only, each "auto" decided by `cpu_plan`'s measurements on this CPU at the model's shapes:
        dtype: compute dtype of the lean forward ("auto" | "float32" | "bfloat16"; auto: bfloat16 for a
        float32 model where the CPU has AMX / AVX512-BF16 and it measured faster, with autocast's
        numerics); onednn_linear: linears through oneDNN with packed weights ("auto" | True | False);
        decode_attention: "auto" | "own" (`_cpu_decode_attention`) | "sdpa"; lean: plain Llama-type
        layers run through `_lean_forward` (others, e.g. LoRA / 4-bit, through their modules)."""
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype {dtype!r}: use auto, float32 or bfloat16")
        if decode_attention not in ("auto", "own", "sdpa"):
            raise ValueError(f"decode_attention {decode_attention!r}: use auto, own or sdpa")
        if onednn_linear not in ("auto", True, False):
            raise ValueError(f"onednn_linear {onednn_linear!r}: use auto, True or False")
        self.eos_token_ids, self.onednn_linear, self.dtype = eos_token_ids, onednn_linear, dtype
        self.decode_attention, self.lean = decode_attention, lean
        # CPU decode: the dynamic step (cache columns written so far); tests switch to the static step
        # (what CUDA graphs capture, through the model's modules) / force the decode attention of the
        # module path (None: the plan's choice)
        self._static_on_cpu, self._cpu_attention = False, None
        from transformers import AttentionInterface
        AttentionInterface.register(CPU_DECODE_ATTENTION, _cpu_decode_attention)
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.prefill_tokens, self.compact_fraction, self.cuda_graphs = prefill_tokens, compact_fraction, cuda_graphs
        self.prefix_cache_size, self._prefix, self._kv_buffers = prefix_cache_size, OrderedDict(), {}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        base = model.get_base_model() if hasattr(model, "get_base_model") else model   # peft
        self.config = base.config
        fwd = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in fwd else "past_key_values"   # renamed in transformers 5.x
        self._keep_kw = "logits_to_keep" in fwd
        self._decoder, self._head = self._fast_parts(base) if fast_path else (None, None)
        if self.prefill_tokens is None:     # CPU: 4 rows of 256 measured best (vs 2048 / 512); GPU: big launches
            self.prefill_tokens = 1024 if self._device().type == "cpu" else 16384
        # set for the duration of one generate call (under _GENERATE_LOCK): the plan, the lean
        # forward's weights (None: the model's modules) and the KV cache's dtype and V layout
        self._run_plan, self._lean_model, self._lean_cached = None, None, None
        self._kv_dtype, self._kv_vt, self._call_key = None, False, None

    # ------------------------------------------------------------------ public
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 prefix: list[int] | None = None, generator: torch.Generator | None = None) -> list[Generation]:
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        prefix = list(prefix or [])
        self._check_lengths(prompts, params, prefix)
        if not prompts:
            return []
        # The last prefix token is prefilled with each row, so every row has >= 1 token to run and
        # the cached prefix is prefix[:-1] (nothing to cache for a lone BOS).
        head, tail = prefix[:-1], prefix[-1:]
        rows = [_Row(tail + list(p), sp) for p, sp in zip(prompts, params)]
        for r in rows:
            if r.p.max_new_tokens <= 0:
                r.reason = "length"
        order = sorted((r for r in rows if not r.reason), key=lambda r: -len(r.prompt))   # similar lengths together
        with _GENERATE_LOCK:
            modes = [m.training for m in self.model.modules()]
            self.model.eval()
            try:
                with torch.no_grad():
                    self._setup_call()
                    with _onednn_linears(self.model, self._lean_model is None and self._run_plan is not None
                                         and self._run_plan.onednn):
                        for s in range(0, len(order), self.max_batch):
                            self._run_batch(order[s:s + self.max_batch], head, generator)
            finally:
                self._lean_model = None
                for m, mode in zip(self.model.modules(), modes):
                    m.training = mode
        return [self._result(r) for r in rows]

    def compute_dtype(self) -> torch.dtype:
        """The dtype this engine samples in for its model: the lean forward's plan dtype (on CPU, for a
        plain Llama-type model) or the model's own. Decided by measurement once per process and shape."""
        plan = self._plan()
        if plan is not None and self._lean_eligible():
            return plan.dtype
        return self.model.get_input_embeddings().weight.dtype

    def clear_prefix_cache(self):
        """For weight changes `_weights_key` cannot see (e.g. frozen weights rewritten via .data)."""
        self._prefix.clear()
        self._lean_cached = None

    # ------------------------------------------------------------------ setup
    def _fast_parts(self, base):
        dec, head = getattr(base, "model", None), getattr(base, "lm_head", None)
        ok = (self.config.model_type in FAST_MODEL_TYPES and head is not None
              and all(hasattr(dec, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")))
        return (dec, head) if ok else (None, None)

    def _use_fast(self, length: int) -> bool:
        cfg = self.config
        if self._decoder is None or cfg._attn_implementation not in ("sdpa", "eager"):
            return False
        # our mask is plain causal: fine for sliding-window layers only inside the window
        sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or []) or cfg.model_type == "mistral"
        window = getattr(cfg, "sliding_window", None)
        return not (sliding and window is not None and length > window)

    def _plan(self, module_path: bool = False):
        """The CPU plan for this model (None off CPU). The module path runs in the weights' dtype."""
        w = self.model.get_input_embeddings().weight
        if w.device.type != "cpu":
            return None
        dtype = str(w.dtype).replace("torch.", "") if module_path else self.dtype
        return cpu_plan(self.config, self.max_batch, w.dtype, dtype, self.onednn_linear, self.decode_attention)

    def _lean_eligible(self) -> bool:
        """Plain Llama-type layers on CPU (nn.Linear projections, or peft LoRA layers over them, whose
        adapters are folded into the lean weights; RMSNorms, SiLU MLP) with no hooks or replaced
        forwards anywhere in them: what `_lean_forward` computes is then what the modules would. 4-bit
        layers, LoRA variants (DoRA), hooks and the static step (tests) go through the modules."""
        dev = self._device()
        if not (self.lean and dev.type == "cpu" and self._decoder is not None and not self._static(dev)):
            return False
        cfg, nn = self.config, torch.nn
        if cfg.model_type not in LEAN_MODEL_TYPES or getattr(cfg, "hidden_act", None) != "silu":
            return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        plain = lambda m: _linear_weight(m, fold=False) is not None
        try:
            if not plain(self._head) or not hasattr(self._decoder.norm, "variance_epsilon"):
                return False
            for layer in self._decoder.layers:
                a, mlp = layer.self_attn, layer.mlp
                if not all(plain(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj,
                                              mlp.down_proj)):
                    return False
                norms = (layer.input_layernorm, layer.post_attention_layernorm)
                if not all(hasattr(n, "variance_epsilon") for n in norms):
                    return False
                if any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in layer.modules()):
                    return False
        except AttributeError:
            return False
        return True

    def _setup_call(self):
        """Plan, lean weights and KV cache layout for one generate call. The lean weights (fused, in
        the plan's dtype, packed) are kept while the weights do not change (`_weights_key`): a frozen
        model (M_exp during RL) pays the conversion once."""
        w = self.model.get_input_embeddings().weight
        self._run_plan, self._lean_model, self._call_key = None, None, None
        self._kv_dtype, self._kv_vt = w.dtype, False
        if w.device.type != "cpu":
            return
        lean = self._lean_eligible()
        self._run_plan = plan = self._plan(module_path=not lean)
        if lean:
            key = (self._weights(), plan.dtype, plan.onednn, plan.cache_dtype)
            if self._lean_cached is None or self._lean_cached[0] != key:
                self._lean_cached = None                                # the old copy goes first
                self._lean_cached = (key, _LeanModel(self._decoder, self._head, plan))
            self._lean_model, self._kv_dtype = self._lean_cached[1], plan.cache_dtype
        self._kv_vt = not self._static(w.device) and self._own_attention(w.device)

    def _weights(self):
        """`_weights_key()` once per call."""
        if self._call_key is None:
            self._call_key = self._weights_key()
        return self._call_key

    def _check_lengths(self, prompts, params, prefix):
        limit = getattr(self.config, "max_position_embeddings", None)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            n = len(prefix) + len(p)
            if n == 0:
                raise ValueError(f"prompt {i} is empty and there is no prefix: nothing to condition on")
            if limit is not None and n + sp.max_new_tokens > limit:
                raise ValueError(f"prompt {i}: prefix + prompt ({n} tokens) + max_new_tokens "
                                 f"({sp.max_new_tokens}) exceeds the model's max_position_embeddings ({limit})")

    def _eos_ids(self) -> set[int]:
        if self.eos_token_ids is not None:
            return set(self.eos_token_ids)
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen if isinstance(gen, (list, tuple)) else [gen])
        return {i for i in ids if i is not None}

    # ------------------------------------------------------------------ prefix cache
    def _weights_key(self):
        """Weights change between calls (training). `_version` counts in-place writes (optimizer
        steps with for-loop/foreach updates, load_state_dict, copy_) and data_ptr catches swapped
        tensors; fused optimizers and writes through `.data` bypass the counter, so the norms of
        the trainable parameters are part of the key too (one foreach op, one sync per call)."""
        ps = list(self.model.parameters())
        key = tuple((p.data_ptr(), p._version) for p in ps)
        train = [p for p in ps if p.requires_grad]
        norms = tuple(torch.stack(torch._foreach_norm(train)).tolist()) if train else ()
        return key, norms

    def _prefix_kv(self, head: list[int], fast: bool):
        """[(k, v)] per layer, each [1, H, P, D], for the shared prefix (LRU cached)."""
        weights = self._weights()
        key = (tuple(head), (fast, self._lean_model is not None, self._kv_dtype), weights)
        if key in self._prefix:
            self._prefix.move_to_end(key)
            return self._prefix[key]
        for old in [k for k in self._prefix if k[2] != weights]:    # trained since: never hit again
            del self._prefix[old]
        ids = torch.tensor([head], device=self._device())
        pos = torch.arange(len(head), device=ids.device)[None]
        if fast:
            cache = self._new_cache(1, len(head), reuse=False)      # kept: must not share the batch buffers
            valid = torch.ones_like(ids, dtype=torch.bool)
            if self._lean_model is not None:
                self._lean_forward(ids, pos, cache, valid)
            else:
                self._fast_forward(ids, pos, self._prefill_mask(valid, 0), cache)
            kv = [(cache.k[i], cache.values(i)) for i in range(len(cache.k))]
        else:
            from transformers import DynamicCache
            cache = DynamicCache(config=self.config)
            self._hf_forward(ids, pos, torch.ones_like(ids), cache)
            kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefix[key] = kv
        while len(self._prefix) > self.prefix_cache_size:
            self._prefix.popitem(last=False)
        return kv

    # ------------------------------------------------------------------ forward passes
    def _device(self):
        return self.model.get_input_embeddings().weight.device

    def _new_cache(self, B, L, reuse=True):
        cfg, w = self.config, self.model.get_input_embeddings().weight
        H = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        static, cpu = self._static(w.device), w.device.type == "cpu"
        # CPU: buffers reused across calls (the GPU's caching allocator already reuses its blocks);
        # V stored transposed for the engine's own decode attention (the static step reads the buffers
        # as the model's attention expects them)
        return KVCache(len(self._decoder.layers), B, H, L, D, self._kv_dtype or w.dtype, w.device, zero=static,
                       v_transposed=self._kv_vt, buffers=self._kv_buffers if cpu and reuse else None)

    def _own_attention(self, device) -> bool:
        """Decode steps on CPU use `_cpu_decode_attention` where the plan measured it faster than SDPA
        (tests force either through `_cpu_attention`)."""
        if device.type != "cpu":
            return False
        if self._cpu_attention is not None:
            return self._cpu_attention
        return self._run_plan is not None and self._run_plan.attention == "own"

    def _static(self, device) -> bool:
        """Static-shape decode: captured in CUDA graphs on GPU; on CPU only when tests ask for it."""
        return self.cuda_graphs if device.type == "cuda" else device.type == "cpu" and self._static_on_cpu

    def _fast_forward(self, ids, pos, mask, cache, last=None, cpu_attention=False):
        """Decoder layers called directly -> logits [B, V] at index `last` of each row (default -1).
        cpu_attention: the attention modules call `_cpu_decode_attention` (one query per row)."""
        dec, cfg = self._decoder, self.config
        h = dec.embed_tokens(ids)
        rope = dec.rotary_emb(h, pos)
        if mask is not None and (cpu_attention or cfg._attn_implementation == "eager"):   # additive mask
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(
                ~mask, torch.finfo(h.dtype).min)
        kw = dict(attention_mask=mask, position_ids=pos, position_embeddings=rope, use_cache=True,
                  **{self._cache_kw: cache})
        *body, final = dec.layers
        with _attention_function(cfg, CPU_DECODE_ATTENTION if cpu_attention else None):
            for layer in body:
                h = layer(h, **kw)
            # Only each row's last position reaches the logits: the final layer's attention runs on every
            # position (their K/V fill the cache), its MLP (3/4 of the layer's FLOPs) on the last one only.
            # The wiring is the decoder layer's own, the same in every FAST_MODEL_TYPES model.
            h = h + final.self_attn(final.input_layernorm(h), **kw)[0]
        h = h[:, -1] if last is None else h[torch.arange(h.shape[0], device=h.device), last]
        return self._head(dec.norm(h + final.mlp(final.post_attention_layernorm(h))))

    def _lean_forward(self, ids, pos, cache, valid, last=None):
        """The decoder of a plain Llama-type model in a few ops per layer (CPU; see `_LeanModel`):
        fused QKV and gate/up linears in the plan's dtype (bfloat16 with autocast's numerics: the
        residual stream, norms and RoPE stay float32, each linear's output is bfloat16), K/V written
        to the cache in its dtype (the plan's `cache_dtype`: the compute dtype, or float32 under
        bfloat16 linears where that measured faster; attention then runs in float32 and the output
        projection casts back), SDPA over the new states for the prefill (causal, no cached
        prefix) and one query per row over the cache otherwise (SDPA or `_cpu_decode_attention`, as
        the plan says). The HF modules' op sequence is kept where it sets the rounding (RMSNorm,
        RoPE, SiLU * up), so greedy tokens match the model's own forward in the same dtype.
        ids [B, T]; valid [B, start + T]: cache columns holding real tokens (with `cache.start`,
        `cache.rows` as for `_fast_forward`). Logits [B, V] at index `last` of each row (default -1):
        the final layer's attention and MLP run for those positions only (the others' K/V are written)."""
        W, dec = self._lean_model, self._decoder
        B, T = ids.shape
        Hq, Hk, D = W.heads
        s, rows = cache.start, cache.rows
        e = s + T
        own = self._own_attention(ids.device)
        h = dec.embed_tokens(ids)
        cos, sin = dec.rotary_emb(h, pos)
        cos, sin = cos[:, :, None], sin[:, :, None]                   # [B, T, 1, D]: over the heads
        one = None if bool(valid[:, :e].all()) else valid[:, None, None, :e]   # mask of single queries
        prefix_mask = self._prefill_mask(valid, s) if s and T > 1 else None
        pick = None if T == 1 else (torch.arange(B, device=ids.device),
                                   torch.full((B,), T - 1, device=ids.device) if last is None else last)
        n = len(W.layers)
        for i, L in enumerate(W.layers):
            qkv = L.qkv(_rms(h, *L.ln1)).view(B, T, Hq + 2 * Hk, D)
            qk = _rope(qkv[:, :, :Hq + Hk], cos, sin)
            k, v = qk[:, :, Hq:].transpose(1, 2), qkv[:, :, Hq + Hk:].transpose(1, 2)
            K, V = cache.k[i], cache.values(i)
            K[rows, :, s:e] = k
            V[rows, :, s:e] = v
            q = qk[:, :, :Hq]
            if i == n - 1 and pick is not None:                        # the final layer: last positions only
                q, h, T1 = q[pick][:, None], h[pick][:, None], 1
            else:
                T1 = T
            if T1 > 1 and s == 0:        # prefill, nothing cached before: causal over the new states
                # K and V as the cache holds them (already in its dtype); V stored transposed is slow to read
                # for SDPA, so then the new states
                vs = v.to(W.kv_dtype) if cache.vt else V[rows, :, :e]
                o = F.scaled_dot_product_attention(q.transpose(1, 2).to(W.kv_dtype), K[rows, :, :e], vs,
                                                   is_causal=True, scale=W.scaling, enable_gqa=Hq != Hk)
                o = o.transpose(1, 2).reshape(B, T, Hq * D)
            elif T1 > 1:                  # prefill after a cached prefix
                o = F.scaled_dot_product_attention(q.transpose(1, 2).to(W.kv_dtype), K[rows, :, :e], V[rows, :, :e],
                                                   attn_mask=prefix_mask, scale=W.scaling, enable_gqa=Hq != Hk)
                o = o.transpose(1, 2).reshape(B, T, Hq * D)
            elif own:                     # one query per row, the engine's attention (V stored transposed)
                bias = None if one is None else torch.zeros(one.shape, dtype=h.dtype).masked_fill_(
                    ~one, torch.finfo(h.dtype).min)
                o, _ = _cpu_decode_attention(None, q.transpose(1, 2).to(W.kv_dtype), K[rows, :, :e], V[rows, :, :e],
                                             0.0 if bias is None else bias, scaling=W.scaling)
                o = o.reshape(B, 1, Hq * D)
            else:                         # one query per row, SDPA; a KV head's query heads are its rows
                qg = q.reshape(B, Hk, Hq // Hk, D).to(W.kv_dtype)
                o = F.scaled_dot_product_attention(qg, K[rows, :, :e], V[rows, :, :e], attn_mask=one, scale=W.scaling)
                o = o.reshape(B, 1, Hq * D)
            h = h + L.o(o)
            gate, up = L.gu(_rms(h, *L.ln2)).chunk(2, -1)
            h = h + L.down(F.silu(gate) * up)
        return W.head(_rms(h[:, -1], *W.norm))

    def _hf_forward(self, ids, pos, mask2d, cache):
        kw = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask2d.long(), position_ids=pos, **kw)
        return out.logits[:, -1]

    @staticmethod
    def _prefill_mask(valid, start):
        """Bool [B, 1, T, start+T]: valid keys, causal over the new T columns. With right padding
        every query sees at least its row's first token, so no row is all-masked (NaN in SDPA)."""
        L = valid.shape[1]
        col = torch.arange(L, device=valid.device)
        q = torch.arange(start, L, device=valid.device)[:, None]
        return valid[:, None, None, :] & (col <= q)

    # ------------------------------------------------------------------ one batch
    def _run_batch(self, rows, head, generator):
        dev, B = self._device(), len(rows)
        P, T = len(head), max(len(r.prompt) for r in rows)
        L = P + T + max(r.p.max_new_tokens for r in rows)
        fast = self._use_fast(L)
        lens = torch.tensor([len(r.prompt) for r in rows], device=dev)
        ids, valid, pos = _layout([r.prompt for r in rows], lens, P, L, self.pad_id, right=fast)
        kv = self._prefix_kv(head, fast) if P else []
        state = _FastState(self, B, L, kv) if fast else _HFState(self, B, kv)
        logits = state.prefill(ids, pos, valid, P, lens)
        self._decode(rows, logits, state, valid, P + T, P + lens, generator)

    def _decode(self, rows, logits, state, valid, cur, next_pos, generator):
        eos, live = self._eos_ids(), list(rows)
        knobs = _knobs(live, logits.device)
        while True:
            tok, lp = sample(logits.float(), generator=generator, **knobs)
            done = self._append(live, tok.tolist(), lp.tolist(), eos)
            if all(done):
                return
            n_done = sum(done)
            if n_done and n_done >= self.compact_fraction * len(live):
                keep = torch.tensor([b for b, d in enumerate(done) if not d], device=tok.device)
                live = [r for r, d in zip(live, done) if not d]
                tok, valid, next_pos = tok[keep], valid[keep], next_pos[keep]
                knobs = {k: v[keep] if torch.is_tensor(v) else v for k, v in knobs.items()}
                state.select(keep)
            valid[:, cur] = True
            logits = state.step(tok[:, None], next_pos[:, None], valid, cur)
            cur, next_pos = cur + 1, next_pos + 1

    def _append(self, live, toks, lps, eos) -> list[bool]:
        """Record one token per row; returns which rows are finished. Rows finished earlier ride
        along until the next compaction and ignore their tokens."""
        check = []
        for r, t, lp in zip(live, toks, lps):
            if r.reason:
                continue
            r.tokens.append(t)
            r.logprobs.append(lp)
            if t in eos:
                r.reason = "stop"
            elif r.window:
                check.append(r)
            if not r.reason and len(r.tokens) >= r.p.max_new_tokens:
                r.reason = "length"
        if check:        # one tokenizer call for every row that has stop strings
            tails = self.tokenizer.batch_decode([r.tokens[-r.window:] for r in check], skip_special_tokens=True,
                                                clean_up_tokenization_spaces=False)
            for r, text in zip(check, tails):
                if any(s in text for s in r.p.stop):
                    r.reason = "stop"
        return [bool(r.reason) for r in live]

    def _result(self, r) -> Generation:
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        ends = [text.find(s) + len(s) for s in r.p.stop if s in text]
        if r.reason == "stop" and ends:
            text = text[:min(ends)]         # cut right after the first stop string
        return Generation(text=text, token_ids=list(r.tokens), logprobs=list(r.logprobs), finish_reason=r.reason)


CPU_DECODE_ATTENTION = "dreamgym_cpu_decode"
# `generate` runs under this process-wide lock: calls from several threads (e.g. a server) take turns.
# They would otherwise share what a call changes for its duration: the model's train/eval flags,
# its config's attention switch (below), its linears' forwards (`_onednn_linears`) and the engine's
# KV buffers. One call keeps the CPU/GPU busy anyway. Calling the same model outside an engine
# while an engine decodes is not supported.
_GENERATE_LOCK = threading.Lock()


@contextmanager
def _attention_function(config, name):
    """HF attention modules look their attention function up in config._attn_implementation at each
    call: point it at `name` (registered in transformers' AttentionInterface) for this forward only."""
    old = config._attn_implementation
    if name:
        config._attn_implementation = name
    try:
        yield
    finally:
        if name:
            config._attn_implementation = old


def _cpu_decode_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """One query per row over the cache columns written so far (CPU decode step; `attention_mask` is
    additive [B, 1, 1, L]): two batched matmuls and a softmax. On the AMD EPYC measured, SDPA's CPU
    kernel was ~1.5x slower here; on a Sapphire Rapids-class Xeon it is 2-3x faster (`cpu_plan`
    picks). The scores are computed as K @ q (each row of K a dot product, read in order), not
    q @ K^T: measured 1.6x faster on the KV cache read from memory, the cost of this step.
    `key`/`value` may be [:, :, :L] views of the preallocated buffers: bmm reads them in place.
    With GQA, a KV head's query heads are its GEMM's columns."""
    B, Hq, _, D = query.shape
    Hk, L = key.shape[1], key.shape[2]
    q = (query * (D ** -0.5 if scaling is None else scaling)).reshape(B * Hk, Hq // Hk, D)
    s = torch.bmm(key.flatten(0, 1), q.transpose(1, 2)).transpose(1, 2)           # [B*Hk, g, L]
    s = s.view(B, Hk, -1, L) + attention_mask
    p = torch.softmax(s, -1, dtype=torch.float32).to(value.dtype).view(B * Hk, -1, L)
    v = value.flatten(0, 1)
    if v.stride(-1) == 1:                                                           # V rows in memory
        out = torch.bmm(p, v)
    else:                                                                           # V stored transposed
        out = torch.bmm(v.transpose(1, 2), p.transpose(1, 2)).transpose(1, 2)
    return out.reshape(B, 1, Hq, D), None


_ONEDNN = {}      # "ok": bool, set by the first check in this process


def _onednn_ok() -> bool:
    """oneDNN's linear (an op PyTorch's own CPU compiler uses) present and equal to F.linear here."""
    if "ok" not in _ONEDNN:
        why = None
        try:
            g = torch.Generator().manual_seed(0)
            x, w, b = torch.randn(32, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), b, "none", [], "")
            if not torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-4):
                why = "results differ from F.linear"
        except Exception as e:                                     # e.g. a build without oneDNN
            why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        _ONEDNN["ok"] = why is None
        if why:
            warnings.warn(f"engine: oneDNN linear unavailable ({why}); CPU layers use torch's default GEMM")
    return _ONEDNN["ok"]


def _dnn_linear(x, packed, weight, bias):
    if x.numel() >= 16 * x.shape[-1] and _ONEDNN["ok"]:    # a few rows: plain GEMV is faster than oneDNN's call
        try:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        except RuntimeError as e:       # an input oneDNN refuses: F.linear below (it raises if the input is bad)
            _ONEDNN["ok"] = False
            warnings.warn(f"engine: oneDNN linear failed ({str(e).splitlines()[0][:200]}); using torch's GEMM")
    return F.linear(x, weight, bias)


def _packed_linear(module, packed, x):
    return _dnn_linear(x, packed, module.weight, module.bias)


@contextmanager
def _onednn_linears(model, enabled):
    """On CPU, float32 `nn.Linear` layers (LoRA adapters and the base layers under them included; 4-bit
    layers are not nn.Linear) run through oneDNN for the duration of one `generate` call. Why: PyTorch's
    CPU wheels do float32 GEMMs in MKL, which takes its AVX2 code on non-Intel CPUs; oneDNN picks its
    kernels by instruction set. Measured on an AMD EPYC (AVX-512), one thread, the engine's shapes
    (M = 64 and 1024 rows, K/N = 192/768): 180-230 GFLOP/s against ~90. Weights are packed again at
    each call (the agent is trained between calls; ~0.3 ms per 2060x192 matrix; the packed copies
    live for the call, so a large float32 model on CPU holds its linear weights twice meanwhile), and
    each module's forward is restored afterwards. Results equal F.linear's up to float32 rounding."""
    mods = []
    if enabled and _onednn_ok():
        for m in model.modules():
            if (type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
                    and "forward" not in m.__dict__):              # e.g. accelerate's hooks: leave alone
                packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().contiguous())
                m.forward = functools.partial(_packed_linear, m, packed)
                mods.append(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


# ----------------------------------------------------------------------------- the lean forward's parts
def _linear_weight(m, fold: bool = True):
    """(weight, bias) that module `m` applies as a linear layer, or None if it is not one the lean
    forward can fold: an nn.Linear's own (no replaced forward); a peft LoRA layer over an nn.Linear:
    its base weight plus scaling * B @ A of each active, unmerged plain-LoRA adapter (the same linear
    map; in eval mode its dropout is the identity). DoRA and other variants, LoRA biases, and adapters
    switched off while merged (peft would unmerge them in the forward) are not folded.
    fold=False: only whether it can be (True / None), without computing B @ A."""
    nn = torch.nn
    if "forward" in m.__dict__:
        return None
    if type(m) is nn.Linear:
        return (m.weight.detach(), None if m.bias is None else m.bias.detach()) if fold else True
    base = getattr(m, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(m, "lora_A") or "forward" in base.__dict__:
        return None
    w = base.weight.detach()
    if m.merged and m.disable_adapters:
        return None
    if not m.merged and not m.disable_adapters:
        for name in m.active_adapters:
            if name not in m.lora_A.keys():
                continue
            a, b = m.lora_A[name], m.lora_B[name]
            if name in getattr(m, "lora_variant", {}) or type(a) is not nn.Linear or type(b) is not nn.Linear \
                    or b.bias is not None or a.bias is not None:
                return None
            if fold:
                w = w + m.scaling[name] * (b.weight.detach().to(w.dtype) @ a.weight.detach().to(w.dtype))
    return (w, None if base.bias is None else base.bias.detach()) if fold else True


class _Linear:
    """One linear of the lean forward, several modules fused along the output (QKV, gate/up): weights
    (LoRA adapters folded in, see `_linear_weight`) in the plan's dtype, packed for oneDNN when the
    plan says so. The input is cast to that dtype and the output stays in it: autocast's rule."""
    __slots__ = ("w", "b", "packed")

    def __init__(self, mods, dtype, onednn):
        parts = [_linear_weight(m) for m in mods]
        w = torch.cat([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]
        self.w = w.to(dtype).contiguous()
        self.b = None
        if any(b is not None for _, b in parts):
            self.b = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts]).to(dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w) if onednn and _onednn_ok() else None

    def __call__(self, x):
        x = x.to(self.w.dtype)
        if self.packed is None:
            return F.linear(x, self.w, self.b)
        return _dnn_linear(x, self.packed, self.w, self.b)


class _LeanModel:
    """The decoder's weights as `Engine._lean_forward` uses them, built for the plan (dtype, oneDNN)."""

    def __init__(self, dec, head, plan):
        a = dec.layers[0].self_attn
        cfg = a.config
        hq = cfg.num_attention_heads
        self.heads = (hq, getattr(cfg, "num_key_value_heads", None) or hq, a.head_dim)
        self.dtype, self.kv_dtype, self.scaling = plan.dtype, plan.cache_dtype, a.scaling
        lin = lambda *mods: _Linear(mods, plan.dtype, plan.onednn)
        norm = lambda n: (n.weight.detach(), n.variance_epsilon)
        self.layers = []
        for layer in dec.layers:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append(_LeanLayer(
                qkv=lin(at.q_proj, at.k_proj, at.v_proj), o=lin(at.o_proj), gu=lin(mlp.gate_proj, mlp.up_proj),
                down=lin(mlp.down_proj), ln1=norm(layer.input_layernorm), ln2=norm(layer.post_attention_layernorm)))
        self.norm, self.head = norm(dec.norm), lin(head)


@dataclass
class _LeanLayer:
    qkv: _Linear
    o: _Linear
    gu: _Linear
    down: _Linear
    ln1: tuple
    ln2: tuple


def _rms(h, weight, eps):
    """LlamaRMSNorm's forward (Qwen2's and Mistral's are the same). For float32 F.rms_norm computes the
    same ops in one kernel (bitwise equal, tested); other dtypes follow the module's own rounding."""
    if h.dtype == weight.dtype == torch.float32:
        return F.rms_norm(h, weight.shape, weight, eps)
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def _rope(x, cos, sin):
    """apply_rotary_pos_emb (x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)), for q and k
    in one go, bitwise the same (tested): x * cos, then x2 * sin1 subtracted from the first half
    (a + (-b) is a - b in IEEE arithmetic) and x1 * sin2 added to the second, with no concatenation."""
    d = x.shape[-1] // 2
    out = x * cos
    out[..., :d] -= x[..., d:] * sin[..., :d]
    out[..., d:] += x[..., :d] * sin[..., d:]
    return out


# ----------------------------------------------------------------------------- what runs fastest on this CPU
@dataclass(frozen=True)
class CpuPlan:
    """How the engine runs a model on this CPU, from `cpu_plan`'s measurements."""
    dtype: torch.dtype            # the lean forward's compute dtype (linears, KV cache, attention)
    onednn: bool                  # linears through oneDNN with packed weights (else F.linear)
    attention: str                # one query per row over the cache: "own" (_cpu_decode_attention) | "sdpa"
    ms: tuple = ()                # (candidate, ms): what was measured (empty: nothing to choose from)
    kv: torch.dtype | None = None  # the KV cache's and attention's dtype when it is not `dtype`: bfloat16
                                   # linears over a float32 cache, where bfloat16 GEMMs are fast and its
                                   # attention is not (AVX512-BF16 without AMX)

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv or self.dtype

    def describe(self) -> str:
        name = lambda d: str(d).replace("torch.", "")
        what = f"dtype {name(self.dtype)}, linears {'oneDNN' if self.onednn else 'torch'}, " \
               f"decode attention {self.attention}" + (f", cache and attention {name(self.kv)}" if self.kv else "")
        return what + (" (measured ms: " + ", ".join(f"{k} {v:.2f}" for k, v in self.ms) + ")" if self.ms else "")


_PLANS: dict = {}
# bfloat16 is chosen only when it measured at least this much faster than float32 (it changes results;
# noise on a shared machine must not flip it between runs)
BF16_MARGIN = 1.25
CHOICE_MARGIN = 1.1


def bf16_native() -> bool:
    """The CPU has AMX tiles or AVX512-BF16 (oneDNN then computes bfloat16 GEMMs natively)."""
    has = lambda name: bool(getattr(torch.cpu, name, lambda: False)())
    return torch.backends.mkldnn.is_available() and (has("_is_amx_tile_supported") or has("_is_avx512_bf16_supported"))


def _min_ms(fns: dict, rounds: int = 5) -> dict:
    """ms per call of each candidate: one warm-up, then `rounds` interleaved rounds (A, B, A, B, ...),
    the minimum wall time of each (other jobs on a shared machine only ever add time)."""
    best = {}
    for name, f in list(fns.items()):
        try:
            f()
        except Exception as e:                  # noqa: BLE001 - e.g. an op this build lacks: not a candidate
            warnings.warn(f"engine: {name} failed in the CPU probe ({type(e).__name__}: {str(e)[:200]}); skipped")
            del fns[name]
    for _ in range(rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    return {k: v * 1e3 for k, v in best.items()}


def _shapes(config):
    hq = config.num_attention_heads
    hk = getattr(config, "num_key_value_heads", None) or hq
    d = getattr(config, "head_dim", None) or config.hidden_size // hq
    return config.hidden_size, config.intermediate_size, hq, hk, d


def pinned_plan(dtype="auto", onednn="auto", attention="auto", kv="auto"):
    """The "auto" requests replaced by $DREAMGYM_CPU_PLAN's parts ("<dtype>/<linears>/<attention>[/<cache>]":
    float32|bfloat16|auto / torch|oneDNN|auto / own|sdpa|auto / float32|bfloat16|auto, the KV cache's and
    attention's dtype, the compute dtype's when left out); explicit requests win over it."""
    spec = os.environ.get("DREAMGYM_CPU_PLAN", "").strip()
    if not spec:
        return dtype, onednn, attention, kv
    parts = spec.split("/")
    dts = ("auto", "float32", "bfloat16")
    choices = (dts, ("auto", "torch", "onednn"), ("auto", "own", "sdpa"), dts)
    if len(parts) not in (3, 4) or any(p.lower() not in c for p, c in zip(parts, choices)):
        raise ValueError(f"DREAMGYM_CPU_PLAN={spec!r}: write <dtype>/<linears>/<attention>[/<cache dtype>], each "
                         f"auto or one of float32|bfloat16, torch|oneDNN, own|sdpa, float32|bfloat16 "
                         f"(e.g. bfloat16/torch/sdpa or bfloat16/oneDNN/own/float32)")
    d, lin, att, c = [p.lower() for p in parts + parts[:1] * (len(parts) == 3)]   # 3 parts: cache = dtype
    return (d if dtype == "auto" and d != "auto" else dtype,
            (lin == "onednn") if onednn == "auto" and lin != "auto" else onednn,
            att if attention == "auto" and att != "auto" else attention,
            c if kv == "auto" and c != "auto" else kv)


def cpu_plan(config, batch: int, weight_dtype=torch.float32, dtype: str = "auto", onednn="auto",
             attention: str = "auto", kv: str = "auto") -> CpuPlan:
    """Decide, by measuring on this CPU at the model's shapes, what the engine runs: the compute dtype
    (bfloat16 for a float32 model only where the CPU has AMX / AVX512-BF16 and a layer's linears plus
    its decode attention measured >= BF16_MARGIN faster), the dtype of the KV cache and attention (the
    compute dtype's, or float32 under bfloat16 linears where that measured CHOICE_MARGIN faster: on
    AVX512-BF16 CPUs without AMX, bfloat16 GEMMs are fast and bfloat16 attention is slow), F.linear or
    oneDNN's packed linear, and the decode attention (the engine's two bmm or SDPA). Measured: the four
    linears of a layer at `batch` rows (a decode step) and 256 rows (a prefill chunk), and one query per
    row over a 256-column cache. Vendors differ (PyTorch's MKL GEMMs run AVX2 code on AMD; SDPA's CPU
    kernel is faster than the two bmm on some Intel CPUs and slower on AMD), hence measured, not looked
    up. Once per process and shape (0.1-1 s); requests other than "auto" are obeyed without measuring
    them. Timings on a loaded machine can choose differently than on a free one (and each choice rounds
    differently), so $DREAMGYM_CPU_PLAN pins the "auto" requests for comparable runs:
    "<dtype>/<linears>/<attention>[/<cache dtype>]", e.g. "bfloat16/torch/sdpa" (as `describe` names
    them; "auto" leaves a part measured)."""
    dtype, onednn, attention, kv = pinned_plan(dtype, onednn, attention, kv)
    C, I, Hq, Hk, D = _shapes(config)
    key = (C, I, Hq, Hk, D, batch, weight_dtype, dtype, onednn, attention, kv, torch.get_num_threads())
    if key in _PLANS:
        return _PLANS[key]
    f32, bf16 = torch.float32, torch.bfloat16
    if dtype == "auto":
        dts = [f32, bf16] if weight_dtype == f32 and bf16_native() else [weight_dtype]
    else:
        dts = [getattr(torch, dtype)]
    # the cache dtypes each compute dtype may use: its own; under bfloat16 linears a float32 cache too
    # (when nothing is requested); a requested cache dtype applies to bfloat16 compute (float32 keeps its own)
    caches = {dt: [getattr(torch, kv)] if kv != "auto" and dt == bf16 else
              [dt] + ([f32] if dt == bf16 and dtype == "auto" and kv == "auto" else []) for dt in dts}
    kvs = list(dict.fromkeys(c for dt in dts for c in caches[dt]))
    dnn = [o for o in ((False, True) if onednn == "auto" else (bool(onednn),)) if not o or _onednn_ok()] or [False]
    kinds = ("own", "sdpa") if attention == "auto" else (attention,)
    fns = {}
    measure = lambda dt: dt in (f32, bf16)
    if len(dts) * len(dnn) * len(kinds) * len(kvs) > 1:
        g = torch.Generator().manual_seed(0)
        rnd = lambda *s: torch.randn(*s, generator=g)
        lins = [(C, (Hq + 2 * Hk) * D), (Hq * D, C), (C, 2 * I), (I, C)]
        xs = [(rnd(m, k), rnd(n, k)) for m in (batch, 256) for k, n in lins]
        L = min(256, getattr(config, "max_position_embeddings", 256) or 256)
        q, k, v = rnd(batch, Hq, 1, D), rnd(batch, Hk, L, D), rnd(batch, Hk, L, D)
        for dt in filter(measure, dts):
            w = [(x.to(dt), wt.to(dt)) for x, wt in xs]
            for o in dnn:
                packed = [torch.ops.mkldnn._reorder_linear_weight(wt) if o else None for _, wt in w]
                fns[(dt, "linear", o)] = lambda w=w, p=packed: [
                    F.linear(x, wt) if pk is None else torch.ops.mkldnn._linear_pointwise(x, pk, None, "none", [], "")
                    for (x, wt), pk in zip(w, p)]
        for dt in filter(measure, kvs):
            qd, kd, vd, vt = q.to(dt), k.to(dt), v.to(dt), v.to(dt).transpose(2, 3).contiguous()
            for kind in kinds:
                fns[(dt, "attention", kind)] = (
                    (lambda qd=qd, kd=kd, vt=vt: _cpu_decode_attention(None, qd, kd, vt.transpose(2, 3), 0.0,
                                                                       scaling=D ** -0.5))
                    if kind == "own" else
                    (lambda qd=qd, kd=kd, vd=vd: F.scaled_dot_product_attention(
                        qd.view(batch, Hk, Hq // Hk, D), kd, vd, scale=D ** -0.5)))
    ms = _min_ms(fns) if fns else {}
    inf = float("inf")
    # a candidate that failed counts as infinitely slow (unless it is the only one); the defaults
    # (F.linear, SDPA: float32 scores in bfloat16 too, a cache in the compute dtype) win unless the other
    # is CHOICE_MARGIN faster, so that near-equal timings do not flip the choice (and the rounding) between runs
    t = lambda dt, *k: ms.get((dt, *k), inf if fns else 0.0) * (1.0 if k[1] in (False, "sdpa") else CHOICE_MARGIN)
    lin = {dt: min(dnn, key=lambda o: t(dt, "linear", o)) for dt in dts}
    att = {dt: min(kinds, key=lambda a: t(dt, "attention", a)) for dt in kvs}
    cost = lambda dt, c: ms.get((dt, "linear", lin[dt]), 0.0) + ms.get((c, "attention", att[c]), 0.0)
    best = {}                   # compute dtype -> (ms, its cache dtype): its first cache unless another
    for dt in dts:              # is CHOICE_MARGIN faster
        first = caches[dt][0]
        best[dt] = (cost(dt, first), first)
        for c in caches[dt][1:]:
            if cost(dt, c) * CHOICE_MARGIN < best[dt][0]:
                best[dt] = (cost(dt, c), c)
    pick = dts[0]
    if len(dts) > 1 and best[bf16][0] * BF16_MARGIN < best[f32][0]:
        pick = bf16
    cache = best[pick][1]
    name = lambda k: "/".join([str(k[0]).replace("torch.", ""), k[1],
                               ("oneDNN" if k[2] else "torch") if k[1] == "linear" else k[2]])
    plan = CpuPlan(pick, lin[pick], att[cache], tuple((name(k), v) for k, v in ms.items()),
                   kv=cache if cache != pick else None)
    _PLANS[key] = plan
    return plan


# ----------------------------------------------------------------------------- training precision
TRAIN_DTYPES = ("auto", "float32", "bfloat16")
_TRAIN: dict = {}


def train_dtype(model, request: str = "auto") -> torch.dtype | None:
    """The dtype the training forward autocasts to, or None (no autocast: the weights' own dtype).
    request: "float32" -> None; "bfloat16" -> bfloat16 autocast (float32 master weights stay float32);
    "auto" -> bfloat16 on a CPU with AMX / AVX512-BF16 where a forward + backward of one of the model's
    MLP blocks (1024 tokens) measured >= BF16_MARGIN faster than float32 (once per process and
    shape, 0.1-1 s), else None; GPUs: None (real models load in bfloat16 there). A model whose weights
    are already bfloat16 (or float16) trains in them: None."""
    if request not in TRAIN_DTYPES:
        raise ValueError(f"train_dtype {request!r}: use one of {TRAIN_DTYPES}")
    p = next(model.parameters())
    if request == "float32" or p.dtype != torch.float32:
        return None
    if request == "bfloat16":
        return torch.bfloat16
    if p.device.type != "cpu" or not bf16_native():
        return None
    return torch.bfloat16 if train_probe(getattr(model, "config", None))["bfloat16"] else None


def train_probe(config) -> dict:
    """{"bfloat16": chosen?, "ms": {"float32": ..., "bfloat16": ...}}: one MLP block's forward and
    backward (1024 tokens, the model's hidden and MLP sizes) in float32 and under bfloat16 autocast,
    interleaved, minimum of 3 rounds each."""
    C = getattr(config, "hidden_size", 256)
    I = getattr(config, "intermediate_size", None) or 4 * C
    key = (C, I, torch.get_num_threads())
    if key not in _TRAIN:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1024, C, generator=g, requires_grad=True)
        w1 = torch.randn(2 * I, C, generator=g).mul_(C ** -0.5).requires_grad_()
        w2 = torch.randn(C, I, generator=g).mul_(I ** -0.5).requires_grad_()

        def block(bf16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                gate, up = F.linear(x, w1).chunk(2, -1)
                y = x + F.linear(F.silu(gate) * up, w2)
            y.float().square().mean().backward()
        ms = _min_ms({"float32": lambda: block(False), "bfloat16": lambda: block(True)}, rounds=3)
        ok = "bfloat16" in ms and ms["bfloat16"] * BF16_MARGIN < ms.get("float32", float("inf"))
        _TRAIN[key] = {"bfloat16": ok, "ms": ms}
    return _TRAIN[key]


def train_autocast(model, request: str = "auto"):
    """The context the training forward runs in (SFT, the policy update, held-out losses, and any
    recomputation of old log-probs that must match them): bfloat16 autocast where `train_dtype`
    says so, else nothing. Backward runs outside it, as autocast wants. Log-probs themselves are
    computed in float32 (kernels.linear_logprobs leaves autocast for the LM head)."""
    dt = train_dtype(model, request)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dt)


def _knobs(rows, device) -> dict:
    """Sampling params for kernels.sample: a scalar when all rows agree, else a tensor [B]."""
    out = {}
    for name, dtype in (("temperature", torch.float32), ("top_k", torch.long), ("top_p", torch.float32),
                        ("min_p", torch.float32)):
        vals = [getattr(r.p, name) for r in rows]
        out[name] = vals[0] if len(set(vals)) == 1 else torch.tensor(vals, dtype=dtype, device=device)
    return out


def _layout(prompts, lens, P, L, pad, right):
    """Padded prompts [B, T], the cache columns that hold real tokens [B, L] and positions [B, T].
    Every row writes its next token to the same column P + T; the pads in between are masked.
    Positions continue after the prefix and pads never shift them. Right padding (fast path)
    lets the prefill use plain causal attention; the generic path left-pads so that the
    model's last position is every row's last token."""
    B, T, dev = len(prompts), int(lens.max()), lens.device
    ids = torch.full((B, T), pad, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        ids[b, slice(0, len(p)) if right else slice(T - len(p), T)] = torch.tensor(p, device=dev)
    col = torch.arange(T, device=dev)
    shift = torch.zeros_like(lens) if right else T - lens
    valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
    valid[:, :P] = True
    valid[:, P:P + T] = (col >= shift[:, None]) & (col < (shift + lens)[:, None])
    pos = (P + col - shift[:, None]).clamp(min=P)             # pads get a dummy position
    return ids, valid, pos


class _FastState:
    """Batch state of the fast path: preallocated KVCache, boolean masks, CUDA graph on GPU."""

    def __init__(self, eng, B, L, kv):
        self.eng, self.cache, self.graph = eng, eng._new_cache(B, L), None
        for layer, (k, v) in enumerate(kv):                       # shared prefix into every row
            self.cache.k[layer][:, :, :k.shape[2]] = k
            self.cache.values(layer)[:, :, :v.shape[2]] = v

    def prefill(self, ids, pos, valid, start, lens):
        B, T = ids.shape
        step = max(1, self.eng.prefill_tokens // T)              # row chunks keep activations in cache
        # Right padding: with no cached prefix, plain causal attention is exact for every real
        # token (pads come after them), and SDPA then skips the upper triangle.
        causal = start == 0 and self.eng.config._attn_implementation == "sdpa"
        out = []
        for r0 in range(0, B, step):
            rows = slice(r0, r0 + step)
            self.cache.rows, self.cache.start = rows, start
            if self.eng._lean_model is not None:
                out.append(self.eng._lean_forward(ids[rows], pos[rows], self.cache, valid[rows, :start + T],
                                                  last=lens[rows] - 1))
                continue
            mask = None if causal else self.eng._prefill_mask(valid[rows, :start + T], start)
            out.append(self.eng._fast_forward(ids[rows], pos[rows], mask, self.cache, last=lens[rows] - 1))
        self.cache.rows = slice(None)
        return torch.cat(out)

    def step(self, tok, pos, valid, cur):
        if self.graph is None and self.eng._static(tok.device):
            try:
                self.graph = _DecodeGraph(self.eng, self.cache, valid, tok, pos, cur, tok.device.type == "cuda")
            except Exception as e:          # e.g. a rope variant that syncs: stay eager from now on
                warnings.warn(f"engine: CUDA graph capture failed ({e}); decoding without graphs")
                self.eng.cuda_graphs, self.cache.static = False, False
        if self.graph is not None:
            return self.graph(tok, pos, cur)
        self.cache.start = cur
        if self.eng._lean_model is not None:
            return self.eng._lean_forward(tok, pos, self.cache, valid[:, :cur + 1])
        return self.eng._fast_forward(tok, pos, valid[:, None, None, :cur + 1], self.cache,
                                      cpu_attention=self.eng._own_attention(tok.device))

    def select(self, keep):
        self.cache.select(keep)
        self.graph = None                                         # shapes changed: recapture


class _HFState:
    """Batch state of the generic path: the model's forward with a DynamicCache."""

    def __init__(self, eng, B, kv):
        from transformers import DynamicCache
        self.eng, self.cache = eng, DynamicCache(config=eng.config)
        for layer, (k, v) in enumerate(kv):
            self.cache.update(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous(), layer)

    def prefill(self, ids, pos, valid, start, lens):
        return self.eng._hf_forward(ids, pos, valid[:, :start + ids.shape[1]], self.cache)

    def step(self, tok, pos, valid, cur):
        return self.eng._hf_forward(tok, pos, valid[:, :cur + 1], self.cache)

    def select(self, keep):
        self.cache.batch_select_indices(keep)


class _DecodeGraph:
    """One decode step with static shapes, captured in a CUDA graph when `capture` (the capture
    and replay are UNTESTED: no GPU on the test machines; tests run the same static step on CPU
    without capture). The step attends over the whole preallocated cache, masked by `valid`, and
    the column to write is a device tensor. `valid` is captured by address: it must not be
    reallocated while the graph lives (compaction drops the graph)."""

    def __init__(self, eng, cache, valid, tok, pos, cur, capture):
        self.cache, self.tok, self.pos, self.graph = cache, tok.clone(), pos.clone(), None
        cache.static, cache.col = True, torch.tensor([cur], device=tok.device)
        own = eng._own_attention(tok.device)                     # never when capturing (CUDA)
        self.run = lambda: eng._fast_forward(self.tok, self.pos, valid[:, None, None, :], cache, cpu_attention=own)
        if capture:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):                            # warm-up (allocator, cuBLAS)
                self.run()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.run()

    def __call__(self, tok, pos, cur):
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.cache.col.fill_(cur)
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.out
