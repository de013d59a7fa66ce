"""Collect offline real trajectories: the paper's "offline real-world data" that seeds everything.

The paper mixes expert demonstrations with oracle/random play so the data holds successes and
failures; we do the same with four policies in the real environment:
  expert    the env's observable expert when it has one (`env.observable_expert(state, history,
            instruction)`: a fixed rule of what the agent is shown), else its gold action sequence
            (`env.gold_actions()`),
  noisy     the expert, but each step is a random admissible action with probability `epsilon`,
  random    uniform over admissible actions, and with probability `p_invalid` an inadmissible one
            (so the experience model sees what invalid actions do: the episode fails),
  filtered  random play over admissible actions, kept only when it succeeds (up to `max_tries`
            attempts per kept trajectory): the successes for environments without an expert.
One JSON object per transition, deterministic given the seed. Run:
    python -m envs.collect --env twc --out data/offline/twc.jsonl
    python -m envs.collect --env miniwob:click-button --expert 20 --noisy 20 --random 20
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections import Counter, defaultdict

from tqdm import tqdm

from . import FOLD_SEEDS, Task, make_env, task_seeds

POLICIES = ("expert", "noisy", "random", "filtered")
# the version of what these policies do, part of every cached file name: bumped whenever an expert
# changes, so a run never reuses data another policy collected
COLLECT_VERSION = 3


def _choose(policy, rng, admissible, gold, pointer, epsilon, p_invalid, pool):
    """The next action and the new position in the gold sequence."""
    if policy == "random" and pool and rng.random() < p_invalid:
        bad = [a for a in pool if a not in admissible]
        if bad:
            return rng.choice(bad), pointer
    if policy in ("expert", "noisy"):
        while pointer < len(gold) and gold[pointer] not in admissible and policy == "expert":
            pointer += 1          # the gold path may hold actions our state abstraction drops
        if pointer < len(gold) and gold[pointer] in admissible and not (
                policy == "noisy" and rng.random() < epsilon):
            return gold[pointer], pointer + 1
        if policy == "noisy" and pointer < len(gold) and gold[pointer] not in admissible:
            pointer += 1
    return rng.choice(admissible) if admissible else "look around", pointer


def rollout(env, task: Task, policy: str, rng: random.Random, epsilon=0.3, p_invalid=0.1,
            pool=()) -> list[dict]:
    state, info = env.reset(task)
    observable = getattr(env, "observable_expert", None) if policy in ("expert", "noisy") else None
    gold = list(env.gold_actions()) if policy in ("expert", "noisy") and observable is None else []
    task = Task(**{**task.to_dict(), "instruction": info["instruction"]})
    traj, pointer, done, t, history = [], 0, False, 0, []
    while not done:
        if observable is not None:
            if policy == "noisy" and rng.random() < epsilon:
                action = rng.choice(info["admissible"]) if info["admissible"] else "look around"
            else:
                action = observable(state, history, info["instruction"])
        else:
            action, pointer = _choose(policy, rng, info["admissible"], gold, pointer, epsilon, p_invalid,
                                      pool)
        history.append((state, action))
        next_state, reward, done, next_info = env.step(action)
        traj.append(dict(task=task.to_dict(), t=t, state=state, action=action,
                         admissible=info["admissible"], next_state=next_state, reward=reward, done=done,
                         success=next_info["success"], invalid=next_info["invalid"], policy=policy,
                         # envs that report no `truncated` get it derived on load (dreamgym.trajectories)
                         **({"truncated": bool(next_info["truncated"])} if "truncated" in next_info else {})))
        state, info, t = next_state, next_info, t + 1
    return traj


def _seeds(env_spec, fold, n, rng) -> list[int]:
    """n distinct seeds of the fold when it has that many, else each seed in turn (small game sets)."""
    pool = list(task_seeds(env_spec, fold))
    if not pool:
        raise ValueError(f"{env_spec} has no tasks in the {fold} fold")
    if n <= len(pool):
        return rng.sample(pool, n)
    return [pool[i % len(pool)] for i in range(n)]


def _filtered(env, task, rng, max_tries) -> tuple[list[dict], int]:
    """Random admissible play until a trajectory succeeds; ([], tries) when none does."""
    for k in range(1, max_tries + 1):
        traj = rollout(env, task, "random", rng, p_invalid=0.0)
        if traj[-1]["success"]:
            for tr in traj:
                tr["policy"] = "filtered"
            return traj, k
    return [], max_tries


def collect(env_spec: str, n_expert: int, n_noisy: int, n_random: int, fold="train", seed=0,
            epsilon=0.3, p_invalid=0.1, progress=True, n_filtered: int = 0, max_tries: int = 50) -> list[dict]:
    """Trajectories on distinct seeds of `fold` (cycled if the fold is small), policies interleaved;
    returns flat transitions."""
    rng = random.Random(seed)
    plan = ["expert"] * n_expert + ["noisy"] * n_noisy + ["random"] * n_random + ["filtered"] * n_filtered
    seeds = _seeds(env_spec, fold, len(plan), rng)
    env = make_env(env_spec)
    has_expert = getattr(env, "observable_expert", None) is not None or hasattr(env, "gold_actions")
    if (n_expert or n_noisy) and not getattr(env, "has_expert", has_expert):
        raise ValueError(f"{env_spec} has no expert (gold_actions); collect with --random and --filtered")
    out, pool, seen, tries = [], [], Counter(), 0
    for s, policy in tqdm(list(zip(seeds, plan)), desc=f"collect {env_spec}", disable=not progress):
        task = Task(env_spec, fold, s)
        if policy == "filtered":
            traj, k = _filtered(env, task, rng, max_tries)
            tries += k
        else:
            traj = rollout(env, task, policy, rng, epsilon, p_invalid, pool)
        name = f"{env_spec}/{fold}/{s}/{policy}"
        seen[name] += 1
        for tr in traj:   # a repeated (seed, policy) pair gets its own trajectory id
            tr["traj"] = name if seen[name] == 1 else f"{name}#{seen[name] - 1}"
        pool = list({*pool[-200:], *(a for tr in traj for a in tr["admissible"])})  # other games' actions
        pool.sort()
        out.extend(traj)
    if n_filtered:
        kept = len({tr["traj"] for tr in out if tr["policy"] == "filtered"})
        print(f"filtered: kept {kept} successful random trajectories of {n_filtered} wanted in {tries} tries")
    return out


def summary(transitions: list[dict]) -> dict:
    trajs = defaultdict(list)
    for tr in transitions:
        trajs[tr["traj"]].append(tr)
    per = defaultdict(Counter)
    for name, steps in trajs.items():
        env_spec, policy = steps[0]["task"]["env"], steps[0]["policy"]
        ok = any(s["success"] for s in steps)
        for key in (env_spec, f"{env_spec}/{policy}"):
            per[key]["trajectories"] += 1
            per[key]["transitions"] += len(steps)
            per[key]["successes"] += ok
            per[key]["invalid"] += sum(s["invalid"] for s in steps)
    return {k: dict(v, success_rate=round(v["successes"] / v["trajectories"], 3)) for k, v in per.items()}


def print_summary(transitions: list[dict]):
    print(f"{'env/policy':<40}{'trajs':>7}{'trans':>8}{'success':>9}{'invalid':>9}")
    for k, v in sorted(summary(transitions).items()):
        print(f"{k:<40}{v['trajectories']:>7}{v['transitions']:>8}{v['success_rate']:>9.2f}{v['invalid']:>9}")


def write_jsonl(path: str, rows: list[dict]):
    """Atomic: write to a temporary file in the same folder, then rename over the target."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="twc")
    p.add_argument("--expert", type=int, default=400)
    p.add_argument("--noisy", type=int, default=400)
    p.add_argument("--random", type=int, default=200)
    p.add_argument("--filtered", type=int, default=0, help="successful random trajectories to keep")
    p.add_argument("--max-tries", type=int, default=50, help="random attempts per filtered trajectory")
    p.add_argument("--epsilon", type=float, default=0.3)
    p.add_argument("--p-invalid", type=float, default=0.1)
    p.add_argument("--fold", default="train", choices=sorted(FOLD_SEEDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = collect(a.env, a.expert, a.noisy, a.random, a.fold, a.seed, a.epsilon, a.p_invalid,
                   n_filtered=a.filtered, max_tries=a.max_tries)
    name = re.sub(r"[^\w.=,-]+", "_", a.env)   # specs may hold paths or URLs
    out = a.out or f"data/offline/{name}-{a.fold}-{a.seed}.jsonl"
    write_jsonl(out, rows)
    print_summary(rows)
    print(f"wrote {len(rows)} transitions to {out}")


if __name__ == "__main__":
    main()
