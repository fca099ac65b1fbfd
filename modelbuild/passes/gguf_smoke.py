"""gguf-smoke: answer a few prompts through llama.cpp with a gguf-export target, each adapter off and on.

The same reading as ``smoke`` for the genai bundle, for the llama.cpp runtime: the prompt goes
through the GGUF's own chat template, llama.cpp tokenizes it and decodes greedily; the build
fails when nothing is generated and (by default) when an adapter changes no generated token.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelbuild import UserError
from modelbuild.passdef import Input, PassDef
from modelbuild.ml.shipping import BASE, SmokeParams as Params, write_answers


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    from modelbuild.core.progress import step_progress
    from modelbuild.ml.llama import Runner

    folder: Path = inputs["gguf"]
    record_path = folder / "modelbuild.json"
    if not record_path.is_file():
        raise UserError("inputs.gguf: no modelbuild.json: not a gguf-export output")
    record = json.loads(record_path.read_text())
    variants = {BASE: None, **{name: folder / path for name, path in record["adapters"].items()}}
    answers: dict[str, dict[str, str]] = {prompt: {} for prompt in params.prompts}
    tokens: dict[str, dict[str, list[int]]] = {prompt: {} for prompt in params.prompts}
    with step_progress() as progress:
        bar = progress.add_task("llama.cpp smoke answers", total=len(params.prompts) * len(variants))
        for variant, adapter in variants.items():
            runner = Runner(folder / record["base"], adapter, threads=ctx.threads)
            for prompt in params.prompts:
                ids = runner.generate(prompt, params.max_new_tokens)
                if not ids:
                    raise UserError(f"llama.cpp generated no token for {prompt!r} (adapter {variant})")
                tokens[prompt][variant] = ids
                answers[prompt][variant] = runner.text(ids).strip()
                progress.advance(bar)
            runner.close()
    if params.require_adapter_effect:
        for variant in list(variants)[1:]:
            if all(tokens[p][variant] == tokens[p][BASE] for p in params.prompts):
                raise UserError(f"adapter '{variant}' changes no token llama.cpp generates: the adapter has no effect")
    write_answers(out_dir, answers)


PASS = PassDef(
    name="gguf-smoke",
    version=1,
    doc="greedy answers through llama.cpp from a gguf-export target, each adapter off and on",
    params=Params,
    inputs={"gguf": Input("gguf-export target (GGUF base + GGUF LoRA adapters)")},
    run=run,
    libraries=("llama-cpp-python",),
)
