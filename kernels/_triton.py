"""Optional Triton import, so `kernels` imports (and its PyTorch references run) without Triton.

Kernel bodies are written against `tl`; when Triton is missing, `jit` leaves them as plain, never
called Python functions and `tl` is a stand-in whose attributes exist only so that annotations such
as `BLOCK: tl.constexpr` evaluate at import time."""
import os

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:                                      # pragma: no cover - CPU-only installs
    triton = None
    HAS_TRITON = False

    class _Stub:
        def __getattr__(self, name):
            return None

    tl = _Stub()


def jit(fn):
    return triton.jit(fn) if HAS_TRITON else fn


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, how tests run them)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Bounds of the int32 ordered keys (see sampling._ordered_key); constexpr so kernels may read them.
KEY_MIN = -(2 ** 31)
KEY_MAX = 2 ** 31 - 1
NEG_INF = float("-inf")
if HAS_TRITON:
    KEY_MIN, KEY_MAX, NEG_INF = tl.constexpr(KEY_MIN), tl.constexpr(KEY_MAX), tl.constexpr(NEG_INF)
