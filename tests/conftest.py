"""Shared fixtures. Triton kernels run under its interpreter on machines without CUDA."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before anything imports triton

import pytest  # noqa: E402


def tiny_cfg(root, name, **kw):
    """A toy-scale pipeline config: tiny-s models, a few trajectories, short episodes."""
    import train
    base = dict(out=str(root / name), data_dir=str(root / "data"), offline_expert=10, offline_noisy=10,
                offline_random=8, agent_model="tiny-s", exp_model="tiny-s", vocab_size=600, exp_epochs=1.0,
                exp_batch_tokens=4096, warm_epochs=2.0, warm_batch_tokens=2048, iterations=2, tasks_per_iter=2,
                group_size=3, eval_episodes=3, curve_episodes=2, eval_every=1, taskgen_every=1, taskgen_seeds=2,
                taskgen_per_seed=2, lam_tasks=0.5, exp_max_tokens=96, max_tokens=4096, env="twc:max_steps=3")
    base.update(kw)
    return train.Config(**base).validate()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One full toy pipeline run; other tests reuse its experience model and warm-start agent."""
    import train
    root = tmp_path_factory.mktemp("pipe")
    cfg = tiny_cfg(root, "a")
    return root, cfg, train.run(cfg)


@pytest.fixture(scope="session")
def small_agent_dir(tmp_path_factory):
    """A random tiny-s agent (tokenizer trained on the agent's own formats): for update-step tests."""
    import dreamgym as dg
    import models
    d = tmp_path_factory.mktemp("small")
    texts = [dg.AGENT_SYSTEM] + [dg.agent_prompt("put the apple in the fridge", [("go north", "You go north.")],
                                                 f"room: kitchen {i}\nactions: take apple | open fridge") +
                                 dg.agent_target("the apple goes in the fridge", "take apple") for i in range(50)]
    models.train_tokenizer(texts, str(d / "tok"), vocab_size=400)
    models.create_tiny(str(d / "m"), str(d / "tok"), preset="tiny-s", seed=0, max_len=512)
    return str(d / "m")
