"""How vLLM's CPU engine processes treat Intel AMX, chosen per model (``ModelSpec.cpu_amx``).

Linux hands out AMX tile registers only to a process that asked for them
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``); an AMX instruction before that is SIGILL.
vLLM 0.32's CPU worker runs its AMX attention kernel for bfloat16 without asking. Its GEMM
kernels ask as a side effect only on the oneDNN/brgemm path, which they take for five or more
tokens, so a first batch of one to four prompt tokens kills the worker (exit code -4).

The modes:
- ``auto``: on a CPU with AMX tiles, ask for them in every vLLM process before any kernel
  runs; vLLM keeps its AMX kernels. Free: the GEMM path asks anyway from five tokens on.
- ``off``: tell vLLM's kernel choice the CPU has no AMX (AVX-512 attention and oneDNN GEMMs).
- ``vllm``: leave vLLM as it is (crashes on short bfloat16 prompts on AMX CPUs, as upstream).

The mode travels to the engine core and worker processes in an environment variable, and
``prepare_process`` runs in each of them as a vLLM general plugin (see pyproject.toml).
"""

from __future__ import annotations

import logging
import os
from typing import get_args

from servegraph.models.spec import CpuAmxMode

MODE_ENV = "SERVEGRAPH_CPU_AMX"
PLUGIN_NAME = "servegraph_cpu_amx"  # the entry point's name in pyproject.toml

logger = logging.getLogger("servegraph.cpu_amx")


def amx_tiles_supported() -> bool:
    import torch

    return bool(torch.cpu._is_amx_tile_supported())


def mode_from_env() -> CpuAmxMode:
    mode = os.environ.get(MODE_ENV, "auto")
    if mode not in get_args(CpuAmxMode):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected one of {', '.join(get_args(CpuAmxMode))}")
    return mode  # type: ignore[return-value]


def plugin_allowed(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """vLLM loads only the plugins VLLM_PLUGINS names, when it is set."""
    allowed = environ.get("VLLM_PLUGINS")
    return allowed is None or PLUGIN_NAME in [name.strip() for name in allowed.split(",")]


def describe(mode: CpuAmxMode, has_amx: bool, plugin_loads: bool = True) -> str:
    """One line for the engine's start log: what this mode does on this CPU."""
    if has_amx and mode != "vllm" and not plugin_loads:
        return f"cpu_amx={mode} has no effect: VLLM_PLUGINS does not name {PLUGIN_NAME}, so vLLM runs as it is"
    if not has_amx:
        return f"cpu_amx={mode}: this CPU has no AMX tiles; vLLM's kernels run as they are"
    return {
        "auto": "cpu_amx=auto: CPU has AMX tiles; each vLLM process requests AMX tile permission at start "
        "(vLLM's AMX attention otherwise dies with SIGILL on 1-4 token bfloat16 prompts)",
        "off": "cpu_amx=off: CPU has AMX tiles; vLLM's AMX kernels are disabled (AVX-512 attention, oneDNN GEMM)",
        "vllm": "cpu_amx=vllm: CPU has AMX tiles; vLLM runs unchanged and may die on 1-4 token bfloat16 prompts",
    }[mode]


def apply(mode: CpuAmxMode) -> None:
    """Set this process up for mode; call it before vLLM picks or runs a CPU kernel."""
    import torch

    if mode == "vllm" or not amx_tiles_supported():
        return
    if mode == "auto":
        if not torch.cpu._init_amx():
            raise RuntimeError("the kernel refused AMX tile permission (arch_prctl ARCH_REQ_XCOMP_PERM)")
        return
    torch.cpu._is_amx_tile_supported = lambda: False  # vLLM's kernel choice reads this at call time


def prepare_process() -> None:
    """vLLM general plugin: runs in every vLLM process (front end, engine core, workers)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        apply(mode_from_env())
