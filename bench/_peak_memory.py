"""The process's resident memory and its peak, from Linux's /proc/self, for the benchmarks that
report an evaluator's peak above what was resident before it (ijb_protocol_speed.py,
megaface_scoring_speed.py). Not a benchmark itself.

Writing "5" to /proc/self/clear_refs resets VmHWM (the peak) to the current VmRSS, so a peak
read after a stage is that stage's alone.
"""

from __future__ import annotations

from pathlib import Path

CLEAR_PEAK = "5"  # clear_refs code that resets VmHWM to VmRSS (Linux 4.0+)


def reset_peak() -> bool:
    """Reset the peak to what is resident now; False where /proc cannot do it."""
    try:
        Path("/proc/self/clear_refs").write_text(CLEAR_PEAK)
        return True
    except OSError:
        return False


def status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in KiB; None without it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
