"""Team pull: a fresh clone with an empty local cache builds from a warm remote cache.

Starts SeaweedFS on 127.0.0.1 (tests/s3server.py), then, each in a fresh copy of the project
(dodo.py + targets/) with its own empty cache folder:

1. clone A builds the target cold with ``MODELBUILD_REMOTE_CACHE`` set: every pass runs and its
   outputs are pushed (this is the cold local build, push included);
2. clone B, empty local cache, same remote: ``doit`` restores every stage from the remote
   (wall time, bytes downloaded, passes run: must be 0; outputs byte-identical to A's);
3. B again after deleting build/: every stage restored from the local tier the pull filled;
4. clone C, empty local cache, ``MODELBUILD_DOWNLOAD=toplevel`` (minimal download): only the
   target's own files come down, its upstream stages are stamped and left on the remote.

Prints a table and updates bench/results/team_pull.json (one entry per target).

    .venv/bin/python bench/team_pull.py                                       # SmolLM2 default target (minutes)
    .venv/bin/python bench/team_pull.py --target tiny-travel-cpu-int4-smoke   # about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from s3server import make_bucket, start_weed, stop_weed  # noqa: E402


def new_clone(workdir: Path, name: str) -> Path:
    project = workdir / name
    project.mkdir()
    shutil.copy(REPO / "dodo.py", project)
    shutil.copytree(REPO / "targets", project / "targets")
    cache = workdir / f"{name}-cache"
    cache.mkdir()  # empty: only the sha256-pinned model downloads are shared (they are sources, not outputs)
    (cache / "downloads").symlink_to(REPO / "cache" / "downloads")
    return project


def doit(project: Path, target: str, env: dict) -> tuple[float, str]:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "MODELBUILD_CACHE": str(project.parent / f"{project.name}-cache"), **env}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "doit", target], cwd=project, env=full,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"doit {target} failed in {project}:\n{proc.stdout[-3000:]}")
    return seconds, proc.stdout


def stamps(project: Path, stages: list[str]) -> dict[str, dict]:
    return {s: json.loads((project / "build" / s / ".modelbuild" / "stamp.json").read_text()) for s in stages}


def fetched_bytes(stamp: dict) -> int:
    """What a remote restore of this stage downloads: each distinct object of its manifest once."""
    return sum({info["digest"]: info["size"] for info in stamp["manifest"].values()}.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-travel-cpu-int4-smoke")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "team_pull.json"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="modelbuild-team-pull-"))
    server = None
    try:
        server = start_weed(workdir / "weed")
        make_bucket(server, "team")
        env = {**server.env(), "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
               "MODELBUILD_REMOTE_CACHE": "s3://team/modelbuild"}
        a, b, c = new_clone(workdir, "a"), new_clone(workdir, "b"), new_clone(workdir, "c")

        print(f"clone A: cold build of {args.target} (pushing to the remote) ...", flush=True)
        cold_s, cold_out = doit(a, args.target, env)
        stages = re.findall(r"^\.  (\S+)$", cold_out, re.M)
        ran_a = re.findall(r"modelbuild: '(\S+)' running on", cold_out)
        pushed = re.findall(r"modelbuild: '(\S+)': pushed to the remote cache \((\d+) objects, ([\d.]+) MB", cold_out)

        print("clone B: empty local cache, same remote ...", flush=True)
        pull_s, pull_out = doit(b, args.target, env)
        ran_b = re.findall(r"modelbuild: '(\S+)' running on", pull_out)
        from_remote = re.findall(r"modelbuild: '(\S+)': restored from the remote cache", pull_out)
        a_stamps, b_stamps = stamps(a, stages), stamps(b, stages)
        identical = all(a_stamps[s]["manifest"] == b_stamps[s]["manifest"] for s in stages)
        rekeyed = [s for s in stages if a_stamps[s]["action_key"] != b_stamps[s]["action_key"]]
        downloaded = sum(fetched_bytes(b_stamps[s]) for s in from_remote)

        shutil.rmtree(b / "build")
        local_s, local_out = doit(b, args.target, env)
        from_local = re.findall(r"modelbuild: '(\S+)': restored from cache", local_out)

        print("clone C: empty local cache, same remote, minimal download ...", flush=True)
        minimal_s, minimal_out = doit(c, args.target, {**env, "MODELBUILD_DOWNLOAD": "toplevel"})
        ran_c = re.findall(r"modelbuild: '(\S+)' running on", minimal_out)
        c_stamps = stamps(c, stages)
        minimal_fetched = re.findall(r"modelbuild: '(\S+)': restored from the remote cache", minimal_out)
        left = [s for s in stages if c_stamps[s].get("left_on_remote")]
        minimal_identical = all(a_stamps[s]["manifest"] == c_stamps[s]["manifest"] for s in stages)
        minimal_bytes = sum(fetched_bytes(c_stamps[s]) for s in minimal_fetched)
    finally:
        if server is not None:
            stop_weed(server)
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "target": args.target,
        "stages": stages,
        "cold_build_with_push_s": round(cold_s, 2),
        "cold_passes_run": len(ran_a),
        "cold_stage_seconds": {s: a_stamps[s]["seconds"] for s in stages},
        "pushed_mb": round(sum(float(mb) for _, _, mb in pushed), 1),
        "team_pull_s": round(pull_s, 2),
        "team_pull_passes_run": len(ran_b),
        "team_pull_restored_from_remote": len(from_remote),
        "team_pull_bytes_downloaded": downloaded,
        "byte_identical_to_clone_a": identical,
        "action_keys_changed_meanwhile": rekeyed,
        "local_tier_restore_s": round(local_s, 2),
        "minimal_download_s": round(minimal_s, 2),
        "minimal_download_passes_run": len(ran_c),
        "minimal_download_bytes_downloaded": minimal_bytes,
        "minimal_download_left_on_remote": left,
        "minimal_download_identical_stamps": minimal_identical,
        "local_tier_restored": len(from_local),
        "pull_vs_cold": round(pull_s / cold_s, 4),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows = [
        ("clone A: cold build (every pass runs, outputs pushed)", cold_s, f"{len(ran_a)} passes run, {result['pushed_mb']} MB pushed"),
        ("clone B: empty cache, warm remote (team pull)", pull_s,
         f"{len(ran_b)} passes run, {len(from_remote)}/{len(stages)} restored from the remote, "
         f"{downloaded / 1e6:.1f} MB downloaded, byte-identical: {identical}"),
        ("clone B again, build/ deleted (local tier)", local_s, f"{len(from_local)}/{len(stages)} restored from the local cache"),
        ("clone C: empty cache, warm remote, MODELBUILD_DOWNLOAD=toplevel", minimal_s,
         f"{len(ran_c)} passes run, {len(left)}/{len(stages)} left on the remote, {minimal_bytes / 1e3:.1f} kB "
         f"downloaded, same stamps: {minimal_identical}"),
    ]
    print(f"\n{args.target}\n| scenario | wall s | what happened |\n|---|---|---|")
    for name, seconds, what in rows:
        print(f"| {name} | {seconds:.2f} | {what} |")
    print(f"team pull / cold build: {result['pull_vs_cold']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous[args.target] = result
    out.write_text(json.dumps(previous, indent=1, sort_keys=True) + "\n")
    print(f"written: {out}")
    if rekeyed:  # a shared working tree edited while the bench ran: B's stages are other actions
        sys.exit(f"INVALID: action keys changed between clone A and clone B for {', '.join(rekeyed)} "
                 "(pass code or params edited while the bench ran); run it again on a quiet tree")
    if ran_b or not identical or len(from_remote) != len(stages):
        sys.exit("FAILED: the team pull ran a pass, missed a stage or differs from clone A")
    if ran_c or not minimal_identical or len(left) != len(stages) - 1:
        sys.exit("FAILED: the minimal-download pull ran a pass, differs from clone A or downloaded an upstream stage")


if __name__ == "__main__":
    main()
