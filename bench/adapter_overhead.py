"""Where the switchable adapter's decode cost goes, and what the rewrites that might cut it do (issue #11).

Takes the bundles that ``bench/adapter_speed.py`` built (``--work``, default
/tmp/adapter_speed/source_grid), writes each rewrite of fused_3d below as a bundle with the travel
adapter in its layout, and measures every variant twice: one decode step in plain onnxruntime on one thread (thread CPU
time, ``--past`` tokens of KV cache, the variants taking turns step by step for ``--steps``
turns), and onnxruntime-genai tokens/s with its default threads (``--rounds`` rounds of
``--tokens`` greedy tokens, the order rotating each round). Each ratio to merged is the median of
the per-turn (per-round) ratios, so a drift of the machine's speed hits every variant alike.

  merged    the merged bundle (no LoRA)
  fused     the switchable bundle as genai-build makes it: LoRA paths fused (lora_graph.py), the
            decoder on [tokens, hidden] so each lora_B MatMul and its Add are one Gemm (lora_gemm.py)
  fused_3d  the same without the Gemm rewrite (``lora_gemm = false``)
  rank1     fused_3d with every LoRA rank cut to an eighth (rank 8 -> 1): the same ops, 1/8 of the
            LoRA bytes (random weights: decode speed does not depend on their values)
  no_lora   fused_3d with the LoRA paths removed: its packed bases alone
  int8_dq   fused_3d's LoRA MatMuls as DynamicQuantizeMatMul with int8 weights (a scale per
            column): a quarter of the bytes, activations quantized per run
  fp16      fused_3d with fp16 LoRA weights, each LoRA path casting its input to fp16 and back

So fused_3d - rank1 is what 7/8 of the LoRA bytes cost, rank1 - no_lora what the LoRA ops cost,
no_lora - merged what packing the bases saved, fused_3d - fused what the Gemm rewrite saved. The
inputs are bound once as OrtValues, as onnxruntime-genai binds them. The record also gives the
chat prompt's logits of fused, int8_dq and fp16 against fused_3d's, all with the travel adapter
(fused sums in another order, and the int4 MatMulNBits quantize their input to 8 bits per block,
so a last-bit difference can flip a rounding: they match by correlation, not to the bit), and
no_lora's against fused_3d's without an adapter (exact).

    PYTHONPATH=. .venv/bin/python bench/adapter_overhead.py [--work /tmp/adapter_speed/source_grid]

Writes bench/results/adapter_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from modelbuild.ml.graph import producers_and_consumers
from modelbuild.ml.lora_gemm import LORA_RESHAPES, block_diagonal  # gate/up's B as one 2-D matrix, as the bundle lays it out

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench/results/adapter_overhead.json"
sys.path.insert(0, str(REPO / "bench"))

from adapter_speed import Decoder, decode_feeds, paired  # noqa: E402  (one decode input, one og decoder for every variant)
from adapter_speed import logits as prompt_logits  # noqa: E402


def lora_inputs(model) -> dict:
    return {i.name: i for i in model.graph.input if ".lora_" in i.name}


def set_input_shape(model, name: str, shape: list[int]) -> None:
    """A switchable LoRA weight is a graph input with a zero initializer of the same shape."""
    value = lora_inputs(model)[name]
    del value.type.tensor_type.shape.dim[:]
    for size in shape:
        value.type.tensor_type.shape.dim.add().dim_value = size
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(np.zeros(shape, np.float32), name))


def input_shape(value) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def rank1(model) -> None:
    """Every LoRA rank cut to an eighth (rank 8 -> 1): [K, G*r] -> [K, G*r/8], [G*r, N] ->
    [G*r/8, N], [G, r, N] -> [G, r/8, N]; gate/up's Reshape to [.., G, 1, r] follows."""
    for name, value in list(lora_inputs(model).items()):
        shape = input_shape(value)
        if (shape[1] if ".lora_A." in name or len(shape) == 3 else shape[0]) % 8:
            raise SystemExit(f"{name}: rank not a multiple of 8 ({shape}); rank1 cuts it to an eighth")
        if ".lora_A." in name:
            shape[1] //= 8
        elif len(shape) == 2:
            shape[0] //= 8
        else:
            shape[1] //= 8
        set_input_shape(model, name, shape)
    for init in model.graph.initializer:
        if init.name.endswith(".lora.shape_in"):
            shape = numpy_helper.to_array(init).copy()
            shape[-1] //= 8
            init.CopyFrom(numpy_helper.from_array(shape, init.name))


def no_lora(model) -> None:
    """The LoRA paths removed: each base output goes where its LoRA Add's output went."""
    graph = model.graph
    adds = [n for n in graph.node if n.op_type == "Add" and n.name.endswith("/lora/Add")]
    producer = {out: n for n in graph.node for out in n.output}
    rename = {}
    for add in adds:
        base = next(x for x in add.input if "/lora_B/" not in producer[x].name and "/lora/" not in producer[x].name)
        rename[add.output[0]] = base
    kept = [n for n in graph.node if "/lora_A/" not in n.name and "/lora_B/" not in n.name
            and not n.name.endswith(("/lora/Add", "/lora/Reshape_in", "/lora/Reshape_out"))]
    for node in kept:
        for slot, name in enumerate(node.input):
            node.input[slot] = rename.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    names = set(lora_inputs(model))
    for value in [i for i in graph.input if i.name in names]:
        graph.input.remove(value)
    for init in [i for i in graph.initializer if i.name in names]:
        graph.initializer.remove(init)


def retype_input(model, name: str, new_name: str, elem: int, shape: list[int]) -> None:
    """Replace the LoRA weight input ``name`` by ``new_name`` (type ``elem``, ``shape``, zero default)."""
    graph = model.graph
    graph.input.remove(lora_inputs(model)[name])
    for init in [i for i in graph.initializer if i.name == name]:
        graph.initializer.remove(init)
    graph.input.append(helper.make_tensor_value_info(new_name, elem, shape))
    zero = np.zeros(shape, helper.tensor_dtype_to_np_dtype(elem))
    graph.initializer.append(numpy_helper.from_array(zero, new_name))


def int8_dq(model) -> None:
    """Every LoRA MatMul as DynamicQuantizeMatMul: int8 weights (a scale per column) as inputs,
    activations quantized per run; gate/up's stacked B block-diagonal, its Reshapes dropped."""
    graph = model.graph
    inputs = {name: input_shape(value) for name, value in lora_inputs(model).items()}
    rename, nodes = {}, []
    for node in graph.node:
        if node.name.endswith(LORA_RESHAPES):
            rename[node.output[0]] = node.input[0]
            continue
        if node.op_type == "MatMul" and node.input[1] in inputs:
            shape = inputs[node.input[1]]
            if len(shape) == 3:
                shape = [shape[0] * shape[1], shape[0] * shape[2]]
            weight = node.input[1]
            retype_input(model, weight, weight + ".int8", onnx.TensorProto.INT8, shape)
            graph.input.append(helper.make_tensor_value_info(weight + ".scale", onnx.TensorProto.FLOAT, [shape[1]]))
            graph.initializer.append(numpy_helper.from_array(np.zeros(shape[1], np.float32), weight + ".scale"))
            node = helper.make_node("DynamicQuantizeMatMul", [node.input[0], weight + ".int8", weight + ".scale"],
                                    list(node.output), name=node.name + "/int8", domain="com.microsoft")
        nodes.append(node)
    for node in nodes:
        node.input[:] = [rename.get(x, x) for x in node.input]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]


def int8_weights(weights: dict) -> dict:
    """The adapter's weights for int8_dq: per-column symmetric int8 and the scales."""
    out = {}
    for name, value in weights.items():
        value = block_diagonal(value) if value.ndim == 3 else value
        scale = (np.maximum(np.abs(value).max(0), 1e-30) / 127).astype(np.float32)
        out[name + ".int8"] = np.round(value / scale).clip(-127, 127).astype(np.int8)
        out[name + ".scale"] = scale
    return out


def fp16(model) -> None:
    """fp16 LoRA weights: each LoRA path casts its input to fp16 and its product back to fp32."""
    graph = model.graph
    for name, value in lora_inputs(model).items():
        retype_input(model, name, name, onnx.TensorProto.FLOAT16, input_shape(value))
    producer, _ = producers_and_consumers(graph)
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMul" and "/lora_A/" in node.name:
            cast = helper.make_node("Cast", [node.input[0]], [node.name + "/fp16"], name=node.name + "/Cast", to=onnx.TensorProto.FLOAT16)
            nodes.append(cast)
            node.input[0] = cast.output[0]
        if node.op_type == "Add" and node.name.endswith("/lora/Add"):
            delta = next(x for x in node.input if "/lora_B/" in producer[x].name or "/lora/Reshape_out" in producer[x].name)
            cast = helper.make_node("Cast", [delta], [delta + "/fp32"], name=node.name + "/Cast", to=onnx.TensorProto.FLOAT)
            nodes.append(cast)
            node.input[list(node.input).index(delta)] = cast.output[0]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]


def rank1_weights(model):
    """Random weights of rank1's shapes (decode speed does not depend on their values)."""
    rng = np.random.default_rng(1)
    return lambda weights: {name: (rng.standard_normal(input_shape(value)) * 0.01).astype(np.float32)
                            for name, value in lora_inputs(model).items()}


REWRITES = {  # name: (edit of the fused_3d model, the travel adapter's weights for it)
    "rank1": (rank1, None),  # weights: rank1_weights, once the model is edited
    "no_lora": (no_lora, lambda weights: {}),
    "int8_dq": (int8_dq, int8_weights),
    "fp16": (fp16, lambda weights: {k: v.astype(np.float16) for k, v in weights.items()}),
}


def write_bundle(source: Path, model, weights: dict, out: Path) -> None:
    """``source``'s bundle with ``model`` and, if any, ``weights`` as its travel adapter."""
    from modelbuild.ml.genai import ADAPTER_DIR, ADAPTER_SUFFIX, write_adapter

    shutil.copytree(source, out, ignore=shutil.ignore_patterns("model.onnx*", ADAPTER_DIR))
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    if weights:
        write_adapter(weights, out / ADAPTER_DIR / f"travel{ADAPTER_SUFFIX}")


class OneThread:
    """A one-thread onnxruntime session of a bundle, its inputs bound once as OrtValues (as
    onnxruntime-genai binds them: a dict of numpy feeds would add ~1.5 µs per LoRA input per run
    of Python-side conversion, ~0.4 ms for SmolLM2's 240)."""

    def __init__(self, bundle: Path, decode: dict, weights: dict):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        self.session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.arrays = {k: np.ascontiguousarray(v) for k, v in {**decode, **weights}.items()}  # the OrtValues' memory
        self.values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.arrays.items()}
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_output("logits")

    def step_ms(self) -> float:
        started = time.thread_time_ns()
        self.session.run_with_iobinding(self.binding)
        return (time.thread_time_ns() - started) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/adapter_speed/source_grid"))
    parser.add_argument("--steps", type=int, default=400, help="one-thread turns")
    parser.add_argument("--rounds", type=int, default=11, help="og rounds (0: no og measurement)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--past", type=int, default=64)
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    from modelbuild.ml.genai import bundle_adapters, logit_agreement

    bundles = {name: args.work / name for name in ("merged", "fused", "fused_3d")}
    fused_3d = bundles["fused_3d"]
    genai = json.loads((fused_3d / "genai_config.json").read_text())["model"]
    config = {**genai["decoder"], "vocab_size": genai["vocab_size"]}
    weights = {"merged": {}}
    for name in ("fused", "fused_3d"):
        adapter = ort.AdapterFormat.read_adapter(str(bundle_adapters(bundles[name])["travel"]))
        weights[name] = {k: np.array(v.numpy()) for k, v in adapter.get_parameters().items()}  # copies: the views die with the adapter
        del adapter
    decode = decode_feeds(config, args.past, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (edit, adapt) in REWRITES.items():
            model = onnx.load(str(fused_3d / "model.onnx"))
            edit(model)
            weights[name] = (adapt or rank1_weights(model))(weights["fused_3d"])
            bundles[name] = Path(tmp) / name
            write_bundle(fused_3d, model, weights[name], bundles[name])
        nodes = {name: len(onnx.load(str(path / "model.onnx"), load_external_data=False).graph.node)
                 for name, path in bundles.items()}
        ids = Decoder.prompt_ids(fused_3d)  # the chat prompt's logits, with the adapter, against fused_3d's
        reference = prompt_logits(fused_3d, ids, "travel")
        same_function = {name: logit_agreement(reference, prompt_logits(bundles[name], ids, "travel"))
                         for name in ("fused", "int8_dq", "fp16")}
        same_function["no_lora_vs_fused_3d_without_adapter"] = logit_agreement(
            prompt_logits(fused_3d, ids, None), prompt_logits(bundles["no_lora"], ids, None))
        runs = {name: OneThread(path, decode, weights[name]) for name, path in bundles.items()}
        names = list(runs)
        cpu = {name: [] for name in names}
        for _ in range(10):
            for run in runs.values():
                run.step_ms()
        for turn in range(args.steps):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                cpu[name].append(runs[name].step_ms())
        del runs
        speed = {name: [] for name in names}
        if args.rounds:
            decoders = {name: Decoder(path, "travel" if weights[name] else None, args.past) for name, path in bundles.items()}
            for decoder in decoders.values():
                decoder.tokens_per_s(8)
            for round_ in range(args.rounds):
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                    speed[name].append(round(decoders[name].tokens_per_s(args.tokens)[0], 2))
            del decoders
    lora_mb = {name: round(sum(v.nbytes for v in w.values()) / 1e6, 2) for name, w in weights.items()}
    results = {name: {"cpu_ms_median": round(statistics.median(cpu[name]), 3),
                      "cpu_speed_vs_merged_paired": paired(cpu["merged"], cpu[name]),
                      **({"tokens_per_s_median": statistics.median(speed[name]), "tokens_per_s": speed[name],
                          "tokens_per_s_vs_merged_paired": paired(speed[name], speed["merged"])} if args.rounds else {}),
                      "nodes": nodes[name], "lora_weight_mb_per_token": lora_mb[name]} for name in names}
    record = {"what": "SmolLM2 int4 bundle variants (switchable LoRA graph rewrites) against the merged bundle: "
                      "one-thread decode-step CPU time interleaved step by step, og tokens/s in rotating rounds",
              "command": "PYTHONPATH=. .venv/bin/python bench/adapter_overhead.py " + " ".join(sys.argv[1:]),
              "bundles": str(args.work), "steps": args.steps, "rounds": args.rounds, "past": args.past,
              "variants": results, "logits_vs_fused_3d_with_adapter": same_function}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'variant':10s} {'cpu ms':>7s} {'speed':>6s} {'tok/s':>6s} {'speed':>6s} {'nodes':>6s} {'LoRA MB':>8s}")
    for name, r in results.items():
        print(f"{name:10s} {r['cpu_ms_median']:7.2f} {r['cpu_speed_vs_merged_paired']:6.3f} "
              f"{r.get('tokens_per_s_median', 0):6.1f} {r.get('tokens_per_s_vs_merged_paired', 0):6.3f} "
              f"{r['nodes']:6d} {r['lora_weight_mb_per_token']:8.2f}")
    print("logits against fused_3d with the adapter:", json.dumps(same_function))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
