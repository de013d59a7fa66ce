"""The built-in real environment (real TextWorldExpress games) and offline data collection."""
import os

import pytest

from envs import BatchEnv, FOLD_SEEDS, Task, make_env, parse_spec
from envs.collect import collect, read_jsonl, summary, write_jsonl
from envs.textworld import parse_look, render_state

GAMES = ["twc", "cookingworld", "coin"]


@pytest.mark.parametrize("game", GAMES)
def test_reset_step_and_gold_path_succeeds(game):
    env = make_env(game)
    state, info = env.reset(Task(game, "train", 5))
    assert info["instruction"] and info["admissible"]
    assert state.split("\n")[-1] == "actions: " + " | ".join(info["admissible"])
    gold = [a for a in env.gold_actions() if a in info["admissible"] or a not in ("look around", "inventory")]
    total, done = 0.0, False
    for a in gold:
        if done or a in ("look around", "inventory"):
            continue
        assert a in info["admissible"], (a, info["admissible"])
        state, r, done, info = env.step(a)
        total += r
        assert r in (0.0, 1.0)
        assert r == 0.0 or done, "reward only at the final step"
    assert done and total == 1.0 and info["success"]


def test_invalid_action_fails_episode_or_costs_a_step():
    env = make_env("twc")
    s0, _ = env.reset(Task("twc", "train", 1))
    s, r, done, info = env.step("fly to the moon")
    assert done and r == 0.0 and info["invalid"] and not info["success"]
    assert s.startswith("feedback: Invalid action: fly to the moon.")
    with pytest.raises(RuntimeError):
        env.step("take coin")
    env = make_env("twc", invalid_action="step")
    env.reset(Task("twc", "train", 1))
    s, r, done, info = env.step(None)          # an unparseable turn
    assert not done and r == 0.0 and info["invalid"]
    assert s.split("\n")[1:] == s0.split("\n")[1:], "an invalid action changes nothing"


def test_step_limit_ends_episode():
    env = make_env("twc:max_steps=2")
    _, info = env.reset(Task("twc:max_steps=2", "train", 3))
    a = info["admissible"][0]
    _, _, done, info = env.step(a)
    assert not done
    _, _, done, info = env.step(info["admissible"][0])
    assert done and not info["success"] and info["truncated"], "the budget truncates, it does not terminate"
    env = make_env("twc")
    env.reset(Task("twc", "train", 3))
    _, _, done, info = env.step("fly to the moon")
    assert done and not info["truncated"], "an invalid action terminates the episode"


def test_folds_are_disjoint_and_enforced():
    folds = [set(FOLD_SEEDS[f]) for f in ("train", "dev", "test")]
    assert not (folds[0] & folds[1]) and not (folds[0] & folds[2]) and not (folds[1] & folds[2])
    env = make_env("twc")
    with pytest.raises(ValueError, match="not in the train fold"):
        env.reset(Task("twc", "train", 20000))
    s_train, _ = env.reset(Task("twc", "train", 0))
    s_test, _ = env.reset(Task("twc", "test", 20000))
    assert s_train != s_test
    generated = Task("twc", "generated", 1, init_state="...", parent="twc/train/0")
    with pytest.raises(ValueError, match="only run in the dream"):
        env.reset(generated)


def test_episodes_share_one_jvm_and_stay_independent():
    """Interleaved episodes on the shared backend give the same states as run alone."""
    tasks = [Task("twc", "train", s) for s in (11, 12, 13)]
    alone = []
    for t in tasks:
        e = make_env("twc")
        s, info = e.reset(t)
        s, *_ = e.step(info["admissible"][-1])
        alone.append(s)
    batch = BatchEnv(lambda: make_env("twc"), 3)
    infos = batch.reset(tasks)
    res = batch.step({i: info["admissible"][-1] for i, (_, info) in enumerate(infos)})
    assert [res[i].state for i in range(3)] == alone


def test_spec_validation():
    assert parse_spec("twc:numItemsToPutAway=2,max_steps=20").max_steps == 20
    for bad in ["nogame", "twc:colour=3", "twc:numLocations=x", "twc:max_steps=0"]:
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_abstract_state_parsing():
    look = ("You are in the kitchen. In one part of the room you see a counter that has a knife, some salt, "
            "and a cookbook on it. There is also a fridge that is closed. You also see an open cutlery drawer, "
            "that contains a fork. In another part of the room you see a dining chair, that has nothing on it. "
            "There is also a coin. \nTo the South you see a closed wood door. Through an open glass door, to "
            "the East you see the pantry. ")
    room, things, exits = parse_look(look)
    assert room == "kitchen"
    assert things == ["counter (on: knife, salt, cookbook)", "fridge (closed)", "cutlery drawer (open: fork)",
                      "dining chair", "coin"]
    assert exits == ["south closed wood door", "east pantry (through open glass door)"]
    state = render_state("-", room, things, exits, [], ["take coin"])
    assert len(state) < len(look)


def test_collection_is_deterministic_and_mixed(tmp_path):
    a = collect("twc", 6, 6, 6, seed=3, progress=False)
    b = collect("twc", 6, 6, 6, seed=3, progress=False)
    assert a == b
    assert collect("twc", 6, 6, 6, seed=4, progress=False) != a
    s = summary(a)
    assert s["twc/expert"]["success_rate"] == 1.0
    assert 0 < s["twc"]["success_rate"] < 1, "the data must hold successes and failures"
    assert all(r["task"]["fold"] == "train" and r["task"]["seed"] in FOLD_SEEDS["train"] for r in a)
    keys = {"task", "t", "state", "action", "admissible", "next_state", "reward", "done", "success", "invalid"}
    assert keys <= set(a[0])
    path = str(tmp_path / "x.jsonl")
    write_jsonl(path, a)
    assert read_jsonl(path) == a
    with open(path, "a") as f:
        f.write('{"broken": \n')
    with pytest.raises(ValueError, match=r"x.jsonl:\d+"):
        read_jsonl(path)


def test_committed_sample_is_what_collection_produces():
    """data/sample/ documents the offline format; it must stay what `envs.collect` writes today."""
    sample = read_jsonl(os.path.join(os.path.dirname(__file__), "..", "data", "sample", "twc-train.jsonl"))
    assert collect("twc", 3, 3, 2, "train", 0, progress=False) == sample
    assert {t["policy"] for t in sample} == {"expert", "noisy", "random"}
