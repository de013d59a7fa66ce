"""Checkpoints survive kill -9 at any moment: versioned folders behind an atomically moved pointer,
a replay buffer whose two files never pair rows with wrong embeddings, every RNG saved, and a
resume that continues exactly or refuses in one line -- tested with real SIGKILLs of real runs."""
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import dreamgym as dg
import runtime
import train
from conftest import WordEncoder, assert_same_run, run_state, tiny_cfg
from envs import Task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = Task("twc", "train", 0, instruction="tidy up")


def tr(i, source="real"):
    return dg.Transition(task=T, t=i, state=f"s {i}", action=f"a {i}", next_state="x", reward=0.0, done=False,
                         source=source, traj=f"traj{i}", iteration=-1 if source == "real" else 0)


def _killed_after_first_rename(monkeypatch):
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        return real(a, b)
    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("change", ["append", "rewrite"])
def test_buffer_killed_between_its_two_renames_never_pairs_rows_with_wrong_embeddings(tmp_path, monkeypatch, change):
    enc, path = WordEncoder(), str(tmp_path / "buf")
    buf = dg.ReplayBuffer(enc)
    buf.add([tr(i) for i in range(6)] + [tr(10 + i, "dream") for i in range(4)])
    buf.save(path)
    if change == "append":                          # new rows after the old ones
        buf.add([tr(20 + i, "dream") for i in range(3)])
    else:                                           # a rollback/eviction: old dreamed rows replaced
        keep = list(range(6))
        buf.items, buf.emb = [buf.items[i] for i in keep], buf.emb[keep]
        buf.add([tr(30 + i, "dream") for i in range(5)])
    _killed_after_first_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        buf.save(path)
    monkeypatch.undo()
    got = dg.ReplayBuffer.load(path, enc, attach=False)
    want = enc([dg.query_text(t.state, t.action) for t in got.items])
    assert len(got.emb) == len(got.items) and np.allclose(got.emb, want), "every row keeps its own embedding"


def test_versions_pointer_pruning_and_the_flat_layout(small_agent_dir, tmp_path):
    agent = train.load_lm(train.Config(), small_agent_dir, torch.device("cpu"), trainable=True)
    opt = torch.optim.AdamW(agent.model.parameters())
    run = str(tmp_path / "run")
    ck = os.path.join(run, "ckpt")
    assert runtime.latest_checkpoint(run) is None
    rng, gen = random.Random(0), torch.Generator()
    for it in (1, 2, 3):
        runtime.save_checkpoint(ck, agent, opt, None, None, {"iteration": it}, rng, gen)
    assert sorted(os.listdir(ck)) == ["000002", "000003", "latest"]
    assert runtime.latest_checkpoint(run) == os.path.join(ck, "000003")
    # leftovers of a kill: a temporary folder, a version past the pointer; both go at the next save
    os.makedirs(os.path.join(ck, "000005.tmp99"))
    os.makedirs(os.path.join(ck, "000009"))
    runtime.save_checkpoint(ck, agent, opt, None, None, {"iteration": 4}, rng, gen)
    assert sorted(os.listdir(ck)) == ["000003", "000004", "latest"]
    # the flat layout of earlier versions is read, and replaced by the first versioned save
    flat = str(tmp_path / "old")
    os.makedirs(os.path.join(flat, "ckpt"))
    for n in os.listdir(os.path.join(ck, "000004")):
        os.rename(os.path.join(ck, "000004", n), os.path.join(flat, "ckpt", n))
    assert runtime.latest_checkpoint(flat) == os.path.join(flat, "ckpt")
    runtime.save_checkpoint(os.path.join(flat, "ckpt"), agent, opt, None, None, {"iteration": 5}, rng, gen)
    assert sorted(os.listdir(os.path.join(flat, "ckpt"))) == ["000005", "latest"]
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write("000007\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        runtime.latest_checkpoint(run)


def test_every_rng_is_saved_and_restored(small_agent_dir, tmp_path, monkeypatch):
    """torch (CPU and, faked here, CUDA), Python, NumPy, the task rng and the rollout generator."""
    agent = train.load_lm(train.Config(), small_agent_dir, torch.device("cpu"), trainable=True)
    opt = torch.optim.AdamW(agent.model.parameters())
    cuda = {0: torch.arange(16, dtype=torch.uint8), 1: torch.arange(16, 32, dtype=torch.uint8)}   # two devices
    monkeypatch.setattr(runtime, "_cuda_rng", lambda: [cuda[0].clone(), cuda[1].clone()])
    monkeypatch.setattr(runtime, "_set_cuda_rng", lambda states: cuda.update(enumerate(s.clone() for s in states)))
    rng, gen = random.Random(3), torch.Generator().manual_seed(4)
    runtime.save_checkpoint(str(tmp_path / "ckpt"), agent, opt, None, None, {"iteration": 1}, rng, gen)
    draw = lambda: (torch.rand(2).tolist(), torch.rand(2, generator=gen).tolist(), random.random(),
                    np.random.rand(), rng.random())
    want = draw()
    cuda[0], cuda[1] = torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)   # the devices moved on
    runtime.load_checkpoint(runtime.latest_checkpoint(str(tmp_path)), agent, opt, None, None, rng, gen)
    assert draw() == want
    assert torch.equal(cuda[0], torch.arange(16, dtype=torch.uint8)) and torch.equal(cuda[1], torch.arange(16, 32, dtype=torch.uint8))


def test_curriculum_samples_with_its_own_seeded_generator(tmp_path):
    """M_task draws from a generator seeded by (seed, iteration), never the device's default one."""
    from engine import Generation
    seen = []

    class Scripted:
        def generate(self, system, users, params, generator=None):
            seen.append(generator)
            return [Generation("no task", [], [], "stop") for _ in users]

    class Exp:
        lm = Scripted()

    cfg = tiny_cfg(tmp_path, "c", exp_model="tiny-s")
    real = [Task("twc", "train", i, instruction="tidy up", init_state=f"room: r{i}\nactions: go") for i in range(3)]
    st = train.RLState(iteration=4)
    before = torch.get_rng_state()
    for _ in range(2):                      # each round reads the groups played since the last one
        st.task_rewards = {real[0].id: [0.0, 1.0], real[1].id: [1.0, 0.0, 0.0]}
        train.curriculum(cfg, st, Exp(), real, lambda **k: None)
    assert all(isinstance(g, torch.Generator) for g in seen) and len(seen) == 2
    assert seen[0].initial_seed() == seen[1].initial_seed()
    assert torch.equal(torch.get_rng_state(), before)


def test_resume_refuses_progress_it_cannot_continue(tmp_path):
    cfg = tiny_cfg(tmp_path, "r", resume=True, ckpt_every=1)
    os.makedirs(cfg.out)
    rows = [dict(stage="curve", iteration=0, curve_success=0.0)] + [dict(stage="rl", iteration=i) for i in range(3)]
    with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"metrics.jsonl up to iteration 2.* no checkpoint"):
        train.resume_point(cfg)
    with pytest.raises(ValueError, match="pass --resume"):
        train.resume_point(tiny_cfg(tmp_path, "r", resume=False))
    # only the unfinished first iteration's traces: a restart from iteration 0 is exact
    with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"stage": "rl", "itera')   # cut by a kill
    with open(os.path.join(cfg.out, "buffer.jsonl"), "w") as f:
        f.write(json.dumps(tr(0).to_dict()) + "\n" + json.dumps(tr(1, "dream").to_dict()) + "\n")
    assert train.resume_point(cfg) is None
    buf = dg.ReplayBuffer.load(os.path.join(cfg.out, "buffer"), WordEncoder())
    log = runtime.Log(os.path.join(cfg.out, "metrics.jsonl"))
    train.restart_rl(buf, log)
    assert [t.source for t in buf.items] == ["real"] and log.rows() == []
    assert train.rl_traces(cfg.out) == {}


# ----------------------------------------------------------------------------- real kills
def _child(cfg, crash: str = "", resume: bool = False):
    """train.py in a subprocess (with toy_signal, like straight_run), SIGKILLed at `crash`."""
    args = [f"--{k}={v}" for k, v in cfg.__dict__.items() if v != getattr(train.Config, k, None) and k != "resume"]
    code = ("import sys; sys.path[:0] = [{!r}, {!r}]; import conftest, train; "
            "conftest.toy_signal(setattr); train.main(sys.argv[1:])"
            ).format(os.path.join(ROOT, "tests"), ROOT)
    env = dict(os.environ, DREAMGYM_CRASH_AT=crash, OMP_NUM_THREADS=str(torch.get_num_threads()),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", code, *args, *(["--resume"] if resume else [])], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if crash:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _pointer(cfg):
    p = os.path.join(cfg.out, "ckpt", "latest")
    return open(p).read().strip() if os.path.exists(p) else None


def test_kill_9_at_three_moments_then_resume_reaches_the_uninterrupted_state(straight_run):
    """Killed in iteration 0 after its dreamed transitions reached the buffer (no checkpoint yet),
    between a checkpoint's rename and its pointer, and after an iteration was logged but before its
    checkpoint: each resume continues, and the end equals the uninterrupted run's."""
    root, shared, straight = straight_run
    assert '"source": "dream"' in run_state(straight.out)["buffer"], "dreamed transitions reach the buffer"
    cfg = tiny_cfg(root, "killed3", **shared)
    _child(cfg, "rl.buffer_add:1")
    assert _pointer(cfg) is None and train.rl_traces(cfg.out)["buffer.jsonl"] == 0
    _child(cfg, "ckpt.renamed:2", resume=True)          # restarts at 0, killed saving iteration 2's checkpoint
    assert _pointer(cfg) == "000001" and os.path.isdir(os.path.join(cfg.out, "ckpt", "000002"))
    _child(cfg, "rl.logged:2", resume=True)             # resumes at 1, killed after logging iteration 2
    assert _pointer(cfg) == "000002"
    _child(cfg, resume=True)
    assert _pointer(cfg) == "000003"
    assert_same_run(run_state(straight.out), run_state(cfg.out))


CRASH_POINTS = ["rl.buffer_add:2", "rl.logged:1", "ckpt.agent:2", "ckpt.optimizer:2", "ckpt.rng:2", "ckpt.buffer:2",
                "ckpt.state:2", "ckpt.renamed:1", "ckpt.pointer:2", "ckpt.pruned:3", "ckpt.run_buffer:2"]


@pytest.mark.slow
@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_kill_9_at_every_write_then_resume_reaches_the_uninterrupted_state(straight_run, crash):
    root, shared, straight = straight_run
    cfg = tiny_cfg(root, "killed_" + crash.replace(".", "_").replace(":", "_"), **shared)
    _child(cfg, crash)
    _child(cfg, resume=True)
    assert_same_run(run_state(straight.out), run_state(cfg.out))
