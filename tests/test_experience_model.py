"""The experience model: SFT masking, malformed outputs, both backends (local and an OpenAI-compatible
endpoint served on 127.0.0.1 by a real tiny model), teacher annotation, fidelity metrics."""
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import dreamgym as dg
import train
from conftest import WordEncoder
from engine import SamplingParams
import envs
from envs import Task


@pytest.fixture(scope="module")
def setup(tiny_run):
    root, cfg, _ = tiny_run
    exp_lm = train.load_lm(cfg, os.path.join(cfg.out, "exp_model"), torch.device("cpu"), trainable=False)
    trajs = train.annotated_trajectories(cfg)
    return cfg, exp_lm, trajs


class ChatServer:
    """A minimal OpenAI-compatible /v1/chat/completions server in front of a LocalLM (a real model)."""

    def __init__(self, lm):
        self.lm, self.headers = lm, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.headers.append(dict(self.headers))
                msgs = {m["role"]: m["content"] for m in body["messages"]}
                stop = tuple(body.get("stop") or ())
                g = outer.lm.generate(msgs["system"], [msgs["user"]], SamplingParams(
                    temperature=body["temperature"], max_new_tokens=body["max_tokens"], stop=stop))[0]
                text = g.text[:-len(stop[0])] if g.finish_reason == "stop" and stop else g.text   # as OpenAI does
                out = {"choices": [{"message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop" if g.finish_reason != "length" else "length"}]}
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_sft_scores_target_tokens_only(setup):
    cfg, lm, trajs = setup
    exp_model = train.exp_model_of(cfg, lm, None)
    examples = exp_model.sft_examples([t for tr in trajs[:3] for t in tr])
    data = train.encode_examples(lm, examples)
    batch = dg.pack(data, lm.tokenizer.pad_token_id, "cpu")
    assert batch["targets"].tolist() == [x for _, t in data for x in t], "only target tokens are scored"
    logp, _, _ = dg.response_logprobs(lm.model, batch)
    assert logp.shape[0] == sum(len(t) for _, t in data) and torch.isfinite(logp).all()
    assert all(lm.tokenizer.decode(t).startswith("<think>") for _, t in data)
    assert all(lm.tokenizer.decode(t).endswith(dg.EXP_STOP) for _, t in data)


def test_sft_demos_never_come_from_the_same_trajectory(setup, tiny_run):
    cfg, lm, trajs = setup
    buf = train.build_buffer(cfg, trajs, dg.Encoder())
    exp_model = train.exp_model_of(cfg, lm, buf)
    flat = [t for tr in trajs for t in tr]
    qs = [dg.ExpQuery(t.task, t.history, t.state, t.action) for t in flat]
    demos = exp_model.demos(qs, exclude_traj=[t.traj for t in flat])
    assert all(len(d) == cfg.k for d in demos)
    assert all(d.traj != t.traj for t, ds in zip(flat, demos) for d in ds)


def test_malformed_outputs_are_retried_counted_and_fail_the_step(setup):
    cfg, _, trajs = setup
    d = os.path.join(cfg.out, "exp_init")                 # an untrained model: its outputs are malformed
    lm = train.load_lm(cfg, d, torch.device("cpu"), trainable=False)
    exp_model = dg.ExperienceModel(lm, None, k=0, max_new_tokens=24)
    t = trajs[0][0]
    res = exp_model.step([dg.ExpQuery(t.task, t.history, t.state, t.action)] * 2)
    assert [r.ok for r in res] == [False, False]
    assert all(r.done and r.reward == 0.0 and dg.FAILED_STEP in r.next_state for r in res)
    assert exp_model.stats["malformed"] == 4 and exp_model.stats["failed"] == 2, "one retry each, then counted"


def test_the_retry_samples_and_can_repair_a_step(setup):
    """A greedy retry would repeat the malformed answer: the retry samples (seeded by the prompts)."""
    from engine import Generation
    _, _, trajs = setup
    t = trajs[0][0]
    good = dg.exp_target("r", t.next_state, t.reward, t.done)
    calls = []

    class Scripted:                     # malformed first, well formed when sampled
        def generate(self, system, users, params, generator=None):
            calls.append((params.temperature, generator is not None))
            return [Generation(good if params.temperature > 0 else "<state>oops", [], [], "stop") for _ in users]

    exp_model = dg.ExperienceModel(Scripted(), None, k=0)
    res = exp_model.step([dg.ExpQuery(t.task, t.history, t.state, t.action)])
    assert calls == [(0.0, False), (0.7, True)]
    assert res[0].ok and res[0].next_state == t.next_state.strip()
    assert (exp_model.stats["malformed"], exp_model.stats["failed"]) == (1, 0)


def test_endpoint_backend_matches_local_and_keeps_the_key_secret(setup, monkeypatch):
    cfg, lm, trajs = setup
    server = ChatServer(lm)
    try:
        monkeypatch.setenv("DREAMGYM_API_KEY", "s3cret")
        remote = dg.EndpointLM(server.url, "tiny")
        assert "s3cret" not in repr(remote)
        qs = [dg.ExpQuery(t.task, t.history, t.state, t.action) for t in trajs[1][:3]]
        local_res = dg.ExperienceModel(lm, None, k=0, max_new_tokens=200).step(qs)
        remote_exp = dg.ExperienceModel(remote, None, k=0, max_new_tokens=200)
        remote_res = remote_exp.step(qs)
        assert [r.next_state for r in remote_res] == [r.next_state for r in local_res]
        assert [(r.reward, r.done, r.ok) for r in remote_res] == [(r.reward, r.done, r.ok) for r in local_res]
        assert all(h.get("Authorization") == "Bearer s3cret" for h in server.headers)
        teacher = dg.TeacherAnnotator(remote, retries=1, max_new_tokens=16)
        assert teacher.annotate_many([trajs[0]]) == [None], "a tiny model writes no valid JSON"
        assert teacher.failures == 1
        retries = remote_exp.stats["malformed"] - remote_exp.stats["failed"]
        assert len(server.headers) == len(qs) + retries + 2, "one request per call and per retry"
    finally:
        server.close()


def test_teacher_json_parsing():
    ok = json.dumps({"task_tutorial": {"plan": "P.", "success_mode": "S.", "failure_mode": "F."},
                     "transition_plan": ["first", "second"]})
    assert dg.TeacherAnnotator.parse("Sure! " + ok, 2) == ["P. S. F. first", "second"]
    assert dg.TeacherAnnotator.parse(ok, 3) is None
    assert dg.TeacherAnnotator.parse("{not json}", 2) is None
    assert dg.TeacherAnnotator.parse('{"transition_plan": [1, 2]}', 2) is None


def test_rule_annotator_explains_changes():
    s0 = ("feedback: -\nroom: kitchen\nyou see: fridge (closed); coin\nexits: none\ninventory: nothing\n"
          "actions: open fridge | take coin")
    s1 = "feedback: You take the coin.\nroom: kitchen\nyou see: fridge (closed)\nexits: none\ninventory: coin\nactions: open fridge"
    t = dg.Transition(Task("coin", "train", 0), 0, s0, "take coin", s1, 1.0, True, success=True)
    r = dg.RuleAnnotator().explain(t)
    assert "coin goes into the inventory" in r and "reward is 1" in r
    bad = dg.Transition(Task("coin", "train", 0), 0, s0, "fly", s0, 0.0, True, invalid=True)
    assert "not one of the listed actions" in dg.RuleAnnotator().explain(bad)


def test_rule_annotator_explains_web_pages():
    """Web states (envs/web.py) change in their element list; a page that closes without success
    is the environment failing the task, not the step budget."""
    s0 = ('feedback: -\npage: Enter "ann"\nelements: [5] TEXTBOX: tt (empty); [6] BUTTON: Submit\n'
          "actions: click [5] | click [6] | type [5] ann")
    s1 = ('feedback: typed "ann" into [5] TEXTBOX\npage: Enter "ann"\nelements: [5] TEXTBOX: tt "ann", focused; '
          "[6] BUTTON: Submit\nactions: click [5] | click [6] | type [5] ann")
    end = "feedback: clicked [6] BUTTON. Episode over: task failed.\npage: -\nelements: none\nactions: none"
    task = Task("miniwob:enter-text", "train", 0)
    typed = dg.RuleAnnotator().explain(dg.Transition(task, 0, s0, "type [5] ann", s1, 0.0, False))
    assert typed == 'now [5] TEXTBOX: tt "ann", focused; the task is not finished yet.'
    failed = dg.RuleAnnotator().explain(dg.Transition(task, 0, s0, "click [6]", end, 0.0, True))
    assert failed == "the page closes; this fails the task: the episode ends with reward 0."


def test_fidelity_metrics(setup):
    from eval import fidelity, token_f1
    cfg, lm, trajs = setup
    assert token_f1("a b c", "a b c") == 1.0 and token_f1("a", "b") == 0.0
    exp_model = dg.ExperienceModel(lm, None, k=0, max_new_tokens=200)
    flat = [t for tr in trajs[:4] for t in tr]
    f = fidelity(exp_model, flat)
    assert f["n"] == len(flat)
    for key in ("reward_acc", "done_acc", "state_f1", "parse_fail"):
        assert 0.0 <= f[key] <= 1.0


def test_step_budget_truncation_is_not_taught_as_termination():
    """M_exp cannot see the step count, so a done caused only by the budget must not be in its
    targets (it would learn to end dreamed episodes at random); the dream enforces the budget."""
    task = Task("coin", "train", 1)
    row = lambda t, done, **kw: dict(task=task.to_dict(), t=t, state="s", action="move east", next_state="n",
                                     reward=0.0, done=done, success=False, invalid=False, traj="x", **kw)
    budget = envs.max_steps("coin")
    old = dg.trajectories([row(t, t == budget - 1) for t in range(budget)])[0]   # rows without the field
    assert old[-1].done and old[-1].truncated and not old[-1].terminal
    assert not any(t.truncated for t in old[:-1])
    new = dg.trajectories([row(0, True, truncated=False)])[0]     # the env's own flag wins
    assert new[0].terminal
    target = dg.ExperienceModel(None, None, k=0).sft_examples([old[-1]])[0][2]
    assert target.endswith("<done>no</done>") and "fails" not in dg.RuleAnnotator().explain(old[-1])

    class Never:                                 # M_exp never ends an episode
        def generate(self, system, users, params, generator=None):
            from engine import Generation
            return [Generation("<think>r</think><state>feedback: ok\nactions: move east</state><reward>0</reward>"
                               "<done>no</done>", [], [], "stop") for _ in users]
    start = Task("coin", "train", 1, init_state="feedback: start\nactions: move east")
    env = dg.DreamEnv(dg.ExperienceModel(Never(), None, k=0), max_steps=2)
    env.reset([start])
    assert not env.step({0: "move east"})[0].done
    last = env.step({0: "move east"})[0]
    assert last.done and last.info["transition"].truncated and not last.info["transition"].terminal


# ----------------------------------------------------------------------------- failed simulations
class Garbage:
    """An M_exp that never writes a well-formed answer."""
    def generate(self, system, users, params, generator=None):
        from engine import Generation
        return [Generation("<state>oops", [], [], "stop") for _ in users]


class StubAgent:
    """An agent that always answers `action`, with fixed token ids."""
    def __init__(self, action):
        self.action = action

    def prefix(self, system):
        return "", [1]

    def user_ids(self, system, user):
        return [2, 3]

    def generate(self, system, users, params, generator=None):
        from engine import Generation
        return [Generation(dg.agent_target("go", self.action), [4, 5], [-0.1, -0.2], "stop") for _ in users]


START = Task("coin", "train", 1, init_state="feedback: start\nroom: kitchen\nactions: move east")


def test_a_failed_simulation_is_marked_and_never_becomes_a_demo():
    env = dg.DreamEnv(dg.ExperienceModel(Garbage(), None, k=0), max_steps=3)
    env.reset([START])
    res = env.step({0: "move east"})[0]
    tr = res.info["transition"]
    assert res.done and res.reward == 0.0 and tr.model_failed and not tr.invalid and not tr.success
    assert dg.Transition.from_dict(tr.to_dict()).model_failed
    old = {k: v for k, v in tr.to_dict().items() if k != "model_failed"}     # a buffer file written before
    assert dg.Transition.from_dict(old).model_failed is False
    buf = dg.ReplayBuffer(WordEncoder())
    buf.add([tr])
    assert len(buf) == 0, "a failure M_exp did not simulate is no demonstration"


def test_episodes_ended_by_a_failed_simulation_are_masked_out_of_grpo():
    eps = dg.run_episodes(StubAgent("move east"), dg.DreamEnv(dg.ExperienceModel(Garbage(), None, k=0), 3),
                          [START] * 2, SamplingParams(), groups=[0, 0])
    assert all(e.exp_failed and len(e.turns) == 1 for e in eps)
    ok = [dg.Episode(task=START, reward=r, group=0) for r in (1.0, 0.0)]
    kept = dg.learnable(ok + eps)
    assert kept == ok, "the agent did not cause these endings"
    adv = dg.episode_advantages(kept, scale="none").tolist()
    assert adv == pytest.approx([0.5, -0.5]), "group statistics over the remaining episodes"
    assert dg.episode_advantages([]).numel() == 0 and dg.turn_gae([], [], 1.0, 0.95) == ([], [])


class Says:
    """An M_exp that always writes the same well-formed answer."""
    def __init__(self, feedback, reward, done):
        self.text = dg.exp_target("r", f"feedback: {feedback}\nroom: hall\nactions: move east", reward, done)

    def generate(self, system, users, params, generator=None):
        from engine import Generation
        return [Generation(self.text, [], [], "stop") for _ in users]


def test_dream_gap_counts_how_the_dream_and_the_real_env_end(monkeypatch):
    """eval.py gap: the real env (here a scripted one that pays 1 at once) against dreams that end
    by an invalid ruling, by the step budget, or like the real one."""
    real = dg.ExperienceModel(Says("You find the coin.", 1.0, True), None, k=0)
    monkeypatch.setattr(dg, "make_real_env", lambda env, n: dg.DreamEnv(real, 3))
    cases = [(Says("Invalid action: move east.", 0.0, True), "invalid_end", 0.0),
             (Says("You are in the hall.", 0.0, False), "truncated", 0.0),
             (Says("You find the coin.", 1.0, True), "success", 1.0)]
    for says, ending, agreement in cases:
        gap = dg.dream_gap(StubAgent("move east"), dg.ExperienceModel(says, None, k=0), [START] * 4, 3,
                           validity="model")
        assert gap["real"]["success"] == 1.0 and gap["n"] == 4
        assert gap["dream"][ending] == 1.0 and gap["agreement"] == agreement, (ending, gap)
        assert gap["dream"]["steps"] == (3 if ending == "truncated" else 1)
