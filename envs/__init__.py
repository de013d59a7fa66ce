"""Environments: the protocol (base.py), the built-in TextWorldExpress games, and adapters for the
paper's benchmarks. Adapters import their optional packages (requirements-envs.txt) only when used."""
import importlib
import re

from .base import BatchEnv, StepResult, Task, TextEnv, is_success, listed_action  # noqa: F401
from .textworld import FOLD_SEEDS, GAMES, TextWorldEnv, parse_spec, parse_state_actions  # noqa: F401

# spec prefix -> (module, class); e.g. "alfworld:data/alfworld", "miniwob:click-button",
# "webshop:http://localhost:3000", "webarena". See envs/README.md.
ADAPTERS = {"alfworld": ("alfworld", "AlfWorldEnv"), "miniwob": ("miniwob", "MiniWoBEnv"),
            "webshop": ("webshop", "WebShopEnv"), "webarena": ("webarena", "WebArenaEnv")}


def _kind(spec: str) -> str:
    """'miniwob:click-button' -> 'miniwob'; 'alfworld,max_steps=20' -> 'alfworld'."""
    return re.split(r"[:,]", spec, maxsplit=1)[0]


def _adapter(spec: str):
    kind = _kind(spec)
    if kind not in ADAPTERS:
        raise ValueError(f"unknown environment {spec!r}; built in: {sorted(GAMES)}; adapters: {sorted(ADAPTERS)}")
    return importlib.import_module(f".{ADAPTERS[kind][0]}", __name__), ADAPTERS[kind][1]


def make_env(spec: str, **kwargs) -> TextEnv:
    """An environment for one episode, by spec: a TextWorldExpress game ('twc', 'coin:numLocations=5')
    or an adapter ('alfworld:<dir>', 'miniwob:click-button', 'webshop:<url>', 'webarena')."""
    if _kind(spec) in GAMES:
        return TextWorldEnv(spec, **kwargs)
    module, cls = _adapter(spec)
    return getattr(module, cls)(spec, **kwargs)


def task_seeds(spec: str, fold: str):
    """The task seeds of a fold: TextWorldExpress's seed ranges, an adapter's own (game files, goals)."""
    if _kind(spec) in GAMES:
        if fold not in FOLD_SEEDS:
            raise ValueError(f"unknown fold {fold!r}; use train, dev or test")
        return FOLD_SEEDS[fold]
    return _adapter(spec)[0].task_seeds(spec, fold)


def is_admissible(spec: str, listed: list[str], action: str | None) -> bool:
    """Whether `action` is valid in a state listing `listed`, for the environment `spec`: the rule the
    real adapter applies and the dream applies to dreamed states. Listed verbatim (base.listed_action),
    unless the adapter has its own `is_admissible` (WebShop: any search where a search box is shown)."""
    if _kind(spec) in GAMES:
        return listed_action(listed, action)
    return getattr(_adapter(spec)[0], "is_admissible", listed_action)(listed, action)


def max_steps(spec: str) -> int:
    """The episode budget a spec runs with (what the dream env needs to mirror the real one)."""
    if _kind(spec) in GAMES:
        return parse_spec(spec).max_steps
    return _adapter(spec)[0].max_steps(spec)
