"""ALFWorld through its real engine (TextWorld PDDL + fast-downward + ALFWorld's demangler).

ALFWorld's game files come from `alfworld-download` (internet); the engine runs offline, so these
tests write small games by hand (tests/data/alfworld/*.pddl over ALFWorld's shipped domain and
grammar) and play them. Skipped, with the reason, where the optional `alfworld` package is absent.
"""
import json
from pathlib import Path

import pytest

pytest.importorskip("alfworld", reason="ALFWorld is optional: pip install -r requirements-envs.txt")
pytest.importorskip("fast_downward", reason="ALFWorld's planner (fast-downward-textworld) is missing")

from envs import Task, make_env, task_seeds  # noqa: E402
from envs.alfworld import write_game  # noqa: E402
from envs.base import parse_state_actions  # noqa: E402
from envs.collect import collect, summary  # noqa: E402

DATA = Path(__file__).parent / "data" / "alfworld"
GAMES = sorted(p.stem for p in DATA.glob("*.pddl"))   # clean_mug, cool_apple, place_book


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data folder laid out like ALFWorld's: <split>/<game>/game.tw-pddl."""
    root = tmp_path_factory.mktemp("alfworld")
    for name in GAMES:
        write_game(DATA / f"{name}.pddl", root / "train" / name / "game.tw-pddl")
    write_game(DATA / "cool_apple.pddl", root / "valid_seen" / "cool_apple" / "game.tw-pddl")
    return root


def test_folds_follow_alfworld_splits(root):
    spec = f"alfworld:{root}"
    assert list(task_seeds(spec, "train")) == [0, 1, 2]
    assert list(task_seeds(spec, "dev")) == [0]          # valid_seen
    assert list(task_seeds(spec, "test")) == []          # no valid_unseen here
    with pytest.raises(ValueError, match="not in the test fold"):
        make_env(spec).reset(Task(spec, "test", 0))
    with pytest.raises(ValueError, match="only run in the dream"):
        make_env(spec).reset(Task(spec, "generated", 0, init_state="...", parent=f"{spec}/train/0"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planner_expert_solves_with_reward_only_at_the_end(root, seed):
    spec = f"alfworld:{root}"
    env = make_env(spec)
    state, info = env.reset(Task(spec, "train", seed))
    assert info["instruction"].startswith("put ")
    assert state.startswith("feedback: You are in the middle of a room. Looking quickly around you")
    assert state.splitlines()[-1] == "actions: " + " | ".join(info["admissible"])
    assert parse_state_actions(state) == info["admissible"]
    assert not {"look", "inventory", "help"} & set(info["admissible"])
    gold = env.gold_actions()
    assert gold and all(isinstance(a, str) for a in gold)
    total, done = 0.0, False
    for a in gold:
        assert not done
        assert a in info["admissible"], (a, info["admissible"])
        state, r, done, info = env.step(a)
        assert r == 0.0 or done, "reward only at the final step"
        total += r
    assert done and total == 1.0 and info["success"]


def test_states_show_alfworld_text_and_engine_facts(root):
    spec = f"alfworld:{root}"
    env = make_env(spec)
    seed = GAMES.index("cool_apple")
    s, info = env.reset(Task(spec, "train", seed))
    assert info["instruction"] == "put a cool apple in countertop"
    assert "you see: cabinet 1; countertop 1; fridge 1" in s
    s, *_ = env.step("go to cabinet 1")
    assert s.splitlines()[:4] == ["feedback: You arrive at cabinet 1. The cabinet 1 is closed.",
                                  "room: cabinet 1", "you see: cabinet 1 (closed)", "inventory: nothing"]
    s, *_ = env.step("open cabinet 1")
    assert "you see: cabinet 1 (open: apple 1)" in s
    s, *_ = env.step("take apple 1 from cabinet 1")
    assert "inventory: apple 1" in s
    env.step("go to fridge 1")
    s, r, done, info = env.step("cool apple 1 with fridge 1")
    assert "feedback: You cool the apple 1 using the fridge 1." in s and "inventory: apple 1 (cool)" in s
    assert r == 0.0 and not done


def test_invalid_action_fails_or_costs_a_step(root):
    spec = f"alfworld:{root}"
    env = make_env(spec)
    env.reset(Task(spec, "train", 0))
    s, r, done, info = env.step("take apple 1 from fridge 1")
    assert done and r == 0.0 and info["invalid"] and not info["success"] and not info["truncated"]
    assert s.startswith("feedback: Invalid action: take apple 1 from fridge 1.")
    with pytest.raises(RuntimeError):
        env.step("look")
    env = make_env(spec, invalid_action="step")
    s0, _ = env.reset(Task(spec, "train", 0))
    s, r, done, info = env.step(None)
    assert not done and info["invalid"] and s.splitlines()[1:] == s0.splitlines()[1:]


def test_step_limit(root):
    spec = f"alfworld:{root},max_steps=2"
    env = make_env(spec)
    _, info = env.reset(Task(spec, "train", 0))
    _, _, done, info = env.step(info["admissible"][0])
    assert not done and not info["truncated"]
    _, _, done, info = env.step(info["admissible"][0])
    assert done and not info["success"] and info["truncated"], "a budget ending is a truncation"
    env = make_env(spec, invalid_action="step")
    env.reset(Task(spec, "train", 0))
    assert [env.step(None)[3]["truncated"] for _ in range(2)] == [False, True]


def test_collect_expert_noisy_random(root):
    spec = f"alfworld:{root}"
    rows = collect(spec, 3, 2, 2, progress=False, seed=1)
    json.dumps(rows)
    per = summary(rows)
    assert per[f"{spec}/expert"]["success_rate"] == 1.0
    assert per[spec]["trajectories"] == 7
    assert all(r["state"].splitlines()[-1].startswith("actions:") for r in rows)
