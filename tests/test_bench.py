"""The benchmark scripts (rollout, kernels, train) still run end to end at toy sizes and print the lines
the README and bench/README.md quote.

No time is asserted (timings belong to bench/, read by a person); what is checked is that the
scripts work, that the engine's greedy rows equal HF's in the bench's own comparison, and that the
last lines carry the ratios in the documented format."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_rollout_bench_prints_its_ratios():
    out = run("rollout.py", "--batch", "6", "--prompt", "12", "--new", "5", "--prefix", "3", "--repeats", "1")
    assert "greedy rows identical to hf: 100%" in out                  # in the engine's compute dtype
    assert re.search(r"^engine plan: dtype (float32|bfloat16), linears (oneDNN|torch), decode attention (own|sdpa)",
                     out, re.M)
    assert re.search(r"^speedup_vs_hf_generate_same_dtype: [\d.]+", out, re.M)
    assert re.search(r"engine without oneDNN linears: +[\d.]+ tok/s, [\d.]+x hf generate", out)
    assert re.search(r"^dream_step_turns_per_s: [\d.]+$", out, re.M)
    assert re.search(r"^dream_step_speedup_vs_hf_generate: [\d.]+$", out, re.M)
    assert re.search(r"\nspeedup_vs_hf_generate: [\d.]+\n?$", out)          # the last line


def test_kernels_bench_runs_on_cpu():
    out = run("kernels.py", "--iters", "1", "--sample-b", "4", "--sample-v", "512", "--tok-n", "64", "--lp-n", "64",
              "--lp-h", "32", "--lp-v", "256", "--gae-b", "2", "--gae-t", "32", "--grpo-b", "8")
    for goal in ("sampling_speedup", "logprob_peak_mem_ratio", "gae_speedup"):
        assert re.search(rf"^{goal}: (n/a \(no CUDA\)|[\d.]+)$", out, re.M), goal


def test_train_bench_prints_its_ratios():
    out = run("train.py", "--sft-rows", "3", "--prompt", "10", "--target", "4", "--rl-rows", "3", "--rl-prompt", "8",
              "--rl-response", "3", "--repeats", "1", "--smollm2", "")
    for step in ("sft", "policy_update"):
        assert re.search(rf"^{step} tokens/s torch default \(float32 eager\): +[\d.]+", out, re.M), step
        assert re.search(rf"^{step} tokens/s ours: +[\d.]+", out, re.M), step
        assert re.search(rf"^{step} speedup: [\d.]+", out, re.M), step
    assert re.search(r"ours = (bfloat16 autocast|float32)", out)
    assert re.search(r"\ntrain_speedup_vs_torch_default: [\d.]+\n?$", out)          # the last line
