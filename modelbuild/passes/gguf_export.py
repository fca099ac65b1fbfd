"""gguf-export: HF base (+ LoRA adapters) -> a GGUF base and one GGUF LoRA adapter each, checked in llama.cpp.

The recipe:

1. the base becomes ``model-<precision>.gguf`` (modelbuild/ml/gguf_write.py): llama.cpp's
   tensor layout, the tokenizer and chat template carried; a base imported from a quantized
   GGUF keeps its source grid (its blocks written back bit for bit);
2. each adapter becomes ``adapters/<name>.gguf`` in the layout of llama.cpp's
   ``convert_lora_to_gguf.py``, applied at run time on top of the same base file;
3. llama.cpp (llama-cpp-python) loads what was written, with each adapter off and on, and its
   next-token logits on the check prompt are compared with torch fp32 (the base, and the base +
   peft adapter): Pearson correlation and top-1 agreement over the prompt's positions, as
   genai-build checks its bundle, plus the correlation of the adapter's own effect (on - off),
   which a misplaced LoRA tensor breaks while the totals still look fine. llama.cpp's own
   tokenization of the prompt must equal the HF tokenizer's. Any miss fails the stage in one
   line and nothing is written;
4. next to them, an Ollama ``Modelfile`` (modelbuild/ml/ollama.py): FROM the base, ADAPTER the
   adapter, the chat template translated to Ollama's TEMPLATE, its stop tokens. One adapter (or
   none): ``Modelfile``; several: ``Modelfile.<name>`` each (Ollama takes one ADAPTER per model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.shipping import check_adapter_names
from modelbuild.passdef import Input, PassDef, param, require

ADAPTER_DIR = "adapters"
RECORD = "modelbuild.json"
# (min logit correlation, min top-1 agreement) with torch fp32 on the check prompt, per precision.
# Measured by bench/gguf_bounds.py (two prompts, docs/passes.md): lowest of SmolLM2-135M and the
# tiny random Phi3, source grid off: f16 1.0000 / 100 %, q8_0 0.9986 / 92 %, q4_1 0.9835 / 75 %,
# q4_0 0.894 / 50 % (SmolLM2's kept Q4_1 grid: 0.9990 / 92 %); the bounds leave a margin below.
# A q rotary permutation left out, or LoRA B rows out of order, gives 0.07-0.09 (refused).
BOUNDS = {"f16": (0.999, 0.9), "q8_0": (0.995, 0.8), "q4_0": (0.8, 0.3), "q4_1": (0.9, 0.5)}
# The adapter's own effect (logits on - off) vs peft's: 0.991 (tiny), 0.994 (SmolLM2) measured.
MIN_ADAPTER_CORRELATION = 0.9


@dataclass(frozen=True)
class Params:
    precision: str = param("q4_1", "weight type of the base's matrices (what the gguf package can write)",
                           choices=("f16", "q8_0", "q4_0", "q4_1"))
    keep_source_grid: bool = param(
        True, "a weight whose values lie exactly on a Q4_0/Q4_1/Q8_0 grid (a base imported from a GGUF) is written "
        "in that type, bit for bit, whatever the precision")
    pre_tokenizer: str = param("", "llama.cpp pre-tokenizer name (tokenizer.ggml.pre); empty: read from tokenizer.json")
    check_prompt: str = param("Hello! Who are you?", "prompt whose logits llama.cpp must match torch fp32 on")
    min_correlation: float = param(-1.0, "smallest logit correlation with torch fp32 (-1: the precision's BOUNDS)")
    min_top1: float = param(-1.0, "smallest share of positions whose top token agrees with torch fp32 (-1: BOUNDS)")
    min_adapter_correlation: float = param(
        MIN_ADAPTER_CORRELATION, "smallest correlation of each adapter's effect on the logits (on - off) with torch's")

    def __post_init__(self):
        require(self.min_correlation == -1 or 0 <= self.min_correlation <= 1, "min_correlation", "-1 or in [0, 1]",
                self.min_correlation)
        require(self.min_top1 == -1 or 0 <= self.min_top1 <= 1, "min_top1", "-1 or in [0, 1]", self.min_top1)
        require(-1 <= self.min_adapter_correlation <= 1, "min_adapter_correlation", "in [-1, 1]",
                self.min_adapter_correlation)

    def bounds(self) -> tuple[float, float]:
        correlation, top1 = BOUNDS[self.precision]
        return (correlation if self.min_correlation == -1 else self.min_correlation,
                top1 if self.min_top1 == -1 else self.min_top1)


def base_file(precision: str) -> str:
    return f"model-{precision}.gguf"


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    from rich.console import Console

    from modelbuild.ml.genai import logit_agreement
    from modelbuild.ml.gguf_write import write_base, write_lora
    from modelbuild.ml.hf import probe_ids, torch_logits
    from modelbuild.ml.llama import Runner, torch_adapter_logits

    base: Path = inputs["base"]
    adapters: dict[str, Path] = inputs.get("adapters") or {}
    config = json.loads((base / "config.json").read_text())
    with Console(stderr=True).status("") as status:
        status.update("torch fp32 logits on the check prompt, to check llama.cpp against")
        ids = probe_ids(base, params.check_prompt)
        expected = {None: torch_logits(base, ids)}
        for name, adapter in adapters.items():
            expected[name] = torch_adapter_logits(base, adapter, ids)

        status.update(f"writing the {params.precision} GGUF base")
        model = out_dir / base_file(params.precision)
        written = write_base(base, model, params.precision, params.keep_source_grid, params.pre_tokenizer)
        lora = {}
        if adapters:
            (out_dir / ADAPTER_DIR).mkdir()
        for name, adapter in adapters.items():
            status.update(f"writing the GGUF LoRA adapter '{name}'")
            lora[name] = write_lora(adapter, config, out_dir / ADAPTER_DIR / f"{name}.gguf")

        status.update("llama.cpp: the base, on the check prompt")
        checks = {}
        runner = Runner(model, threads=ctx.threads)
        text = _prompt_text(base, params.check_prompt)
        if runner.tokenize(text) != ids:
            raise UserError(f"llama.cpp tokenizes the check prompt differently from the HF tokenizer "
                            f"({runner.tokenize(text)[:12]}... vs {ids[:12]}...): set params.pre_tokenizer")
        got = {None: runner.logits(ids)}
        runner.close()
        checks["(base)"] = _check(logit_agreement(expected[None], got[None]), params, "base")
        for name in adapters:
            status.update(f"llama.cpp: the base with adapter '{name}'")
            runner = Runner(model, out_dir / ADAPTER_DIR / f"{name}.gguf", threads=ctx.threads)
            got[name] = runner.logits(ids)
            runner.close()
            agreement = _check(logit_agreement(expected[name], got[name]), params, f"adapter '{name}'")
            effect = logit_agreement(expected[name] - expected[None], got[name] - got[None])
            agreement["adapter_effect_correlation"] = effect["correlation"]
            agreement["adapter_effect_max_abs"] = round(float(abs(got[name] - got[None]).max()), 6)
            if not effect["correlation"] >= params.min_adapter_correlation:
                raise UserError(f"adapter '{name}' in llama.cpp does not move the logits as peft does: correlation of "
                                f"the effect {effect['correlation']:.3f} (min {params.min_adapter_correlation:g})")
            checks[name] = agreement
        status.update("Ollama Modelfile")
        _write_modelfiles(model, adapters, out_dir)
    (out_dir / RECORD).write_text(json.dumps({
        "precision": params.precision,
        "base": model.name,
        "adapters": {name: f"{ADAPTER_DIR}/{name}.gguf" for name in sorted(adapters)},
        "written": written,
        "lora": lora,
        "check_tokens": len(ids),
        "vs_torch_fp32": checks,
    }, indent=1, sort_keys=True) + "\n")


def _write_modelfiles(model: Path, adapters: dict, out_dir: Path) -> None:
    from modelbuild.ml.ollama import gguf_chat_settings, modelfile

    template, bos, eos = gguf_chat_settings(model)
    if len(adapters) <= 1:
        adapter = f"./{ADAPTER_DIR}/{next(iter(adapters))}.gguf" if adapters else None
        (out_dir / "Modelfile").write_text(modelfile(f"./{model.name}", adapter, template, bos_token=bos, eos_token=eos))
        return
    for name in adapters:
        (out_dir / f"Modelfile.{name}").write_text(
            modelfile(f"./{model.name}", f"./{ADAPTER_DIR}/{name}.gguf", template, bos_token=bos, eos_token=eos))


def _prompt_text(base: Path, prompt: str) -> str:
    """The check prompt as probe_ids renders it (chat template, generation prompt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if not tokenizer.chat_template:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def _check(agreement: dict, params: Params, what: str) -> dict:
    min_correlation, min_top1 = params.bounds()
    if not (agreement["correlation"] >= min_correlation and agreement["top1_agreement"] >= min_top1):
        raise UserError(f"llama.cpp ({what}, {params.precision}) does not follow torch fp32 on the check prompt: logit "
                        f"correlation {agreement['correlation']:.3f} (min {min_correlation:g}), top-1 agreement "
                        f"{agreement['top1_agreement']:.0%} (min {min_top1:.0%})")
    return agreement


PASS = PassDef(
    name="gguf-export",
    version=1,
    doc="GGUF base (f16/q8_0/q4_0/q4_1, source grid kept) + one GGUF LoRA per adapter, checked in llama.cpp vs torch",
    params=Params,
    inputs={
        "base": Input("HF model folder (an import target)"),
        "adapters": Input("LoRA adapters by name (lora-finetune targets)", required=False, named=True),
    },
    run=run,
    libraries=("torch", "transformers", "peft", "gguf", "llama-cpp-python"),
    check=check_adapter_names,
)
