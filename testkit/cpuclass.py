"""The CPU classes the suite lands on, and how to imitate a lesser one on this machine.

Reduced precision runs different kernels on each class: AVX2 only (emulated bf16; no VNNI: int8 through
saturating int16 sums), AVX512-BF16 without AMX, and AMX. A test that builds a bf16 or int8 archive runs on the
class of this machine and on every lesser x86 class it can imitate: oneDNN's ONEDNN_MAX_CPU_ISA caps the kernels
torch's convolutions use, ATEN_CPU_CAPABILITY caps ATen's own kernels and the vector ISA Inductor compiles for
(torch._inductor.cpu_vec_isa.pick_vec_isa). Both are read when torch starts: they apply to a subprocess (a build).
A class above this machine's cannot be imitated."""

from __future__ import annotations

import os

from handler.archive import cpu_flags

AVX2, AVX512_BF16, AMX = "AVX2", "AVX512-BF16", "AMX"
ORDER = (AVX2, AVX512_BF16, AMX)
# What a subprocess is given to run as a lesser class.
CAPS = {AVX2: {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
        AVX512_BF16: {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512"}}


def native(flags: set[str] | None = None) -> str | None:
    """This machine's class, or None (not x86 with AVX2 and FMA)."""
    flags = cpu_flags() if flags is None else flags
    if {"amx_bf16", "amx_tile"} <= flags:
        return AMX
    if "avx512_bf16" in flags:
        return AVX512_BF16
    if {"avx2", "fma"} <= flags:
        return AVX2
    return None


def classes(flags: set[str] | None = None) -> list[str]:
    """The classes this machine runs: its own and each lesser one (imitated); [] off x86."""
    own = native(flags)
    return [] if own is None else list(ORDER[:ORDER.index(own) + 1])


def env(cls: str, flags: set[str] | None = None) -> dict[str, str]:
    """The environment of a subprocess that runs as `cls` on this machine (its own: unchanged)."""
    return dict(os.environ) if cls == native(flags) else {**os.environ, **CAPS[cls]}


def describe(cls: str, flags: set[str] | None = None) -> str:
    if cls == native(flags):
        return f"{cls} (this CPU)"
    return f"{cls} (imitated: " + " ".join(f"{k}={v}" for k, v in CAPS[cls].items()) + ")"
