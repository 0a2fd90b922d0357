"""Whether a bfloat16 model multiplies in float32 in its multi-token forwards (prefills, teacher-forced targets).

A CPU without native bf16 instructions (x86 without avx512_bf16 / amx_bf16, Arm without bf16) emulates bf16
matrix products: on this project's AMD EPYC (AVX2) a bf16 prefill ran 4.4-5.8x slower than float32
(docs/speed.md). There, a bf16 model's multi-token forwards upcast each product's operands (weights included,
one matrix at a time) to float32 and round the product back to bf16; every other operation, the cache and the
logits stay bfloat16, as in a pure bf16 run. One-token decode steps keep their bf16 products (memory-bound, so
bf16 weights stream faster).

MINIPYTHIA_BF16_PREFILL chooses: "auto" (the default: float32 products where the CPU lacks native bf16),
"float32" (always, on CPU) or "bfloat16" (never: pure bf16 arithmetic). `Pythia.for_inference(float32_prefill=...)`
overrides it per model.
"""

from __future__ import annotations

import os
import platform

from .bounded import shown

ENV = "MINIPYTHIA_BF16_PREFILL"
CHOICES = ("auto", "float32", "bfloat16")
# /proc/cpuinfo flags that mean the CPU multiplies bf16 natively (x86: AVX-512 BF16, AMX; Arm: FEAT_BF16).
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def native_bfloat16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 arithmetic instructions, from the flags the kernel lists. Without /proc/cpuinfo
    (macOS, Windows) it cannot tell and answers True, which keeps pure bf16 (the behaviour before this choice)."""
    try:
        with open(cpuinfo_path) as f:
            text = f.read()
    except OSError:
        return True
    for line in text.splitlines():
        # x86 lists "flags", Arm "Features"; every core lists the same ones.
        if line.startswith(("flags", "Features")):
            return bool(NATIVE_BF16_FLAGS & set(line.partition(":")[2].split()))
    return True


def float32_prefill_default() -> bool:
    """Whether a bf16 model on CPU multiplies in float32 in its multi-token forwards, from MINIPYTHIA_BF16_PREFILL."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={shown(os.environ[ENV])}: choose auto, float32 or bfloat16")
    if choice == "auto":
        return not native_bfloat16()
    return choice == "float32"


def cpu_description() -> str:
    """One line for benchmark headers: the machine, and whether it has native bf16."""
    return f"{platform.machine()}, native bf16: {'yes' if native_bfloat16() else 'no'}"
