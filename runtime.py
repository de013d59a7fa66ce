"""Plumbing shared by train.py and eval.py: processes under torchrun, devices and seeds, the metrics
log, checkpoints (safetensors + JSON, never pickles), learning-curve plots. Nothing of the method
lives here (that is dreamgym.py); imports flow one way: dreamgym <- runtime <- train <- eval.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import dreamgym as dg
from envs.collect import write_jsonl
from models import default_device, save_model


# ============================================================================ processes, devices, seeds
class Dist:
    """Data parallelism under torchrun (one process per GPU; gloo on CPU). Every rank holds the agent
    and an M_exp replica and rolls out its share of the task groups (a GRPO group never straddles
    ranks); gradients are summed across ranks before each optimizer step, new transitions and task
    rewards are gathered so every rank's buffer and curriculum stay identical, and rank 0 alone
    writes checkpoints, metrics and plots. A single process until `setup()` finds WORLD_SIZE > 1."""

    def __init__(self):
        self.world, self.rank, self.local_rank = 1, 0, 0

    def setup(self) -> "Dist":
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return self

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """Every rank's obj, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, x: float) -> float:
        return float(sum(self.gather(x))) if self.world > 1 else float(x)

    def sum_grads(self, params):
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:            # a rank with no tokens this step still joins the sum
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)


DIST = Dist()                             # the process's view of the job; train.run() calls DIST.setup()


def device_of(name: str) -> torch.device:
    """auto | cpu | cuda -> this rank's device."""
    dev = default_device() if name == "auto" else torch.device(name)
    return torch.device("cuda", DIST.local_rank) if dev.type == "cuda" else dev


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def exit_on_sigterm():
    """`kill <pid>` (SIGTERM) becomes a normal exit, so atexit handlers run (MiniWoB's browsers would
    otherwise outlive us). Nothing is lost: checkpoints and the buffer are written atomically."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


# ============================================================================ metrics, tables, plots
class Log:
    """Metrics as JSONL (one object per event) + a printed line; plots are drawn from the file.
    Only rank 0 writes."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, **row):
        if not DIST.main:
            return
        row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(" ".join(f"{k}={v}" for k, v in row.items()))

    def rows(self) -> list[dict]:
        """The logged rows; a last line cut short by a kill is left out."""
        if not os.path.exists(self.path):
            return []
        lines = open(self.path).read().split("\n")
        rows = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if n < len(lines) - 1:
                        raise ValueError(f"{self.path}:{n}: not valid JSON") from None
        return rows

    def truncate_after(self, iteration: int) -> int:
        """On resume: forget rows logged by iterations that the checkpoint (of `iteration` iterations
        done) does not contain: RL and curve rows of iteration >= it, curriculum rows past it (they
        carry the count of iterations done). Returns how many rows went."""
        if not DIST.main:
            return 0
        rows = self.rows()
        stale = lambda r: ((r.get("stage") in ("rl", "curve") and r.get("iteration", -1) >= iteration) or
                           (r.get("stage") == "taskgen" and r.get("iteration", -1) > iteration))
        keep = [r for r in rows if not stale(r)]
        if os.path.exists(self.path):
            write_jsonl(self.path, keep)
        return len(rows) - len(keep)


def write_json(path: str, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def format_table(rows: list[dict], cols: list[str]) -> str:
    w = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = lambda vals: "| " + " | ".join(str(v).ljust(x) for v, x in zip(vals, w)) + " |"
    return "\n".join([line(cols), "|" + "|".join("-" * (x + 2) for x in w) + "|"] +
                     [line([r.get(c, "") for c in cols]) for r in rows])


def plot_curves(log: Log, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in log.rows() if r.get("stage") == "rl"]
    if not rows:
        return
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    it = [r["iteration"] for r in rows]
    for phase, style in (("dream", "-"), ("real", "--")):
        pts = [(r["iteration"], r["reward"]) for r in rows if r["phase"] == phase and r["reward"] is not None]
        if pts:
            ax[0].plot(*zip(*pts), style, label=f"{phase} rollouts: mean reward")
    ax[0].set(title="training reward", xlabel="iteration")
    ax[0].legend()
    # x = RL iterations done when evaluated (0: the warm start)
    ev = [(0, r["curve_success"]) for r in log.rows() if r.get("stage") == "curve"]
    ev += [(r["iteration"] + 1, r["curve_success"]) for r in rows if "curve_success" in r]
    if ev:
        ax[1].plot(*zip(*ev), "o-")
    ax[1].set(title="real success, held-out curve fold (greedy)", xlabel="iterations done", ylim=(0, 1))
    ax[2].plot(it, [r["format_error"] for r in rows], label="agent format errors / turn")
    ax[2].plot(it, [r["clipfrac"] for r in rows], label="clip fraction")
    ax[2].set(title="health", xlabel="iteration")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fingerprint(agent: dg.LocalLM, buffer) -> dict:
    """What every rank must agree on after training: a digest of the weights and of the buffer."""
    h = hashlib.sha256()
    for n, p in sorted(agent.model.state_dict().items()):
        h.update(n.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    b = hashlib.sha256("".join(json.dumps(t.to_dict()) for t in buffer.items).encode()) if buffer else None
    return {"weights": h.hexdigest(), "buffer": b.hexdigest() if b else None, "buffer_len": len(buffer or [])}


# ============================================================================ checkpoints (no pickles)
def save_agent(agent: dg.LocalLM, path: str):
    """The agent's weights (or LoRA adapters) with its tokenizer, atomically; rank 0 only."""
    if DIST.main:
        save_model(agent.model, agent.tokenizer, path)


def load_agent_weights(agent, adir: str):
    """Weights (or LoRA adapters) saved by save_pretrained, into the live agent."""
    from peft import set_peft_model_state_dict
    if os.path.exists(os.path.join(adir, "adapter_config.json")):
        set_peft_model_state_dict(agent.model, load_file(os.path.join(adir, "adapter_model.safetensors")))
        return
    weights = load_file(os.path.join(adir, "model.safetensors"))
    missing, unexpected = agent.model.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ValueError(f"checkpoint {adir} does not match the agent: {missing[:3]} {unexpected[:3]}")
    agent.model.tie_weights()


def _opt_tensors(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for pid, s in sd["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{pid}.{k}"] = v
    return tensors, meta


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


CKPT_KEEP = 2                             # checkpoint versions kept: the latest and the one before it
_crashes: dict[str, int] = {}


def crash_point(label: str):
    """Test hook for kill -9 at a chosen moment: with DREAMGYM_CRASH_AT=<label>:<n> in the
    environment, the process SIGKILLs itself the n-th time it reaches `label` (nothing runs after:
    no atexit, no flush), exactly like an external `kill -9`. A no-op otherwise."""
    spec = os.environ.get("DREAMGYM_CRASH_AT")
    if not spec:
        return
    want, _, n = spec.rpartition(":")
    if want != label:
        return
    _crashes[label] = _crashes.get(label, 0) + 1
    if _crashes[label] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str):
    for d, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(d)


def _write_pointer(ckdir: str, name: str):
    """ckdir/latest <- name: a temporary file, fsynced, renamed over the old pointer (atomic)."""
    tmp = os.path.join(ckdir, f"latest.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckdir, "latest"))
    _fsync_dir(ckdir)


_FLAT = ("agent", "buffer.jsonl", "buffer.emb.safetensors", "optimizer.safetensors", "rng.safetensors",
         "state.json", "value_head.safetensors")          # the flat ckpt/ layout of earlier versions


def latest_checkpoint(run_dir: str) -> str | None:
    """The folder of a run's newest complete checkpoint: the version `<run>/ckpt/latest` names, or
    a flat `<run>/ckpt/` of earlier versions; None when the run has none. A pointer that names no
    complete checkpoint raises ValueError (the run folder was damaged: never guess)."""
    ckdir = os.path.join(run_dir, "ckpt")
    pointer = os.path.join(ckdir, "latest")
    if os.path.exists(pointer):
        name = open(pointer).read().strip()
        path = os.path.join(ckdir, name)
        if not name or "/" in name or not os.path.isfile(os.path.join(path, "state.json")):
            raise ValueError(f"{pointer} names {name!r}, which is not a complete checkpoint")
        return path
    return ckdir if os.path.isfile(os.path.join(ckdir, "state.json")) else None


def copy_checkpoint(src_run: str, dst_run: str):
    """A run's latest checkpoint becomes another run folder's only one (its pointer written last)."""
    src = latest_checkpoint(src_run)
    if src is None:
        raise ValueError(f"{src_run} holds no checkpoint")
    ckdir = os.path.join(dst_run, "ckpt")
    name = os.path.basename(src) if src != os.path.join(src_run, "ckpt") else \
        f"{json.load(open(os.path.join(src, 'state.json')))['rl']['iteration']:06d}"
    os.makedirs(ckdir, exist_ok=True)
    tmp = os.path.join(ckdir, name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, os.path.join(ckdir, name))
    _write_pointer(ckdir, name)
    _prune(ckdir, name)


def _prune(ckdir: str, keep_name: str):
    """After the pointer moved: drop versions but the newest CKPT_KEEP up to the pointer's, versions
    past it (written by a run killed before its pointer moved), temporaries, and a flat layout."""
    versions = sorted((n for n in os.listdir(ckdir) if n.isdigit() and os.path.isdir(os.path.join(ckdir, n))), key=int)
    keep = set([n for n in versions if int(n) <= int(keep_name)][-CKPT_KEEP:])
    for n in os.listdir(ckdir):
        p = os.path.join(ckdir, n)
        if (n in versions and n not in keep) or ".tmp" in n or n in _FLAT:
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def _cuda_rng() -> list:
    return list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []


def _set_cuda_rng(states: list):
    if states and torch.cuda.is_available():
        for d, s in enumerate(states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, d)


def _rng_state(gen) -> dict:
    """Every generator this process draws from: torch's CPU one and (when present) the CUDA ones,
    Python's, NumPy's, and the rollout sampler's own `gen`."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "gen": gen.get_state(),
            "cuda": _cuda_rng(),
            "python": _jsonable(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def save_checkpoint(ckdir, agent, opt, head, buffer, state: dict, rng, gen):
    """Agent weights/adapters, optimizer, value head, replay buffer, the loop's `state` (JSON) and every
    RNG of every rank, as one version `ckdir/<iteration:06d>/`: written into a temporary folder
    (state.json last), fsynced and renamed into place; then the pointer `ckdir/latest` moves to it
    (atomically), then older versions are pruned. A kill at any moment leaves the pointer on a
    complete checkpoint (or, before the first one, no pointer)."""
    per_rank = DIST.gather(_rng_state(gen))
    if not DIST.main:
        DIST.barrier()
        return
    name = f"{state['iteration']:06d}"
    final = os.path.join(ckdir, name)
    tmp = final + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    agent.model.save_pretrained(os.path.join(tmp, "agent"), safe_serialization=True)
    agent.tokenizer.save_pretrained(os.path.join(tmp, "agent"))
    crash_point("ckpt.agent")
    tensors, meta = _opt_tensors(opt)
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    crash_point("ckpt.optimizer")
    if head is not None:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(tmp, "value_head.safetensors"))
        crash_point("ckpt.value_head")
    rngs = {}
    for r, s in enumerate(per_rank):
        rngs[f"torch{r}"], rngs[f"gen{r}"] = s["torch"], s["gen"]
        rngs.update({f"cuda{r}.{d}": c for d, c in enumerate(s["cuda"])})
    save_file(rngs, os.path.join(tmp, "rng.safetensors"))
    crash_point("ckpt.rng")
    if buffer is not None:
        buffer.save(os.path.join(tmp, "buffer"))
        crash_point("ckpt.buffer")
    full = {"rl": state, "optimizer": meta, "task_rng": _jsonable(rng.getstate()),
            "python_rngs": [s["python"] for s in per_rank], "numpy_rngs": [s["numpy"] for s in per_rank]}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(full, f)
    _fsync_tree(tmp)
    crash_point("ckpt.state")
    if os.path.exists(final):             # a copy no pointer names: its run was killed before the pointer moved
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckdir)
    crash_point("ckpt.renamed")
    _write_pointer(ckdir, name)
    crash_point("ckpt.pointer")
    _prune(ckdir, name)
    crash_point("ckpt.pruned")
    if buffer is not None and buffer.path:
        buffer.save(buffer.path)
        crash_point("ckpt.run_buffer")
    DIST.barrier()


def load_checkpoint(path, agent, opt, head, buffer, rng, gen) -> dict:
    """Restore what save_checkpoint wrote (`path`: a version folder, see latest_checkpoint) into the
    live objects; the checkpoint's buffer snapshot replaces the run's buffer files. Returns the loop's
    state dict."""
    load_agent_weights(agent, os.path.join(path, "agent"))
    state = json.load(open(os.path.join(path, "state.json")))
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    sd = {"param_groups": state["optimizer"]["param_groups"], "state": {}}
    for key, v in list(tensors.items()) + list(state["optimizer"]["scalars"].items()):
        pid, name = key.split(".", 1)
        sd["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(sd)
    if head is not None:
        head.load_state_dict(load_file(os.path.join(path, "value_head.safetensors")))
    rngs = load_file(os.path.join(path, "rng.safetensors"))
    r = DIST.rank
    if f"gen{r}" not in rngs:
        raise ValueError(f"{path} was written by fewer ranks than this run has: resume with the same world size")
    torch.set_rng_state(rngs[f"torch{r}"] if f"torch{r}" in rngs else rngs["torch"])
    gen.set_state(rngs[f"gen{r}"])
    _set_cuda_rng([rngs[k] for k in sorted((k for k in rngs if k.startswith(f"cuda{r}.")), key=lambda k: int(k.split(".")[1]))])
    random.setstate(_tuple(state["python_rngs"][r] if "python_rngs" in state else state["python_rng"]))
    rng.setstate(_tuple(state["task_rng"]))
    n = state["numpy_rngs"][r] if "numpy_rngs" in state else state["numpy_rng"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if buffer is not None:
        snap = dg.ReplayBuffer.load(os.path.join(path, "buffer"), buffer.encoder, buffer.capacity, attach=False)
        buffer.items, buffer.emb = snap.items, snap.emb
        if buffer.path and DIST.main:
            buffer.save(buffer.path)
    return state["rl"]
