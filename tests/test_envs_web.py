"""The web adapters: MiniWoB++ in a real headless Chromium, WebShop and WebArena-Lite against their
real servers. Each runs only where its real thing is here and otherwise skips saying what is missing;
the element-list helpers they share (envs/web.py) are plain functions, tested everywhere."""
import importlib.util
import os
import re
import shutil
import urllib.request

import pytest

from envs import Task, make_env
from envs import web


# ----------------------------------------------------------------------------- envs/web.py
def test_action_grammar():
    assert web.parse_action("click [6]") == ("click", "6", None)
    assert web.parse_action("type [a12] New York") == ("type", "a12", "New York")
    for bad in ("click [6] extra", "type [5]", "click 6", "press [6]", "", None):
        assert web.parse_action(bad) is None


def test_candidates_and_admissible():
    texts = web.candidate_texts('Enter the username "ann" and the password "x|y;z"', ["ann", "q1"])
    assert texts == ["ann", "x/y,z", "q1"], "de-duplicated, separators of the state format removed"
    els = [web.Element("5", "TEXTBOX", "tt (empty)", typeable=True), web.Element("6", "BUTTON", "Submit")]
    assert web.admissible(els, ["ann"]) == ["click [5]", "click [6]", "type [5] ann"]
    state = web.render("-", "", els, web.admissible(els, ["ann"]))
    assert state.splitlines() == ["feedback: -", "page: -", "elements: [5] TEXTBOX: tt (empty); [6] BUTTON: Submit",
                                  "actions: click [5] | click [6] | type [5] ann"]


def test_select_keeps_page_order_and_prefers_instruction_words():
    els = [web.Element(str(i), "LINK", f"item {i}") for i in range(30)] + [web.Element("99", "BUTTON", "Checkout")]
    kept = web.select(els, "go to checkout", k=10)
    assert len(kept) == 10 and kept[-1].id == "99" and [e.id for e in kept[:-1]] == [str(i) for i in range(9)]


# ----------------------------------------------------------------------------- MiniWoB++ (real Chromium)
def _miniwob_missing() -> str | None:
    if importlib.util.find_spec("miniwob") is None:
        return "MiniWoB++ is optional: pip install -r requirements-envs.txt"
    chrome = os.environ.get("MINIWOB_CHROME_BINARY") or shutil.which("chromium")
    driver = os.environ.get("MINIWOB_CHROMEDRIVER") or shutil.which("chromedriver")
    if not (chrome and driver):
        return "no Chromium/ChromeDriver: apt-get install -y chromium chromium-driver (or set MINIWOB_CHROME_BINARY and MINIWOB_CHROMEDRIVER)"
    return None


needs_miniwob = pytest.mark.skipif(_miniwob_missing() is not None, reason=str(_miniwob_missing()))


def _elements(state: str) -> dict[str, tuple[str, str]]:
    """Parse the state's element line: {id: (TYPE, description)}."""
    line = next(ln for ln in state.splitlines() if ln.startswith("elements:"))[len("elements: "):]
    return {m[0]: (m[1], m[2]) for m in re.findall(r"\[(\S+)\] (\w+): ([^;]*)", line)}


def read_and_solve(state: str, instruction: str) -> list[str]:
    """A solver that reads only the abstract state: type the quoted text into the text box if
    there is one and press the button, else click the element named in quotes."""
    target = re.search(r'"([^"]+)"', instruction).group(1)
    els = _elements(state)
    box = next((i for i, (t, _) in els.items() if t == "TEXTBOX"), None)
    if box is not None:
        button = next(i for i, (t, _) in els.items() if t == "BUTTON")
        return [f"type [{box}] {target}", f"click [{button}]"]
    return [next(f"click [{i}]" for i, (_, d) in els.items() if d.strip() == target)]


@needs_miniwob
@pytest.mark.parametrize("task", ["click-button", "click-link", "enter-text"])
def test_miniwob_reset_step_success_from_the_element_list(task):
    spec = f"miniwob:{task}"
    env = make_env(spec)
    for seed in (0, 1):
        state, info = env.reset(Task(spec, "train", seed))
        assert info["instruction"] and '"' in info["instruction"]
        lines = state.splitlines()
        assert [ln.split(":")[0] for ln in lines] == ["feedback", "page", "elements", "actions"]
        assert lines[-1] == "actions: " + " | ".join(info["admissible"])
        assert 1 <= len(_elements(state)) <= web.MAX_ELEMENTS
        plan = read_and_solve(state, info["instruction"])
        for i, a in enumerate(plan):
            assert a in info["admissible"], (a, info["admissible"])
            state, r, done, info = env.step(a)
            assert (r, done) == ((1.0, True) if i == len(plan) - 1 else (0.0, False)), (a, state)
        assert info["success"] and "Episode over: task complete" in state


@needs_miniwob
@pytest.mark.parametrize("task", ["login-user", "click-checkboxes", "click-tab", "click-dialog", "focus-text"])
def test_miniwob_scripted_experts_solve(task):
    spec = f"miniwob:{task}"
    env = make_env(spec)
    for seed in (3, 4):
        _, info = env.reset(Task(spec, "train", seed))
        gold = env.gold_actions()
        total = 0.0
        for a in gold:
            assert a in info["admissible"], (a, info["admissible"])
            _, r, done, info = env.step(a)
            total += r
        assert done and total == 1.0 and info["success"], (task, seed, gold)


@needs_miniwob
def test_miniwob_wrong_click_fails_and_invalid_action_ends_episode():
    spec = "miniwob:click-link"
    env = make_env(spec)
    state, info = env.reset(Task(spec, "train", 2))
    target = re.search(r'"([^"]+)"', info["instruction"]).group(1)
    wrong = next(f"click [{i}]" for i, (_, d) in _elements(state).items() if d.strip() != target)
    state, r, done, info = env.step(wrong)
    assert done and r == 0.0 and not info["success"] and "task failed" in state and not info["truncated"]
    env.reset(Task(spec, "train", 2))
    state, r, done, info = env.step("click [999]")
    assert done and r == 0.0 and info["invalid"] and state.startswith("feedback: Invalid action: click [999].")
    assert not info["truncated"], "an invalid action that fails the episode is a termination"
    env = make_env(spec, invalid_action="step")
    s0, _ = env.reset(Task(spec, "train", 2))
    s, r, done, info = env.step(None)
    assert not done and info["invalid"] and s.splitlines()[1:] == s0.splitlines()[1:]
    env = make_env(spec + ",max_steps=1", invalid_action="step")
    env.reset(Task(spec, "train", 2))
    _, _, done, info = env.step(None)
    assert done and info["truncated"], "the step budget ran out: a truncation"


@needs_miniwob
def test_miniwob_episodes_share_a_browser_and_stay_independent():
    """Interleaved episodes of one task (one Chromium) see what each would see alone."""
    spec = "miniwob:login-user"
    alone = []
    for seed in (5, 6):
        e = make_env(spec)
        _, info = e.reset(Task(spec, "train", seed))
        alone.append(e.step(info["admissible"][-1])[0])
    a, b = make_env(spec), make_env(spec)
    _, ia = a.reset(Task(spec, "train", 5))
    _, ib = b.reset(Task(spec, "train", 6))
    sa = a.step(ia["admissible"][-1])[0]
    sb = b.step(ib["admissible"][-1])[0]
    assert [sa, sb] == alone


@needs_miniwob
def test_miniwob_collect_expert_and_filtered_random():
    from envs.collect import collect, summary
    rows = collect("miniwob:click-button", 2, 1, 2, progress=False, seed=3)
    per = summary(rows)
    assert per["miniwob:click-button/expert"]["success_rate"] == 1.0
    rows = collect("miniwob:click-test-2", 0, 0, 0, progress=False, n_filtered=2, max_tries=30)
    kept = summary(rows)["miniwob:click-test-2/filtered"]
    assert kept["trajectories"] == 2 and kept["success_rate"] == 1.0
    with pytest.raises(ValueError, match="no expert"):
        collect("miniwob:click-test-2", 1, 0, 0, progress=False)


def test_miniwob_spec_names_one_or_more_tasks():
    """Pure spec parsing (no browser): tasks in turn by seed, a shared step limit, and clear errors."""
    from envs import miniwob
    assert miniwob.parse_spec("miniwob:click-button") == (("click-button",), miniwob.MAX_STEPS)
    assert miniwob.parse_spec("miniwob:click-button+enter-text,max_steps=4") == (("click-button", "enter-text"), 4)
    assert [miniwob.task_of("miniwob:a+b+c", s) for s in (20000, 20001, 20002, 20003)] == ["c", "a", "b", "c"]
    for bad in ("miniwob:", "miniwob:a+", "miniwob:A", "miniwob:a+a", "miniwob:a,steps=3"):
        with pytest.raises(ValueError):
            miniwob.parse_spec(bad)


@needs_miniwob
def test_miniwob_several_tasks_in_one_env():
    spec = "miniwob:click-button+enter-text"
    env = make_env(spec)
    for seed, task in ((10, "click-button"), (11, "enter-text"), (12, "click-button")):
        _, info = env.reset(Task(spec, "train", seed))
        assert env.name == task
        alone = make_env(f"miniwob:{task}")
        assert alone.reset(Task(f"miniwob:{task}", "train", seed))[1]["instruction"] == info["instruction"]
        for a in env.gold_actions():
            _, r, done, info = env.step(a)
        assert done and r == 1.0 and info["success"], (task, seed)


# ----------------------------------------------------------------------------- WebShop (real server)
def _webshop_missing() -> str | None:
    url = os.environ.get("WEBSHOP_URL")
    if not url:
        return ("no WebShop server: run WebShop from its repository (princeton-nlp/WebShop, port 3000) "
                "and set WEBSHOP_URL=http://host:3000")
    try:
        urllib.request.urlopen(url.rstrip("/") + "/dg_fixed_0", timeout=10).read()
    except Exception as e:  # noqa: BLE001 -- any failure means: not reachable
        return f"WEBSHOP_URL={url} is not reachable: {e}"
    return None


@pytest.mark.skipif(_webshop_missing() is not None, reason=str(_webshop_missing()))
def test_webshop_search_click_buy_against_the_real_server():
    env = make_env("webshop")
    state, info = env.reset(Task("webshop", "test", 0))
    assert info["instruction"] and state.splitlines()[-1] == "actions: " + " | ".join(info["admissible"])
    state, r, done, info = env.step(info["admissible"][0])            # the listed search
    assert not done and "page: search results" in state
    product = next(a for a in info["admissible"] if re.fullmatch(r"click\[b[0-9a-z]{9}\]", a))
    state, r, done, info = env.step(product)
    assert "page: item page" in state and "click[buy now]" in info["admissible"]
    state, r, done, info = env.step("click[buy now]")
    assert done and 0.0 <= r <= 1.0 and info["success"] == (r >= 1.0)
    env.reset(Task("webshop", "test", 0))
    _, r, done, info = env.step("click[nothing like this]")
    assert done and info["invalid"] and r == 0.0


# WebShop's pages, offline: what the adapter reads from them, and the one validity rule and success
# threshold that the real adapter and the dream share
SHOP = {"search": ('<div id="instruction-text"><h4>Instruction:</h4><h4>i need red shoes, and price lower than '
                   '50.00 dollars</h4></div><form action="/s1/search"><input id="search_input" '
                   'name="search_query"><button>Search</button></form>'),
        "results": ('<form action="/s1/back"><button>Back to Search</button></form><a class="product-link" '
                    'href="/item_page/s1/B01">B01</a><span>Red shoes</span><span>$20.00</span>'),
        "item": '<form action="/done/s1/B01"><button>Buy Now</button></form><p>Red shoes</p>',
        "done": '<p>Your score (min 0.0, max 1.0)</p><p>{score}</p>'}


def offline_shop(monkeypatch, score):
    from envs.webshop import Page, WebShopEnv

    def get(self, method, url, form=None):
        page = ("results" if url.endswith("/search") else "item" if "/item_page/" in url else
                "done" if "/done/" in url else "search")
        return Page(SHOP[page].format(score=score), url)

    monkeypatch.setattr(WebShopEnv, "_get", get)
    return make_env("webshop:http://shop.test")


class Scripted:
    """M_exp writing one fixed answer."""
    def __init__(self, text):
        self.text, self.calls = text, 0

    def generate(self, system, users, params, generator=None):
        from engine import Generation
        self.calls += len(users)
        return [Generation(self.text, [], [], "stop") for _ in users]


def test_webshop_real_and_dream_share_one_validity_rule(monkeypatch):
    import dreamgym as dg
    import envs
    env = offline_shop(monkeypatch, 1.0)
    spec = "webshop:http://shop.test"
    start, info = env.reset(Task("webshop", "test", 0))
    assert info["admissible"] == ["search[red shoes]"]
    task = Task(spec, "test", 0, instruction=info["instruction"], init_state=start)
    lm = Scripted(dg.exp_target("r", start, 0.0, False))
    for action, valid in [("search[red shoes]", True), ("search[blue socks size 9]", True),
                          ("click[b01]", False), ("search[]", False), ("buy", False)]:
        assert envs.is_admissible(spec, info["admissible"], action) is valid, action
        env.reset(Task("webshop", "test", 0))
        assert env.step(action)[3]["invalid"] is not valid, action
        dream = dg.DreamEnv(dg.ExperienceModel(lm, None, k=0), 15)
        dream.reset([task])
        assert dream.step({0: action})[0].info["invalid"] is not valid, action
    env.reset(Task("webshop", "test", 0))
    state, _, done, info = env.step("search[blue socks]")
    assert not done and not any(a.startswith("search[") for a in info["admissible"]), "no search box here"
    assert not envs.is_admissible(spec, info["admissible"], "search[red shoes]")
    assert env.step("search[red shoes]")[3]["invalid"]


@pytest.mark.parametrize("score", [0.75, 1.0])
def test_webshop_real_and_dream_share_one_success_threshold(monkeypatch, score):
    import dreamgym as dg
    env = offline_shop(monkeypatch, score)
    env.reset(Task("webshop", "test", 0))
    env.step("search[red shoes]")
    env.step("click[b01]")
    final, r, done, info = env.step("click[buy now]")
    assert done and r == score and info["success"] is (score >= 1.0)
    before = "feedback: -\npage: item page\nyou see: red shoes\noptions: none\nactions: click[buy now]"
    task = Task("webshop:http://shop.test", "test", 0, instruction="i need red shoes", init_state=before)
    dream = dg.DreamEnv(dg.ExperienceModel(Scripted(dg.exp_target("r", final, score, True)), None, k=0), 15)
    dream.reset([task])
    res = dream.step({0: "click[buy now]"})[0]
    assert res.done and res.reward == score and res.info["success"] is info["success"]


# ----------------------------------------------------------------------------- WebArena-Lite (real servers)
def _webarena_missing() -> str | None:
    if importlib.util.find_spec("browsergym") is None or importlib.util.find_spec("browsergym.webarenalite") is None:
        return "BrowserGym's WebArena-Lite is optional: pip install -r requirements-webarena.txt (see envs/README.md)"
    from envs.webarena import missing_servers
    if missing_servers():
        return f"no WebArena servers here (they run on the user's machines): set {', '.join(missing_servers())}"
    return None


@pytest.mark.skipif(_webarena_missing() is not None, reason=str(_webarena_missing()))
def test_webarena_lite_reset_and_step_against_the_real_servers():
    env = make_env("webarena")
    state, info = env.reset(Task("webarena", "test", 0))
    els = _elements(state)
    assert info["instruction"] and 1 <= len(els) <= web.MAX_ELEMENTS
    state, r, done, info = env.step(info["admissible"][0])
    assert r in (0.0, 1.0) and state.splitlines()[-1].startswith("actions:")
    state, r, done, info = env.step("stop [N/A]")
    assert done and r in (0.0, 1.0)
