"""fixed-shape: dynamic dimensions made fixed (Olive's ``DynamicToFixedShape``), for runtimes that
want static shapes (NPUs, some execution providers), on an ONNX model folder or a genai bundle.

Either ``dim_param`` + ``dim_value`` (every dimension of that symbolic name, anywhere in the
graph, becomes that size) or ``input_name`` + ``input_shape`` (those graph inputs get that exact
shape; a symbolic dimension among them is fixed graph-wide), as Olive does it: onnxruntime's own
``onnx_model_utils.make_dim_param_fixed`` / ``make_input_shape_fixed``, then symbolic shape
inference to fix the graph outputs' shapes where it can. A name or input the graph does not have
is an error (Olive passes it by in silence), and so is a fixed size that contradicts one given.

Checked before it counts as built: onnxruntime runs the fixed graph at its own (now fixed) input
shapes, dims still symbolic taken as batch 1, no past, the probe length otherwise; the input
graph runs on the same feeds, and the logits must agree within ``max_logit_diff`` (they are the
same computation: measured exactly equal on the tiny model). Fixed dims are recorded in
``fixed_shape.json`` with every graph input's and output's shape before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError, say
from modelbuild.ml.bundle import onnx_input, save_like_input
from modelbuild.ml.onnx_models import compare, load_model, probe_ids, rounded, session, status, write_record
from modelbuild.passdef import Input, PassDef, param

RECORD = "fixed_shape.json"


@dataclass(frozen=True)
class Params:
    dim_param: list[str] = param([], "symbolic dimension names to fix graph-wide (with dim_value)")
    dim_value: list[int] = param([], "the size of each dim_param (>= 0)")
    input_name: list[str] = param([], "graph inputs whose shape to fix (with input_shape)")
    input_shape: list[list[int]] = param([], "the shape of each input_name (every size > 0)")
    max_logit_diff: float = param(1e-5, "largest |logit| difference allowed between the input and the fixed graph at the fixed shapes")

    def __post_init__(self):  # Olive's _jointly_validate_configs, as one-line errors
        if self.dim_param and self.input_name:
            raise ValueError("params.dim_param: cannot be set together with params.input_name")
        if not self.dim_param and not self.input_name:
            raise ValueError("params.dim_param: give dim_param + dim_value or input_name + input_shape")
        if len(self.dim_param) != len(self.dim_value):
            raise ValueError(f"params.dim_value: {len(self.dim_value)} values for {len(self.dim_param)} dim_param names")
        if len(self.input_name) != len(self.input_shape):
            raise ValueError(f"params.input_shape: {len(self.input_shape)} shapes for {len(self.input_name)} input names")
        if any(v < 0 for v in self.dim_value):
            raise ValueError(f"params.dim_value: every value must be >= 0, got {self.dim_value}")
        if any(any(v <= 0 for v in shape) for shape in self.input_shape):
            raise ValueError(f"params.input_shape: every size must be > 0, got {self.input_shape}")
        if not self.max_logit_diff > 0:
            raise ValueError(f"params.max_logit_diff: must be positive, got {self.max_logit_diff}")


def shapes(values) -> dict[str, list]:
    """name -> [size or symbolic name or None] of graph inputs/outputs."""
    out = {}
    for value in values:
        dims = value.type.tensor_type.shape.dim
        out[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return out


def _fix(model, params: Params) -> None:
    from onnxruntime.tools.onnx_model_utils import is_fixed_size_tensor, make_dim_param_fixed, make_input_shape_fixed
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    graph = model.graph
    named = {d.dim_param for v in [*graph.input, *graph.output, *graph.value_info] for d in v.type.tensor_type.shape.dim if d.dim_param}
    for name, value in zip(params.dim_param, params.dim_value):
        if name not in named:
            raise UserError(f"params.dim_param: the graph has no dimension named {name!r} (it has {', '.join(sorted(named)) or 'none'})")
        make_dim_param_fixed(graph, name, value)
    inputs = {value.name for value in graph.input}
    for name, shape in zip(params.input_name, params.input_shape):
        if name not in inputs:
            raise UserError(f"params.input_name: the graph has no input {name!r} (inputs: {', '.join(sorted(inputs))})")
        try:
            make_input_shape_fixed(graph, name, shape)
        except ValueError as error:
            raise UserError(f"params.input_shape: {name}: {error}") from None
    try:  # Olive's _fix_output_shapes
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception as error:  # the inference raises anything on ops it does not know
        raise UserError(f"symbolic shape inference failed on the fixed graph: {type(error).__name__}: {str(error).strip()[:200]}") from None
    for index, output in enumerate(graph.output):
        if not is_fixed_size_tensor(output) and is_fixed_size_tensor(inferred.graph.output[index]):
            output.type.tensor_type.shape.CopyFrom(inferred.graph.output[index].type.tensor_type.shape)


def _feeds(model, length: int, vocab: int, decoder: dict | None) -> dict:
    """Inputs at the fixed graph's own shapes (symbolic leftovers: batch 1, past 0, a bundle's KV
    heads and head size from genai_config.json, else ``length``)."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    initializers = {init.name for init in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = []
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                name = d.dim_param or ""
                dims.append(1 if "batch" in name else 0 if "past" in name else length)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, vocab, size=dims).astype(dtype)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones(dims, dtype=dtype)
        elif value.name == "position_ids":
            feeds[value.name] = np.broadcast_to(np.arange(dims[-1], dtype=dtype), dims).copy()
        elif "past" in value.name or "cache" in value.name:
            if decoder is not None and len(dims) == 4:  # [batch, kv heads, past length, head size]
                fixed = [d.HasField("dim_value") for d in value.type.tensor_type.shape.dim]
                dims = [dims[0], dims[1] if fixed[1] else decoder["num_key_value_heads"], dims[2] if fixed[2] else 0,
                        dims[3] if fixed[3] else decoder["head_size"]]
            feeds[value.name] = np.zeros(dims, dtype=dtype)
        else:
            raise UserError(f"inputs.model: graph input '{value.name}' is none of input_ids, attention_mask, position_ids or the KV cache")
    return feeds


def _logits(path: Path, feeds: dict, threads: int, what: str):
    import numpy as np

    try:
        sess = session(path, threads)
        names = [o.name for o in sess.get_outputs()]
        return [np.asarray(sess.run(["logits" if "logits" in names else names[0]], feeds)[0], dtype=np.float64)]
    except Exception as error:  # onnxruntime: shapes that do not fit the graph
        raise UserError(f"{what}: onnxruntime cannot run it at the fixed shapes: {str(error).strip().splitlines()[0]}") from None


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    source: Path = inputs["model"]
    decoder, source_file, filename = onnx_input(source, "a genai-build or quantize-onnx target")
    is_bundle = decoder is not None
    with status() as line:
        line.update(f"fixed-shape: {source_file.name}")
        model = load_model(source_file)
        before = {"inputs": shapes(model.graph.input), "outputs": shapes(model.graph.output)}
        _fix(model, params)
        after = {"inputs": shapes(model.graph.input), "outputs": shapes(model.graph.output)}
        probes = probe_ids(source)
        vocab = max(max(p) for p in probes) + 1
        feeds = _feeds(model, len(probes[0]), vocab, decoder)
        line.update("saving the fixed graph")
        save_like_input(model, source, source_file, filename, is_bundle, out_dir)
        del model
        line.update("checking: onnxruntime logits of the input and the fixed graph at the fixed shapes")
        reference = _logits(source_file, feeds, ctx.threads, "inputs.model")
        got = _logits(out_dir / filename, feeds, ctx.threads, "fixed graph")
    stats = compare(reference, got)
    if not stats["finite"] or not stats["max_abs_diff"] <= params.max_logit_diff:
        raise UserError(f"the fixed graph's logits differ from the input's: max |dlogit| {stats['max_abs_diff']:.3g} "
                        f"> params.max_logit_diff {params.max_logit_diff:g}")
    fixed = {name: shape for name, shape in after["inputs"].items() if shape != before["inputs"].get(name)}
    say(f"'{ctx.target}': fixed {', '.join(f'{k} {v}' for k, v in fixed.items()) or 'no input'}; logits match to max |dlogit| {stats['max_abs_diff']:.2g}")
    write_record(out_dir, RECORD, {
        "before": before,
        "after": after,
        "check": {**rounded(stats), "max_logit_diff": params.max_logit_diff, "feeds": {k: list(v.shape) for k, v in feeds.items()}},
    })


PASS = PassDef(
    name="fixed-shape",
    version=1,
    doc="dynamic dimensions fixed (Olive's DynamicToFixedShape: dim_param/dim_value or input_name/input_shape) on an ONNX folder or genai bundle; checked with onnxruntime at the fixed shapes",
    params=Params,
    inputs={"model": Input("ONNX model folder (onnx-export, graph-optimize) or onnxruntime-genai bundle")},
    run=run,
    libraries=("onnx", "onnxruntime", "tokenizers", "numpy"),
)
