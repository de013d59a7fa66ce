"""The whole DreamGym loop at toy scale: data -> M_exp -> warm start -> dream RL -> eval, resume.

Models are tiny and barely trained, so nothing here says the method works (the README's table does);
these tests say the pipeline is wired: the right pieces run, write what they should, and a crashed
run resumes to exactly the state an uninterrupted run reaches.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dreamgym as dg
import train
from conftest import assert_same_run, run_state, tiny_cfg, toy_signal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_full_pipeline_writes_everything(tiny_run):
    root, cfg, res = tiny_run
    assert set(res) >= {"warm", "final", "offline_transitions", "warm_transitions", "rl_real_transitions"}
    assert res["rl_real_transitions"] == 0, "DreamGym's RL consumes no real transitions"
    assert 0 <= res["final"]["success"] <= 1 and res["final"]["episodes"] == cfg.eval_episodes
    rows = [json.loads(x) for x in open(os.path.join(cfg.out, "metrics.jsonl"))]
    rl_rows = [r for r in rows if r.get("stage") == "rl"]
    assert [r["iteration"] for r in rl_rows] == [0, 1]
    assert all("curve_success" in r and r["exp_failed_episodes"] >= 0 for r in rl_rows)
    assert any(r.get("stage") == "taskgen" for r in rows)
    assert os.path.getsize(os.path.join(cfg.out, "curves.png")) > 10_000
    ck = os.path.join(cfg.out, "ckpt")
    files = {f for _, _, fs in os.walk(ck) for f in fs}
    assert {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "buffer.jsonl",
            "buffer.emb.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert open(os.path.join(ck, "latest")).read().strip() == f"{cfg.iterations:06d}"
    buf = [dg.Transition.from_dict(json.loads(x)) for x in open(os.path.join(cfg.out, "buffer.jsonl"))]
    dreamed = [t for t in buf if t.source == "dream"]
    valid_dreamed = rl_rows[-1]["dream_transitions"] - sum(r["invalid_actions"] for r in rl_rows)
    assert len(dreamed) <= valid_dreamed, "only valid synthetic transitions enrich the buffer"
    assert len({dg.demo_key(t) for t in dreamed}) == len(dreamed), "each dreamed (query, outcome) once"
    assert sum(b.source == "real" for b in buf) == res["offline_transitions"]


def test_dream_iteration_changes_the_policy_through_agent_tokens_only(tiny_run):
    root, cfg, _ = tiny_run
    dev = torch.device("cpu")
    agent = train.load_lm(cfg, os.path.join(cfg.out, "agent_warm"), dev, trainable=True)
    exp_model = train.exp_model_of(cfg, train.load_lm(cfg, os.path.join(cfg.out, "exp_model"), dev, False), None)
    tasks = train.seed_tasks(train.annotated_trajectories(cfg))[:2]
    from engine import SamplingParams
    batch = [t for t in tasks for _ in range(3)]
    eps = dg.run_episodes(agent, dg.DreamEnv(exp_model, 3), batch, SamplingParams(max_new_tokens=48, stop=(dg.AGENT_STOP,)),
                          groups=[0, 0, 0, 1, 1, 1], generator=torch.Generator().manual_seed(0))
    assert all(e.turns and e.transitions and all(t.source == "dream" for t in e.transitions) for e in eps)
    for i, e in enumerate(eps):          # give each group outcome variance, whatever the toy dream said
        e.reward = float(i % 2)
    before = {n: p.detach().clone() for n, p in agent.model.named_parameters()}
    opt = torch.optim.AdamW([p for p in agent.model.parameters() if p.requires_grad], lr=1e-3)
    stats = train.update_policy(agent, opt, eps, cfg, None, None)
    assert stats["agent_tokens"] == sum(len(t.response_ids) for e in eps for t in e.turns)
    changed = [n for n, p in agent.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "the policy update must change the agent"


def test_update_leaves_out_episodes_ended_by_a_failed_simulation(tiny_run):
    """M_exp, not the agent, ended them: they take no part in the update (nor in its token count)."""
    _, cfg, _ = tiny_run
    agent = train.load_lm(cfg, os.path.join(cfg.out, "agent_warm"), torch.device("cpu"), trainable=True)
    task = dg.Task("twc", "train", 0)

    def episode(reward, failed, n=3):
        return dg.Episode(task=task, turns=[dg.Turn([5, 6, 7], [8] * n, [-1.0] * n, reward)], reward=reward,
                          group=0, exp_failed=failed)

    opt = torch.optim.AdamW([p for p in agent.model.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in agent.model.named_parameters()}
    stats = train.update_policy(agent, opt, [episode(1.0, True), episode(0.0, True)], cfg, None, None)
    assert stats["agent_tokens"] == 0
    assert all(torch.equal(p, before[n]) for n, p in agent.model.named_parameters())
    stats = train.update_policy(agent, opt, [episode(1.0, False, 2), episode(0.0, False, 2), episode(0.0, True)],
                                cfg, None, None)
    assert stats["agent_tokens"] == 4


def test_rl_row_counts_success_over_the_episodes_the_update_learns_from():
    """A failed simulation's episode is out of the update, so it is out of the row's reward and success
    too (it still counts as a failed episode, and its turns in the format-error rate)."""
    summary = [(1.0, True, 0, 2, False), (0.0, False, 1, 4, False), (1.0, True, 0, 1, True)]
    row = train.rollout_stats(summary)
    assert row["reward"] == 0.5 and row["success"] == 0.5 and row["exp_failed_episodes"] == 1
    assert row["format_error"] == pytest.approx(1 / 7) and row["turns"] == pytest.approx(7 / 3)
    all_failed = train.rollout_stats([(0.0, False, 0, 1, True)])
    assert all_failed["success"] is None and all_failed["reward"] is None and all_failed["exp_failed_episodes"] == 1


def _crash_in_iteration(monkeypatch, n: int):
    """update_policy raises in the n-th iteration (a crash mid-iteration, checkpoint of n - 1 kept)."""
    real_update, calls = train.update_policy, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt(f"simulated kill in the middle of iteration {n}")
        return real_update(*a, **k)
    monkeypatch.setattr(train, "update_policy", dies)
    return real_update


def _crashed_then_resumed(monkeypatch, root, name: str, shared: dict, check_crash=None) -> dict:
    """The run `name` killed in the middle of its 2nd iteration, then resumed: its final state."""
    real_update = _crash_in_iteration(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_cfg(root, name, **shared))
    if check_crash is not None:
        check_crash(run_state(str(root / name)))
    monkeypatch.setattr(train, "update_policy", real_update)
    train.run(tiny_cfg(root, name, resume=True, **shared))
    return run_state(str(root / name))


def test_resume_after_a_crash_reaches_the_same_state(straight_run, monkeypatch):
    root, shared, straight = straight_run
    toy_signal(monkeypatch.setattr)

    def killed_in_iteration_2(state):
        assert state["rl"]["iteration"] == 1

    b = _crashed_then_resumed(monkeypatch, root, "crashed", shared, killed_in_iteration_2)
    a = run_state(straight.out)
    assert_same_run(a, b)
    evals = lambda out: [(r["which"], r["success"], r["per_task"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
                         if r.get("stage") == "eval"]
    assert evals(str(root / "crashed")) == evals(straight.out), "the warm start is evaluated and logged once"
    warm = train.load_lm(straight, shared["warm_ckpt"], torch.device("cpu"), trainable=False)
    w = a["tensors"]["agent/model.safetensors/model.embed_tokens.weight"]
    assert not torch.equal(w, warm.model.model.embed_tokens.weight), "the rewarded run must change the agent"


def test_ppo_iteration_end_to_end_and_its_exact_resume(tiny_run, monkeypatch):
    """PPO in the dream: value head, GAE in the update, its checkpoint, and an exact resume."""
    root, first, _ = tiny_run
    shared = dict(exp_ckpt=os.path.join(first.out, "exp_model"), warm_ckpt=os.path.join(first.out, "agent_warm"),
                  iterations=2, eval_every=0, algo="ppo", taskgen=False)
    toy_signal(monkeypatch.setattr)
    straight = tiny_cfg(root, "ppo_straight", **shared)
    train.run(straight)
    a = run_state(straight.out)
    head = a["tensors"]["value_head.safetensors/proj.weight"]
    assert head.abs().sum() > 0, "the critic learned from the returns"
    rows = a["metrics"]
    assert all(r["vloss"] > 0 and r["vf_grad_norm"] > 0 and r["grad_norm"] > 0 for r in rows if r["stage"] == "rl")
    assert_same_run(a, _crashed_then_resumed(monkeypatch, root, "ppo_crashed", shared))


def test_real_mode_stops_at_its_budget_resumes_exactly_and_curves_use_the_curve_fold(tiny_run, monkeypatch):
    root, first, _ = tiny_run
    shared = dict(exp_ckpt=os.path.join(first.out, "exp_model"), warm_ckpt=os.path.join(first.out, "agent_warm"),
                  mode="real", real_budget=8, iterations=10, eval_every=1)
    toy_signal(monkeypatch.setattr)
    calls, real_eval = [], dg.evaluate_agent
    monkeypatch.setattr(dg, "evaluate_agent", lambda a, env, fold, n, *r, **k: calls.append((fold, n)) or
                        real_eval(a, env, fold, n, *r, **k))
    cfg = tiny_cfg(root, "real_straight", **shared)
    res = train.run(cfg)
    rows = [r for r in run_state(cfg.out)["metrics"] if r["stage"] == "rl"]
    spent = [r["real_transitions"] for r in rows]
    assert spent[-1] >= cfg.real_budget and all(x < cfg.real_budget for x in spent[:-1]), "stops once over budget"
    per_iter = cfg.tasks_per_iter * cfg.group_size
    assert [b - a for a, b in zip([0] + spent, spent)] == [round(r["turns"] * per_iter) for r in rows]
    assert res["rl_real_transitions"] == spent[-1] and all(r["dream_transitions"] == 0 for r in rows)
    curve = [c for c in calls if c[1] == cfg.curve_episodes]
    assert len(curve) == len(rows) + 1 and {f for f, _ in curve} == {cfg.curve_fold} != {cfg.eval_fold}
    assert {f for f, n in calls if n == cfg.eval_episodes} == {cfg.eval_fold}
    assert_same_run(run_state(cfg.out), _crashed_then_resumed(monkeypatch, root, "real_crashed", shared))


def test_bad_input_ends_the_run_at_once_in_one_line(tmp_path, monkeypatch):
    out, data = tmp_path / "out", tmp_path / "data"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "train.py", "--agent_model", "/nonexistent/model", "--out", str(out),
                           "--data_dir", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and time.time() - t0 < 120
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "Warning" not in x and "warn(" not in x]
    assert len(lines) == 1 and lines[0].startswith(
        "train.py: error: --agent_model /nonexistent/model: no such folder and not a known model name"), proc.stderr
    assert not data.exists() and not out.exists(), "nothing collected, nothing written"
    ok = dict(out=str(out), data_dir=str(data))
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for bad, flag in [(dict(exp_model="tiny-xl"), "--exp_model tiny-xl"),
                      (dict(exp_ckpt=str(tmp_path / "nope")), "--exp_ckpt"),
                      (dict(warm_ckpt=str(tmp_path / "empty")), "--warm_ckpt"),
                      (dict(exp_endpoint="localhost:8000", exp_endpoint_model="m"), "--exp_endpoint"),
                      (dict(data_dir=str(tmp_path / "file" / "d")), "--data_dir"),
                      (dict(annotator="teacher", teacher_model="no/such-model"), "--teacher_model")]:
        with pytest.raises(ValueError, match=flag):
            train.preflight(train.Config(**{**ok, **bad}).validate())
    train.preflight(train.Config(**ok, exp_endpoint="http://localhost:8000/v1", exp_endpoint_model="m").validate())
    monkeypatch.setenv("DREAMGYM_CPU_PLAN", "bf16")
    with pytest.raises(ValueError, match="DREAMGYM_CPU_PLAN"):
        train.preflight(train.Config(**ok).validate())
    monkeypatch.delenv("DREAMGYM_CPU_PLAN")
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--temperature", "0"])
    assert e.value.code == 2


def test_select_agent_selects_on_the_curve_fold_and_reports_that_agent(tiny_run, tmp_path):
    _, cfg, res = tiny_run
    assert res["selected_iteration"] in (0, 1, 2)           # 0: the warm start, a candidate like any other
    rows = [json.loads(x) for x in open(os.path.join(cfg.out, "metrics.jsonl"))]
    curve = {0: next(r for r in rows if r.get("stage") == "curve")["curve_success"]}
    curve.update({r["iteration"] + 1: r["curve_success"] for r in rows if r.get("stage") == "rl"})
    best = max(curve.values())
    assert res["selected_curve_success"] == best
    assert res["selected_iteration"] == max(i for i, v in curve.items() if v == best), "a tie keeps the later"
    # update_selection itself: the saved weights are the agent's at its best moment, not later ones
    agent = train.load_lm(cfg, os.path.join(cfg.out, "agent_warm"), torch.device("cpu"), trainable=False)
    c = tiny_cfg(tmp_path, "kb")
    st = train.RLState()
    p = next(agent.model.parameters())
    snapshots = {}
    for it, success in enumerate([0.2, 0.5, 0.5, 0.4]):
        st.iteration = it
        with torch.no_grad():
            p.add_(1.0)
        snapshots[it] = p.detach().clone()
        train.update_selection(c, st, agent, success)
    assert (st.selected_iteration, st.selected_curve_success) == (2, 0.5), "a tie selects the later agent"
    with torch.no_grad():
        p.zero_()
    train.load_agent_weights(agent, os.path.join(c.out, "agent_selected"))
    assert torch.equal(next(agent.model.parameters()), snapshots[2])


def test_config_is_validated_at_start(tmp_path):
    for bad in [dict(mode="sleep"), dict(algo="a2c"), dict(taskgen_share=2.0), dict(group_size=1),
                dict(env="twc:bogus=1"), dict(eval_fold="train"), dict(eval_fold="dev", select_agent=True)]:
        with pytest.raises(ValueError):
            tiny_cfg(tmp_path, "x", **bad)
    with pytest.raises(SystemExit):
        train.parse_args(["--no_such_flag", "1"])
    assert train.parse_args(["--reasoning", "false", "--iterations", "7"]).reasoning is False


def test_sampled_evaluation_plays_each_task_n_times_reproducibly(tiny_run):
    from eval import evaluate_agent, sampled_successes
    _, cfg, _ = tiny_run
    agent = train.load_lm(cfg, os.path.join(cfg.out, "agent_warm"), torch.device("cpu"), trainable=False)
    a = evaluate_agent(agent, cfg.env, "dev", 3, temperature=1.0, samples=2, seed=5)
    b = evaluate_agent(agent, cfg.env, "dev", 3, temperature=1.0, samples=2, seed=5)
    assert a["episodes"] == 6 and a == b, "sampled evaluation is seeded"
    with pytest.raises(ValueError, match="greedy"):
        evaluate_agent(agent, cfg.env, "dev", 3, samples=2)
    res = sampled_successes(cfg, cfg.out, 0, ("final",))
    assert set(res) == {"final_sampled"} and res["final_sampled"]["episodes"] == 4 * cfg.eval_episodes


def test_ppo_critic_loss_leaves_the_policy_untouched(tiny_run):
    """The critic is a linear probe on detached features: its loss changes the head, never the agent
    (a shared trunk let it move the state that emits the first response token)."""
    _, cfg, _ = tiny_run
    agent = train.load_lm(cfg, os.path.join(cfg.out, "agent_warm"), torch.device("cpu"), trainable=True)
    head = train.ValueHead(agent.model.config.hidden_size)
    torch.nn.init.normal_(head.proj.weight)
    batch = dg.pack([([5, 6, 7, 8], [9, 10]), ([5, 6], [11])], agent.tokenizer.pad_token_id, "cpu")
    _, _, values = dg.response_logprobs(agent.model, batch, 1.0, head)
    ((values - 1.0) ** 2).sum().backward()
    assert head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in agent.model.parameters())


def test_table_s2r_continues_the_dream_run_exactly(tiny_run, tmp_path):
    """eval.py's table starts S2R from the same-seed DreamGym run's last checkpoint: it must end
    where an S2R run that dreams its own first iterations ends."""
    import dataclasses
    from eval import table_suite
    root, first, _ = tiny_run
    shared = dict(exp_ckpt=os.path.join(first.out, "exp_model"), warm_ckpt=os.path.join(first.out, "agent_warm"),
                  iterations=2, eval_every=1, s2r_real_budget=6, eval_episodes=2)
    over = {k: v for k, v in dataclasses.asdict(tiny_cfg(root, "unused", **shared)).items() if k not in ("out", "seed")}
    table_suite(str(tmp_path / "table"), [0], over, ["DreamGym-GRPO", "DreamGym-S2R-GRPO"], with_fidelity=False)
    reused = str(tmp_path / "table" / "seed0" / "DreamGym-S2R-GRPO")
    secs = lambda d: [r["secs"] for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))
                      if r.get("stage") == "rl" and r["phase"] == "dream"]
    assert secs(reused) == secs(str(tmp_path / "table" / "seed0" / "DreamGym-GRPO")), "the dream phase was not redone"
    alone = tiny_cfg(root, "s2r_alone", mode="s2r", **shared)
    train.run(alone)
    a, b = run_state(alone.out), run_state(reused)
    assert a["rl"]["phase"] == "real" and a["rl"]["real_transitions"] >= 6
    assert a["rl"] == b["rl"] and a["metrics"] == b["metrics"] and a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    # the real phase stops once its budget is spent: never a real iteration past it
    spent = [r["real_transitions"] for r in a["metrics"] if r["stage"] == "rl" and r["phase"] == "real"]
    assert spent and spent[-1] >= 6 and all(x < 6 for x in spent[:-1])
    assert spent[-1] < 6 + alone.tasks_per_iter * alone.group_size * 3, "at most one iteration's worth over"


def test_an_interrupted_table_continues_its_runs(tiny_run, tmp_path, monkeypatch):
    """The table owns its run folders: run again after a kill, it continues the unfinished run from its
    checkpoint (no --resume to pass, no folder to delete)."""
    import dataclasses
    from eval import table_suite
    root, first, _ = tiny_run
    shared = dict(exp_ckpt=os.path.join(first.out, "exp_model"), warm_ckpt=os.path.join(first.out, "agent_warm"),
                  iterations=2, eval_every=1, eval_episodes=2)
    over = {k: v for k, v in dataclasses.asdict(tiny_cfg(root, "unused", **shared)).items() if k not in ("out", "seed")}
    real_update = _crash_in_iteration(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        table_suite(str(tmp_path), [0], over, ["DreamGym-GRPO"], with_fidelity=False)
    monkeypatch.setattr(train, "update_policy", real_update)
    table_suite(str(tmp_path), [0], over, ["DreamGym-GRPO"], with_fidelity=False)
    run = str(tmp_path / "seed0" / "DreamGym-GRPO")
    assert json.load(open(os.path.join(run, "results.json")))["final"]["episodes"] == 2
    assert [r["iteration"] for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
            if r.get("stage") == "rl"] == [0, 1]


def test_table_reuses_each_seeds_own_checkpoints(monkeypatch, tmp_path):
    """`{seed}` in a given exp_ckpt / warm_ckpt names each seed's own checkpoint (the paired protocol
    reuses another table's per-seed warm starts), for the first method and the ones that share it."""
    import eval as ev
    seen = []
    play = dict(success=0.5, invalid=0.0, steps=3.0, format_error=0.0, per_task=[1.0, 0.0])

    def fake_run(cfg):
        seen.append((cfg.seed, cfg.warm_ckpt, cfg.exp_ckpt))
        return dict(warm=play, final=play, warm_transitions=10, rl_real_transitions=0)
    monkeypatch.setattr(train, "run", fake_run)
    over = dict(warm_ckpt="w/seed{seed}/agent_warm", exp_ckpt="m/exp_model")
    ev.table_suite(str(tmp_path), [0, 3], over, ["DreamGym-GRPO", "DreamGym-PPO"], with_fidelity=False)
    assert seen == [(0, "w/seed0/agent_warm", "m/exp_model"), (0, "w/seed0/agent_warm", "m/exp_model"),
                    (3, "w/seed3/agent_warm", "m/exp_model"), (3, "w/seed3/agent_warm", "m/exp_model")]


def test_fidelity_retrieves_from_the_offline_real_data_only(tiny_run, monkeypatch):
    _, cfg, res = tiny_run
    seen = {}
    monkeypatch.setattr(dg, "heldout_transitions", lambda *a, **k: [])
    monkeypatch.setattr(dg, "fidelity", lambda exp_model, trs: seen.setdefault("items", list(exp_model.buffer.items)))
    real_build = train.build_buffer

    def with_a_dreamed_one(*a):                   # a run's buffer: offline real + dreamed transitions
        buf = real_build(*a)
        dreamed = dg.Transition.from_dict({**buf.items[0].to_dict(), "source": "dream"})
        buf.items.append(dreamed)
        buf.emb = np.concatenate([buf.emb, buf.emb[:1]])
        return buf

    monkeypatch.setattr(train, "build_buffer", with_a_dreamed_one)
    run_buffer = [json.loads(x) for x in open(os.path.join(cfg.out, "buffer.jsonl"))]
    train.fidelity_table(cfg, "dev")
    assert len(seen["items"]) == res["offline_transitions"] and all(t.source == "real" for t in seen["items"])
    assert [json.loads(x) for x in open(os.path.join(cfg.out, "buffer.jsonl"))] == run_buffer, "run files untouched"


def test_sigterm_runs_exit_handlers(tmp_path):
    """kill <pid> must let atexit handlers run (they close MiniWoB's Chromium and ChromeDriver)."""
    import subprocess
    import sys
    flag = tmp_path / "closed"
    code = ("import atexit, os, signal, time, train; train.exit_on_sigterm(); "
            f"atexit.register(lambda: open({str(flag)!r}, 'w').write('yes')); "
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    assert proc.returncode == 128 + 15 and flag.read_text() == "yes"


def test_eval_gap_plays_one_agent_in_both_worlds(tiny_run, capsys):
    import eval as ev
    _, cfg, _ = tiny_run
    ev.main(["gap", "--run", cfg.out, "--tasks", "3", "--set", "exp_temperature=1.0"])
    out = capsys.readouterr().out
    gap = json.loads(out[out.index("{"):])
    assert gap["n"] == 3 and 0 <= gap["agreement"] <= 1
    for world in ("real", "dream"):
        ends = gap[world]
        assert ends["success"] + ends["invalid_end"] + ends["truncated"] <= 1 + 1e-9, world
        assert ends["steps"] >= 1
    assert gap["real"]["model_failed"] == 0
