"""Prompt/output formats and their parsers: malformed model outputs never crash, they are counted."""
import json
import random
import re
from collections import Counter

from hypothesis import given, settings, strategies as st

import dreamgym as dg

STATE = ("feedback: You take the coin.\nroom: kitchen\nyou see: stove; fridge (closed)\nexits: none\n"
         "inventory: coin\nactions: open fridge | put coin in stove")


def test_agent_round_trip_and_malformed():
    assert dg.parse_agent(dg.agent_target("why", "take coin")) == ("why", "take coin")
    assert dg.parse_agent("<think>a</think> <action>  open   fridge </action> trailing") == ("a", "open fridge")
    for bad in ["", "take coin", "<think>x</think>", "<action>take coin</action>", "<think>x<action>y</action>",
                "<think>x</think><action></action>", "<think>x</think><action>y", None]:
        assert dg.parse_agent(bad)[1] is None, bad


def test_exp_round_trip_and_clipping():
    out = dg.parse_exp(dg.exp_target("r", STATE, 1.0, True))
    assert out == dg.ExpAnswer("r", STATE, 1.0, True)
    assert dg.parse_exp(dg.exp_target(None, STATE, 0, False)) == dg.ExpAnswer("", STATE, 0.0, False)
    assert dg.parse_exp(f"<state>{STATE}</state><reward>7</reward><done>yes</done>").reward == 1.0
    # a garbled answer after a valid-looking prefix must not be glued into the state by backtracking
    garbled = (f"<think>a</think><state>{STATE}</state><reward>0</reward><done>notakes me on</think>"
               f"<state>{STATE}</state><reward>0</reward><done>no</done>")
    assert dg.parse_exp(garbled) is None
    assert dg.parse_exp("<state>s</state><reward>0</reward><done>no</done>") is None     # not a state
    for bad in ["", "<state>s</state>", "<state></state><reward>0</reward><done>no</done>",
                "<state>s</state><reward>nan</reward><done>no</done>", "<state>s</state><reward>x</reward><done>no</done>",
                "<state>s</state><reward>1</reward><done>maybe</done>", "<think>a<state>s</state>"]:
        assert dg.parse_exp(bad) is None, bad


def test_final_state_may_list_no_actions():
    """A MiniWoB page is gone once its episode ends (`actions: none`): M_exp must be able to write
    that final state, but a state the episode goes on from needs actions, and so does a new task."""
    final = 'feedback: clicked [4] BUTTON. Episode over: task complete.\npage: -\nelements: none\nactions: none'
    assert dg.parse_exp(dg.exp_target("r", final, 1.0, True)) == dg.ExpAnswer("r", final, 1.0, True)
    assert dg.parse_exp(dg.exp_target("r", final, 0.0, False)) is None
    assert dg.well_formed_state(final, final=True) and not dg.well_formed_state(final)
    assert dg.parse_task(f"<task>click ok</task><state>{final}</state>") is None


def test_task_format():
    t = dg.Task("twc", "train", 1, instruction="put things away", init_state=STATE)
    assert dg.parse_task(dg.task_target(t)) == ("put things away", STATE)
    assert dg.parse_task("<task>x</task><state>room: kitchen</state>") is None
    assert dg.parse_task(f"<task> </task><state>{STATE}</state>") is None
    assert dg.parse_state_actions(STATE) == ["open fridge", "put coin in stove"]
    assert dg.parse_state_actions("room: x") is None


def test_prompts_keep_only_recent_history():
    hist = [(f"a{i}", f"f{i}") for i in range(6)]
    p = dg.agent_prompt("task", hist, STATE, h=2)
    assert "a5 -> f5" in p and "a4 -> f4" in p and "a3" not in p
    assert "history: none" in dg.agent_prompt("task", [], STATE)


TAGS = ["<think>", "</think>", "<action>", "</action>", "<state>", "</state>", "<reward>", "</reward>",
        "<done>", "</done>", "<task>", "</task>", "1", "0", "yes", "no", "\n", "x", " "]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TAGS) | st.text(max_size=5), max_size=25))
def test_parsers_never_raise_on_fuzzed_outputs(parts):
    text = "".join(parts)
    thought, action = dg.parse_agent(text)
    assert action is None or (action.strip() == action and action)
    out = dg.parse_exp(text)
    assert out is None or (0.0 <= out.reward <= 1.0 and out.next_state)
    dg.parse_task(text)
    dg.parse_state_actions(text)


# ----------------------------------------------------------------------------- mutation fuzzing
TEACHER_OK = json.dumps({"task_tutorial": {"plan": "P", "success_mode": "S", "failure_mode": "F"},
                         "transition_plan": ["first", "second"]})
VALID = [dg.agent_target("why", "take coin"), dg.exp_target("r", STATE, 1.0, True), dg.exp_target(None, STATE, 0, False),
         dg.task_target(dg.Task("coin", instruction="find the coin", init_state=STATE)), TEACHER_OK]
ODD = ["\u202e", "\u200b", "\ud800", "\udfff", "\U0001f600", "\x00", "\ufeff", "é", "\u0301", "\r\n", "\t"]
NUMBERS = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999", "9" * 5000, "1" * 400 + ".5", "0x1", "1e-999",
           "-0", "+1", "1.0.0", ""]


def mutate(rng: random.Random, text: str) -> str:
    op = rng.randrange(9)
    at = rng.randrange(len(text) + 1)
    if op == 0:                                            # truncation
        return text[:at]
    if op == 1:                                            # a tag swapped for another
        tags = re.findall(r"</?[a-z]+>", text)
        return text.replace(rng.choice(tags), rng.choice(TAGS), 1) if tags else text
    if op == 2:                                            # an inserted tag
        return text[:at] + rng.choice(TAGS[:12]) + text[at:]
    if op == 3:                                            # unicode
        return text[:at] + "".join(rng.choice(ODD) for _ in range(rng.randint(1, 4))) + text[at:]
    if op == 4:                                            # huge, non-finite or odd numbers
        return re.sub(r"(<reward>)[^<]*|(?<=: )\d+|\b[01]\b", lambda m: (m.group(1) or "") + rng.choice(NUMBERS),
                      text, count=rng.randint(1, 3))
    if op == 5:                                            # an emptied field
        return re.sub(r"<(state|task|think|action|reward|done)>.*?</\1>", r"<\1></\1>", text, count=1, flags=re.S)
    if op == 6:                                            # deep nesting (JSON), repeated text
        return text[:at] + rng.choice(["[", "{", '{"a":']) * rng.randint(500, 2000) + text[at:]
    if op == 7:                                            # a span deleted or duplicated
        end = rng.randint(at, len(text))
        return text[:at] + (text[at:end] * 2 if rng.random() < 0.5 else "") + text[end:]
    return "".join(rng.choice(TAGS + ODD + NUMBERS[:6]) for _ in range(rng.randint(0, 30)))   # random output


def fuzzed(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = rng.choice(VALID)
        for _ in range(rng.randint(1, 3)):
            text = mutate(rng, text)
        out.append(text)
    return out


def test_parsers_survive_mutated_outputs():
    texts = fuzzed(10_000)
    ok = Counter()
    for text in texts:
        _, action = dg.parse_agent(text)
        assert action is None or (action.strip() == action and action)
        out = dg.parse_exp(text)
        assert out is None or (0.0 <= out.reward <= 1.0 and dg.well_formed_state(out.next_state, final=out.done))
        task = dg.parse_task(text)
        assert task is None or (task[0] and dg.well_formed_state(task[1]))
        plan = dg.TeacherAnnotator.parse(text, 2)
        assert plan is None or (len(plan) == 2 and all(isinstance(p, str) for p in plan))
        ok.update(agent=action is not None, exp=out is not None, task=task is not None, teacher=plan is not None)
    assert min(ok.values()) > 50, f"the mutations should leave some outputs valid: {ok}"


def test_experience_model_counts_every_failure_on_garbage():
    from engine import Generation
    texts = iter(fuzzed(1_200, seed=1))
    answered = []

    class Garbage:
        def generate(self, system, users, params, generator=None):
            out = [next(texts) for _ in users]
            answered.extend(out)
            return [Generation(t, [], [], "stop") for t in out]

    rng = random.Random(2)
    task = dg.Task("coin", instruction="find the coin")
    queries = [dg.ExpQuery(task, [("look", rng.choice(ODD))], STATE.replace("kitchen", "kitchen " + rng.choice(ODD)),
                           "open fridge") for _ in range(500)]
    exp_model = dg.ExperienceModel(Garbage(), None, k=0)
    res = exp_model.step(queries)
    malformed = sum(dg.parse_exp(t) is None for t in answered)
    assert exp_model.stats["malformed"] == malformed and exp_model.stats["steps"] == 500
    retried = answered[500:]
    assert len(retried) == sum(dg.parse_exp(t) is None for t in answered[:500]), "each malformed answer retried once"
    assert exp_model.stats["failed"] == sum(not r.ok for r in res) == sum(dg.parse_exp(t) is None for t in retried)
    assert all(r.ok or (r.done and r.reward == 0.0 and dg.FAILED_STEP in r.next_state) for r in res)
