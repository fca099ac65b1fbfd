"""Where a stage that must run runs: here (a device slot of this machine, stage.py) or on a Ray cluster.

    MODELBUILD_EXECUTOR=ray  RAY_ADDRESS=host:port  MODELBUILD_REMOTE_CACHE=s3://bucket/prefix  doit T
    [executor]
    kind = "ray"          # or "local" (the default); MODELBUILD_EXECUTOR overrides it

doit stays the driver on this machine and keeps deciding what is stale (status.py); restoring
from either cache tier never involves Ray. Only a stage that must run becomes a Ray task
(ray_exec.py): its inputs travel through the remote cache by digest, it runs the pass in a
process of its own on whichever node has its resources, pushes its outputs, and the driver
fetches them (re-hashed) into the stage's temporary folder, where they are stamped exactly as a
local build's; or, when nothing here needs them (download.py), stamps their manifest and leaves
them on the remote, where the next stage's worker reads them by digest. The remote cache is therefore required with Ray, and checked at load together
with the cluster's address: a build that cannot run there is one line before anything starts.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import UserError, say
from ..core import settings
from ..core.project import executor_kind, input_path

def check_executor(project) -> None:
    """At load: with Ray, the remote cache must be set and the cluster's address must answer."""
    if executor_kind(project) != "ray":
        return
    from .ray_exec import RayStageError, check_reachable
    from ..cache.tiers import remote_tier

    if remote_tier(project) is None:
        raise UserError("Ray executor: stages exchange inputs and outputs through the remote cache; set "
                        "MODELBUILD_REMOTE_CACHE=s3://bucket/prefix (or [cache] remote) as on every node")
    try:
        check_reachable(settings.current().ray_address)
    except RayStageError as error:
        raise UserError(str(error)) from None


def device_answers(project, this_machine):
    """Who says whether a device is there, for a preference list such as ``["cuda", "cpu"]``: the
    Ray cluster under the Ray executor (it places the stages: a driver without a GPU still gets
    ``cuda`` when a node has one), else ``this_machine()``. Asked by resolve_devices, once a run."""
    if executor_kind(project) == "ray":
        from .ray_exec import ClusterDevices

        check_executor(project)  # a missing remote cache or a dead address: its one line, before connecting
        return ClusterDevices.at(settings.current().ray_address)
    return this_machine()


def resolve_devices(project, this_machine=None):
    """Give each target with a device preference list (``["cuda", "cpu"]``) the first device
    there is, asking this machine (``this_machine()``, else its devices as [devices] describes
    them) or the Ray cluster once, after the load: loading itself, and the graph cache, never ask.
    Returns ``project``; a list of which nothing is there is one line naming file, target and key."""
    from .devices import machine_from

    wanting = [t for t in project.targets.values() if t.device_choices and not t.device]
    if not wanting:
        return project
    machine = device_answers(project, this_machine or (lambda: machine_from(project.devices)))
    for target in wanting:
        target.device = next((c for c in target.device_choices if machine.lacks(c) is None), "")
        if not target.device:
            last = target.device_choices[-1]
            raise UserError(f"{target.where}: device: none of {', '.join(target.device_choices)} is available "
                            f"({machine.lacks(last)})")
        if target.device == "cpu":
            target.gpu_memory_gb = None  # a share of a GPU it fell back from
    return project


def load_here(root):
    """The validated project at ``root`` (loader.load_project), its device preference lists
    resolved on this machine or the Ray cluster: what the commands beside doit build on."""
    from ..graph.loader import load_project

    return resolve_devices(load_project(root))


def run_on_ray(project, target, components: dict, out_dir: Path, threads: int,
               download: bool = True) -> tuple[float, dict, dict | None]:
    """Run ``target``'s pass as a Ray task and fetch its outputs into ``out_dir``; (seconds, ran_on,
    None), or with ``download=False`` fetch nothing and return the outputs' manifest third (they
    stay on the remote, download.py). Every failure is one line (``UserError``): the stage fails
    and nothing is recorded."""
    from .ray_exec import RayExecutor, RayStageError, fetch_outputs
    from .worker import target_plan
    from ..cache.remote import RemoteError
    from ..cache.tiers import remote_tier

    remote = remote_tier(project).client()
    if remote is None:
        raise UserError(f"{target.named}: the Ray executor needs the remote cache, which is unreachable")
    address = settings.current().ray_address
    with project.run.lock:  # one connection per cluster and run (core/run.py)
        if address not in project.run.ray:
            try:
                project.run.ray[address] = RayExecutor.connect(address)
            except RayStageError as error:
                raise UserError(str(error)) from None
    plan = target_plan(target, components["cpu_numerics"])
    inputs = {key: _left_manifest(project, ref) or input_path(project, ref) for key, ref in target.inputs.items()}
    expected = {field: components[field] for field in ("python", "platform", "libraries")}
    say(f"'{target.name}' running on the Ray cluster ({target.device})")
    started = time.perf_counter()
    try:
        result = project.run.ray[address].run_stage(plan, inputs, remote, target.device, threads, target.gpu_memory_gb,
                                               expected_versions=expected)
        if download:
            fetch_outputs(result, out_dir, remote)
    except (RayStageError, RemoteError) as error:
        message = str(error).removeprefix(f"target '{target.name}': ")  # the Ray side knows the name, not the file
        raise UserError(f"{target.named}: {message}") from None
    return time.perf_counter() - started, result["ran_on"], None if download else result["manifest"]


def _left_manifest(project, ref) -> dict | None:
    """An upstream output left on the remote cache goes to the worker by its digests, unread here."""
    from ..core.stamp import read_stamp

    stamp = read_stamp(project.output_dir(ref.value)) if ref.kind == "target" else None
    return stamp["manifest"] if stamp and stamp.get("left_on_remote") else None
