"""Running built bundles: generation with onnxruntime-genai (the genai-build and quantize-onnx
checks, the smoke and evaluate passes, `chat`) and full-sequence feeds for plain onnxruntime."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import UserError
from ..core import settings

ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"


def write_adapter(weights: dict, path: Path) -> None:
    """``weights`` (name -> array) as an ``.onnx_adapter`` file that ``og.Adapters`` loads."""
    import numpy as np
    import onnxruntime as ort

    arrays = {name: np.ascontiguousarray(weights[name]) for name in sorted(weights)}  # alive while the OrtValues are
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in arrays.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter.export_adapter(str(path))


def bundle_adapters(bundle: Path) -> dict[str, Path]:
    """name -> .onnx_adapter file of a bundle built by genai-build."""
    folder = Path(bundle) / ADAPTER_DIR
    return {p.name[: -len(ADAPTER_SUFFIX)]: p for p in sorted(folder.glob(f"*{ADAPTER_SUFFIX}"))}


def load_config(bundle: Path):
    """The bundle's og.Config, limited to the stage's thread share (MODELBUILD_THREADS, set by
    the scheduler) so parallel stages do not each start one onnxruntime thread per core."""
    import onnxruntime_genai as og

    config = og.Config(str(bundle))
    threads = settings.current().threads
    if threads:
        options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return config


class Chat:
    """A loaded bundle: answers a prompt greedily, with or without one of its adapters."""

    def __init__(self, bundle: Path):
        import onnxruntime
        import onnxruntime_genai as og

        onnxruntime.set_default_logger_severity(3)  # one harmless warning per overridable initializer
        self.og = og
        self.model = og.Model(load_config(bundle))
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model)
        self.adapter_names = []
        for name, path in bundle_adapters(bundle).items():
            self.adapters.load(str(path), name)
            self.adapter_names.append(name)

    def prompt_ids(self, prompt: str):
        messages = json.dumps([{"role": "user", "content": prompt}])
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def generate(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 64) -> list[int]:
        og = self.og
        ids = self.prompt_ids(prompt)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        if adapter is not None:
            if adapter not in self.adapter_names:
                raise KeyError(adapter)
            # Must precede append_tokens, or the prompt silently runs without the adapter.
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(ids)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens

    def answer(self, prompt: str, adapter: str | None = None, max_new_tokens: int = 64) -> str:
        return self.tokenizer.decode(self.generate(prompt, adapter, max_new_tokens)).strip()


def verify_bundle(bundle: Path, prompt: str, what: str) -> dict:
    """Load the bundle and generate with no adapter and with each one; return the token counts.

    ``what`` names the bundle in errors ("built bundle", "quantized bundle").
    """
    try:
        chat = Chat(bundle)
        counts = {"(none)": len(chat.generate(prompt, None, max_new_tokens=8))}
        for name in chat.adapter_names:
            counts[name] = len(chat.generate(prompt, name, max_new_tokens=8))
    except Exception as error:  # onnxruntime-genai raises plain RuntimeError/OrtException
        raise UserError(f"{what} fails to load or generate in onnxruntime-genai: {error}") from None
    if not all(counts.values()):
        raise UserError(f"{what} generated no tokens: {counts}")
    return counts


def prefill_feeder(model, decoder: dict, where: str):
    """ids -> the decoder's whole input dict for one sequence with an empty KV cache.

    ``model`` is the decoder's onnx.ModelProto (external data need not be loaded), ``decoder``
    the ``model.decoder`` section of genai_config.json, which names the inputs. Inputs that are
    overridable initializers (switchable LoRA weights) are left to their defaults. ``where``
    (the pass's input key) starts the error for an input it cannot feed.
    """
    import numpy as np
    import onnx

    names = decoder.get("inputs", {})
    patterns = [re.compile(re.escape(names.get(key, "")).replace("%d", r"\d+") + "$")
                for key in ("past_key_names", "past_value_names") if names.get(key)]
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if value.name == names.get("input_ids", "input_ids"):
            specs.append((value.name, "ids", dtype))
        elif value.name == names.get("attention_mask", "attention_mask"):
            specs.append((value.name, "mask", dtype))
        elif value.name == names.get("position_ids", "position_ids"):
            specs.append((value.name, "positions", dtype))
        elif any(p.match(value.name) for p in patterns):
            specs.append((value.name, "past", dtype))
        else:
            raise UserError(f"{where}: decoder input '{value.name}' is none of input_ids, attention_mask, position_ids or the KV cache")
    kv_heads, head_size = decoder.get("num_key_value_heads"), decoder.get("head_size")

    def feeds(ids) -> dict:
        ids = np.asarray(ids, dtype=np.int64)[None, :]
        out = {}
        for name, kind, dtype in specs:
            if kind == "ids":
                out[name] = ids.astype(dtype)
            elif kind == "mask":
                out[name] = np.ones_like(ids, dtype=dtype)
            elif kind == "positions":
                out[name] = np.arange(ids.shape[1], dtype=dtype)[None, :]
            else:
                out[name] = np.zeros((1, kv_heads, 0, head_size), dtype=dtype)
        return out

    return feeds


def bundle_logits(bundle: Path, ids: list[int]):
    """Logits [tokens, vocab] (numpy, float64) of a bundle's decoder for one sequence, empty KV
    cache, through plain onnxruntime on the CPU; switchable adapters stay off (their defaults)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    decoder = json.loads((Path(bundle) / "genai_config.json").read_text())["model"]["decoder"]
    path = Path(bundle) / decoder["filename"]
    feeds = prefill_feeder(onnx.load(str(path), load_external_data=False), decoder, "bundle")(ids)
    ort.set_default_logger_severity(3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits_name = decoder.get("outputs", {}).get("logits", "logits")
    return np.asarray(session.run([logits_name], feeds)[0], dtype=np.float64)[0]


def logit_agreement(expected, got) -> dict:
    """How closely ``got`` follows ``expected`` (both [tokens, vocab]): the largest absolute
    difference, the Pearson correlation over all logits, and the share of positions whose top token
    agrees. A builder that takes the wrong layer for the LM head correlates at ~0.6."""
    import numpy as np

    expected, got = np.asarray(expected, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if expected.shape != got.shape:
        return {"shape": [list(expected.shape), list(got.shape)], "max_abs": float("inf"), "correlation": 0.0,
                "top1_agreement": 0.0}
    return {
        "max_abs": round(float(np.abs(expected - got).max()), 6),
        "correlation": round(float(np.corrcoef(expected.ravel(), got.ravel())[0, 1]), 6),
        "top1_agreement": round(float((expected.argmax(-1) == got.argmax(-1)).mean()), 4),
    }

