"""The CPU code branch a stage's floating-point libraries run, pinned so outputs are reproducible.

Why: MKL (torch's BLAS here) picks its kernels when it first runs, and on some Xeons it decides
between its AVX-512 and AVX2 kernels at run time; under load the tiny LoRA finetune trained to
other bytes in 2 of 3 CI runs on this machine, and the stray bytes were exactly those of
``MKL_CBWR=AVX2``. So every stage runs with MKL's branch pinned (``MKL_CBWR=<branch>,STRICT``:
Intel's conditional numerical reproducibility in its strict mode, whose GEMMs give the same bits
whatever the thread count; ``MKL_DYNAMIC``/``OMP_DYNAMIC`` off as its conditions ask), and
torch's own kernels and oneDNN pinned to the same instruction set (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``).

The branch is part of every action key, so a machine of another branch builds under another
key instead of serving, or verifying against, bytes it would not produce. What it does not pin:
onnxruntime's MLAS kernels and numpy's BLAS choose from the CPU's features themselves (the same
choice on the same CPU model; not guaranteed across CPU models of one branch), and torch's own
parallel reductions follow the stage's thread count, which is not in the key (measured: the tiny
adapter trains the same bytes on 1 and 2 threads).

Default: the widest branch this CPU has (``avx512``, ``avx2``, else ``compatible``: SSE2, slow).
``[devices] cpu_numerics`` or ``MODELBUILD_CPU_NUMERICS`` choose one, e.g. ``avx2`` for a team
whose machines mix AVX-512 and AVX2 and should share one cache (SmolLM2's finetune runs 1.22x
slower on the AVX2 branch of this Xeon: ``bench/numerics_cost.py``). Not x86: ``native``,
nothing to pin (MKL is x86-only).
"""

from __future__ import annotations

import functools
import platform

from .. import UserError

# branch -> (CPU flags it needs, MKL_CBWR, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)
BRANCHES = {
    "avx512": ({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "fma"}, "AVX512", "avx512", "AVX512_CORE"),
    "avx2": ({"avx2", "fma"}, "AVX2", "avx2", "AVX2"),
    "compatible": (set(), "COMPATIBLE", "default", "SSE41"),
}
NATIVE = "native"


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags (Linux x86); None where there is no MKL to pin."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:  # the first processor's flags: enough, and a big machine lists hundreds
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()  # x86 without /proc (macOS): assume nothing beyond SSE2


def widest() -> str:
    flags = cpu_flags()
    if flags is None:
        return NATIVE
    return next(name for name, (needs, *_) in BRANCHES.items() if needs <= flags)


def missing(branch: str) -> str | None:
    """Why this machine cannot run ``branch`` (a message), or None."""
    flags = cpu_flags()
    if flags is None:
        return None if branch == NATIVE else f"this {platform.machine()} machine has no {branch} (use '{NATIVE}')"
    if branch == NATIVE:
        return f"an x86 machine pins a branch ({', '.join(BRANCHES)}), not '{NATIVE}'"
    lacking = sorted(BRANCHES[branch][0] - flags)
    return f"this CPU lacks {', '.join(lacking)}" if lacking else None


def check_name(value: object, where: str) -> str:
    names = (*BRANCHES, NATIVE)
    if value not in names:
        raise UserError(f"{where}: unknown CPU numerics branch {value!r} (known: {', '.join(names)})")
    return value


def branch(chosen: str | None, devices: dict, devices_where: str = "[devices]", check_here: bool = True) -> str:
    """The branch stages run: ``chosen`` (MODELBUILD_CPU_NUMERICS, a known name: settings.py
    checked it), else ``[devices] cpu_numerics``, else the widest this CPU has. One line if the
    choice cannot run here; with ``check_here=False`` (the Ray executor: stages run on the nodes,
    which refuse a branch their CPU lacks) not checked here."""
    if chosen:
        where = "MODELBUILD_CPU_NUMERICS"
    elif "cpu_numerics" in devices:
        chosen, where = devices["cpu_numerics"], f"{devices_where}.cpu_numerics"
    else:
        return widest()
    reason = missing(chosen) if check_here else None
    if reason:
        raise UserError(f"{where} = {chosen}: {reason}")
    return chosen


def environment(branch_name: str) -> dict[str, str]:
    """What a stage's process gets so its libraries run ``branch_name``, whatever they would pick."""
    if branch_name == NATIVE:
        return {}
    _, mkl, aten, onednn = BRANCHES[branch_name]
    return {"MKL_CBWR": f"{mkl},STRICT", "ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn,
            "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}
