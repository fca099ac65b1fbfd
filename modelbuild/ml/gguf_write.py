"""Writing GGUF files that llama.cpp loads: a base model from an HF folder, a LoRA adapter from peft.

The layout is llama.cpp's own (``convert_hf_to_gguf.py`` for the base, ``convert_lora_to_gguf.py``
for adapters): tensor names from the ``gguf`` package's name map, Llama's q/k rows permuted back
to llama.cpp's rotary order, the tokenizer as ``tokenizer.ggml.*`` (byte-level BPE: tokens, token
types, merges, special ids) and the chat template. Weights go through the ``gguf`` package's own
quantizers, which write F16, Q8_0, Q4_0 and Q4_1 (its k-quants only dequantize).

**Source grids.** A base imported from a quantized GGUF (the embedded SmolLM2: Q4_1, with a
Q8_0 embedding) arrives as fp32 values that lie on that grid. Re-quantizing such a tensor with
the same block type gives back its original blocks, bit for bit: the block's min and max are the
grid's ``m`` and ``m + 15 d`` (Q4_1) or ``±127 d`` (Q8_0), so the quantizer recomputes the same
fp16 scale and the same codes. ``keep_source_grid`` writes a tensor in the first of those types
whose dequantized blocks equal the values exactly (checked, never assumed), whatever precision
was asked: it is the same model, smaller than f16 and without a second rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelbuild import UserError

# precision param -> the gguf package's block type name
PRECISIONS = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
# Block types a GGUF import can carry that the gguf package writes back exactly (smallest first).
SOURCE_GRID_TYPES = ("Q4_0", "Q4_1", "Q8_0")
# llama.cpp's general.file_type for each precision (LlamaFileType)
FILE_TYPES = {"F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1"}
# HF model_type -> (gguf architecture, q/k rows permuted to llama.cpp's rotary order)
ARCHITECTURES = {"llama": ("LLAMA", True), "phi3": ("PHI3", False)}


def architecture(config: dict):
    """(gguf MODEL_ARCH, permute_qk) of a model's config.json; one line for any other model type."""
    import gguf

    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"inputs.base: model_type {model_type!r} has no GGUF layout here (supported: "
                        f"{', '.join(ARCHITECTURES)})")
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise UserError(f"inputs.base: rope_scaling {scaling.get('rope_type', scaling.get('type'))!r} is not written "
                        "by gguf-export yet (llama.cpp needs its rope factor tensors)")
    name, permute = ARCHITECTURES[model_type]
    return getattr(gguf.MODEL_ARCH, name), permute


def _rope_theta(config: dict) -> float:
    return float((config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0)))


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _permute(weights, n_head: int):
    """HF's rotary row order -> llama.cpp's (convert_hf_to_gguf's LlamaModel.permute), per head."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(arch, n_blocks: int, hf_name: str) -> str:
    """The GGUF tensor name of an HF parameter (``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``)."""
    import gguf

    name = gguf.get_tensor_name_map(arch, n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"inputs.base: tensor {hf_name} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
    return name


def hf_to_gguf_rows(hf_name: str, array, config: dict, permute_qk: bool):
    """``array`` (rows = output features) in llama.cpp's row order for the tensor ``hf_name``."""
    if permute_qk and hf_name.endswith("q_proj.weight"):
        return _permute(array, config["num_attention_heads"])
    if permute_qk and hf_name.endswith("k_proj.weight"):
        return _permute(array, config.get("num_key_value_heads") or config["num_attention_heads"])
    return array


def encode(array, wanted: str, keep_source_grid: bool):
    """(bytes array, block type name, kept a source grid) for one weight. 1-D tensors (norms) stay
    F32; a weight whose rows are not whole 32-blocks falls back to F16, as llama.cpp's converter does."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    if array.ndim < 2:
        return array.astype(np.float32), "F32", False
    if keep_source_grid and array.shape[-1] % 32 == 0:
        for kind in SOURCE_GRID_TYPES:
            packed = quantize(array, T[kind])
            if np.array_equal(dequantize(packed, T[kind]), array):
                return packed, kind, True
    if wanted == "F16" or array.shape[-1] % 32:
        return array.astype(np.float16), "F16", False
    return quantize(array, T[wanted]), wanted, False


def _tokenizer(writer, model_dir: Path, vocab_size: int, pre: str) -> None:
    """Byte-level BPE vocabulary (tokenizer.json) as ``tokenizer.ggml.*``, with the special ids
    and the chat template the gguf package reads from the folder."""
    import gguf

    data = json.loads((model_dir / "tokenizer.json").read_text())
    if data["model"].get("type") != "BPE":
        raise UserError(f"inputs.base: tokenizer.json is a {data['model'].get('type')} tokenizer; gguf-export "
                        "writes byte-level BPE ones")
    by_id = {i: token for token, i in data["model"]["vocab"].items()}
    kinds = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may have more rows than the tokenizer has tokens
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(kinds.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    template = model_dir / "chat_template.jinja"
    if special.chat_template is None and template.is_file():
        special.chat_template = template.read_text()
    special.add_to_gguf(writer, quiet=True)


def pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's pre-tokenizer name for the folder's tokenizer.json: GPT-2's regex ("gpt-2"), or
    digits split one by one before it ("smollm"); anything else is refused, since llama.cpp would
    then split text differently from the tokenizer the model was trained with."""
    pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise UserError(f"inputs.base: tokenizer.json pre-tokenizer {kinds} has no llama.cpp equivalent here; set "
                    "params.pre_tokenizer to llama.cpp's name for it")


def _hparams(writer, config: dict, arch) -> None:
    import gguf

    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_vocab_size(int(config["vocab_size"]))
    if arch == gguf.MODEL_ARCH.PHI3:
        writer.add_rope_scaling_orig_ctx_len(int(config.get("original_max_position_embeddings")
                                                 or config["max_position_embeddings"]))
        writer.add_sliding_window(int(config.get("sliding_window") or 0))


def _hf_tensors(model_dir: Path):
    """(name, fp32 numpy array) of every tensor in the folder's safetensors files, sorted by name."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError("inputs.base: no *.safetensors in the model folder")
    for path in files:
        with safe_open(str(path), framework="np") as handle:
            for name in sorted(handle.keys()):
                yield name, handle.get_tensor(name)


def write_base(model_dir: Path, out_path: Path, precision: str, keep_source_grid: bool, pre: str = "",
               name: str = "") -> dict:
    """The HF model folder ``model_dir`` as one GGUF file; returns what was written per block type."""
    import gguf
    import numpy as np

    config = json.loads((model_dir / "config.json").read_text())
    arch, permute_qk = architecture(config)
    wanted = PRECISIONS[precision]
    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or config.get("_model_name_or_path") or out_path.stem)
    _hparams(writer, config, arch)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[wanted]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, model_dir, int(config["vocab_size"]), pre or pre_tokenizer(model_dir))
    counts: dict[str, int] = {}
    kept = 0
    n_blocks = int(config["num_hidden_layers"])
    for hf_name, array in _hf_tensors(model_dir):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reads a tied head from token_embd
        array = hf_to_gguf_rows(hf_name, np.ascontiguousarray(array, dtype=np.float32), config, permute_qk)
        data, kind, on_grid = encode(array, wanted, keep_source_grid)
        writer.add_tensor(gguf_name(arch, n_blocks, hf_name), data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        counts[kind] = counts.get(kind, 0) + 1
        kept += on_grid
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_types": dict(sorted(counts.items())), "source_grid_tensors": kept,
            "architecture": gguf.MODEL_ARCH_NAMES[arch], "pre_tokenizer": pre or pre_tokenizer(model_dir)}


def write_lora(adapter_dir: Path, base_config: dict, out_path: Path) -> dict:
    """A peft LoRA adapter as llama.cpp's GGUF adapter: ``general.type = adapter``,
    ``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted weight ``<name>.lora_a``
    ([rank, in], peft's A) and ``<name>.lora_b`` ([out, rank], rows in the base's GGUF order).
    llama.cpp scales B·A by alpha / rank, as peft does (rsLoRA and DoRA adapters are refused)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_rslora") or config.get("use_dora"):
        raise UserError(f"inputs.adapters: {adapter_dir.name} uses rsLoRA/DoRA scaling, which llama.cpp's LoRA does not")
    arch, permute_qk = architecture(base_config)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    n_blocks = int(base_config["num_hidden_layers"])
    pairs = 0
    for key in sorted(weights):
        if ".lora_A." not in key:
            continue
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj.weight
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        lora_a = weights[key].astype(np.float32)
        lora_b = hf_to_gguf_rows(module + ".weight", weights[key.replace(".lora_A.", ".lora_B.")].astype(np.float32),
                                 base_config, permute_qk)
        target = gguf_name(arch, n_blocks, module + ".weight")
        writer.add_tensor(target + ".lora_a", np.ascontiguousarray(lora_a))
        writer.add_tensor(target + ".lora_b", np.ascontiguousarray(lora_b))
        pairs += 1
    if not pairs:
        raise UserError(f"inputs.adapters: {adapter_dir.name} has no LoRA A/B weights")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"lora_pairs": pairs, "alpha": float(config["lora_alpha"]), "rank": int(config["r"])}
