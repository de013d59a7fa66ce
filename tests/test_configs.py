"""Every named config parses and validates, flags override it, and mistakes in it are named in one line.
configs/quick.json is the toy pipeline every pipeline test runs (conftest.tiny_cfg)."""
import glob
import json
import os
import subprocess
import sys

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))


def test_there_are_named_configs():
    assert {"quick.json", "qlora-1gpu.json", "node-8gpu.json"} <= {os.path.basename(c) for c in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_each_config_parses_and_validates(path):
    cfg = train.parse_args(["--config", path])
    for k, v in json.load(open(path)).items():
        assert getattr(cfg, k) == v, k


def test_flags_override_the_config_file():
    cfg = train.parse_args(["--config", os.path.join(ROOT, "configs", "quick.json"), "--iterations", "7"])
    assert cfg.iterations == 7 and cfg.agent_model == "tiny-s"


def test_every_field_has_a_help_line():
    helps = train.field_help()
    missing = [f.name for f in train.dataclasses.fields(train.Config) if not helps.get(f.name)]
    assert not missing, f"Config fields without a help comment: {missing}"
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--beta" in out.stdout and "KL to the warm-start policy" in out.stdout


def test_a_bad_config_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"iterations": 3, "no_such_field": 1}')
    out = subprocess.run([sys.executable, "train.py", "--config", str(bad)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "no_such_field" in out.stderr and "Traceback" not in out.stderr
