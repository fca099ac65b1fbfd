"""Where the switchable adapter's decode cost goes inside the bundle: bytes, ops, or packing (issue #11).

Takes the merged and fused bundles that ``bench/adapter_speed.py`` built (``--work``, default
/tmp/adapter_speed/source_grid) and times one decode step (plain onnxruntime, one thread, thread
CPU time, ``--past`` tokens of KV cache) of:

  merged        the merged bundle (no LoRA)
  fused         the switchable bundle as genai-build makes it (lora_graph.fuse_lora)
  rank1         fused with every LoRA rank cut to an eighth (the travel adapter's rank 8 -> 1): the
                same ops, 1/8 of the LoRA bytes
  no_lora       fused with the LoRA paths removed: its packed bases alone
  gemm_2d       fused rewritten to run the decoder on 2-D [tokens, hidden] tensors, so that each
                lora_B MatMul and its Add become one Gemm (C = the base output) and gate/up's
                B is block-diagonal: 4 fewer ops per layer, 2 Reshapes more around attention

The variants take turns step by step (``--steps`` turns, the order rotating each turn), so a
drift of the machine's speed hits them alike; each ratio is the median of the per-turn ratios to
merged. So fused - rank1 is what 7/8 of the LoRA weights' bytes (and their multiply-adds) cost,
rank1 - no_lora what the LoRA ops cost at 1/8 of the bytes, no_lora - merged what packing the
bases saved. Random LoRA weights of the bundle's shapes are fed as inputs (speed does not depend
on their values); gemm_2d gets the same ones as fused (gate/up's laid out block-diagonally) and
must give the same logits, as no_lora must give fused's without an adapter: the record says how
close they came. (gemm_2d sums gate/up's LoRA product in another order than fused's batched
MatMul; the int4 MatMulNBits quantize their input to 8 bits per block, so a last-bit difference
can flip a rounding and grow over 30 layers: its logits match by correlation, not to the bit.)

    PYTHONPATH=. .venv/bin/python bench/adapter_overhead.py [--work /tmp/adapter_speed/source_grid]

Writes bench/results/adapter_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench/results/adapter_overhead.json"
sys.path.insert(0, str(REPO / "bench"))

from adapter_speed import decode_feeds, paired  # noqa: E402  (one decode input for every variant)


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


def gemm_2d(model, hidden: int, vocab: int) -> None:
    """Run the decoder on [tokens, hidden]: the embedding output and each attention output are
    flattened to 2-D, the packed q/k/v back to 3-D for GroupQueryAttention and the logits at the
    end; every lora_B MatMul + Add becomes Gemm(t, B, C=base), gate/up's stacked B block-diagonal."""
    graph = model.graph
    del graph.value_info[:]
    qkv_width = next(input_shape(v)[-1] for n, v in lora_inputs(model).items() if "qkv_proj.lora_B" in n)
    for name, value in (("flat.shape", [-1, hidden]), ("qkv.width", [qkv_width]), ("vocab", [vocab])):
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    nodes = [helper.make_node("Shape", ["input_ids"], ["batch_seq"], name="/flat/Shape"),
             helper.make_node("Concat", ["batch_seq", "qkv.width"], ["qkv.shape"], name="/flat/qkv_shape", axis=0),
             helper.make_node("Concat", ["batch_seq", "vocab"], ["logits.shape"], name="/flat/logits_shape", axis=0)]
    rename = {}
    for node in graph.node:
        if node.name.endswith(("/lora/Reshape_in", "/lora/Reshape_out")):
            rename[node.output[0]] = node.input[0]
            continue
        if node.op_type == "Concat" and node.name.endswith("/block_sums/Concat"):  # [x, block sums]: any rank
            for attribute in node.attribute:
                if attribute.name == "axis":
                    attribute.i = -1
        node.input[:] = [rename.get(x, x) for x in node.input]
        nodes.append(node)
        embedding = node.name.startswith("/model/embed_tokens/") and node.op_type in ("Gather", "GatherBlockQuantized")
        if embedding or node.op_type == "GroupQueryAttention":
            flat = node.output[0] + "/flat"
            nodes.append(helper.make_node("Reshape", [node.output[0], "flat.shape"], [flat], name=node.name + "/flat"))
            rename[node.output[0]] = flat
    consumers = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    final, dropped = [], set()
    for node in nodes:
        if id(node) in dropped:
            continue
        if node.op_type == "MatMul" and "/lora_B/" in node.name:
            add = consumers[node.output[0]][0]
            dropped.add(id(add))
            base = next(x for x in add.input if x != node.output[0])
            if "/qkv_proj/" in node.name:
                final.append(helper.make_node("Gemm", [node.input[0], node.input[1], base], [add.output[0] + "/flat"], name=node.name + "/Gemm"))
                final.append(helper.make_node("Reshape", [add.output[0] + "/flat", "qkv.shape"], [add.output[0]], name=node.name + "/3d"))
            else:
                final.append(helper.make_node("Gemm", [node.input[0], node.input[1], base], [add.output[0]], name=node.name + "/Gemm"))
            continue
        if node.op_type == "MatMulNBits" and node.output[0] == "logits":
            node.output[0] = "logits/flat"
        final.append(node)
    final.append(helper.make_node("Reshape", ["logits/flat", "logits.shape"], ["logits"], name="/flat/logits"))
    del graph.node[:]
    graph.node.extend(final)
    for name, value in list(lora_inputs(model).items()):
        shape = input_shape(value)
        if len(shape) == 3:  # [G, r, N] -> block-diagonal [G*r, G*N]
            set_input_shape(model, name, [shape[0] * shape[1], shape[0] * shape[2]])


def block_diagonal(stacked):
    """[G, r, N] -> [G*r, G*N] with the G blocks on the diagonal (gemm_2d's gate/up B)."""
    groups, rank, width = stacked.shape
    out = np.zeros((groups * rank, groups * width), stacked.dtype)
    for g in range(groups):
        out[g * rank:(g + 1) * rank, g * width:(g + 1) * width] = stacked[g]
    return out


def session(model_path: Path, decode: dict, rng):
    """A one-thread session and its feeds: ``decode`` plus random LoRA weights of its shapes."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    run = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feeds = dict(decode)
    for value in run.get_overridable_initializers():  # the LoRA weights: inputs with zero defaults
        if ".lora_" in value.name:
            feeds[value.name] = (rng.standard_normal(value.shape) * 0.01).astype(np.float32)
    return run, feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/adapter_speed/source_grid"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--past", type=int, default=64)
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    merged, fused = args.work / "merged", args.work / "fused"
    genai = json.loads((fused / "genai_config.json").read_text())["model"]
    config = {**genai["decoder"], "vocab_size": genai["vocab_size"]}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"merged": merged / "model.onnx", "fused": fused / "model.onnx"}
        for name, edit in (("rank1", rank1), ("no_lora", no_lora),
                           ("gemm_2d", lambda m: gemm_2d(m, config["hidden_size"], config["vocab_size"]))):
            model = onnx.load(str(fused / "model.onnx"))
            edit(model)
            paths[name] = Path(tmp) / name / "model.onnx"
            paths[name].parent.mkdir()
            onnx.save(model, str(paths[name]), save_as_external_data=True, location="model.onnx.data")
        decode = decode_feeds(config, args.past, rng)
        runs = {name: session(path, decode, rng) for name, path in paths.items()}
        nodes = {name: len(onnx.load(str(path), load_external_data=False).graph.node) for name, path in paths.items()}
        lora_mb = {name: round(sum(int(np.prod(v.shape)) * 4 for k, v in feeds.items() if ".lora_" in k) / 1e6, 2)
                   for name, (_, feeds) in runs.items()}
        for run, feeds in runs.values():
            for _ in range(10):
                run.run(["logits"], feeds)
        fused_feeds = runs["fused"][1]
        runs["gemm_2d"][1].update({k: block_diagonal(v) if v.ndim == 3 else v for k, v in fused_feeds.items() if ".lora_" in k})
        logits = {name: runs[name][0].run(["logits"], runs[name][1])[0] for name in ("fused", "gemm_2d")}
        without = {k: v for k, v in fused_feeds.items() if ".lora_" not in k}  # the zero defaults: no adapter
        same_function = {"gemm_2d_vs_fused": float(np.abs(logits["gemm_2d"] - logits["fused"]).max()),
                         "gemm_2d_vs_fused_correlation": float(np.corrcoef(logits["gemm_2d"].ravel(), logits["fused"].ravel())[0, 1]),
                         "no_lora_vs_fused_without_adapter": float(np.abs(
                             runs["no_lora"][0].run(["logits"], runs["no_lora"][1])[0] - runs["fused"][0].run(["logits"], without)[0]).max()),
                         "logit_scale": float(np.abs(logits["fused"]).max())}
        names = list(runs)
        times = {name: [] for name in runs}
        for turn in range(args.steps):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                run, feeds = runs[name]
                started = time.thread_time_ns()
                run.run(["logits"], feeds)
                times[name].append((time.thread_time_ns() - started) / 1e6)
    results = {name: {"cpu_ms_median": round(statistics.median(t), 3),
                      "speed_vs_merged_paired": paired(times["merged"], t),
                      "nodes": nodes[name], "lora_weight_mb_per_token": lora_mb[name]} for name, t in times.items()}
    record = {"what": "one-thread decode-step CPU time of SmolLM2 int4 bundle variants, interleaved step by step",
              "command": "PYTHONPATH=. .venv/bin/python bench/adapter_overhead.py " + " ".join(sys.argv[1:]),
              "bundles": str(args.work), "steps": args.steps, "past": args.past, "variants": results,
              "max_abs_logit_difference": same_function}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'variant':10s} {'cpu ms':>7s} {'speed':>6s} {'nodes':>6s} {'LoRA MB':>8s}")
    for name, r in results.items():
        print(f"{name:10s} {r['cpu_ms_median']:7.2f} {r['speed_vs_merged_paired']:6.3f} {r['nodes']:6d} {r['lora_weight_mb_per_token']:8.2f}")
    print("logits of the rewrites that compute the same function:", same_function)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
