"""The web abstract state shared by MiniWoB++ and WebArena: a short list of actionable elements.

The paper abstracts a WebArena page into "3-10 actionable elements `[ID] TYPE: DESCRIPTION` extracted
from the accessibility tree". Both web adapters reduce their page (MiniWoB's DOM, BrowserGym's AX
tree) to `Element`s and hand them here, so the state text and the action grammar are one:

    feedback: clicked [6] BUTTON: Ok
    page: <visible text that is not an element, shortened>
    elements: [5] TEXTBOX: username (empty); [6] BUTTON: Ok
    actions: click [5] | click [6] | type [5] keneth

`click [ID]` clicks an element; `type [ID] <text>` focuses an input and types. The admissible list
holds one click per clickable element and one type per input and candidate text, the candidates
taken from the instruction (quoted strings, and fields the environment parsed from it), so the
action set is finite and the same check (listed or invalid) works in the real env and the dream.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .base import join_items, render_state_lines

MAX_ELEMENTS = 10
PAGE_CHARS = 300
_ACTION = re.compile(r"^(click|type) \[([^\]\s]+)\](?: (.+))?$")


@dataclass
class Element:
    id: str                 # the page's own handle: MiniWoB ref, BrowserGym bid
    type: str               # BUTTON, LINK, TEXTBOX, CHECKBOX, RADIO, ...
    desc: str
    typeable: bool = False  # an input: gets `type` actions (and a click, to focus it)

    def line(self) -> str:
        return f"[{self.id}] {self.type}: {clean(self.desc) or '-'}"


def clean(text: str) -> str:
    """One line, without the separators of the state format (';' between items, '|' between actions)."""
    return " ".join(str(text).replace(";", ",").replace("|", "/").split())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def select(elements: list[Element], instruction: str, k: int = MAX_ELEMENTS) -> list[Element]:
    """At most k elements, page order kept. On big pages, prefer inputs and elements that share words
    with the instruction: a cheap stand-in for the paper's (unspecified) extraction step."""
    if len(elements) <= k:
        return list(elements)
    want = _words(instruction)
    score = {id(e): (len(want & _words(e.desc)) + e.typeable, -i) for i, e in enumerate(elements)}
    keep = {id(e) for e in sorted(elements, key=lambda e: score[id(e)], reverse=True)[:k]}
    return [e for e in elements if id(e) in keep]


def candidate_texts(instruction: str, extra=()) -> list[str]:
    """What an input may receive: the instruction's quoted strings, then `extra` (e.g. MiniWoB's
    parsed fields), de-duplicated, order kept."""
    quoted = re.findall(r'"([^"]+)"', instruction)
    out = []
    for t in [*quoted, *extra]:
        t = clean(t)
        if t and t not in out:
            out.append(t)
    return out


def admissible(elements: list[Element], texts: list[str]) -> list[str]:
    clicks = [f"click [{e.id}]" for e in elements]
    types = [f"type [{e.id}] {t}" for e in elements if e.typeable for t in texts]
    return clicks + types


def parse_action(action: str | None) -> tuple[str, str, str | None] | None:
    """'click [6]' -> ('click', '6', None); 'type [5] Myron' -> ('type', '5', 'Myron'); else None."""
    m = _ACTION.match((action or "").strip())
    if not m or (m.group(1) == "type") != (m.group(3) is not None):
        return None
    return m.group(1), m.group(2), m.group(3)


def describe_action(action: str, elements: list[Element]) -> str:
    """The feedback line for an executed action: what was done to which kind of element."""
    verb, eid, text = parse_action(action)
    kind = next((e.type for e in elements if e.id == eid), "element")
    return f"clicked [{eid}] {kind}" if verb == "click" else f'typed "{text}" into [{eid}] {kind}'


def render(feedback: str, page: str, elements: list[Element], actions: list[str]) -> str:
    page = clean(page)
    if len(page) > PAGE_CHARS:
        page = page[:PAGE_CHARS - 3].rstrip() + "..."
    return render_state_lines({"feedback": clean(feedback) or "-", "page": page or "-",
                               "elements": join_items([e.line() for e in elements], "none")}, actions)
