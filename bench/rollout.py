"""Rollout throughput: engine.Engine vs transformers' generate() on the same model, prompts and settings.

    python bench/rollout.py                      # spec config: tiny, batch 64, prompt 256, 64 new, CPU
    python bench/rollout.py --threads 2 --prefix 64
    python bench/rollout.py --device cuda --preset qwen0.5b
    python bench/rollout.py --run runs/default   # + the main job's dreamed episodes, end to end
    python bench/rollout.py --model PATH --lora 16 --batch 32 --new 32 --no-dream   # a real model (SmolLM2-135M)

1. decode: greedy, no stop strings, EOS an ordinary token for both (eos_token_id=None for HF), so both produce
   batch x new tokens; same threads. The engine computes in the dtype its CPU plan chose (`--dtype
   auto`: bfloat16 for a float32 model where the CPU has AMX / AVX512-BF16 and it measured faster;
   see engine.cpu_plan, printed first). HF runs its normal generate (use_cache=True) on the model as
   loaded (float32), and, when the engine's dtype differs, also under bfloat16 autocast (the same
   numerics as the engine's bfloat16 path): the greedy rows are compared with HF in the engine's
   dtype, and both ratios are printed (`speedup_vs_hf_generate_same_dtype`, and the last line, against
   HF on the model as loaded: what a transformers user gets). With --prefix N every row starts with
   the same N tokens: the engine gets them as its shared prefix, HF gets them inside each prompt. Runs
   are interleaved (engine, HF, ...); ratios use medians of wall time (on CPU the process-time ratio is
   printed too: steadier on a machine shared with other jobs; so are the engine in float32 and the
   engine without oneDNN linears, to show where the ratio comes from).
2. dream step: one agent turn (T=1 sampling, stop "</action>", 48 new tokens) and one
   experience-model turn (greedy, stop dreamgym.EXP_STOP, 96 new tokens) for B episodes through
   dreamgym.LocalLM, on two random tiny models, against the same LocalLMs with HFBackend (transformers'
   generate) in place of the engine (sampler log-probs from output_logits, stop_strings for stops).
3. with --run DIR (a finished train.py run): its dreamed episodes end to end, the trained agent
   (greedy) against the trained M_exp with retrieval from the run's replay buffer, through DreamEnv
   and dg.run_episodes as train.py dreams, the engine against HFBackend: agent turns per second, and whether the episodes are identical.
Ends with `speedup_vs_hf_generate: X`.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
from engine import Engine, Generation, SamplingParams  # noqa: E402

SYLLABLES = "ka lo mi ne ru ta so fi be do ga he ji ku ly mo nu pi qa ri su ve wo xi za".split()


def corpus(n=3000, seed=0):
    rnd = random.Random(seed)
    words = ["".join(rnd.choice(SYLLABLES) for _ in range(rnd.randint(1, 4))) for _ in range(4000)]
    return [" ".join(rnd.choice(words) for _ in range(30)) + " <action> go </action> <state> x </state>"
            for _ in range(n)]


def tiny_models(root, preset, n=1):
    """The project's own path: BPE (2048) trained on text, random tiny Llamas saved + reloaded."""
    models.train_tokenizer(corpus(), f"{root}/tok", vocab_size=2048)
    out = []
    for seed in range(n):
        models.create_tiny(f"{root}/m{seed}", f"{root}/tok", preset=preset, seed=seed, max_len=2048)
        model, tok = models.load_model(f"{root}/m{seed}", device=DEVICE, trainable=False)
        out.append((model.eval(), tok))
    return out


def qwen05b(root):
    """A random model of Qwen2-0.5B's shape, from a config (no hub), bf16."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    models.train_tokenizer(corpus(), f"{root}/tok", vocab_size=2048)
    tok = AutoTokenizer.from_pretrained(f"{root}/tok")
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1e6, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=DEVICE, dtype=torch.bfloat16).eval(), tok


def left_pad(rows, pad):
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


CPU_TIMES = {}


def timed(fn, key=None):
    """Wall seconds and the result; with `key`, the process CPU time is also kept in CPU_TIMES[key]
    (on a shared CPU machine it is far less noisy than wall time: other jobs' slices don't count)."""
    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    sync()
    if key:
        CPU_TIMES.setdefault(key, []).append(time.process_time() - c0)
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------- 1. decode throughput
def dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def tie_gaps(model, prompts, got, ref) -> list[tuple[float, float]]:
    """For each row where `got` and `ref` differ: (|logit gap| between the two tokens at the first
    difference, the larger of the two logits), by the model's own forward in its dtype."""
    out = []
    for prompt, a, b in zip(prompts, got, ref):
        if a == b:
            continue
        j = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + b[:j]], device=DEVICE)).logits[0, -1].float()
        out.append((abs(logits[a[j]] - logits[b[j]]).item(), max(logits[a[j]].item(), logits[b[j]].item())))
    return out


def bench_decode(model, tok, a):
    g = torch.Generator().manual_seed(0)
    hi = min(len(tok), model.config.vocab_size)
    prefix = torch.randint(5, hi, (a.prefix,), generator=g).tolist()
    prompts = [torch.randint(5, hi, (a.prompt,), generator=g).tolist() for _ in range(a.batch)]
    eng = Engine(model, tok, max_batch=a.batch, eos_token_ids=(), dtype=a.dtype)
    cdt, mdt = eng.compute_dtype(), model.dtype
    plain = Engine(model, tok, max_batch=a.batch, eos_token_ids=(), onednn_linear=False, dtype=dtype_name(cdt))
    eng32 = Engine(model, tok, max_batch=a.batch, eos_token_ids=(), dtype="float32") if cdt != mdt else None
    params = SamplingParams(temperature=0.0, max_new_tokens=a.new)
    ids, mask = left_pad([prefix + p for p in prompts], tok.pad_token_id)

    def run_hf(autocast=False):
        # autocast: HF computing in the engine's dtype (bfloat16 linears and attention, as the engine's
        # bfloat16 path computes a float32 model)
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=cdt, enabled=autocast):
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=a.new,
                                  min_new_tokens=a.new, eos_token_id=None, use_cache=True,
                                  pad_token_id=tok.pad_token_id)

    runs = {"engine": lambda: eng.generate(prompts, params, prefix=prefix or None), "hf": run_hf}
    if cdt != mdt:
        runs["hf_same"] = lambda: run_hf(autocast=True)
        runs["engine32"] = lambda: eng32.generate(prompts, params, prefix=prefix or None)
    if DEVICE.type == "cpu":
        runs["engine_plain"] = lambda: plain.generate(prompts, params, prefix=prefix or None)
    with torch.no_grad():                                    # warm-up: allocator, kernels, caches
        model.generate(input_ids=ids[:2, -8:], attention_mask=mask[:2, -8:], do_sample=False, max_new_tokens=2,
                       pad_token_id=tok.pad_token_id)
    for e in (eng, plain, eng32):
        if e is not None:
            e.generate([p[:8] for p in prompts[:2]], SamplingParams(temperature=0.0, max_new_tokens=2))
    times, outs = {k: [] for k in runs}, {}
    for _ in range(a.repeats):                               # interleaved: A, B, C, A, B, C, ...
        for k, fn in runs.items():
            t, outs[k] = timed(fn, k)
            times[k].append(t)
    n = a.batch * a.new
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = lambda k: f"{n / med[k]:9.1f} tok/s  (runs {', '.join(f'{t:.2f}' for t in times[k])} s)"
    tokens = lambda k: [x.token_ids for x in outs[k]] if k.startswith("engine") else \
        [r[ids.shape[1]:] for r in outs[k].tolist()]
    same = lambda x, y: sum(p == q for p, q in zip(tokens(x), tokens(y))) / a.batch
    assert all(len(x) == a.new for k in outs for x in tokens(k))
    ref = "hf_same" if cdt != mdt else "hf"
    print(f"engine ({dtype_name(cdt)} compute): {rate('engine')}")
    print(f"hf generate ({dtype_name(mdt)}, the model as loaded): {rate('hf')}")
    if cdt != mdt:
        print(f"hf generate ({dtype_name(cdt)} autocast, the engine's compute dtype): {rate('hf_same')}")
    print(f"greedy rows identical to hf: {same('engine', ref):.0%} (engine {dtype_name(cdt)} vs hf "
          f"{dtype_name(cdt)}{' autocast' if cdt != mdt else ''})")
    if same("engine", ref) < 1:
        gaps = tie_gaps(model, [prefix + p for p in prompts], tokens("engine"), tokens(ref))
        print(f"differing rows: {len(gaps)}, each first differs where the two tokens' {dtype_name(mdt)} logits are "
              f"{max(g for g, _ in gaps):.3f} apart at most (at logits up to {max(x for _, x in gaps):.1f}): "
              f"near-ties that any two {dtype_name(cdt)} computations may order either way")
    if cdt != mdt:
        print(f"greedy rows identical to hf {dtype_name(mdt)}: {same('engine', 'hf'):.0%} (informative: "
              f"{dtype_name(cdt)} vs {dtype_name(mdt)} rounding)")
        print(f"engine in {dtype_name(mdt)}: {n / med['engine32']:9.1f} tok/s, {med['hf'] / med['engine32']:.2f}x "
              f"hf generate {dtype_name(mdt)}, greedy rows identical to it: {same('engine32', 'hf'):.0%} (informative)")
    if "engine_plain" in med:          # how much of the ratio is oneDNN's GEMM (see engine.cpu_plan)
        tp = med["engine_plain"]
        print(f"engine without oneDNN linears: {n / tp:9.1f} tok/s, {med['hf'] / tp:.2f}x hf generate (informative)")
    if DEVICE.type == "cpu":        # informative only: the ratios below are wall-time ones
        ce, ch = statistics.median(CPU_TIMES["engine"]), statistics.median(CPU_TIMES["hf"])
        print(f"cpu-time ratio vs hf {dtype_name(mdt)} (process_time, medians {ce:.2f} s vs {ch:.2f} s): {ch / ce:.2f}")
    same_dtype = med[ref] / med["engine"]
    print(f"speedup_vs_hf_generate_same_dtype: {same_dtype:.2f} (engine {dtype_name(cdt)} vs hf {dtype_name(cdt)}"
          f"{' autocast' if cdt != mdt else ''})")
    return med["hf"] / med["engine"]


# ----------------------------------------------------------------------------- 2. dream step
def user_texts(tok, n, length, seed):
    rnd = random.Random(seed)
    words = corpus(200, seed)
    out = []
    for _ in range(n):
        text = ""
        while len(tok(text, add_special_tokens=False)["input_ids"]) < length:
            text += rnd.choice(words) + "\n"
        out.append(text)
    return out


class HFBackend:
    """Engine.generate's interface on transformers' generate(), so a LocalLM can swap its engine for
    it (same prompt ids): left-padded batch, single-token stops as extra EOS ids (the tiny tokenizer
    spells each tag with one token; HF's stop_strings cannot preprocess added tokens), longer ones as
    stop_strings; sampler log-probs from output_logits."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    def generate(self, prompts, params, prefix=None, generator=None):
        if isinstance(params, (list, tuple)):
            raise ValueError("HFBackend takes one SamplingParams per call")
        tok, rows = self.tok, [list(prefix or []) + list(p) for p in prompts]
        ids, mask = left_pad(rows, tok.pad_token_id)
        single = [tok(s, add_special_tokens=False)["input_ids"] for s in params.stop]
        eos = [tok.eos_token_id] + [t[0] for t in single if len(t) == 1]
        strings = [s for s, t in zip(params.stop, single) if len(t) > 1]
        sample = params.temperature > 0
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens,
                                      do_sample=sample, temperature=params.temperature if sample else None,
                                      top_k=0 if sample else None, top_p=1.0 if sample else None,
                                      eos_token_id=eos, stop_strings=strings or None, tokenizer=tok, use_cache=True,
                                      pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                                      output_logits=True)
        new = out.sequences[:, ids.shape[1]:]
        logits = torch.stack(out.logits, 1).float() / (params.temperature if sample else 1.0)
        logp = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0]
        gens = []
        for row, lp in zip(new.tolist(), logp.tolist()):
            n = next((j + 1 for j, t in enumerate(row) if t in eos), None)
            if n is None:                                   # a stop string ended it, or the length did
                n = len(row) - next((j for j, t in enumerate(reversed(row)) if t != tok.pad_token_id), len(row))
            text = tok.decode(row[:n], skip_special_tokens=True)
            ends = [text.find(s) + len(s) for s in params.stop if s in text]
            stopped = bool(ends) or (n and row[n - 1] in eos)
            gens.append(Generation(text=text[:min(ends)] if ends else text, token_ids=row[:n], logprobs=lp[:n],
                                   finish_reason="stop" if stopped else "length"))
        return gens


def bench_dream(a):
    import dreamgym as dg
    with tempfile.TemporaryDirectory() as root:
        (agent_m, tok), (exp_m, _) = tiny_models(root, "tiny", n=2)
        agent, exp_lm = dg.LocalLM(agent_m, tok, max_batch=a.batch), dg.LocalLM(exp_m, tok, max_batch=a.batch)
        hf_agent, hf_exp = dg.LocalLM(agent_m, tok), dg.LocalLM(exp_m, tok)
        hf_agent.engine, hf_exp.engine = HFBackend(agent_m, tok), HFBackend(exp_m, tok)
        agent.engine = Engine(agent_m, tok, max_batch=a.batch, dtype=a.dtype)
        exp_lm.engine = Engine(exp_m, tok, max_batch=a.batch, dtype=a.dtype)
        print(f"engine computes in {dtype_name(agent.engine.compute_dtype())}, "
              f"HF generate in {dtype_name(agent_m.dtype)}")
        users_a, users_e = user_texts(tok, a.batch, 200, 1), user_texts(tok, a.batch, 200, 2)
        pa = SamplingParams(temperature=1.0, max_new_tokens=48, stop=(dg.AGENT_STOP,))
        pe = SamplingParams(temperature=0.0, max_new_tokens=96, stop=(dg.EXP_STOP,))
        gen = torch.Generator(device=DEVICE).manual_seed(0)

        def engine_step():
            agent.generate(dg.AGENT_SYSTEM, users_a, pa, generator=gen)
            return exp_lm.generate(dg.EXP_SYSTEM, users_e, pe)

        def hf_step():
            hf_agent.generate(dg.AGENT_SYSTEM, users_a, pa)
            return hf_exp.generate(dg.EXP_SYSTEM, users_e, pe)

        hf_agent.generate(dg.AGENT_SYSTEM, users_a[:2], SamplingParams(temperature=0.0, max_new_tokens=2))
        agent.generate(dg.AGENT_SYSTEM, users_a[:2], SamplingParams(temperature=0.0, max_new_tokens=2))
        te, th = [], []
        for _ in range(a.repeats):
            te.append(timed(engine_step)[0])
            th.append(timed(hf_step)[0])
        e, h = statistics.median(te), statistics.median(th)
        print(f"dream_step_turns_per_s: {a.batch / e:.1f}")
        print(f"dream_step_turns_per_s_hf_generate: {a.batch / h:.1f}")
        print(f"dream_step_speedup_vs_hf_generate: {h / e:.2f}")


# ----------------------------------------------------------------------------- 3. end to end (a finished run)
def bench_run(a):
    """Dreamed episodes of a finished run: its warm-start agent (greedy, so both backends play the
    same episodes) against its M_exp with retrieval from its replay buffer, through DreamEnv and
    dg.run_episodes exactly as train.py dreams. Counts agent turns (each is one agent generation and,
    unless the action is invalid, one M_exp step with retrieval and parsing)."""
    import json

    import dreamgym as dg
    import envs
    import train
    cfg = train.Config(**json.load(open(os.path.join(a.run, "config.json"))))
    encoder = dg.Encoder() if cfg.retrieval else None
    buffer = dg.ReplayBuffer.load(os.path.join(a.run, "buffer"), encoder, cfg.buffer_capacity, attach=False) \
        if cfg.retrieval else None
    (agent_m, tok), (exp_m, etok) = (models.load_model(os.path.join(a.run, d), device=DEVICE, trainable=False)
                                     for d in ("agent_warm", "exp_model"))
    starts = {}
    for t in (buffer.items if buffer else []):
        if t.source == "real" and t.t == 0:
            starts.setdefault(t.task.id, dg.Task(env=t.task.env, fold=t.task.fold, seed=t.task.seed,
                                                 instruction=t.task.instruction, init_state=t.state))
    tasks = [starts[k] for k in sorted(starts)][:a.batch]
    if not tasks:
        sys.exit(f"--run {a.run}: no start states (they come from the run's replay buffer: a run with retrieval on)")
    params = SamplingParams(temperature=0.0, max_new_tokens=64, stop=(dg.AGENT_STOP,))
    runs, outcomes = {}, {}
    for rep in range(a.repeats):
        for name in ("engine", "hf"):
            agent, exp_lm = dg.LocalLM(agent_m, tok), dg.LocalLM(exp_m, etok)
            if name == "hf":
                agent.engine, exp_lm.engine = HFBackend(agent_m, tok), HFBackend(exp_m, etok)
            env = dg.DreamEnv(train.exp_model_of(cfg, exp_lm, buffer), envs.max_steps(cfg.env))
            t, eps = timed(lambda: dg.run_episodes(agent, env, tasks, params, cfg.history))
            runs.setdefault(name, []).append((t, sum(len(e.turns) for e in eps)))
            outcomes[name] = [(e.success, [tr.action for tr in e.transitions]) for e in eps]
    rate = {k: statistics.median(n / t for t, n in v) for k, v in runs.items()}
    same = sum(x == y for x, y in zip(outcomes["engine"], outcomes["hf"])) / len(tasks)
    print(f"{len(tasks)} dreamed episodes of {a.run}: {runs['engine'][0][1]} agent turns (engine), "
          f"{runs['hf'][0][1]} (hf); episodes identical: {same:.0%}")
    print(f"dream_episode_turns_per_s: {rate['engine']:.1f}")
    print(f"dream_episode_turns_per_s_hf_generate: {rate['hf']:.1f}")
    print(f"dream_episode_speedup_vs_hf_generate: {rate['engine'] / rate['hf']:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=0, help="shared prefix length (part of every prompt)")
    ap.add_argument("--preset", default="tiny", help="tiny | tiny-s | tiny-m | qwen0.5b (CUDA)")
    ap.add_argument("--model", default="", help="instead of a preset: a local HF folder or a name models.load_model "
                    "knows (e.g. a converted SmolLM2-135M)")
    ap.add_argument("--lora", type=int, default=0, help="with --model: LoRA adapters of this rank (non-zero)")
    ap.add_argument("--model-dtype", default="auto", help="with --model: the weights' dtype (ModelSpec.dtype)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="the engine's compute dtype (auto: measured per CPU, see engine.cpu_plan)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-dream", action="store_true", help="skip the dream-step section")
    ap.add_argument("--run", default="", help="a finished train.py run (e.g. runs/default): also time its "
                    "dreamed episodes end to end (its agent, M_exp and replay buffer)")
    a = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        if a.model:
            model, tok = models.load_model(a.model, models.ModelSpec(lora_r=a.lora, dtype=a.model_dtype), device=DEVICE,
                                           trainable=False)
            if a.lora:               # non-zero adapters, so that LoRA is really in the forward
                g = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if "lora_B" in n:
                            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            model.eval()
            a.preset = os.path.basename(a.model.rstrip("/")) + (f" + LoRA r={a.lora}" if a.lora else "")
        elif a.preset == "qwen0.5b":
            if DEVICE.type != "cuda":
                sys.exit("--preset qwen0.5b needs --device cuda")
            model, tok = qwen05b(root)
        else:
            (model, tok), = tiny_models(root, a.preset)
        print(f"device {DEVICE} threads {a.threads} preset {a.preset} dtype {model.dtype} "
              f"batch {a.batch} prompt {a.prompt} prefix {a.prefix} new {a.new}")
        if DEVICE.type == "cpu":
            import platform
            from engine import bf16_native, cpu_plan
            print(f"cpu: {cpu_name()} ({platform.machine()}, bfloat16 native: {bf16_native()}, "
                  f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()})")
            cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
            print("engine plan: " + cpu_plan(cfg, a.batch, model.dtype, a.dtype).describe())
        print("== decode (greedy, no stop)")
        speedup = bench_decode(model, tok, a)
    if not a.no_dream:
        print("== dream step (agent turn + experience-model turn, tiny models)")
        bench_dream(a)
    if a.run:
        print("== dreamed episodes end to end (a finished run's agent, M_exp, retrieval)")
        bench_run(a)
    print(f"speedup_vs_hf_generate: {speedup:.2f}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown"


DEVICE = torch.device("cpu")

if __name__ == "__main__":
    main()
