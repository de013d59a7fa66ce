#!/usr/bin/env bash
# Every GPU check in one go (a lent GPU's time is short): run from the repo root on a CUDA machine,
#   bash bench/gpu.sh 2>&1 | tee bench/gpu-$(date +%F).log
# and copy the summary lines into the README's "Benchmarks" with the device name.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
python -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed (SDPA)"
echo "== tests on CUDA: Triton kernels compiled (not interpreted), engine incl. 4-bit + LoRA (on cuda), models"
env -u TRITON_INTERPRET DREAMGYM_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine.py tests/test_models.py
echo "== kernels vs references (H100 SXM bandwidth 3350 GB/s; H200: --bandwidth 4800)"
python bench/kernels.py
echo "== engine vs HF generate: spec config, then a Qwen2-0.5B-shaped model in bf16"
python bench/rollout.py --device cuda
python bench/rollout.py --device cuda --preset qwen0.5b --batch 64 --prompt 512 --new 128
echo "== the main job on the GPU (tiny models, CUDA paths: sampling/logprob kernels, CUDA graphs)"
python train.py --out runs/gpu-check --iterations 5 --eval_episodes 50
