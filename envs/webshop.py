"""WebShop (Yao et al. 2022) over its own web server: `webshop:<url>` (or `webshop` with $WEBSHOP_URL).

The PyPI package `webshop` is an empty stub: WebShop runs from its repository (princeton-nlp/WebShop,
`./run_dev.sh` or `python -m web_agent_site.app`, port 3000) with its product data and search index.
This adapter talks to that server over plain HTTP, the way WebShop's text environment browses it:
the page's buttons, product links and option radios are the clickables (named by their text in
lower case, option radios by their value), `search[<query>]` submits the search box,
`click[<name>]` follows a clickable.

* Abstract state (paper: "a clean listing of page elements without headers/tags"): which page,
  what it lists (results with prices, the item's title/price/rating, a sub-page's text, the chosen
  options), the options on offer, the actions.
* Tasks: a seed is a WebShop goal index, played in session `<id>_fixed_<seed>` (WebShop's own way to
  fix the goal). Folds follow WebShop's split: test goals 0-499, dev 500-1499, train 1500 on.
* Reward: WebShop's purchase score (0..1) at the `click[buy now]` step; success = score 1
  (base.is_success, the threshold the dream uses too).
* The admissible list names one search, the instruction's request; any other `search[...]` is
  accepted too where a search box is shown (WebShop is about choosing the query): `is_admissible`,
  the rule the dream applies to dreamed WebShop states too. Anything else unlisted is invalid and
  fails the episode. No expert: collect with --random/--filtered.
"""
from __future__ import annotations

import os
import re
import urllib.parse
import urllib.request
import uuid
from html.parser import HTMLParser

from .base import RealEnv, Task, is_success, join_items, refuse_generated, render_state_lines

FOLDS = {"test": range(0, 500), "dev": range(500, 1500), "train": range(1500, 12087)}
MAX_STEPS = 15
TEXT_CHARS = 600
_SEARCH = re.compile(r"^search\[(.+)\]$")
_CLICK = re.compile(r"^click\[(.+)\]$")


def base_url(spec: str) -> str:
    url = spec.partition(":")[2] or os.environ.get("WEBSHOP_URL", "")
    if not url:
        raise ValueError("WebShop needs its server's address: 'webshop:http://host:3000' or $WEBSHOP_URL")
    return url.rstrip("/")


def task_seeds(spec: str, fold: str) -> range:
    if fold not in FOLDS:
        raise ValueError(f"unknown fold {fold!r}; use train, dev or test")
    return FOLDS[fold]


def max_steps(spec: str) -> int:
    return MAX_STEPS


def is_admissible(listed: list[str], action: str | None) -> bool:
    """Listed, or any `search[<query>]` where the state lists a search (the page has a search box)."""
    if action is None:
        return False
    return action in listed or (_SEARCH.match(action) is not None and any(_SEARCH.match(a) for a in listed))


class Page(HTMLParser):
    """One WebShop page -> its clickables and its visible text, in page order."""

    def __init__(self, html: str, url: str):
        super().__init__()
        self.url, self.form, self.tag = url, None, None
        self.texts, self.clicks, self.options, self.search = [], {}, {}, None
        self.products, self.instruction, self._in_button, self._in_instruction = [], "", False, False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a, self.tag = dict(attrs), tag
        link = lambda u: urllib.parse.urljoin(self.url, u)  # noqa: E731
        if tag == "form":
            self.form = link(a.get("action", ""))
        elif tag == "button":
            self._in_button = True
        elif tag == "input" and a.get("id") == "search_input":
            self.search = self.form
        elif tag == "input" and a.get("type") == "radio":
            self.clicks[a["value"]] = ("GET", link(a["data-url"]))
            self.options.setdefault(a["name"], []).append(a["value"])
        elif tag == "a" and "product-link" in a.get("class", ""):
            self.products.append([None])   # its asin arrives as text, then title and price
            self._href = link(a["href"])
        elif tag == "div" and a.get("id") == "instruction-text":
            self._in_instruction = True

    def handle_endtag(self, tag):
        if tag == "button":
            self._in_button = False
        elif tag == "form":
            self.form = None
        elif tag == "div":
            self._in_instruction = False

    def handle_data(self, data):
        text = " ".join(data.split())
        if not text or self.tag in ("script", "style", "title"):
            return
        if self._in_instruction:
            if text.startswith("Instruction:") or (self.instruction == "" and text != "Current Query:"):
                self.instruction = self.instruction or text.removeprefix("Instruction:").strip()
            return
        if self._in_button:
            self.clicks[text.lower()] = ("POST", self.form)
        elif self.tag == "a" and self.products and self.products[-1][0] is None:
            self.products[-1][0] = text
            self.clicks[text.lower()] = ("GET", self._href)
        elif self.products:
            self.products[-1].append(text)
        else:
            self.texts.append(text)


def query_of(instruction: str) -> str:
    """The instruction as a search query: the request without its preamble and price clause."""
    q = re.sub(r"^(i need|i want|i am looking for|i'm looking for|find me|buy me|get me)\s+", "",
               instruction.lower().strip())
    return re.sub(r",?\s*and price lower than .*$", "", q).strip(" .,") or instruction.lower()


class WebShopEnv(RealEnv):
    """One WebShop session behind the TextEnv protocol (see module docstring)."""
    info_defaults = {"score": 0.0}   # WebShop's purchase score (0 before the purchase)

    def __init__(self, spec: str = "webshop", invalid_action: str = "fail", max_steps: int = MAX_STEPS):
        super().__init__(invalid_action)
        self.url, self.max_steps = base_url(spec), max_steps

    def _get(self, method: str, url: str, form: dict | None = None) -> Page:
        data = urllib.parse.urlencode(form).encode() if form else (b"" if method == "POST" else None)
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=60) as r:
            return Page(r.read().decode("utf-8", "replace"), r.url)

    def reset(self, task: Task) -> tuple[str, dict]:
        refuse_generated(task)
        if task.seed not in task_seeds("", task.fold):
            raise ValueError(f"seed {task.seed} is not in the {task.fold} fold")
        self.session = f"{uuid.uuid4().hex[:8]}_fixed_{task.seed}"
        self.page = self._get("GET", f"{self.url}/{self.session}")
        self.task, self.steps, self.done = task, 0, False
        self.instruction = self.page.instruction
        self._observe("-")
        return self.state, self._info(False, False)

    def _observe(self, feedback: str):
        p = self.page
        path = urllib.parse.urlparse(p.url).path
        kind = path.strip("/").split("/")[0] if path.count("/") > 1 else "search"
        labels = {"WebShop", "Results", *p.options, *(v for vals in p.options.values() for v in vals)}
        seen = [f"{x[0]}: {', '.join(x[1:])}" for x in p.products] or [t for t in p.texts if t not in labels]
        seen = (["search box"] if p.search else []) + seen
        options = [f"{name}: {', '.join(vals)}" for name, vals in p.options.items()]
        chosen = re.findall(r"['\"]([^'\"]+)['\"]: ['\"]([^'\"]+)['\"]", urllib.parse.unquote(p.url))
        if chosen:
            options.append("chosen: " + ", ".join(f"{k} {v}" for k, v in chosen))
        self.admissible = ([f"search[{query_of(self.instruction)}]"] if p.search else []) + \
                          [f"click[{c}]" for c in p.clicks if c != "search"]
        text = join_items(seen)
        text = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 3] + "..."
        self.state = render_state_lines({"feedback": feedback, "page": kind.replace("_", " "), "you see": text,
                                         "options": join_items(options, "none")}, self.admissible)

    def valid(self, action: str | None) -> bool:
        return is_admissible(self.admissible, action)

    def _act(self, action: str) -> tuple[str, float, bool, dict]:
        if search := _SEARCH.match(action):
            self.page = self._get("POST", self.page.search, {"search_query": search.group(1)})
        else:
            method, url = self.page.clicks[_CLICK.match(action).group(1)]
            self.page = self._get(method, url)
        score = self._score()
        self.done = score is not None or self.steps >= self.max_steps
        if score is not None:   # the purchase page: WebShop's score is the reward
            self.admissible = []
            self.state = render_state_lines({"feedback": f"bought; score {score:g}", "page": "done",
                                             "you see": "nothing", "options": "none"}, [])
            return self.state, score, True, self._info(is_success(score), False, score=score)
        self._observe(action)
        return self.state, 0.0, self.done, self._info(False, False, self.done)   # no purchase yet

    def _score(self) -> float | None:
        if "/done/" not in self.page.url:
            return None
        m = re.search(r"Your score \(min 0\.0, max 1\.0\)\s*([0-9.]+)", " ".join(self.page.texts))
        return float(m.group(1)) if m else 0.0
