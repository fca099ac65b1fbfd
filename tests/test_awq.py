"""awq pass: real doit builds of AWQ targets on the tiny random Phi3, checked in torch, plus
in-process checks of every supported layout and of the int4 block quantizer against onnxruntime."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import new_project

from modelbuild import UserError
from modelbuild.ml.int4 import qdq
from modelbuild.passes.awq import Params, awq_model, model_layout

AWQ_TOML = """
[target.tiny-awq]
pass = "awq"
inputs = { base = ":tiny-base", data = "data/travel_train.jsonl" }
params = { samples = 32, max_length = 128 }

[target.tiny-awq-fq]
pass = "awq"
inputs = { base = ":tiny-base", data = "data/travel_train.jsonl" }
params = { samples = 32, max_length = 128, fake_quantize = true }
"""


@pytest.fixture(scope="module")
def awq_project(tmp_path_factory):
    project = new_project(tmp_path_factory.mktemp("awq") / "project")
    project.path("targets/awq.toml").write_text(AWQ_TOML)
    project.doit("tiny-awq", "tiny-awq-fq")
    return project


def load(folder):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def decoder_linears(model):
    import torch

    return {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}


def rtn_int4(model):
    """Every decoder Linear through the int4 block RTN that the genai builder applies."""
    for linear in decoder_linears(model).values():
        linear.weight.data = qdq(linear.weight.data, 32, True)
    return model


def eval_prompt_logits(model, folder):
    """Logits at every token of the chat-rendered prompts of the held-out travel_eval.jsonl
    (one right-padded batch; the padding is left out)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    lines = (folder.parent.parent / "targets/data/travel_eval.jsonl").read_text().splitlines()
    chats = [[{"role": "user", "content": json.loads(line)["prompt"]}] for line in lines if line.strip()]
    texts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    assert len(texts) == 48 and not batch["attention_mask"].all()
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def test_awq_model_is_the_base_model_in_fp32(awq_project):
    base_dir, awq_dir = awq_project.path("build/tiny-base"), awq_project.path("build/tiny-awq")
    base, awq = load(base_dir), load(awq_dir)
    changed = [n for n, p in awq.state_dict().items() if not p.equal(base.state_dict()[n])]
    assert changed, "awq changed no weight: nothing was scaled"
    assert not any("embed" in n or "lm_head" in n or "o_proj" in n for n in changed), changed
    reference = eval_prompt_logits(base, awq_dir)
    difference = (eval_prompt_logits(awq, awq_dir) - reference).abs().max().item()
    assert difference < 1e-4 * reference.abs().max().item(), difference


def test_int4_rtn_of_the_awq_model_is_closer_to_fp32_than_rtn_of_the_base(awq_project):
    base_dir, awq_dir = awq_project.path("build/tiny-base"), awq_project.path("build/tiny-awq")
    reference = eval_prompt_logits(load(base_dir), base_dir)
    rtn_error = (eval_prompt_logits(rtn_int4(load(base_dir)), base_dir) - reference).pow(2).mean().item()
    awq_error = (eval_prompt_logits(rtn_int4(load(awq_dir)), awq_dir) - reference).pow(2).mean().item()
    assert awq_error < rtn_error, (awq_error, rtn_error)

    report = json.loads((awq_dir / "awq.json").read_text())
    assert report["records"] == 32 and report["fake_quantize"] is False
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    for layer in report["layers"]:
        assert set(layer["groups"]) == {"qkv", "gate_up", "down"}
        for group in layer["groups"].values():
            assert group["awq_mse"] <= group["rtn_mse"] and group["alpha"] in report["alphas"]
    assert report["totals"]["all"]["reduction"] > 0


def test_fake_quantized_weights_lie_on_the_int4_grid(awq_project):
    import torch

    awq = decoder_linears(load(awq_project.path("build/tiny-awq")))
    fake = decoder_linears(load(awq_project.path("build/tiny-awq-fq")))
    assert fake.keys() == awq.keys() and len(fake) == 8  # qkv, o, gate_up, down x 2 layers
    for name, linear in fake.items():
        w = linear.weight.data
        assert not w.equal(awq[name].weight.data)
        assert w.equal(qdq(awq[name].weight.data)), name  # the same scaling, then quantized
        # On the grid, checked without qdq: per block of 32 inputs, w = q * scale with integer
        # q in [-8, 7] and scale = (the block's largest-magnitude value) / -8.
        blocks = w.reshape(w.shape[0], -1, 32)
        lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -8
        q = blocks / scale
        assert (q - q.round()).abs().max() < 1e-4, name
        assert q.round().min() >= -8 and q.round().max() <= 7, name
        assert (w.abs() > 0).float().mean() > 0.5  # not a degenerate all-zero grid
    report = json.loads(awq_project.path("build/tiny-awq-fq/awq.json").read_text())["fake_quantize"]
    assert report == {"linears": 8, "max_abs_diff": 0.0, "identical_fraction": 1.0}


def test_bad_calibration_data_is_a_one_line_user_error(awq_project):
    awq_project.path("targets/data/bad.jsonl").write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    awq_project.path("targets/bad.toml").write_text(
        '[target.awq-bad]\npass = "awq"\ninputs = { base = ":tiny-base", data = "data/bad.jsonl" }\n'
    )
    result = awq_project.doit("awq-bad", check=False)
    assert result.returncode != 0
    assert "target 'awq-bad': targets/data/bad.jsonl: line 2: not JSON" in result.out
    assert "Traceback" not in result.out
    assert not awq_project.path("build/awq-bad").exists()


def test_two_builds_are_byte_identical(awq_project, tmp_path):
    """Last: rebuilds tiny-awq from scratch (fresh cache, so nothing can be restored)."""
    out = awq_project.path("build/tiny-awq")
    first = {name: (out / name).read_bytes() for name in ("model.safetensors", "awq.json", "config.json")}
    shutil.rmtree(out)
    result = awq_project.doit("tiny-awq", env={"MODELBUILD_CACHE": str(tmp_path / "fresh-cache")})
    assert result.executed == {"tiny-awq"} and "restored" not in result.out, result.out
    for name, data in first.items():
        assert (out / name).read_bytes() == data, name


# --- in process: every supported layout, with GQA, tied embeddings and outlier channels -------


def tiny_model(model_type: str, seed: int = 0):
    """A small random model with outlier input channels, as trained LLMs have (random init has none)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(torch.rand(64) + 0.5)
                norm.weight[torch.randperm(64)[:4]] *= 12.0
            if model_type == "phi3":  # fused: up is the second half of gate_up_proj
                layer.mlp.gate_up_proj.weight[160 + torch.randperm(160)[:6]] *= 10.0
            else:
                layer.mlp.up_proj.weight[torch.randperm(160)[:6]] *= 10.0
    return model


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_layouts_scale_exactly_and_beat_rtn(model_type):
    import copy

    import torch

    base = tiny_model(model_type)
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    calibration = [(torch.randint(0, 300, (4, 48), generator=generator), torch.ones(4, 48, dtype=torch.long)) for _ in range(2)]
    held_out = torch.randint(0, 300, (4, 48), generator=generator)
    report = awq_model(model, calibration, Params(grid=10))
    assert model.model.embed_tokens.weight.equal(base.model.embed_tokens.weight)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    for mine, theirs in zip(model.model.layers, base.model.layers):
        assert mine.self_attn.o_proj.weight.equal(theirs.self_attn.o_proj.weight)
    with torch.no_grad():
        reference = base(input_ids=held_out).logits
        assert (model(input_ids=held_out).logits - reference).abs().max() < 1e-4 * reference.abs().max()
        rtn_error = (rtn_int4(copy.deepcopy(base))(input_ids=held_out).logits - reference).pow(2).mean()
        awq_error = (rtn_int4(model)(input_ids=held_out).logits - reference).pow(2).mean()
    assert awq_error < 0.95 * rtn_error, (awq_error, rtn_error)
    assert report["tokens"] == 2 * 4 * 48 and report["totals"]["all"]["reduction"] > 0.05


def test_padding_in_a_calibration_batch_changes_nothing():
    import copy

    import torch

    base = tiny_model("llama")
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    separate, padded = copy.deepcopy(base), copy.deepcopy(base)
    ones = torch.ones(1, 40, dtype=torch.long)
    awq_model(separate, [(ids[:1], ones), (ids[1:, :25], ones[:, :25])], Params(grid=10))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    report = awq_model(padded, [(ids, mask)], Params(grid=10))
    assert report["tokens"] == 65
    for (name, a), b in zip(separate.state_dict().items(), padded.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UserError, match=r"model_type 'gpt2' \(GPT2LMHeadModel\).*supported: llama"):
        model_layout(model)


def test_block_qdq_matches_onnxruntime_matmulnbits_rtn():
    """qdq is element for element what MatMulNBits' default RTN (MLAS) stores, sym and asym."""
    import numpy as np
    import torch
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    generator = torch.Generator().manual_seed(0)
    w = torch.randn(48, 200, generator=generator) * torch.rand(200, generator=generator) * 3  # 200: a padded last block
    w[0, :32] = 0.0
    w[1, :32] = 1.0
    w[1, 0], w[1, 1] = 8.0, -8.0  # a tie on the largest magnitude
    w[2, :8] = torch.tensor([8.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])  # halves on the grid (scale -1)
    w[2, 8:32] = 0.0
    for symmetric in (True, False):
        rows, cols = w.shape
        blocks = (cols + 31) // 32
        matrix = np.pad(w.numpy().T, ((0, blocks * 32 - cols), (0, 0)))  # MatMul layout [in, out]
        packed = np.zeros((rows, blocks, 16), dtype=np.uint8)
        zero_points = np.zeros((rows, (blocks + 1) // 2), dtype=np.uint8)
        scales = np.zeros((rows, blocks), dtype=np.float32)
        quantize_matmul_4bits(packed, np.ascontiguousarray(matrix), scales, zero_points, 32, rows, blocks * 32, symmetric)
        q = np.stack([packed & 15, packed >> 4], -1).reshape(rows, blocks, 32).astype(np.float32)
        zp = np.full((rows, blocks), 8.0, np.float32) if symmetric else \
            np.stack([zero_points & 15, zero_points >> 4], -1).reshape(rows, -1)[:, :blocks].astype(np.float32)
        theirs = torch.from_numpy(((q - zp[..., None]) * scales[..., None]).reshape(rows, -1)[:, :cols])
        assert qdq(w, 32, symmetric).equal(theirs), symmetric
