#!/usr/bin/env bash
# The slower, optional job: install the paper's environments (ALFWorld engine, MiniWoB++ with
# Debian's Chromium) and run their adapter tests against them. Needs root for apt and a venv with
# requirements.txt already installed. Takes 4-6 min of installs, then ~40 s of tests on 2 cores.
# WebShop/WebArena tests run too when WEBSHOP_URL / the WA_* servers are set (envs/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver
fi
pip install -q -r requirements-envs.txt
python -m pytest -q -rs tests/test_envs_alfworld.py tests/test_envs_web.py
