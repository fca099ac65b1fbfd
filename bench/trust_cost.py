"""What trust costs: signing and checking one cache entry, and a team pull with trusted keys
against the same pull without, measured side by side in one run.

    .venv/bin/python bench/trust_cost.py                                        # tiny chain (a few minutes)
    .venv/bin/python bench/trust_cost.py --target smollm2-travel-cpu-int4-smoke --pulls 3

1. Per entry: the real entry of every stage of a cold build of ``--target`` (clone A, signing with
   a key made by ``keys generate``), signed with core/signing.py (``signed``) and checked
   (``signature_problem``) ``--reps`` times each; median microseconds per entry.
2. Team pull: ``--pulls`` pairs of fresh clones with empty local caches pull ``--target`` from the
   warm remote A pushed to, alternating one with ``MODELBUILD_TRUSTED_KEYS`` = A's public key and
   one without (entries not signature-checked), so the machine's load falls on both alike. Every
   pull must run no pass and restore every stage. Median wall seconds of each, and their ratio
   (goal: within 5 %).

Starts SeaweedFS on 127.0.0.1 (tests/s3server.py) and stops it. Prints a table and writes
bench/results/trust_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
from s3server import make_bucket, start_weed, stop_weed  # noqa: E402
from team_pull import doit, new_clone, stamps  # noqa: E402


def per_entry_cost(entries: list[dict], key_path: Path, reps: int) -> dict:
    from modelbuild.core.signing import load_signer, signature_problem, signed

    signer = load_signer(key_path, "bench")
    trusted = {signer.key_id: signer.public}
    sign_us, check_us = [], []
    for _ in range(reps):
        for entry in entries:
            started = time.perf_counter()
            record = signed(entry, signer)
            sign_us.append((time.perf_counter() - started) * 1e6)
            started = time.perf_counter()
            problem, _ = signature_problem(record, trusted)
            check_us.append((time.perf_counter() - started) * 1e6)
            assert problem is None, problem
    return {"entries": len(entries), "reps": reps, "sign_us_median": round(statistics.median(sign_us), 1),
            "check_us_median": round(statistics.median(check_us), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="tiny-travel-cpu-int4-smoke")
    parser.add_argument("--pulls", type=int, default=3, help="pairs of pulls (trusted, untrusted)")
    parser.add_argument("--reps", type=int, default=200, help="sign/check repetitions per entry")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "trust_cost.json"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="modelbuild-trust-cost-"))
    server = None
    try:
        server = start_weed(workdir / "weed")
        make_bucket(server, "team")
        keys = workdir / "keys"
        subprocess.run([sys.executable, "-m", "modelbuild", "keys", "generate", str(keys)], check=True,
                       stdout=subprocess.DEVNULL)
        env = {**server.env(), "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
               "MODELBUILD_REMOTE_CACHE": "s3://team/modelbuild"}
        a = new_clone(workdir, "a")
        print(f"clone A: cold build of {args.target}, signing its pushes ...", flush=True)
        cold_s, cold_out = doit(a, args.target, {**env, "MODELBUILD_SIGNING_KEY": str(keys / "modelbuild.key")})
        stages = re.findall(r"^\.  (\S+)$", cold_out, re.M)
        entries = list(stamps(a, stages).values())
        cost = per_entry_cost(entries, keys / "modelbuild.key", args.reps)

        pulls: dict[str, list[float]] = {"trusted": [], "untrusted": []}
        for i in range(args.pulls):
            for mode in ("trusted", "untrusted") if i % 2 == 0 else ("untrusted", "trusted"):
                clone = new_clone(workdir, f"{mode}-{i}")
                extra = {"MODELBUILD_TRUSTED_KEYS": str(keys / "modelbuild.pub")} if mode == "trusted" else {}
                seconds, out = doit(clone, args.target, {**env, **extra})
                restored = re.findall(r"modelbuild: '(\S+)': restored from the remote cache", out)
                if "running on" in out or sorted(restored) != sorted(stages):
                    sys.exit(f"FAILED: the {mode} pull ran a pass or missed a stage:\n{out[-3000:]}")
                pulls[mode].append(seconds)
                print(f"pull {i} {mode}: {seconds:.2f} s", flush=True)
    finally:
        if server is not None:
            stop_weed(server)
        shutil.rmtree(workdir, ignore_errors=True)

    trusted, untrusted = statistics.median(pulls["trusted"]), statistics.median(pulls["untrusted"])
    result = {
        "target": args.target,
        "stages": stages,
        "cold_build_s": round(cold_s, 2),
        "per_entry": cost,
        "pull_trusted_s": [round(s, 2) for s in pulls["trusted"]],
        "pull_untrusted_s": [round(s, 2) for s in pulls["untrusted"]],
        "pull_trusted_median_s": round(trusted, 2),
        "pull_untrusted_median_s": round(untrusted, 2),
        "trusted_vs_untrusted": round(trusted / untrusted, 4),
        "goal": "trusted pull within 5 % of the untrusted one",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_1min": round(os.getloadavg()[0], 1)},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"\n{args.target}: {len(stages)} stages")
    print(f"sign one entry: {cost['sign_us_median']} us, check one entry: {cost['check_us_median']} us (median)")
    print(f"team pull, trusted keys: {trusted:.2f} s; without: {untrusted:.2f} s; ratio {result['trusted_vs_untrusted']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous[args.target] = result
    out.write_text(json.dumps(previous, indent=1, sort_keys=True) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
