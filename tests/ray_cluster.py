"""A real local Ray cluster of two nodes for tests, on 127.0.0.1 only: no mock of Ray.

* ``head``: ``ray start --head`` with 1 CPU (and no GPU); ``gpu``: a second ``ray start --address``
  node with 1 CPU and 2 *simulated* GPUs (``--num-gpus=2``, ``MODELBUILD_SIMULATED_GPUS=1`` in its
  environment), so GPU tasks must land there and CPU tasks may land on either node.
* Every port Ray opens is given explicitly, each picked by binding port 0 while all the others
  are still held (GCS, object manager, node manager, dashboard agent http/grpc,
  runtime-env agent, metrics export, and a short list of worker ports); the dashboard is off,
  and no Ray Client server starts (it needs ``ray[client]``, which we do not install).
  Nothing is left to Ray's defaults (6379, 10001, 8265 ... shared by every developer here).
* Its own temp dir, short (``/tmp/mbr-XXXX``: Unix socket paths are limited to 107 bytes).
* ``ray start --block`` runs in a new session (its own process group) per node, so stopping the
  cluster is: SIGTERM then SIGKILL to *those* process groups, then any process whose command line
  names our private temp dir (raylet/gcs/workers launched below it). ``ray stop`` is never used:
  it stops every Ray on the machine, other developers' included.
* Bounded, generous waits (``STARTUP_S``) for both nodes to be alive, for a loaded 2-core machine.

The nodes inherit the environment given to ``start_cluster`` (the S3 server's AWS variables in
tests): like real workers, they get the remote cache's credentials from their own environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
STARTUP_S = 120.0
WORKER_PORTS = 12  # worker processes per node (each takes one port); the pool is small here
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # ray's minimum is 75 MiB; default is 30% of RAM


def _ray_bin() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else "ray"


def _free_ports(n: int) -> list[int]:
    from s3server import free_ports  # one picker for every test server

    return free_ports(n)


@dataclass
class RayCluster:
    address: str  # host:port of the GCS, what RAY_ADDRESS takes
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def log_tail(self, n: int = 2000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs if p.exists())

    def our_pids(self) -> set[int]:
        """Processes started for this cluster: the ``ray start`` leaders, their process groups,
        and anything whose command line names our private temp dir."""
        pids = set()
        groups = {p.pid for p in self.procs}
        marker = str(self.temp_dir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                pid = int(entry.name)
                if os.getpgid(pid) in groups or marker in (entry / "cmdline").read_bytes():
                    pids.add(pid)
        return pids - {os.getpid()}

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            for pid in self.our_pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self.our_pids():
                for proc in self.procs:
                    proc.poll()
                time.sleep(0.2)
            if not self.our_pids():
                break
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _node_argv(ports: list[int], head: bool, temp_dir: Path, address: str | None) -> list[str]:
    names = ["object-manager", "node-manager", "dashboard-agent-listen", "dashboard-agent-grpc",
             "runtime-env-agent", "metrics-export"]
    argv = [_ray_bin(), "start", "--block", f"--node-ip-address={HOST}", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", f"--object-store-memory={OBJECT_STORE_BYTES}", "--log-style=record"]
    for name in names:
        argv.append(f"--{name}-port={ports.pop()}")
    argv.append("--worker-port-list=" + ",".join(str(ports.pop()) for _ in range(WORKER_PORTS)))
    if head:
        argv += ["--head", f"--port={ports.pop()}",
                 "--include-dashboard=false", f"--dashboard-host={HOST}", "--num-cpus=1", "--num-gpus=0"]
    else:
        argv += [f"--address={address}", "--num-cpus=1", "--num-gpus=2"]
    return argv


def _alive_nodes(address: str, env: dict) -> list[dict]:
    """Alive nodes as ``ray list nodes`` would say, asked in a child process (no ray in pytest)."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'Resources')} for n in ray.nodes()]))") % address
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return []
    if out.returncode != 0:
        return []
    import json

    return [n for n in json.loads(out.stdout.strip().splitlines()[-1]) if n["Alive"]]


def start_cluster(env: dict | None = None, startup_s: float = STARTUP_S) -> RayCluster:
    """Start head + simulated-GPU node; return once both are alive (raise with log tails if not)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="mbr-", dir="/tmp"))
    ports = _free_ports(2 * (6 + WORKER_PORTS) + 1)
    (temp_dir / "tmp").mkdir()  # TMPDIR of the nodes: stage scratch dirs go with the cluster
    base_env = {**os.environ, **(env or {}), "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(temp_dir / "tmp")}
    base_env.pop("RAY_ADDRESS", None)
    cluster = RayCluster(address="", temp_dir=temp_dir)
    try:
        head_argv = _node_argv(ports, True, temp_dir, None)
        gcs_port = next(int(a.split("=")[1]) for a in head_argv if a.startswith("--port="))
        cluster.address = f"{HOST}:{gcs_port}"
        for name, argv, extra in (("head", head_argv, {}),
                                  ("gpu", _node_argv(ports, False, temp_dir, cluster.address),
                                   {"MODELBUILD_SIMULATED_GPUS": "1"})):
            log = temp_dir / f"{name}.log"
            cluster.logs.append(log)
            with open(log, "ab") as handle:
                cluster.procs.append(subprocess.Popen(argv, env={**base_env, **extra}, stdin=subprocess.DEVNULL,
                                                      stdout=handle, stderr=subprocess.STDOUT, start_new_session=True))
            if name == "head":
                _wait(lambda: _port_open(gcs_port), startup_s, cluster, "the head's GCS port")
        _wait(lambda: len(_alive_nodes(cluster.address, base_env)) >= 2, startup_s, cluster, "two alive nodes")
        return cluster
    except BaseException:
        cluster.stop()
        raise


def _port_open(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
        return True
    return False


def _wait(ready, timeout: float, cluster: RayCluster, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in cluster.procs):
            raise RuntimeError(f"ray start exited before {what}; logs:\n{cluster.log_tail()}")
        if ready():
            return
        time.sleep(0.5)
    raise RuntimeError(f"Ray cluster: no {what} within {timeout:.0f} s; logs:\n{cluster.log_tail()}")
