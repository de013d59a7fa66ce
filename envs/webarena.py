"""WebArena-Lite (Liu et al. 2024; 165 WebArena tasks) through BrowserGym: `webarena[,max_steps=N]`.

Runs only where the user's WebArena servers are up (shopping, shopping admin, reddit, gitlab,
wikipedia, map): BrowserGym reads their URLs from WA_SHOPPING, WA_SHOPPING_ADMIN, WA_REDDIT,
WA_GITLAB, WA_WIKIPEDIA, WA_MAP, WA_HOMEPAGE. Folds: test = the 165 WebArena-Lite tasks
(`browsergym/webarenalite.<id>`), train = the other 647 WebArena tasks (`browsergym/webarena.<id>`),
the pool the paper's offline WebArena data comes from; dev has none. A seed indexes the fold's tasks.

The abstract state is the paper's: the page's accessibility tree reduced to at most 10 visible
actionable elements `[bid] ROLE: name`, BrowserGym's element ids as IDs (envs/web.py, shared with
MiniWoB++). Actions are WebArena's own grammar, mapped onto BrowserGym's action set:
    click [ID] -> click('ID')     type [ID] <text> -> fill('ID', '<text>')
    go back    -> go_back()       stop [<answer>]  -> send_msg_to_user('<answer>')  (ends the task)
WebArena needs free text (search terms, answers), so besides the listed actions `type [ID] <any
text>` on a listed input and `stop [<any answer>]` are valid; anything else is invalid and fails the
episode. Reward: BrowserGym's WebArena evaluator (1 for success) at the step that ends the episode.
Collect with `--random`/`--filtered` (no expert here; the paper used leaderboard agents' runs).
Browser: Playwright's Chromium, or the binary named by CHROMIUM_BINARY (e.g. Debian's).
"""
from __future__ import annotations

import os
import re

from . import web
from .base import RealEnv, Task, refuse_generated

MAX_STEPS = 30   # WebArena's own budget
ROLES = {"button": "BUTTON", "link": "LINK", "textbox": "TEXTBOX", "searchbox": "SEARCHBOX",
         "combobox": "COMBOBOX", "checkbox": "CHECKBOX", "radio": "RADIO", "menuitem": "MENUITEM",
         "tab": "TAB", "option": "OPTION", "switch": "SWITCH", "spinbutton": "SPINBUTTON"}
TYPEABLE = ("textbox", "searchbox", "combobox", "spinbutton")
SERVERS = ("WA_SHOPPING", "WA_SHOPPING_ADMIN", "WA_REDDIT", "WA_GITLAB", "WA_WIKIPEDIA", "WA_MAP",
           "WA_HOMEPAGE")
_STOP = re.compile(r"^stop \[(.*)\]$", re.S)


def parse_spec(spec: str) -> int:
    m = re.fullmatch(r"webarena(?::lite)?(?:,max_steps=(\d+))?", spec)
    if not m:
        raise ValueError(f"expected 'webarena' or 'webarena,max_steps=N', got {spec!r}")
    return int(m.group(1) or MAX_STEPS)


def max_steps(spec: str) -> int:
    return parse_spec(spec)


def task_ids(fold: str) -> list[str]:
    """The fold's BrowserGym task names (importing BrowserGym's task lists only)."""
    from browsergym.webarenalite.config import TASK_IDS as LITE
    if fold == "test":
        return [f"webarenalite.{i}" for i in LITE]
    if fold == "train":
        return [f"webarena.{i}" for i in range(812) if i not in set(LITE)]
    if fold == "dev":
        return []
    raise ValueError(f"unknown fold {fold!r}; use train, dev or test")


def task_seeds(spec: str, fold: str) -> range:
    return range(len(task_ids(fold)))


def missing_servers() -> list[str]:
    return [v for v in SERVERS if not os.environ.get(v)]


# ----------------------------------------------------------------------------- page -> elements
def ax_elements(obs) -> tuple[list[web.Element], str]:
    """BrowserGym's accessibility tree -> (visible actionable elements, page title and URL)."""
    props = obs.get("extra_element_properties", {})
    elements, title = [], ""
    for node in obs["axtree_object"]["nodes"]:
        role = node.get("role", {}).get("value", "")
        name = node.get("name", {}).get("value", "")
        if role == "RootWebArea" and not title:
            title = name
        bid = node.get("browsergym_id")
        if role not in ROLES or bid is None or props.get(bid, {}).get("visibility", 0) < 0.5:
            continue
        value = node.get("value", {}).get("value")
        desc = name + (f' = "{value}"' if value else "")
        checked = {p["name"]: p.get("value", {}).get("value") for p in node.get("properties", [])}.get("checked")
        if checked is not None:
            desc += " (checked)" if checked in (True, "true") else " (unchecked)"
        elements.append(web.Element(str(bid), ROLES[role], desc, typeable=role in TYPEABLE))
    return elements, f"{title} ({obs.get('url', '')})"


def to_browsergym(action: str) -> str | None:
    """Our action text -> BrowserGym's Python action, or None if it is not in the grammar."""
    if action == "go back":
        return "go_back()"
    m = _STOP.match(action)
    if m:
        return f"send_msg_to_user({m.group(1)!r})"
    parsed = web.parse_action(action)
    if parsed is None:
        return None
    verb, bid, text = parsed
    return f"click({bid!r})" if verb == "click" else f"fill({bid!r}, {text!r})"


class WebArenaEnv(RealEnv):
    """One WebArena task in BrowserGym behind the TextEnv protocol (see module docstring)."""

    def __init__(self, spec: str = "webarena", invalid_action: str = "fail"):
        super().__init__(invalid_action)
        self.max_steps = parse_spec(spec)
        self.env = None

    def reset(self, task: Task) -> tuple[str, dict]:
        import gymnasium
        import browsergym.webarena  # noqa: F401  (registers browsergym/webarena.<id>)
        import browsergym.webarenalite  # noqa: F401  (registers browsergym/webarenalite.<id>)
        refuse_generated(task)
        if missing_servers():
            raise RuntimeError(f"WebArena needs its servers: set {', '.join(missing_servers())}")
        ids = task_ids(task.fold)
        if not 0 <= task.seed < len(ids):
            raise ValueError(f"seed {task.seed} is not in the {task.fold} fold ({len(ids)} tasks)")
        if self.env is not None:
            self.env.close()
        chromium = os.environ.get("CHROMIUM_BINARY")
        self.env = gymnasium.make(f"browsergym/{ids[task.seed]}", headless=True,
                                  pw_chromium_kwargs={"executable_path": chromium} if chromium else {})
        obs, _ = self.env.reset(seed=task.seed)
        self.task, self.steps, self.done = task, 0, False
        self.instruction = web.clean(obs["goal"])
        self._observe(obs, "-")
        return self.state, self._info(False, False)

    def _observe(self, obs, feedback):
        elements, page = ax_elements(obs)
        self.elements = web.select(elements, self.instruction)
        listed = web.admissible(self.elements, web.candidate_texts(self.instruction))
        self.admissible = listed + ["go back"]
        self.state = web.render(feedback, page, self.elements, self.admissible)

    def valid(self, action: str | None) -> bool:
        """Listed, or free text where WebArena needs it: typing into a listed input, or an answer."""
        if action is None:
            return False
        if action in self.admissible or _STOP.match(action):
            return True
        parsed = web.parse_action(action)
        return bool(parsed) and parsed[0] == "type" and any(
            e.id == parsed[1] and e.typeable for e in self.elements)

    def _act(self, action: str) -> tuple[str, float, bool, dict]:
        obs, reward, terminated, truncated, _ = self.env.step(to_browsergym(action))
        error = obs.get("last_action_error") or ""
        success = bool(terminated) and reward >= 1.0
        self.done = bool(terminated or truncated) or self.steps >= self.max_steps
        feedback = action if not error else f"{action} failed: {error.splitlines()[0]}"
        self._observe(obs, feedback)
        return self.state, float(success), self.done, self._info(success, False, self.done and not terminated)
