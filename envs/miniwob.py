"""MiniWoB++ (Liu et al. 2018) in a real headless Chromium: `miniwob:<task>[+<task>...][,max_steps=N]`.

WebArena-Lite needs its own web servers, which cannot run here; MiniWoB++ runs the same web path
for real on a CPU machine: a page in Chromium, read as a list of actionable elements (envs/web.py),
acted on with `click [ID]` / `type [ID] <text>`. The utterance ("Click on the "Ok" button.") is the
instruction; element IDs are MiniWoB's DOM refs. Reward 1 at the step that completes the task
(MiniWoB's raw reward > 0), 0 otherwise; an action outside the admissible list fails the episode.

Browser: Debian's `chromium` + `chromium-driver`, headless, paths from MINIWOB_CHROME_BINARY /
MINIWOB_CHROMEDRIVER (else found on PATH), so Selenium never downloads a browser or a driver;
Selenium Manager's statistics and Chromium's background traffic (metrics, component updates,
pings) are switched off. MiniWoB's 10-second real-time limit per episode is lifted: an LLM agent on
a CPU thinks slower than that, and our own step limit bounds the episode instead.

Cheap episodes: one browser per task per process, shared by all episodes. A MiniWoB episode is a
pure function of (task, seed, actions), so an episode whose page is not the one in the browser is
restored by replaying its actions (the TextWorld adapter does the same with its JVM).

Several tasks: `miniwob:click-button+enter-text` is one environment whose seed s plays task
number s mod n (in the order given), so one experience model and one agent learn them together
(the paper trains one M_exp per benchmark, not per web task); each task keeps its own browser.

Expert: `gold_actions()` reads the utterance's fields and the element list for the tasks in SOLVERS
(click-button, click-link, click-tab, click-dialog, focus-text, enter-text, login-user,
click-checkboxes); other tasks collect with random + filtered play (envs/collect.py --filtered).
"""
from __future__ import annotations

import atexit
import os
import re
import shutil

from . import web
from .base import RealEnv, Task, refuse_generated
from .textworld import FOLD_SEEDS

MAX_STEPS = 10
TEXT_TAGS = ("input_text", "input_password", "textarea", "input_number", "input_email", "input_tel",
             "input_search", "input_url")
QUIET_FLAGS = ("--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-domain-reliability", "--disable-breakpad", "--metrics-recording-only",
               "--no-first-run", "--no-default-browser-check", "--disable-dev-shm-usage")
NO_TIMEOUT_MS = 1_000_000_000   # ~11 days: setTimeout's limit is ~24.8 days


def parse_spec(spec: str) -> tuple[tuple[str, ...], int]:
    """'miniwob:click-button' or 'miniwob:click-button+enter-text,max_steps=5' -> (tasks, max steps)."""
    rest = spec.partition(":")[2]
    task, _, opt = rest.partition(",")
    max_steps = MAX_STEPS
    if opt:
        m = re.fullmatch(r"max_steps=(\d+)", opt)
        if not m:
            raise ValueError(f"bad option {opt!r} in {spec!r}: expected max_steps=N")
        max_steps = int(m.group(1))
    if not re.fullmatch(r"[a-z0-9-]+(\+[a-z0-9-]+)*", task):
        raise ValueError(f"expected 'miniwob:<task>[+<task>...]' (e.g. miniwob:click-button), got {spec!r}")
    names = tuple(task.split("+"))
    if len(set(names)) != len(names):
        raise ValueError(f"a task is named twice in {spec!r}")
    return names, max_steps


def task_of(spec: str, seed: int) -> str:
    """The MiniWoB task a seed plays: seeds take the spec's tasks in turn."""
    names = parse_spec(spec)[0]
    return names[seed % len(names)]


def max_steps(spec: str) -> int:
    return parse_spec(spec)[1]


def task_seeds(spec: str, fold: str) -> range:
    """MiniWoB draws each episode from the task's generator by seed: disjoint seed ranges per fold."""
    if fold not in FOLD_SEEDS:
        raise ValueError(f"unknown fold {fold!r}; use train, dev or test")
    return FOLD_SEEDS[fold]


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver): from the environment, else from PATH; never downloaded."""
    chrome = os.environ.get("MINIWOB_CHROME_BINARY") or shutil.which("chromium")
    driver = os.environ.get("MINIWOB_CHROMEDRIVER") or shutil.which("chromedriver")
    if not (chrome and driver):
        raise RuntimeError("MiniWoB++ needs Chromium and ChromeDriver: apt-get install -y chromium "
                           "chromium-driver, or set MINIWOB_CHROME_BINARY and MINIWOB_CHROMEDRIVER")
    return chrome, driver


def _quiet_browser():
    """Point miniwob at the local browser with background traffic off. miniwob builds its own
    ChromeOptions, so its module gets an options factory that adds our flags first."""
    import types

    import miniwob.selenium_instance as si
    from selenium import webdriver
    chrome, driver = browser_paths()
    os.environ.update(MINIWOB_CHROME_BINARY=chrome, MINIWOB_CHROMEDRIVER=driver)
    os.environ.setdefault("SE_AVOID_STATS", "true")   # Selenium Manager: no usage statistics
    os.environ.setdefault("SE_OFFLINE", "true")       # ... and no downloads, ever

    def options():
        o = webdriver.ChromeOptions()
        for flag in QUIET_FLAGS:
            o.add_argument(flag)
        return o
    si.webdriver = types.SimpleNamespace(Chrome=webdriver.Chrome, ChromeOptions=options)


class _Browser:
    """One MiniWoB task in one Chromium, shared by every episode of that task in this process."""
    _open: dict[str, "_Browser"] = {}

    def __init__(self, task: str):
        import gymnasium
        import miniwob
        _quiet_browser()
        gymnasium.register_envs(miniwob)
        self.env = gymnasium.make(f"miniwob/{task}-v1").unwrapped
        self.key = None     # (owner id, seed, number of actions) of the page now loaded

    @classmethod
    def get(cls, task: str) -> "_Browser":
        if task not in cls._open:
            if not cls._open:
                atexit.register(cls.close_all)   # else ChromeDriver and Chromium outlive the process
            cls._open[task] = cls(task)
        return cls._open[task]

    @classmethod
    def close_all(cls):
        while cls._open:
            cls._open.popitem()[1].env.close()

    def _script(self, js: str):
        inst = self.env.instance   # selenium runs on miniwob's instance thread: queue the call there
        inst.call(lambda: inst.driver.execute_script(js))
        inst.wait()

    def reset(self, seed: int):
        self._script(f"core.EPISODE_MAX_TIME = {NO_TIMEOUT_MS};")   # read when the episode starts
        obs, _ = self.env.reset(seed=seed)
        return obs

    def act(self, verb: str, ref: str, text: str | None):
        kind = "CLICK_ELEMENT" if verb == "click" else "FOCUS_ELEMENT_AND_TYPE_TEXT"
        extra = {"text": text} if text is not None else {}
        obs, _, done, _, info = self.env.step(self.env.create_action(kind, ref=int(ref), **extra))
        return obs, done, info


# ----------------------------------------------------------------------------- page -> elements
def _texts(el, children) -> list[str]:
    """Text of an element and its descendants, in page order."""
    own = [el["text"]] if el["text"] else []
    return own + [t for c in children.get(el["ref"], []) for t in _texts(c, children)]


def _element(el, children, by_ref) -> web.Element | None:
    tag, classes = el["tag"], el["classes"].split()
    if tag == "button":
        desc = " ".join(_texts(el, children)) or el["id"] or "button"
        return web.Element(str(el["ref"]), "BUTTON", desc)
    if tag == "a" or "alink" in classes:
        return web.Element(str(el["ref"]), "LINK", " ".join(_texts(el, children)))
    if tag in TEXT_TAGS:
        value = f'"{el["value"]}"' if el["value"] else "(empty)"
        focused = ", focused" if el["flags"][0] else ""
        kind = "PASSWORD" if tag == "input_password" else "TEXTBOX"
        return web.Element(str(el["ref"]), kind, f"{el['id'] or 'text'} {value}{focused}", typeable=True)
    if tag in ("input_checkbox", "input_radio"):
        label = by_ref.get(el["parent"])
        desc = " ".join(_texts(label, children)) if label and label["tag"] == "label" else el["id"]
        mark = "checked" if el["value"] == "True" else "unchecked"
        return web.Element(str(el["ref"]), tag[6:].upper(), f"{desc} ({mark})")
    return None


def page_elements(obs) -> tuple[list[web.Element], str]:
    """MiniWoB's DOM -> (actionable elements, the page's other visible text)."""
    dom = obs["dom_elements"]
    by_ref = {el["ref"]: el for el in dom}
    children = {}
    for el in dom:
        children.setdefault(el["parent"], []).append(el)
    elements, inside = [], set()
    for el in dom:
        e = _element(el, children, by_ref)
        if e is not None:
            elements.append(e)
            stack = [el]
            while stack:   # its own text is in its description, not in the page text
                x = stack.pop()
                inside.add(x["ref"])
                stack.extend(children.get(x["ref"], []))
            if el["tag"] in ("input_checkbox", "input_radio") and el["parent"] in by_ref:
                inside.update(c["ref"] for c in children.get(el["parent"], []))
    text = [el["text"] for el in dom if el["text"] and el["ref"] not in inside]
    return elements, " ".join(text)


# ----------------------------------------------------------------------------- scripted experts
def _by(elements, kind, desc=None):
    return next((e for e in elements if e.type == kind and (desc is None or e.desc.split(" (")[0] == desc)),
                None)


def _submit(elements):
    return [f"click [{_by(elements, 'BUTTON').id}]"]


def _typed(elements, el_id_prefix, text):
    box = next(e for e in elements if e.typeable and e.desc.startswith(el_id_prefix))
    return f"type [{box.id}] {text}"


SOLVERS = {
    "click-button": lambda f, els: [f"click [{_by(els, 'BUTTON', f['target']).id}]"],
    "click-link": lambda f, els: [f"click [{_by(els, 'LINK', f['target']).id}]"],
    "click-tab": lambda f, els: [f"click [{_by(els, 'LINK', 'Tab #' + f['target']).id}]"],
    "click-dialog": lambda f, els: _submit(els),
    "focus-text": lambda f, els: [f"click [{next(e for e in els if e.typeable).id}]"],
    "enter-text": lambda f, els: [_typed(els, "", f["target"])] + _submit(els),
    "login-user": lambda f, els: [_typed(els, "username", f["username"]),
                                  _typed(els, "password", f["password"])] + _submit(els),
    "click-checkboxes": lambda f, els: [f"click [{_by(els, 'CHECKBOX', v).id}]" for k, v in f.items()
                                        if k.startswith("target")] + _submit(els),
}


# ----------------------------------------------------------------------------- the environment
class MiniWoBEnv(RealEnv):
    """One episode of a MiniWoB++ task behind the TextEnv protocol (see module docstring)."""

    def __init__(self, spec: str, invalid_action: str = "fail"):
        super().__init__(invalid_action)
        self.names, self.max_steps = parse_spec(spec)
        self.spec = spec
        self.has_expert = all(n in SOLVERS for n in self.names)

    def _key(self):
        return (id(self), self.task.seed, len(self.actions))

    def _restore(self):
        """Bring the shared browser to this episode's page, replaying its actions if another ran."""
        if self.browser.key == self._key():
            return
        self.browser.reset(self.task.seed)
        for a in self.actions:
            self.browser.act(*web.parse_action(a))
        self.browser.key = self._key()

    def reset(self, task: Task) -> tuple[str, dict]:
        refuse_generated(task)
        if task.seed not in task_seeds("", task.fold):
            r = FOLD_SEEDS[task.fold]
            raise ValueError(f"seed {task.seed} is not in the {task.fold} fold ({r.start}-{r.stop - 1})")
        self.task, self.actions, self.steps, self.done = task, [], 0, False
        self.name = task_of(self.spec, task.seed)
        self.browser = _Browser.get(self.name)
        obs = self.browser.reset(task.seed)
        self.browser.key = self._key()
        self.instruction = web.clean(obs["utterance"])
        self.fields = dict(obs["fields"])
        self._observe(obs, "-")
        return self.state, self._info(False, False)

    def _observe(self, obs, feedback: str):
        elements, text = page_elements(obs)
        self.elements = web.select(elements, self.instruction)
        texts = web.candidate_texts(self.instruction, [v for k, v in self.fields.items() if k != "button"])
        self.admissible = web.admissible(self.elements, texts)
        self.state = web.render(feedback, text, self.elements, self.admissible)

    def _act(self, action: str) -> tuple[str, float, bool, dict]:
        self._restore()
        obs, ended, meta = self.browser.act(*web.parse_action(action))
        self.actions.append(action)
        self.browser.key = self._key()
        feedback = web.describe_action(action, self.elements)
        success = bool(ended) and meta["raw_reward"] > 0
        self.done = bool(ended) or self.steps >= self.max_steps
        if ended:   # the page is gone: say how the episode ended, nothing is left to do
            self.elements, self.admissible = [], []
            outcome = "task complete" if success else "task failed"
            self.state = web.render(f"{feedback}. Episode over: {outcome}.", "", [], [])
        else:
            self._observe(obs, feedback)
        return self.state, float(success), self.done, self._info(success, False, self.done and not ended)

    def gold_actions(self) -> list[str]:
        """A scripted solution from the utterance and the initial elements (tasks in SOLVERS)."""
        if self.name not in SOLVERS:
            raise NotImplementedError(f"no scripted expert for {self.name}; collect with --random/--filtered")
        obs = self.browser.reset(self.task.seed)    # the initial page, wherever the episode is now
        self.browser.key = None
        elements, _ = page_elements(obs)
        return SOLVERS[self.name](dict(obs["fields"]), web.select(elements, self.instruction))
