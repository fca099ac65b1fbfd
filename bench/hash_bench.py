"""Hashing throughput per algorithm on this machine (the digest every build input goes through).

    .venv/bin/python bench/hash_bench.py [--size-mb 1024]

Hashes one file of random bytes (warm in the page cache, as on a no-op rebuild that misses the
stat cache) with each candidate, best of 3, and writes bench/results/hash_bench.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
CHUNK = 1 << 20


def candidates():
    out = {
        "sha256 (hashlib)": lambda: hashlib.sha256(),
        "blake2b (hashlib)": lambda: hashlib.blake2b(),
        "md5 (hashlib, what doit uses)": lambda: hashlib.md5(),
    }
    try:
        import blake3

        out["blake3 (1 thread)"] = lambda: blake3.blake3()
        out["blake3 (all cores)"] = lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)
        out["blake3 (mmap, all cores: modelbuild's digest)"] = "mmap"
    except ImportError:
        pass
    try:
        import xxhash

        out["xxh3_128 (not cryptographic)"] = lambda: xxhash.xxh3_128()
    except ImportError:
        pass
    return out


def throughput(path: Path, make) -> float:
    best = float("inf")
    for _ in range(3):
        if make == "mmap":
            from modelbuild.core.digest import hash_file

            started = time.perf_counter()
            hash_file(path)
            best = min(best, time.perf_counter() - started)
            continue
        digest = make()
        started = time.perf_counter()
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        digest.hexdigest()
        best = min(best, time.perf_counter() - started)
    return path.stat().st_size / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hash_bench.json"))
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile() as handle:
        block = os.urandom(CHUNK)
        for _ in range(args.size_mb):
            handle.write(block)
        handle.flush()
        path = Path(handle.name)
        with open(path, "rb") as warm:
            while warm.read(1 << 24):
                pass
        results = {name: round(throughput(path, make), 3) for name, make in candidates().items()}
    print(f"| algorithm | GB/s ({args.size_mb} MB file, warm cache, {os.cpu_count()} cores) |")
    print("|---|---|")
    for name, gbps in sorted(results.items(), key=lambda item: -item[1]):
        print(f"| {name} | {gbps:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size_mb": args.size_mb, "gb_per_s": results}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
