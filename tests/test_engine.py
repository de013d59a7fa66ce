"""engine.py against independent references on a tiny random Llama (tiny-s) and a 4-bit + LoRA one.

References: transformers' generate() (greedy, EOS off) for tokens, a full forward pass without any
cache for log-probs, and a plain Python reading of the HF tokens for where each row must stop.
Every behaviour runs on the three forward paths: "lean" (the engine's own forward of plain Llama
layers + preallocated cache, SDPA decode attention), "modules" (the decoder layers' modules + the
same cache, the engine's own decode attention) and "generic" (the model's forward + DynamicCache).

The device is DREAMGYM_TEST_DEVICE (default cpu; bench/gpu.sh sets cuda), the models float32 on it,
so the CUDA path (Triton sampling, CUDA graphs) meets the same exact references; tests of CPU-only
machinery (oneDNN, the CPU decode attention, the CPU KV buffers) run on CPU alone."""
import os
import random

import pytest
import torch

import engine as engine_mod
import models
from engine import Generation, SamplingParams

real_attention = engine_mod._cpu_decode_attention


def Engine(model, tok, **kw):
    """The references here are float32 HF forwards: the engine computes in float32 unless a test says
    otherwise (its bfloat16 path is compared with HF under bfloat16 autocast in the tests at the end)."""
    kw.setdefault("dtype", "float32")
    return engine_mod.Engine(model, tok, **kw)

torch.set_num_threads(1)
PATHS = ["lean", "modules", "generic"]
DEVICE = torch.device(os.environ.get("DREAMGYM_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and DEVICE.index is None:
    DEVICE = torch.device("cuda", 0)
F32 = models.ModelSpec(dtype="float32")
cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU-only machinery")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    rnd = random.Random(0)                     # made-up words: enough merges for mostly non-byte tokens
    words = ["".join(rnd.choice(["ka", "lo", "mi", "ne", "ru", "ta", "so", "fi", "be", "do", "x", "q"])
                     for _ in range(rnd.randint(1, 4))) for _ in range(600)]
    texts = [" ".join(rnd.choices(words, k=20)) + " <action>go</action> <state>x</state>" for _ in range(300)]
    models.train_tokenizer(texts, str(d / "tok"), vocab_size=1000)
    models.create_tiny(str(d / "m"), str(d / "tok"), preset="tiny-s", seed=0, max_len=256)
    return str(d / "m")


def _scale(model, s=4.0):
    # The default init (std 0.02) makes a random model repeat one token forever; larger weights
    # give varied greedy outputs with clear argmax gaps, so stops land at different steps.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(s)
    return model


@pytest.fixture()
def lm(tiny):
    model, tok = models.load_model(tiny, F32, device=DEVICE)
    return _scale(model), tok


def test_models_live_on_the_test_device(lm):
    """bench/gpu.sh runs this file with DREAMGYM_TEST_DEVICE=cuda: the engine's CUDA path, tested."""
    assert next(lm[0].parameters()).device == DEVICE
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu.sh")) as f:
        gpu_sh = f.read()
    assert "DREAMGYM_TEST_DEVICE=cuda" in gpu_sh


def prompts(tok, lens=(5, 17, 1, 30, 9, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, len(tok), (n,), generator=g).tolist() for n in lens]


def engine(model, tok, path, **kw):
    if path == "lean":
        kw.setdefault("decode_attention", "sdpa")
    elif path == "modules":
        kw.setdefault("decode_attention", "own")
    return Engine(model, tok, fast_path=path != "generic", lean=path == "lean", **kw)


def hf_greedy(model, tok, rows, n):
    """transformers' generate on the left-padded batch, EOS off: n new tokens per row."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
    return [r[T:] for r in out.tolist()]


def expected_cut(tok, ref, p: SamplingParams, eos):
    """Where a row must stop, read off the uncut greedy tokens: EOS, first stop string, or length."""
    for j in range(len(ref)):
        if ref[j] in eos:
            return ref[:j + 1], "stop"
        if any(s in tok.decode(ref[:j + 1], skip_special_tokens=True) for s in p.stop):
            return ref[:j + 1], "stop"
        if j + 1 == p.max_new_tokens:
            return ref[:j + 1], "length"
    raise AssertionError("reference too short")


def stop_from(tok, ref, start, cut, n=2):
    """A stop string read off a row's own output from token `start` on, so rows stop at different
    steps. Clean text only (byte tokens of a random model decode to U+FFFD); with `cut` its last
    character is dropped, so the completing token runs past the stop and the text must be cut."""
    for a in range(start, len(ref) - n + 1):
        s = tok.decode(ref[a:a + n], skip_special_tokens=True)
        last = tok.decode(ref[a + n - 1:a + n])
        if "\ufffd" not in s and len(s.strip()) >= 3 and len(last) >= 2:
            return s[:-1] if cut else s
    return "\x00none"


def full_logprobs(model, prefix_and_prompt, tokens, temperature=1.0):
    """Log-probs of `tokens` from one forward pass over the whole sequence, no cache, no padding."""
    ids = torch.tensor([prefix_and_prompt + tokens], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prefix_and_prompt) - 1:-1].float().cpu()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("path", PATHS)
def test_greedy_matches_hf_generate_and_full_forward_logprobs(lm, path):
    model, tok = lm
    rows = prompts(tok)
    n = [12, 3, 20, 1, 20, 7]                                    # per-row max_new_tokens
    params = [SamplingParams(temperature=0.0, max_new_tokens=k) for k in n]
    gens = engine(model, tok, path, eos_token_ids=()).generate(rows, params)
    ref = hf_greedy(model, tok, rows, max(n))
    for g, r, k, prompt in zip(gens, ref, n, rows):
        assert isinstance(g, Generation) and g.finish_reason == "length"
        assert g.token_ids == r[:k]
        assert g.text == tok.decode(g.token_ids, skip_special_tokens=True)
        lp = full_logprobs(model, prompt, g.token_ids)
        assert torch.allclose(torch.tensor(g.logprobs), lp, atol=1e-4)
    assert len({tuple(g.token_ids[:3]) for g in gens}) > 3          # rows really differ


@pytest.mark.parametrize("path", PATHS)
def test_many_rows_greedy_matches_hf_with_and_without_onednn(lm, path):
    """20 ragged rows: the decode step's linears run through oneDNN too (>= 16 rows); so does the
    prefill of every run. Tokens equal HF's; log-probs equal those without oneDNN up to rounding."""
    model, tok = lm
    rows = prompts(tok, lens=[3 + (7 * i) % 29 for i in range(20)], seed=5)
    p = SamplingParams(temperature=0.0, max_new_tokens=12)
    ref = hf_greedy(model, tok, rows, 12)
    runs = [engine(model, tok, path, eos_token_ids=(), onednn_linear=on).generate(rows, p) for on in (True, False)]
    for gens in runs:
        assert [g.token_ids for g in gens] == ref
    assert torch.allclose(torch.tensor([x for g in runs[0] for x in g.logprobs]),
                          torch.tensor([x for g in runs[1] for x in g.logprobs]), atol=1e-4)
    assert engine_mod._onednn_ok() or DEVICE.type != "cpu"   # the CPU wheel ships oneDNN: the path above really ran


@cpu_only
def test_onednn_linears_patch_and_restore(tiny):
    """Every float32 nn.Linear (LoRA adapters and their base layers included) is routed through
    oneDNN inside the context, with F.linear's results; forwards set by others are left alone;
    everything is restored, also when the body raises."""
    peft = pytest.importorskip("peft")
    model, _ = models.load_model(tiny, models.ModelSpec(lora_r=4), device="cpu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert any(isinstance(m, peft.tuners.lora.Linear) for m in model.modules()) and len(linears) > 20
    hooked = linears[0]
    hooked.forward = own = lambda x: torch.nn.functional.linear(x, hooked.weight, hooked.bias)
    ids = torch.randint(4, 900, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with engine_mod._onednn_linears(model, True):
            patched = [m for m in linears if "forward" in m.__dict__ and m is not hooked]
            out = model(input_ids=ids).logits
        assert len(patched) == len(linears) - 1 and hooked.forward is own
        assert torch.allclose(out, ref, atol=1e-4)
        with pytest.raises(RuntimeError), engine_mod._onednn_linears(model, True):
            raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in linears if m is not hooked) and hooked.forward is own
    with engine_mod._onednn_linears(model, False):
        assert all("forward" not in m.__dict__ for m in linears if m is not hooked)


@cpu_only
def test_kv_buffers_reused_across_calls(lm):
    """On CPU the batch KV cache lives in buffers kept between calls: bigger, smaller and prefixed
    batches through one engine give what fresh engines give, and a cached prefix is not overwritten
    by the batches decoded after it."""
    model, tok = lm
    p = SamplingParams(temperature=0.0, max_new_tokens=9)
    prefix = [tok.bos_token_id] + prompts(tok, lens=(7,), seed=6)[0]
    calls = [(prompts(tok, lens=(4, 20, 11), seed=7), None), (prompts(tok, lens=[5 + i for i in range(18)], seed=8), None),
             (prompts(tok, lens=(9, 2), seed=9), prefix), (prompts(tok, lens=[30] * 17, seed=10), None),
             (prompts(tok, lens=(9, 2), seed=9), prefix)]
    eng = Engine(model, tok, eos_token_ids=())
    for rows, pre in calls:
        got = eng.generate(rows, p, prefix=pre)
        fresh = Engine(model, tok, eos_token_ids=()).generate(rows, p, prefix=pre)
        assert [g.token_ids for g in got] == [g.token_ids for g in fresh]
    assert len(eng._prefix) == 1 and eng._kv_buffers                # the last call hit the cached prefix
    ptrs = [b.data_ptr() for b in eng._kv_buffers.values()]
    eng.generate(calls[1][0], p)
    assert [b.data_ptr() for b in eng._kv_buffers.values()] == ptrs   # no new allocation


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("compact", [0.0, 0.25, 1.0])             # at every finish / default / never
def test_stop_strings_eos_lengths_and_compaction(lm, path, compact):
    model, tok = lm
    rows = prompts(tok, lens=(5, 17, 1, 30, 9, 12, 4, 22))
    ref = hf_greedy(model, tok, rows, 24)
    stops = [stop_from(tok, r, a, cut=i % 2, n=n) for i, (r, a, n) in
             enumerate(zip(ref, (3, 6, 1, 9, 12, 0, 2, 5), (2, 2, 2, 2, 5, 2, 2, 6)))]
    eos_extra = ref[3][6]                                          # a second EOS id, as chat models have
    model.generation_config.eos_token_id = [tok.eos_token_id, eos_extra]
    params = [SamplingParams(temperature=0.0, max_new_tokens=m, stop=(s, "\x00never")) if i % 3 != 2 else
              SamplingParams(temperature=0.0, max_new_tokens=m)
              for i, (s, m) in enumerate(zip(stops, (24, 24, 5, 24, 24, 24, 13, 24)))]
    gens = engine(model, tok, path, compact_fraction=compact, max_batch=5).generate(rows, params)
    eos = {tok.eos_token_id, eos_extra}
    reasons = set()
    for g, r, p, prompt in zip(gens, ref, params, rows):
        want, why = expected_cut(tok, r, p, eos)
        assert g.token_ids == want and g.finish_reason == why
        full = tok.decode(want, skip_special_tokens=True)
        hit = [full.find(s) + len(s) for s in p.stop if s in full]
        assert g.text == (full[:min(hit)] if why == "stop" and hit else full)
        if why == "stop" and hit:
            assert g.text.endswith(p.stop[0])
        assert torch.allclose(torch.tensor(g.logprobs), full_logprobs(model, prompt, want), atol=1e-4)
        reasons.add((why, len(want)))
    assert len({n for _, n in reasons}) >= 5 and {"stop", "length"} <= {w for w, _ in reasons}
    assert any(g.token_ids[-1] == eos_extra for g in gens)             # some row ended on EOS
    assert any(len(g.text) < len(tok.decode(g.token_ids, skip_special_tokens=True)) for g in gens)  # a cut
    assert sum(g.finish_reason == "stop" and g.token_ids[-1] not in eos for g in gens) >= 3   # on stop strings


@pytest.mark.parametrize("path", PATHS)
def test_shared_prefix_same_as_inline_and_cached(lm, path):
    model, tok = lm
    rows = prompts(tok, seed=1)
    prefix = [tok.bos_token_id] + prompts(tok, lens=(6,), seed=2)[0]
    p = SamplingParams(temperature=0.0, max_new_tokens=10)
    eng = engine(model, tok, path, eos_token_ids=())
    with_prefix = eng.generate(rows, p, prefix=prefix)
    again = eng.generate(rows, p, prefix=prefix)
    inline = eng.generate([prefix + r for r in rows], p)
    ref = hf_greedy(model, tok, [prefix + r for r in rows], 10)
    assert len(eng._prefix) == 1                                    # computed once, reused
    for a, b, c, r in zip(with_prefix, again, inline, ref):
        assert a.token_ids == b.token_ids == c.token_ids == r
        assert a.text == c.text
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(c.logprobs), atol=1e-4)
    # a lone BOS prefix caches nothing (it is prefilled with each row)
    assert [g.token_ids for g in eng.generate(rows, p, prefix=[tok.bos_token_id])] == \
        [g.token_ids for g in eng.generate([[tok.bos_token_id] + r for r in rows], p)]


@pytest.mark.parametrize("update", ["adamw", "data_write"])
def test_prefix_cache_invalidated_when_weights_change(lm, update):
    model, tok = lm
    rows = prompts(tok, seed=3)
    prefix = [tok.bos_token_id] + prompts(tok, lens=(8,), seed=4)[0]
    p = SamplingParams(temperature=0.0, max_new_tokens=8)
    eng = Engine(model, tok, eos_token_ids=())
    before = [g.token_ids for g in eng.generate(rows, p, prefix=prefix)]
    if update == "adamw":                                          # a training step between turns
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        ids = torch.tensor([prefix], device=model.device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    else:                                                          # bypasses the version counter
        layer = model.model.layers[0].self_attn
        layer.k_proj.weight.data.copy_(torch.randn_like(layer.k_proj.weight) * 0.5)
        layer.v_proj.weight.data.copy_(torch.randn_like(layer.v_proj.weight) * 0.5)
    after = [g.token_ids for g in eng.generate(rows, p, prefix=prefix)]
    fresh = [g.token_ids for g in Engine(model, tok, eos_token_ids=()).generate(rows, p, prefix=prefix)]
    assert after == fresh and after != before
    assert len(eng._prefix) == 1                                    # KV of the old weights dropped


@pytest.mark.parametrize("path", PATHS)
def test_per_row_params_and_seeded_sampling(lm, path):
    model, tok = lm
    rows = prompts(tok, lens=(5, 17, 1, 30, 9, 12, 8))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    sampled = [SamplingParams(temperature=1.0, max_new_tokens=12),
               SamplingParams(temperature=0.7, top_k=5, max_new_tokens=9),
               SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05, max_new_tokens=4)]
    params = [greedy, sampled[0], greedy, sampled[1], sampled[2], greedy, sampled[0]]
    eng = engine(model, tok, path, eos_token_ids=(), compact_fraction=0.0)   # per-row knobs compacted too
    run = lambda seed: eng.generate(rows, params, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    solo = eng.generate([r for r, p in zip(rows, params) if p is greedy], greedy)
    assert [g.token_ids for g, p in zip(a, params) if p is greedy] == [g.token_ids for g in solo]
    for g, p, prompt in zip(a, params, rows):
        assert len(g.token_ids) == p.max_new_tokens
        if p is sampled[0]:        # T=1, no filter: the sampler's log-prob is the policy's
            assert torch.allclose(torch.tensor(g.logprobs), full_logprobs(model, prompt, g.token_ids), atol=1e-4)
        if p is sampled[1]:        # top-k 5 at T=0.7: tokens among the 5 best, log-probs renormalised
            ids = torch.tensor([prompt + g.token_ids], device=model.device)
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].cpu()
            top = logits.topk(5, -1).indices
            assert all(t in top[j] for j, t in enumerate(g.token_ids))
            assert all(lp > full for lp, full in zip(g.logprobs, full_logprobs(model, prompt, g.token_ids, 0.7)))


def test_more_rows_than_max_batch_keeps_order(lm):
    model, tok = lm
    rows = prompts(tok, lens=(3, 25, 7, 1, 14, 9, 30, 2, 11))
    p = SamplingParams(temperature=0.0, max_new_tokens=6)
    small = Engine(model, tok, max_batch=2, eos_token_ids=()).generate(rows, p)
    big = Engine(model, tok, max_batch=64, eos_token_ids=()).generate(rows, p)
    solo = [Engine(model, tok, eos_token_ids=()).generate([r], p)[0] for r in rows]
    assert [g.token_ids for g in small] == [g.token_ids for g in big] == [g.token_ids for g in solo]
    assert Engine(model, tok).generate([], p) == []


def test_too_long_prompts_raise(lm):
    model, tok = lm          # max_position_embeddings = 256
    eng = Engine(model, tok)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        eng.generate([[5] * 250], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        eng.generate([[5] * 200], SamplingParams(max_new_tokens=10), prefix=[5] * 50)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError):
        eng.generate([[5], [6]], [SamplingParams()])
    assert len(eng.generate([[5] * 240], SamplingParams(max_new_tokens=16))[0].token_ids) <= 16


@pytest.mark.parametrize("path", PATHS)
def test_training_flags_restored_and_no_graph(lm, path):
    model, tok = lm
    model.train()
    model.model.layers[1].eval()                                   # a mixed state survives too
    flags = [m.training for m in model.modules()]
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_grad_enabled(), m.training)))
    gens = engine(model, tok, path).generate(prompts(tok), SamplingParams(max_new_tokens=4))
    hook.remove()
    assert seen and not any(g or tr for g, tr in seen)                     # eval + no_grad inside
    assert [m.training for m in model.modules()] == flags
    model.eval()
    engine(model, tok, path).generate(prompts(tok), SamplingParams(max_new_tokens=4))
    assert not any(m.training for m in model.modules())
    assert all(isinstance(x, float) for g in gens for x in g.logprobs)
    assert all(p.grad is None for p in model.parameters())


def test_4bit_lora_model(tiny):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    model, tok = models.load_model(tiny, models.ModelSpec(load_in_4bit=True, lora_r=4, dtype="float32"), device=DEVICE)
    with torch.no_grad():                      # non-zero adapters, so LoRA is really in the forward
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    rows = prompts(tok, lens=(5, 17, 9))
    prefix = [tok.bos_token_id, 7, 8, 9]
    p = SamplingParams(temperature=0.0, max_new_tokens=6)
    eng = Engine(model, tok, eos_token_ids=())
    assert eng._decoder is not None                                # the fast path runs peft models
    gens = eng.generate(rows, p, prefix=prefix)
    ref = hf_greedy(model, tok, [prefix + r for r in rows], 6)
    assert [g.token_ids for g in gens] == ref
    for g, r in zip(gens, rows):
        # bitsandbytes picks different 4-bit kernels for 1 row (gemv) and for batches: looser tolerance
        assert torch.allclose(torch.tensor(g.logprobs), full_logprobs(model, prefix + r, g.token_ids), atol=1e-3)


def test_zero_new_tokens(lm):
    model, tok = lm
    gens = Engine(model, tok).generate(prompts(tok, lens=(3, 4)), [SamplingParams(max_new_tokens=0),
                                                                    SamplingParams(max_new_tokens=2)])
    assert gens[0] == Generation(text="", token_ids=[], logprobs=[], finish_reason="length")
    assert len(gens[1].token_ids) <= 2


@cpu_only
def test_static_shape_decode_matches(lm, monkeypatch):
    """The CPU step (cache columns so far) with SDPA or with the engine's own attention over V stored
    transposed (the plan picks one per CPU; forced here), the static-shape step (whole-buffer
    attention, device-tensor column, rebuilt after compaction) through the model's modules with its
    SDPA, which is what the CUDA graph captures (the capture itself needs a GPU), and the static step
    with the engine's attention all match the dynamic step with SDPA."""
    model, tok = lm
    rows = prompts(tok, lens=(5, 17, 1, 30, 9, 12))
    params = [SamplingParams(temperature=0.0, max_new_tokens=k) for k in (12, 3, 20, 1, 20, 7)]
    calls = []
    monkeypatch.setattr(engine_mod, "_cpu_decode_attention",
                        lambda *a, **k: calls.append(a[3].stride(-1) != 1) or real_attention(*a, **k))
    runs = []
    for static, own in ((False, False), (False, True), (True, False), (True, True)):
        eng = Engine(model, tok, eos_token_ids=(), compact_fraction=0.0)
        eng._static_on_cpu, eng._cpu_attention = static, own
        calls.clear()
        runs.append(eng.generate(rows, params, prefix=[tok.bos_token_id, 5, 6]))
        if (static, own) == (False, True):
            assert calls and all(calls)                            # the default: own attention, V transposed
    assert calls and not any(calls)                                # static: V as the model gives it
    assert (Engine(model, tok)._static_on_cpu, Engine(model, tok)._cpu_attention) == (False, None)
    dynamic = runs[0]
    for gens in runs[1:]:
        assert [g.token_ids for g in gens] == [g.token_ids for g in dynamic]
        assert torch.allclose(torch.tensor(sum((g.logprobs for g in gens), [])),
                              torch.tensor(sum((g.logprobs for g in dynamic), [])), atol=1e-4)


def test_cpu_decode_attention_matches_sdpa():
    """With GQA (2 query heads per KV head) and a padding mask, against SDPA with repeated KV heads."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hk, L, D = 3, 4, 2, 7, 8
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, Hq, 1, D), (B, Hk, L, D), (B, Hk, L, D)))
    valid = torch.rand(B, L, generator=g) > 0.3
    valid[:, 0] = True
    bias = torch.zeros(B, 1, 1, L).masked_fill_(~valid[:, None, None], torch.finfo(torch.float32).min)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=valid[:, None, None], scale=0.3)
    # as the engine hands them over: [:, :, :L] views of longer buffers, V stored [B, H, D, L] or not
    k_buf, v_buf, vt_buf = torch.zeros(B, Hk, L + 5, D), torch.zeros(B, Hk, L + 5, D), torch.zeros(B, Hk, D, L + 5)
    k_buf[:, :, :L], v_buf[:, :, :L], vt_buf[:, :, :, :L] = k, v, v.transpose(2, 3)
    for key, value in ((k, v), (k_buf[:, :, :L], v_buf[:, :, :L]), (k_buf[:, :, :L], vt_buf.transpose(2, 3)[:, :, :L])):
        out, _ = real_attention(None, q, key, value, bias, scaling=0.3)
        assert out.shape == (B, 1, Hq, D)
        assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)


def test_concurrent_generate_calls_take_turns(lm):
    """A threaded server calls generate concurrently, on one engine and on two engines of the same
    model: every call returns what it returns alone (shared KV buffers, patched linears and the
    attention switch are never seen half-changed), and the model's forwards are restored."""
    import threading
    model, tok = lm
    p = SamplingParams(temperature=0.0, max_new_tokens=10)
    jobs = [prompts(tok, lens=[4 + (i + j) % 23 for j in range(17)], seed=20 + i) for i in range(6)]
    alone = [[g.token_ids for g in Engine(model, tok, eos_token_ids=()).generate(rows, p)] for rows in jobs]
    engines = [Engine(model, tok, eos_token_ids=()), Engine(model, tok, eos_token_ids=())]
    got, errors = [None] * len(jobs), []

    def run(i):
        try:
            got[i] = [g.token_ids for g in engines[i % 2].generate(jobs[i], p)]
        except Exception as e:                      # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == alone
    assert all("forward" not in m.__dict__ for m in model.modules())


@cpu_only
def test_onednn_failure_falls_back_once(lm, monkeypatch):
    """If oneDNN's op raises mid-call, the layer falls back to F.linear (same tokens), says so once,
    and later calls skip oneDNN."""
    model, tok = lm
    rows = prompts(tok, lens=[4 + i for i in range(20)], seed=11)
    p = SamplingParams(temperature=0.0, max_new_tokens=6)
    ref = [g.token_ids for g in Engine(model, tok, eos_token_ids=(), onednn_linear=False).generate(rows, p)]

    def boom(*a, **k):
        raise RuntimeError("unsupported layout")
    monkeypatch.setattr(engine_mod, "_ONEDNN", {"ok": True})
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", boom)
    with pytest.warns(UserWarning, match="oneDNN linear failed"):
        got = [g.token_ids for g in Engine(model, tok, eos_token_ids=(), onednn_linear=True).generate(rows, p)]
    assert got == ref and engine_mod._ONEDNN["ok"] is False
    assert all("forward" not in m.__dict__ for m in model.modules())


# ----------------------------------------------------------------------------- bfloat16 and the CPU plan
def hf_greedy_bf16(model, tok, rows, n):
    """HF generate with bfloat16 compute: under CPU autocast for a float32 model (the engine's bfloat16
    numerics for it), as is for a bfloat16 one."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.dtype == torch.float32):
        return hf_greedy(model, tok, rows, n)


def full_logprobs_bf16(model, prefix_and_prompt, tokens):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.dtype == torch.float32):
        return full_logprobs(model, prefix_and_prompt, tokens)


def same_up_to_ties(model, prompts_, got, ref, gap=0.05):
    """bfloat16 greedy rows against HF's: identical, or first different where the two tokens' float32
    logits are within `gap` (bfloat16 keeps ~3 significant digits, so any two bfloat16 computations,
    HF's own batched and single-row runs included, can order such a near-tie either way). Returns the
    share of identical rows."""
    same = 0
    for prompt, a, b in zip(prompts_, got, ref):
        if a == b:
            same += 1
            continue
        j = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + b[:j]])).logits[0, -1].float()
        assert abs(logits[a[j]] - logits[b[j]]) < gap, f"not a near-tie: {logits[a[j]]} vs {logits[b[j]]}"
    return same / len(ref)


@pytest.mark.parametrize("attention", ["sdpa", "own"])
def test_bfloat16_matches_hf_in_bfloat16(lm, attention):
    """The lean forward in bfloat16 on a float32 model (autocast's numerics: bfloat16 linears and
    attention, float32 residual stream, norms and RoPE) gives HF generate's greedy tokens under
    bfloat16 autocast (up to float32 near-ties, see same_up_to_ties): ragged rows, a cached prefix,
    stop strings with compaction; log-probs equal an autocast full forward's within bfloat16 rounding."""
    model, tok = lm
    rows = prompts(tok, lens=[3 + (7 * i) % 29 for i in range(20)], seed=5)
    prefix = [tok.bos_token_id] + prompts(tok, lens=(6,), seed=2)[0]
    p = SamplingParams(temperature=0.0, max_new_tokens=12)
    eng = Engine(model, tok, eos_token_ids=(), dtype="bfloat16", decode_attention=attention)
    assert eng.compute_dtype() == torch.bfloat16 and eng._lean_eligible()
    gens = eng.generate(rows, p)
    # the engine's own attention rounds the scores to bfloat16 before the softmax (SDPA keeps them in
    # float32, as HF's SDPA does): more near-ties go the other way
    least = 0.8 if attention == "sdpa" else 0.6
    assert same_up_to_ties(model, rows, [g.token_ids for g in gens], hf_greedy_bf16(model, tok, rows, 12)) >= least
    full = [prefix + r for r in rows]
    got = [g.token_ids for g in eng.generate(rows, p, prefix=prefix)]
    assert same_up_to_ties(model, full, got, hf_greedy_bf16(model, tok, full, 12)) >= least
    assert eng._prefix and all(k.dtype == torch.bfloat16 for kv in next(iter(eng._prefix.values())) for k in kv)
    # bfloat16 logits (as autocast gives them) are rounded to ~0.03 at these magnitudes
    diff = torch.cat([torch.tensor(g.logprobs) - full_logprobs_bf16(model, prompt, g.token_ids)
                      for g, prompt in zip(gens, rows)]).abs()
    assert diff.max() < 0.1 and diff.mean() < 0.02
    # stops and compaction: rows end where the engine's own uncut bfloat16 tokens say
    rows = rows[:8]
    ref = [g.token_ids for g in eng.generate(rows, SamplingParams(temperature=0.0, max_new_tokens=24))]
    params = [SamplingParams(temperature=0.0, max_new_tokens=24, stop=(stop_from(tok, r, 2 + i, cut=i % 2),))
              for i, r in enumerate(ref)]
    gens = Engine(model, tok, dtype="bfloat16", decode_attention=attention, compact_fraction=0.0,
                  eos_token_ids=()).generate(rows, params)
    stopped = 0
    for g, r, sp in zip(gens, ref, params):
        want, why = expected_cut(tok, r, sp, set())
        assert g.token_ids == want and g.finish_reason == why
        stopped += why == "stop"
    assert stopped >= 3


@pytest.mark.parametrize("attention", ["sdpa", "own"])
def test_bfloat16_linears_over_a_float32_cache(lm, monkeypatch, attention):
    """The mixed plan (bfloat16 linears, float32 KV cache and attention: what cpu_plan picks where
    bfloat16 GEMMs are fast and bfloat16 attention is slow) keeps HF's greedy tokens under bfloat16
    autocast up to near-ties, with a cached prefix, and its log-probs within bfloat16 rounding."""
    model, tok = lm
    monkeypatch.setattr(engine_mod, "_PLANS", {})
    monkeypatch.setenv("DREAMGYM_CPU_PLAN", f"bfloat16/auto/{attention}/float32")
    rows = prompts(tok, lens=[3 + (7 * i) % 29 for i in range(20)], seed=5)
    prefix = [tok.bos_token_id] + prompts(tok, lens=(6,), seed=2)[0]
    p = SamplingParams(temperature=0.0, max_new_tokens=12)
    eng = engine_mod.Engine(model, tok, eos_token_ids=())          # every choice "auto": the pinned plan
    assert eng.compute_dtype() == torch.bfloat16 and eng._lean_eligible()
    gens = eng.generate(rows, p)
    assert eng._run_plan.cache_dtype == torch.float32 and "cache and attention float32" in eng._run_plan.describe()
    # HF under autocast runs its attention in bfloat16, this plan in float32: some near-ties go the other way
    assert same_up_to_ties(model, rows, [g.token_ids for g in gens], hf_greedy_bf16(model, tok, rows, 12)) >= 0.6
    full = [prefix + r for r in rows]
    got = [g.token_ids for g in eng.generate(rows, p, prefix=prefix)]
    assert same_up_to_ties(model, full, got, hf_greedy_bf16(model, tok, full, 12)) >= 0.6
    assert eng._prefix and all(k.dtype == torch.float32 for kv in next(iter(eng._prefix.values())) for k in kv)
    diff = torch.cat([torch.tensor(g.logprobs) - full_logprobs_bf16(model, prompt, g.token_ids)
                      for g, prompt in zip(gens, rows)]).abs()
    assert diff.max() < 0.1 and diff.mean() < 0.02


@pytest.mark.parametrize("attention", ["sdpa", "own"])
def test_bfloat16_model_matches_hf(tiny, monkeypatch, attention):
    """A model loaded in bfloat16 runs the lean forward in its own dtype (auto), its cache too (pinned,
    with each decode attention: a float32 cache is a plan of its own, tested above): HF's greedy tokens
    up to near-ties (the engine's own attention rounds the scores to bfloat16 before the softmax, SDPA
    does not: more near-ties go the other way)."""
    monkeypatch.setattr(engine_mod, "_PLANS", {})
    monkeypatch.setenv("DREAMGYM_CPU_PLAN", f"auto/auto/{attention}/bfloat16")
    model, tok = models.load_model(tiny, models.ModelSpec(dtype="bfloat16"), device="cpu")
    model = _scale(model)
    rows = prompts(tok, lens=[3 + (7 * i) % 29 for i in range(12)], seed=7)
    eng = engine_mod.Engine(model, tok, eos_token_ids=())
    assert eng.compute_dtype() == torch.bfloat16 and eng._lean_eligible()
    gens = eng.generate(rows, SamplingParams(temperature=0.0, max_new_tokens=10))
    assert eng._run_plan.attention == attention and eng._run_plan.cache_dtype == torch.bfloat16
    least = 0.8 if attention == "sdpa" else 0.6
    assert same_up_to_ties(model, rows, [g.token_ids for g in gens], hf_greedy(model, tok, rows, 10)) >= least


def test_default_engine_matches_hf_in_its_compute_dtype(lm):
    """What the product runs (every choice "auto", decided by this CPU's probe) gives HF's greedy
    tokens in the dtype the engine reports."""
    model, tok = lm
    rows = prompts(tok, lens=[3 + (5 * i) % 31 for i in range(24)], seed=12)
    eng = engine_mod.Engine(model, tok, eos_token_ids=())
    gens = eng.generate(rows, SamplingParams(temperature=0.0, max_new_tokens=10))
    if eng.compute_dtype() == torch.bfloat16:        # HF under autocast: bfloat16 attention (a float32 cache: not)
        least = 0.8 if eng._run_plan.cache_dtype == torch.bfloat16 else 0.6
        assert same_up_to_ties(model, rows, [g.token_ids for g in gens], hf_greedy_bf16(model, tok, rows, 10)) >= least
    else:
        assert [g.token_ids for g in gens] == hf_greedy(model, tok, rows, 10)
    assert eng.compute_dtype() in (torch.float32, torch.bfloat16)
    if not engine_mod.bf16_native():
        assert eng.compute_dtype() == torch.float32


def test_lean_path_only_for_plain_layers(lm):
    """Hooks or replaced forwards anywhere in the layers send the call through the modules (which run
    them); the lean weights are rebuilt when the weights change and kept otherwise."""
    model, tok = lm
    eng = Engine(model, tok, eos_token_ids=())
    assert eng._lean_eligible()
    seen = []
    hook = model.model.layers[1].mlp.register_forward_hook(lambda *a: seen.append(1))
    assert not eng._lean_eligible()
    eng.generate(prompts(tok, lens=(4, 6)), SamplingParams(temperature=0.0, max_new_tokens=2))
    hook.remove()
    assert seen and eng._lean_eligible()
    p = SamplingParams(temperature=0.0, max_new_tokens=3)
    eng.generate(prompts(tok, lens=(4, 6)), p)
    built = eng._lean_cached[1]
    eng.generate(prompts(tok, lens=(5,)), p)
    assert eng._lean_cached[1] is built                             # same weights: kept
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    after = eng.generate(prompts(tok, lens=(4, 6)), p)
    assert eng._lean_cached[1] is not built
    assert [g.token_ids for g in after] == [g.token_ids for g in Engine(model, tok, eos_token_ids=(), lean=False)
                                            .generate(prompts(tok, lens=(4, 6)), p)]


def _cfg(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(**{**dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128), **kw})


def test_cpu_plan_decides_by_measurement(monkeypatch):
    """Each choice goes to the candidate measured fastest (oneDNN and the engine's own attention only
    with CHOICE_MARGIN to spare); bfloat16 only with BF16_MARGIN to spare and only where the CPU
    computes it natively; forced choices are not measured; plans are cached."""
    cfg = _cfg()
    monkeypatch.setattr(engine_mod, "_PLANS", {})
    monkeypatch.setattr(engine_mod, "bf16_native", lambda: True)
    monkeypatch.setattr(engine_mod, "_onednn_ok", lambda: True)
    fake = {}

    def timings(fns, rounds=5):
        return {k: fake[k] for k in fns}
    monkeypatch.setattr(engine_mod, "_min_ms", timings)
    f32, bf16 = torch.float32, torch.bfloat16
    fake.update({(f32, "linear", False): 1.0, (f32, "linear", True): 0.6, (f32, "attention", "own"): 2.0,
                 (f32, "attention", "sdpa"): 3.0, (bf16, "linear", False): 0.5, (bf16, "linear", True): 0.4,
                 (bf16, "attention", "own"): 1.5, (bf16, "attention", "sdpa"): 1.2})
    plan = engine_mod.cpu_plan(cfg, 8)
    assert (plan.dtype, plan.onednn, plan.attention) == (bf16, True, "sdpa")    # 1.6 ms vs 2.6 ms
    assert engine_mod.cpu_plan(cfg, 8) is plan and len(plan.ms) == 8 and "bfloat16" in plan.describe()
    fake[(bf16, "attention", "sdpa")] = fake[(bf16, "attention", "own")] = 1.9   # 2.3 vs 2.6: within the margin
    assert engine_mod.cpu_plan(cfg, 16).dtype == f32
    assert engine_mod.cpu_plan(cfg, 16).attention == "own" and engine_mod.cpu_plan(cfg, 16).onednn
    monkeypatch.setattr(engine_mod, "bf16_native", lambda: False)              # e.g. an AVX2-only CPU
    assert engine_mod.cpu_plan(cfg, 32).dtype == f32
    fake[(f32, "attention", "own")], fake[(f32, "linear", True)] = 2.9, 0.95  # near-equal: the defaults stay
    assert (engine_mod.cpu_plan(cfg, 33).attention, engine_mod.cpu_plan(cfg, 33).onednn) == ("sdpa", False)
    # bfloat16 GEMMs fast, bfloat16 attention slow (AVX512-BF16 without AMX): bfloat16 linears over a
    # float32 cache (0.4 + 1.0 ms against 1.0 + 1.0 in float32 and 0.4 + 3.0 in bfloat16), no mixed plan
    # within the margin, and none asked for once a dtype is requested
    monkeypatch.setattr(engine_mod, "bf16_native", lambda: True)
    fake.update({(f32, "linear", True): 1.6, (f32, "attention", "own"): 1.0,
                 (bf16, "attention", "own"): 3.0, (bf16, "attention", "sdpa"): 3.5})
    mixed = engine_mod.cpu_plan(cfg, 64)
    assert (mixed.dtype, mixed.cache_dtype, mixed.onednn, mixed.attention) == (bf16, f32, True, "own")
    assert "cache and attention float32" in mixed.describe() and len(mixed.ms) == 8
    assert engine_mod.cpu_plan(cfg, 64, dtype="bfloat16").cache_dtype == bf16
    assert engine_mod.cpu_plan(cfg, 64, kv="bfloat16").kv is None
    fake[(bf16, "attention", "own")] = 1.05                 # 1.45 vs 1.4 ms: within the margin, the cache stays bf16
    assert engine_mod.cpu_plan(cfg, 65).kv is None
    forced = engine_mod.cpu_plan(cfg, 8, dtype="bfloat16", onednn=False, attention="own")
    assert (forced.dtype, forced.onednn, forced.attention, forced.ms) == (bf16, False, "own", ())
    # a bfloat16 model: its own dtype, no float32 candidate
    assert engine_mod.cpu_plan(cfg, 8, weight_dtype=bf16, onednn=True, attention="sdpa").dtype == bf16


def test_cpu_plan_pinned_by_the_environment(monkeypatch):
    """$DREAMGYM_CPU_PLAN fixes what "auto" would measure (runs comparable whatever the load); its "auto"
    parts stay measured, explicit requests win, and a malformed value is one clear error."""
    cfg = _cfg()
    monkeypatch.setattr(engine_mod, "_PLANS", {})
    monkeypatch.setattr(engine_mod, "bf16_native", lambda: True)
    monkeypatch.setattr(engine_mod, "_onednn_ok", lambda: True)
    measured = []

    def timings(fns, rounds=5):
        measured.append(sorted(map(str, fns)))
        return {k: 1.0 for k in fns}
    monkeypatch.setattr(engine_mod, "_min_ms", timings)
    monkeypatch.setenv("DREAMGYM_CPU_PLAN", "bfloat16/torch/sdpa")
    plan = engine_mod.cpu_plan(cfg, 8)
    assert (plan.dtype, plan.onednn, plan.attention, plan.ms) == (torch.bfloat16, False, "sdpa", ())
    assert not measured
    assert engine_mod.cpu_plan(cfg, 8, dtype="float32").dtype == torch.float32
    monkeypatch.setenv("DREAMGYM_CPU_PLAN", "float32/oneDNN/auto")
    plan = engine_mod.cpu_plan(cfg, 9)
    assert (plan.dtype, plan.onednn) == (torch.float32, True) and len(measured) == 1
    assert {k for k, _ in plan.ms} == {"float32/linear/oneDNN", "float32/attention/own", "float32/attention/sdpa"}
    monkeypatch.setenv("DREAMGYM_CPU_PLAN", "bfloat16/torch/sdpa/float32")
    plan = engine_mod.cpu_plan(cfg, 11)
    assert (plan.dtype, plan.cache_dtype, plan.ms) == (torch.bfloat16, torch.float32, ())
    monkeypatch.setenv("DREAMGYM_CPU_PLAN", "bf16")
    with pytest.raises(ValueError, match="DREAMGYM_CPU_PLAN"):
        engine_mod.cpu_plan(cfg, 10)


def test_cpu_plan_real_probe_and_fallbacks(monkeypatch):
    """The real probe on this CPU returns a usable plan; without oneDNN it picks F.linear; a candidate
    that raises is skipped with a warning."""
    cfg = _cfg()
    monkeypatch.setattr(engine_mod, "_PLANS", {})
    plan = engine_mod.cpu_plan(cfg, 8)
    assert plan.ms and plan.attention in ("own", "sdpa") and plan.dtype in (torch.float32, torch.bfloat16)
    monkeypatch.setattr(engine_mod, "_ONEDNN", {"ok": False})
    assert engine_mod.cpu_plan(cfg, 9).onednn is False

    def boom(*a, **k):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(engine_mod.F, "scaled_dot_product_attention", boom)
    with pytest.warns(UserWarning, match="failed in the CPU probe"):
        assert engine_mod.cpu_plan(cfg, 10, dtype="float32").attention == "own"


# ----------------------------------------------------------------------------- training precision
def test_train_dtype_requests_and_auto(lm, monkeypatch):
    model, _ = lm
    assert engine_mod.train_dtype(model, "float32") is None
    assert engine_mod.train_dtype(model, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError):
        engine_mod.train_dtype(model, "fp8")
    monkeypatch.setattr(engine_mod, "_TRAIN", {})
    monkeypatch.setattr(engine_mod, "bf16_native", lambda: False)         # e.g. an AVX2-only CPU
    assert engine_mod.train_dtype(model, "auto") is None and not engine_mod._TRAIN
    monkeypatch.setattr(engine_mod, "bf16_native", lambda: True)
    monkeypatch.setattr(engine_mod, "_min_ms", lambda fns, rounds=3: {"float32": 10.0, "bfloat16": 9.0})
    assert engine_mod.train_dtype(model, "auto") is None                  # faster, but within the margin
    monkeypatch.setattr(engine_mod, "_TRAIN", {})
    monkeypatch.setattr(engine_mod, "_min_ms", lambda fns, rounds=3: {"float32": 10.0, "bfloat16": 4.0})
    assert engine_mod.train_dtype(model, "auto") == torch.bfloat16
    assert isinstance(engine_mod.train_autocast(model, "auto"), torch.autocast)
    model.to(torch.bfloat16)                                             # trains in its own dtype
    try:
        assert engine_mod.train_dtype(model, "bfloat16") is None
    finally:
        model.to(torch.float32)


def test_autocast_forward_keeps_logprobs_float32(lm):
    """Under the training autocast the decoder runs in bfloat16 but the fused LM-head log-probs are
    float32 from the float32 head (equal to the head applied by hand in float32 to the same hidden
    states), close to the float32 forward's; gradients reach the float32 master weights."""
    import dreamgym as dg
    from kernels.logprobs import linear_logprobs_ref
    model, tok = lm
    seqs = [(p, p[:5]) for p in prompts(tok, lens=(12, 20, 7), seed=3)]
    batch = dg.pack(seqs, tok.pad_token_id, "cpu")
    model.train()
    ref, _, _ = dg.response_logprobs(model, batch)
    with engine_mod.train_autocast(model, "bfloat16"):
        logp, ent, _ = dg.response_logprobs(model, batch)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert logp.dtype == ent.dtype == torch.float32 and hidden.dtype == torch.float32
    by_hand, _ = linear_logprobs_ref(hidden.reshape(-1, hidden.shape[-1])[batch["target_pos"]].detach(),
                                     model.lm_head.weight.detach(), batch["targets"])
    assert torch.allclose(logp.detach(), by_hand, atol=1e-5)
    assert not torch.equal(logp, ref) and torch.allclose(logp, ref, atol=0.1)
    (-logp.mean()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("dora", [False, True])
def test_lora_adapters_folded_into_the_lean_weights(tiny, dora):
    """A LoRA model (float32 base, non-zero adapters) runs the lean forward with W + scale * B @ A per
    layer: HF's greedy tokens and a full forward's log-probs; a changed adapter (an RL step) rebuilds
    the lean weights. DoRA is not folded: those layers go through their modules."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    model, tok = models.load_model(tiny, device="cpu")
    model = get_peft_model(_scale(model), LoraConfig(r=4, lora_alpha=8, use_dora=dora, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    rows = prompts(tok, lens=(5, 17, 1, 30, 9, 12))
    p = SamplingParams(temperature=0.0, max_new_tokens=8)
    eng = Engine(model, tok, eos_token_ids=())
    assert eng._lean_eligible() == (not dora)
    gens = eng.generate(rows, p)
    assert [g.token_ids for g in gens] == hf_greedy(model, tok, rows, 8)
    for g, prompt in zip(gens, rows):
        assert torch.allclose(torch.tensor(g.logprobs), full_logprobs(model, prompt, g.token_ids), atol=1e-4)
    with torch.no_grad():
        next(w for n, w in model.named_parameters() if "lora_A" in n).mul_(-2.0)
    assert [g.token_ids for g in eng.generate(rows, p)] == hf_greedy(model, tok, rows, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norm_and_rope_are_the_modules_bitwise(dtype):
    """_rms and _rope compute exactly what LlamaRMSNorm and apply_rotary_pos_emb compute (float32
    residual stream / bfloat16 model; q and k as strided views of a fused QKV output, as the lean forward
    passes them), so that greedy tokens can match HF's."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(3, 7, 48, generator=g) * 3).to(dtype)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g) + 0.5)
        assert torch.equal(engine_mod._rms(h, norm.weight, norm.variance_epsilon), norm(h))
    qkv = torch.randn(3, 7, 5, 16, generator=g).to(dtype)                     # [B, T, heads, D]: 2 q, 1 k, 2 v
    cos, sin = torch.randn(3, 7, 16, generator=g).to(dtype), torch.randn(3, 7, 16, generator=g).to(dtype)
    if dtype == torch.bfloat16:                                              # a float32 model under autocast: float32
        cos, sin = cos.float(), sin.float()
    q_ref, k_ref = apply_rotary_pos_emb(qkv[:, :, :2].transpose(1, 2), qkv[:, :, 2:3].transpose(1, 2), cos, sin)
    both = engine_mod._rope(qkv[:, :, :3], cos[:, :, None], sin[:, :, None])
    assert torch.equal(both[:, :, :2].transpose(1, 2), q_ref) and torch.equal(both[:, :, 2:].transpose(1, 2), k_ref)
