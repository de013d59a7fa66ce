"""The one model loader: tiny preset (full weights) and 4-bit NF4 + LoRA, forward/backward/save/reload."""
import os

import pytest
import torch

import models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    texts = ["feedback: You take the coin.\nroom: kitchen\nactions: take coin | move east"] * 20
    models.train_tokenizer(texts, str(d / "tok"), vocab_size=300)
    models.create_tiny(str(d / "m"), str(d / "tok"), preset="tiny-s", seed=0)
    return str(d / "m")


def _step(model, tok):
    ids = tok("room: kitchen <think>take coin</think>", return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), ids


def test_tokenizer_has_tags_and_round_trips(tiny):
    _, tok = models.load_model(tiny, device="cpu")
    assert tok.convert_tokens_to_ids("<think>") != tok.unk_token_id
    text = "<think>a plan</think><action>take coin</action>"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.decode(tok("zebra ünïcode")["input_ids"]) == "zebra ünïcode"   # byte-level: anything encodes


def test_tiny_forward_backward_save_reload(tiny, tmp_path):
    model, tok = models.load_model(tiny, device="cpu")
    loss, ids = _step(model, tok)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    models.save_model(model, tok, str(tmp_path / "saved"))
    assert os.path.exists(tmp_path / "saved" / "model.safetensors")
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in os.listdir(tmp_path / "saved"))
    again, _ = models.load_model(str(tmp_path / "saved"), device="cpu")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-5)


def test_4bit_lora_forward_backward_save_reload(tiny, tmp_path):
    spec = models.ModelSpec(load_in_4bit=True, lora_r=4)
    model, tok = models.load_model(tiny, spec, device="cpu")
    total, trainable = models.count_parameters(model)
    assert 0 < trainable < total
    assert "4bit" in type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__
    loss, ids = _step(model, tok)
    lora = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert lora and all("lora_" in n for n in lora)
    models.save_model(model, tok, str(tmp_path / "adapter"))
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
    again, _ = models.load_model(str(tmp_path / "adapter"), spec, device="cpu")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-4)


def test_spec_validation():
    with pytest.raises(ValueError):
        models.ModelSpec(load_in_4bit=True, lora_r=0).validate()
    with pytest.raises(ValueError):
        models.ModelSpec(attn="magic").validate()
    with pytest.raises(ValueError):
        models.create_tiny("/nonexistent", "/nonexistent", preset="huge")
