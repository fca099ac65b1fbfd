"""Ollama Modelfiles for GGUF builds: FROM base, ADAPTER, a TEMPLATE translated from the chat template.

Ollama formats prompts with a Go ``text/template``, not with the model's Jinja chat template, so a
Modelfile needs the same prompt format written again in Go. Translating arbitrary Jinja is not
possible; instead each template *family* we build (ChatML as SmolLM2 uses it, with or without a
default system prompt; Phi-3's ``<|role|>\\n…<|end|>\\n``, as Phi-3.5 and the tiny recipe use it)
is written once as a Go template, its parameters read off the Jinja template's own output, and
the candidate is accepted only if it renders exactly the Jinja template's text on every probe
conversation (system, multi-turn, generation prompt). :func:`render_go_template` implements the
subset of Go's text/template semantics these templates use and :func:`ollama_prompt` the way
Ollama fills it for a chat request, so the check runs here, where Ollama itself cannot. A
template that no family reproduces is a :class:`modelbuild.UserError`, never a wrong TEMPLATE.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from modelbuild import UserError


# -- the check: the Jinja template's text versus Ollama's ---------------------------------------

PROBE_CONVERSATIONS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Hi"),),
    (("system", "You plan trips."), ("user", "Two days in Rome?")),
    (("user", "Where is Porto?"), ("assistant", "In Portugal,\non the Douro."), ("user", "And Lyon?")),
    (("system", "Be brief.\nUse lists."), ("user", "Pack for Oslo"), ("assistant", "Coat, boots."),
     ("user", "And for Cairo?"), ("assistant", "Hat {{ sun }} cream."), ("user", "Thanks — ünïcode ✓")),
    (("system", ""), ("user", "An empty system message")),
)
"""Chats that end on a user turn, rendered with a generation prompt: what Ollama's chat API sends.
No two consecutive messages share a role (Ollama merges those; Jinja templates do not)."""


def jinja_render(chat_template: str, messages: list[dict], bos_token: str = "", eos_token: str = "") -> str:
    """The chat template's text with a generation prompt, rendered as transformers renders it."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template).render(messages=messages, add_generation_prompt=True,
                                                 bos_token=bos_token, eos_token=eos_token)


def ollama_prompt(template: str, messages: list[dict]) -> str:
    """The prompt Ollama builds for a chat request with a ``.Messages`` template.

    As Ollama's ``template.Execute``: consecutive messages of one role are merged with a blank
    line, ``.System`` is every system message joined the same way, ``.Messages`` keeps them all.
    """
    system = [m["content"] for m in messages if m["role"] == "system"]
    collated: list[dict] = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    return render_go_template(template, {"System": "\n\n".join(system), "Messages": collated,
                                         "Tools": None, "Response": ""})


# -- the families ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OllamaTemplate:
    family: str
    template: str
    stop: tuple[str, ...]


def go_literal(text: str) -> str:
    """``text`` as template text: raw, unless it holds ``{{`` (then a quoted string action)."""
    return text if "{{" not in text else "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _last_turn_opens_assistant(generation_prompt: str) -> str:
    return ('{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}'
            + go_literal(generation_prompt) + "{{ end }}")


def chatml_template(default_system: str | None) -> str:
    first = ""
    if default_system is not None:
        first = ('{{ if and (eq $i 0) (ne $m.Role "system") }}'
                 + go_literal(f"<|im_start|>system\n{default_system}<|im_end|>\n") + "{{ end }}")
    return ("{{ range $i, $m := .Messages }}" + first
            + "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n"
            + _last_turn_opens_assistant("<|im_start|>assistant\n") + "{{ end }}")


def phi3_template(skip_empty_system: bool) -> str:
    turn = "<|{{ $m.Role }}|>\n{{ $m.Content }}<|end|>\n"
    if skip_empty_system:
        turn = '{{ if or (ne $m.Role "system") $m.Content }}' + turn + "{{ end }}"
    return "{{ range $i, $m := .Messages }}" + turn + _last_turn_opens_assistant("<|assistant|>\n") + "{{ end }}"


_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", re.S)


def _candidates(chat_template: str, bos_token: str, eos_token: str) -> list[OllamaTemplate]:
    """Go templates that could be this chat template, parameters read off its own output."""
    lone_user = jinja_render(chat_template, [{"role": "user", "content": "Hi"}], bos_token, eos_token)
    if "<|im_start|>" in chat_template:
        found = _CHATML_DEFAULT_SYSTEM.match(lone_user)
        default = found.group(1) if found else None
        stop = ("<|im_start|>", "<|im_end|>")
        return [OllamaTemplate("chatml", chatml_template(default), stop)]
    if "<|end|>" in chat_template:
        stop = tuple(dict.fromkeys(("<|end|>", "<|user|>", "<|assistant|>") + ((eos_token,) if eos_token else ())))
        return [OllamaTemplate("phi3", phi3_template(skip), stop) for skip in (False, True)]
    return []


def translate(chat_template: str, bos_token: str = "", eos_token: str = "") -> OllamaTemplate:
    """The Go template that renders every probe conversation exactly as ``chat_template`` does."""
    if not chat_template:
        raise UserError("chat template: the model has none, so there is no prompt format to give Ollama")
    import jinja2

    first_line = chat_template.strip().splitlines()[0][:80]
    mismatch = "no template family we translate (ChatML, Phi-3) matches it"
    try:
        candidates = _candidates(chat_template, bos_token, eos_token)
    except jinja2.TemplateError as error:
        raise UserError(f"chat template {first_line!r}…: Jinja cannot render it: {error}") from None
    for candidate in candidates:
        for conversation in PROBE_CONVERSATIONS:
            messages = [{"role": role, "content": content} for role, content in conversation]
            try:
                expected = jinja_render(chat_template, messages, bos_token, eos_token)
            except jinja2.TemplateError as error:
                mismatch = f"Jinja cannot render it for roles {[m['role'] for m in messages]}: {error}"
                break
            got = ollama_prompt(candidate.template, messages)
            if got != expected:
                mismatch = (f"the {candidate.family} translation renders {got!r} where the template renders "
                            f"{expected!r} for roles {[m['role'] for m in messages]}")
                break
        else:
            return candidate
    raise UserError(f"chat template {first_line!r}…: cannot translate it to an Ollama TEMPLATE: {mismatch}")


def gguf_chat_settings(gguf_path) -> tuple[str, str, str]:
    """(chat template, BOS token, EOS token) from a GGUF file's tokenizer metadata."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key):
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    template = field("tokenizer.chat_template")
    if not template:
        raise UserError(f"{gguf_path}: tokenizer.chat_template: the GGUF file carries no chat template")
    tokens = reader.fields.get("tokenizer.ggml.tokens")

    def token(key):
        index = field(key)
        if index is None or tokens is None:
            return ""
        return bytes(tokens.parts[tokens.data[index]]).decode("utf-8")

    return template, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile(base_gguf: str, adapter_gguf: str | None, chat_template: str, stop: list[str] | None = None,
              bos_token: str = "", eos_token: str = "") -> str:
    """A Modelfile: FROM the base GGUF, ADAPTER the LoRA GGUF (if any), TEMPLATE, PARAMETER stop.

    Paths are written as given (relative ones resolve against the Modelfile's folder in
    ``ollama create``). ``stop`` defaults to the family's turn markers (plus the EOS token).
    """
    translated = translate(chat_template, bos_token, eos_token)
    if '"""' in translated.template:
        raise UserError('chat template: its text holds """, which cannot be written inside a Modelfile TEMPLATE')
    template = translated.template
    lines = [f"FROM {base_gguf}"]
    if adapter_gguf:
        lines.append(f"ADAPTER {adapter_gguf}")
    lines.append(f'TEMPLATE """{template}"""')
    for token in (stop if stop is not None else translated.stop):
        lines.append(f"PARAMETER stop {_quoted(token)}")
    return "\n".join(lines) + "\n"


# -- Go text/template, the subset the templates above use -----------------------------------

class GoTemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+)|(?P<open>\()|(?P<close>\))|(?P<pipe>\|)'
                    r"|(?P<word>[$.\w][\w.$]*))")
_SPACE = " \t\r\n"


def _tokens(source: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    source = source.strip()
    while position < len(source):
        match = _TOKEN.match(source, position)
        if not match or match.end() == position:
            raise GoTemplateError(f"cannot parse action {{{{ {source} }}}} at {source[position:]!r}")
        kind = match.lastgroup
        if kind == "word" and match.group(kind).startswith(".") and tokens and tokens[-1][0] == "close" \
                and match.start(kind) == position:
            kind = "chain"  # (pipeline).Field
        tokens.append((kind, match.group(match.lastgroup)))
        position = match.end()
    return tokens


def _parse(template: str) -> list:
    """Nodes: ("text", s), ("out", pipeline), ("if", [(pipeline, body)...], else_body),
    ("range", (key_var, value_var), pipeline, body), ("set", var, pipeline)."""
    pieces: list = []
    position = 0
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if match.group(1):
            text = text.rstrip(_SPACE)
        pieces.append(("text", text))
        pieces.append(("action", match.group(2).strip(), bool(match.group(3))))
        position = match.end()
    pieces.append(("text", template[position:]))
    for index, piece in enumerate(pieces):  # a right trim marker eats the next text's leading space
        if piece[0] == "action" and piece[2]:
            pieces[index + 1] = ("text", pieces[index + 1][1].lstrip(_SPACE))
    stream = iter(pieces)

    def block(terminators: tuple[str, ...]):
        nodes = []
        for piece in stream:
            if piece[0] == "text":
                if piece[1]:
                    nodes.append(piece)
                continue
            action = piece[1]
            head = action.split(None, 1)[0] if action else ""
            if head in terminators or (head == "else" and "else" in terminators):
                return nodes, action
            if head == "if":
                nodes.append(if_node(action[2:]))
            elif head == "range":
                nodes.append(range_node(action[5:]))
            elif head in ("end", "else"):
                raise GoTemplateError(f"unexpected {{{{ {action} }}}}")
            elif re.match(r"^\$\w+\s*:?=", action):
                name, expression = re.split(r"\s*:?=\s*", action, maxsplit=1)
                nodes.append(("set", name, _tokens(expression)))
            elif head in ("with", "define", "template", "block", "break", "continue"):
                raise GoTemplateError(f"{{{{ {head} }}}} is not supported here")
            else:
                nodes.append(("out", _tokens(action)))
        if terminators:
            raise GoTemplateError(f"missing {{{{ end }}}} (expected one of {terminators})")
        return nodes, None

    def if_node(condition: str):
        branches, else_body = [], []
        while True:
            body, closing = block(("end", "else"))
            branches.append((_tokens(condition), body))
            if closing == "end":
                return ("if", branches, else_body)
            rest = closing[4:].strip()
            if rest.startswith("if "):
                condition = rest[3:]
                continue
            else_body, _ = block(("end",))
            return ("if", branches, else_body)

    def range_node(header: str):
        match = re.match(r"^\s*(?:(\$\w+)\s*(?:,\s*(\$\w+))?\s*:=\s*)?(.*)$", header, re.S)
        first, second, expression = match.groups()
        names = (first, second) if second else (None, first)
        body, closing = block(("end", "else"))
        if closing != "end":
            raise GoTemplateError("{{ range }} … {{ else }} is not supported here")
        return ("range", names, _tokens(expression), body)

    nodes, _ = block(())
    return nodes


def _truth(value) -> bool:
    return not (value is None or value is False or value == 0 and not isinstance(value, str)
                or (hasattr(value, "__len__") and len(value) == 0))


_FUNCTIONS = {
    "eq": lambda a, *others: any(a == b for b in others),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": lambda a: len(a),
    "index": lambda a, *keys: _index(a, keys),
    "slice": lambda a, *bounds: a[bounds[0] if bounds else None:bounds[1] if len(bounds) > 1 else None],
}


def _index(value, keys):
    for key in keys:
        value = value[key]
    return value


def _field(value, names: list[str], where: str):
    for name in names:
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"can't evaluate field {name} in {where}")
        value = value[name]
    return value


def _evaluate(tokens: list, scope: dict, dot):
    def operand(position):
        kind, text = tokens[position]
        if kind == "open":
            value, position = pipeline(position + 1, ("close",))
            position += 1
            while position < len(tokens) and tokens[position][0] == "chain":
                value = _field(value, tokens[position][1][1:].split("."), tokens[position][1])
                position += 1
            return value, position
        if kind == "str":
            return json.loads(text), position + 1
        if kind == "num":
            return int(text), position + 1
        if kind == "word":
            if text == ".":
                return dot, position + 1
            if text.startswith("."):
                return _field(dot, text[1:].split("."), text), position + 1
            if text.startswith("$"):
                name, *fields = text.split(".")
                if name not in scope:
                    raise GoTemplateError(f"undefined variable {name}")
                return _field(scope[name], fields, text), position + 1
            if text in ("true", "false"):
                return text == "true", position + 1
        raise GoTemplateError(f"unexpected {text!r}")

    def command(position, stops, piped=()):
        kind, text = tokens[position]
        if kind == "word" and text in ("and", "or"):
            position += 1
            arguments = []
            while position < len(tokens) and tokens[position][0] not in stops + ("pipe",):
                value, position = operand(position)
                arguments.append(value)
                if (text == "and") != _truth(value):
                    return value, skip(position, stops)
            arguments += piped
            return (arguments[-1] if arguments else None), position
        if kind == "word" and text in _FUNCTIONS:
            position += 1
            arguments = []
            while position < len(tokens) and tokens[position][0] not in stops + ("pipe",):
                value, position = operand(position)
                arguments.append(value)
            return _FUNCTIONS[text](*arguments, *piped), position
        if kind == "word" and re.fullmatch(r"[A-Za-z_]\w*", text) and text not in ("true", "false"):
            raise GoTemplateError(f'function "{text}" not defined here')
        value, position = operand(position)
        if piped:
            raise GoTemplateError(f"can't give an argument to non-function {text}")
        return value, position

    def skip(position, stops):
        depth = 0
        while position < len(tokens):
            kind = tokens[position][0]
            if depth == 0 and kind in stops + ("pipe",):
                break
            depth += {"open": 1, "close": -1}.get(kind, 0)
            position += 1
        return position

    def pipeline(position, stops=()):
        value, position = command(position, stops)
        while position < len(tokens) and tokens[position][0] == "pipe":
            value, position = command(position + 1, stops, (value,))
        if stops and (position >= len(tokens) or tokens[position][0] not in stops):
            raise GoTemplateError("unclosed (")
        return value, position

    value, position = pipeline(0)
    if position != len(tokens):
        raise GoTemplateError(f"unexpected {tokens[position][1]!r}")
    return value


def _print(value) -> str:
    if value is None:
        return "<no value>"
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def _execute(nodes: list, scope: dict, dot, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            out.append(_print(_evaluate(node[1], scope, dot)))
        elif kind == "set":
            scope[node[1]] = _evaluate(node[2], scope, dot)
        elif kind == "if":
            for condition, body in node[1]:
                if _truth(_evaluate(condition, scope, dot)):
                    _execute(body, dict(scope), dot, out)
                    break
            else:
                _execute(node[2], dict(scope), dot, out)
        elif kind == "range":
            (key_name, value_name), expression, body = node[1], node[2], node[3]
            items = _evaluate(expression, scope, dot)
            pairs = items.items() if isinstance(items, dict) else enumerate(items or ())
            for key, value in pairs:
                inner = dict(scope)
                if key_name:
                    inner[key_name] = key
                if value_name:
                    inner[value_name] = value
                _execute(body, inner, value, out)


def render_go_template(template: str, data: dict) -> str:
    """``template`` executed on ``data`` with Go text/template semantics (the subset above:
    text, trim markers, if/else if/else, range with variables, ``$x :=``, fields of ``.``, ``$``
    and variables, string/int constants, pipelines, and eq ne and or not len index slice)."""
    out: list[str] = []
    _execute(_parse(template), {"$": data}, data, out)
    return "".join(out)
