"""settings.py: every MODELBUILD_* variable read in one place, with one parser for booleans and
numbers; a bad value is one line before anything runs, and MODELBUILD_SIMULATED_GPUS=false is off
in the driver and in a pass's worker process alike."""

from __future__ import annotations

import ast
import json
import pickle
import re

import pytest
from conftest import REPO

from modelbuild import UserError
from modelbuild.exec import devices
from modelbuild.graph import graph_cache
from modelbuild.core import settings
from modelbuild.passes import device_probe
from modelbuild.core.stamp import read_stamp
from modelbuild.exec.worker import StageContext
from test_devices import probe_project, runs

BOOLEANS = [name for name, (_, parse, _) in settings.VARIABLES.items() if parse is settings.parse_bool]
TRUE_SPELLINGS = ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " 1 ", "\ttrue\n"]
FALSE_SPELLINGS = ["0", "false", "FALSE", "no", "No", "off", "OFF", " 0", "off  "]


def field(name: str) -> str:
    return settings.VARIABLES[name][0]


def error_of(environ: dict) -> str:
    with pytest.raises(UserError) as caught:
        settings.read(environ)
    return str(caught.value)


@pytest.mark.parametrize("name", BOOLEANS)
def test_every_boolean_takes_every_spelling_and_empty_is_unset(name):
    assert len(BOOLEANS) >= 6  # FORCE, GRAPH_CACHE, VERBOSE, REMOTE_PUSH, REMOTE_REQUIRED, SIMULATED_GPUS
    for text in TRUE_SPELLINGS:
        assert getattr(settings.read({name: text}), field(name)) is True, text
    for text in FALSE_SPELLINGS:
        assert getattr(settings.read({name: text}), field(name)) is False, text
    default = settings.VARIABLES[name][2]
    for text in ("", "  "):
        assert getattr(settings.read({name: text}), field(name)) == default
    assert getattr(settings.read({}), field(name)) == default


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("text", ["maybe", "2", "y", "enable", "truee", "-1"])
def test_a_bad_boolean_is_one_line_naming_the_variable_and_the_accepted_values(name, text):
    message = error_of({name: text})
    assert message == f"environment: {name}={text!r}: expected 1/true/yes/on or 0/false/no/off"


def test_the_example_of_the_issue():
    assert error_of({"MODELBUILD_FORCE": "maybe"}) == (
        "environment: MODELBUILD_FORCE='maybe': expected 1/true/yes/on or 0/false/no/off")


def test_numbers_are_parsed_and_bad_ones_are_one_line():
    env = settings.read({"MODELBUILD_CPU_SLOTS": " 3", "MODELBUILD_CPU_THREADS": "8", "MODELBUILD_GPU_MEMORY_GB": "7.5",
                         "MODELBUILD_THREADS": "0", "MODELBUILD_GPUS": "0, 2"})
    assert (env.cpu_slots, env.cpu_threads, env.gpu_memory_gb, env.threads, env.gpus) == (3, 8, 7.5, 0, (0, 2))
    for name, text, expected in [("MODELBUILD_CPU_SLOTS", "abc", "a positive integer"),
                                 ("MODELBUILD_CPU_SLOTS", "0", "a positive integer"),
                                 ("MODELBUILD_CPU_SLOTS", "1.5", "a positive integer"),
                                 ("MODELBUILD_CPU_THREADS", "-4", "a positive integer"),
                                 ("MODELBUILD_GPU_MEMORY_GB", "lots", "a positive number"),
                                 ("MODELBUILD_GPU_MEMORY_GB", "nan", "a positive number"),
                                 ("MODELBUILD_GPU_MEMORY_GB", "inf", "a positive number"),
                                 ("MODELBUILD_THREADS", "-1", "an integer >= 0"),
                                 ("MODELBUILD_GPUS", "0;1", "GPU indices such as 0,1 (or none)"),
                                 ("MODELBUILD_EXECUTOR", "slurm", "one of local, ray"),
                                 ("MODELBUILD_DOWNLOAD", "some", "one of all, toplevel")]:
        message = error_of({name: text})
        assert message == f"environment: {name}={text!r}: expected {expected}", message
        assert "\n" not in message


def test_empty_means_unset_except_gpus_where_it_means_none():
    env = settings.read({name: "" for name in settings.VARIABLES})
    assert env == settings.read({"MODELBUILD_GPUS": ""})
    assert env.gpus == () and settings.read({"MODELBUILD_GPUS": "none"}).gpus == ()
    assert settings.read({}).gpus is None  # unset: discovery or [devices] gpus decide
    assert env.cache is None and env.remote_cache is None and env.executor is None and env.ray_address == ""


def test_choices_and_the_remote_url():
    env = settings.read({"MODELBUILD_EXECUTOR": " Ray", "MODELBUILD_DOWNLOAD": "toplevel",
                         "MODELBUILD_REMOTE_CACHE": "s3://team-bucket/prefix/", "MODELBUILD_CPU_NUMERICS": "compatible"})
    assert (env.executor, env.download, env.remote_cache, env.cpu_numerics) == (
        "ray", "toplevel", "s3://team-bucket/prefix", "compatible")
    assert settings.read({"MODELBUILD_REMOTE_CACHE": "OFF"}).remote_cache == "off"
    assert error_of({"MODELBUILD_CPU_NUMERICS": "sse9"}) == (
        "environment: MODELBUILD_CPU_NUMERICS='sse9': expected one of avx512, avx2, compatible, native")
    message = error_of({"MODELBUILD_REMOTE_CACHE": "s3://AKIAKEY:s3cr3t@bucket/x"})
    assert "s3cr3t" not in message and "MODELBUILD_REMOTE_CACHE" in message


def test_settings_are_read_only_picklable_and_hold_no_credentials():
    environ = {"MODELBUILD_FORCE": "1", "MODELBUILD_GPUS": "1", "AWS_SECRET_ACCESS_KEY": "hunter2-secret",
               "AWS_ACCESS_KEY_ID": "AKIA-hunter2", "AWS_SESSION_TOKEN": "token-hunter2", "HF_TOKEN": "hf_hunter2"}
    env = settings.read(environ)
    with pytest.raises(AttributeError):
        env.force = False
    with pytest.raises(AttributeError):
        del env.force
    again = pickle.loads(pickle.dumps(env))
    assert again == env and again.force is True and again.gpus == (1,)
    for shown in (repr(env), str(env), pickle.dumps(env).decode("latin-1")):
        assert "hunter2" not in shown
    assert set(settings.Settings.__slots__) == {f for f, _, _ in settings.VARIABLES.values()}


def test_current_reads_the_environment_on_each_call(monkeypatch):
    monkeypatch.setenv("MODELBUILD_FORCE", "yes")
    assert settings.current().force is True
    monkeypatch.setenv("MODELBUILD_FORCE", "off")
    assert settings.current().force is False
    monkeypatch.delenv("MODELBUILD_FORCE")
    assert settings.current().force is False


def test_the_graph_key_holds_every_modelbuild_variable_but_the_run_only_ones():
    environ = {"MODELBUILD_FORCE": "1", "MODELBUILD_DOWNLOAD": "all", "MODELBUILD_GPUS": "0",
               "MODELBUILD_SOMETHING_A_PLUGIN_READS": "x", "HOME": "/root", "RAY_ADDRESS": "h:1"}
    assert settings.graph_environment(environ) == [("MODELBUILD_GPUS", "0"), ("MODELBUILD_SOMETHING_A_PLUGIN_READS", "x")]
    assert graph_cache.RUN_ONLY is settings.RUN_ONLY and settings.RUN_ONLY <= settings.VARIABLES.keys()


def test_docs_describe_every_variable():
    text = (REPO / "docs" / "settings.md").read_text()
    rows = set(re.findall(r"^\| `([A-Z_]+)` \|", text, re.M))
    assert rows == set(settings.VARIABLES), rows ^ set(settings.VARIABLES)


# -- MODELBUILD_SIMULATED_GPUS=false is off ----------------------------------------------------

def test_simulated_gpus_false_is_off_in_the_machine(monkeypatch):
    table = {"gpus": [0, 1], "simulated": True}
    for text in FALSE_SPELLINGS:
        assert devices.machine_from(table, settings.read({"MODELBUILD_SIMULATED_GPUS": text})).simulated is False, text
    for text in TRUE_SPELLINGS:
        assert devices.machine_from({"gpus": [0]}, settings.read({"MODELBUILD_SIMULATED_GPUS": text})).simulated is True
    assert devices.machine_from(table, settings.read({})).simulated is True  # unset: the table decides
    monkeypatch.setenv("MODELBUILD_SIMULATED_GPUS", "false")  # in-process, as doit's driver reads it
    assert devices.machine_from(table).simulated is False


def test_the_probe_pass_parses_simulated_gpus_with_the_same_parser(tmp_path, monkeypatch):
    ctx = StageContext(target="t", device="cpu", assigned_device="cpu", threads=1, cache_dir=tmp_path, input_names={})
    params = device_probe.Params(seconds=0)
    for text, expected in [("false", False), ("TRUE", True), ("on", True), ("0", False), ("1", True)]:
        monkeypatch.setenv("MODELBUILD_SIMULATED_GPUS", text)
        device_probe.run(params, {}, tmp_path, ctx)
        seen = json.loads((tmp_path / "device.json").read_text())
        assert seen["simulated"] is expected and seen["environment"]["MODELBUILD_SIMULATED_GPUS"] == text, text


def test_simulated_gpus_false_is_off_in_a_real_build(tmp_path):
    """A [devices] table that simulates GPU 0, turned off by the environment: the stage still
    gets GPU 0 (configured), but neither the scheduler nor the probe's worker call it simulated."""
    project = probe_project(tmp_path, "[devices]\ngpus = [0]\nsimulated = true\n",
                            '[target.gpu]\npass = "device-probe"\ndevice = "cuda"\nparams = { seconds = 0 }\n')
    project.doit("gpu", env={"MODELBUILD_SIMULATED_GPUS": "false"})
    seen = runs(project)["gpu"]["seen"]
    assert seen["assigned_device"] == "cuda:0" and seen["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert seen["simulated"] is False and seen["environment"]["MODELBUILD_SIMULATED_GPUS"] == "false"
    project.doit("forget")
    project.doit("gpu", env={"MODELBUILD_SIMULATED_GPUS": " Yes", "MODELBUILD_FORCE": "true"})
    seen = runs(project)["gpu"]["seen"]
    assert seen["simulated"] is True and seen["environment"]["MODELBUILD_SIMULATED_GPUS"] == "1"
    assert read_stamp(project.path("build/gpu"))["ran_on"]["device"] == "cuda:0"


# -- a bad value stops a real doit run in one line ---------------------------------------------

@pytest.mark.parametrize("name, text, expected", [
    ("MODELBUILD_FORCE", "maybe", "1/true/yes/on or 0/false/no/off"),
    ("MODELBUILD_SIMULATED_GPUS", "nope", "1/true/yes/on or 0/false/no/off"),
    ("MODELBUILD_CPU_SLOTS", "abc", "a positive integer"),
    ("MODELBUILD_EXECUTOR", "slurm", "one of local, ray"),
])
def test_a_bad_value_stops_doit_with_one_line(project, name, text, expected):
    result = project.doit("list", env={name: text}, check=False)
    assert result.returncode == 2, result.out
    assert result.out.strip() == f"modelbuild: environment: {name}={text!r}: expected {expected}", result.out
    assert "Traceback" not in result.out


# -- only settings.py reads the environment ----------------------------------------------------

def _environ_reads(source: str) -> list[tuple[int, str]]:
    """(line, what) for each read of os.environ / os.getenv whose key may be a MODELBUILD_* or
    RAY_ADDRESS variable. Writes (``os.environ[k] = v``, ``setdefault`` of another variable) and
    copies handed to a child process (``{**os.environ, ...}``, ``env=os.environ``) are not reads."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    aliases = {"environ"} if re.search(r"from os import .*\benviron\b", source) else set()
    for node in ast.walk(tree):  # env = os.environ
        if isinstance(node, ast.Assign) and _is_os_attr(node.value, "environ"):
            aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}

    def is_environ(node) -> bool:
        return _is_os_attr(node, "environ") or (isinstance(node, ast.Name) and node.id in aliases
                                                and not isinstance(parents.get(node), ast.Assign))

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (_is_os_attr(node.func, "getenv")
                                           or (isinstance(node.func, ast.Name) and node.func.id == "getenv")):
            if _may_be_ours(node.args[0] if node.args else None, node, parents):
                found.append((node.lineno, "getenv"))
        if not is_environ(node):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute):
            call = parents.get(parent)
            if parent.attr in ("items", "keys", "values", "__iter__"):
                found.append((node.lineno, f"environ.{parent.attr}()"))
            elif parent.attr in ("get", "pop", "setdefault", "__getitem__") and isinstance(call, ast.Call):
                if _may_be_ours(call.args[0] if call.args else None, call, parents):
                    found.append((node.lineno, f"environ.{parent.attr}"))
        elif isinstance(parent, ast.Subscript) and isinstance(parent.ctx, ast.Load):
            if _may_be_ours(parent.slice, parent, parents):
                found.append((node.lineno, "environ[...]"))
        elif isinstance(parent, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in parent.ops):
            if _may_be_ours(parent.left, parent, parents):
                found.append((node.lineno, "... in environ"))
        elif isinstance(parent, (ast.For, ast.comprehension)) and parent.iter is node:
            found.append((node.lineno, "iterating environ"))
    return found


def _is_os_attr(node, attr: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name) and node.value.id == "os"


def _ours(text: str) -> bool:
    return text.startswith("MODELBUILD_") or text == "RAY_ADDRESS"


def _may_be_ours(key, at, parents) -> bool:
    """Could ``key`` name a variable settings.py owns? A constant or an f-string's leading text
    says; a name bound by a loop over a literal tuple is each of its strings; anything else may."""
    if isinstance(key, ast.Constant) and isinstance(key.value, str):
        return _ours(key.value)
    if isinstance(key, ast.JoinedStr):
        lead = key.values[0].value if key.values and isinstance(key.values[0], ast.Constant) else ""
        return _ours(lead) or "MODELBUILD_".startswith(lead) or "RAY_ADDRESS".startswith(lead)
    if isinstance(key, ast.Name):
        node = at
        while node in parents:
            node = parents[node]
            loops = node.generators if isinstance(node, (ast.GeneratorExp, ast.ListComp, ast.SetComp, ast.DictComp)) \
                else [node] if isinstance(node, ast.For) else []
            for loop in loops:
                if key.id in {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)} \
                        and isinstance(loop.iter, (ast.Tuple, ast.List)):
                    texts = [c.value for c in ast.walk(loop.iter) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                    return any(_ours(t) for t in texts)
    return True


def test_the_scanner_finds_reads_and_lets_writes_and_child_environments_pass():
    reads = '''
import os
a = os.environ.get("MODELBUILD_FORCE")
b = os.getenv("RAY_ADDRESS")
c = "MODELBUILD_GPUS" in os.environ
d = os.environ["MODELBUILD_CACHE"]
env = os.environ
e = env.get("MODELBUILD_VERBOSE")
f = [k for k, v in os.environ.items() if k.startswith("MODELBUILD_")]
g = os.environ.get(name)
h = os.environ.get(f"MODELBUILD_{x}")
i = [os.environ.get(n) for n in ("OMP_NUM_THREADS", "MODELBUILD_THREADS")]
'''
    assert sorted(line for line, _ in _environ_reads(reads)) == [3, 4, 5, 6, 8, 9, 10, 11, 12]
    fine = '''
import os
os.environ["MODELBUILD_THREADS"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
child = {**os.environ, "MODELBUILD_THREADS": "2"}
run(env=os.environ)
home = os.environ.get("HF_HOME") or os.getenv("HOME")
key = os.environ.get(f"AWS_{name.upper()}")
paths = [os.environ.get(var, d) for var, d in (("AWS_CONFIG_FILE", "~/.aws/config"),)]
'''
    assert _environ_reads(fine) == []


def test_no_module_but_settings_reads_modelbuild_variables_from_the_environment():
    package = REPO / "modelbuild"
    offenders = {}
    for path in sorted(package.rglob("*.py")):
        if path == package / "settings.py":
            continue
        if reads := _environ_reads(path.read_text()):
            offenders[str(path.relative_to(REPO))] = reads
    assert offenders == {}, offenders
    assert len(list(package.rglob("*.py"))) > 50  # the scan saw the package
