"""Every TextWorldExpress game by name, on the real engine: presets, abstract states, experts, errors."""
import re

import pytest

from envs import GAMES, Task, make_env, parse_spec
from envs.collect import collect, summary
from envs.textworld import (OBSERVABLE_EXPERTS, cookingworld_expert, mapreader_expert, parse_look, read_notes,
                            render_state)

ALL_GAMES = ["coin", "twc", "cookingworld", "mapreader", "sorting", "arithmetic", "simonsays", "peckingorder"]
LINE = re.compile(r"^[a-z][a-z ]*: .+$")


def test_every_game_has_a_preset():
    assert sorted(GAMES) == sorted(ALL_GAMES)
    assert {g for g in GAMES if g in OBSERVABLE_EXPERTS} == {"coin", "mapreader", "cookingworld"}


@pytest.mark.parametrize("game", ALL_GAMES)
def test_game_plays_and_collects(game):
    """Reset, the expert's steps to success, and a small offline collection (expert, noisy, random)."""
    env = make_env(game)
    state, info = env.reset(Task(game, "dev", 10003))
    lines = state.split("\n")
    assert lines[0].startswith("feedback: ") and lines[-1] == "actions: " + " | ".join(info["admissible"])
    assert all(LINE.match(ln) for ln in lines), state
    assert info["instruction"] and info["admissible"]
    rows = collect(game, 2, 1, 1, seed=1, progress=False)
    s = summary(rows)
    assert s[f"{game}/expert"]["success_rate"] == 1.0, [r["action"] for r in rows if r["policy"] == "expert"]
    assert {r["policy"] for r in rows} == {"expert", "noisy", "random"}
    for r in rows:
        assert r["next_state"].split("\n")[0].startswith("feedback: ")
        assert r["next_state"].split("\n")[-1].startswith("actions: ")
        assert r["t"] < parse_spec(game).max_steps


def test_notes_keep_what_was_read():
    """A map, a recipe, a math problem or Simon's list is shown once; the state keeps it as an aspect."""
    assert read_notes("The map reads:\n  The office connects to the cookery and laundromat.\n"
                      "  The cookery connects to the office.\n") == {
        "map": "office: cookery, laundromat; cookery: office"}
    assert read_notes("Gather all following ingredients and follow the directions to prepare this tasty meal."
                      "\n\nIngredients:\n  red potato\n  salt\n\nDirections:\n  slice the red potato\n"
                      "  fry the red potato\n  prepare meal\n\n") == {
        "ingredients": "red potato, salt", "directions": "slice the red potato, fry the red potato, prepare meal"}
    assert read_notes("Your task is to solve the following math problem: divide 32 by 32 . \nThen, pick up "
                      "the item") == {"math problem": "divide 32 by 32"}
    assert read_notes("Simon says, take these actions in order: eat banana, touch pineapple.") == {
        "simon says": "eat banana, touch pineapple"}
    assert read_notes("You take the coin.") == {}
    _, things, _ = parse_look("You are in the backyard. You also see A box, that contains 37mg of wood. ")
    assert things == ["box (in: 37mg of wood)"]
    env = make_env("mapreader")
    _, info = env.reset(Task("mapreader", "train", 1))
    state, *_ = env.step("read map")
    state, *_ = env.step(next(a for a in env.admissible if a.startswith("move ")))
    assert "\nmap: " in state, "the map stays in the state after the step that read it"


def test_simonsays_keeps_every_action_and_has_no_room():
    env = make_env("simonsays")
    state, info = env.reset(Task("simonsays", "train", 1))
    assert state.split("\n")[0] == "feedback: Simon says, 'eat banana'."
    assert len(state.split("\n")) == 2 and "examine orange" in info["admissible"]


def test_mapreader_expert_follows_the_map():
    instruction = ("Your task is to take the coin that is located in the playroom, and put it into the box "
                   "found in the cookery. A map is provided, that you may find helpful.")
    notes = {"map": "playroom: office, laundromat; cookery: laundromat; laundromat: cookery, playroom"}
    start = render_state("-", "cookery", ["box"], ["west laundromat"], ["map"], ["move west", "read map"])
    assert mapreader_expert(start, [], instruction) == "read map"
    start = render_state("-", "cookery", ["box"], ["west laundromat"], ["map"], ["move west", "read map"], notes)
    assert mapreader_expert(start, [], instruction) == "move west"
    hall = render_state("-", "laundromat", [], ["north bathroom", "east cookery", "west playroom"], ["map"],
                        ["move east", "move north", "move west", "read map"], notes)
    assert mapreader_expert(hall, [(start, "move west")], instruction) == "move west", "the map, not the order"
    hall_back = hall.replace("inventory: map", "inventory: map; coin")
    assert mapreader_expert(hall_back, [], instruction) == "move east"


def test_cookingworld_expert_reads_opens_and_cooks():
    notes = {"ingredients": "red potato", "directions": "slice the red potato, fry the red potato, prepare meal"}
    things = ["stove", "fridge (closed)", "counter (on: knife)", "cutlery drawer (closed)"]
    acts = ["open cutlery drawer", "open fridge", "read cookbook", "take knife"]
    kitchen = render_state("-", "kitchen", things, [], [], acts)
    assert cookingworld_expert(kitchen, []) == "read cookbook"
    kitchen = render_state("-", "kitchen", things, [], [], acts, notes)
    assert cookingworld_expert(kitchen, []) == "take knife"
    kitchen = render_state("-", "kitchen", things[:1] + things[1:2] + things[3:], [], ["knife"], acts[:3], notes)
    assert cookingworld_expert(kitchen, []) == "open fridge", "contents of closed containers are not shown"
    held = ["knife", "raw sliced red potato"]
    acts = ["cook red potato in stove", "prepare meal", "slice red potato"]
    assert cookingworld_expert(render_state("-", "kitchen", things, [], held, acts, notes), []) == \
        "cook red potato in stove", "slicing is done: the inventory says so"
    done = ["knife", "fried sliced red potato"]
    assert cookingworld_expert(render_state("-", "kitchen", things, [], done, acts, notes), []) == "prepare meal"
    assert cookingworld_expert(render_state("-", "kitchen", things, [], ["meal"], ["eat meal"], notes), []) == \
        "eat meal"


def test_engine_errors_are_one_line_value_errors():
    for spec, match in [("coin:numLocations=50", r"'coin', parameter numLocations=50: .*11"),
                        ("twc:numItemsToPutAway=9", r"'twc', parameter numItemsToPutAway=9"),
                        ("simonsays:gameLength=0", r"'simonsays', parameter gameLength=0")]:
        with pytest.raises(ValueError, match=match) as e:
            make_env(spec).reset(Task(spec, "train", 0))
        assert "\n" not in str(e.value) and "java." not in str(e.value)
    spec = "mapreader:numLocations=5,maxDistanceApart=3"
    with pytest.raises(ValueError, match=r"'mapreader' .*train seed 5: No locations could be found") as e:
        make_env(spec).reset(Task(spec, "train", 5))
    assert "\n" not in str(e.value)
    state, _ = make_env("coin").reset(Task("coin", "train", 0))   # the shared engine still works
    assert state.startswith("feedback: You are in the")
    for bad in ["sorting:numLocations=2", "peckingorder:x=1", "simonsays:colour=1"]:
        with pytest.raises(ValueError, match="unknown parameter"):
            parse_spec(bad)
    assert parse_spec("simonsays:gameLength=4,max_steps=6").max_steps == 6
