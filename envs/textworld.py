"""TextWorldExpress, the built-in real environment (games twc, cookingworld, coin, ...).

TextWorldExpress (Jansen & Cote 2022) simulates text games in a JVM at thousands of steps per second
and ships disjoint train/dev/test folds (seeds 0-999 / 10000-10999 / 20000-20999, different objects),
admissible actions and gold action sequences. This adapter adds what DreamGym needs:

* an *abstract state*: the room description is parsed into one compact line per aspect (feedback,
  room, things seen with their container state, exits, inventory, admissible actions), dropping the
  boilerplate prose ("In one part of the room you see ..."). Agent and experience model both read
  this text, and it is ~4x shorter than the raw observation, which is what keeps CPU runs fast.
* the paper's reward: 1 at the step that completes the task, 0 otherwise; invalid actions fail.
* cheap episodes: every episode shares one JVM per process. TextWorldExpress is deterministic given
  (game, params, fold, seed, actions) -- its own `serialize` is exactly that list -- so an episode
  whose game is not the one loaded in the JVM is restored by replaying its actions (~0.2 ms/step).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .base import RealEnv, Task, join_items, parse_state_actions, refuse_generated, render_state_lines  # noqa: F401

# Presets: small instances so CPU runs are quick; any parameter can be overridden in the spec string,
# e.g. "twc:numItemsToPutAway=2,numLocations=2,max_steps=20". `params` lists every parameter the game
# takes (TextWorldExpress's names); arithmetic, sorting and peckingorder take none.
GAMES = {
    "twc": dict(params=dict(numLocations=1, numItemsToPutAway=1, includeDoors=0, limitInventorySize=0),
                max_steps=10),
    "cookingworld": dict(params=dict(numLocations=1, numIngredients=1, numDistractorItems=0, includeDoors=0,
                                     limitInventorySize=0), max_steps=15),
    "coin": dict(params=dict(numLocations=3, numDistractorItems=0, includeDoors=0, limitInventorySize=0),
                 max_steps=10),
    "mapreader": dict(params=dict(numLocations=5, maxDistanceApart=2, maxDistractorItemsPerLocation=0,
                                  includeDoors=0, limitInventorySize=0), max_steps=12),
    "sorting": dict(params=dict(), max_steps=12),
    "arithmetic": dict(params=dict(), max_steps=8),
    "simonsays": dict(params=dict(gameLength=3, numDistractors=2, memorization=0, verbose=0), max_steps=5),
    "peckingorder": dict(params=dict(), max_steps=12),
}
FOLD_SEEDS = {"train": range(0, 1000), "dev": range(10000, 11000), "test": range(20000, 21000)}
# Actions whose result the abstract state already shows (the room, the inventory, the instruction);
# removing them shortens every prompt. Not in simonsays, where any action may be what Simon says.
DROPPED_ACTIONS = ("look around", "inventory", "task")
DROPPED_PREFIXES = ("examine ",)
KEEP_ALL_ACTIONS = ("simonsays",)


@dataclass(frozen=True)
class GameSpec:
    game: str
    params: tuple            # ((name, value), ...) passed to TextWorldExpress
    max_steps: int

    @property
    def param_string(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params)


def parse_spec(spec: str) -> GameSpec:
    """'twc' or 'twc:numItemsToPutAway=2,max_steps=20' -> GameSpec; unknown names fail loudly."""
    game, _, rest = spec.partition(":")
    if game not in GAMES:
        raise ValueError(f"unknown TextWorldExpress game {game!r}; supported: {sorted(GAMES)}")
    params = dict(GAMES[game]["params"])
    max_steps = GAMES[game]["max_steps"]
    for item in filter(None, (s.strip() for s in rest.split(","))):
        name, eq, value = item.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"bad game parameter {item!r} in {spec!r}: expected name=integer")
        if name == "max_steps":
            max_steps = int(value)
        elif name in params:
            params[name] = int(value)
        else:
            raise ValueError(f"unknown parameter {name!r} for game {game!r}; known: "
                             f"{sorted(params) + ['max_steps']}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 in {spec!r}")
    return GameSpec(game, tuple(sorted(params.items())), max_steps)


# ----------------------------------------------------------------------------- abstract state
_ARTICLE = re.compile(r"^(a|an|the|some)\s+", re.I)
_PREFIXES = ("In one part of the room you see ", "In another part of the room you see ",
             "There is also ", "You also see ")


def _strip_article(s: str) -> str:
    return _ARTICLE.sub("", s.strip())


def _split_list(s: str) -> list[str]:
    """'a knife, some salt, and a cookbook' -> ['knife', 'salt', 'cookbook']."""
    parts = re.split(r",\s*(?:and\s+)?|\s+and\s+", s.strip())
    return [_strip_article(p) for p in parts if p.strip()]


def _describe(body: str) -> list[str]:
    """One 'you see' clause -> compact thing descriptions."""
    body = body.strip().rstrip(".")
    m = re.match(r"(?:an? )?open (.+?), that contains (.+)$", body, re.I)
    if m:
        return [f"{_strip_article(m.group(1))} (open: {', '.join(_split_list(m.group(2)))})"]
    m = re.match(r"(?:an? )?open (.+?), that is empty$", body, re.I)
    if m:
        return [f"{_strip_article(m.group(1))} (open)"]
    m = re.match(r"(.+?),? that has nothing on it$", body)
    if m:
        return [_strip_article(m.group(1))]
    m = re.match(r"(.+?) that has (.+) on it$", body)
    if m:
        return [f"{_strip_article(m.group(1))} (on: {', '.join(_split_list(m.group(2)))})"]
    m = re.match(r"(.+?), that contains (.+)$", body)       # a container with no lid (sorting's box)
    if m:
        return [f"{_strip_article(m.group(1))} (in: {', '.join(_split_list(m.group(2)))})"]
    m = re.match(r"(.+?) that is (closed|open)$", body)
    if m:
        return [f"{_strip_article(m.group(1))} ({m.group(2)})"]
    m = re.match(r"(.+?), that is empty$", body)
    if m:
        return [_strip_article(m.group(1))]
    return _split_list(body)


def _exit(sentence: str) -> str | None:
    m = re.match(r"(?:Through an? (open .+?), to|To) the (\w+) you see (.+)$", sentence.strip().rstrip("."))
    if not m:
        return None
    via, direction, what = m.groups()
    what = _strip_article(what)
    return f"{direction.lower()} {what}" + (f" (through {via})" if via else "")


def _clause(sentence: str) -> str:
    for p in _PREFIXES:
        if sentence.startswith(p):
            return sentence[len(p):]
    return sentence


def parse_look(look: str) -> tuple[str, list[str], list[str]]:
    """TextWorldExpress room description -> (room, things, exits)."""
    room, things, exits = "", [], []
    for sentence in re.split(r"(?<=\.)\s+|\n", look):
        sentence = sentence.strip()
        if not sentence:
            continue
        if sentence.startswith("You are in the "):
            room = sentence[len("You are in the "):].rstrip(".")
            continue
        ex = _exit(sentence)
        if ex is not None:
            exits.append(ex)
            continue
        things.extend(_describe(_clause(sentence)))
    return room, things, exits


def parse_inventory(inv: str) -> list[str]:
    lines = [ln.strip() for ln in inv.splitlines()[1:] if ln.strip()]
    return [] if not lines or "currently empty" in lines[0] else [_strip_article(ln) for ln in lines]


def admissible(valid_actions: list[str], game: str = "") -> list[str]:
    if game in KEEP_ALL_ACTIONS:
        return sorted(set(valid_actions))
    keep = [a for a in valid_actions if a not in DROPPED_ACTIONS and not a.startswith(DROPPED_PREFIXES)]
    return sorted(set(keep))


def read_notes(observation: str) -> dict[str, str]:
    """Text the game shows once but the task needs later, as aspects the state keeps from then on:
    a map read in mapreader, a recipe in cookingworld, a math problem in arithmetic, the list of
    actions Simon says in simonsays' memorization mode."""
    obs = observation.strip()
    if obs.startswith("The map reads:"):
        links = re.findall(r"The (.+?) connects to (.+?)\.", obs)
        return {"map": "; ".join(f"{room}: {', '.join(_split_list(to))}" for room, to in links)}
    if obs.startswith("Gather all following ingredients"):
        m = re.search(r"Ingredients:(.*?)Directions:(.*)$", obs, re.S)
        if m:
            ingredients = [ln.strip() for ln in m.group(1).splitlines() if ln.strip()]
            directions = [ln.strip() for ln in m.group(2).splitlines() if ln.strip()]
            return {"ingredients": ", ".join(ingredients), "directions": ", ".join(directions)}
    m = re.match(r"Your task is to solve the following math problem: (.+?)\s*\.", obs)
    if m:
        return {"math problem": " ".join(m.group(1).split())}
    m = re.match(r"Simon says, take these actions in order: (.+?)\.?$", obs)
    if m:
        return {"simon says": m.group(1).strip()}
    return {}


def feedback_of(observation: str) -> str:
    """The part of an observation that is news: for moves and looks that is only the room name."""
    obs = " ".join(observation.split())
    if obs.startswith("You are in the "):
        return obs.split(". ")[0].rstrip(".") + "."
    return obs


def render_state(feedback: str, room: str, things: list[str], exits: list[str], inventory: list[str],
                 actions: list[str], notes: dict[str, str] | None = None) -> str:
    """The abstract state: one line per aspect. Shared format for real and dreamed states."""
    return render_state_lines({"feedback": feedback or "-", "room": room or "-", "you see": join_items(things),
                               "exits": join_items(exits, "none"), "inventory": join_items(inventory),
                               **(notes or {})}, actions)


def abstract_state(observation: str, info: dict, game: str = "", notes: dict[str, str] | None = None) -> str:
    """Games without rooms (simonsays: the engine shows no room, no inventory) keep only the feedback,
    the notes and the actions."""
    actions = admissible(info["validActions"], game)
    if not info["look"].strip():
        return render_state_lines({"feedback": " ".join(observation.split()) or "-", **(notes or {})}, actions)
    room, things, exits = parse_look(info["look"])
    return render_state(feedback_of(observation), room, things, exits, parse_inventory(info["inventory"]),
                        actions, notes)


# ----------------------------------------------------------------------------- observable experts
# An observable expert chooses each action by a fixed rule of what the agent itself is shown: the
# instruction, the current abstract state and its own earlier (state, action) pairs. It never reads
# the game's gold path or internals, so its demonstrations can be cloned as a rule rather than as a
# random choice. Signature: expert(state, history, instruction) -> action.
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def state_fields(state: str) -> dict[str, str]:
    """An abstract state's `aspect: value` lines as a dict (the first line of each aspect wins)."""
    out = {}
    for line in state.splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            out.setdefault(name, value.strip())
    return out


def state_exits(state: str) -> list[tuple[str, str]]:
    """The `exits:` line as (direction, what is beyond), in the order listed: ('east', 'pantry'),
    ('south', 'closed wood door'); the '(through open ... door)' note is dropped."""
    value = state_fields(state).get("exits", "none")
    if value in ("none", ""):
        return []
    out = []
    for item in value.split("; "):
        direction, _, what = item.partition(" ")
        out.append((direction, re.sub(r"\s*\(through [^)]*\)$", "", what)))
    return out


def _closed_door(what: str) -> bool:
    return what.startswith("closed ") and what.endswith("door")


def explore_move(state: str, history: list[tuple[str, str]]) -> str | None:
    """Depth-first exploration by what is shown. The first action of the `actions:` line (in the
    order listed) that leads somewhere new: a move through an open exit to a room not yet visited,
    or the opening of a closed door (what is beyond it is not shown until it is open); else back
    along the move that first entered this room; None when everything reachable is seen. Visited
    rooms are the `room:` lines of this state and the states in `history`. (The first listed action,
    not the first listed exit: the action a small agent writes is then a copy of text it reads last.)"""
    actions = parse_state_actions(state) or []
    rooms = [state_fields(s).get("room", "-") for s, _ in history] + [state_fields(state).get("room", "-")]
    here, visited = rooms[-1], set(rooms)
    exits = dict(state_exits(state))

    def go(direction):
        if _closed_door(exits.get(direction, "")) and f"open door to {direction}" in actions:
            return f"open door to {direction}"
        return f"move {direction}" if f"move {direction}" in actions else None

    for action in actions:
        verb, _, direction = action.rpartition(" ")
        what = exits.get(direction)
        if what is None:
            continue
        if verb == "move" and not _closed_door(what) and what not in visited:
            return action
        if verb == "open door to" and _closed_door(what):
            return action
    for i, (_, action) in enumerate(history):     # backtrack: reverse the move that first entered here
        if rooms[i + 1] == here and rooms[i] != here and action.startswith("move "):
            back = OPPOSITE.get(action[len("move "):])
            return go(back) if back else None
    return None


def coin_expert(state: str, history: list[tuple[str, str]], instruction: str = "") -> str:
    """coin: take the coin when `take coin` is listed, else explore depth-first (`explore_move`);
    with nothing left to explore, `_fallback`."""
    actions = parse_state_actions(state) or []
    if "take coin" in actions:
        return "take coin"
    return explore_move(state, history) or _fallback(actions)


def _items(value: str | None) -> list[str]:
    return [] if value in (None, "", "nothing", "none", "-") else value.split("; ")


def _holds(inventory: list[str], name: str) -> str | None:
    """The inventory entry that is `name`, whatever its state words ('raw sliced red potato')."""
    return next((x for x in inventory if x == name or x.endswith(" " + name)), None)


def step_toward(target: str, state: str, history: list[tuple[str, str]]) -> str | None:
    """The first move of a shortest route to room `target`, over the links the agent knows: exits
    seen in this state and earlier ones, and the `map:` aspect once a map has been read. Ties go to
    the exit listed first. None when here already or no known route."""
    fields = state_fields(state)
    here = fields.get("room", "-")
    if here == target:
        return None
    links: dict[str, set[str]] = {}

    def link(a, b):
        links.setdefault(a, set()).add(b)
        links.setdefault(b, set()).add(a)
    for s in [h for h, _ in history] + [state]:
        room = state_fields(s).get("room", "-")
        for _, what in state_exits(s):
            if not _closed_door(what):
                link(room, what)
    for entry in _items(fields.get("map")):
        room, _, neighbours = entry.partition(": ")
        for other in filter(None, neighbours.split(", ")):
            link(room, other)
    dist, frontier = {target: 0}, [target]
    while frontier:                         # breadth-first distances to the target
        nxt = []
        for room in frontier:
            for other in sorted(links.get(room, ())):
                if other not in dist:
                    dist[other] = dist[room] + 1
                    nxt.append(other)
        frontier = nxt
    actions = parse_state_actions(state) or []
    best = None
    for direction, what in state_exits(state):
        if what in dist and f"move {direction}" in actions and (best is None or dist[what] < best[0]):
            best = (dist[what], f"move {direction}")
    return best[1] if best and best[0] < dist.get(here, float("inf")) else None


_TASK_MAPREADER = re.compile(r"take the (.+?) that is located in the (.+?), and put it into the (.+?) found "
                             r"in the (.+?)\.")


def mapreader_expert(state: str, history: list[tuple[str, str]], instruction: str = "") -> str:
    """mapreader: read the map first; then walk a shortest route on the map (ties: the exit listed
    first) to the room the instruction names for the object, take it, walk back to the box's room,
    put it in. Without a readable task or map it explores like `coin`."""
    fields, actions = state_fields(state), parse_state_actions(state) or []
    if "map" not in fields and "read map" in actions:
        return "read map"
    m = _TASK_MAPREADER.search(instruction)
    if m:
        thing, thing_room, box, box_room = m.groups()
        if _holds(_items(fields.get("inventory")), thing):
            if f"put {thing} in {box}" in actions:
                return f"put {thing} in {box}"
            move = step_toward(box_room, state, history)
        else:
            if f"take {thing}" in actions:
                return f"take {thing}"
            move = step_toward(thing_room, state, history)
        if move:
            return move
    return explore_move(state, history) or _fallback(actions)


CUTS = {"slice": "sliced", "dice": "diced", "chop": "chopped"}
COOKS = {"fry": ("fried", ("stove",)), "roast": ("roasted", ("oven",)), "grill": ("grilled", ("toaster", "barbeque"))}


def cookingworld_expert(state: str, history: list[tuple[str, str]], instruction: str = "") -> str:
    """cookingworld: read the cookbook; take each listed ingredient (and the knife when a direction
    cuts) as soon as `take` lists it; while something is missing, open the first closed container
    in view, else explore (`explore_move`); with everything held, do the directions in the listed
    order, skipping those the inventory shows done ('sliced ...'), then prepare and eat the meal.
    Contents of closed containers are not shown, so it opens them in the order they are listed."""
    fields, actions = state_fields(state), parse_state_actions(state) or []
    inventory = _items(fields.get("inventory"))
    if "eat meal" in actions and "meal" in inventory:
        return "eat meal"
    if "ingredients" not in fields:
        if "read cookbook" in actions:
            return "read cookbook"
        return _go_to_seen(("kitchen",), state, history) or _fallback(actions)
    ingredients = [x for x in fields["ingredients"].split(", ") if x]
    directions = [x for x in fields.get("directions", "").split(", ") if x]
    needs_knife = any(d.split(" ", 1)[0] in CUTS for d in directions)
    missing = [x for x in ingredients + (["knife"] if needs_knife else []) if not _holds(inventory, x)]
    if "meal" not in inventory and missing:
        for x in missing:
            if f"take {x}" in actions:
                return f"take {x}"
        for thing in _items(fields.get("you see")):
            name = thing[:-len(" (closed)")] if thing.endswith(" (closed)") else None
            if name and f"open {name}" in actions:
                return f"open {name}"
        return explore_move(state, history) or _fallback(actions)
    where = ("kitchen",)                    # the room (or the things) the next direction needs
    for direction in directions:
        if direction == "prepare meal":
            if "prepare meal" in actions:
                return "prepare meal"
            break
        verb, _, thing = direction.partition(" the ")
        held = _holds(inventory, thing) or ""
        if verb in CUTS:
            if CUTS[verb] in held.split():
                continue
            if f"{verb} {thing}" in actions:
                return f"{verb} {thing}"
            break
        if verb in COOKS:
            if COOKS[verb][0] in held.split():
                continue
            for appliance in COOKS[verb][1]:
                if f"cook {thing} in {appliance}" in actions:
                    return f"cook {thing} in {appliance}"
            where = COOKS[verb][1]
            break
    return _go_to_seen(where, state, history) or _fallback(actions)


def _fallback(actions: list[str]) -> str:
    """With nothing left to explore: a move if there is one (it cannot spoil the task), else the
    first listed action."""
    return next((a for a in actions if a.startswith("move ")), actions[0] if actions else "look around")


def _go_to_seen(targets: tuple[str, ...], state: str, history: list[tuple[str, str]]) -> str | None:
    """Toward the first room seen holding one of `targets` (a room name or a thing in `you see`),
    trying rooms in the order they were first seen; explore when none is known or reachable."""
    rooms = []
    for s in [h for h, _ in history] + [state]:
        fields = state_fields(s)
        room = fields.get("room", "-")
        seen = [t.split(" (", 1)[0] for t in _items(fields.get("you see"))]
        if room not in rooms and (room in targets or any(t in targets for t in seen)):
            rooms.append(room)
    here = state_fields(state).get("room", "-")
    for room in rooms:
        if room == here:
            return None
        move = step_toward(room, state, history)
        if move:
            return move
    return explore_move(state, history)


# game -> its observable expert; games not listed use the gold action sequence as their expert
# (their gold path is already a rule of what the agent is shown: see envs/README.md).
OBSERVABLE_EXPERTS = {"coin": coin_expert, "mapreader": mapreader_expert, "cookingworld": cookingworld_expert}


# ----------------------------------------------------------------------------- the JVM backend
class _Backend:
    """One TextWorldExpress JVM shared by all episodes of this process (see module docstring)."""
    _instance = None

    def __init__(self):
        from textworld_express import TextWorldExpressEnv
        self.env = TextWorldExpressEnv(envStepLimit=10_000)  # our own step limit applies
        self.loaded = None        # (game, params) loaded in the JVM
        self.key = None           # (game, params, fold, seed, n_actions, id(owner)) it currently holds

    @classmethod
    def get(cls) -> "_Backend":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _call(self, response: str) -> dict:
        return json.loads(response)

    def new_game(self, spec: GameSpec, fold: str, seed: int, gold: bool = False) -> dict:
        """Engine errors (a parameter out of range, a map that cannot be built) become one-line
        ValueErrors naming the game and its parameters."""
        from py4j.protocol import Py4JError
        where = f"TextWorldExpress game {spec.game!r} ({spec.param_string or 'no parameters'})"
        if self.loaded != (spec.game, spec.params):
            self.loaded = None
            try:
                msg = self.env.server.load(spec.game, spec.param_string)
            except Py4JError as e:
                raise ValueError(f"{where}: {_java_message(e)}") from None
            if msg:
                raise ValueError(f"TextWorldExpress game {spec.game!r}, {self._culprit(spec)}: "
                                 f"{' '.join(str(msg).split())}")
            self.loaded = (spec.game, spec.params)
        try:
            info = self._call(self.env.server.generateNewGameJSON(seed, fold, gold))
        except Py4JError as e:
            raise ValueError(f"{where}, {fold} seed {seed}: {_java_message(e)}") from None
        if str(info.get("observation", "")).startswith("ERROR:"):
            raise ValueError(f"{where}, {fold} seed {seed}: {info['observation'][len('ERROR:'):].strip()}")
        return info

    def _culprit(self, spec: GameSpec) -> str:
        """The parameter the engine refuses, found by loading each one alone (only after a failure)."""
        for name, value in spec.params:
            if self.env.server.load(spec.game, f"{name}={value}"):
                return f"parameter {name}={value}"
        return f"parameters {spec.param_string}"

    def step(self, action: str) -> dict:
        return self._call(self.env.server.stepJSON(action))

    def task_description(self) -> str:
        return " ".join(str(self.env.server.getTaskDescription()).split())

    def gold(self) -> list[str]:
        return list(self.env.server.getGoldActionSequence())


def _java_message(error) -> str:
    """The first line of the Java exception inside a py4j error, without the stack trace."""
    text = str(getattr(error, "java_exception", "") or error)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "engine error")
    return re.sub(r"^(?:[\w.$]+(?:Exception|Error): |ERROR: )+", "", first)


def _check_task(spec: GameSpec, task: Task):
    refuse_generated(task)
    if task.fold not in FOLD_SEEDS:
        raise ValueError(f"unknown fold {task.fold!r}; use train, dev or test")
    if task.seed not in FOLD_SEEDS[task.fold]:
        r = FOLD_SEEDS[task.fold]
        raise ValueError(f"seed {task.seed} is not in the {task.fold} fold ({r.start}-{r.stop - 1})")


class TextWorldEnv(RealEnv):
    """One episode of a TextWorldExpress game behind the TextEnv protocol (invalid actions: RealEnv)."""
    info_defaults = {"raw": ""}      # the engine's own observation of the step

    def __init__(self, spec: str, invalid_action: str = "fail"):
        super().__init__(invalid_action)
        self.spec = parse_spec(spec)
        self.spec_str = spec
        self.backend = _Backend.get()
        # the expert `envs.collect` plays: this rule of the visible state when the game has one,
        # else None and the gold action sequence (`gold_actions`)
        self.observable_expert = OBSERVABLE_EXPERTS.get(self.spec.game)

    @property
    def max_steps(self) -> int:
        return self.spec.max_steps

    # --- bookkeeping so several episodes can share the JVM
    def _key(self):
        return (self.spec, self.task.fold, self.task.seed, len(self.actions), id(self))

    def _restore(self):
        if self.backend.key == self._key():
            return
        self.backend.new_game(self.spec, self.task.fold, self.task.seed)
        for a in self.actions:
            self.backend.step(a)
        self.backend.key = self._key()

    def reset(self, task: Task) -> tuple[str, dict]:
        _check_task(self.spec, task)
        self.task, self.actions, self.steps, self.done = task, [], 0, False
        info = self.backend.new_game(self.spec, task.fold, task.seed)
        self.backend.key = self._key()
        self.instruction = self.backend.task_description()
        self.notes = read_notes(info["observation"])
        self.state = abstract_state(info["observation"], info, self.spec.game, self.notes)
        self.admissible = admissible(info["validActions"], self.spec.game)
        return self.state, self._info(success=False, invalid=False, raw=info["observation"])

    def _act(self, action: str) -> tuple[str, float, bool, dict]:
        self._restore()
        info = self.backend.step(action)
        self.actions.append(action)
        self.backend.key = self._key()
        success = bool(info["tasksuccess"]) or info["score"] >= 1.0
        terminated = success or bool(info["taskfailure"])
        self.done = terminated or self.steps >= self.max_steps
        self.notes = {**self.notes, **read_notes(info["observation"])}
        self.state = abstract_state(info["observation"], info, self.spec.game, self.notes)
        self.admissible = admissible(info["validActions"], self.spec.game)
        return self.state, float(success), self.done, self._info(success, False, self.done and not terminated,
                                                                  raw=info["observation"])

    def gold_actions(self) -> list[str]:
        """The game's gold action sequence for the current task (from a fresh copy of the game)."""
        self.backend.new_game(self.spec, self.task.fold, self.task.seed, gold=True)
        gold = self.backend.gold()
        self.backend.key = None
        return gold

