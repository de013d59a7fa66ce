"""The experience replay buffer: true nearest neighbours, crash-safe persistence, eviction."""
import json

import numpy as np
import pytest

import dreamgym as dg
from conftest import WordEncoder
from envs import Task

T = Task("twc", "train", 0, instruction="tidy up")


def tr(i, state, action, source="real", traj=None):
    return dg.Transition(task=T, t=i, state=state, action=action, next_state=state + "!", reward=0.0, done=False,
                         source=source, traj=traj or f"traj{i}")


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
    buf = dg.ReplayBuffer(WordEncoder())
    buf.add([tr(0, "a b", "x", traj="A"), tr(1, "a b", "x", traj="B"), tr(2, "c d", "y", traj="C")])
    got = buf.retrieve(["a b"], ["x"], k=2, exclude_traj=["A"])[0]
    assert [t.traj for t in got] == ["B", "C"]


def test_persistence_round_trip_and_truncated_tail(tmp_path):
    enc = WordEncoder()
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
    buf = dg.ReplayBuffer(WordEncoder(), capacity=5)
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


S0 = "feedback: -\nroom: kitchen\nexits: north hallway\nactions: move north | look around"


def step(s, a, nxt, source="real", traj="real0", reward=0.0, done=False):
    return dg.Transition(task=T, t=0, state=s, action=a, next_state=nxt, reward=reward, done=done, source=source,
                         traj=traj)


def key(t):
    return dg.query_text(t.state, t.action), t.next_state, t.reward, t.done


def test_dreamed_copies_never_crowd_out_the_real_transition():
    """Every rollout of a task starts from the same state: one iteration dreams up to G identical
    (state, action) steps, which embed exactly like the real one."""
    buf = dg.ReplayBuffer(WordEncoder())
    real = step(S0, "move north", "feedback: You go north.\nroom: hallway\nactions: move south")
    buf.add([real, step("feedback: -\nroom: attic\nactions: jump", "jump", "feedback: ouch\nactions: jump",
                        traj="real1")])
    dreamed = "feedback: You cannot go that way.\nroom: kitchen\nactions: move north | look around"
    buf.add([step(S0, "move north", dreamed, source="dream", traj=f"dream/0/t/{i}") for i in range(8)])
    assert sum(t.source == "dream" for t in buf.items) == 1, "identical dreamed transitions are stored once"
    got = buf.retrieve([S0], ["move north"], k=3)[0]
    assert real in got, "the nearest real transition keeps its slot"
    assert len({key(t) for t in got}) == len(got), "no two demos with the same query and outcome"


def test_retrieval_keeps_a_slot_for_the_nearest_real_transition():
    buf = dg.ReplayBuffer(WordEncoder())
    far = step("feedback: -\nroom: attic\nactions: jump", "jump", "feedback: ouch\nactions: jump")
    buf.add([far])
    near = [step(S0, "move north", f"feedback: dream {i}\nactions: move north", source="dream", traj=f"d{i}")
            for i in range(4)]
    buf.add(near)
    got = buf.retrieve([S0], ["move north"], k=3)[0]
    assert got[:2] == near[:2] and got[2] is far, "the nearest dreamed ones, then the nearest real one"
    assert buf.retrieve([S0], ["move north"], k=3, exclude_traj=[far.traj])[0] == near[:3]
    only_dreams = dg.ReplayBuffer(WordEncoder())
    only_dreams.add(near)
    assert only_dreams.retrieve([S0], ["move north"], k=3)[0] == near[:3]


def test_retrieval_skips_repeated_real_transitions_and_dedup_ignores_real_data():
    """Offline data holds the same step many times (every episode of a task starts alike): all are
    stored, but the demos show each (query, outcome) once."""
    buf = dg.ReplayBuffer(WordEncoder())
    same = [step(S0, "move north", "feedback: You go north.\nactions: move south", traj=f"r{i}") for i in range(5)]
    other = step(S0, "look around", "feedback: A kitchen.\nactions: move north", traj="r9")
    buf.add(same + [other])
    assert len(buf) == 6
    got = buf.retrieve([S0], ["move north"], k=2)[0]
    assert got == [same[0], other]
    buf.add([step(S0, "move north", same[0].next_state, source="dream", traj="d")])
    assert len(buf) == 6, "a dreamed transition that repeats a stored one adds nothing"
