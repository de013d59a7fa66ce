"""Loading the agent and the experience model: one loader for any Hugging Face causal LM.

* real models by hub name or local path, optionally 4-bit NF4 (bitsandbytes) with LoRA adapters
  (peft) on top -- QLoRA, which is how an 8B experience model and a 3B-8B agent fit one GPU each;
* flash-attention-2 on CUDA when installed, PyTorch SDPA otherwise (said once);
* the `tiny` presets for CPU: a small Llama built from a config with a byte-level BPE tokenizer
  trained on the project's own offline corpus. They are saved and reloaded through the very same
  `from_pretrained` path as real models, so every code path the GPU runs is the one tests run.
Weights are written as safetensors, atomically (a temporary folder renamed into place).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field

import torch

# Tags of the agent / experience-model formats. The tiny tokenizer has one token per tag, which
# keeps sequences short; real tokenizers spell them with a few tokens, which works just as well.
TAGS = ["<think>", "</think>", "<action>", "</action>", "<state>", "</state>", "<reward>", "</reward>",
        "<done>", "</done>", "<task>", "</task>"]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

TINY_PRESETS = {
    # name: hidden size, layers, heads (head dim 64), MLP width. ~1-4M parameters: CPU-trainable in minutes.
    "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768),
    "tiny-s": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=512),
    "tiny-m": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024),
}

_said = set()


def say_once(msg: str):
    """Fallbacks (no CUDA, no flash-attn) are said once per process, not per call."""
    if msg not in _said:
        _said.add(msg)
        warnings.warn(msg, stacklevel=2)


@dataclass
class ModelSpec:
    """How to build or load one model. `name` is 'tiny*', a hub name, or a local folder."""
    name: str = "tiny"
    load_in_4bit: bool = False
    lora_r: int = 0               # 0: train all weights (tiny models); >0: LoRA adapters of this rank
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])
    dtype: str = "auto"           # auto: bfloat16 on CUDA, float32 on CPU
    attn: str = "auto"            # auto | flash_attention_2 | sdpa | eager
    max_len: int = 1024           # context of tiny models
    grad_ckpt: bool = False       # recompute activations in backward (real models: the update's memory)

    def validate(self):
        if self.lora_r < 0:
            raise ValueError("lora_r must be >= 0")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.attn not in ("auto", "flash_attention_2", "sdpa", "eager"):
            raise ValueError(f"attn {self.attn!r}: use auto, flash_attention_2, sdpa or eager")
        if self.load_in_4bit and self.lora_r == 0:
            raise ValueError("a 4-bit model can only be trained through LoRA: set lora_r > 0")
        return self


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    say_once("dreamgym: no CUDA device, running on CPU (tiny models; Triton kernels use their "
             "PyTorch references)")
    return torch.device("cpu")


def _dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _attn(spec: ModelSpec, device: torch.device) -> str:
    if spec.attn not in ("auto", "flash_attention_2"):
        return spec.attn
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            say_once("dreamgym: flash-attn is not installed, using PyTorch SDPA attention "
                     "(pip install -r requirements-gpu.txt)")
    elif spec.attn == "flash_attention_2":
        say_once("dreamgym: flash-attention-2 needs CUDA, using PyTorch SDPA attention on CPU")
    return "sdpa"


# ----------------------------------------------------------------------------- tokenizer + tiny models
def train_tokenizer(texts, out_dir: str, vocab_size: int = 2048):
    """A byte-level BPE trained on the offline corpus (train fold only): any text still encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.add_tokens(TAGS)            # not special: they must survive decode(skip_special_tokens=True)
    _atomic_save(lambda d: fast.save_pretrained(d), out_dir)
    return fast


def create_tiny(out_dir: str, tokenizer_dir: str, preset: str = "tiny", seed: int = 0, max_len: int = 1024):
    """A randomly initialised Llama of a tiny preset, saved like any pretrained checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose from {sorted(TINY_PRESETS)}")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dims = TINY_PRESETS[preset]
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=max_len, tie_word_embeddings=True,
                      num_key_value_heads=dims["num_attention_heads"], rope_theta=10000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **dims)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    save_model(model, tok, out_dir)
    return out_dir


# ----------------------------------------------------------------------------- load / save
def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be loaded here, or None when it can: a tiny preset, a folder holding a saved
    model (config.json or adapter_config.json), a known alias (a module-level ALIASES dict, where
    one is defined), or a Hugging Face hub repo already in the local cache (runs never download
    mid-pipeline: fetch it first with `huggingface-cli download NAME`)."""
    if name in TINY_PRESETS or name in globals().get("ALIASES", {}):
        return None
    if os.path.isdir(name):
        found = any(os.path.isfile(os.path.join(name, f)) for f in ("config.json", "adapter_config.json"))
        return None if found else "the folder holds no saved model (config.json or adapter_config.json)"
    if name.startswith("tiny"):
        return f"unknown tiny preset; choose from {sorted(TINY_PRESETS)}"
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:                    # noqa: BLE001 - not a valid repo id: a path that does not exist
        cached = False
    return None if cached else (f"no such folder and not a known model name (tiny presets: "
                                f"{', '.join(sorted(TINY_PRESETS))}; a hub model must be in the local cache)")


def load_model(path_or_name: str, spec: ModelSpec | None = None, device=None, trainable=True):
    """(model, tokenizer) for a checkpoint folder or hub name, with the spec's 4-bit/LoRA/attention.

    A folder holding a saved LoRA adapter (adapter_config.json) loads its base and the adapter.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = (spec or ModelSpec()).validate()
    device = torch.device(device) if device is not None else default_device()
    adapter = os.path.isfile(os.path.join(path_or_name, "adapter_config.json"))
    base = json.load(open(os.path.join(path_or_name, "adapter_config.json")))["base_model_name_or_path"] \
        if adapter else path_or_name
    tok = AutoTokenizer.from_pretrained(path_or_name if os.path.isfile(
        os.path.join(path_or_name, "tokenizer_config.json")) else base)
    if tok.pad_token is None:          # real LMs often ship without one; never train on it
        tok.pad_token = tok.eos_token
    kwargs = dict(dtype=_dtype(spec, device), attn_implementation=_attn(spec, device))
    if spec.load_in_4bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": str(device) if device.type == "cpu" else device.index}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if not spec.load_in_4bit:
        model.to(device)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, path_or_name, is_trainable=trainable)
    elif spec.lora_r > 0:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha,
                                                 lora_dropout=spec.lora_dropout,
                                                 target_modules=spec.lora_targets, task_type="CAUSAL_LM"))
    if trainable and spec.grad_ckpt:
        # non-reentrant checkpointing works with frozen 4-bit bases + LoRA without input-grad hooks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(trainable)
    for p in model.parameters():
        if not trainable:
            p.requires_grad_(False)
    return model, tok


def _atomic_save(write, out_dir: str):
    tmp = out_dir.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = out_dir.rstrip("/") + f".old{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer, out_dir: str):
    """safetensors weights (or LoRA adapter) + tokenizer, written to a temp folder then renamed."""
    def write(d):
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
    _atomic_save(write, out_dir)
    return out_dir


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
