"""Generation with onnxruntime-genai, shared by the genai-build check, the smoke pass and `chat`."""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"


def bundle_adapters(bundle: Path) -> dict[str, Path]:
    """name -> .onnx_adapter file of a bundle built by genai-build."""
    folder = Path(bundle) / ADAPTER_DIR
    return {p.name[: -len(ADAPTER_SUFFIX)]: p for p in sorted(folder.glob(f"*{ADAPTER_SUFFIX}"))}


def load_config(bundle: Path):
    """The bundle's og.Config, limited to the stage's thread share (MODELBUILD_THREADS, set by
    the scheduler) so parallel stages do not each start one onnxruntime thread per core."""
    import os

    import onnxruntime_genai as og

    config = og.Config(str(bundle))
    threads = os.environ.get("MODELBUILD_THREADS")
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
