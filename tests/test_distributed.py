"""Data parallelism with torch.distributed (gloo on CPU): the same code path torchrun uses on GPUs."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import dreamgym as dg
import runtime
import train
from conftest import tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _episodes(vocab: int, n_groups: int = 4, g: int = 2) -> list[dg.Episode]:
    gen = torch.Generator().manual_seed(0)
    eps = []
    for i in range(n_groups * g):
        e = dg.Episode(task=dg.Task("twc", "train", i // g), reward=float(i % 2), group=i // g)
        for _ in range(1 + i % 2):
            r = torch.randint(3, vocab, (3 + i % 3,), generator=gen).tolist()
            e.turns.append(dg.Turn(torch.randint(3, vocab, (5 + i,), generator=gen).tolist(), r,
                                   (-torch.rand(len(r), generator=gen)).tolist()))
        eps.append(e)
    return eps


def _one_update(model_dir, episodes, out_file):
    cfg = train.Config(minibatches=1, lr=1.0, train_dtype="float32")     # exact sums: float32 forwards
    agent = train.load_lm(cfg, model_dir, torch.device("cpu"), trainable=True)
    # plain SGD: the step is linear in the gradient, so equal gradients mean equal weights (Adam's
    # first step, ~lr*sign(g), would turn float noise in near-zero gradients into lr-sized gaps)
    opt = torch.optim.SGD([p for p in agent.model.parameters() if p.requires_grad], lr=cfg.lr)
    train.update_policy(agent, opt, episodes, cfg, None, None)
    from safetensors.torch import save_file
    save_file({k: v.detach().clone().contiguous() for k, v in agent.model.state_dict().items()}, out_file)


def _rank_main(rank, world, port, model_dir, out_dir):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    runtime.DIST.setup()
    eps = [e for e in _episodes(600) if e.group % world == rank]       # groups never straddle ranks
    _one_update(model_dir, eps, os.path.join(out_dir, f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_process_doing_the_same_work(tiny_run, tmp_path):
    from safetensors.torch import load_file
    _, cfg, _ = tiny_run
    model_dir = os.path.join(cfg.out, "agent_warm")
    _one_update(model_dir, _episodes(600), str(tmp_path / "single.safetensors"))
    mp.spawn(_rank_main, args=(2, _free_port(), model_dir, str(tmp_path)), nprocs=2, join=True)
    single = load_file(str(tmp_path / "single.safetensors"))
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    before = load_file(os.path.join(model_dir, "model.safetensors"))
    moved = [k for k in single if k in before and not torch.equal(single[k], before[k])]
    assert moved, "the update must change the weights"
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
        assert torch.allclose(r0[k], single[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_torchrun_two_ranks_end_identical(tiny_run, tmp_path):
    root, first, _ = tiny_run
    cfg = tiny_cfg(root, "ddp", exp_ckpt=os.path.join(first.out, "exp_model"),
                   warm_ckpt=os.path.join(first.out, "agent_warm"), tasks_per_iter=4, eval_every=0)
    args = [f"--{k}={v}" for k, v in cfg.__dict__.items() if v != getattr(train.Config, k, None)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", os.path.join(ROOT, "train.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fp = [json.load(open(os.path.join(cfg.out, f"rank{r}.json"))) for r in (0, 1)]
    assert fp[0] == fp[1], "ranks must end with identical weights and replay buffers"
    rows = [json.loads(x) for x in open(os.path.join(cfg.out, "metrics.jsonl")) if '"stage": "rl"' in x]
    assert [r["iteration"] for r in rows] == list(range(cfg.iterations)), "rank 0 alone logs, once per iteration"
    assert all(r["dream_transitions"] > 0 for r in rows)
    rngs = runtime.load_file(os.path.join(runtime.latest_checkpoint(cfg.out), "rng.safetensors"))
    assert {"gen0", "gen1", "torch0", "torch1"} <= set(rngs), "every rank's generators are saved"
    res = json.load(open(os.path.join(cfg.out, "results.json")))
    assert res["rl_real_transitions"] == 0
