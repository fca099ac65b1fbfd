"""smoke: answer a few prompts with a genai bundle, with and without each adapter.

The answers are a build output (answers.json, answers.md) that a person reads before shipping.
The build fails when the bundle cannot load or generate, and (by default) when an adapter does
not change a single generated token: a switch that switches nothing is a broken bundle.
"""

from __future__ import annotations

from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.shipping import BASE, SmokeParams as Params, write_answers
from modelbuild.passdef import Input, PassDef

def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    from modelbuild.ml.genai import Chat
    from modelbuild.core.progress import step_progress

    try:
        chat = Chat(inputs["bundle"])
    except Exception as error:  # onnxruntime-genai raises plain RuntimeError
        raise UserError(f"bundle does not load in onnxruntime-genai: {error}") from None
    variants = [None, *chat.adapter_names]
    answers: dict[str, dict[str, str]] = {}
    tokens: dict[str, dict[str, list[int]]] = {}
    with step_progress() as progress:
        bar = progress.add_task("smoke answers", total=len(params.prompts) * len(variants))
        for prompt in params.prompts:
            answers[prompt], tokens[prompt] = {}, {}
            for adapter in variants:
                ids = chat.generate(prompt, adapter, params.max_new_tokens)
                if not ids:
                    raise UserError(f"no tokens generated for {prompt!r} (adapter {adapter or BASE})")
                tokens[prompt][adapter or BASE] = ids
                answers[prompt][adapter or BASE] = chat.tokenizer.decode(ids).strip()
                progress.advance(bar)
    if params.require_adapter_effect:
        for adapter in chat.adapter_names:
            if all(tokens[p][adapter] == tokens[p][BASE] for p in params.prompts):
                raise UserError(f"adapter '{adapter}' changes no generated token: the switch has no effect")
    write_answers(out_dir, answers)


PASS = PassDef(
    name="smoke",
    version=1,
    doc="greedy answers from a genai bundle with and without each adapter; fails if it cannot generate",
    params=Params,
    inputs={"bundle": Input("onnxruntime-genai bundle (a genai-build target)")},
    run=run,
    libraries=("onnxruntime", "onnxruntime-genai"),
    devices=("cpu", "cuda"),
)
