"""Devices and device slots: which stage runs where, so that `doit -n N` never oversubscribes.

doit's ``-n`` only counts jobs. modelbuild gives every stage a *slot* on its declared device
before its pass process starts, and holds it until that process ends:

- each GPU is a slot of ``gpu_memory_gb`` (from nvidia-smi, or configured); a stage takes its
  ``gpu_memory_gb`` of it, or the whole GPU when it declares none, so by default one stage runs
  per GPU. ``cuda:N`` waits for GPU N; ``cuda`` takes whichever GPU has room first;
- CPU stages take one of ``cpu_slots`` slots (default: doit's ``-n``, at most the core count),
  and each gets ``cpu_threads // cpu_slots`` threads (OMP/MKL and ``MODELBUILD_THREADS``, which
  passes hand to onnxruntime), so parallel CPU stages share the cores instead of thrashing.

A GPU stage runs with ``CUDA_VISIBLE_DEVICES`` set to its GPU, in its own process. Cache
restores and up-to-date checks take no slot. Slots are per doit process; two doit processes
on one machine do not see each other's slots (the action locks in store.py still keep them
from building the same thing twice).

Configuration, lowest to highest precedence: discovery, a ``[devices]`` table in one of the
project's targets/*.toml, environment variables::

    [devices]
    gpus = [0, 1]          # MODELBUILD_GPUS="0,1"; [] / "none": no GPU
    gpu_memory_gb = 80     # MODELBUILD_GPU_MEMORY_GB
    simulated = true       # MODELBUILD_SIMULATED_GPUS=1 (0: off): the GPUs above do not exist (tests)
    cpu_slots = 2          # MODELBUILD_CPU_SLOTS
    cpu_threads = 16       # MODELBUILD_CPU_THREADS
    cpu_numerics = "avx2"  # MODELBUILD_CPU_NUMERICS: the pinned CPU code branch (numerics.py)

Simulated GPUs exercise the scheduler on a machine without one: stages are assigned to them
and see ``CUDA_VISIBLE_DEVICES`` and ``MODELBUILD_SIMULATED_GPUS=1``; passes that need a real
GPU will fail there, the ``device-probe`` pass reports what it was given.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import UserError
from ..core import settings
from ..core.numerics import environment as numerics_environment
from ..core.project import check_devices_table

DEFAULT_GPU_MEMORY_GB = 16.0


@dataclass(frozen=True)
class Gpu:
    index: int
    memory_gb: float

    @property
    def name(self) -> str:
        return f"cuda:{self.index}"


@dataclass
class Machine:
    """What this machine offers, after discovery and configuration."""

    gpus: list[Gpu]
    simulated: bool
    cpu_threads: int
    cpu_slots: int
    found_by: str  # how the GPUs were found, for messages

    def describe(self) -> str:
        gpus = ", ".join(f"{g.name} ({g.memory_gb:g} GB)" for g in self.gpus) or "no GPU"
        sim = " (simulated)" if self.simulated and self.gpus else ""
        return (f"{gpus}{sim} [{self.found_by}]; {self.cpu_slots} CPU slot(s) x "
                f"{max(1, self.cpu_threads // self.cpu_slots)} thread(s)")

    def lacks(self, device: str) -> str | None:
        """Why ``device`` cannot run here (a message), or None."""
        if device == "cpu":
            return None
        if not self.gpus:
            return f"this machine has no CUDA GPU ({self.found_by}); set MODELBUILD_GPUS or [devices] gpus to override"
        if ":" in device and int(device.split(":")[1]) not in {g.index for g in self.gpus}:
            return f"no GPU {device} here (have {', '.join(g.name for g in self.gpus)})"
        return None


def discover_gpus() -> tuple[list[Gpu], str]:
    """GPUs nvidia-smi lists (index and total memory). No torch import: it costs seconds."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "nvidia-smi not found"
    try:
        out = subprocess.run([smi, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return [], f"nvidia-smi failed: {error}"
    if out.returncode != 0:
        return [], f"nvidia-smi failed: {out.stderr.strip()[:200]}"
    gpus = []
    for line in out.stdout.strip().splitlines():
        index, memory_mib = (part.strip() for part in line.split(","))
        gpus.append(Gpu(int(index), round(float(memory_mib) / 1024, 1)))
    return gpus, "nvidia-smi"


def doit_jobs(argv: tuple[str, ...] | list[str]) -> int:
    """The ``-n``/``--process`` in doit's arguments ``argv`` (1 when there is none).

    doit itself takes ``-n -1`` and then builds nothing and exits 0: a negative count is a
    ``UserError`` here, checked when the tasks load, before anything runs.
    """
    for i, arg in enumerate(argv):
        match = re.fullmatch(r"(?:-n|--process)(=?)(.*)", arg)
        if match:
            value = match.group(2) if (match.group(1) or match.group(2)) else (argv[i + 1] if i + 1 < len(argv) else "")
            if not re.fullmatch(r"\d+", value):
                shown = arg if match.group(2) or not value else f"{arg} {value}"
                raise UserError(f"doit {shown}: the number of parallel jobs must "
                                "be 0 or more (0 and 1 build one stage at a time)")
            return max(1, int(value))
    return 1


def _env_config(env: settings.Settings) -> dict:
    """The [devices] keys the environment sets (settings.py parsed them)."""
    config = {key: getattr(env, field) for key, field in (("gpus", "gpus"), ("gpu_memory_gb", "gpu_memory_gb"),
              ("simulated", "simulated_gpus"), ("cpu_slots", "cpu_slots"), ("cpu_threads", "cpu_threads"))}
    if config["gpus"] is not None:
        config["gpus"] = list(config["gpus"])
    return check_devices_table({key: value for key, value in config.items() if value is not None}, "environment")


def machine_from(config: dict, env: settings.Settings | None = None, jobs: int = 1) -> Machine:
    """The machine: project config (a validated [devices] table) overlaid by the environment;
    without ``cpu_slots`` it runs as many CPU stages at once as doit's ``jobs`` (``-n``)."""
    config = {**config, **_env_config(settings.current() if env is None else env)}
    if "gpus" in config:
        memory = config.get("gpu_memory_gb", DEFAULT_GPU_MEMORY_GB)
        gpus = [Gpu(i, memory) for i in config["gpus"]]
        found_by = "configured"
    else:
        gpus, found_by = discover_gpus()
        if "gpu_memory_gb" in config:
            gpus = [Gpu(g.index, config["gpu_memory_gb"]) for g in gpus]
    threads = config.get("cpu_threads") or _usable_cores()
    slots = config.get("cpu_slots") or max(1, min(jobs, threads))
    return Machine(gpus, bool(config.get("simulated")), threads, slots, found_by)


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class Assignment:
    """A slot held by one running stage."""

    target: str
    device: str  # "cpu" or "cuda:N"
    threads: int
    memory_gb: float
    waited_s: float = 0.0

    def environment(self, machine: Machine, numerics: str) -> dict[str, str]:
        visible = "" if self.device == "cpu" else self.device.split(":")[1]
        return stage_environment(self.device, self.threads, visible, numerics, machine.simulated)


def stage_environment(assigned: str, threads: int, visible_gpus: str, numerics: str,
                      simulated: bool = False) -> dict[str, str]:
    """What a pass process gets on top of the caller's environment, locally or on a Ray node: its
    device and thread count, the pinned CPU code branch, and no way to read a GPU it was not given."""
    env = {"MODELBUILD_DEVICE": assigned, "MODELBUILD_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "CUDA_VISIBLE_DEVICES": visible_gpus,  # "" for a CPU stage: no GPU behind the scheduler's back
           **numerics_environment(numerics)}
    if simulated:
        env["MODELBUILD_SIMULATED_GPUS"] = "1"
    # No git repository around the environment is an input: onnxruntime-genai's builder stamps
    # the commit of whatever repo its site-packages sit in (a venv inside a project) into every
    # model, so a bundle's bytes followed the project's HEAD. Without a repo it stamps its own.
    env["GIT_DIR"] = os.devnull
    env["PYTHONHASHSEED"] = os.environ.get("PYTHONHASHSEED", "0")
    return env


@dataclass
class SlotPool:
    """Hands out device slots to the stage threads of one doit run."""

    machine: Machine
    _cpu_busy: int = 0
    _gpu_used: dict[int, float] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _try_take(self, device: str, memory_gb: float | None) -> tuple[str, float] | None:
        if device == "cpu":
            if self._cpu_busy < self.machine.cpu_slots:
                self._cpu_busy += 1
                return "cpu", 0.0
            return None
        wanted = [g for g in self.machine.gpus if device == "cuda" or g.name == device]
        for gpu in wanted:
            need = gpu.memory_gb if memory_gb is None else min(memory_gb, gpu.memory_gb)
            used = self._gpu_used.get(gpu.index, 0.0)
            if used == 0.0 or used + need <= gpu.memory_gb + 1e-9:
                self._gpu_used[gpu.index] = used + need
                return gpu.name, need
        return None

    @contextmanager
    def slot(self, target: str, device: str, memory_gb: float | None = None, on_wait=None):
        """Hold a slot on ``device`` ("cpu", "cuda" or "cuda:N") while the block runs."""
        reason = self.machine.lacks(device)
        if reason:
            raise UserError(f"target '{target}': device {device}: {reason}")
        started = time.perf_counter()
        with self._cond:
            taken = self._try_take(device, memory_gb)
            if taken is None and on_wait:
                on_wait()
            while taken is None:
                self._cond.wait()
                taken = self._try_take(device, memory_gb)
        name, need = taken
        threads = max(1, self.machine.cpu_threads // self.machine.cpu_slots)
        assignment = Assignment(target, name, threads, need, round(time.perf_counter() - started, 3))
        try:
            yield assignment
        finally:
            with self._cond:
                if name == "cpu":
                    self._cpu_busy -= 1
                else:
                    index = int(name.split(":")[1])
                    self._gpu_used[index] = max(0.0, self._gpu_used[index] - need)
                self._cond.notify_all()
