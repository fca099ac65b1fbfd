"""Recipes and matrices: the templates in target files, expanded into plain target tables.

    [recipe.travel]                   # a template, instantiated by [[use]]
    required = ["model"]              # vars each use must give
    vars = { steps = 100 }            # vars with defaults
    [recipe.travel.target."{model}-travel-adapter"]
    params = { max_steps = "{steps}" }

    [[use]]
    recipe = "travel"
    vars = { model = "smollm2", steps = 40 }

A string that is exactly "{var}" becomes the var's value with its TOML type; "{var}" inside a
longer string is replaced by its text; "{{" and "}}" are literal braces. A ``matrix`` expands
one target (plain or in a recipe) into one per combination, at most ``MAX_MATRIX``. Errors are
one-line ``UserError``s naming the file, the recipe or target, and the key.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from .. import UserError

# A matrix multiplies targets; past this many combinations it is a typo (or a hang), not a plan.
MAX_MATRIX = 1000
VAR_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
WHOLE_VAR_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def table_of(doc: dict, key: str, rel: str, what: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"{rel}: {what}: expected a table, got {type(value).__name__}")
    return value


def check_keys(table: dict, allowed: set[str], rel: str, what: str) -> None:
    for key in table:
        if key not in allowed:
            raise UserError(f"{rel}: {what}: {key}: unknown key (known: {', '.join(sorted(allowed))})")


def expand_use(rel: str, index: int, use: dict, recipes: dict) -> list[tuple[str, str, dict, str]]:
    recipe_name = use.get("recipe")
    if not isinstance(recipe_name, str):
        raise UserError(f"{rel}: use #{index}: recipe: expected a recipe name")
    if recipe_name not in recipes:
        raise UserError(f"{rel}: use #{index}: recipe: unknown recipe '{recipe_name}'")
    recipe_file, recipe = recipes[recipe_name]
    given = table_of(use, "vars", rel, f"use #{index}")
    defaults = table_of(recipe, "vars", recipe_file, f"recipe '{recipe_name}'")
    required = recipe.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise UserError(f"{recipe_file}: recipe '{recipe_name}': required: expected a list of var names")
    for key in given:
        if key not in defaults and key not in required:
            raise UserError(f"{rel}: use #{index}: vars.{key}: recipe '{recipe_name}' has no such var")
    for key in required:
        if key not in given:
            raise UserError(f"{rel}: use #{index}: vars.{key}: required by recipe '{recipe_name}' but not given")
    variables = {**defaults, **given}
    label = ", ".join(f"{k}={variables[k]}" for k in required) or f"use #{index}"
    origin = f"recipe '{recipe_name}', {label}"
    out = []
    for template_name, table in table_of(recipe, "target", recipe_file, f"recipe '{recipe_name}'").items():
        table = table_of({"t": table}, "t", recipe_file, f"recipe '{recipe_name}': target '{template_name}'")
        where = f"{recipe_file}: recipe '{recipe_name}': target '{template_name}' ({label})"
        for name, expanded, matrix_label in expand_matrix(template_name, table, variables, where):
            out.append((recipe_file, name, expanded, origin + (f", matrix {matrix_label}" if matrix_label else "")))
    return out


def expand_matrix(template_name: str, table: dict, variables: dict | None, where: str) -> list[tuple[str, dict, str]]:
    """One (name, table, label) per combination of the target's ``matrix``; one if it has none.

    ``matrix = { device = ["cpu", "cuda"], variant = [{ name = "int4-rtn", algorithm = "rtn" }] }``
    gives a target per (device, variant). A table entry sets ``{variant}`` to its ``name`` and
    each of its other keys as a var of its own. The target name must use every matrix key, so
    each combination gets its own name. Entry values may use the recipe's vars
    (``bundle = ":{model}-travel-cpu-fp32"``). ``variables`` is None for a plain target: it is taken
    as written unless it has a matrix (then, as in recipes, literal braces are "{{" and "}}").
    """
    matrix = table.get("matrix")
    if matrix is None and variables is None:
        return [(template_name, table, "")]
    if matrix is None:
        name = substitute(template_name, variables, f"{where}: name")
        if not isinstance(name, str):
            raise UserError(f"{where}: name: must expand to a string")
        return [(name, substitute(table, variables, where), "")]
    if not isinstance(matrix, dict) or not matrix:
        raise UserError(f"{where}: matrix: expected a table of var = [values]")
    axes: list[list[tuple[str, dict]]] = []
    for key, values in matrix.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: matrix.{key}: expected a non-empty list of values")
        if f"{{{key}}}" not in template_name:
            raise UserError(f"{where}: matrix.{key}: the target name must contain {{{key}}} so each variant gets its own name")
        axis = []
        for i, value in enumerate(values):
            if isinstance(value, dict):
                if not isinstance(value.get("name"), str):
                    raise UserError(f"{where}: matrix.{key}[{i}]: a table entry needs a string 'name'")
                fields = {k: substitute(v, variables or {}, f"{where}: matrix.{key}[{i}]", k) for k, v in value.items() if k != "name"}
                axis.append((value["name"], {**fields, key: value["name"]}))
            elif isinstance(value, (str, int, float, bool)):
                axis.append((str(value), {key: value}))
            else:
                raise UserError(f"{where}: matrix.{key}[{i}]: expected a string, number, boolean or table")
        axes.append(axis)
    combinations = math.prod(len(axis) for axis in axes)
    if combinations > MAX_MATRIX:
        sizes = " x ".join(str(len(axis)) for axis in axes)
        raise UserError(f"{where}: matrix: {sizes} = {combinations} targets, more than {MAX_MATRIX}; "
                        "split it into several matrices or recipes")
    body = {k: v for k, v in table.items() if k != "matrix"}
    out = []
    for combination in itertools.product(*axes):
        combined = dict(variables or {})
        for _, assigned in combination:
            combined.update(assigned)
        label = ", ".join(f"{key}={shown}" for key, (shown, _) in zip(matrix, combination))
        at = f"{where} [{label}]"
        name = substitute(template_name, combined, f"{at}: name")
        if not isinstance(name, str):
            raise UserError(f"{at}: name: must expand to a string")
        out.append((name, substitute(body, combined, at), label))
    return out


def substitute(value: Any, variables: dict, where: str, key: str = "") -> Any:
    """Expand {var} placeholders in a recipe value; ``key`` is the dotted key path for errors."""
    if isinstance(value, dict):
        return {k: substitute(v, variables, where, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    at = f"{where}: {key}" if key else where
    whole = WHOLE_VAR_RE.match(value)
    if whole:
        return _lookup(whole.group(1), variables, at)

    def replace(match: re.Match) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        return str(_lookup(match.group(1), variables, at))

    return VAR_RE.sub(replace, value)


def _lookup(var: str, variables: dict, where: str) -> Any:
    if var not in variables:
        raise UserError(f"{where}: unknown variable '{{{var}}}' (vars: {', '.join(sorted(variables)) or 'none'})")
    return variables[var]
