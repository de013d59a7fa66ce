"""The method's wiring, checked with stub models in milliseconds: what goes into M_exp's prompt, what
retrieval embeds and excludes, what ends a dreamed episode, how fidelity is scored. Each test fails
if the piece it names is miswired."""
import zlib

import numpy as np
import pytest

import dreamgym as dg
from engine import Generation
from envs import Task

TASK = Task("coin", "train", 1, instruction="find the coin")


def state(room, actions="move east | take coin"):
    return f"feedback: -\nroom: {room}\nyou see: coin\nactions: {actions}"


class WordEncoder:
    """phi stand-in: a bag of words hashed with crc32 (the same in every process); records its inputs."""
    dim = 64

    def __init__(self):
        self.seen = []

    def __call__(self, texts):
        self.seen += texts
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


class LM:
    """A model that answers `answer(user prompt)` and records every prompt."""
    def __init__(self, answer):
        self.answer, self.users = answer, []

    def generate(self, system, users, params, generator=None):
        self.users += users
        return [Generation(self.answer(u), [], [], "stop") for u in users]


def tr(room, action, outcome, traj, t=0, reward=0.0, done=False, history=()):
    return dg.Transition(task=TASK, t=t, state=state(room), action=action, reward=reward, done=done,
                         next_state=f"feedback: {outcome}\nroom: {room}\nactions: move east", traj=traj,
                         history=list(history), reasoning="because")


def answer(reward=0, done="no", room="hall"):
    return lambda u: f"<think>r</think><state>{state(room)}</state><reward>{reward}</reward><done>{done}</done>"


# ----------------------------------------------------------------------------- M_exp's prompt
def test_exp_prompt_holds_the_retrieved_demos_and_only_the_last_turns():
    buf = dg.ReplayBuffer(WordEncoder())
    demo = tr("kitchen", "take coin", "You take the shiny coin.", "offline/7")
    buf.add([demo])
    lm = LM(answer())
    hist = [(f"act{i}", f"fb{i}") for i in range(5)]
    dg.ExperienceModel(lm, buf, k=1, history=2).step([dg.ExpQuery(TASK, hist, state("kitchen"), "take coin")])
    prompt = lm.users[0]
    assert dg.demo_text(demo) in prompt, "the retrieved demos are in the prompt"
    assert "act3 -> fb3 | act4 -> fb4" in prompt and "act2" not in prompt, "only the last `history` turns"


def test_sft_demos_never_come_from_the_transitions_own_trajectory():
    buf = dg.ReplayBuffer(WordEncoder())
    own = tr("kitchen", "take coin", "You take the coin (own).", "offline/1")
    other = tr("kitchen", "take coin", "You take the coin (other).", "offline/2")
    buf.add([own, other])
    exp_model = dg.ExperienceModel(None, buf, k=2)
    (_, prompt, target), = exp_model.sft_examples([own])
    assert "(own)" in target and "(own)" not in prompt, "the label is never among its own demos"
    assert "(other)" in prompt


def test_retrieval_embeds_the_state_without_its_action_list():
    q = dg.query_text(state("kitchen"), "take coin")
    assert "actions:" not in q and "room: kitchen" in q and q.endswith("action: take coin")
    enc = WordEncoder()
    buf = dg.ReplayBuffer(enc)
    buf.add([tr("kitchen", "take coin", "ok", "offline/1")])
    dg.ExperienceModel(LM(answer()), buf, k=1).step([dg.ExpQuery(TASK, [], state("hall"), "move east")])
    assert enc.seen and not [t for t in enc.seen if "actions:" in t]


def test_sft_retrieval_uses_each_transitions_own_embedding():
    enc = WordEncoder()
    buf = dg.ReplayBuffer(enc)
    rooms = ["kitchen", "pantry", "garden", "cellar", "attic", "porch"]
    items = [tr(r, a, f"{r} {a} done", f"offline/{r}", t=j) for r in rooms for j, a in enumerate(["take coin", "move east"])]
    buf.add(items)
    exp_model = dg.ExperienceModel(None, buf, k=2)
    fresh = enc([dg.query_text(t.state, t.action) for t in items])
    assert np.allclose(exp_model._buffer_emb(items), fresh)
    demos = buf.retrieve([t.state for t in items], [t.action for t in items], 2, exclude_traj=[t.traj for t in items])
    assert [p for _, p, _ in exp_model.sft_examples(items)] == [exp_model.prompt(dg.ExpQuery(t.task, t.history, t.state, t.action), d)
                                                          for t, d in zip(items, demos)]


# ----------------------------------------------------------------------------- what ends a dreamed episode
def test_a_dreamed_invalid_action_ends_the_episode_without_asking_the_model():
    lm = LM(answer())
    env = dg.DreamEnv(dg.ExperienceModel(lm, None, k=0), max_steps=5)
    env.reset([Task("coin", "train", 1, init_state=state("kitchen"))])
    res = env.step({0: "fly away"})[0]
    assert res.done and res.reward == 0.0 and res.info["invalid"] and not res.info["success"]
    assert lm.users == [] and res.state.startswith("feedback: Invalid action: fly away.")


def test_with_model_validity_m_exp_rules_on_every_action():
    """validity="model": an action the dreamed actions line omits is still simulated; M_exp's
    `Invalid action` answer ends the episode as a failure (reward 0, even if it said a reward)."""
    said_invalid = lambda u: ("<think>r</think><state>feedback: Invalid action: fly away.\nroom: kitchen\n"
                              "actions: move east</state><reward>1</reward><done>no</done>")
    for lm, invalid in [(LM(answer(room="hall")), False), (LM(said_invalid), True)]:
        env = dg.DreamEnv(dg.ExperienceModel(lm, None, k=0), max_steps=5, validity="model")
        env.reset([Task("coin", "train", 1, init_state=state("kitchen", actions="move west"))])
        res = env.step({0: "move east"})[0]
        assert len(lm.users) == 1, "the model was asked"
        assert res.info["invalid"] == invalid and res.done == invalid and res.reward == 0.0
        assert res.info["transition"].terminal == invalid and not res.info["transition"].truncated
    with pytest.raises(ValueError, match="validity"):
        dg.DreamEnv(dg.ExperienceModel(LM(answer()), None, k=0), max_steps=5, validity="maybe")


@pytest.mark.parametrize("done", ["yes", "no"])
def test_a_dreamed_reward_ends_the_episode(done):
    env = dg.DreamEnv(dg.ExperienceModel(LM(answer(reward=1, done=done)), None, k=0), max_steps=5)
    env.reset([Task("coin", "train", 1, init_state=state("kitchen"))])
    res = env.step({0: "take coin"})[0]
    assert res.done and res.reward == 1.0 and res.info["success"]
    assert res.info["transition"].terminal, "ended by the outcome, not by the step budget"


# ----------------------------------------------------------------------------- fidelity
def test_fidelity_scores_done_predictions():
    from eval import fidelity
    truth = {"a0": True, "a1": False, "a2": True, "a3": False}
    said = {"a0": "yes", "a1": "no", "a2": "no", "a3": "no"}          # one wrong of four
    lm = LM(lambda u: answer(done=said[u.split("action: ")[-1].strip()])(u))
    trs = [tr("kitchen", a, "x", f"offline/{a}", done=d) for a, d in truth.items()]
    f = fidelity(dg.ExperienceModel(lm, None, k=0), trs)
    assert f["done_acc"] == pytest.approx(0.75) and f["failed"] == 0.0
