"""Where the switchable adapter's per-token cost goes on SmolLM2's shape: LoRA ops in isolation.

One ONNX graph holds only the fused LoRA paths of SmolLM2-135M's 30 layers (qkv: A [576, 24],
B [24, 960]; o: [576, 8], [8, 576]; gate/up: [576, 16], [16, 3072]; down: [1536, 8], [8, 576]),
random weights, one decode token, one onnxruntime thread, CPU time per run:

- fp32 MatMuls with the weights as initializers (what a merged-in constant would get),
- the same with the weights as graph inputs, bound once through io_binding (how switchable
  adapters arrive),
- 8-bit MatMulNBits (block 32) at accuracy level 4 and 0, as initializers (prepacked: what int8
  LoRA weights would cost if they were constants) and, at level 4, as graph inputs;
- int8 weights as graph inputs through DynamicQuantizeMatMul (activations quantized per run).

Switchable adapter weights arrive as graph inputs, so the low-precision kernels that count are the
graph-input ones: onnxruntime prepacks MatMulNBits only for constant weights and dequantizes an
input B on every run.

gate/up is written block-diagonal here (the bundle stacks it without zeros): an upper bound on
the bytes, the same number of MatMuls.

    .venv/bin/python bench/lora_ops_micro.py --runs 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

GROUPS = [(576, 24, 960), (576, 8, 576), (576, 16, 3072), (1536, 8, 576)]  # (K, rank, N) per fused group
LAYERS = 30
OUT = Path(__file__).resolve().parent / "results" / "lora_ops_micro.json"


def quantize_8bit(w: np.ndarray, block: int = 32):
    """MatMulNBits' 8-bit layout of W [K, N]: B [N, blocks, block] uint8, scales and zero points per block."""
    k, n = w.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    t = padded.T.reshape(n, blocks, block)
    low, high = np.minimum(t.min(-1, keepdims=True), 0), np.maximum(t.max(-1, keepdims=True), 0)
    scale = (high - low) / 255
    scale[scale == 0] = 1
    zero = np.round(-low / scale).clip(0, 255)
    q = np.round(t / scale + zero).clip(0, 255).astype(np.uint8)
    return q, scale.reshape(-1).astype(np.float32), zero.reshape(-1).astype(np.uint8)


def lora_graph(kind: str, accuracy: int, rng) -> object:
    nodes, inits, outs = [], [], []
    for layer in range(LAYERS):
        for g, (k, rank, n) in enumerate(GROUPS):
            a = rng.standard_normal((k, rank)).astype(np.float32) * 0.02
            b = rng.standard_normal((rank, n)).astype(np.float32) * 0.02
            hidden, out = f"h{layer}_{g}", f"y{layer}_{g}"
            for w, rows, cols, x, y in ((a, k, rank, f"x{k}", hidden), (b, rank, n, hidden, out)):
                name = f"w{layer}_{g}_{rows}_{cols}"
                if kind == "fp32":
                    inits.append(numpy_helper.from_array(w, name))
                    nodes.append(helper.make_node("MatMul", [x, name], [y]))
                elif kind == "dynamic_int8":  # int8 per output column, activations quantized per run
                    scale = np.maximum(np.abs(w).max(0), 1e-12) / 127
                    q = np.round(w / scale).clip(-127, 127).astype(np.int8)
                    inits += [numpy_helper.from_array(q, name), numpy_helper.from_array(scale.astype(np.float32), f"{name}_s")]
                    nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, name, f"{name}_s"], [y], domain="com.microsoft"))
                else:
                    q, s, z = quantize_8bit(w)
                    inits += [numpy_helper.from_array(q, name), numpy_helper.from_array(s, f"{name}_s"),
                              numpy_helper.from_array(z, f"{name}_z")]
                    nodes.append(helper.make_node("MatMulNBits", [x, name, f"{name}_s", f"{name}_z"], [y],
                                                  domain="com.microsoft", K=rows, N=cols, bits=8, block_size=32,
                                                  accuracy_level=accuracy))
            outs.append(out)
    nodes.append(helper.make_node("Concat", outs, ["out"], axis=-1))
    graph = helper.make_graph(nodes, "lora", [helper.make_tensor_value_info("x576", TensorProto.FLOAT, [1, 1, 576]),
                                              helper.make_tensor_value_info("x1536", TensorProto.FLOAT, [1, 1, 1536])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def cpu_ms(session, feeds: dict, runs: int, binding=None) -> float:
    run = (lambda: session.run_with_iobinding(binding)) if binding else (lambda: session.run(None, feeds))
    for _ in range(20):
        run()
    started = time.process_time()
    for _ in range(runs):
        run()
    return (time.process_time() - started) / runs * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    feeds = {"x576": rng.standard_normal((1, 1, 576)).astype(np.float32),
             "x1536": rng.standard_normal((1, 1, 1536)).astype(np.float32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    results = {}

    def session(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def with_weights_as_inputs(model) -> float:
        """CPU ms with every weight a graph input bound once (how og.Adapters feeds an adapter)."""
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for init in model.graph.initializer:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        del model.graph.initializer[:]
        as_inputs = session(model)
        binding = as_inputs.io_binding()
        for name, value in {**feeds, **weights}.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
        binding.bind_output("out")
        return cpu_ms(as_inputs, feeds, args.runs, binding)

    results["fp32_initializers_ms"] = cpu_ms(session(lora_graph("fp32", 0, rng)), feeds, args.runs)
    results["fp32_graph_inputs_ms"] = with_weights_as_inputs(lora_graph("fp32", 0, rng))
    for accuracy in (4, 0):
        results[f"int8_matmulnbits_acc{accuracy}_ms"] = cpu_ms(session(lora_graph("int8", accuracy, rng)), feeds, args.runs)
    results["int8_matmulnbits_acc4_graph_inputs_ms"] = with_weights_as_inputs(lora_graph("int8", 4, rng))
    results["int8_dynamic_quantize_matmul_graph_inputs_ms"] = with_weights_as_inputs(lora_graph("dynamic_int8", 0, rng))
    results = {k: round(v, 3) for k, v in results.items()}
    results["lora_matmuls"] = 2 * len(GROUPS) * LAYERS
    results["fp32_weight_mb"] = round(sum(4 * r * (k + n) for k, r, n in GROUPS) * LAYERS / 1e6, 2)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1), "->", OUT)


if __name__ == "__main__":
    main()
