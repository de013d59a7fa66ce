"""Training-step throughput: ours (the forward under engine.train_autocast, as train.py runs it) against
PyTorch's default (float32 eager, no autocast), on the same model, batch and optimizer.

    python bench/train.py                        # tiny model (the main job's), SFT + policy-update step, CPU
    python bench/train.py --threads 2 --repeats 7
    python bench/train.py --smollm2 ""           # without SmolLM2-135M + LoRA (models' smollm2-135m, or a folder)

1. SFT step (train.sft's inner step): dg.response_logprobs on a packed batch (`--sft-rows` rows of
   `--prompt` prompt + `--target` target tokens, the M_exp SFT's micro-batch at the defaults),
   loss on the target tokens, backward, gradient clip, AdamW step.
2. policy-update step (train.update_policy's inner step): the agent's log-probs of its response tokens
   at the rollout temperature, the reference model's (no grad, KL term), dg.policy_loss against
   old log-probs, backward, clip, AdamW step (`--rl-rows` turns of `--rl-prompt` + `--rl-response`).
Runs alternate default/ours (A, B, A, B, ...); tokens/s = batch tokens / median wall time of a step
(the process-time ratio is printed too: steadier on a shared machine). What "ours" runs is decided by
engine.train_dtype("auto") on this CPU and printed (bfloat16 autocast where the CPU has AMX /
AVX512-BF16 and it measured faster; otherwise the same as the default, ratio ~1). SmolLM2 + LoRA is
loaded twice: float32 weights for the default, and as train.py loads it for ours (models.load_model's
dtype auto: bfloat16 base weights under float32 adapters on a CPU with native bfloat16).
Ends with `train_speedup_vs_torch_default: X`: the tiny model's (the main job's) SFT step and
policy-update step together, (default SFT + default update) / (ours SFT + ours update), median times.
"""
from __future__ import annotations

import os

# Benchmarks run offline: a model this tree cannot find locally is skipped at once instead of being
# retried against the hub (HF_HUB_OFFLINE=0 lets a loader download it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # before bench/ (kernels.py)
import dreamgym as dg  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402
from rollout import corpus, cpu_name  # noqa: E402


def batches(tok, rows, prompt, target, seed):
    g = torch.Generator().manual_seed(seed)
    hi = len(tok)
    draw = lambda n: torch.randint(5, hi, (n,), generator=g).tolist()
    seqs = [(draw(prompt), draw(target)) for _ in range(rows)]
    return dg.pack(seqs, tok.pad_token_id, "cpu"), rows * (prompt + target)


def steps(model, ref, tok, a, seed=0):
    """(name, step(ctx), tokens per step) for the SFT step and the policy-update step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.98))
    sft_batch, sft_tokens = batches(tok, a.sft_rows, a.prompt, a.target, seed)
    rl_batch, rl_tokens = batches(tok, a.rl_rows, a.rl_prompt, a.rl_response, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    n = rl_batch["targets"].numel()
    old = -torch.rand(n, generator=g) * 3 - 2                     # sampler log-probs of the responses
    adv = torch.randn(n, generator=g)

    def finish(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sft(ctx):
        model.train()
        with ctx(model):
            logp, _, _ = dg.response_logprobs(model, sft_batch)
        finish(-logp.mean())

    def update(ctx):
        model.train()
        with ctx(model):
            logp, _, _ = dg.response_logprobs(model, rl_batch, 1.0)
        with torch.no_grad(), ctx(ref):
            ref_logp, _, _ = dg.response_logprobs(ref, rl_batch, 1.0)
        surr, _ = dg.policy_loss(logp, old, adv, 0.2, 0.28, ref_logp, 0.05)
        finish(surr.sum() / n)
    return [("sft", sft, sft_tokens), ("policy_update", update, rl_tokens)]


def measure(name, model, ref, tok, a, dtype_request, ours_models=None):
    """Prints tokens/s of each step for the default and ours; returns {step: (default s, ours s)} (medians).
    ours_models: (model, ref) as the product loads them when that differs from the float32 default
    (a LoRA model that models.load_model puts in bfloat16 on this CPU); else ours runs `model` too."""
    mine, mine_ref = ours_models or (model, ref)
    weights = str(next(mine.parameters()).dtype).replace("torch.", "")
    chosen = engine.train_dtype(mine, dtype_request)
    probe = engine._TRAIN.get((model.config.hidden_size, model.config.intermediate_size, torch.get_num_threads()))
    how = ("bfloat16 autocast over float32 weights" if chosen == torch.bfloat16 else
           f"{weights} weights, no autocast" + (" (the same as the default)" if mine is model else ""))
    print(f"== {name}: ours = {how}" + (f"; probe ms {probe['ms']}" if probe else ""))
    default = lambda m: contextlib.nullcontext()
    ours = lambda m: engine.train_autocast(m, dtype_request)
    ratios = {}
    base = steps(model, ref, tok, a)
    for (step, fn_default, tokens), (_, fn_ours, _) in zip(base, steps(mine, mine_ref, tok, a) if ours_models else base):
        fns = {"default": (fn_default, default), "ours": (fn_ours, ours)}
        for fn, ctx in fns.values():
            fn(ctx)                                               # warm-up: allocator, kernels, autocast caches
        wall, cpu = {"default": [], "ours": []}, {"default": [], "ours": []}
        for _ in range(a.repeats):
            for k, (fn, ctx) in fns.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn(ctx)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        med = {k: statistics.median(v) for k, v in wall.items()}
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        ratios[step] = (med["default"], med["ours"])
        print(f"{step} tokens/s torch default (float32 eager): {tokens / med['default']:9.1f}  "
              f"(runs {', '.join(f'{t:.2f}' for t in wall['default'])} s)")
        runs = ", ".join(f"{t:.2f}" for t in wall["ours"])
        print(f"{step} tokens/s ours: {tokens / med['ours']:9.1f}  (runs {runs} s)")
        print(f"{step} speedup: {med['default'] / med['ours']:.2f} "
              f"(cpu-time ratio {cmed['default'] / cmed['ours']:.2f})")
    return ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sft-rows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=192)
    ap.add_argument("--target", type=int, default=64)
    ap.add_argument("--rl-rows", type=int, default=32)
    ap.add_argument("--rl-prompt", type=int, default=200)
    ap.add_argument("--rl-response", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="auto", choices=engine.TRAIN_DTYPES, help="what ours runs (train_dtype)")
    ap.add_argument("--smollm2", default="smollm2-135m", help="also SmolLM2-135M with LoRA r=16: the name "
                    "models.load_model knows it by, or a converted folder ('' = skip; skipped, saying why, where it "
                    "cannot be loaded)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"cpu: {cpu_name()} (bfloat16 native: {engine.bf16_native()}, torch {torch.__version__}) "
          f"threads {a.threads}")
    with tempfile.TemporaryDirectory() as root:
        models.train_tokenizer(corpus(), f"{root}/tok", vocab_size=2048)
        models.create_tiny(f"{root}/m", f"{root}/tok", preset=a.preset, seed=0, max_len=2048)
        model, tok = models.load_model(f"{root}/m", device="cpu", trainable=True)
        ref, _ = models.load_model(f"{root}/m", device="cpu", trainable=False)
        print(f"sft batch {a.sft_rows} x ({a.prompt} + {a.target}) tokens, policy-update batch {a.rl_rows} x "
              f"({a.rl_prompt} + {a.rl_response}), {a.repeats} repeats, medians")
        tiny = measure(f"{a.preset} model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
                       f"float32 weights)", model, ref.eval(), tok, a, a.dtype)
    if a.smollm2:
        try:
            # the default: float32 weights; ours: as train.py loads it (dtype auto: bfloat16 base weights
            # under float32 adapters on a CPU with native bfloat16)
            f32 = models.ModelSpec(lora_r=16, dtype="float32")
            model, tok = models.load_model(a.smollm2, f32, device="cpu", trainable=True)
            ref, _ = models.load_model(a.smollm2, f32, device="cpu", trainable=False)
            auto = models.ModelSpec(lora_r=16)
            mine, _ = models.load_model(a.smollm2, auto, device="cpu", trainable=True)
            ours = None
            if next(mine.parameters()).dtype != torch.float32:
                ours = (mine, models.load_model(a.smollm2, auto, device="cpu", trainable=False)[0].eval())
            else:
                del mine
        except Exception as e:          # noqa: BLE001 - e.g. no such preset in this tree, or no weights offline
            print(f"== {a.smollm2}: skipped, models.load_model cannot load it here "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        else:
            # 135M parameters: a quarter of the rows, at most 3 repeats
            small = argparse.Namespace(**{**vars(a), "sft_rows": max(1, a.sft_rows // 4),
                                          "rl_rows": max(1, a.rl_rows // 4), "repeats": min(a.repeats, 3)})
            print(f"sft batch {small.sft_rows} x ({a.prompt} + {a.target}), policy-update batch {small.rl_rows} x "
                  f"({a.rl_prompt} + {a.rl_response}), {small.repeats} repeats")
            measure(f"{os.path.basename(a.smollm2.rstrip('/'))} + LoRA r=16", model, ref.eval(), tok, small, a.dtype,
                    ours_models=ours)
    default, ours = (sum(t[i] for t in tiny.values()) for i in (0, 1))
    print(f"train_speedup_vs_torch_default: {default / ours:.2f}")


if __name__ == "__main__":
    main()
