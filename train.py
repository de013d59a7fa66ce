"""DreamGym end to end: offline data -> experience model -> agent warm start -> RL -> evaluation.

    python train.py                          # the whole pipeline on the built-in env (CPU: ~11 min)
    python train.py --mode real              # the baseline: the same RL in the real environment
    python train.py --mode s2r               # sim-to-real: dream first, then a small real budget
    python train.py --algo ppo               # PPO with a value head and GAE over turns
    python train.py --iterations 60 --group_size 8 --taskgen_share 0.25 ...   # any Config field
    python train.py --resume --out runs/x    # continue a killed run exactly

Every hyperparameter is a field of `Config` below (cleanrl style) and can be overridden as
`--name value`. Stages cache their outputs in the run folder, so a rerun skips finished stages.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import sys
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import dreamgym as dg
import envs
from engine import TRAIN_DTYPES, pinned_plan, train_autocast, train_dtype
from envs import Task
from envs.collect import COLLECT_VERSION, POLICIES, collect, print_summary, read_jsonl, write_jsonl
from models import AdapterReference, ModelSpec, create_tiny, load_model, model_name_problem, save_model, train_tokenizer
from runtime import (DIST, Log, crash_point, device_of, exit_on_sigterm, fingerprint, format_table,
                     latest_checkpoint, load_agent_weights, load_checkpoint, plot_curves, save_agent, save_checkpoint,
                     seed_all, write_json)


@dataclass
class Config:
    # --- run
    out: str = "runs/default"         # run folder: data caches, models, checkpoints, metrics, plots
    seed: int = 0                     # seeds offline data, model init, task draws and sampling
    device: str = "auto"              # auto | cpu | cuda
    mode: str = "dream"               # dream (DreamGym) | real (baseline RL) | s2r (dream, then real)
    algo: str = "grpo"                # grpo | ppo
    resume: bool = False              # continue the run in --out from its last checkpoint
    # --- environment and offline data (the paper's "offline real-world data")
    env: str = "coin:numLocations=5,max_steps=12"  # TextWorldExpress game and parameters: coin | twc | cookingworld ... (envs/textworld.py)
    offline_expert: int = 300         # expert trajectories (train fold) in the offline data
    offline_noisy: int = 300          # trajectories of the expert with epsilon-random steps
    offline_random: int = 200         # trajectories of uniform random play (incl. some invalid actions)
    offline_epsilon: float = 0.3      # the noisy expert's share of random steps
    data_dir: str = "data"            # where offline data and its embeddings are cached (shared by runs)
    # --- models (tiny presets on CPU; any HF name/path on GPU, 4-bit + LoRA there)
    agent_model: str = "tiny"         # tiny | tiny-s | tiny-m (trained from scratch) | smollm2-135m | an HF name or folder
    exp_model: str = "tiny"           # the experience model (and task generator): same choices
    load_in_4bit: bool = False        # QLoRA: 4-bit NF4 base weights, pretrained models only (with --lora_r)
    lora_r: int = 0                   # LoRA rank for pretrained models (0: train all weights; tiny presets always do)
    dtype: str = "auto"               # auto (bfloat16 on CUDA and, for LoRA/frozen models >= 50M params, on bf16 CPUs) | float32 | bfloat16
    exp_endpoint: str = ""            # OpenAI-compatible URL: serve M_exp elsewhere (vLLM/SGLang)
    exp_endpoint_model: str = ""      # the model name served at --exp_endpoint
    exp_ckpt: str = ""                # reuse a trained experience model (folder) instead of training one
    warm_ckpt: str = ""               # reuse a warm-started agent (folder) instead of behaviour cloning
    vocab_size: int = 2048            # BPE vocabulary of the tiny models' tokenizer
    bpe_dropout: float = 0.1          # SFT only, tiny BPE models: learn to read unseen words (0 = off)
    agent_init: str = "exp"           # tiny agent starts from: exp (M_exp's weights) | scratch
    # --- reasoning traces R*_t
    annotator: str = "rule"           # rule (TextWorldExpress rules) | teacher (the paper: an LLM's JSON)
    teacher_model: str = ""           # HF name/path, or the model name at teacher_endpoint
    teacher_endpoint: str = ""        # OpenAI-compatible URL for the teacher
    # --- experience model
    k: int = 3                        # retrieved demonstrations
    history: int = 3                  # (action, feedback) pairs kept in prompts
    reasoning: bool = True            # ablation: --reasoning false
    retrieval: bool = True            # ablation: --retrieval false
    exp_epochs: float = 2.0           # SFT epochs of the experience model
    exp_lr: float = 2e-3              # its learning rate (cosine decay, 5% warmup)
    exp_batch_tokens: int = 8192      # padded tokens per SFT batch of the experience model
    exp_temperature: float = 0.0      # experience-model sampling temperature (0: greedy)
    dream_validity: str = "listed"    # who rules an action invalid in the dream: listed (the dreamed actions line) or model (M_exp)
    exp_max_tokens: int = 320         # generation budget of one experience-model step
    buffer_capacity: int = 50_000     # replay buffer size; the oldest synthetic transitions are evicted first
    # --- agent warm start (behaviour cloning on a share of offline successes)
    warm_policies: str = "expert,filtered"  # offline policies whose successes are cloned (comma list of expert, noisy, random, filtered)
    warm_share: float = 1.0           # share of those successes (their real transitions are counted)
    warm_epochs: float = 15.0         # most behaviour-cloning epochs of the warm start (early stopping ends it sooner)
    warm_holdout: float = 0.1         # share of the warm-start trajectories held out for early stopping (0: off)
    warm_patience: int = 4            # epochs without better held-out action agreement before the warm start stops
    warm_lr: float = 2e-3             # its learning rate
    warm_batch_tokens: int = 2048     # padded tokens per warm-start batch
    agent_thoughts: str = "plan"      # the warm start's <think> targets: plan (from the state) | trace (R*_t) | none
    # --- RL
    iterations: int = 20              # RL iterations (s2r: dreamed ones, before the real phase)
    tasks_per_iter: int = 8           # tasks per iteration (each played group_size times)
    group_size: int = 8               # G rollouts per task (a GRPO group)
    lr: float = 5e-4                  # RL learning rate (AdamW)
    lr_warmup: int = 10               # optimizer steps of linear lr warmup: Adam's first steps are ~lr * sign(g)
    temperature: float = 1.0          # agent sampling temperature in rollouts
    clip_low: float = 0.2             # PPO/GRPO ratio clip below 1
    clip_high: float = 0.28           # DAPO clip-higher
    beta: float = 0.05                # KL to the warm-start policy (k3): without it the tiny agent's RL collapses
    minibatches: int = 4              # optimizer steps per pass over the iteration's episodes
    update_epochs: int = 2            # passes: 8 small clipped steps per iteration (2 big ones barely moved it)
    adv_scale: str = "group"          # GRPO: group | batch | none (TRL's scale_rewards)
    gamma: float = 1.0                # PPO / GAE over turns
    gae_lambda: float = 0.95          # GAE lambda (PPO)
    vf_coef: float = 0.5              # weight of the critic's loss (PPO)
    max_grad_norm: float = 1.0        # gradient-norm clip of each optimizer step (PPO: the policy's and the critic's each)
    norm_adv: bool = True             # PPO: whiten advantages over the iteration's agent turns (mean 0, std 1)
    recompute_logprobs: str = "auto"  # old log-probs by a training forward: auto (when the dtype is not float32) | always | never
    max_tokens: int = 8192            # tokens per micro-batch in updates and SFT
    train_dtype: str = "auto"         # auto (bfloat16 autocast where the CPU has AMX/AVX512-BF16 and it measured faster) | float32 | bfloat16
    # --- curriculum task generation
    taskgen: bool = True              # ablation: --taskgen false
    taskgen_share: float = 0.25       # max share of generated tasks per iteration (the paper's lambda)
    taskgen_every: int = 5            # iterations between curriculum rounds
    taskgen_seeds: int = 4            # seed tasks per round: the highest reward variance
    taskgen_per_seed: int = 2         # variations written per seed task
    taskgen_judge: bool = False       # the paper's LLM judge (M_task itself) filters generated tasks
    add_to_buffer: bool = True        # online synthetic transitions enrich the replay buffer
    # --- sim-to-real
    s2r_real_budget: int = 1000       # real transitions for the real phase of s2r
    real_budget: int = 0              # cap on real transitions in --mode real (0: none)
    # --- evaluation
    eval_episodes: int = 100          # tasks of the evaluation fold played (greedy) at the end
    eval_fold: str = "test"           # the fold results are reported on
    curve_fold: str = "dev"           # learning curves use dev: never tune on test
    eval_every: int = 5               # iterations between learning-curve points (0: none)
    curve_episodes: int = 50          # tasks of curve_fold per curve point
    select_agent: bool = True         # final agent: the curve_fold-best of the warm start and every evaluated iteration
    ckpt_every: int = 1               # iterations between checkpoints

    def validate(self):
        checks = [
            (self.mode in ("dream", "real", "s2r"), "mode must be dream, real or s2r"),
            (self.algo in ("grpo", "ppo"), "algo must be grpo or ppo"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (self.group_size >= 2 or self.algo == "ppo", "GRPO needs group_size >= 2"),
            (0 <= self.taskgen_share <= 1, "taskgen_share must be in [0, 1]"),
            (0 < self.warm_share <= 1, "warm_share must be in (0, 1]"),
            (self.iterations >= 0 and self.tasks_per_iter >= 1, "iterations >= 0, tasks_per_iter >= 1"),
            (self.adv_scale in ("group", "batch", "none"), "adv_scale must be group, batch or none"),
            (self.eval_fold in ("dev", "test") and self.curve_fold in ("dev", "test"),
             "evaluate on a held-out fold: dev or test"),
            (not self.select_agent or self.curve_fold != self.eval_fold,
             "select_agent selects the final agent on curve_fold, so curve_fold must differ from eval_fold "
             "(or pass --select_agent false)"),
            (self.minibatches >= 1 and self.update_epochs >= 1, "minibatches, update_epochs >= 1"),
            (self.lr > 0 and self.lr_warmup >= 0, "lr > 0 and lr_warmup >= 0"),
            (self.temperature > 0, f"--temperature {self.temperature}: RL samples its rollouts and divides the "
                                   f"logits by it, so it must be > 0 (evaluation is greedy on its own)"),
            (self.recompute_logprobs in ("auto", "always", "never"), "recompute_logprobs must be auto, always or never"),
            (self.k >= 0 and self.history >= 0, "k and history must be >= 0"),
            (self.agent_init in ("exp", "scratch"), "agent_init must be exp or scratch"),
            (self.annotator == "rule" or (self.annotator == "teacher" and self.teacher_model),
             "annotator must be rule, or teacher with --teacher_model"),
            (0 <= self.bpe_dropout < 1, "bpe_dropout must be in [0, 1)"),
            (self.train_dtype in TRAIN_DTYPES, f"train_dtype must be one of {TRAIN_DTYPES}"),
            (self.agent_thoughts in ("trace", "plan", "none"), "agent_thoughts must be trace, plan or none"),
            (self.dream_validity in dg.DREAM_VALIDITY, f"dream_validity must be one of {', '.join(dg.DREAM_VALIDITY)}"),
            (0 <= self.warm_holdout < 1 and self.warm_patience >= 1, "warm_holdout in [0, 1), warm_patience >= 1"),
            (bool(self.warm_policies) and set(self.warm_policies.split(",")) <= set(POLICIES),
             f"warm_policies: a comma list of {', '.join(POLICIES)}"),
            (not (self.exp_endpoint and not self.exp_ckpt and not self.exp_endpoint_model),
             "--exp_endpoint needs --exp_endpoint_model"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"config: {msg}")
        envs.max_steps(self.env)    # raises on an unknown environment, game or parameter
        return self


def field_help() -> dict[str, str]:
    """Each Config field's trailing comment, which is its `--help` line: one source of truth."""
    src = inspect.getsource(Config)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^    (\w+): [^=\n]+=[^#\n]*#(.*)$", src, re.M)}


def load_config_file(path: str) -> dict:
    """A named config (configs/*.json): a JSON object of Config fields."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    try:
        values = json.load(open(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    names = {f.name for f in dataclasses.fields(Config)}
    if not isinstance(values, dict) or set(values) - names:
        raise ValueError(f"--config {path}: unknown fields {sorted(set(values) - names) if isinstance(values, dict) else values}")
    return values


def parse_args(argv=None) -> Config:
    """Config defaults, then a --config file's values, then the flags given: the later wins."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [--config FILE] [--FIELD VALUE ...]")
    p.add_argument("--config", default="", help="a JSON file of Config fields, e.g. configs/quick.json; flags override it")
    helps = field_help()
    for f in dataclasses.fields(Config):
        text = f"{helps.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if f.type in ("bool", bool):
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?",
                           const=True, default=f.default, help=text)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=text)
    given, _ = p.parse_known_args(argv)
    if given.config:
        try:
            p.set_defaults(**load_config_file(given.config))
        except ValueError as e:
            fail(e)
    args = vars(p.parse_args(argv))
    args.pop("config")
    try:
        return Config(**args).validate()
    except ValueError as e:
        fail(e)


def fail(msg):
    """A bad input ends the program at once: one line on stderr, exit code 2 (as argparse does), no
    traceback (tracebacks are for bugs)."""
    sys.stderr.write(f"{os.path.basename(sys.argv[0]) or 'train.py'}: error: {msg}\n")
    raise SystemExit(2)


def _writable(path: str) -> bool:
    """path is a writable folder, or could be created as one (its nearest existing parent is)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def preflight(cfg: Config):
    """Every path, model name, endpoint and resume state checked before any work (the env spec is
    Config.validate's): a bad one raises ValueError naming the flag, in one line. Nothing is written."""
    names = [("agent_model", cfg.agent_model), ("exp_model", cfg.exp_model)]
    if cfg.annotator == "teacher" and not cfg.teacher_endpoint:
        names.append(("teacher_model", cfg.teacher_model))
    for flag, name in names:
        if (why := model_name_problem(name)) is not None:
            raise ValueError(f"--{flag} {name}: {why}")
    for flag in ("exp_ckpt", "warm_ckpt"):
        path = getattr(cfg, flag)
        if path and not os.path.isdir(path):
            raise ValueError(f"--{flag} {path}: no such folder")
        if path and not is_checkpoint(path):
            raise ValueError(f"--{flag} {path}: holds no saved model (config.json or adapter_config.json)")
    for flag in ("exp_endpoint", "teacher_endpoint"):
        url = getattr(cfg, flag)
        parts = urllib.parse.urlparse(url)
        if url and (parts.scheme not in ("http", "https") or not parts.netloc):
            raise ValueError(f"--{flag} {url}: not an http(s) URL such as http://localhost:8000/v1")
    for flag in ("data_dir", "out"):
        path = getattr(cfg, flag)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--{flag} {path}: exists and is not a folder")
        if not _writable(path):
            raise ValueError(f"--{flag} {path}: not writable")
    pinned_plan()                                  # a malformed $DREAMGYM_CPU_PLAN, before any work
    resume_point(cfg)


# ============================================================================ stage 1: offline data
def offline_data(cfg: Config) -> list[dict]:
    path = offline_path(cfg)
    if not os.path.exists(path):
        rows = collect(cfg.env, cfg.offline_expert, cfg.offline_noisy, cfg.offline_random, "train", cfg.seed,
                       cfg.offline_epsilon)
        write_jsonl(path, rows)
        print_summary(rows)
    return read_jsonl(path)


def seed_tasks(trajs: list[list[dg.Transition]]) -> list[Task]:
    """Dream tasks: every offline trajectory's task, starting from the initial state the offline data
    recorded (so starting a dreamed episode needs no new real interaction)."""
    tasks = {}
    for tr in trajs:
        t = tr[0].task
        tasks.setdefault(t.id, Task(env=t.env, fold=t.fold, seed=t.seed, instruction=t.instruction,
                                    init_state=tr[0].state))
    return sorted(tasks.values(), key=lambda t: t.id)


# ============================================================================ SFT (experience model, warm start)
def encode_examples(lm: dg.LocalLM, examples, bpe_dropout: float = 0.0):
    """Token ids exactly as generation builds them: prefix + prompt, then the target.
    With BPE-dropout (Provilkov et al., 2020) words are sometimes split into smaller pieces, so the
    pieces get trained embeddings too: a tiny model can then read and copy words it never saw whole
    (the dev and test folds hold objects the train fold does not). It applies to training only;
    its randomness comes from the tokenizers library and cannot be seeded."""
    model = getattr(lm.tokenizer, "backend_tokenizer", None)
    model = getattr(model, "model", None)
    use = bpe_dropout > 0 and hasattr(model, "dropout")
    if use:
        model.dropout = bpe_dropout
    try:
        return [(lm.prefix(system)[1] + lm.user_ids(system, user), lm.target_ids(target))
                for system, user, target in examples]
    finally:
        if use:
            model.dropout = None


def heldout_loss(lm: dg.LocalLM, data, max_tokens: int, dtype: str = "auto") -> float:
    """Mean target-token negative log-likelihood of encoded (prompt, target) pairs, no gradients."""
    dev = next(lm.model.parameters()).device
    total, n = 0.0, 0
    lm.model.eval()
    with torch.no_grad():
        for b in dg.token_batches(data, [len(p) + len(t) for p, t in data], max_tokens):
            with train_autocast(lm.model, dtype):
                logp, _, _ = dg.response_logprobs(lm.model, dg.pack([data[i] for i in b], lm.tokenizer.pad_token_id,
                                                                    dev))
            total, n = total - logp.sum().item(), n + logp.numel()
    lm.model.train()
    return total / max(1, n)


def sft(lm: dg.LocalLM, examples, epochs: float, lr: float, max_tokens: int, seed: int, desc: str,
        log: Log | None = None, bpe_dropout: float = 0.0, heldout=None, patience: int = 2,
        dtype: str = "auto", score=None) -> float:
    """Supervised fine-tuning on (system, prompt, target): loss on target tokens only (Eq. 5: the
    prompt -- task, history, demos, state, action -- is never trained on). Returns the last loss.
    With `heldout` examples, they are scored after every epoch: `score(lm)` (a tuple, higher is
    better) followed by minus the held-out loss, compared in order. Training stops once for
    `patience` epochs neither that score nor the held-out loss alone has improved (a noisy score
    must not end a run whose loss still falls), and the weights of the best-scored epoch are kept:
    early stopping, so the warm start trains to convergence without overfitting whatever the data
    size."""
    model, dev = lm.model, next(lm.model.parameters()).device
    rng = random.Random(seed)
    data = DIST.broadcast(encode_examples(lm, examples, bpe_dropout))    # one segmentation for all ranks
    batches = dg.token_batches(data, [len(p) + len(t) for p, t in data], max_tokens)
    steps = max(1, int(math.ceil(epochs * len(batches))) // DIST.world)   # each step: one batch per rank
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) *
                                              0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    order, ema = [], None
    val = encode_examples(lm, heldout) if heldout else None
    best, best_score, best_loss, bad = None, None, float("inf"), 0
    epoch_steps = max(1, len(batches) // DIST.world)
    for step in (bar := tqdm(range(steps), desc=desc, dynamic_ncols=True, disable=not DIST.main)):
        if len(order) < DIST.world:       # a new epoch: fresh BPE-dropout segmentations, new order
            if step > 0 and bpe_dropout > 0:
                data = DIST.broadcast(encode_examples(lm, examples, bpe_dropout))
                batches = dg.token_batches(data, [len(p) + len(t) for p, t in data], max_tokens)
            order = list(range(len(batches)))
            rng.shuffle(order)
        b = batches[order[-1 - DIST.rank]]
        del order[-DIST.world:]
        batch = dg.pack([data[i] for i in b], lm.tokenizer.pad_token_id, dev)
        with train_autocast(model, dtype):
            logp, _, _ = dg.response_logprobs(model, batch)
        loss = -logp.mean() / DIST.world
        loss.backward()
        DIST.sum_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() * DIST.world if ema is None else 0.95 * ema + 0.05 * loss.item() * DIST.world
        bar.set_postfix(loss=f"{ema:.3f}")
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(stage=desc, step=step, loss=ema)
        if val and ((step + 1) % epoch_steps == 0 or step == steps - 1):
            v = heldout_loss(lm, val, max_tokens, dtype)
            extra = tuple(score(lm)) if score is not None else ()
            if log is not None:
                log(stage=desc, step=step, epoch=round((step + 1) / epoch_steps, 2), heldout_loss=v,
                    **({"heldout_score": list(extra)} if extra else {}))
            now = extra + (-round(v, 4),)           # loss rounded: a change under 1e-4 is no better
            progress = best_score is None or now > best_score or v < best_loss - 1e-4
            best_loss = min(best_loss, v)
            if best_score is None or now > best_score:
                best_score = now
                best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            bad = 0 if progress else bad + 1
            if bad >= patience:
                break
    if best is not None:                  # the best epoch's weights (identical on every rank)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best:
                    p.copy_(best[n])
    model.eval()
    return ema


# ============================================================================ stage 2: models
def tokenizer_corpus(trajs, tasks) -> list[str]:
    """Texts rendered in exactly the formats the models read and write (train fold only)."""
    texts = [dg.AGENT_SYSTEM, dg.EXP_SYSTEM, dg.TASK_SYSTEM, dg.TeacherAnnotator(None).prompt(trajs[0])]
    for traj in trajs:
        for t in traj:
            texts.append(dg.agent_prompt(t.task.instruction, t.history, t.state) + dg.agent_target(t.reasoning, t.action))
            texts.append(dg.exp_prompt(t.task.instruction, t.history, t.state, t.action, [t]) +
                         dg.exp_target(t.reasoning, t.next_state, t.reward, t.terminal))
    texts += [dg.task_prompt(t) + dg.task_target(t) for t in tasks[:200]]
    return texts


def init_model(cfg: Config, which: str, trajs, tasks, dev) -> dg.LocalLM:
    """A fresh model for `which` (agent | exp): the tiny preset built from our corpus, or a real LM."""
    name = cfg.agent_model if which == "agent" else cfg.exp_model
    spec = model_spec(cfg, name)
    if name.startswith("tiny"):
        tok_dir, path = os.path.join(cfg.out, "tokenizer"), os.path.join(cfg.out, f"{which}_init")
        if DIST.main and not os.path.exists(tok_dir):
            train_tokenizer(tokenizer_corpus(trajs, tasks), tok_dir, cfg.vocab_size)
        if DIST.main and not os.path.exists(path):
            create_tiny(path, tok_dir, preset=name, seed=cfg.seed + (0 if which == "agent" else 1))
        DIST.barrier()                    # the other ranks load what rank 0 wrote
        name = path
    model, tok = load_model(name, spec, dev)
    return dg.LocalLM(model, tok)


def is_checkpoint(path: str, given: str = "") -> bool:
    """A saved model (full weights or LoRA adapter) at path? A path the user gave must be one."""
    found = any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "adapter_config.json"))
    if given and not found:
        raise ValueError(f"{given} holds no saved model (config.json or adapter_config.json)")
    return found


def save_on_main(lm: dg.LocalLM, path: str):
    if DIST.main:
        save_model(lm.model, lm.tokenizer, path)
    DIST.barrier()


def model_spec(cfg: Config, name: str) -> ModelSpec:
    """How to load the run's model `name`: LoRA / 4-bit for pretrained LMs; a tiny preset (trained from
    scratch) trains all its weights, also beside a pretrained agent or M_exp."""
    tiny = name.startswith("tiny")
    return ModelSpec(name=name, load_in_4bit=cfg.load_in_4bit and not tiny, lora_r=0 if tiny else cfg.lora_r,
                     dtype=cfg.dtype, grad_ckpt=not tiny)


def load_lm(cfg: Config, path: str, dev, trainable: bool, name: str = "") -> dg.LocalLM:
    """A saved model of this run; `name`: the Config model it holds (agent_model / exp_model), if known."""
    tiny = cfg.agent_model.startswith("tiny") and cfg.exp_model.startswith("tiny")
    spec = model_spec(cfg, name) if name else ModelSpec(load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r,
                                                       dtype=cfg.dtype, grad_ckpt=not tiny)
    model, tok = load_model(path, spec, dev, trainable=trainable)
    return dg.LocalLM(model, tok)


# ============================================================================ stage 3: replay buffer
def build_buffer(cfg: Config, trajs, encoder) -> dg.ReplayBuffer:
    """The run's replay buffer, seeded with the offline real transitions. phi of the offline data is
    computed once per dataset and cached beside it, so every run on the same data starts instantly."""
    from safetensors.numpy import load_file, save_file
    path = os.path.join(cfg.out, "buffer")
    if os.path.exists(path + ".jsonl"):      # only rank 0 writes the files; the others keep a copy in memory
        return dg.ReplayBuffer.load(path, encoder, cfg.buffer_capacity, attach=DIST.main)
    flat = [t for tr in trajs for t in tr]
    cache = offline_path(cfg) + ".emb.safetensors"
    emb = load_file(cache)["emb"] if os.path.exists(cache) else None
    if emb is None or len(emb) != len(flat):
        texts = [dg.query_text(t.state, t.action) for t in flat]
        emb = np.concatenate([encoder(texts[i:i + 256]) for i in tqdm(range(0, len(texts), 256),
                                                                       desc="embed offline transitions")])
        save_file({"emb": emb}, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    buf = dg.ReplayBuffer(encoder, cfg.buffer_capacity)
    buf.add(flat, emb)
    buf.save(path)
    buf.path = path
    return buf


# ============================================================================ stage 4: experience model
def exp_model_of(cfg: Config, lm, buffer) -> dg.ExperienceModel:
    return dg.ExperienceModel(lm, buffer, cfg.k, cfg.history, cfg.reasoning, cfg.retrieval, cfg.exp_temperature,
                              cfg.exp_max_tokens)


def experience_model(cfg: Config, trajs, tasks, buffer, encoder, dev, log) -> dg.ExperienceModel:
    """Train (or load) M_exp on the annotated offline transitions, plus its task-generation pairs."""
    if cfg.exp_endpoint:
        lm = dg.EndpointLM(cfg.exp_endpoint, cfg.exp_endpoint_model)
        return exp_model_of(cfg, lm, buffer)
    path = cfg.exp_ckpt or os.path.join(cfg.out, "exp_model")
    if is_checkpoint(path, cfg.exp_ckpt):
        lm = load_lm(cfg, path, dev, trainable=False, name=cfg.exp_model)
        return exp_model_of(cfg, lm, buffer)
    lm = init_model(cfg, "exp", trajs, tasks, dev)
    exp_model = exp_model_of(cfg, lm, buffer)
    examples = exp_model.sft_examples([t for tr in trajs for t in tr])
    if cfg.taskgen:
        examples += dg.TaskGenerator(lm).sft_examples(tasks, random.Random(cfg.seed), encoder)
    sft(lm, examples, cfg.exp_epochs, cfg.exp_lr, cfg.exp_batch_tokens, cfg.seed, "sft experience model", log,
        cfg.bpe_dropout if cfg.exp_model.startswith("tiny") else 0.0,   # a pretrained LM keeps its segmentation
        dtype=cfg.train_dtype)
    save_on_main(lm, path)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    return exp_model


# ============================================================================ stage 5: agent warm start
def agent_thought(kind: str, t: dg.Transition) -> str:
    """The warm start's <think> target: trace = the hindsight trace R*_t (describes the outcome);
    plan = a thought written from the state before the action (what the agent sees, what it does and
    why: dg.plan_thought); none = empty (action tokens only)."""
    if kind == "trace":
        return t.reasoning
    return dg.plan_thought(t) if kind == "plan" else ""


def traj_policy(traj: list[dg.Transition]) -> str:
    """The offline policy that played a trajectory (envs.collect names it `<env>/<fold>/<seed>/<policy>[#k]`)."""
    return traj[0].traj.rsplit("/", 1)[-1].split("#")[0]


def action_agreement(lm: dg.LocalLM, prompts: list[str], actions: list[str]) -> float:
    """Share of `prompts` (agent prompts of held-out demonstrations) on which the greedy agent writes
    the demonstrator's action: what behaviour cloning is for, whatever its <think> targets are."""
    lm.model.eval()
    gens = lm.generate(dg.AGENT_SYSTEM, prompts, dg.agent_sampling(0.0))     # the engine batches them
    lm.model.train()
    return sum(dg.parse_agent(g.text)[1] == a for g, a in zip(gens, actions)) / max(1, len(prompts))


def warm_start(cfg: Config, trajs, tasks, dev, log) -> tuple[dg.LocalLM, int]:
    """Behaviour cloning of the agent on a share of the offline successes of the `warm_policies`
    (by default the expert's demonstrations: the noisy and random plays' successes hold choices
    nothing in the observation predicts, which teaches the tiny agent the class prior instead of a
    rule). Early stopping on a held-out share: greedy agreement with the demonstrated action, then
    the held-out loss. Returns the agent and how many real transitions that share holds (reported
    like the paper's SFT)."""
    path = cfg.warm_ckpt or os.path.join(cfg.out, "agent_warm")
    wanted = set(cfg.warm_policies.split(","))
    wins = [tr for tr in trajs if tr[-1].success and traj_policy(tr) in wanted]
    if not wins:
        raise SystemExit(f"error: no successful offline trajectory of the warm_policies ({cfg.warm_policies}); "
                         f"collect some (--offline_expert, envs.collect --filtered) or choose other policies")
    rng = random.Random(cfg.seed)
    share = rng.sample(wins, max(1, int(round(cfg.warm_share * len(wins)))))
    n_real = sum(len(tr) for tr in share)
    if is_checkpoint(path, cfg.warm_ckpt):
        return load_lm(cfg, path, dev, trainable=True, name=cfg.agent_model), n_real
    exp_path = cfg.exp_ckpt or os.path.join(cfg.out, "exp_model")
    if cfg.agent_init == "exp" and cfg.agent_model.startswith("tiny") and os.path.exists(exp_path):
        lm = load_lm(cfg, exp_path, dev, trainable=True, name=cfg.exp_model)   # a tiny model's only "pretraining"
    else:
        lm = init_model(cfg, "agent", trajs, tasks, dev)
    n_val = int(round(cfg.warm_holdout * len(share))) if len(share) >= 10 else 0
    held, train_share = share[:n_val], share[n_val:]       # share is already a seeded random sample
    prompt = lambda t: dg.agent_prompt(t.task.instruction, t.history, t.state, cfg.history)
    examples = lambda trs: [(dg.AGENT_SYSTEM, prompt(t), dg.agent_target(agent_thought(cfg.agent_thoughts, t), t.action))
                            for tr in trs for t in tr]
    held_steps = [t for tr in held for t in tr]
    held_prompts, held_actions = [prompt(t) for t in held_steps], [t.action for t in held_steps]
    agree = lambda m: (action_agreement(m, held_prompts, held_actions),)
    sft(lm, examples(train_share), cfg.warm_epochs, cfg.warm_lr, cfg.warm_batch_tokens, cfg.seed, "warm start agent",
        log, cfg.bpe_dropout if cfg.agent_model.startswith("tiny") else 0.0, heldout=examples(held) or None,
        patience=cfg.warm_patience, dtype=cfg.train_dtype, score=agree)
    save_on_main(lm, path)
    lm.model.train()
    return lm, n_real


# ============================================================================ stage 6: RL
@dataclass
class RLState:
    """Everything besides model/optimizer tensors that `--resume` needs to continue exactly."""
    iteration: int = 0
    real_transitions: int = 0          # real-env transitions consumed by RL (the paper's budget)
    dream_transitions: int = 0
    task_rewards: dict = dataclasses.field(default_factory=dict)   # task id -> its last group's rewards,
                                                                   # groups played since the last curriculum round
    generated: list = dataclasses.field(default_factory=list)      # generated Task dicts
    generated_count: int = 0           # candidates M_task has written so far: numbers generated tasks (unique ids)
    phase: str = "dream"               # dream | real (s2r switches once)
    selected_iteration: int = -1       # select_agent: iterations done when the selected agent was seen
    selected_curve_success: float = -1.0   # its curve_fold success


class ValueHead(torch.nn.Module):
    """PPO critic: a linear head reading the agent's (detached) hidden state at the last prompt token:
    a linear probe of the policy's own features, trained on the returns."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, h):
        return self.proj(h)


def turn_values(agent: dg.LocalLM, head: ValueHead, episodes, cfg: Config) -> list[list[float]]:
    """Critic values of every turn's state before the update (the 'old' values GAE needs), from the
    forward the update runs (the same autocast), so GAE and the value loss see one critic."""
    turns = [(e, t) for e in episodes for t in e.turns]
    dev = next(agent.model.parameters()).device
    vals = {}
    with torch.no_grad(), train_autocast(agent.model, cfg.train_dtype):
        for mb in dg.token_batches(turns, [len(t.prompt_ids) for _, t in turns], cfg.max_tokens):
            batch = dg.pack([(turns[i][1].prompt_ids, []) for i in mb], agent.tokenizer.pad_token_id, dev)
            base = agent.model.get_base_model() if hasattr(agent.model, "get_base_model") else agent.model
            hid = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False).last_hidden_state
            v = head(hid.reshape(-1, hid.shape[-1])[batch["value_pos"]].float()).squeeze(-1)
            for i, x in zip(mb, v.tolist()):
                vals[i] = x
    out, n = [], 0
    for e in episodes:
        out.append([vals[n + j] for j in range(len(e.turns))])
        n += len(e.turns)
    return out


def set_warmup_lr(opt, cfg: Config):
    """Linear warmup over the first `lr_warmup` optimizer steps. The step count is Adam's own (saved in
    the checkpoint), so a resumed run continues the schedule exactly. Why: with fresh moments Adam's
    first updates move every weight by ~lr whatever the gradient's size, which a noisy policy gradient
    on a small model does not survive at the lr it tolerates later."""
    state = opt.state.get(opt.param_groups[0]["params"][0], {})
    done = int(state["step"]) if "step" in state else 0
    for g in opt.param_groups:
        g["lr"] = cfg.lr * min(1.0, (done + 1) / max(1, cfg.lr_warmup))


def agent_dtype(agent: dg.LocalLM) -> torch.dtype:
    """The dtype the update's log-probs are computed in (the output embeddings')."""
    base = agent.model.get_base_model() if hasattr(agent.model, "get_base_model") else agent.model
    return base.get_output_embeddings().weight.dtype


def recompute_old_logprobs(cfg: Config, agent: dg.LocalLM) -> bool:
    """auto: whenever the update's forward is not plain float32 (bf16 weights, or bfloat16 autocast
    chosen by engine.train_dtype): the sampler's log-probs then differ from the update's."""
    differs = agent_dtype(agent) != torch.float32 or train_dtype(agent.model, cfg.train_dtype) is not None
    return cfg.recompute_logprobs == "always" or (cfg.recompute_logprobs == "auto" and differs)


def old_logprobs(agent: dg.LocalLM, turns: list[dg.Turn], cfg: Config) -> list[list[float]]:
    """Each turn's response log-probs under the current weights by the update's own forward (train
    mode, no grad): the ratio's old policy. The sampler computes them in float32 exactly; in bf16 its
    decode kernels and the training forward round differently, and the ratio must start at 1."""
    dev = next(agent.model.parameters()).device
    out = [None] * len(turns)
    agent.model.train()
    with torch.no_grad():
        for mb in dg.token_batches(turns, [len(t.prompt_ids) + len(t.response_ids) for t in turns], cfg.max_tokens):
            batch = dg.pack([(turns[i].prompt_ids, turns[i].response_ids) for i in mb], agent.tokenizer.pad_token_id, dev)
            with train_autocast(agent.model, cfg.train_dtype):
                lp = dg.response_logprobs(agent.model, batch, cfg.temperature)[0].float().tolist()
            n = 0
            for i in mb:
                out[i], n = lp[n:n + len(turns[i].response_ids)], n + len(turns[i].response_ids)
    return out


def whiten(values: list[float]) -> list[float]:
    """Mean 0, std 1 over every rank's values (CleanRL's / verl's advantage normalisation)."""
    every = torch.tensor([x for vs in DIST.gather(values) for x in vs], dtype=torch.float64)
    if len(every) < 2:
        return [0.0] * len(values)
    mean, std = every.mean().item(), every.std().item()
    return [(x - mean) / (std + 1e-8) for x in values]


def update_policy(agent: dg.LocalLM, opt, episodes, cfg: Config, head: ValueHead | None, ref: dg.LocalLM | None):
    """One RL update from a batch of episodes: advantages, then clipped-surrogate steps over
    `minibatches` token-mean mini-batches (agent tokens only: prompts and env text are masked).
    PPO: advantages whitened over the iteration's agent turns (norm_adv), and the policy's and the
    critic's gradients clipped each to max_grad_norm, so the critic's size never shrinks the policy's
    step. Old log-probs are the sampler's, or the update's own forward's (recompute_logprobs).
    Episodes ended by a failed simulation take no part (dg.learnable)."""
    episodes = dg.learnable(episodes)
    dev = next(agent.model.parameters()).device
    if cfg.algo == "grpo":
        adv_ep = dg.episode_advantages(episodes, cfg.adv_scale, dev).tolist()
        adv_turn = [[a] * len(e.turns) for a, e in zip(adv_ep, episodes)]
        ret_turn = None
    else:
        adv_turn, ret_turn = dg.turn_gae(episodes, turn_values(agent, head, episodes, cfg), cfg.gamma,
                                          cfg.gae_lambda, dev)
    items = [(t, a, (r[j] if ret_turn else 0.0)) for e, advs, r in zip(episodes, adv_turn, ret_turn or adv_turn)
             for j, (t, a) in enumerate(zip(e.turns, advs)) if t.response_ids]
    if cfg.algo == "ppo" and cfg.norm_adv:
        items = [(t, a, r) for (t, _, r), a in zip(items, whiten([a for _, a, _ in items]))]
    recompute = recompute_old_logprobs(cfg, agent)
    olds = old_logprobs(agent, [t for t, _, _ in items], cfg) if recompute else [t.logprobs for t, _, _ in items]
    policy = [p for p in agent.model.parameters() if p.requires_grad]
    critic = list(head.parameters()) if head else []
    stats = dict(loss=0.0, clipfrac=0.0, entropy=0.0, vloss=0.0, tokens=0, grad_norm=0.0, vf_grad_norm=0.0, steps=0,
                 ratio_dev=0.0, first_tokens=0, approx_kl=0.0, ref_kl=0.0)
    rng = random.Random(cfg.seed * 100003 + len(items))
    agent.model.train()
    first = True                          # the first mini-batch: no step yet, so the ratio must be 1
    for _ in range(cfg.update_epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        for mb_items in [order[i::cfg.minibatches] for i in range(cfg.minibatches)]:
            n_tok = DIST.sum(sum(len(items[i][0].response_ids) for i in mb_items))   # token-mean over all ranks
            n_turns = DIST.sum(len(mb_items))
            for mb in dg.token_batches(mb_items, [len(items[i][0].prompt_ids) + len(items[i][0].response_ids)
                                                  for i in mb_items], cfg.max_tokens):
                sel = [items[mb_items[j]] for j in mb]
                batch = dg.pack([(t.prompt_ids, t.response_ids) for t, _, _ in sel], agent.tokenizer.pad_token_id, dev)
                with train_autocast(agent.model, cfg.train_dtype):
                    logp, ent, values = dg.response_logprobs(agent.model, batch, cfg.temperature, head)
                old = torch.tensor([x for j in mb for x in olds[mb_items[j]]], device=dev)
                adv = torch.tensor([a for t, a, _ in sel for _ in t.response_ids], device=dev)
                ref_logp = None
                if ref is not None and cfg.beta > 0:
                    # a LoRA agent's reference (models.AdapterReference) is its own base under a frozen adapter
                    ref_model = agent.model if hasattr(ref, "active") else ref.model
                    with torch.no_grad(), (ref.active() if hasattr(ref, "active") else contextlib.nullcontext()), \
                            train_autocast(ref_model, cfg.train_dtype):
                        ref_logp, _, _ = dg.response_logprobs(ref.model, batch, cfg.temperature)
                surr, clipped = dg.policy_loss(logp, old, adv, cfg.clip_low, cfg.clip_high, ref_logp, cfg.beta)
                loss = surr.sum() / n_tok
                if head is not None:
                    ret = torch.tensor([r for _, _, r in sel], device=dev)
                    vloss = 0.5 * ((values - ret) ** 2).sum() / n_turns
                    loss = loss + cfg.vf_coef * vloss
                    stats["vloss"] += vloss.item()
                loss.backward()
                with torch.no_grad():
                    log_ratio = logp.detach().float() - old
                    if first:
                        stats["ratio_dev"] += (log_ratio.exp() - 1).abs().sum().item()
                        stats["first_tokens"] += len(adv)
                    stats["approx_kl"] += (log_ratio.exp() - 1 - log_ratio).sum().item()
                    if ref_logp is not None:
                        d = ref_logp.float() - logp.detach().float()
                        stats["ref_kl"] += (d.exp() - d - 1).sum().item()
                stats["loss"] += loss.item()
                stats["clipfrac"] += clipped.float().sum().item()
                stats["entropy"] += ent.detach().sum().item()
                stats["tokens"] += len(adv)
            first = False
            if n_tok == 0:
                continue
            DIST.sum_grads(policy + critic)
            stats["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(policy, cfg.max_grad_norm))
            if critic:
                stats["vf_grad_norm"] += float(torch.nn.utils.clip_grad_norm_(critic, cfg.max_grad_norm))
            stats["steps"] += 1
            set_warmup_lr(opt, cfg)
            opt.step()
            opt.zero_grad(set_to_none=True)
    agent.model.eval()
    n, steps = max(1, stats["tokens"]), max(1, stats["steps"])
    out = dict(loss=stats["loss"] / cfg.update_epochs, clipfrac=stats["clipfrac"] / n, entropy=stats["entropy"] / n,
               vloss=stats["vloss"] / cfg.update_epochs, agent_tokens=sum(len(t.response_ids) for t, _, _ in items),
               grad_norm=stats["grad_norm"] / steps, ratio_dev=stats["ratio_dev"] / max(1, stats["first_tokens"]),
               approx_kl=stats["approx_kl"] / n, logprobs_recomputed=recompute)
    if head is not None:
        out["vf_grad_norm"] = stats["vf_grad_norm"] / steps
    if ref is not None and cfg.beta > 0:
        out["ref_kl"] = stats["ref_kl"] / n
    return out


def iteration_tasks(cfg: Config, st: RLState, real: list[Task], rng: random.Random, phase: str):
    """tasks_per_iter tasks (generated ones capped at taskgen_share, dream only), each repeated G times."""
    generated = [Task.from_dict(d) for d in st.generated] if (cfg.taskgen and phase == "dream") else []
    tasks = dg.mix_tasks(real, generated, cfg.tasks_per_iter, cfg.taskgen_share, rng)
    batch = [t for t in tasks for _ in range(cfg.group_size)]
    groups = [i for i in range(len(tasks)) for _ in range(cfg.group_size)]
    return batch, groups


def curriculum(cfg: Config, st: RLState, exp_model: dg.ExperienceModel, real: list[Task], log):
    """Pick the highest-variance seed tasks, real or generated, among the groups played since the last
    round (older variances describe an older policy), and let M_task write variations of them."""
    values = {tid: dg.reward_variance(r) for tid, r in st.task_rewards.items()}
    pool = {t.id: t for t in real + [Task.from_dict(d) for d in st.generated]}
    seeds = [pool[tid] for tid in dg.TaskGenerator.select(values, cfg.taskgen_seeds) if tid in pool]
    tiny = cfg.exp_model.startswith("tiny") and not cfg.exp_endpoint
    vocab = {w for t in real for w in dg.task_words(t.instruction + " " + t.init_state)} if tiny else None
    gen = dg.TaskGenerator(exp_model.lm, judge=cfg.taskgen_judge, vocabulary=vocab)
    known = {t.init_state for t in real} | {d["init_state"] for d in st.generated}
    new = gen.generate(seeds, cfg.taskgen_per_seed, known, first_seed=st.generated_count,
                       # its own seeded sampler: a resumed run samples the same tasks on any device
                       generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.iteration))
    st.generated_count += gen.stats["candidates"]
    keep = max(cfg.tasks_per_iter * 4, 1)                # a bounded pool of the freshest variations
    st.generated = (st.generated + [t.to_dict() for t in new])[-keep:]
    st.task_rewards = {}
    log(stage="taskgen", iteration=st.iteration, seeds=len(seeds), accepted=len(new),
        malformed=gen.stats["malformed"], unknown_words=gen.stats["unknown_words"], duplicate=gen.stats["duplicate"],
        judged_out=gen.stats["judged_out"], pool=len(st.generated))


def next_phase(cfg: Config, st: RLState) -> str | None:
    """dream: `iterations` dreamed iterations. real: `iterations` real ones (or until `real_budget`).
    s2r: `iterations` dreamed ones, then real ones until `s2r_real_budget` real transitions."""
    if cfg.mode == "dream":
        return "dream" if st.iteration < cfg.iterations else None
    if cfg.mode == "real":
        over = cfg.real_budget and st.real_transitions >= cfg.real_budget
        return "real" if st.iteration < cfg.iterations and not over else None
    if st.iteration < cfg.iterations:
        return "dream"
    return "real" if st.real_transitions < cfg.s2r_real_budget else None


def rl(cfg: Config, agent, exp_model, buffer, real_tasks, dev, log, ref=None, eval_fn=None):
    """The DreamGym loop. mode dream: every rollout is dreamed by M_exp; real: the same loop against
    the real env; s2r: dream for `iterations`, then real RL until `s2r_real_budget` transitions."""
    ckdir = os.path.join(cfg.out, "ckpt")
    head = ValueHead(agent.model.config.hidden_size).to(dev) if cfg.algo == "ppo" else None
    params = [p for p in agent.model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    st, rng = RLState(), random.Random(cfg.seed + 7)          # rng: the same task draws on every rank
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * DIST.rank)   # each rank samples its own rollouts
    if (ck := resume_point(cfg)) is not None:      # the checkpoint (its buffer snapshot included) is the truth
        st = RLState(**load_checkpoint(ck, agent, opt, head, buffer, rng, gen))
        log.truncate_after(st.iteration)
        print(f"resumed from {ck} at iteration {st.iteration}")
    else:
        restart_rl(buffer, log)
    sampling = dg.agent_sampling(cfg.temperature)
    max_steps = envs.max_steps(cfg.env)
    if cfg.select_agent and eval_fn is not None and st.selected_iteration < 0:      # the warm start: iteration 0
        warm = eval_fn(agent) if DIST.main else None
        log(stage="curve", iteration=0, fold=cfg.curve_fold, curve_success=warm)
        update_selection(cfg, st, agent, warm)
    bar = tqdm(total=cfg.iterations, initial=min(st.iteration, cfg.iterations), desc=f"RL {cfg.mode}/{cfg.algo}",
               disable=not DIST.main)
    while (phase := next_phase(cfg, st)) is not None:
        st.phase = phase
        t0, exp_failed = time.time(), exp_model.stats["failed"] if exp_model else 0
        batch, groups = iteration_tasks(cfg, st, real_tasks, rng, phase)
        n_generated = sum(t.synthetic for t in batch) // max(1, cfg.group_size)
        mine = [i for i, g in enumerate(groups) if g % DIST.world == DIST.rank]     # this rank's groups
        batch, groups = [batch[i] for i in mine], [groups[i] for i in mine]
        env = dg.DreamEnv(exp_model, max_steps, st.iteration, cfg.dream_validity) if phase == "dream" else dg.make_real_env(cfg.env, len(batch))
        episodes = dg.run_episodes(agent, env, batch, sampling, cfg.history, groups, generator=gen)
        upd = update_policy(agent, opt, episodes, cfg, head, ref)
        # keep every rank's buffer and curriculum identical: gather, then apply in rank order
        shared = DIST.gather(([t.to_dict() for e in episodes for t in e.transitions],
                              {e.task.id: [x.reward for x in dg.learnable(episodes) if x.group == e.group]
                               for e in episodes},
                              [(e.reward, e.success, e.format_errors, len(e.turns), e.exp_failed) for e in episodes]))
        transitions = [dg.Transition.from_dict(d) for rank_tr, _, _ in shared for d in rank_tr]
        summary = [x for _, _, rank_sum in shared for x in rank_sum]
        for _, rewards, _ in shared:
            st.task_rewards.update(rewards)
        if phase == "real":
            st.real_transitions += len(transitions)
        else:
            st.dream_transitions += len(transitions)
            if cfg.add_to_buffer and buffer is not None:
                buffer.add([t for t in transitions if not t.invalid])
                crash_point("rl.buffer_add")
        row = dict(stage="rl", iteration=st.iteration, phase=phase, **rollout_stats(summary),
                   generated_tasks=n_generated,
                   invalid_actions=sum(t.invalid for t in transitions),
                   real_transitions=st.real_transitions, dream_transitions=st.dream_transitions,
                   exp_failed=(exp_model.stats["failed"] - exp_failed) if exp_model else 0,
                   secs=round(time.time() - t0, 1), **upd)
        st.iteration += 1
        if phase == "dream" and cfg.taskgen and cfg.taskgen_share > 0 and st.iteration % cfg.taskgen_every == 0:
            if DIST.main:
                curriculum(cfg, st, exp_model, real_tasks, log)
            st.generated, st.generated_count, st.task_rewards = DIST.broadcast(
                (st.generated, st.generated_count, st.task_rewards))
        if eval_fn is not None and cfg.eval_every and (st.iteration % cfg.eval_every == 0 or next_phase(cfg, st) is None):
            row["curve_success"] = eval_fn(agent) if DIST.main else None
            if cfg.select_agent:
                update_selection(cfg, st, agent, row["curve_success"])
        log(**row)
        crash_point("rl.logged")
        bar.update(1)
        if st.iteration % cfg.ckpt_every == 0 or next_phase(cfg, st) is None:
            save_checkpoint(ckdir, agent, opt, head, buffer, dataclasses.asdict(st), rng, gen)
    bar.close()
    return st


def rollout_stats(summary: list[tuple]) -> dict:
    """An RL row's rollout numbers from (reward, success, format_errors, turns, exp_failed) per episode.
    Reward and success count the episodes the update learns from: one that M_exp ended by failing to
    simulate a step is left out (None when every episode was), as update_policy leaves it out."""
    kept = [x for x in summary if not x[4]]
    mean = lambda i: float(np.mean([x[i] for x in kept])) if kept else None
    return dict(reward=mean(0), success=mean(1),
                format_error=sum(x[2] for x in summary) / max(1, sum(x[3] for x in summary)),
                turns=float(np.mean([x[3] for x in summary])) if summary else 0.0,
                exp_failed_episodes=sum(bool(x[4]) for x in summary))


def rl_traces(run_dir: str) -> dict[str, int]:
    """Traces of RL iterations in a run folder, whatever its checkpoints say: {where: the highest
    iteration seen} for metrics.jsonl's RL rows and buffer.jsonl's dreamed transitions."""
    out = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        its = [r["iteration"] for r in Log(path).rows() if r.get("stage") == "rl"]
        if its:
            out["metrics.jsonl"] = max(its)
    path = os.path.join(run_dir, "buffer.jsonl")
    if os.path.exists(path):
        its = []
        with open(path) as f:
            for line in f:                    # real rows are most of it: skip them unparsed
                if line.strip() and '"source": "real"' not in line:
                    try:
                        its.append(json.loads(line).get("iteration", 0))
                    except json.JSONDecodeError:  # a write cut short by a kill; load drops it
                        pass
        if its:
            out["buffer.jsonl"] = max(its)
    return out


def resume_point(cfg: Config) -> str | None:
    """The checkpoint RL continues from (None: RL starts at iteration 0). A run folder that cannot be
    continued exactly raises ValueError (one line): RL progress without --resume, a damaged
    checkpoint pointer, or RL iterations past the first checkpoint's but no checkpoint. Traces of an
    unfinished first checkpoint interval alone are dropped by restart_rl (the run restarts exactly)."""
    ck = latest_checkpoint(cfg.out)
    traces = rl_traces(cfg.out)
    if (ck or traces) and not cfg.resume:
        raise ValueError(f"--out {cfg.out} already holds {'a checkpoint' if ck else 'RL progress'}: "
                         f"pass --resume to continue it, or choose a new --out")
    if ck is None and traces and max(traces.values()) >= cfg.ckpt_every:
        seen = ", ".join(f"{k} up to iteration {v}" for k, v in traces.items())
        raise ValueError(f"--resume: {cfg.out} holds RL progress ({seen}) but no checkpoint in "
                         f"{os.path.join(cfg.out, 'ckpt')}: it cannot continue exactly; choose a new --out")
    return ck


def restart_rl(buffer, log: Log):
    """RL starts at iteration 0: what a run killed before its first checkpoint left (dreamed
    transitions in the buffer, its RL/curve metrics rows) is dropped, so the restart is exact."""
    dropped = 0
    if buffer is not None and any(t.source != "real" for t in buffer.items):
        keep = [i for i, t in enumerate(buffer.items) if t.source == "real"]
        dropped = len(buffer.items) - len(keep)
        buffer.items, buffer.emb = [buffer.items[i] for i in keep], buffer.emb[keep]
        if buffer.path and DIST.main:
            buffer.save(buffer.path)
    rows = log.truncate_after(0)
    if dropped or rows:
        print(f"no checkpoint yet: RL restarts at iteration 0 (dropped {dropped} dreamed transitions and "
              f"{rows} metrics rows of the unfinished first iterations)")


def update_selection(cfg: Config, st: RLState, agent, success: float | None):
    """Model selection on the held-out curve fold (never the evaluation fold): the selected agent is
    the one with the best curve success so far, the warm start included. A tie selects the later agent:
    the greedy dev success takes few distinct values on small folds, and a tie rule alone must not pick
    the warm start. Saved (atomically, with its tokenizer: `eval.py agent --ckpt <run>/agent_selected`
    loads it) before the checkpoint that records it, so a resumed run never points at a missing file.
    Rank 0 only."""
    if DIST.main and success >= st.selected_curve_success:
        st.selected_curve_success, st.selected_iteration = success, st.iteration
        save_agent(agent, os.path.join(cfg.out, "agent_selected"))



# ============================================================================ evaluation, plots, main
def fidelity_table(cfg: Config, fold: str, n_traj: int = 150) -> dict:
    """M_exp fidelity on held-out real transitions (reward/done/state accuracy, parse failures)."""
    exp_model, _ = offline_exp_model(cfg)
    return dg.fidelity(exp_model, dg.heldout_transitions(cfg.env, fold, n_traj))


def dream_gap_table(cfg: Config, agent_path: str, n_tasks: int = 64) -> dict:
    """dg.dream_gap of an agent checkpoint on `n_tasks` train tasks (drawn with the run's seed)."""
    exp_model, tasks = offline_exp_model(cfg)
    agent = load_lm(cfg, agent_path, device_of(cfg.device), trainable=False)
    rng = random.Random(cfg.seed)
    return dg.dream_gap(agent, exp_model, [rng.choice(tasks) for _ in range(n_tasks)], envs.max_steps(cfg.env),
                        cfg.history, cfg.dream_validity, cfg.seed)


def offline_exp_model(cfg: Config) -> tuple[dg.ExperienceModel, list[Task]]:
    """A run's M_exp and its seed tasks, retrieving from the offline real data only: a finished run's
    buffer also holds its dreamed transitions, which would make a measurement depend on how long the
    run dreamed (the restricted buffer is in memory only: the run's files stay)."""
    encoder = dg.Encoder()
    trajs = annotated_trajectories(cfg)
    buffer = build_buffer(cfg, trajs, encoder) if cfg.retrieval else None
    if buffer is not None and any(t.source != "real" for t in buffer.items):
        keep = [i for i, t in enumerate(buffer.items) if t.source == "real"]
        real = dg.ReplayBuffer(encoder, cfg.buffer_capacity)
        real.add([buffer.items[i] for i in keep], buffer.emb[keep])
        buffer = real
    tasks = seed_tasks(trajs)
    return experience_model(cfg, trajs, tasks, buffer, encoder, device_of(cfg.device), None), tasks


def annotated_trajectories(cfg: Config):
    rows = offline_data(cfg)
    trajs = dg.trajectories(rows)
    name = "reasoning2-" if cfg.annotator == "rule" else f"teacher-{cfg.teacher_model.replace('/', '_')}-"
    cache = os.path.join(cfg.data_dir, "offline", name + os.path.basename(offline_path(cfg)))
    if cfg.annotator == "rule":
        annotator = dg.RuleAnnotator()
    elif cfg.teacher_endpoint:
        annotator = dg.TeacherAnnotator(dg.EndpointLM(cfg.teacher_endpoint, cfg.teacher_model))
    else:
        annotator = dg.TeacherAnnotator(load_lm(cfg, cfg.teacher_model, device_of(cfg.device), trainable=False))
    skipped = dg.annotate_offline(trajs, annotator, cache)
    if skipped:
        print(f"teacher annotation: {skipped} trajectories stayed malformed and are left without reasoning")
    return [tr for tr in trajs if tr[0].reasoning or cfg.annotator == "rule"]


def logged_eval(log: Log, which: str, fold: str, episodes: int) -> dict | None:
    """An evaluation this run folder already logged (its metrics row, floats as logged), so a resumed
    run neither repeats it nor logs it twice; None if there is none."""
    for r in reversed(log.rows()):
        if r.get("stage") == "eval" and r.get("which") == which and r.get("fold") == fold \
                and r.get("episodes") == episodes:
            return {k: v for k, v in r.items() if k not in ("stage", "which", "fold")}
    return None


def offline_path(cfg: Config) -> str:
    name = (f"{cfg.env.replace(':', '_').replace(',', '_').replace('=', '')}-e{cfg.offline_expert}"
            f"-n{cfg.offline_noisy}-r{cfg.offline_random}-eps{cfg.offline_epsilon}-s{cfg.seed}-v{COLLECT_VERSION}")
    return os.path.join(cfg.data_dir, "offline", name + ".jsonl")


def run(cfg: Config) -> dict:
    """The whole pipeline for one config; returns the results (also written to results.json)."""
    preflight(cfg)
    DIST.setup()
    os.makedirs(cfg.out, exist_ok=True)
    if DIST.main:
        write_json(os.path.join(cfg.out, "config.json"), dataclasses.asdict(cfg))
    seed_all(cfg.seed)
    dev = device_of(cfg.device)
    log = Log(os.path.join(cfg.out, "metrics.jsonl"))
    res_path = os.path.join(cfg.out, "results.json")
    results = json.load(open(res_path)) if os.path.exists(res_path) else {}

    # offline data and the buffer: rank 0 builds and caches them, then the other ranks load them
    if not DIST.main:
        DIST.barrier()
    trajs = annotated_trajectories(cfg)
    tasks = seed_tasks(trajs)
    encoder = dg.Encoder() if (cfg.retrieval or cfg.taskgen) else None
    buffer = build_buffer(cfg, trajs, encoder) if cfg.retrieval else None
    if DIST.main:
        DIST.barrier()
    # real-env RL needs no M_exp, but a tiny agent starts from its weights (agent_init="exp")
    need_exp_model = cfg.mode != "real" or (cfg.agent_init == "exp" and cfg.agent_model.startswith("tiny"))
    exp_model = experience_model(cfg, trajs, tasks, buffer, encoder, dev, log) if need_exp_model else None
    agent, n_warm = warm_start(cfg, trajs, tasks, dev, log)
    results["offline_transitions"] = sum(len(t) for t in trajs)
    results["warm_transitions"] = n_warm
    if "warm" not in results and DIST.main:
        results["warm"] = logged_eval(log, "warm start", cfg.eval_fold, cfg.eval_episodes)
        if results["warm"] is None:              # not yet evaluated (a resumed run finds it logged)
            results["warm"] = dg.evaluate_agent(agent, cfg.env, cfg.eval_fold, cfg.eval_episodes, cfg.history)
            log(stage="eval", which="warm start", fold=cfg.eval_fold, **results["warm"])
    ref = None
    if cfg.beta > 0 and hasattr(agent.model, "peft_config"):     # LoRA: the warm start's adapter, frozen
        ref = AdapterReference(agent.model)                      # (before a resumed checkpoint loads)
    elif cfg.beta > 0:
        ref = load_lm(cfg, cfg.warm_ckpt or os.path.join(cfg.out, "agent_warm"), dev, trainable=False,
                      name=cfg.agent_model)
    curve = lambda a: dg.evaluate_agent(a, cfg.env, cfg.curve_fold, cfg.curve_episodes, cfg.history)["success"]
    st = rl(cfg, agent, exp_model, buffer, tasks, dev, log, ref, curve)
    results["rl_real_transitions"] = st.real_transitions
    results["rl_dream_transitions"] = st.dream_transitions
    if DIST.world > 1:
        write_json(os.path.join(cfg.out, f"rank{DIST.rank}.json"), fingerprint(agent, buffer))
    if DIST.main:
        results["final"] = dg.evaluate_agent(agent, cfg.env, cfg.eval_fold, cfg.eval_episodes, cfg.history)
        if cfg.select_agent and st.selected_iteration >= 0:
            results["selected_iteration"] = st.selected_iteration
            results["selected_curve_success"] = st.selected_curve_success
            if st.selected_iteration != st.iteration:     # the last agent is reported too, as "last"
                results["last"] = results["final"]
                load_agent_weights(agent, os.path.join(cfg.out, "agent_selected"))
                results["final"] = dg.evaluate_agent(agent, cfg.env, cfg.eval_fold, cfg.eval_episodes, cfg.history)
        log(stage="eval", which="final", fold=cfg.eval_fold, **results["final"])
        write_json(res_path, results)
        plot_curves(log, os.path.join(cfg.out, "curves.png"))
    DIST.barrier()
    return results



def main(argv=None):
    exit_on_sigterm()
    cfg = parse_args(argv)
    try:
        preflight(cfg)
    except ValueError as e:
        fail(e)
    t0 = time.time()
    res = run(cfg)
    if not DIST.main:
        return
    name = {"dream": "DreamGym", "real": "real-env", "s2r": "DreamGym-S2R"}[cfg.mode] + "-" + cfg.algo.upper()
    rows = [dict(method="SFT warm start", real_transitions=res["warm_transitions"],
                 success=f"{res['warm']['success']:.3f}"),
            dict(method=f"{name}, last agent", real_transitions=res["warm_transitions"] + res["rl_real_transitions"],
                 success=f"{res.get('last', res['final'])['success']:.3f}")]
    if "selected_iteration" in res:
        it = res["selected_iteration"]
        which = "the warm start" if it == 0 else f"iteration {it}"
        rows.append(dict(method=f"{name}, {cfg.curve_fold}-selected ({which})",
                         real_transitions=rows[-1]["real_transitions"], success=f"{res['final']['success']:.3f}"))
    print(f"\n{cfg.env}, {cfg.eval_fold} fold, {cfg.eval_episodes} episodes "
          f"(offline data for M_exp: {res['offline_transitions']} real transitions); {time.time() - t0:.0f}s")
    print(format_table(rows, ["method", "real_transitions", "success"]))
    print(f"curves: {os.path.join(cfg.out, 'curves.png')}")


if __name__ == "__main__":
    main()
