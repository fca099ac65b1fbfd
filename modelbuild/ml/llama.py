"""Running GGUF files in llama.cpp (llama-cpp-python), and the torch fp32 logits they are checked against.

llama.cpp applies a GGUF LoRA adapter at run time (``W·x + scale·B(A·x)``), so one base file
serves the model with the adapter off and on; ``Runner`` holds one of each. Logits are taken
for every position of a token sequence fed as ids (the same ids torch sees), so a tokenizer
difference cannot hide in the comparison; ``tokenize`` is compared separately.
"""

from __future__ import annotations

import gc
from pathlib import Path

from modelbuild import UserError


class Runner:
    """One GGUF base in llama.cpp, with an optional GGUF LoRA adapter applied at scale 1."""

    def __init__(self, model: Path, adapter: Path | None = None, threads: int = 1, n_ctx: int = 512):
        try:
            import llama_cpp
        except ImportError:
            raise UserError("llama-cpp-python is not installed: ./install.sh compiles it (the 'llama' extra)") from None
        try:
            self.llm = llama_cpp.Llama(model_path=str(model), lora_path=str(adapter) if adapter else None, n_ctx=n_ctx,
                                       n_batch=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=True,
                                       seed=0, verbose=False)
        except ValueError as error:  # llama-cpp-python's word for "llama.cpp refused the file"
            shown = f"{model.name}" + (f" with adapter {adapter.name}" if adapter else "")
            raise UserError(f"llama.cpp does not load {shown}: {error}") from None
        self.vocab = self.llm._model.vocab

    def tokenize(self, text: str) -> list[int]:
        """``text`` as llama.cpp's tokenizer splits it (special tokens parsed, no BOS added)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def logits(self, ids: list[int]):
        """float64 logits [len(ids), vocab] of one sequence from a fresh context."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def chat_ids(self, prompt: str) -> list[int]:
        """The prompt as one user turn through the GGUF's own chat template (what llama.cpp
        front ends apply), tokenized by llama.cpp."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return self.tokenize(prompt)
        eos = self.llm.detokenize([self.llm.token_eos()]).decode("utf-8", "replace")
        bos = self.llm.detokenize([self.llm.token_bos()]).decode("utf-8", "replace") if self.llm.token_bos() >= 0 else ""
        formatted = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=True)(
            messages=[{"role": "user", "content": prompt}])
        return self.tokenize(formatted.prompt)

    def generate(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt`` (chat-formatted) up to an end-of-generation token."""
        import llama_cpp
        import numpy as np

        self.llm.reset()
        self.llm.eval(self.chat_ids(prompt))
        out: list[int] = []
        while len(out) < max_new_tokens and self.llm.n_tokens < self.llm.n_ctx():
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            out.append(token)
            self.llm.eval([token])
        return out

    def text(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", "replace")

    def close(self) -> None:
        self.llm.close()
        gc.collect()


def torch_adapter_logits(base: Path, adapter: Path, ids: list[int]):
    """fp32 logits [tokens, vocab] of ``base`` with the peft ``adapter`` applied (unmerged)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    del model
    gc.collect()
    return logits
