"""Run one stage as a Ray task: the driver keeps deciding *what* runs, Ray decides *where*.

Only the Ray executor imports this module, and ``ray`` itself is imported inside functions, so
loading targets never pays for it.

Data path (a worker never reads the driver's filesystem):

1. the driver hashes the stage's input files and folders, uploads the objects the remote cache
   (remote.py) lacks, then a small *inputs manifest* (``actions/ray-inputs-<digest>.json``);
   an upstream artifact already in the remote is passed as its manifest and uploads nothing;
2. the Ray task fetches every input by digest into a scratch folder (re-hashed, all or nothing),
   writes a plan.json with those local paths and runs ``python -m modelbuild.exec.worker plan.json`` in
   its own process, exactly as the local executor does;
3. it hashes the outputs, pushes the objects, then the *result manifest* last
   (``actions/ray-result-<run>.json``), and returns it; the driver fetches what it needs
   (``fetch_outputs``). A task that dies or is cancelled before step 3 ends pushes no result.

Resources come from the stage's device: ``cpu`` asks ``num_cpus = threads``; ``cuda`` asks
``num_gpus = 1``, or ``gpu_memory_gb / GPU memory`` of one GPU (so small stages share a GPU),
and ``num_cpus = 0`` (as a local GPU slot takes no CPU slot). The pass process sees
``CUDA_VISIBLE_DEVICES`` = the GPU ids Ray assigned, like a local slot. ``cuda:N`` is refused:
an index names a GPU of one machine, Ray places by resources, and pinning would either lie to
Ray's accounting or strand the stage; use ``cuda``.

Library versions: the action key is computed on the driver and already holds python, platform
and library versions. A worker whose versions differ would file its output under a key that
does not describe it, so the task checks *before* running (fails fast, no GPU time spent) and
the driver checks the versions the result reports again before anything is recorded: either
way a one-line ``RayStageError``, never a poisoned cache. The same holds for the CPU code branch
the key records (numerics.py): a node whose CPU lacks it refuses before running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from pathlib import Path

from ..core import settings
from .devices import stage_environment
from ..core.digest import hash_file, hash_json, walk_files
from ..core.key import versions
from ..core.numerics import missing
from .worker import placed, run_worker

NAMESPACE = "modelbuild"
CONNECT_TIMEOUT_S = 5.0  # an unreachable cluster is an error in seconds, not Ray's minute of retries
POLL_S = 0.2  # how often the driver's wait wakes up, so Ctrl-C is handled promptly
DEFAULT_GPU_MEMORY_GB = 16.0  # when the node does not say (GPU memory is not a Ray resource)


class RayStageError(Exception):
    """A stage could not run on Ray; the message is one line."""


def check_versions(expected: dict, reported: dict, where: str) -> None:
    """One-line refusal naming the first few differences."""
    diffs = []
    for field in ("python", "platform"):
        if expected.get(field) != reported.get(field):
            diffs.append(f"{field} {reported.get(field)} (driver {expected.get(field)})")
    theirs = reported.get("libraries", {})
    for name, mine in sorted(expected.get("libraries", {}).items()):
        if theirs.get(name) != mine:
            diffs.append(f"{name} {theirs.get(name, 'not reported')} (driver {mine})")
    if diffs:
        raise RayStageError(f"{where} has other versions than the driver: {', '.join(diffs[:4])}"
                            f"{' ...' if len(diffs) > 4 else ''}; install the same environment on every node")


def resources(device: str, threads: int, gpu_memory_gb: float | None, gpu_total_gb: float) -> dict:
    """Ray task options for a stage on ``device``."""
    if device == "cpu":
        return {"num_cpus": max(1, int(threads)), "num_gpus": 0}
    if device == "cuda":
        share = 1.0 if gpu_memory_gb is None else min(1.0, gpu_memory_gb / gpu_total_gb)
        return {"num_cpus": 0, "num_gpus": round(max(share, 0.0001), 4)}
    if device.startswith("cuda:"):
        raise RayStageError(f"device {device} names a GPU of one machine; on a Ray cluster declare "
                            "device = \"cuda\" (Ray picks the node and the GPU) or build it with the local executor")
    raise RayStageError(f"device {device!r}: expected cpu or cuda")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:400] or type(error).__name__


def check_reachable(address: str) -> None:
    """The cluster's GCS answers on its address within seconds, or a one-line RayStageError
    (without this, ray.init retries for a minute and prints pages)."""
    if not address:
        raise RayStageError("Ray executor: no cluster address (set RAY_ADDRESS=host:port)")
    host, _, port = address.rpartition(":")
    if not address.startswith(("ray://", "auto")) and host:
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as error:
            raise RayStageError(f"Ray cluster {address} unreachable: {_one_line(error)}") from None


class RayExecutor:
    """A connection to a Ray cluster that runs stages (see the module docstring)."""

    def __init__(self, address: str, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB):
        self.address = address
        self.gpu_memory_gb = gpu_memory_gb

    @classmethod
    def connect(cls, address: str | None = None, gpu_memory_gb: float | None = None) -> "RayExecutor":
        """Connect (RAY_ADDRESS when ``address`` is None); an unreachable cluster is one line in seconds."""
        import ray

        env = settings.current()
        address = address or env.ray_address
        check_reachable(address)
        if not ray.is_initialized():
            try:
                ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False,
                         configure_logging=False)
            except Exception as error:  # ConnectionError, RuntimeError: Ray's own are multi-line
                raise RayStageError(f"Ray cluster {address}: cannot connect: {_one_line(error)}") from None
        memory = gpu_memory_gb or env.gpu_memory_gb or DEFAULT_GPU_MEMORY_GB
        return cls(address, memory)

    def submit(self, plan: dict, inputs: dict, remote, device: str, threads: int,
               gpu_memory_gb: float | None = None, expected_versions: dict | None = None,
               libraries: tuple[str, ...] = ()) -> "StageRun":
        """Push the inputs and start the task; ``StageRun.result()`` waits for it."""
        import ray

        options = resources(device, threads, gpu_memory_gb, self.gpu_memory_gb)
        _check_feasible(plan.get("target", "stage"), options)
        expected = expected_versions or versions(libraries)
        inputs_key = push_inputs(inputs, remote)
        task = ray.remote(_stage_task).options(**options, max_retries=0, retry_exceptions=False,
                                               name=f"modelbuild:{plan.get('target', 'stage')}")
        ref = task.remote(plan, inputs_key, remote.url, device, int(threads), expected)
        return StageRun(ref, plan.get("target", "stage"), expected)

    def run_stage(self, plan: dict, inputs: dict, remote, device: str, threads: int,
                  gpu_memory_gb: float | None = None, expected_versions: dict | None = None,
                  libraries: tuple[str, ...] = ()) -> dict:
        """Run one stage on the cluster; returns {"manifest", "ran_on", "versions", "action_key"}
        with the outputs left in the remote cache. Ctrl-C cancels the task (force)."""
        return self.submit(plan, inputs, remote, device, threads, gpu_memory_gb, expected_versions, libraries).result()


class ClusterDevices:
    """The devices of a Ray cluster, as a device preference list asks them (``lacks`` like a
    local Machine's): ``cpu`` and ``cuda`` are there if an alive node has one; ``cuda:N`` never
    is (see the module docstring). Connects on the first question; answers once per process."""

    _at: dict[str, "ClusterDevices"] = {}

    def __init__(self, address: str):
        self.address, self._nodes = address, None

    @classmethod
    def at(cls, address: str) -> "ClusterDevices":
        return cls._at.setdefault(address, cls(address))

    def lacks(self, device: str) -> str | None:
        if ":" in device:
            return f"{device} names a GPU of one machine; on a Ray cluster declare device = \"cuda\""
        if self._nodes is None:
            import ray

            from .. import UserError

            try:
                RayExecutor.connect(self.address)
            except RayStageError as error:
                raise UserError(str(error)) from None
            self._nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        resource = "GPU" if device == "cuda" else "CPU"
        if any(node.get(resource, 0) >= 1 for node in self._nodes):
            return None
        return f"no node of the Ray cluster {self.address} has a {device.upper()} ({len(self._nodes)} alive node(s))"


def _check_feasible(target: str, options: dict) -> None:
    """Ray keeps a task no node can ever run pending forever, with a warning in a log nobody
    reads: refuse it here in one line instead (e.g. 8 threads on 4-CPU nodes, cuda without GPUs)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus, gpus = options["num_cpus"], options["num_gpus"]
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= min(gpus, 1) for r in nodes):
        most = max((r.get("CPU", 0) for r in nodes), default=0)
        want = f"{cpus} CPU(s)" + (f" and {gpus:g} GPU" if gpus else "")
        have = f"at most {most:g} CPU(s) a node" + ("" if not gpus or any(r.get("GPU") for r in nodes) else ", no GPU")
        raise RayStageError(f"target '{target}': no node of the Ray cluster has {want} ({len(nodes)} node(s), {have})")


class StageRun:
    """A submitted stage: ``result()`` waits (cancelling the task if the wait is interrupted)."""

    def __init__(self, ref, target: str, expected: dict):
        self.ref, self.target, self.expected = ref, target, expected

    def cancel(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.cancel(self.ref, force=True)  # kills the worker process; its pass process dies with it

    def result(self, timeout: float | None = None) -> dict:
        import ray
        from ray import exceptions

        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ray.wait([self.ref], timeout=POLL_S)[0]:
                if deadline is not None and time.monotonic() > deadline:
                    raise RayStageError(f"target '{self.target}': no result from Ray within {timeout:g} s")
            result = ray.get(self.ref)
        except BaseException as error:
            if not isinstance(error, exceptions.RayError):  # Ctrl-C, timeout: the task must not go on
                self.cancel()
                raise
            cause = getattr(error, "cause", None)
            if isinstance(cause, RayStageError):
                raise RayStageError(str(cause)) from None
            if isinstance(error, exceptions.TaskCancelledError):
                raise RayStageError(f"target '{self.target}': Ray task cancelled; nothing recorded") from None
            if isinstance(error, (exceptions.WorkerCrashedError, exceptions.NodeDiedError)):
                raise RayStageError(f"target '{self.target}': Ray worker died mid-stage; nothing recorded") from None
            first = _one_line(cause if cause is not None else error)
            raise RayStageError(f"target '{self.target}': Ray task failed: {first}") from None
        check_versions(self.expected, result["versions"], f"target '{self.target}': Ray worker {result['ran_on']['node']}")
        return result


def push_inputs(inputs: dict, remote) -> str:
    """Upload the stage's inputs; return the key of their manifest on the remote.

    ``inputs`` maps an input name to a local file or folder (a Path), or to a manifest
    ``{rel: {size, digest}}`` of an artifact already in the remote (nothing uploaded for it).
    """
    manifest, kinds, files = {}, {}, {}
    for name, value in sorted(inputs.items()):
        if isinstance(value, dict):
            kinds[name] = "dir"
            entries = value.items()
        else:
            path = Path(value)
            kinds[name] = "dir" if path.is_dir() else "file"
            entries = [(rel, _describe(full, files)) for rel, full in walk_files(path)] if path.is_dir() \
                else [("", _describe(path, files))]
        for rel, info in entries:
            manifest[f"{name}/{rel}" if rel else name] = {"size": info["size"], "digest": info["digest"]}
    body = {"manifest": dict(sorted(manifest.items())), "kinds": kinds}
    key = "ray-inputs-" + hash_json(body)
    remote.push({"action_key": key, **body}, files)
    return key


def _describe(path: Path, files: dict) -> dict:
    digest = hash_file(path)
    files[digest] = path
    return {"size": path.stat().st_size, "digest": digest}


def fetch_outputs(result: dict, dest_dir: Path, remote) -> dict:
    """Download a stage's outputs (re-hashed, all or nothing) into ``dest_dir``."""
    return remote.fetch(result, Path(dest_dir))


def _die_with_parent() -> None:
    """In the pass process: SIGKILL when the Ray worker dies (cancel, crash), never an orphan."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _scratch(target: str) -> Path:
    """A scratch folder ``$TMPDIR/modelbuild-ray/<pid>-<target>-XXXX``. A worker killed mid-stage
    cannot clean up after itself, so each task first removes the folders of dead workers."""
    base = Path(tempfile.gettempdir()) / "modelbuild-ray"
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():
        pid = old.name.split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # its worker is gone
            shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass  # alive (another user's)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{target}-", dir=base))


def _stage_task(plan: dict, inputs_key: str, remote_url: str, device: str, threads: int, expected: dict) -> dict:
    """The Ray task body, on a worker node (see the module docstring, steps 2 and 3)."""
    import ray

    from ..cache.remote import RemoteStore

    node = ray.get_runtime_context().get_node_id()
    target = plan.get("target", "stage")
    check_versions(expected, versions(tuple(expected.get("libraries", {}))), f"target '{target}': Ray node {node}")
    lacking = missing(plan["cpu_numerics"])
    if lacking:
        raise RayStageError(f"target '{target}': Ray node {node}: {lacking}, and the action key records CPU numerics "
                            f"{plan['cpu_numerics']}; set MODELBUILD_CPU_NUMERICS on the driver to a branch every node has")
    remote = RemoteStore.from_url(remote_url)
    scratch = _scratch(target)
    try:
        entry = remote.lookup(inputs_key)
        if entry is None:
            raise RayStageError(f"target '{target}': inputs manifest {inputs_key} not in {remote_url}")
        remote.fetch(entry, scratch / "in")
        paths = {}
        for name, kind in entry["kinds"].items():
            paths[name] = str(scratch / "in" / name)
            if kind == "dir":
                (scratch / "in" / name).mkdir(parents=True, exist_ok=True)
        out = scratch / "out"
        out.mkdir()
        gpu_ids = [str(i) for i in ray.get_gpu_ids()] if device != "cpu" else []
        assigned = f"cuda:{gpu_ids[0]}" if gpu_ids else "cpu"
        downloads = settings.current().cache or Path.home() / ".cache" / "modelbuild"  # no project folder here
        worker_plan = placed(plan, paths, out, device, assigned, threads, downloads)
        env = {**os.environ, **stage_environment(assigned, threads, ",".join(gpu_ids), plan["cpu_numerics"])}
        started = time.time()
        proc = run_worker(worker_plan, scratch, env, cwd=scratch, capture_output=True, text=True,
                          preexec_fn=_die_with_parent)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise RayStageError(f"target '{target}': pass '{plan.get('pass')}' failed on Ray node {node} "
                                f"(exit {proc.returncode}): {last[:300]}")
        files, manifest = {}, {}
        for rel, full in walk_files(out):
            manifest[rel] = _describe(full, files)
        result = {"action_key": f"ray-result-{uuid.uuid4().hex}", "target": target, "manifest": manifest,
                  "manifest_digest": hash_json(manifest), "versions": versions(tuple(expected.get("libraries", {}))),
                  "ran_on": {"executor": "ray", "node": node, "node_ip": ray.util.get_node_ip_address(),
                             "device": assigned, "gpu_ids": gpu_ids, "threads": threads,
                             "cuda_visible_devices": env["CUDA_VISIBLE_DEVICES"],
                             "started": round(started, 3), "ended": round(time.time(), 3)}}
        remote.push(result, files)  # objects first, the result manifest last
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
