"""random-init: a random model from a config and a seed, with a tokenizer trained locally.

For testing recipes end to end in seconds, without any hub access: the weights are a pure
function of (config, seed, dtype) and the byte-level BPE tokenizer a pure function of the corpus
and the vocabulary size. A full-size config (Phi-3.5-mini's, in bfloat16: bench/phi35_build.py)
gives a base of the real shape to measure builds on.

The genai model builder treats *any* Linear whose out_features equals the vocab size as the
LM head, which silently produces a wrong model; this pass refuses such configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelbuild import UserError
from modelbuild.ml.records import load_records
from modelbuild.passdef import Input, PassDef, param, require

TINY_PHI3 = {
    "model_type": "phi3",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "original_max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@dataclass(frozen=True)
class Params:
    config: dict = param(TINY_PHI3, "transformers config (model_type + fields); vocab_size also sizes the tokenizer")
    seed: int = param(0, "torch seed for the weights")
    chat_template: str = param(PHI3_CHAT_TEMPLATE, "jinja chat template stored with the tokenizer")
    dtype: str = param("float32", "weight dtype saved (bfloat16: as the hub ships Phi-3.5 and most bases; made in it, "
                                  "never through an fp32 copy)", choices=("float32", "bfloat16", "float16"))

    def __post_init__(self):
        require(isinstance(self.config.get("model_type"), str) and bool(self.config.get("model_type")),
                "config.model_type", "a transformers model type such as \"phi3\"", self.config.get("model_type"))


def corpus_lines(path: Path) -> list[str]:
    """Text to train the tokenizer on: prompt/response of a JSONL file, or the lines of a text file."""
    if path.suffix == ".jsonl":
        return [value for record in load_records(path, path.name) for value in record.values()]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"inputs.corpus: {path.name} is not UTF-8 text (byte {error.start}); the tokenizer trains on text") from None
    return [line for line in text.splitlines() if line.strip()]


def train_tokenizer(lines: list[str], vocab_size: int, chat_template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(lines, trainer=trainer)
    # A corpus too small for vocab_size merges: reserved tokens fill the vocabulary, so every id
    # the model can generate decodes (as in real vocabularies' unused slots).
    core.add_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - core.get_vocab_size())])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from modelbuild.ml.hf import linear_out_features, save_model_folder

    fields = dict(params.config)
    model_type = fields.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as error:
        raise UserError(f"params.config: {error}") from None
    tokenizer = train_tokenizer(corpus_lines(inputs["corpus"]), config.vocab_size, params.chat_template)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id

    torch.manual_seed(params.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, params.dtype)).eval()
    clashes = [name for name, out in linear_out_features(model).items() if out == config.vocab_size]
    if clashes:
        raise UserError(
            f"params.config: {clashes[0]} has out_features == vocab_size ({config.vocab_size}); the genai "
            "builder would take it for the LM head and build a wrong model: change vocab_size or that size"
        )
    save_model_folder(model, tokenizer, out_dir)


PASS = PassDef(
    name="random-init",
    version=1,
    doc="small random model from a config + seed, with a byte-level BPE tokenizer trained on a local corpus",
    params=Params,
    inputs={"corpus": Input("text or JSONL file to train the tokenizer on", kind="file")},
    run=run,
    libraries=("torch", "transformers", "tokenizers", "safetensors"),
)
