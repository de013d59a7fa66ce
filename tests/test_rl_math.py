"""GRPO/PPO pieces against hand-computed values: advantages, clipped loss, masking, curriculum."""
import math
import random

import pytest
import torch

import dreamgym as dg
from envs import Task


def ep(reward, group, n_turns=2):
    e = dg.Episode(task=Task("twc", "train", group), reward=reward, group=group)
    e.turns = [dg.Turn([1, 2, 3], [4, 5], [-0.1, -0.2], reward=0.0) for _ in range(n_turns)]
    e.turns[-1].reward = reward
    return e


def test_grpo_advantages_by_hand():
    eps = [ep(1, 0), ep(0, 0), ep(0, 0), ep(1, 0), ep(1, 7), ep(1, 7), ep(0, 3)]
    adv = dg.episode_advantages(eps).tolist()
    s = math.sqrt(1 / 3)                       # unbiased std of [1, 0, 0, 1]
    expect = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0, 0.0]
    assert adv == pytest.approx(expect, abs=1e-4)
    adv = dg.episode_advantages(eps, scale="none").tolist()
    assert adv == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0], abs=1e-6)


def test_gae_over_turns_by_hand():
    eps = [ep(1, 0, n_turns=3), ep(0, 1, n_turns=1)]
    values = [[0.5, 0.25, 0.75], [0.5]]
    adv, ret = dg.turn_gae(eps, values, gamma=0.9, lam=0.5)
    # deltas: t2 = 1 - .75 = .25; t1 = 0 + .9*.75 - .25 = .425; t0 = .9*.25 - .5 = -.275
    a2 = 0.25
    a1 = 0.425 + 0.45 * a2
    a0 = -0.275 + 0.45 * a1
    assert adv[0] == pytest.approx([a0, a1, a2], abs=1e-5)
    assert adv[1] == pytest.approx([-0.5], abs=1e-6)
    assert ret[0] == pytest.approx([a0 + 0.5, a1 + 0.25, a2 + 0.75], abs=1e-5)


def test_clipped_loss_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0])
    surr, clipped = dg.policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # ratio 1 -> -2; ratio 1.5, A>0 -> clipped at 1.28; ratio .5, A<0 -> clipped at .8 -> 0.8;
    # ratio 1.5, A<0 -> max(1.5, 1.28) = 1.5 (pessimistic: no clipping helps)
    assert surr.tolist() == pytest.approx([-2.0, -1.28, 0.8, 1.5], abs=1e-6)
    assert clipped.tolist() == [False, True, True, False]
    kl_surr, _ = dg.policy_loss(logp, old, adv, ref_logp=old, beta=0.1)
    d = old - logp
    assert (kl_surr - surr).tolist() == pytest.approx((0.1 * (torch.exp(d) - d - 1)).tolist(), abs=1e-6)


def test_pack_masks_everything_but_agent_tokens():
    seqs = [([10, 11, 12], [20, 21]), ([13], [22, 23, 24])]
    b = dg.pack(seqs, pad_id=0, device="cpu")
    L = b["input_ids"].shape[1]
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, 21], [13, 22, 23, 24, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position p predicts token p+1: only positions whose next token is a response token are kept
    assert b["target_pos"].tolist() == [2, 3, L + 0, L + 1, L + 2]
    assert b["targets"].tolist() == [20, 21, 22, 23, 24]
    flat = b["input_ids"].reshape(-1)
    assert (flat[b["target_pos"] + 1] == b["targets"]).all()
    assert b["value_pos"].tolist() == [2, L + 0]


def test_token_batches_respect_budget():
    lengths = [5, 50, 7, 48, 30, 9]
    batches = dg.token_batches(list(range(6)), lengths, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(max(lengths[i] for i in b) * len(b) <= 100 or len(b) == 1 for b in batches)


def test_reward_variance_and_seed_selection():
    assert dg.reward_variance([1, 1, 1]) == 0 and dg.reward_variance([0, 0]) == 0
    assert dg.reward_variance([1, 0, 1, 0]) == pytest.approx(0.25)
    values = {"a": dg.reward_variance([1, 0, 0, 0]), "b": dg.reward_variance([1, 0]), "c": 0.0,
              "d": dg.reward_variance([1, 1, 1, 0])}
    assert dg.TaskGenerator.select(values, 2) == ["b", "a"]    # 0.25, then the tie a/d by id
    assert "c" not in dg.TaskGenerator.select(values, 10)


def test_mix_tasks_respects_taskgen_share():
    real = [Task("twc", "train", i) for i in range(20)]
    gen = [Task("twc", "generated", i, init_state="s", parent="twc/train/0") for i in range(20)]
    rng = random.Random(0)
    for share, n in [(0.0, 8), (0.25, 8), (0.5, 7), (1.0, 4)]:
        tasks = dg.mix_tasks(real, gen, n, share, rng)
        assert len(tasks) == n
        assert sum(t.synthetic for t in tasks) == min(int(share * n), len(gen))
    assert sum(t.synthetic for t in dg.mix_tasks(real, gen[:1], 8, 0.5, rng)) == 1
    with pytest.raises(ValueError):
        dg.mix_tasks(real, gen, 8, 1.5, rng)


def test_task_generator_validates_candidates():
    """The filter, not a model: a scripted backend returns one candidate of each kind."""
    from engine import Generation
    state = "feedback: You are in the kitchen.\nroom: kitchen\nyou see: coin\nexits: north pantry\n" \
            "inventory: nothing\nactions: move north | take coin"
    seed = Task("coin", "train", 1, instruction="find the coin and take it", init_state=state)
    new_state = state.replace("north pantry", "east corridor").replace("move north", "move east")
    texts = [dg.task_target(Task("coin", "g", 0, instruction="find the coin and take it", init_state=new_state)),
             "<task>find the coin</task> no state",                                             # malformed
             dg.task_target(Task("coin", "g", 0, instruction="find the coin", init_state=state)),   # known state
             dg.task_target(Task("coin", "g", 0, instruction="find the coin", init_state=new_state.replace(
                 "move east | take coin", "move east | move east"))),                             # repeated action
             dg.task_target(Task("coin", "g", 0, instruction="find the zorblax", init_state=new_state.replace(
                 "kitchen", "attic")))]                                                           # invented words

    class Scripted:
        def generate(self, system, users, params, generator=None):
            return [Generation(t, [], [], "stop") for t in texts[:len(users)]]

    vocab = {w for w in dg.task_words(seed.instruction + " " + state + " east corridor")}
    gen = dg.TaskGenerator(Scripted(), vocabulary=vocab)
    out = gen.generate([seed], len(texts), {state})
    assert [t.init_state for t in out] == [new_state] and out[0].parent == seed.id
    assert (gen.stats["malformed"], gen.stats["duplicate"], gen.stats["unknown_words"]) == (2, 1, 1)
    assert len(dg.TaskGenerator(Scripted()).generate([seed], len(texts), {state})) == 2   # no vocabulary check


def test_rl_lr_warmup_follows_adams_own_step_count():
    """Linear warmup over `lr_warmup` optimizer steps, read from Adam's saved step count, so a
    resumed run (optimizer state restored) continues the schedule where it stopped."""
    import train
    cfg = train.Config(lr=1e-3, lr_warmup=4)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w], lr=cfg.lr)
    lrs = []
    for _ in range(6):
        w.grad = torch.ones(3)
        train.set_warmup_lr(opt, cfg)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    resumed = torch.optim.AdamW([w], lr=cfg.lr)
    resumed.load_state_dict(opt.state_dict())
    train.set_warmup_lr(resumed, cfg)
    assert resumed.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr_warmup"):
        train.Config(lr_warmup=-1).validate()
    with pytest.raises(ValueError, match="agent_thoughts"):
        train.Config(agent_thoughts="long").validate()


# ----------------------------------------------------------------------------- curriculum rounds
ROOM = ("feedback: You are in the kitchen.\nroom: kitchen\nyou see: coin\nexits: north pantry\n"
        "inventory: nothing\nactions: move north | take coin")
REAL = [Task("coin", "train", s, instruction=f"find coin {s}", init_state=ROOM.replace("kitchen", f"kitchen {s}"))
        for s in (1, 2, 3)]


class TaskLM:
    """M_task: each candidate is a new variation of its seed (a new room number); the judge says `verdict`."""
    def __init__(self, verdict="yes"):
        self.verdict, self.seeds, self.judged, self.n = verdict, [], 0, 0

    def generate(self, system, users, params, generator=None):
        from engine import Generation
        out = []
        for u in users:
            if u.startswith("Is this new task"):
                self.judged += 1
                out.append(self.verdict)
                continue
            self.n += 1
            instruction = u.split("<task>")[1].split("</task>")[0]
            self.seeds.append(instruction)
            out.append(dg.task_target(Task("coin", instruction=instruction + " again",
                                           init_state=ROOM.replace("kitchen", f"hall {self.n}"))))
        return [Generation(t, [], [], "stop") for t in out]


def curriculum_round(st, rewards, lm, **cfg):
    import train
    rows = []
    st.task_rewards.update(rewards)
    train.curriculum(train.Config(exp_model="any/hf-model", taskgen_seeds=2, taskgen_per_seed=1, **cfg), st,
                     type("Exp", (), {"lm": lm})(), REAL, lambda **row: rows.append(row))
    return rows[-1]


def test_curriculum_seeds_on_recent_variance_generated_tasks_included():
    import train
    st, lm = train.RLState(), TaskLM()
    a, b, c = (t.id for t in REAL)
    row = curriculum_round(st, {a: [1, 1], b: [0, 0], c: [1, 0, 0, 0]}, lm)
    assert row["accepted"] == 1 and lm.seeds == ["find coin 3"], "the seed with reward variance, not the first"
    first = Task.from_dict(st.generated[0])
    assert first.parent == c and st.task_rewards == {}, "a round's seeds come from the groups played since the last"
    assert curriculum_round(st, {a: [1, 1, 1, 1]}, lm)["accepted"] == 0, "old variance is forgotten"
    row = curriculum_round(st, {c: [0, 1], first.id: [1, 0]}, lm)
    assert row["accepted"] == 2 and lm.seeds[1:] == ["find coin 3", "find coin 3 again"]
    gen = [Task.from_dict(d) for d in st.generated]
    assert gen[-1].parent == first.id, "a generated task seeds later rounds"
    assert len({t.id for t in gen}) == len(gen) == 3, "generated task ids are unique across rounds"


def test_curriculum_task_judge_can_be_switched_on():
    import train
    assert train.Config().taskgen_judge is False
    st, lm = train.RLState(), TaskLM(verdict="no")
    row = curriculum_round(st, {REAL[0].id: [1, 0]}, lm, taskgen_judge=True)
    assert lm.judged == 1 and row["accepted"] == 0 and row["judged_out"] == 1
    lm = TaskLM(verdict="yes")
    assert curriculum_round(train.RLState(), {REAL[0].id: [1, 0]}, lm, taskgen_judge=True)["accepted"] == 1
    assert lm.judged == 1


# ----------------------------------------------------------------------------- the update step on a real model
class OneTurnEnv:
    """A batched env whose episodes last one turn: whatever the agent writes ends it."""

    def reset(self, tasks):
        self.n = len(tasks)
        return [("room: kitchen\nactions: take apple | open fridge",
                 {"admissible": ["take apple", "open fridge"], "instruction": "put the apple in the fridge"})
                for _ in tasks]

    def step(self, actions):
        from envs import StepResult
        return {i: StepResult("room: kitchen\nactions: open fridge", 0.0, True, {"success": False, "invalid": True})
                for i in actions}


def _agent(small_agent_dir):
    import train
    return train.load_lm(train.Config(), small_agent_dir, torch.device("cpu"), trainable=True)


def _rollout(agent, n_tasks=3, g=3, seed=0, max_new_tokens=12):
    """A real rollout: the engine samples, its log-probs are the old ones; rewards read off the tokens."""
    from engine import SamplingParams
    tasks = [Task("twc", "train", i // g) for i in range(n_tasks * g)]
    eps = dg.run_episodes(agent, OneTurnEnv(), tasks, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens),
                          groups=[i // g for i in range(n_tasks * g)], generator=torch.Generator().manual_seed(seed))
    for e in eps:
        e.turns[-1].reward = e.reward = float(sum(e.turns[-1].response_ids) % 2)
    return eps


def _fixed_episodes(agent, n=8, turns=2, length=5, seed=0):
    """Episodes of `turns` turns with `length`-token responses each, old log-probs from the model."""
    gen = torch.Generator().manual_seed(seed)
    vocab = agent.model.config.vocab_size
    eps = []
    for i in range(n):
        e = dg.Episode(task=Task("twc", "train", i // 2), group=i // 2)
        for j in range(turns):
            prompt = torch.randint(5, vocab, (6 + i % 3,), generator=gen).tolist()
            resp = torch.randint(5, vocab, (length,), generator=gen).tolist()
            with torch.no_grad():
                lp = dg.response_logprobs(agent.model, dg.pack([(prompt, resp)], agent.tokenizer.pad_token_id, "cpu"))[0]
            e.turns.append(dg.Turn(prompt, resp, lp.tolist(), reward=float((i * 7 + j * 3) % 4 == 0) * (j + 1)))
        e.reward = sum(t.reward for t in e.turns)
        eps.append(e)
    return eps


def test_ppo_clips_the_policy_and_the_critic_each_on_their_own(small_agent_dir):
    """A huge critic gradient must not shrink the policy's step: the policy's update is the same
    whatever vf_coef is, and both norms are logged."""
    import train
    cfg = train.Config(algo="ppo", minibatches=2, update_epochs=1, max_grad_norm=0.5, lr=1e-2, lr_warmup=1)
    runs = []
    for vf_coef in (1e-3, 1e4):
        agent = _agent(small_agent_dir)
        eps = _fixed_episodes(agent)
        head = train.ValueHead(agent.model.config.hidden_size)
        params = [p for p in agent.model.parameters() if p.requires_grad] + list(head.parameters())
        stats = train.update_policy(agent, torch.optim.SGD(params, lr=cfg.lr), eps,
                                    train.Config(**{**cfg.__dict__, "vf_coef": vf_coef}), head, None)
        runs.append((stats, {n: p.detach().clone() for n, p in agent.model.named_parameters()}))
    (small, w_small), (big, w_big) = runs
    for n in w_small:
        assert torch.equal(w_small[n], w_big[n]), n
    assert big["vf_grad_norm"] > 100 * cfg.max_grad_norm > small["vf_grad_norm"]
    assert small["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-6) and small["grad_norm"] > cfg.max_grad_norm


def test_ppo_advantages_are_whitened_over_the_iterations_turns(small_agent_dir, monkeypatch):
    import train
    agent = _agent(small_agent_dir)
    eps = _fixed_episodes(agent, length=5)
    seen = []
    real = dg.policy_loss
    monkeypatch.setattr(dg, "policy_loss", lambda logp, old, adv, *a: seen.append(adv.clone()) or real(logp, old, adv, *a))
    head = train.ValueHead(agent.model.config.hidden_size)
    for norm in (True, False):
        seen.clear()
        cfg = train.Config(algo="ppo", minibatches=1, update_epochs=1, norm_adv=norm, gamma=0.9)
        train.update_policy(agent, torch.optim.SGD(list(head.parameters()), lr=0.0), eps, cfg, head, None)
        per_turn = torch.cat(seen).reshape(-1, 5)              # every response is 5 tokens long
        assert (per_turn == per_turn[:, :1]).all()
        turn_adv = per_turn[:, 0].double()
        assert len(turn_adv) == sum(len(e.turns) for e in eps)
        if norm:
            assert turn_adv.mean().item() == pytest.approx(0, abs=1e-6)
            assert turn_adv.std().item() == pytest.approx(1, abs=1e-5)
        else:
            assert turn_adv.std().item() != pytest.approx(1, abs=1e-2)
    with pytest.raises(ValueError, match="recompute_logprobs"):
        train.Config(recompute_logprobs="sometimes").validate()


def test_ppo_old_values_come_from_the_updates_forward(small_agent_dir):
    """GAE's old values and the value loss read one critic: turn_values runs under the autocast the
    update runs under (bfloat16 here), not in float32 beside a bfloat16 update."""
    import train
    agent = _agent(small_agent_dir)
    eps = _rollout(agent)
    head = train.ValueHead(agent.model.config.hidden_size)
    seen = {"old": [], "update": []}
    phase = ["old"]
    real_forward = head.forward
    head.forward = lambda x: seen[phase[0]].append(torch.is_autocast_enabled("cpu")) or real_forward(x)
    cfg = train.Config(algo="ppo", minibatches=1, update_epochs=1, train_dtype="bfloat16")
    old = train.turn_values(agent, head, eps, cfg)
    phase[0] = "update"
    train.update_policy(agent, torch.optim.SGD(list(head.parameters()), lr=0.0), eps, cfg, head, None)
    assert seen["old"] and seen["update"] and set(seen["old"]) == set(seen["update"]) == {True}
    assert len(old) == len(eps) and all(len(v) == len(e.turns) for v, e in zip(old, eps))


def test_sampler_logprobs_are_the_updates_old_policy_in_float32(small_agent_dir):
    """From a real rollout in float32: the first mini-batch's ratio is 1 (|ratio - 1| < 1e-4), and
    the update's own forward ("always") gives the sampler's log-probs back."""
    import train
    agent = _agent(small_agent_dir)
    agent.engine.dtype = "float32"                          # sampled in float32 ...
    eps = _rollout(agent)
    turns = [t for e in eps for t in e.turns if t.response_ids]
    cfg = train.Config(recompute_logprobs="always", train_dtype="float32")   # ... and trained in float32
    again = train.old_logprobs(agent, turns, cfg)
    assert torch.allclose(torch.tensor([x for lp in again for x in lp]),
                          torch.tensor([x for t in turns for x in t.logprobs]), atol=1e-4)
    stats = train.update_policy(agent, torch.optim.SGD(agent.model.parameters(), lr=1e-3), eps,
                                train.Config(train_dtype="float32"), None, None)
    assert stats["logprobs_recomputed"] is False            # auto: float32 keeps the sampler's
    assert stats["ratio_dev"] < 1e-4 and stats["approx_kl"] >= 0 and "ref_kl" not in stats
    with pytest.raises(ValueError, match="temperature"):
        train.Config(temperature=0.0).validate()


def test_a_bf16_agent_recomputes_its_old_logprobs(small_agent_dir):
    import train
    agent = _agent(small_agent_dir)
    eps = _rollout(agent)                                   # sampled in float32 ...
    agent.model.to(torch.bfloat16)                          # ... trained in bf16: the two forwards differ
    devs = {}
    for mode in ("never", "auto"):
        stats = train.update_policy(agent, torch.optim.SGD(agent.model.parameters(), lr=0.0), eps,
                                    train.Config(recompute_logprobs=mode), None, None)
        devs[mode] = stats["ratio_dev"]
        assert stats["logprobs_recomputed"] is (mode == "auto")
    assert devs["auto"] < devs["never"] / 10


def test_kl_term_pulls_back_toward_the_reference():
    """The k3 KL is part of the loss's graph: with zero advantages its gradient alone is nonzero and
    lowers log-probs above the reference's, raises those below."""
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5])
    surr, _ = dg.policy_loss(logp, logp.detach(), torch.zeros(3), ref_logp=ref, beta=0.1)
    surr.sum().backward()
    g = logp.grad
    assert g[0] > 0 and g[1] < 0 and g[2] == 0             # descent moves logp toward ref


def test_kl_only_update_moves_the_agent_toward_the_reference(small_agent_dir):
    import train
    agent, ref = _agent(small_agent_dir), _agent(small_agent_dir)
    with torch.no_grad():
        for p in ref.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    eps = _fixed_episodes(agent)
    for e in eps:                                           # equal rewards: every advantage is 0
        e.reward = 1.0

    def kl():
        batch = dg.pack([(t.prompt_ids, t.response_ids) for e in eps for t in e.turns], agent.tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            lp, _, _ = dg.response_logprobs(agent.model, batch)
            rp, _, _ = dg.response_logprobs(ref.model, batch)
        return (torch.exp(rp - lp) - (rp - lp) - 1).mean().item()

    before = kl()
    cfg = train.Config(beta=1.0, lr=0.05, lr_warmup=1, minibatches=1, update_epochs=2)
    stats = train.update_policy(agent, torch.optim.SGD(agent.model.parameters(), lr=cfg.lr), eps, cfg, None, ref)
    assert kl() < before / 2
    assert stats["ref_kl"] == pytest.approx(before, rel=0.5) and stats["grad_norm"] > 0
