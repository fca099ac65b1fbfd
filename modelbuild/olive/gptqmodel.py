"""GptqModel (Olive's gptqmodel-library GPTQ pass) -> the gptq mapping (quantizers.gptq:
genai-build fp32 + quantize-onnx gptq at the next ModelBuilder).

GptqModel's defaults are not gptq's: one group per output channel (``group_size`` -1),
symmetric, act-order (``desc_act``) and damping 0.05 (olive/passes/pytorch/gptqmodel.py at
microsoft/Olive ee6f40fb). They are written into the options gptq's handler reads, so it refuses
or notes them exactly as it would the same values given to gptq (per-channel groups are refused:
quantize-onnx's gptq blocks are 16 to 256). The options gptq has no counterpart for are handled
here: ``rotation`` and a non-zero ``mse`` change the quantization (refused), ``damp_auto_increment``
only how a failing Cholesky retries (noted as not carried over).
"""

from __future__ import annotations

from . import quantizers
from .chain import Chain, Options
from .workflow import PassEntry

DEFAULTS = {"bits": 4, "group_size": -1, "sym": True, "desc_act": True, "damp_percent": 0.05}


def gptqmodel(chain: Chain, e: PassEntry, o: Options) -> None:
    rotation = o.get("rotation", (str,))
    if rotation:
        return chain.unsupported(o.path("rotation"), f"rotation {rotation!r} (QuaRot/SpinQuant before GPTQ): quantize-onnx gptq quantizes the model as it is")
    mse = o.get("mse", (int, float), 0.0)
    if mse:
        return chain.unsupported(o.path("mse"), f"mse {mse}: quantize-onnx gptq uses min/max scales, not an MSE grid search")
    options = {**DEFAULTS, **{k: v for k, v in e.options.items() if k not in ("rotation", "mse")}}
    entry = PassEntry(e.key, e.type, options, e.path)
    inner = Options(chain, entry)
    inner.note("damp_auto_increment")
    quantizers.gptq(chain, entry, inner)
