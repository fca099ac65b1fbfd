"""quantize-onnx: int4 weight-only quantization of an fp32 onnxruntime-genai bundle.

onnxruntime's MatMulNBits quantizer (``onnxruntime.quantization.matmul_nbits_quantizer``) turns
every MatMul with a constant 2-D fp32 weight into a ``MatMulNBits`` node holding int4 blocks.
Only MatMuls: the embedding Gather stays float, and a weight the embedding shares with the LM head
(tied embeddings, e.g. SmolLM2: ``Transpose(lm_head weight) -> Gather``) keeps its float copy for
the Gather beside the new int4 copy for the MatMul.

Algorithms (all those this onnxruntime offers that run on CPU without downloads):

- ``rtn``: round to nearest per block; symmetric or asymmetric.
- ``k_quant``: llama.cpp-style k-quant search of each block's scale and minimum (asymmetric).
- ``hqq``: half-quadratic quantization, an optimised scale and float zero point per block
  (asymmetric; runs in torch).
- ``gptq``: GPTQ, each weight row's rounding error compensated on the rows not yet quantized,
  from calibration activations: the project's own JSONL prompt/response records, rendered the
  way generation sees them (never a hub dataset). onnxruntime 1.31's own GPTQ returns plain RTN
  (see ``modelbuild.ml.gptq``), so the GPTQ step is done there, on onnxruntime's activations and node maker.

- ``source_grid``: weights that already lie on a block grid (a base dequantized from a GGUF,
  e.g. this project's SmolLM2, Q4_1 with a Q8_0 embedding) keep that grid's codes and scales,
  8-bit grids exactly; the 4-bit zero point's rounding is corrected from each block's input sum
  (``block_offsets``). Other weights: asymmetric RTN plus the same correction. See
  ``modelbuild.ml.source_grid``. It is the default: on SmolLM2 +1.2 % perplexity, where hqq
  (the only other one that lands near that grid) costs +7 % and decodes at a quarter of the speed.

Left out: ``default`` (the same RTN in C++; ``rtn`` covers it) and ``nvidia_awq`` (needs
NVIDIA modelopt, CUDA and a hub dataset).

Switchable LoRA adapters keep working: a genai-build bundle feeds every LoRA weight through a
graph input with a zero default, which an ``.onnx_adapter`` overrides at run time. Those MatMuls
(named ``.../lora_A/MatMul`` and ``.../lora_B/MatMul``) stay float, and so does any MatMul whose
weight is an overridable graph input. The pass checks afterwards that every adapter parameter is
still a float graph input, then loads the bundle in onnxruntime-genai and generates with no
adapter and with each adapter. ``quantization.json`` records what was quantized and kept float.

rtn, k_quant and hqq are deterministic: the same bundle and params give byte-identical output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.genai import prefill_feeder, verify_bundle
from modelbuild.ml.bundle import copy_rest, decoder_of, external_data_files, files_size, save_decoder
from modelbuild.ml.calibration import calibration_feeds
from modelbuild.ml.precision import matching_nodes, matmul_weights
from modelbuild.ml.weight_only import quantize_matmuls
from modelbuild.passdef import Input, PassDef, param, require

ALGORITHMS = ("source_grid", "rtn", "k_quant", "hqq", "gptq")
NEEDS_CALIBRATION = ("gptq",)
ALWAYS_ASYMMETRIC = ("source_grid", "k_quant", "hqq")  # these fit a zero point per block by construction
LORA_MARKERS = ("/lora_A/", "/lora_B/")
RECORD = "quantization.json"
CHAT = "chat"
BITS = 4


@dataclass(frozen=True)
class Params:
    algorithm: str = param(
        "source_grid", "int4 weight quantizer: source_grid keeps a grid the weights already lie on (a GGUF import), rtn, k_quant and hqq need no data; gptq calibrates on inputs.calibration",
        choices=ALGORITHMS,
    )
    block_size: int = param(32, "weights per int4 block (one scale each, along the input dimension)", choices=(16, 32, 64, 128, 256))
    symmetric: bool = param(True, "symmetric int4 (no zero point) for rtn and gptq; k_quant and hqq always fit a zero point")
    accuracy_level: int = param(
        4, "MatMulNBits compute accuracy level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations on CPU)",
        choices=(0, 1, 2, 3, 4),
    )
    calibration_samples: int = param(16, "gptq: calibration records used, spread evenly over inputs.calibration")
    max_length: int = param(256, "gptq: tokens per calibration record; longer records are truncated")
    template: str = param(
        CHAT, "gptq: record -> text: 'chat' for the bundle's chat template (what generation sees), or a text template with {prompt} and {response}",
    )
    block_offsets: bool = param(True, "source_grid: correct each int4 block's zero-point rounding from its input's block sums (exact on a source grid; one MatMul + Concat per distinct input)")
    exclude_lora: bool = param(True, "keep LoRA MatMuls (.../lora_A/MatMul, .../lora_B/MatMul) float so switchable adapters keep working")
    keep_float: list[str] = param(
        [], "MatMul node names (globs) kept float, e.g. [\"/lm_head/MatMul\"]: a tied LM head then reads the embedding's float copy",
    )
    int8_nodes: list[str] = param(
        [], "MatMul node names (globs) quantized to int8 (RTN, symmetric, same block size) instead of int4, e.g. [\"/lm_head/MatMul\"]",
    )
    check_prompt: str = param("Hello! Who are you?", "prompt generated from, with and without each adapter, to verify the bundle")

    def __post_init__(self):
        for name in ("calibration_samples", "max_length"):
            require(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))


# --- reading the bundle -------------------------------------------------------------------------

def _adapter_parameters(bundle: Path) -> dict[str, dict[str, tuple]]:
    """adapter name -> {parameter name: (shape, numpy dtype name)} of each .onnx_adapter."""
    import onnxruntime as ort

    from modelbuild.ml.genai import bundle_adapters

    found = {}
    for name, path in bundle_adapters(bundle).items():
        try:
            adapter = ort.AdapterFormat.read_adapter(str(path))
        except Exception as error:  # onnxruntime raises plain RuntimeError
            raise UserError(f"inputs.bundle: adapters/{path.name} does not load: {error}") from None
        found[name] = {
            key: (tuple(value.shape()), str(value.numpy().dtype))
            for key, value in adapter.get_parameters().items()
        }
    return found


@dataclass
class Plan:
    matmuls: list[str]  # every MatMul node, graph order
    weights: dict[str, str]  # MatMul -> its weight initializer (constant 2-D float32 only)
    lora: list[str]  # MatMuls named as LoRA
    overridable: list[str]  # MatMuls whose weight is a graph input (an adapter may replace it)
    exclude: list[str]  # kept float on purpose
    int8: list[str]  # quantized to int8 instead of int4
    shared: dict[str, list[str]]  # weight initializer -> other nodes reading it (e.g. tied embeddings)


def _plan(model, params: Params, adapters: dict) -> Plan:
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    names, weights = matmul_weights(model)
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    lora = [n.name for n in matmuls if any(marker in n.name for marker in LORA_MARKERS)]
    overridable = [n.name for n in matmuls if n.input[1] in graph_inputs]
    switched = {key for parameters in adapters.values() for key in parameters}
    if not params.exclude_lora:
        broken = [n.name for n in matmuls if n.name in lora and n.input[1] in switched]
        if broken:
            raise UserError(
                f"params.exclude_lora: false would quantize {len(broken)} LoRA MatMuls whose weights the bundle's "
                f"adapters ({', '.join(sorted(adapters))}) switch at run time; keep it true"
            )
    kept, int8 = matching_nodes(params.keep_float, weights, "keep_float"), matching_nodes(params.int8_nodes, weights, "int8_nodes")
    if kept & int8:
        raise UserError(f"params.int8_nodes: {sorted(kept & int8)[0]} is also in params.keep_float")
    exclude = sorted(set(overridable) | kept | (set(lora) if params.exclude_lora else set()))
    if set(int8) & set(exclude):
        raise UserError(f"params.int8_nodes: {sorted(int8 & set(exclude))[0]} is a LoRA MatMul or has a switchable weight; it stays float")
    if not [name for name in weights if name not in exclude and name not in int8]:
        raise UserError("inputs.bundle: no MatMul with a constant fp32 weight to quantize")
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            if name in initializers:
                readers.setdefault(name, []).append(node.name)
    shared = {
        weight: sorted(set(readers[weight]) - {node})
        for node, weight in weights.items()
        if node not in exclude and len(readers[weight]) > 1
    }
    return Plan(names, weights, lora, overridable, exclude, sorted(int8), shared)


# --- quantizing ---------------------------------------------------------------------------------

def _quantize(model, params: Params, plan: Plan, samples: list[dict] | None, on_step):
    return quantize_matmuls(
        model, params.algorithm, block_size=params.block_size, symmetric=params.symmetric,
        accuracy_level=params.accuracy_level, exclude=plan.exclude, int8=plan.int8,
        weights=plan.weights, samples=samples, on_step=on_step, block_offsets=params.block_offsets,
    )


def _check_result(model, plan: Plan, adapters: dict) -> list[str]:
    """The quantized MatMuls (by original name); fail when an excluded one or an adapter input changed."""
    import onnx

    nodes = {n.name: n for n in model.graph.node}
    quantized = sorted(
        n.name[: -len(f"_Q{BITS}")] for n in model.graph.node
        if n.op_type == "MatMulNBits" and n.name.endswith(f"_Q{BITS}")
    )
    kept_wrong = [name for name in plan.exclude if name not in nodes or nodes[name].op_type != "MatMul"]
    if kept_wrong:
        raise UserError(f"the quantizer changed {len(kept_wrong)} MatMuls it was told to keep float (e.g. {kept_wrong[0]})")
    if not quantized:
        raise UserError("the quantizer quantized no MatMul")
    missing = [name for name in plan.int8 if getattr(nodes.get(f"{name}_Q8"), "op_type", None) != "MatMulNBits"]
    if missing:
        raise UserError(f"the int8 pass did not quantize {len(missing)} of params.int8_nodes (e.g. {missing[0]})")
    inputs = {}
    for value in model.graph.input:
        shape = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
        inputs[value.name] = (shape, onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name)
    for adapter, parameters in adapters.items():
        for key, spec in parameters.items():
            if inputs.get(key) != spec:
                raise UserError(
                    f"adapter '{adapter}': parameter {key} is no longer a {spec[1]} {list(spec[0])} graph input "
                    "after quantization; the adapter would not switch"
                )
    return quantized


def check(params: dict, inputs: dict) -> None:
    """At load: gptq without calibration data would fail only after the upstream stages ran.
    (A plan's algorithm is known only once the plan is built; run() checks that case.)"""
    if params["algorithm"] in NEEDS_CALIBRATION and "calibration" not in inputs and "plan" not in inputs:
        raise UserError(
            f"inputs.calibration: algorithm '{params['algorithm']}' needs calibration data: a JSONL file of "
            'prompt/response records from the project, e.g. inputs.calibration = "data/travel_train.jsonl"'
        )


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    if "plan" in inputs:  # a precision-plan's choice replaces the params it names
        import dataclasses

        from modelbuild.ml.precision import read_plan

        params = dataclasses.replace(params, **read_plan(inputs["plan"]))
        check(dataclasses.asdict(params), {key: value for key, value in inputs.items() if key != "plan"})
    bundle: Path = inputs["bundle"]
    calibration: Path | None = inputs.get("calibration")
    decoder, filename = decoder_of(bundle, "a genai-build target")

    import onnx
    import onnxruntime

    from rich.console import Console

    from modelbuild.core.progress import step_progress

    onnxruntime.set_default_logger_severity(3)  # one warning per overridable (LoRA) initializer
    console = Console(stderr=True)
    with console.status("reading the bundle") as status:
        data_files = external_data_files(onnx.load(str(bundle / filename), load_external_data=False))
        adapters = _adapter_parameters(bundle)
        model = onnx.load(str(bundle / filename))
        plan = _plan(model, params, adapters)
        samples, calibration_record = None, None
        if params.algorithm in NEEDS_CALIBRATION:
            shown = ctx.input_names["calibration"]
            status.update(f"calibration data: {shown}")
            samples, calibration_record = calibration_feeds(
                bundle, calibration, shown, params.template, params.calibration_samples, params.max_length,
                prefill_feeder(model, decoder, "inputs.bundle"))

    with step_progress() as progress:
        steps = len(set(plan.weights) - set(plan.exclude) - set(plan.int8)) + len(samples or ())  # gptq: forward passes, then weights
        bar = progress.add_task(f"{params.algorithm} int4", total=steps)

        def on_step(done: int, total: int | None) -> None:
            progress.update(bar, completed=done, **({"total": total} if total else {}))

        model = _quantize(model, params, plan, samples, on_step)
    quantized = _check_result(model, plan, adapters)

    data_name = data_files[0] if len(data_files) == 1 else f"{Path(filename).name}.data"
    model_files = {filename, *data_files}
    with console.status("writing the quantized bundle") as status:
        save_decoder(model, out_dir / filename, data_name)
        del model
        copy_rest(bundle, out_dir, model_files)
        status.update("verifying: load in onnxruntime-genai, generate with and without each adapter")
        counts = verify_bundle(out_dir, params.check_prompt, "quantized bundle")

    before = files_size(bundle, sorted(model_files))
    after = files_size(out_dir, sorted({filename, data_name}))
    kept = [name for name in plan.matmuls if name not in set(quantized)]
    record = {
        "algorithm": params.algorithm,
        "bits": BITS,
        "block_size": params.block_size,
        "symmetric": params.symmetric and params.algorithm not in ALWAYS_ASYMMETRIC,
        "accuracy_level": params.accuracy_level,
        "matmuls": len(plan.matmuls),
        "quantized": len(quantized),
        "kept_float": {
            "lora": len([n for n in kept if n in set(plan.lora)]),
            "overridable_weight": len([n for n in kept if n in set(plan.overridable) and n not in set(plan.lora)]),
            "other": [n for n in kept if n not in set(plan.lora) and n not in set(plan.overridable)],
        },
        "int8": plan.int8,
        "shared_weights_kept_float": plan.shared,
        "calibration": calibration_record,
        "adapters": sorted(adapters),
        "model_bytes": {"before": before, "after": after, "ratio": round(after / before, 4)},
        "verified_tokens": counts,
        "quantized_matmuls": quantized,
    }
    (out_dir / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


PASS = PassDef(
    name="quantize-onnx",
    version=1,
    doc="int4 weight-only quantization (MatMulNBits: rtn, k_quant, hqq, gptq) of an fp32 genai bundle; LoRA adapters stay switchable",
    params=Params,
    inputs={
        "bundle": Input("fp32 onnxruntime-genai bundle (a genai-build target with params.precision = \"fp32\")"),
        "calibration": Input("JSONL prompt/response records for gptq (the project's own data)", kind="file", required=False),
        "plan": Input("a precision-plan target: its algorithm, block_size, symmetric, accuracy_level and int8_nodes "
                      "replace these params", required=False),
    },
    run=run,
    libraries=("onnx", "onnxruntime", "onnxruntime-genai", "torch"),  # torch: HQQ's arithmetic
    devices=("cpu",),
    check=check,
)
