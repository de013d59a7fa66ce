"""Each game's offline expert and uniform random play (admissible actions only) on 100 train seeds:
success, mean steps, and what the expert's first action is. Run from the repository root:
    python scripts/expert_table.py coin "coin:numLocations=5,max_steps=12" cookingworld mapreader
"""
import collections
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from envs import make_env, Task
from envs.collect import rollout, _seeds
for spec in sys.argv[1:]:
    env = make_env(spec)
    rng = random.Random(0)
    seeds = _seeds(spec, "train", 100, random.Random(0))
    res = {}
    for pol in ("expert", "random"):
        succ, steps, first = 0, 0, collections.Counter()
        for s in seeds:
            tr = rollout(env, Task(spec, "train", s), pol, rng, p_invalid=0.0)
            succ += tr[-1]["success"]; steps += len(tr)
            if pol == "expert":
                acts = tr[0]["admissible"]
                first[("first listed move" if tr[0]["action"] == next((a for a in acts if a.startswith("move")), None) else tr[0]["action"].split()[0])] += 1
        res[pol] = (succ / len(seeds), steps / len(seeds), dict(first))
    print(spec, "expert %.2f / %.2f" % res["expert"][:2], res["expert"][2], "random %.2f" % res["random"][0], flush=True)
