"""Shared fixtures. Triton kernels run under its interpreter on machines without CUDA."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before anything imports triton

import pytest  # noqa: E402


def tiny_cfg(root, name, **kw):
    """A toy-scale pipeline config: configs/quick.json (tiny-s models, a few trajectories, short
    episodes), with its files under the test's temporary folder."""
    import train
    base = train.load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "quick.json"))
    base.update(out=str(root / name), data_dir=str(root / "data"))
    base.update(kw)
    return train.Config(**base).validate()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One full toy pipeline run; other tests reuse its experience model and warm-start agent."""
    import train
    root = tmp_path_factory.mktemp("pipe")
    cfg = tiny_cfg(root, "a")
    return root, cfg, train.run(cfg)
