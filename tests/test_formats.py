"""Prompt/output formats and their parsers: malformed model outputs never crash, they are counted."""
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
    assert out == dg.ExpOutput("r", STATE, 1.0, True)
    assert dg.parse_exp(dg.exp_target(None, STATE, 0, False)) == dg.ExpOutput("", STATE, 0.0, False)
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
    assert dg.parse_exp(dg.exp_target("r", final, 1.0, True)) == dg.ExpOutput("r", final, 1.0, True)
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
