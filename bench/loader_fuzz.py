"""Fuzz the target-file loader: random mutations of the real targets/*.toml must never give a
traceback or a hang; every load ends as a valid graph (exit 0) or one user-error line (exit 2)
within a second.

    .venv/bin/python bench/loader_fuzz.py [--runs 1000] [--seed 0] [--every 25]

Each run copies the project's targets/ into a scratch project, applies 1-3 random mutations to
one target file (text level: lines deleted, duplicated, swapped or truncated; values replaced by
other types, non-finite numbers, huge or negative numbers, paths outside the project, unknown
target references, links, non-UTF-8 bytes), and loads it in-process the way `doit` does (graph,
machine, doit config, task dicts). Every ``--every``-th mutation also runs the real
`doit list` in a subprocess to check the exit code and output end to end. A load that raises
anything but a UserError, or takes longer than the limit, is written to
bench/results/loader_fuzz_failures/ with its traceback. Prints a table and writes
bench/results/loader_fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modelbuild import UserError  # noqa: E402

LIMIT_S = 1.0
HANG_S = 10
VALUES = [
    '""', '"x"', "0", "-1", "1e308", "-1e308", "nan", "inf", "-inf", "true", "[]", "{}", '["a", 1]', "{ a = 1 }",
    '":ghost"', '"/etc"', '"../../../etc/passwd"', '"data/../../outside.jsonl"', '":tiny-base"', '"{model}"', '"{nope}"',
    '"<= 5"', '">= abc"', "3.5", "99999999999999999999", '"' + "x" * 300 + '"', '"cuda:7"', '"tpu"', '"int3"',
    '{ filename = "../../x.onnx" }', '{ hf_token = "hf_secret" }', "[1, 2, 3]", '"list"',
]
VALUE_RE = re.compile(r"(=\s*)(\"(?:[^\"\\]|\\.)*\"|[-+0-9.eE]+|true|false|\[[^\]\n]*\]|\{[^}\n]*\})")


def mutate(text: str, rng: random.Random) -> str | bytes:
    lines = text.splitlines(keepends=True)
    kind = rng.choice(["value", "value", "value", "delete", "duplicate", "swap", "truncate", "key", "bytes", "header"])
    if kind == "value":
        spots = list(VALUE_RE.finditer(text))
        if spots:
            spot = rng.choice(spots)
            return text[:spot.start(2)] + rng.choice(VALUES) + text[spot.end(2):]
    if kind == "delete" and lines:
        del lines[rng.randrange(len(lines))]
    elif kind == "duplicate" and lines:
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif kind == "swap" and len(lines) > 1:
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "truncate":
        return text[: rng.randrange(len(text) + 1)]
    elif kind == "key":
        keys = list(re.finditer(r"(?m)^(\w+)\s*=", text))
        if keys:
            spot = rng.choice(keys)
            return text[:spot.start(1)] + rng.choice(["pas", "inputs", "params", "matrix", "gates", "device", "x"]) + text[spot.end(1):]
    elif kind == "bytes":
        raw = text.encode()
        i = rng.randrange(len(raw) + 1)
        return raw[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + raw[i:]
    elif kind == "header":
        headers = list(re.finditer(r"(?m)^\[+[^\]\n]+\]+", text))
        if headers:
            spot = rng.choice(headers)
            return text[:spot.start()] + rng.choice(["[target]", "[target.list]", "[[target.x]]", '[target."a b"]', "[devices]", "[recipe.r.target.x]"]) + text[spot.end():]
    return "".join(lines)


def load_like_doit(root: Path) -> int:
    """What `doit` does on loading, in-process: 0 for a graph, 2 for a UserError (anything else raises)."""
    from modelbuild import tasks

    tasks._loaded.clear()  # each fuzzed file is a new doit process
    try:
        project = tasks.project_at(root)
        tasks.doit_config(root)
        list(tasks.task_dicts(project))
        list(tasks.group_task_dicts(project))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


class Hang(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=25, help="run the real `doit list` for every N-th mutation")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = REPO / "bench" / "results"
    failures = results / "loader_fuzz_failures"
    shutil.rmtree(failures, ignore_errors=True)
    files = sorted((REPO / "targets").glob("*.toml"))
    counts = {"exit_0": 0, "exit_2": 0, "tracebacks": 0, "hangs": 0, "slow": 0}
    seconds, cli = [], {"runs": 0, "bad_exit": 0, "tracebacks": 0, "max_s": 0.0}
    os.environ.setdefault("MODELBUILD_GPUS", "none")

    def alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    # keep the no-op path quiet: the loader prints its one line to stderr
    with tempfile.TemporaryDirectory(prefix="loader-fuzz-") as scratch:
        root = Path(scratch) / "project"
        os.environ["MODELBUILD_CACHE"] = str(Path(scratch) / "cache")
        for run in range(args.runs):
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(REPO / "targets", root / "targets")
            shutil.copy(REPO / "dodo.py", root / "dodo.py")
            victim = root / "targets" / rng.choice(files).name
            content: str | bytes = victim.read_text()
            for _ in range(rng.randint(1, 3)):
                content = mutate(content if isinstance(content, str) else content.decode("utf-8", "replace"), rng)
            victim.write_bytes(content if isinstance(content, bytes) else content.encode())
            started = time.perf_counter()
            signal.alarm(HANG_S)
            stderr = sys.stderr
            try:
                sys.stderr = open(os.devnull, "w")
                code = load_like_doit(root)
            except Hang:
                code = "hang"
            except UserError:
                code = "uncaught UserError"
            except BaseException:  # the point of the fuzz: anything else is a traceback
                code = traceback.format_exc()
            finally:
                signal.alarm(0)
                sys.stderr.close()
                sys.stderr = stderr
            elapsed = time.perf_counter() - started
            seconds.append(elapsed)
            if code in (0, 2):
                counts[f"exit_{code}"] += 1
            else:
                counts["hangs" if code == "hang" else "tracebacks"] += 1
                failures.mkdir(parents=True, exist_ok=True)
                shutil.copy(victim, failures / f"{run:05d}-{victim.name}")
                (failures / f"{run:05d}.txt").write_text(str(code))
            if elapsed > LIMIT_S:
                counts["slow"] += 1
            if args.every and run % args.every == 0:
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=root, capture_output=True, text=True)
                took = time.perf_counter() - t0
                cli["runs"] += 1
                cli["max_s"] = max(cli["max_s"], round(took, 3))
                cli["bad_exit"] += proc.returncode not in (0, 2)
                cli["tracebacks"] += "Traceback" in proc.stdout + proc.stderr
    report = {
        "runs": args.runs, "seed": args.seed, **counts,
        "load_s_median": round(statistics.median(seconds), 4), "load_s_max": round(max(seconds), 4),
        "limit_s": LIMIT_S, "doit_list_subprocess": cli,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "loader_fuzz.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'runs':>24} {args.runs}")
    for key, value in report.items():
        if key not in ("runs",):
            print(f"{key:>24} {value}")
    return 0 if not (counts["tracebacks"] or counts["hangs"] or counts["slow"] or cli["bad_exit"] or cli["tracebacks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
