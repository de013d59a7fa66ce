"""The agent warm start: which demonstrations it clones and when it stops."""
import pytest
import torch

import dreamgym as dg
import train
from envs import Task


def _traj(seed: int, policy: str, actions: list[str], success: bool, k: int = 0) -> list[dg.Transition]:
    task = Task("coin", "train", seed, "find the coin")
    name = f"coin/train/{seed}/{policy}" + (f"#{k}" if k else "")
    return [dg.Transition(task=task, t=i, state=f"room {i}\nactions: {a}", action=a, next_state="s",
                          reward=float(success and i == len(actions) - 1), done=i == len(actions) - 1,
                          success=success and i == len(actions) - 1, traj=name, reasoning=f"why {a}")
            for i, a in enumerate(actions)]


def test_traj_policy_reads_the_collector_s_trajectory_names():
    assert train.traj_policy(_traj(3, "expert", ["move north"], True)) == "expert"
    assert train.traj_policy(_traj(3, "noisy", ["move north"], True, k=2)) == "noisy"
    assert train.traj_policy([dg.Transition(task=Task("a:b=1/c", "train", 1), t=0, state="", action="x",
                                            next_state="", reward=0, done=True, traj="a:b=1/c/train/1/filtered")]) \
        == "filtered"


def test_warm_start_clones_only_the_successes_of_its_policies(tmp_path, monkeypatch):
    trajs = [_traj(1, "expert", ["move north", "take coin"], True),
             _traj(2, "noisy", ["move west", "take coin"], True),
             _traj(3, "random", ["move east"], True),
             _traj(4, "expert", ["move south"], False),
             _traj(5, "filtered", ["take coin"], True)]
    seen = {}

    def fake_sft(lm, examples, *a, **k):
        seen["actions"] = sorted(dg.parse_agent(t)[1] for _, _, t in examples)
    monkeypatch.setattr(train, "sft", fake_sft)
    monkeypatch.setattr(train, "init_model", lambda *a: type("LM", (), {"model": torch.nn.Linear(1, 1)})())
    monkeypatch.setattr(train, "save_on_main", lambda lm, path: None)
    cfg = train.Config(out=str(tmp_path), warm_holdout=0.0, agent_init="scratch")
    _, n = train.warm_start(cfg, trajs, [], torch.device("cpu"), None)
    assert seen["actions"] == ["move north", "take coin", "take coin"] and n == 3   # expert + filtered wins
    cfg = train.Config(out=str(tmp_path), warm_holdout=0.0, agent_init="scratch", warm_policies="noisy,random")
    _, n = train.warm_start(cfg, trajs, [], torch.device("cpu"), None)
    assert seen["actions"] == ["move east", "move west", "take coin"] and n == 3
    with pytest.raises(SystemExit, match="no successful offline trajectory"):
        train.warm_start(train.Config(out=str(tmp_path), warm_policies="noisy"), trajs[:1], [], torch.device("cpu"), None)


def test_warm_policies_are_validated():
    with pytest.raises(ValueError, match="warm_policies"):
        train.Config(warm_policies="expert,oracle").validate()
    train.Config(warm_policies="expert,noisy,random,filtered").validate()


def test_early_stopping_keeps_the_epoch_with_the_best_score(small_agent_dir, monkeypatch):
    """The score comes first (the loss breaks its ties) for the weights kept; training stops once for
    `patience` epochs neither the score nor the held-out loss has improved."""
    lm = train.load_lm(train.Config(), small_agent_dir, torch.device("cpu"), trainable=True)
    ex = [(dg.AGENT_SYSTEM, dg.agent_prompt("put the apple in the fridge", [], f"room: kitchen {i}\nactions: take apple"),
           dg.agent_target("", "take apple")) for i in range(8)]
    scores, losses, snaps = iter([0.2, 0.6, 0.4, 0.5, 0.5, 0.9]), iter([1.0, 0.9, 0.8, 0.85, 0.85, 0.1]), []
    monkeypatch.setattr(train, "heldout_loss", lambda *a: next(losses))

    def score(m):
        snaps.append({n: p.detach().clone() for n, p in m.model.named_parameters()})
        return (next(scores),)
    train.sft(lm, ex, epochs=6, lr=1e-3, max_tokens=4096, seed=0, desc="t", heldout=ex[:2], patience=2, score=score)
    assert len(snaps) == 5       # epoch 3's lower loss resets the patience; epochs 4 and 5 improve nothing
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, snaps[1][n]), "the weights of epoch 2, the best score"


def test_action_agreement_counts_the_demonstrated_action(small_agent_dir, monkeypatch):
    lm = train.load_lm(train.Config(), small_agent_dir, torch.device("cpu"), trainable=True)
    outs = iter(["<think>x</think><action>take apple</action>", "<think></think><action>open fridge</action>",
                 "garbage"])
    monkeypatch.setattr(lm, "generate", lambda system, users, params: [
        type("G", (), {"text": next(outs)})() for _ in users])
    assert train.action_agreement(lm, ["a", "b", "c"], ["take apple", "take apple", "take apple"]) == pytest.approx(1 / 3)
    assert lm.model.training
