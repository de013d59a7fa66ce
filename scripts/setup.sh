#!/usr/bin/env bash
# Create .venv with the pinned CPU requirements (torch==2.13.0 is the CPU wheel here; on a
# Linux GPU machine the same pin is the CUDA build -- then also: pip install -r requirements-gpu.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
python -c "import torch, transformers, textworld_express; print('setup ok: torch', torch.__version__, '| cuda', torch.cuda.is_available())"
