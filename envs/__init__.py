"""Environments: the protocol (base.py), the built-in TextWorldExpress games, and adapters."""
from .base import BatchEnv, StepResult, Task, TextEnv  # noqa: F401
from .textworld import FOLD_SEEDS, GAMES, TextWorldEnv, parse_spec, parse_state_actions  # noqa: F401


def make_env(spec: str, **kwargs) -> TextEnv:
    """An environment for one episode, by spec: a TextWorldExpress game ('twc', 'coin:numLocations=5')."""
    game = spec.partition(":")[0]
    if game in GAMES:
        return TextWorldEnv(spec, **kwargs)
    raise ValueError(f"unknown environment {spec!r}; built in: {sorted(GAMES)}")
