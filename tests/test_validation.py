"""Bad target files fail before any pass runs: one line naming file, target and key; exit non-zero."""

from __future__ import annotations

import pytest

BASE = """
[target.base]
pass = "random-init"
inputs = { corpus = "data/tokenizer_corpus.txt" }
"""


def failing_list(project, files: dict[str, str]) -> str:
    for name, text in files.items():
        project.path(f"targets/{name}").write_text(text)
    result = project.doit("list", check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.out
    lines = [line for line in result.out.splitlines() if line.strip()]
    assert len(lines) == 1, result.out
    assert lines[0].startswith("modelbuild: ")
    return lines[0]


@pytest.mark.parametrize(
    "extra, expected",
    [
        ('[target.x]\npass = "no-such-pass"\n', ["targets/bad.toml", "target 'x'", "pass: unknown pass 'no-such-pass'"]),
        ('[target.x]\npass = "smoke"\nparams = { colour = 1 }\ninputs = { bundle = ":base" }\n',
         ["targets/bad.toml", "target 'x'", "params.colour: unknown param"]),
        ('[target.x]\npass = "smoke"\nparams = { max_new_tokens = "many" }\ninputs = { bundle = ":base" }\n',
         ["targets/bad.toml", "target 'x'", "params.max_new_tokens: expected int, got str"]),
        ('[target.x]\npass = "genai-build"\nparams = { precision = "int3" }\ninputs = { base = ":base" }\n',
         ["target 'x'", "params.precision: 'int3' is not one of"]),
        ('[target.x]\npass = "lora-finetune"\ninputs = { base = ":base", data = "data/nope.jsonl" }\n',
         ["targets/bad.toml", "target 'x'", "inputs.data: missing input file targets/data/nope.jsonl"]),
        ('[target.x]\npass = "smoke"\ninputs = { bundle = ":ghost" }\n',
         ["targets/bad.toml", "target 'x'", "inputs.bundle: unknown target 'ghost'"]),
        ('[target.x]\npass = "smoke"\n', ["target 'x'", "inputs.bundle: required input of pass 'smoke' is missing"]),
        ('[target.x]\npass = "smoke"\ninputs = { bundle = ":base", extra = ":base" }\n',
         ["target 'x'", "inputs.extra: pass 'smoke' has no such input"]),
        ('[target.x]\npass = "smoke"\ndevice = "tpu"\ninputs = { bundle = ":base" }\n',
         ["target 'x'", "device: 'tpu' is not cpu, cuda or cuda:N"]),
        ('[target.x]\npass = "lora-finetune"\ndevice = "cuda"\ninputs = { base = ":base", data = "data/tokenizer_corpus.txt" }\n',
         ["target 'x'", "device: pass 'lora-finetune' runs on cpu, not cuda"]),
        ('[target.x]\npass = "smoke"\ninputs = { bundle = ":base" }\ncolour = "red"\n',
         ["targets/bad.toml", "target 'x'", "colour: unknown key"]),
        ('[target.x]\npass = "smoke"\ninputs = { bundle = ":x" }\n', ["target 'x'", "dependency cycle x -> x"]),
        ('[target."bad:name"]\npass = "smoke"\ninputs = { bundle = ":base" }\n', ["target 'bad:name'", "bad target name"]),
        ('[target.x\npass = "smoke"\n', ["targets/bad.toml", "malformed TOML", "line 1"]),
        ('default_targets = ["base"]\n', ["targets/travel.toml", "default_targets: already set in targets/bad.toml"]),
    ],
)
def test_bad_target_file(project, extra, expected):
    message = failing_list(project, {"z_base.toml": BASE, "bad.toml": extra})
    for part in expected:
        assert part in message, message


def test_unknown_default_target(project):
    project.edit("targets/travel.toml", 'default_targets = ["smollm2-travel-cpu-int4-smoke"]', 'default_targets = ["ghost"]')
    message = failing_list(project, {})
    assert "targets/travel.toml: default_targets: unknown target 'ghost'" in message


def test_cycle_through_several_targets(project):
    text = BASE + "".join(
        f'[target.{a}]\npass = "smoke"\ninputs = {{ bundle = ":{b}" }}\n' for a, b in [("a", "b"), ("b", "c"), ("c", "a")]
    )
    message = failing_list(project, {"bad.toml": text})
    assert "dependency cycle a -> b -> c -> a" in message


def test_duplicate_target_across_files(project):
    message = failing_list(project, {"a.toml": BASE, "b.toml": BASE})
    assert "targets/b.toml: target 'base': duplicate target name (also defined in targets/a.toml)" in message


RECIPE = BASE + """
[recipe.r]
required = ["model"]
vars = { steps = 3 }
[recipe.r.target."{model}-smoke"]
pass = "smoke"
inputs = { bundle = ":{model}" }
params = { max_new_tokens = "{steps}" }
"""


@pytest.mark.parametrize(
    "use, expected",
    [
        ('[[use]]\nrecipe = "nope"\n', ["use #1: recipe: unknown recipe 'nope'"]),
        ('[[use]]\nrecipe = "r"\n', ["use #1: vars.model: required by recipe 'r' but not given"]),
        ('[[use]]\nrecipe = "r"\nvars = { model = "base", colour = 1 }\n', ["use #1: vars.colour: recipe 'r' has no such var"]),
        ('[[use]]\nrecipe = "r"\nvars = { model = "base", steps = "x" }\n',
         ["target 'base-smoke'", "params.max_new_tokens: expected int, got str"]),
    ],
)
def test_bad_recipe_use(project, use, expected):
    message = failing_list(project, {"bad.toml": RECIPE + use})
    assert "targets/bad.toml" in message
    for part in expected:
        assert part in message, message


def test_unknown_variable_in_recipe(project):
    text = RECIPE.replace('":{model}"', '":{modle}"') + '[[use]]\nrecipe = "r"\nvars = { model = "base" }\n'
    message = failing_list(project, {"bad.toml": text})
    assert "recipe 'r': target '{model}-smoke'" in message
    assert "inputs.bundle: unknown variable '{modle}'" in message


def test_recipe_expands_typed_values_and_text(project):
    text = RECIPE + '[[use]]\nrecipe = "r"\nvars = { model = "base", steps = 7 }\n'
    project.path("targets/good.toml").write_text(text)
    result = project.modelbuild("targets")
    assert result.returncode == 0, result.out
    assert "base-smoke" in result.out and "bundle=:base" in result.out
    from modelbuild.project import load_project

    target = load_project(project.root).targets["base-smoke"]
    assert target.params["max_new_tokens"] == 7  # "{steps}" kept its TOML type


def test_repo_targets_load_and_list(project):
    result = project.doit("list")
    for name in ["smollm2-travel-cpu-int4", "phi35-travel-cpu-int4", "tiny-travel-cpu-int4", "smollm2-base"]:
        assert name in result.out
