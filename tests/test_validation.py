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
         ["target 'x'", "device: 'tpu' is not cpu, cuda, cuda:N"]),
        ('[target.x]\npass = "random-init"\ndevice = "cuda"\ninputs = { corpus = "data/tokenizer_corpus.txt" }\n',
         ["target 'x'", "device: pass 'random-init' runs on cpu, not cuda"]),
        ('[target.x]\npass = "smoke"\ninputs = { bundle = ":base" }\ncolour = "red"\n',
         ["targets/bad.toml", "target 'x'", "colour: unknown key"]),
        ('[target.x]\npass = "smoke"\ninputs = { bundle = ":x" }\n', ["target 'x'", "dependency cycle x -> x"]),
        ('[target."bad:name"]\npass = "smoke"\ninputs = { bundle = ":base" }\n', ["target 'bad:name'", "bad target name"]),
        ('[target.x\npass = "smoke"\n', ["targets/bad.toml", "malformed TOML", "line 1"]),
        ('default_targets = ["base"]\n', ["targets/travel.toml", "default_targets: already set in targets/bad.toml"]),
        ('[target.x]\npass = "device-probe"\nmatrix = { n = [1, 2] }\n',
         ["targets/bad.toml", "target 'x'", "matrix.n: the target name must contain {n}"]),
        ('[target."x-{n}"]\npass = "device-probe"\nmatrix = { n = [] }\n', ["target 'x-{n}'", "matrix.n: expected a non-empty list"]),
        ('[target."x-{v}"]\npass = "device-probe"\nmatrix = { v = [{ seconds = 1 }] }\n',
         ["target 'x-{v}'", "matrix.v[0]: a table entry needs a string 'name'"]),
        ('[target."x-{n}"]\npass = "device-probe"\nparams = { seconds = "{m}" }\nmatrix = { n = [1] }\n',
         ["target 'x-{n}' [n=1]", "params.seconds: unknown variable '{m}'"]),
        ('[target.x]\npass = "smoke"\ninputs = { bundle = ":base" }\ngates = { speed = ">= 1" }\n',
         ["targets/bad.toml", "target 'x'", "gates.speed: pass 'smoke' writes no such metric"]),
        ('[target.x]\npass = "evaluate"\ninputs = { model = ":base", data = "data/travel_eval.jsonl" }\ngates = { tokens_per_s = "fast" }\n',
         ["target 'x'", "gates.tokens_per_s: expected a string such as \"<= 5\""]),
        ('[devices]\ncpu_slots = "two"\n', ["targets/bad.toml", "devices.cpu_slots: expected int, got str"]),
    ],
)
def test_bad_target_file(project, extra, expected):
    message = failing_list(project, {"z_base.toml": BASE, "bad.toml": extra})
    for part in expected:
        assert part in message, message


def test_unknown_default_target(project):
    project.edit("targets/travel.toml", 'default_targets = ["smollm2-travel-cpu-int4-smoke", "smollm2-travel-cpu-int4-eval"]', 'default_targets = ["ghost"]')
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
    from modelbuild.graph.loader import load_project

    target = load_project(project.root).targets["base-smoke"]
    assert target.params["max_new_tokens"] == 7  # "{steps}" kept its TOML type


def test_every_target_and_group_is_a_doit_task(project):
    """The graph and doit agree: each target and group of the repo's files is exactly one task."""
    from modelbuild.graph.loader import load_project

    graph = load_project(project.root)
    listed = {line.split()[0] for line in project.doit("list").out.splitlines() if line.strip()}
    assert listed == set(graph.targets) | set(graph.groups)
    assert {"smollm2-travel-cpu-int4", "phi35-travel-cpu-int4", "tiny-travel-cpu-int4"} <= listed


MATRIX_RECIPE = BASE + """
[recipe.grid]
required = ["model"]
vars = { seconds = 0.5 }

[recipe.grid.target."{model}-{device}-{variant}"]
pass = "device-probe"
device = "{device}"
params = { seconds = "{seconds}", size = "{size}" }
matrix = { device = ["cpu", "cuda"], variant = [{ name = "small", size = 64 }, { name = "big", size = 512, seconds = 1.5 }] }

[[use]]
recipe = "grid"
vars = { model = "m" }
"""


def test_matrix_expands_every_combination_with_typed_vars(project):
    from modelbuild.graph.loader import load_project

    project.path("targets/grid.toml").write_text(MATRIX_RECIPE)
    graph = load_project(project.root)
    made = {name: t for name, t in graph.targets.items() if name.startswith("m-")}
    assert sorted(made) == ["m-cpu-big", "m-cpu-small", "m-cuda-big", "m-cuda-small"]
    assert made["m-cuda-big"].device == "cuda"
    assert made["m-cuda-big"].params == {"seconds": 1.5, "size": 512}  # a table entry's keys override recipe vars
    assert made["m-cpu-small"].params == {"seconds": 0.5, "size": 64}
    assert "matrix device=cuda, variant=big" in made["m-cuda-big"].origin
