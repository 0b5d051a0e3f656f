"""The device execution policy: what `--amp auto` and `--compile` become on a given device (precision, memory
layout, torch.compile, CUDA graphs), and the CPU features that decide it. Measured in docs/BENCHMARKS.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils import UserError

# /proc/cpuinfo's names of the x86 units that multiply bf16 natively (AMX tiles, AVX512-BF16 dot products).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
COMPILE_MODES = ("auto", "off", "on", "graphs", "max")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags as Linux lists them; None where there is no such file (macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def torch_cpu_bf16() -> bool | None:
    """torch's own CPUID check for AMX or AVX512-BF16; None where this torch lacks it (private API, hence guarded)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks) if all(checks) else None
    except RuntimeError:
        return None


def native_bf16(flags: set[str] | None, torch_check: bool | None) -> bool:
    """Whether the CPU has bf16 arithmetic in hardware, by every source available; False if none is.

    Elsewhere autocast's bf16 runs through conversions around fp32 arithmetic: slower, not faster.
    """
    sources = [torch_check] if torch_check is not None else []
    if flags is not None:
        sources.append(any(flag in flags for flag in BF16_FLAGS))
    return bool(sources) and all(sources)


@dataclass(frozen=True)
class Execution:
    """How the steps run on a device: precision, memory layout, torch.compile, CUDA graphs."""

    amp: bool  # bf16 autocast
    channels_last: bool
    compile: bool  # torch.compile (inductor) of the forward and loss; AOTAutograd compiles their backward
    cuda_graphs: bool  # the whole step, optimizer included, captured once and replayed


# torch's CPU capabilities (`torch.backends.cpu.get_cpu_capability()`) where channels_last was measured faster.
CHANNELS_LAST_CPUS = ("AVX2", "AVX512")


def choose_execution(device: torch.device, amp_mode: str, compile_mode: str, *, native_bf16: bool,
                     cpu_capability: str) -> Execution:
    """`--amp` and `--compile` (auto/on/off/...) made concrete for `device`; what each auto picks is measured
    in docs/BENCHMARKS.md.

    device                            amp auto                               channels_last        compile auto
    CUDA GPU                          bf16 if the GPU has bf16 units         on                   off
    CPU with native bf16 (AMX, ...)   bf16: 1.4-1.7x                         on: 1.2-1.4x         off
    AVX2 CPU, no native bf16          fp32: emulated bf16 is ~30x slower     on: 1.14-1.17x       off
    other CPUs (ARM, ...)             fp32                                   off (unmeasured)     off

    compile auto is off: a CPU pays 1-2 minutes of compilation per run (and gains nothing on top of bf16); the GPU
    modes are untimed until make gpu-check runs. graphs and max (= on + graphs) need CUDA.
    """
    cuda = device.type == "cuda"
    if compile_mode in ("graphs", "max") and not cuda:
        raise UserError(f"--compile {compile_mode} captures CUDA graphs, which need a GPU; on the CPU use --compile "
                        "on or off")
    auto_amp = torch.cuda.is_bf16_supported(including_emulation=False) if cuda else native_bf16
    return Execution(
        amp=amp_mode == "on" or (amp_mode == "auto" and auto_amp),
        channels_last=cuda or cpu_capability in CHANNELS_LAST_CPUS,
        compile=compile_mode in ("on", "max"),
        cuda_graphs=compile_mode in ("graphs", "max"),
    )


def cpu_execution_inputs() -> dict[str, Any]:
    """This CPU's `native_bf16` and `cpu_capability` (torch's: AVX2, AVX512, ...), as `choose_execution` takes them."""
    return {"native_bf16": native_bf16(cpu_flags(), torch_cpu_bf16()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
