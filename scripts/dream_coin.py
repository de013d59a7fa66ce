"""Where does the dream put the coin? A run's warm start (greedy) plays train tasks of `coin` in the
run's dream, once with M_exp greedy and once sampled at T = 1 (retrieval from the offline real data,
as `eval.py gap`). Each task's real coin room is where its offline expert trajectory took the coin.
Counted over every dreamed room entry: the coin shown in the real coin room, the coin shown in
another room; over every return to a room seen earlier in the episode: its `you see:` line changed.
Run from the repository root:
    python scripts/dream_coin.py --run runs/default [--tasks 64]
"""
import argparse
import collections
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamgym as dg  # noqa: E402
import envs  # noqa: E402
import eval as ev  # noqa: E402
import train  # noqa: E402
from envs.textworld import state_fields as fields  # noqa: E402
from runtime import device_of  # noqa: E402


def coin_rooms(cfg) -> dict:
    """train seed -> the room where the expert took the coin."""
    out = {}
    for tr in train.annotated_trajectories(cfg):
        if train.traj_policy(tr) == "expert":
            for t in tr:
                if t.action == "take coin":
                    out[t.task.seed] = fields(t.state).get("room")
    return out


def count(episodes, truth: dict) -> collections.Counter:
    st = collections.Counter(episodes=len(episodes))
    for e in episodes:
        st["success"] += e.success
        seen = {}
        for s in [e.transitions[0].state] + [t.next_state for t in e.transitions]:
            f = fields(s)
            room = f.get("room")
            if not room or room == "-":
                continue
            coin = "take coin" in (dg.parse_state_actions(s) or [])
            real = room == truth[e.task.seed]
            st["entries"] += 1
            st["real_room_entries"] += real
            st["coin_in_real_room"] += coin and real
            st["coin_elsewhere"] += coin and not real
            if room in seen:
                st["returns"] += 1
                st["returns_changed"] += f.get("you see", "") != seen[room]
            else:
                seen[room] = f.get("you see", "")
    return st


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished train.py run on coin (its exp_model and agent_warm)")
    ap.add_argument("--agent", default="agent_warm")
    ap.add_argument("--tasks", type=int, default=64)
    a = ap.parse_args()
    cfg = ev.run_config(a.run, {})
    if not cfg.env.startswith("coin"):
        raise SystemExit(f"error: {a.run} plays {cfg.env}; this count is for coin")
    truth = coin_rooms(cfg)
    agent = train.load_lm(cfg, os.path.join(a.run, a.agent), device_of(cfg.device), trainable=False)
    for temperature in (0.0, 1.0):
        cfg.exp_temperature = temperature
        exp_model, tasks = train.offline_exp_model(cfg)
        known = [t for t in tasks if t.seed in truth]
        rng = random.Random(cfg.seed)
        pick = [rng.choice(known) for _ in range(a.tasks)]
        eps = dg.dream_episodes(agent, exp_model, pick, envs.max_steps(cfg.env), cfg.history, cfg.dream_validity,
                                cfg.seed)
        st = count(eps, truth)
        print(f"M_exp T={temperature:g}: {st['episodes']} dreamed episodes, success {st['success']}; "
              f"{st['entries']} room entries, {st['real_room_entries']} of them the real coin room; coin shown "
              f"there {st['coin_in_real_room']}, in another room {st['coin_elsewhere']}; "
              f"{st['returns']} returns to a room, contents changed on {st['returns_changed']}", flush=True)


if __name__ == "__main__":
    main()
