"""The built-in real environment (real TextWorldExpress games) and offline data collection."""
import os
import subprocess
import sys

import pytest

from envs import BatchEnv, FOLD_SEEDS, Task, make_env, parse_spec
from envs.base import RealEnv
from envs.collect import collect, read_jsonl, summary, write_jsonl
from envs.textworld import OBSERVABLE_EXPERTS, coin_expert, parse_look, render_state

ROOT = os.path.join(os.path.dirname(__file__), "..")

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


class _Counter(RealEnv):
    """A toy real environment: `inc` adds one, `win` ends it; the base does everything else."""
    info_defaults = {"raw": ""}

    def __init__(self, invalid_action="fail"):
        super().__init__(invalid_action)
        self.max_steps = 3

    def reset(self, task):
        self.task, self.steps, self.done, self.instruction = task, 0, False, "count"
        self.admissible, self.state = ["inc", "win"], "feedback: -\nactions: inc | win"
        return self.state, self._info(False, False)

    def _act(self, action):
        self.done = action == "win" or self.steps >= self.max_steps
        return self.state, float(action == "win"), self.done, self._info(action == "win", False, raw=action)


def test_real_env_base_applies_the_invalid_action_policy_to_every_adapter():
    env = _Counter()
    env.reset(Task("toy"))
    s, r, done, info = env.step("fly")
    assert done and r == 0.0 and info == {"admissible": ["inc", "win"], "instruction": "count", "success": False,
                                          "invalid": True, "truncated": False, "steps": 1, "raw": ""}
    assert s.startswith("feedback: Invalid action: fly.")
    with pytest.raises(RuntimeError, match="not running"):
        env.step("inc")
    env = _Counter("step")
    env.reset(Task("toy"))
    assert env.step(None)[3]["invalid"] and not env.step("inc")[2]
    _, _, done, info = env.step("bad")
    assert done and info["invalid"] and info["truncated"], "step mode: the budget ran out"
    with pytest.raises(ValueError, match="invalid_action"):
        _Counter("ignore")
    with pytest.raises(ValueError, match="generated task"):
        make_env("twc").reset(Task("twc", "generated", 1, parent="twc/train/0"))


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


def _coin_state(room, exits, things=(), actions=None):
    moves = [f"move {e.split()[0]}" for e in exits]
    actions = sorted(moves + (["take coin"] if "coin" in things else [])) if actions is None else actions
    return render_state(f"You are in the {room}.", room, list(things), list(exits), [], actions)


def test_coin_expert_is_a_rule_of_the_visible_state():
    """Take the coin when listed; else the first listed action that moves to an unseen room or opens a
    closed door; else back the way this room was first entered. Only the text shown (and the
    expert's own history) decides."""
    kitchen = _coin_state("kitchen", ["north corridor", "west pantry"], ["stove"])
    assert coin_expert(kitchen, []) == "move north"
    # the order the actions are listed in decides, not the direction's name nor the exits' order
    assert coin_expert(_coin_state("kitchen", ["west pantry", "north corridor"],
                                   actions=["move west", "move north"]), []) == "move west"
    assert coin_expert(_coin_state("kitchen", ["west pantry", "north corridor"]), []) == "move north"
    assert coin_expert(_coin_state("pantry", ["east kitchen"], ["shelf", "coin"]), []) == "take coin"
    corridor = _coin_state("corridor", ["south kitchen"])
    history = [(kitchen, "move north")]
    assert coin_expert(corridor, history) == "move south", "nothing unseen here: back to the kitchen"
    history += [(corridor, "move south")]
    assert coin_expert(kitchen, history) == "move west", "the corridor is seen; the pantry is not"
    # doors: what is beyond a closed door is not shown until it is opened
    doors = _coin_state("kitchen", ["south closed wood door", "east pantry (through open glass door)"],
                        actions=["open door to south", "move east", "move south", "open door to east"])
    assert coin_expert(doors, []) == "open door to south"
    doors = _coin_state("kitchen", ["south closed wood door", "east pantry (through open glass door)"],
                        actions=["move east", "move south", "open door to east", "open door to south"])
    assert coin_expert(doors, []) == "move east"
    assert coin_expert(doors, [(_coin_state("pantry", ["west kitchen"]), "move west")]) == "open door to south"
    assert OBSERVABLE_EXPERTS["coin"] is coin_expert and make_env("coin").observable_expert is coin_expert
    assert make_env("twc").observable_expert is None, "twc keeps the gold-path expert"


def test_coin_expert_ignores_what_the_agent_cannot_see():
    """Seeds 0 and 124 show the same first state but hide the coin in different rooms: the expert's
    first move is the same, and it still finds the coin in both within the step budget."""
    env = make_env("coin")
    moves, states = [], []
    for seed in (0, 124):
        state, info = env.reset(Task("coin", "train", seed))
        states.append(state)
        history, done, first = [], False, None
        while not done:
            action = env.observable_expert(state, history, info["instruction"])
            first = first or action
            history.append((state, action))
            state, _, done, info = env.step(action)
        moves.append((first, len(history)))
        assert info["success"]
    assert states[0] == states[1] and moves[0][0] == moves[1][0] == "move east"
    assert moves[0][1] != moves[1][1], "the coin is elsewhere in seed 124: a longer walk"


def test_coin_collection_is_identical_across_processes(tmp_path):
    """The observable expert uses nothing that varies between JVM launches."""
    code = ("import sys; from envs.collect import collect, write_jsonl; "
            "write_jsonl(sys.argv[1], collect('coin', 5, 5, 3, seed=0, progress=False))")
    paths = [str(tmp_path / f"{i}.jsonl") for i in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, check=True)
    data = [open(p, "rb").read() for p in paths]
    assert data[0] == data[1] and data[0]
    rows = read_jsonl(paths[0])
    assert summary(rows)["coin/expert"]["success_rate"] == 1.0
    assert {r["policy"] for r in rows} == {"expert", "noisy", "random"}
