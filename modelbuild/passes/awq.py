"""awq: activation-aware weight scaling (AWQ) of an HF causal LM, for a later int4 RTN quantizer.

The output is still a float model, equivalent to the base up to float rounding: for every group
of Linears that share an input, the input columns of their weights are multiplied by a
per-channel scale ``s`` and ``1/s`` is folded into the op that produces that input. The scales
are chosen so that the int4 quantizer that comes later (the onnxruntime-genai model builder:
MatMulNBits, RTN, block size 32 along the input dimension) loses less: channels that carry large
activations get finer steps on the int4 grid.

Algorithm (AutoAWQ style, computed in torch from calibration records):

- the calibration records (JSONL prompt/response, rendered like lora-finetune renders them) run
  through the model one decoder layer at a time; each layer's inputs are the previous layer's
  outputs, so only one layer's activations are held at a time;
- per layer, the inputs ``X`` of three groups are recorded: q/k/v (or fused qkv_proj) after
  input_layernorm, gate/up (or fused gate_up_proj) after post_attention_layernorm, and down_proj
  (input ``act(gate) * up``);
- per group, for alpha in ``grid`` exponents ``0, 1/grid, ...``: ``s = mean|X|**alpha``, normalised
  by ``sqrt(s.max() * s.min())``; ``W' = Q(W * s) / s`` with ``Q`` the int4 block
  quantize-dequantize below; error = MSE of the group's outputs ``X W'^T`` vs ``X W^T`` over all
  calibration tokens (through the Gram matrix ``X^T X`` when that is cheaper; exact either way).
  alpha = 0 (s = 1, plain RTN) is in the grid and wins ties, so a group never gets worse than RTN
  on the calibration set;
- the best scales are applied: weight columns times ``s``; ``1/s`` folded into the RMSNorm weight
  (q/k/v, gate/up) or into the up rows (up_proj, or the second half of a fused gate_up_proj) for
  down_proj. o_proj is skipped (with GQA its input cannot be folded exactly into v), and the
  embeddings / lm_head are never touched (SmolLM2 ties them).

``Q`` is MLAS' blockwise RTN quantizer, reproduced element for element in ``modelbuild.ml.int4.qdq``.

With ``fake_quantize``, every decoder-layer Linear (the scaled ones and o_proj) is written already
quantize-dequantized onto that grid, so a LoRA finetune on the output trains on the int4 base
("quantize, then finetune"); awq.json reports how closely a later RTN of the same scheme
reproduces the written weights. Symmetric: bit for bit (the block's extreme value stays on -8, so
the scale comes back unchanged). Asymmetric: not quite, as MLAS rounds a zero point of k + 0.5 up
and the block's grid then shrinks on requantization (about 1 block in 10,000 on SmolLM2; the rest
within float rounding). lm_head and the embeddings stay float. The output is float32 whatever
the base's dtype.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.int4 import qdq
from modelbuild.ml.records import CHAT, load_records, right_pad, tokenize_record
from modelbuild.passdef import Input, PassDef, param, require

# model_type -> layout. Every one of these: pre-norm decoder layers whose RMSNorm output
# (x * weight) feeds only q/k/v resp. only gate/up, and an MLP down(act(gate) * up).
SUPPORTED = {"llama": "split", "mistral": "split", "qwen2": "split", "qwen3": "split", "phi3": "fused"}


@dataclass(frozen=True)
class Params:
    block_size: int = param(32, "int4 block size along the input dimension, as the later quantizer uses (MatMulNBits block_size)")
    symmetric: bool = param(True, "symmetric int4 (the genai builder's default) or asymmetric with zero points")
    grid: int = param(20, "number of scaling exponents alpha tried per group: 0, 1/grid, ..., (grid-1)/grid")
    samples: int = param(64, "calibration records taken from data (a seeded sample; all if fewer)")
    max_length: int = param(256, "tokens per calibration record; longer records are truncated")
    template: str = param(CHAT, "text template with {prompt} and {response}, or 'chat' for the base model's own chat template")
    fake_quantize: bool = param(
        False, "write every decoder-layer Linear already quantize-dequantized onto the int4 grid (quantize, then finetune)"
    )
    seed: int = param(0, "seed for choosing the calibration records")

    def __post_init__(self):
        for name in ("samples", "grid", "max_length"):
            require(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        require(self.block_size >= 16 and not self.block_size & (self.block_size - 1), "block_size",
                "a power of 2 >= 16 (MatMulNBits needs one)", self.block_size)


# --- model layout -------------------------------------------------------------------------------


@dataclass
class Group:
    name: str  # "qkv", "gate_up", "down"
    linears: list[tuple[str, object]]  # (name within the layer, nn.Linear), sharing one input
    fold: tuple[str, object, slice | None]  # (name, module, rows): RMSNorm weight, or Linear rows


def layer_groups(layer, layout: str, where: str) -> list[Group]:
    def get(path: str):
        module = layer
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                raise UserError(f"{where}: has no '{path}', which awq needs for this architecture")
        return module

    if layout == "fused":
        gate_up = get("mlp.gate_up_proj")
        half = gate_up.out_features // 2
        return [
            Group("qkv", [("self_attn.qkv_proj", get("self_attn.qkv_proj"))], ("input_layernorm", get("input_layernorm"), None)),
            Group("gate_up", [("mlp.gate_up_proj", gate_up)],
                  ("post_attention_layernorm", get("post_attention_layernorm"), None)),
            Group("down", [("mlp.down_proj", get("mlp.down_proj"))], ("mlp.gate_up_proj", gate_up, slice(half, 2 * half))),
        ]
    qkv = [(f"self_attn.{n}", get(f"self_attn.{n}")) for n in ("q_proj", "k_proj", "v_proj")]
    gate_up = [(f"mlp.{n}", get(f"mlp.{n}")) for n in ("gate_proj", "up_proj")]
    return [
        Group("qkv", qkv, ("input_layernorm", get("input_layernorm"), None)),
        Group("gate_up", gate_up, ("post_attention_layernorm", get("post_attention_layernorm"), None)),
        Group("down", [("mlp.down_proj", get("mlp.down_proj"))], ("mlp.up_proj", get("mlp.up_proj"), None)),
    ]


def model_layout(model) -> tuple[str, list]:
    """(layout, decoder layers) of a supported model; UserError naming what is not supported."""
    model_type = getattr(model.config, "model_type", None)
    arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    if model_type not in SUPPORTED:
        raise UserError(
            f"inputs.base: awq does not support model_type '{model_type}' ({arch}); "
            f"supported: {', '.join(sorted(SUPPORTED))}"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"inputs.base: {arch} has no model.layers, which awq needs")
    return SUPPORTED[model_type], list(layers)


# --- the search ---------------------------------------------------------------------------------


def search_group(x, weight, params: Params) -> tuple[float, object, float, float]:
    """Best (alpha, scales, rtn_mse, awq_mse) for a group with inputs x [T, in] and its weights
    stacked [out, in]. The error is the MSE of the group outputs x @ W'^T vs x @ W^T, computed
    from the Gram matrix x^T x (out * in^2 per alpha) when that is cheaper than from x (T * in * out)."""
    import torch

    tokens, width = x.shape
    mean = x.abs().sum(0, dtype=torch.float64) / tokens
    gram = x.T @ x if width <= tokens else None
    best = rtn = None
    for step in range(params.grid):
        alpha = step / params.grid
        if step == 0:
            scales = torch.ones(width, dtype=torch.float32, device=x.device)
        else:
            s = mean.pow(alpha).clamp(min=1e-4)
            scales = (s / (s.max() * s.min()).sqrt()).to(torch.float32)
        diff = qdq(weight * scales, params.block_size, params.symmetric).div_(scales).sub_(weight)
        out = diff @ gram if gram is not None else x @ diff.T
        other = diff if gram is not None else out
        error = float(torch.dot(out.reshape(-1), other.reshape(-1))) / (tokens * weight.shape[0])
        if rtn is None:
            rtn = error
        if best is None or error < best[2]:
            best = (alpha, scales, error)
    alpha, scales, error = best
    return alpha, scales, rtn, error


def apply_scales(group: Group, scales) -> None:
    """Weight columns times s, 1/s folded into the op producing the group's input (exact)."""
    for _, linear in group.linears:
        linear.weight.data.mul_(scales)
    _, module, rows = group.fold
    if rows is None and not hasattr(module, "out_features"):  # RMSNorm: y = weight * normed(x)
        module.weight.data.div_(scales)
        return
    rows = rows or slice(0, module.out_features)
    module.weight.data[rows].div_(scales[:, None])
    if getattr(module, "bias", None) is not None:
        module.bias.data[rows].div_(scales)


def _capture_first_layer_inputs(model, layers, batches: list) -> list:
    """(hidden_states, kwargs, valid) that each calibration batch feeds into the first decoder
    layer; valid [B, T] marks the tokens that are not padding."""

    class Stop(Exception):
        pass

    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids, mask in batches:
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except Stop:
                pass
    finally:
        handle.remove()
    return [(hidden, kwargs, mask.bool()) for (hidden, kwargs), (_, mask) in zip(captured, batches)]


def awq_model(model, batches: list, params: Params, progress=None) -> dict:
    """Scale ``model`` in place from the calibration ``batches`` ((input_ids, attention_mask) each); the report."""
    import torch

    layout, layers = model_layout(model)
    device = next(model.parameters()).device
    report_layers = []
    totals: dict[str, list[float]] = {}
    with torch.no_grad():
        states = _capture_first_layer_inputs(model, layers, batches)
        records = sum(valid.shape[0] for _, _, valid in states)
        tokens = sum(int(valid.sum()) for _, _, valid in states)
        bar = progress.add_task(f"awq {records} records / {tokens} tokens", total=len(layers), gain="-") if progress else None
        for index, layer in enumerate(layers):
            groups = layer_groups(layer, layout, f"inputs.base: layer {index}")
            seen: dict[str, list] = {g.name: [] for g in groups}
            current = {}
            handles = [
                g.linears[0][1].register_forward_hook(
                    lambda module, args, output, name=g.name: seen[name].append(args[0][current["valid"]])
                )
                for g in groups
            ]
            outputs = []
            try:
                for hidden, kwargs, valid in states:
                    current["valid"] = valid
                    outputs.append(layer(hidden, **kwargs))
            finally:
                for handle in handles:
                    handle.remove()
            outputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
            entry = {"layer": index, "groups": {}}
            for group in groups:
                x = torch.cat(seen[group.name]).to(torch.float32)
                weight = torch.cat([linear.weight.data for _, linear in group.linears]).to(torch.float32)
                alpha, scales, rtn, awq = search_group(x, weight, params)
                if alpha > 0:
                    apply_scales(group, scales)
                entry["groups"][group.name] = {
                    "modules": [name for name, _ in group.linears],
                    "fold_into": group.fold[0],
                    "alpha": round(alpha, 6),
                    "rtn_mse": _num(rtn),
                    "awq_mse": _num(awq),
                }
                totals.setdefault(group.name, [0.0, 0.0])
                totals[group.name][0] += rtn
                totals[group.name][1] += awq
                seen[group.name] = []
            if params.fake_quantize:
                for module in layer.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.weight.data.copy_(qdq(module.weight.data, params.block_size, params.symmetric))
            states = [(out, kwargs, valid) for out, (_, kwargs, valid) in zip(outputs, states)]
            report_layers.append(entry)
            if progress:
                rtn_sum = sum(g["rtn_mse"] for g in entry["groups"].values())
                awq_sum = sum(g["awq_mse"] for g in entry["groups"].values())
                gain = f"{1 - awq_sum / rtn_sum:.1%}" if rtn_sum else "-"
                progress.update(bar, advance=1, gain=gain)
    rtn_all = sum(r for r, _ in totals.values())
    awq_all = sum(a for _, a in totals.values())
    return {
        "model_type": model.config.model_type,
        "device": device.type,
        "records": records,
        "tokens": tokens,
        "block_size": params.block_size,
        "symmetric": params.symmetric,
        "alphas": [round(step / params.grid, 6) for step in range(params.grid)],
        "totals": {
            **{name: _summary(r, a) for name, (r, a) in totals.items()},
            "all": _summary(rtn_all, awq_all),
        },
        "layers": report_layers,
    }


def _num(value: float) -> float:
    return float(f"{value:.6g}")


def _summary(rtn: float, awq: float) -> dict:
    return {"rtn_mse": _num(rtn), "awq_mse": _num(awq), "reduction": _num(1 - awq / rtn) if rtn else 0.0}


def requantize_check(model, params: Params) -> dict:
    """How a later RTN of the same scheme reproduces fake-quantized decoder Linears."""
    import torch

    worst, same, total, linears = 0.0, 0, 0, 0
    _, layers = model_layout(model)
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.data
                again = qdq(w, params.block_size, params.symmetric)
                worst = max(worst, float((again - w).abs().max()))
                same += int((again == w).sum())
                total += w.numel()
                linears += 1
    return {"linears": linears, "max_abs_diff": _num(worst), "identical_fraction": _num(same / total)}


# --- the pass -----------------------------------------------------------------------------------


def calibration_batches(params: Params, data_path: Path, shown: str, tokenizer, device, batch_tokens: int = 4096) -> list:
    """(input_ids, attention_mask) batches of the chosen records, right-padded; records sorted by
    length so that little is padding, at most ``batch_tokens`` (padded) tokens a batch."""
    import torch

    records = load_records(data_path, shown)
    chosen = sorted(random.Random(params.seed).sample(range(len(records)), min(params.samples, len(records))))
    encoded = []
    for number in chosen:
        ids, _ = tokenize_record(records[number], params.template, tokenizer, params.max_length, f"{shown}: record {number + 1}")
        if ids:
            encoded.append(ids)
    if not encoded:
        raise UserError(f"{shown}: the chosen records render to no tokens")
    encoded.sort(key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    groups, group = [], []
    for ids in encoded:
        if group and (len(group) + 1) * len(ids) > batch_tokens:
            groups.append(group)
            group = []
        group.append(ids)
    groups.append(group)
    batches = []
    for group in groups:
        input_ids, mask = right_pad(group, pad)
        batches.append((torch.tensor(input_ids, device=device), torch.tensor(mask, device=device)))
    return batches


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelbuild.ml.hf import save_model_folder
    from modelbuild.core.progress import step_progress

    data_path = inputs["data"]
    shown = ctx.input_names["data"]
    device = torch.device("cuda" if ctx.device.startswith("cuda") else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{ctx.device}': torch sees no CUDA device")

    tokenizer = AutoTokenizer.from_pretrained(inputs["base"])
    batches = calibration_batches(params, data_path, shown, tokenizer, device)  # bad data: fail before loading the model
    model = AutoModelForCausalLM.from_pretrained(inputs["base"], dtype=torch.float32).eval()
    model_layout(model)
    model.to(device)

    with step_progress("gain") as progress:
        report = awq_model(model, batches, params, progress)
    model.to("cpu")
    report["fake_quantize"] = requantize_check(model, params) if params.fake_quantize else False
    (out_dir / "awq.json").write_text(json.dumps(report, indent=1) + "\n")
    save_model_folder(model, tokenizer, out_dir)


PASS = PassDef(
    name="awq",
    version=1,
    doc="activation-aware weight scaling (AWQ) from calibration records, so a later int4 RTN loses less",
    params=Params,
    inputs={
        "base": Input("Hugging Face causal-LM folder (usually another target)"),
        "data": Input("JSONL prompt/response records for calibration", kind="file"),
    },
    run=run,
    libraries=("torch", "transformers", "safetensors"),
    devices=("cpu", "cuda"),
)
