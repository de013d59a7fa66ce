"""The experience replay buffer: true nearest neighbours, crash-safe persistence, eviction."""
import json

import numpy as np
import pytest

import dreamgym as dg
from envs import Task

T = Task("twc", "train", 0, instruction="tidy up")


def tr(i, state, action, source="real", traj=None):
    return dg.Transition(task=T, t=i, state=state, action=action, next_state=state + "!", reward=0.0, done=False,
                         source=source, traj=traj or f"traj{i}")


class BagEncoder:
    """A deterministic stand-in for phi used only to check the retrieval arithmetic exactly."""
    dim = 8

    def __call__(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, hash(w) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.fixture(scope="module")
def encoder():
    return dg.Encoder()


def test_retrieve_returns_true_nearest_neighbours(encoder):
    buf = dg.ReplayBuffer(encoder)
    rng = np.random.default_rng(0)
    items = [tr(i, f"room: kitchen\nyou see: {w}", f"take {w}")
             for i, w in enumerate(["apple", "banana", "coin", "dirty sock", "egg", "fork", "green mug"])]
    buf.add(items)
    qs = [("room: kitchen\nyou see: coin", "take coin"), ("room: kitchen\nyou see: dirty socks", "take dirty socks")]
    got = buf.retrieve([q[0] for q in qs], [q[1] for q in qs], k=3)
    q = encoder([dg.query_text(s, a) for s, a in qs])
    brute = np.argsort(-(q @ buf.emb.T), axis=1)[:, :3]
    assert [[t.t for t in row] for row in got] == brute.tolist()
    assert got[0][0].action == "take coin" and got[1][0].action == "take dirty sock"
    assert abs(np.linalg.norm(buf.emb, axis=1) - 1).max() < 1e-4


def test_exclusion_of_own_trajectory():
    buf = dg.ReplayBuffer(BagEncoder())
    buf.add([tr(0, "a b", "x", traj="A"), tr(1, "a b", "x", traj="B"), tr(2, "c d", "y", traj="C")])
    got = buf.retrieve(["a b"], ["x"], k=2, exclude_traj=["A"])[0]
    assert [t.traj for t in got] == ["B", "C"]


def test_persistence_round_trip_and_truncated_tail(tmp_path):
    enc = BagEncoder()
    path = str(tmp_path / "buf")
    buf = dg.ReplayBuffer(enc, path=None)
    buf.add([tr(i, f"s {i}", f"a {i % 3}") for i in range(10)])
    buf.save(path)
    buf.path = path
    buf.add([tr(10, "s 10", "a 1", source="dream")])            # appended after the snapshot
    again = dg.ReplayBuffer.load(path, enc)
    assert [t.to_dict() for t in again.items] == [t.to_dict() for t in buf.items]
    q = (["s 4"], ["a 1"])
    assert [t.t for t in again.retrieve(*q, k=4)[0]] == [t.t for t in buf.retrieve(*q, k=4)[0]]
    with open(path + ".jsonl", "a") as f:
        f.write(json.dumps(tr(11, "s", "a").to_dict())[:40])      # a crash in the middle of a write
    again = dg.ReplayBuffer.load(path, enc)
    assert len(again) == 11
    lines = open(path + ".jsonl").read().splitlines()
    lines[3] = "{not json"
    open(path + ".jsonl", "w").write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"buf.jsonl:4"):
        dg.ReplayBuffer.load(path, enc)


def test_eviction_drops_oldest_synthetic_never_real():
    buf = dg.ReplayBuffer(BagEncoder(), capacity=5)
    buf.add([tr(i, f"s{i}", "a") for i in range(3)])
    buf.add([tr(10 + i, f"d{i}", "a", source="dream") for i in range(4)])
    assert len(buf) == 5 and len(buf.emb) == 5
    assert [t.t for t in buf.items] == [0, 1, 2, 12, 13]
    with pytest.raises(ValueError, match="capacity"):
        buf.add([tr(20 + i, f"r{i}", "a") for i in range(4)])


class CountingModel:
    """A stand-in sentence model: remembers what it was asked to encode."""
    def __init__(self):
        self.encoded = []

    def get_embedding_dimension(self):
        return 4

    def encode(self, texts, **kw):
        self.encoded += texts
        return np.array([[len(t), 1.0, 0.0, 0.0] for t in texts], np.float32)


def test_encoder_cache_stays_bounded_and_never_loses_a_text():
    model = CountingModel()
    enc = dg.Encoder(model=model, cache_size=4)
    enc(["a", "bb", "ccc"])
    out = enc(["a", "dddd", "eeeee"])                 # overflows the cache while "a" is a hit
    assert out[:, 0].tolist() == [1, 4, 5]
    assert model.encoded == ["a", "bb", "ccc", "dddd", "eeeee"], "a cached text is not encoded again"
    out = enc([f"x{i}" for i in range(7)] + ["a"])    # more new texts than the cache holds
    assert out[:, 0].tolist() == [2] * 7 + [1] and len(enc._cache) <= 4
    n = len(model.encoded)
    enc(["x6"])
    assert len(model.encoded) == n, "the most recently used texts are kept"
    enc(["x0"])
    assert model.encoded[n:] == ["x0"], "the least recently used ones are dropped"
