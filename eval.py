"""Evaluation: an agent's success in the real environment, and an experience model's fidelity.

    python eval.py agent --ckpt runs/default/agent_selected --fold test --episodes 200   # or <run>/ckpt/<version>/agent
    python eval.py fidelity --run runs/default --fold test      # reward/done/state accuracy of M_exp
    python eval.py gap --run runs/default --agent agent_warm    # the same agent, real env vs the dream

Agents are evaluated greedily (temperature 0) on the first `episodes` seeds of a held-out fold,
batched, so the same checkpoint always gets the same number; `--temperature 1 --samples 4` measures
the sampled policy that RL trains (seeded, so also reproducible).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

import envs
import train
from dreamgym import eval_tasks, evaluate_agent, fidelity, heldout_transitions, token_f1  # noqa: F401
from envs.collect import read_jsonl, write_jsonl
from runtime import copy_checkpoint, device_of, exit_on_sigterm, format_table, latest_checkpoint, write_json


# ----------------------------------------------------------------------------- the Table 1 suite
# (name, Config overrides, trains its own experience model?). The first method trains the shared
# experience model and warm-start agent of its seed; the others reuse them, except the two ablations
# whose experience model is trained differently.
METHODS = [
    ("DreamGym-GRPO", dict(mode="dream", algo="grpo"), True),
    ("GRPO (real env)", dict(mode="real", algo="grpo"), False),
    ("DreamGym-S2R-GRPO", dict(mode="s2r", algo="grpo"), False),
    ("PPO (real env)", dict(mode="real", algo="ppo"), False),
    ("DreamGym-PPO", dict(mode="dream", algo="ppo"), False),
    ("DreamGym-S2R-PPO", dict(mode="s2r", algo="ppo"), False),
    ("ablation: no replay retrieval", dict(mode="dream", algo="grpo", retrieval=False), True),
    ("ablation: no experience reasoning", dict(mode="dream", algo="grpo", reasoning=False), True),
    ("ablation: no task generation", dict(mode="dream", algo="grpo", taskgen=False), False),
]


def collapsed(final: dict) -> bool:
    """A greedy agent that lost the output format (>= 25% malformed turns) or stopped choosing
    listed actions (>= 75% invalid; the default game's warm start makes under 1%). The table applies it to each run's
    last agent, which select_agent may not report: it says how stable the RL was, not what was reported."""
    return final["format_error"] >= 0.25 or final["invalid"] >= 0.75


SAMPLES = 4          # sampled evaluation: each test task played 4 times at temperature 1


def sampled_successes(cfg, run_dir: str, seed: int, which=("warm", "final")) -> dict:
    """Test success of the warm start and/or of the run's final agent at temperature 1 (SAMPLES per
    task, seeded by the run's seed), next to the greedy numbers train.run reports."""
    dev = device_of(cfg.device)
    selected = os.path.join(run_dir, "agent_selected")    # select_agent: the reported agent is the curve-fold best
    ck = latest_checkpoint(run_dir)
    last = os.path.join(ck, "agent") if ck else None
    paths = {"warm": cfg.warm_ckpt or os.path.join(run_dir, "agent_warm"),
             "final": selected if cfg.select_agent and os.path.exists(selected) else last, "last": last}
    out = {}
    for key, path in ((f"{w}_sampled", paths[w]) for w in which):
        agent = train.load_lm(cfg, path, dev, trainable=False)
        out[key] = evaluate_agent(agent, cfg.env, cfg.eval_fold, cfg.eval_episodes, cfg.history, temperature=1.0,
                                  samples=SAMPLES, seed=seed)
    return out


def mean_std(xs: list[float]) -> str:
    return f"{100 * np.mean(xs):.1f} ± {100 * np.std(xs):.1f}" if xs else "-"


def paired_bootstrap(base: list[list[float]], other: list[list[float]], n_boot: int = 10_000, seed: int = 0):
    """Mean difference other - base and its 95% percentile bootstrap interval, paired twice: by RL seed
    (base[s] and other[s] come from the same seed) and by task (base[s][j] and other[s][j] are the same
    test task). Each resample draws seeds with replacement, then tasks with replacement, so the interval
    covers both the run-to-run and the task-sampling noise. Returns (mean, low, high)."""
    a, b = np.asarray(base, float), np.asarray(other, float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs equal [seeds, tasks] arrays, got {a.shape} and {b.shape}")
    d = b - a
    rng = np.random.default_rng(seed)
    S, T = d.shape
    si = rng.integers(0, S, (n_boot, S))
    ti = rng.integers(0, T, (n_boot, S, T))
    boots = d[si[:, :, None], ti].mean(axis=(1, 2))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def diff_text(base: list[dict], other: list[dict]) -> str:
    """'+4.2 [+0.8, +7.9]' (percentage points) from two lists of per-seed evaluation dicts."""
    if not all("per_task" in r for r in base + other):
        return "-"
    m, lo, hi = paired_bootstrap([r["per_task"] for r in base], [r["per_task"] for r in other])
    return f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def reuse_dream_phase(cfg, base_dir: str, algo: str):
    """S2R's first `iterations` are exactly the same-seed DreamGym run (same config but the mode, same
    RNG streams), so an S2R run that has not started continues that run's last checkpoint (with its
    curve history and selected agent) into the real phase instead of dreaming it all again."""
    name = next(n for n, o, _ in METHODS if o == dict(mode="dream", algo=algo))
    dream = os.path.join(base_dir, name.replace(" ", "_"))
    if latest_checkpoint(cfg.out) or not os.path.exists(os.path.join(dream, "results.json")):
        return
    os.makedirs(cfg.out, exist_ok=True)
    if os.path.exists(os.path.join(dream, "agent_selected")):
        shutil.copytree(os.path.join(dream, "agent_selected"), os.path.join(cfg.out, "agent_selected"))
    rows = [r for r in read_jsonl(os.path.join(dream, "metrics.jsonl")) if r.get("stage") != "eval"]
    write_jsonl(os.path.join(cfg.out, "metrics.jsonl"), rows)      # its own evaluations are redone
    copy_checkpoint(dream, cfg.out)
    cfg.resume = True


def table_suite(out: str, seeds: list[int], overrides: dict, methods: list[str] | None = None,
                sampled: bool = False, with_fidelity: bool = True) -> str:
    """Every method of METHODS for every seed (each run cached in its folder, so an interrupted
    suite resumes), then the table: success on the held-out test fold, mean ± std over seeds
    (greedy; with `sampled`, also at temperature 1, SAMPLES plays per task, cached in results.json)."""
    chosen = [m for m in METHODS if methods is None or m[0] in methods]
    results = {name: [] for name, _, _ in chosen}
    fid = {}
    for seed in seeds:
        base_dir = os.path.join(out, f"seed{seed}")
        first = os.path.join(base_dir, METHODS[0][0].replace(" ", "_"))
        given = {k: overrides[k].replace("{seed}", str(seed)) for k in ("exp_ckpt", "warm_ckpt") if overrides.get(k)}
        for name, over, own_exp_model in chosen:
            run_dir = os.path.join(base_dir, name.replace(" ", "_").replace(":", ""))
            # resume: the table's own folders; a run an interrupted suite left continues exactly
            cfg = train.Config(**{**overrides, **given, **over, "seed": seed, "out": run_dir, "resume": True})
            if run_dir != first:                  # reuse the seed's first M_exp / warm start unless given
                cfg.warm_ckpt = given.get("warm_ckpt") or os.path.join(first, "agent_warm")
                # the retrieval / reasoning ablations always train their own M_exp, even when the
                # others share a given one: their M_exp is trained differently
                cfg.exp_ckpt = "" if own_exp_model else (given.get("exp_ckpt") or os.path.join(first, "exp_model"))
            cfg.validate()
            if over["mode"] == "s2r":
                reuse_dream_phase(cfg, base_dir, over["algo"])
            res_file = os.path.join(run_dir, "results.json")
            res = json.load(open(res_file)) if os.path.exists(res_file) else train.run(cfg)
            which = (("warm",) if name == chosen[0][0] else ()) + ("final",) + (("last",) if "last" in res else ())
            need = [w for w in which if sampled and f"{w}_sampled" not in res]
            if need:
                res.update(sampled_successes(cfg, run_dir, seed, need))
                write_json(res_file, res)
            results[name].append(res)
            if with_fidelity and own_exp_model and not cfg.exp_ckpt:      # a given, shared M_exp: once, by hand
                key = {"DreamGym-GRPO": "full"}.get(name, name.split(": ")[-1])
                fid.setdefault(key, []).append(train.fidelity_table(cfg, cfg.eval_fold))
    first = results[chosen[0][0]]
    # two protocols, both reported: the last agent (a fixed budget of iterations) and the dev-selected
    # one (select_agent; "selected" = its iteration per seed, 0 = the warm start). Each RL row is compared
    # with the warm start of the same seed on the same test tasks: the mean difference in points with a
    # 95% bootstrap interval over seeds and tasks (paired_bootstrap).
    last = lambda r, k="": r.get("last" + k, r["final" + k])
    warm = [r["warm"] for r in first]
    cols = (["method", "real_transitions", "success_last", "vs_sft_last", "success", "vs_sft", "selected"] +
            (["sampled_last", "vs_sft_sampled"] if sampled else []) + ["invalid", "steps", "collapsed"])
    rows = [dict(method="SFT (warm start)", real_transitions=int(np.mean([r["warm_transitions"] for r in first])),
                 success=mean_std([w["success"] for w in warm]), invalid=mean_std([w["invalid"] for w in warm]),
                 steps=f'{np.mean([w["steps"] for w in warm]):.2f}',
                 collapsed=f'{sum(collapsed(w) for w in warm)}/{len(first)}')]
    rows[0]["success_last"] = rows[0]["success"]
    if sampled:
        rows[0]["sampled_last"] = mean_std([r["warm_sampled"]["success"] for r in first])
    for name, _, _ in chosen:
        rs = results[name]
        rows.append(dict(method=name, real_transitions=int(np.mean([r["warm_transitions"] + r["rl_real_transitions"]
                                                                        for r in rs])),
                         success=mean_std([r["final"]["success"] for r in rs]),
                         vs_sft=diff_text(warm, [r["final"] for r in rs]),
                         collapsed=f'{sum(collapsed(last(r)) for r in rs)}/{len(rs)}',
                         selected=",".join(str(r.get("selected_iteration", "last")) for r in rs),
                         success_last=mean_std([last(r)["success"] for r in rs]),
                         vs_sft_last=diff_text(warm, [last(r) for r in rs]),
                         invalid=mean_std([last(r)["invalid"] for r in rs]),
                         steps=f'{np.mean([last(r)["steps"] for r in rs]):.2f}'))
        if sampled:
            rows[-1]["sampled_last"] = mean_std([last(r, "_sampled")["success"] for r in rs])
            rows[-1]["vs_sft_sampled"] = diff_text([r["warm_sampled"] for r in first], [last(r, "_sampled") for r in rs])
    text = format_table(rows, cols)
    if fid:
        frows = [dict(model=k, **{m: mean_std([f[m] for f in v]) for m in
                                  ("reward_acc", "reward_acc_pos", "done_acc", "invalid_detect", "state_exact",
                                   "state_f1", "parse_fail")}) for k, v in fid.items()]
        text += "\n\nexperience-model fidelity on held-out real transitions (%):\n" + format_table(
            frows, ["model", "reward_acc", "reward_acc_pos", "done_acc", "invalid_detect", "state_exact",
                    "state_f1", "parse_fail"])
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    return text


# ----------------------------------------------------------------------------- command line
def set_overrides(pairs: list[str]) -> dict:
    """`--set k=v ...` as Config fields, each value parsed by train.py's own flag for it."""
    out = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        out[k] = train.parse_args([f"--{k}", v]).__dict__[k]
    return out


def run_config(run_dir: str, overrides: dict | None = None) -> train.Config:
    with open(os.path.join(run_dir, "config.json")) as f:
        return train.Config(**{**json.load(f), **(overrides or {})})


def main(argv=None):
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("agent", help="real-env success of an agent checkpoint")
    a.add_argument("--ckpt", required=True)
    a.add_argument("--env", default=train.Config.env)
    a.add_argument("--fold", default="test", choices=["dev", "test"])
    a.add_argument("--episodes", type=int, default=100)
    a.add_argument("--history", type=int, default=3)
    a.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    a.add_argument("--samples", type=int, default=1, help="plays per task when sampling")
    f = sub.add_parser("fidelity", help="fidelity of a run's experience model on held-out transitions")
    f.add_argument("--run", required=True, help="a run folder (its exp_model, buffer and config.json)")
    f.add_argument("--fold", default="test", choices=["dev", "test"])
    f.add_argument("--trajectories", type=int, default=150)
    g = sub.add_parser("gap", help="one agent in the real env and in a run's dream, same train tasks: how "
                       "episodes end and how often the dreamed outcome is the real one")
    g.add_argument("--run", required=True, help="a run folder (its exp_model, buffer and config.json)")
    g.add_argument("--agent", default="agent_warm", help="an agent folder inside the run, or a path")
    g.add_argument("--tasks", type=int, default=64)
    g.add_argument("--set", nargs="*", default=[], help="Config overrides, e.g. exp_temperature=1.0")
    t = sub.add_parser("table", help="the paper's Table 1 + ablations on the built-in env, several seeds")
    t.add_argument("--out", default="runs/table")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--methods", nargs="*", default=None, help="a subset of the method names")
    t.add_argument("--config", default="", help="a JSON file of Config fields for every run (configs/*.json)")
    t.add_argument("--set", nargs="*", default=[], help="Config overrides for every run, e.g. iterations=20; "
                   "in exp_ckpt / warm_ckpt, {seed} stands for the run's seed (reuse another table's "
                   "per-seed warm starts: warm_ckpt=runs/table/seed{seed}/DreamGym-GRPO/agent_warm)")
    t.add_argument("--no_fidelity", action="store_true", help="skip the M_exp fidelity of each trained M_exp")
    t.add_argument("--sampled", action="store_true", help=f"also success at temperature 1 ({SAMPLES} plays per task)")
    args = p.parse_args(argv)
    if args.cmd == "table":
        try:
            over = train.load_config_file(args.config) if args.config else {}
        except ValueError as e:
            p.error(str(e))
        over.pop("out", None)
        over.update(set_overrides(args.set))
        print(table_suite(args.out, args.seeds, over, args.methods, args.sampled, not args.no_fidelity))
        return
    dev = device_of(train.Config.device)
    if args.cmd == "agent":
        envs.max_steps(args.env)
        agent = train.load_lm(train.Config(), args.ckpt, dev, trainable=False)
        print(json.dumps(evaluate_agent(agent, args.env, args.fold, args.episodes, args.history,
                                        temperature=args.temperature, samples=args.samples), indent=1))
    elif args.cmd == "gap":
        cfg = run_config(args.run, set_overrides(args.set))
        cfg.exp_ckpt = cfg.exp_ckpt or os.path.join(args.run, "exp_model")
        agent = args.agent if os.path.isdir(args.agent) else os.path.join(args.run, args.agent)
        print(json.dumps(train.dream_gap_table(cfg.validate(), agent, args.tasks), indent=1))
    else:
        print(json.dumps(train.fidelity_table(run_config(args.run), args.fold, args.trajectories), indent=1))


if __name__ == "__main__":
    main()
