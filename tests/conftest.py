"""Shared fixtures. Triton kernels run under its interpreter on machines without CUDA."""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before anything imports triton

import numpy as np  # noqa: E402
import pytest  # noqa: E402


class WordEncoder:
    """A deterministic stand-in for phi: each text's vector is fixed by its words (the same in every
    process), so retrieval arithmetic can be checked exactly and a saved buffer reloads identically."""
    dim = 8

    def __call__(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, sum(map(ord, w)) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (every crash point, ...)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a longer variant of a default test; runs with --slow")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--slow"):
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="a longer variant: pass --slow"))


def tiny_cfg(root, name, **kw):
    """A toy-scale pipeline config: configs/quick.json (tiny-s models, a few trajectories, short
    episodes), with its files under the test's temporary folder."""
    import train
    base = train.load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "quick.json"))
    base.update(out=str(root / name), data_dir=str(root / "data"))
    base.update(kw)
    return train.Config(**base).validate()


def rewarded(run_episodes):
    """run_episodes whose turns are rewarded by their place in the batch: episode i's turn j pays 1
    when i + j is even. The toy agent never finishes a task, so every reward would be 0 and every RL
    update a no-op; tests that must see the policy and the critic move play through this. Every group
    of two or more episodes gets rewards that differ (a reward drawn from the sampled tokens left a
    whole iteration at 0 now and then, depending on the machine's float rounding), and a resumed
    run gets exactly the rewards an uninterrupted one got."""
    def play(*a, **k):
        eps = run_episodes(*a, **k)
        for i, e in enumerate(eps):
            for j, t in enumerate(e.turns):
                t.reward = float((i + j) % 2 == 0)
            e.reward = sum(t.reward for t in e.turns)
            e.exp_failed = False          # the toy M_exp rarely simulates a step: count its failures as steps
        return eps
    return play


def listed(step):
    """DreamEnv.step with each action the agent wrote mapped onto a listed one (by its characters):
    the toy agent's are never valid, so nothing would be dreamed and nothing would reach the buffer."""
    import dreamgym as dg

    def play(self, actions):
        fixed = {}
        for i, a in actions.items():
            ok = dg.parse_state_actions(self.states[i]) or []
            fixed[i] = ok[sum(map(ord, a or "")) % len(ok)] if ok and a not in ok else a
        out = step(self, fixed)
        for r in out.values():            # the toy M_exp's failed simulations still reach the buffer here
            if r.info.get("transition") is not None:
                r.info["transition"].model_failed = False
        return out
    return play


def toy_signal(setattr):
    """Rewarded turns and listed actions (see above): `setattr` is monkeypatch.setattr in a test, the
    builtin in a subprocess."""
    import dreamgym as dg
    setattr(dg, "run_episodes", rewarded(dg.run_episodes))
    setattr(dg.DreamEnv, "step", listed(dg.DreamEnv.step))


def run_state(out: str) -> dict:
    """What an exactly resumed run must share with an uninterrupted one: the last checkpoint (loop
    state, weights, optimizer, value head), the run's replay buffer and its RL metrics (timings aside)."""
    from safetensors.torch import load_file
    import runtime
    ck = runtime.latest_checkpoint(out)
    tensors = {f"{f}/{k}": v for f in ("agent/model.safetensors", "optimizer.safetensors", "value_head.safetensors")
               if os.path.exists(os.path.join(ck, f)) for k, v in load_file(os.path.join(ck, f)).items()}
    return dict(rl=json.load(open(os.path.join(ck, "state.json")))["rl"], tensors=tensors,
                buffer=open(os.path.join(out, "buffer.jsonl")).read() if os.path.exists(os.path.join(out, "buffer.jsonl")) else None,
                metrics=[{k: v for k, v in r.items() if k != "secs"} for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
                         if r.get("stage") in ("rl", "curve", "taskgen")])


def assert_same_run(a: dict, b: dict):
    assert a["rl"] == b["rl"]
    assert a["metrics"] == b["metrics"]
    assert a["buffer"] == b["buffer"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One full toy pipeline run; other tests reuse its experience model and warm-start agent."""
    import train
    root = tmp_path_factory.mktemp("pipe")
    cfg = tiny_cfg(root, "a")
    return root, cfg, train.run(cfg)


@pytest.fixture(scope="session")
def straight_run(tiny_run):
    """An uninterrupted 3-iteration dream run (toy_signal: the agent changes and dreamed transitions
    reach the buffer) from tiny_run's M_exp and warm start: what every crashed-and-resumed run must
    reproduce exactly."""
    import train
    root, first, _ = tiny_run
    shared = dict(exp_ckpt=os.path.join(first.out, "exp_model"), warm_ckpt=os.path.join(first.out, "agent_warm"),
                  iterations=3, eval_every=0)
    cfg = tiny_cfg(root, "straight", **shared)
    mp = pytest.MonkeyPatch()
    toy_signal(mp.setattr)
    try:
        train.run(cfg)
    finally:
        mp.undo()
    return root, shared, cfg


@pytest.fixture(scope="session")
def small_agent_dir(tmp_path_factory):
    """A random tiny-s agent (tokenizer trained on the agent's own formats): for update-step tests."""
    import dreamgym as dg
    import models
    d = tmp_path_factory.mktemp("small")
    texts = [dg.AGENT_SYSTEM] + [dg.agent_prompt("put the apple in the fridge", [("go north", "You go north.")],
                                                 f"room: kitchen {i}\nactions: take apple | open fridge") +
                                 dg.agent_target("the apple goes in the fridge", "take apple") for i in range(50)]
    models.train_tokenizer(texts, str(d / "tok"), vocab_size=400)
    models.create_tiny(str(d / "m"), str(d / "tok"), preset="tiny-s", seed=0, max_len=512)
    return str(d / "m")
