"""The text-environment protocol every environment (real or dreamed) speaks.

An environment is anything with
    reset(task)  -> (state, info)
    step(action) -> (state, reward, done, info)
where `state` is the *abstract* textual state (the paper's "abstract textual state space": a compact
listing of what the task needs, not raw pages) and `info` carries at least
    "admissible": list[str]   actions valid in this state (also listed inside the state text)
    "instruction": str        the task instruction
    "success": bool           the task was completed at this step
    "invalid": bool           the action was not admissible
    "truncated": bool         (optional) the episode ended only because its step budget ran out:
                              Gymnasium's truncated-vs-terminated split. The experience model is
                              trained on termination; the dream enforces the budget itself.
Rewards follow the paper (outcome-based, as in verl-agent/GiGPO): 1 only at the final step of a
completed task, 0 otherwise; an invalid action ends the episode as a failure (or, with
`invalid_action="step"`, costs a step and changes nothing).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Task:
    """One task: which environment, which game instance, and its instruction.

    Real tasks are identified by (env, fold, seed); in the dream they start from `init_state`, the
    initial state recorded in the offline data. Tasks written by the curriculum task generator carry
    a `parent` (the seed task they vary) and only ever run in the dream.
    """
    env: str                      # environment spec, e.g. "twc" or "twc:numItemsToPutAway=2"
    fold: str = "train"           # train | dev | test
    seed: int = 0
    instruction: str = ""
    init_state: str | None = None  # the initial abstract state (for the dream)
    parent: str | None = None      # id of the seed task a generated task varies

    @property
    def id(self) -> str:
        if self.parent is not None:
            return f"gen:{self.parent}:{self.seed}"
        return f"{self.env}/{self.fold}/{self.seed}"

    @property
    def synthetic(self) -> bool:
        return self.parent is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# ----------------------------------------------------------------------------- the shared state format
def render_state_lines(lines: dict[str, str], actions: list[str]) -> str:
    """The abstract state every environment shares: one `aspect: value` line per aspect, then the
    admissible actions. Agent and experience-model prompts are written against this format, so a
    TextWorld room, an ALFWorld receptacle and a web page all look alike to them."""
    out = [f"{name}: {value}" for name, value in lines.items()]
    out.append(f"actions: {' | '.join(actions) if actions else 'none'}")
    return "\n".join(out)


def join_items(items: list[str], empty: str = "nothing") -> str:
    return "; ".join(items) if items else empty


def parse_state_actions(state: str) -> list[str] | None:
    """Admissible actions listed in an abstract state (real or dreamed); None if no such line."""
    for line in state.splitlines():
        if line.startswith("actions:"):
            body = line[len("actions:"):].strip()
            return [] if body == "none" else [a.strip() for a in body.split("|") if a.strip()]
    return None


# ----------------------------------------------------------------------------- validity and success
# One rule each, shared by the real adapters and the dream (dreamgym.DreamEnv), so the dream never
# teaches the agent that an action fails when the real environment accepts it, or the reverse.
def listed_action(listed: list[str], action: str | None) -> bool:
    """The default validity rule: an action is admissible when the state lists it verbatim.
    Adapters may widen it with their own `is_admissible(listed, action)` (see envs.is_admissible)."""
    return action is not None and action in listed


SUCCESS_REWARD = 1.0


def is_success(reward: float) -> bool:
    """The task is completed: the outcome reward reaches 1. Every environment pays exactly 1 on
    success except WebShop, whose purchase score (0..1) counts as success only when perfect."""
    return reward >= SUCCESS_REWARD


def replace_feedback(state: str, feedback: str) -> str:
    lines = state.splitlines()
    if lines and lines[0].startswith("feedback:"):
        lines[0] = f"feedback: {feedback}"
    return "\n".join(lines)


def invalid_state(state: str, shown: str) -> str:
    """The state after an invalid action: unchanged but for its feedback line."""
    return replace_feedback(state, f"Invalid action: {shown}.")


def said_invalid(state: str) -> bool:
    """The state's feedback line is the answer to an invalid action (invalid_state's, or a model's
    that learned it from offline data)."""
    return state.lstrip().split("\n", 1)[0].startswith("feedback: Invalid action")


class TextEnv(Protocol):
    def reset(self, task: Task) -> tuple[str, dict]: ...
    def step(self, action: str) -> tuple[str, float, bool, dict]: ...


# ----------------------------------------------------------------------------- the real environments' base
INVALID_ACTIONS = ("fail", "step")


def refuse_generated(task: Task):
    """A real environment plays only real tasks: a generated task has no game, page or goal behind it."""
    if task.synthetic:
        raise ValueError(f"task {task.id} is a generated task: it can only run in the dream")


class RealEnv:
    """What one episode of every real environment (TextWorldExpress, ALFWorld, MiniWoB++, WebShop,
    WebArena) shares: the invalid-action policy, `step`'s checks and step count, and the `info` dict.

    A subclass sets `max_steps` and, in `reset`, `task`, `steps` (0), `done`, `instruction`, `state`
    and `admissible`; it writes `_act(action)`, one admissible action played in the real environment.
    It may widen `valid` (default: the action is listed verbatim, base.listed_action) and name fields
    of its own that every `info` carries (`info_defaults`, with their value on an invalid step).

    invalid_action: "fail" (the paper: the episode ends as a failure, reward 0) or "step" (the action
    is rejected, costs a step and changes nothing; the episode ends only when its budget runs out).
    """
    info_defaults: dict = {}

    def __init__(self, invalid_action: str = "fail"):
        if invalid_action not in INVALID_ACTIONS:
            raise ValueError("invalid_action must be 'fail' or 'step'")
        self.invalid_action = invalid_action
        self.task = None

    def step(self, action: str | None) -> tuple[str, float, bool, dict]:
        """action None means the agent's turn could not be parsed; it counts as invalid."""
        if self.task is None or self.done:
            raise RuntimeError("step() on an episode that is not running; call reset(task) first")
        self.steps += 1
        if not self.valid(action):
            return self._invalid(action)
        return self._act(action)

    def valid(self, action: str | None) -> bool:
        return listed_action(self.admissible, action)

    def _act(self, action: str) -> tuple[str, float, bool, dict]:
        raise NotImplementedError

    def _invalid(self, action: str | None) -> tuple[str, float, bool, dict]:
        shown = action if action is not None else "(unparseable)"
        self.done = self.invalid_action == "fail" or self.steps >= self.max_steps
        truncated = self.done and self.invalid_action != "fail"      # "step" mode ran out of steps
        self.state = invalid_state(self.state, shown)
        return self.state, 0.0, self.done, self._info(False, True, truncated)

    def _info(self, success: bool, invalid: bool, truncated: bool = False, **fields) -> dict:
        return {"admissible": self.admissible, "instruction": self.instruction, "success": success,
                "invalid": invalid, "truncated": truncated, "steps": self.steps, **self.info_defaults, **fields}


@dataclass
class StepResult:
    state: str
    reward: float
    done: bool
    info: dict = field(default_factory=dict)


class BatchEnv:
    """Steps many episodes of one environment kind in lock-step; finished episodes are skipped.

    `make_env` builds one episode's environment; real adapters may share heavy backends (a JVM,
    a browser) between instances, so creating many is cheap.
    """

    def __init__(self, make_env, n: int):
        self.envs = [make_env() for _ in range(n)]
        self.done = [True] * n

    def reset(self, tasks: list[Task]) -> list[tuple[str, dict]]:
        assert len(tasks) == len(self.envs), "one task per environment"
        self.done = [False] * len(tasks)
        return [env.reset(t) for env, t in zip(self.envs, tasks)]

    def step(self, actions: dict[int, str]) -> dict[int, StepResult]:
        """actions: {episode index: action} for live episodes only."""
        out = {}
        for i, a in actions.items():
            if self.done[i]:
                raise ValueError(f"episode {i} is already done")
            s, r, d, info = self.envs[i].step(a)
            self.done[i] = d
            out[i] = StepResult(s, r, d, info)
        return out
