"""Where genai-build's torch check draws its lines: builder output vs torch fp32 logits per precision.

    .venv/bin/python bench/logit_check.py [--model smollm2] [--prompt "Hello! Who are you?"]

Builds ``{model}-base`` in a fresh copy of the project (a warm MODELBUILD_CACHE restores it),
then runs the onnxruntime-genai model builder on it at fp32, int8, int4 k_quant_mixed and int4
RTN (the default target's options, no adapter) and compares each build's logits on the prompt
with torch fp32 exactly as genai-build does (modelbuild.ml.genai.logit_agreement). Prints a table
and writes bench/results/logit_check_<model>.json. The trap row of docs/recipe.md comes from
tests/test_tiny_recipe.py::test_genai_build_refuses_a_bundle_that_does_not_match_torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from scratch import scratch_project  # noqa: E402

BUILDS = {
    "fp32": ("fp32", []),
    "int8": ("int8", ["accuracy_level=4"]),
    "int4 k_quant_mixed": ("int4", ["accuracy_level=4", "algo_config=k_quant_mixed", "block_size=32", "is_symmetric=true"]),
    "int4 rtn": ("int4", ["accuracy_level=4", "algo_config=rtn", "block_size=32", "is_symmetric=true"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", default="Hello! Who are you?")
    args = parser.parse_args()
    os.environ["GIT_DIR"] = os.devnull  # the builder stamps a repo's commit otherwise (see stage.py)
    from modelbuild.ml.genai import bundle_logits, logit_agreement
    from modelbuild.ml.hf import probe_ids, torch_logits

    with tempfile.TemporaryDirectory(prefix="logit-check-") as scratch:
        scratch = Path(scratch)
        project, env = scratch_project(scratch, os.environ.get("MODELBUILD_CACHE"))
        subprocess.run([sys.executable, "-m", "doit", f"{args.model}-base"], cwd=project, env=env, check=True)
        base = project / "build" / f"{args.model}-base"
        ids = probe_ids(base, args.prompt)
        expected = torch_logits(base, ids)
        from onnxruntime_genai.models.builder import create_model, parse_extra_options

        rows = {}
        for name, (precision, options) in BUILDS.items():
            out = scratch / name.replace(" ", "-")
            opts = parse_extra_options(None, str(base), str(out), precision, "cpu", str(scratch / "bc"), options)
            create_model(None, str(base), str(out), precision, "cpu", str(scratch / "bc"), **opts)
            rows[name] = logit_agreement(expected, bundle_logits(out, ids))
            shutil.rmtree(out)
    print(f"\n{args.model}, {len(ids)} tokens of {args.prompt!r}")
    print(f"{'build':<20} {'max |dlogit|':>12} {'correlation':>12} {'top-1':>7}")
    for name, row in rows.items():
        print(f"{name:<20} {row['max_abs']:>12.4g} {row['correlation']:>12.4f} {row['top1_agreement']:>7.0%}")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"logit_check_{args.model}.json").write_text(
        json.dumps({"model": args.model, "prompt": args.prompt, "tokens": len(ids), "builds": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
