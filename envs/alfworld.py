"""ALFWorld (Shridhar et al. 2021) through its real TextWorld engine: `alfworld:<path>`.

ALFWorld games are `game.tw-pddl` files: ALFWorld's PDDL domain and text grammar plus one problem
(a household, a goal). TextWorld's PDDL engine plays them, ALFWorld's demangler turns PDDL ids into
names ("apple 1"), and the fast-downward planner gives the expert's commands from any state. This
adapter is a thin layer over exactly that:

* the abstract state is ALFWorld's own text (the paper: "ALFWorld = TextWorld's own text"): the
  engine's feedback verbatim, plus lines the engine's facts make exact -- where the agent stands, what
  it sees there, what it holds and in what condition (clean/hot/cool, which ALFWorld only tells on
  'examine') -- and the admissible commands (less look/inventory/help, whose
  answers the other lines already give);
* reward 1 at the step that achieves the goal; a command outside the admissible list fails the
  episode (the engine itself would answer "Nothing happens." and go on);
* `gold_actions()` is the planner's plan from the initial state.

Games: `alfworld-download` puts ALFWorld's ~3.5K training and 2x140 validation games under
$ALFWORLD_DATA/json_2.1.1/{train,valid_seen,valid_unseen}. Spec `alfworld` reads those; spec
`alfworld:<dir>` reads <dir>/{train,valid_seen,valid_unseen} for the train/dev/test folds, or, if <dir>
has none of them, takes every game under <dir> as the train fold. A task's seed indexes the fold's
games in sorted path order. `write_game` makes a playable game from a small hand-written problem.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

from .base import RealEnv, Task, join_items, refuse_generated, render_state_lines

SPLITS = {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}
DROPPED = ("look", "inventory", "help")
MAX_STEPS = 50  # ALFWorld's own episode budget


def parse_spec(spec: str) -> tuple[Path, int]:
    """'alfworld' | 'alfworld:<dir>' | either with ',max_steps=N' -> (data dir, max steps)."""
    rest = spec[len("alfworld"):].removeprefix(":")
    max_steps = MAX_STEPS
    m = re.search(r"(?:^|,)max_steps=(\d+)$", rest)
    if m:
        rest, max_steps = rest[:m.start()], int(m.group(1))
    if rest:
        return Path(rest), max_steps
    root = os.environ.get("ALFWORLD_DATA")
    if not root:
        raise ValueError("spec 'alfworld' reads $ALFWORLD_DATA/json_2.1.1 (run alfworld-download): set "
                         "ALFWORLD_DATA, or name a folder of games: 'alfworld:<dir>'")
    return Path(root) / "json_2.1.1", max_steps


@lru_cache(maxsize=None)
def game_files(root: str, fold: str) -> tuple[str, ...]:
    """The fold's playable games, sorted. Like ALFWorld's own loader, skip games marked unsolvable and
    the 'movable'/'Sliced' task variants its text engine does not support."""
    base = Path(root)
    if any((base / s).is_dir() for s in SPLITS.values()):
        base = base / SPLITS[fold]
    elif fold != "train":
        return ()
    games = []
    for path in sorted(base.rglob("game.tw-pddl")) if base.is_dir() else []:
        if "movable" in str(path) or "Sliced" in str(path):
            continue
        with open(path) as f:
            if json.load(f).get("solvable", False):
                games.append(str(path))
    return tuple(games)


def max_steps(spec: str) -> int:
    return parse_spec(spec)[1]


def task_seeds(spec: str, fold: str) -> range:
    root, _ = parse_spec(spec)
    return range(len(game_files(str(root), fold)))


def write_game(problem: str | Path, out: str | Path) -> Path:
    """A playable game.tw-pddl from a PDDL problem over ALFWorld's domain. The problem text carries its
    task description on a comment line `;; task: put a cool apple in countertop`."""
    import alfworld
    text = str(problem) if "(define" in str(problem) else Path(problem).read_text()
    m = re.search(r";;\s*task:\s*(.+)", text)
    if not m:
        raise ValueError("the problem needs a ';; task: <description>' line")
    data = Path(alfworld.__file__).parent / "data"
    game = {"pddl_domain": (data / "alfred.pddl").read_text(),
            "grammar": (data / "alfred.twl2").read_text().replace("UNKNOWN GOAL", m.group(1).strip()),
            "pddl_problem": text, "solvable": True}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(game))
    return out


def _start(path: str, plan: bool = False):
    """One game in TextWorld's PDDL engine with ALFWorld's name demangler (what ALFWorld itself uses)."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=True, policy_commands=plan,
                               extras=["gamefile"])
    env = textworld.start(path, infos, wrappers=[AlfredDemangler(), AlfredInfos])
    return env, env.reset()


# ----------------------------------------------------------------------------- abstract state
def _facts(game_state) -> dict[str, list[tuple[str, ...]]]:
    out = {}
    for f in game_state["facts"]:
        out.setdefault(f.name, []).append(tuple(v.name.strip() for v in f.arguments))
    return out


def _where(facts) -> str | None:
    """The receptacle the agent stands at (ALFWorld gives each receptacle its own location)."""
    here = {loc for _, loc in facts.get("atlocation", [])}
    return next((r for r, loc in facts.get("receptacleatlocation", []) if loc in here), None)


def _seen(facts, at: str | None) -> list[str]:
    if at is None:  # the middle of the room: the receptacles around
        return sorted(r for r, _ in facts.get("receptacleatlocation", []))
    inside = sorted(o for o, r in facts.get("inreceptacle", []) if r == at)
    if (at,) in facts.get("openable", []):
        if (at,) not in facts.get("opened", []):
            return [f"{at} (closed)"]
        return [f"{at} (open: {', '.join(inside)})" if inside else f"{at} (open)"]
    return [f"{at} (on: {', '.join(inside)})" if inside else at]


def _condition(facts, obj: str) -> str:
    """' (clean, cool)' for a held object: ALFWorld only tells this on 'examine', but the goal hinges on
    it, so the state shows it and stays Markov for the experience model."""
    marks = [word for fact, word in (("isclean", "clean"), ("ishot", "hot"), ("iscool", "cool"),
                                     ("issliced", "sliced")) if (obj,) in facts.get(fact, [])]
    return f" ({', '.join(marks)})" if marks else ""


def abstract_state(feedback: str, game_state) -> str:
    facts = _facts(game_state)
    at = _where(facts)
    held = [o + _condition(facts, o) for o in sorted(o for _, o in facts.get("holds", []))]
    return render_state_lines({"feedback": " ".join(feedback.split()) or "-",
                               "room": at or "middle of the room", "you see": join_items(_seen(facts, at)),
                               "inventory": join_items(held)}, admissible(game_state))


def admissible(game_state) -> list[str]:
    return [a for a in game_state["admissible_commands"] if a not in DROPPED]


def split_intro(text: str) -> tuple[str, str]:
    """The opening text -> (room description, task): drop the welcome banner."""
    text = re.sub(r"-= Welcome to TextWorld, ALFRED! =-", "", text).strip()
    room, _, task = text.partition("Your task is to:")
    return " ".join(room.split()), task.strip().rstrip(".")


# ----------------------------------------------------------------------------- the environment
class AlfWorldEnv(RealEnv):
    """One episode of an ALFWorld game behind the TextEnv protocol (see module docstring)."""
    info_defaults = {"raw": ""}      # the engine's own text of the step

    def __init__(self, spec: str = "alfworld", invalid_action: str = "fail"):
        super().__init__(invalid_action)
        self.root, self.max_steps = parse_spec(spec)

    def game_path(self, task: Task) -> str:
        refuse_generated(task)
        if task.fold not in SPLITS:
            raise ValueError(f"unknown fold {task.fold!r}; use train, dev or test")
        games = game_files(str(self.root), task.fold)
        if not 0 <= task.seed < len(games):
            raise ValueError(f"seed {task.seed} is not in the {task.fold} fold of {self.root} "
                             f"({len(games)} games)")
        return games[task.seed]

    def reset(self, task: Task) -> tuple[str, dict]:
        self.path = self.game_path(task)
        if self.task is not None:
            self.env.close()
        self.env, gs = _start(self.path)
        self.task, self.steps, self.done = task, 0, False
        room, self.instruction = split_intro(gs.feedback)
        self.admissible = admissible(gs)
        self.state = abstract_state(room, gs)
        return self.state, self._info(False, False, raw=gs.feedback)

    def _act(self, action: str) -> tuple[str, float, bool, dict]:
        gs, _, _ = self.env.step(action)
        success = bool(gs["won"])
        self.done = success or self.steps >= self.max_steps
        self.admissible = admissible(gs)
        self.state = abstract_state(gs.feedback, gs)
        return self.state, float(success), self.done, self._info(success, False, self.done and not success,
                                                                  raw=gs.feedback)

    def gold_actions(self) -> list[str]:
        """The planner's commands from the initial state (a fresh copy of the game)."""
        if self.task is None:
            raise RuntimeError("gold_actions() needs reset(task) first")
        env, gs = _start(self.path, plan=True)
        plan = list(gs["policy_commands"])
        env.close()
        return plan


def main(argv=None):
    """python -m envs.alfworld tests/data/alfworld/*.pddl --out data/alfworld: a game folder from
    hand-written problems (<out>/train/<name>/game.tw-pddl), playable as `alfworld:<out>`."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("problems", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=sorted(SPLITS.values()))
    a = p.parse_args(argv)
    for prob in a.problems:
        print(write_game(prob, Path(a.out) / a.split / Path(prob).stem / "game.tw-pddl"))


if __name__ == "__main__":
    main()
