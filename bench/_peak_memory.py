"""The process's resident memory and its peak, from Linux's /proc/self, for the benchmarks that
report a stage's peak above what was resident before it (identify_speed.py,
ijb_protocol_speed.py, megaface_scoring_speed.py). Not a benchmark itself.

Writing "5" to /proc/self/clear_refs resets VmHWM (the peak) to the current VmRSS, so a peak
read after a stage is that stage's alone.
"""

from __future__ import annotations

from pathlib import Path

CLEAR_PEAK = "5"  # clear_refs code that resets VmHWM to VmRSS (Linux 4.0+)


_CLEARED = [0]  # the highest VmHWM (KiB) a reset_peak cleared: the whole run's peak survives


def reset_peak() -> bool:
    """Reset the peak to what is resident now; False where /proc cannot do it."""
    _CLEARED[0] = max(_CLEARED[0], status_kib("VmHWM") or 0)
    try:
        Path("/proc/self/clear_refs").write_text(CLEAR_PEAK)
        return True
    except OSError:
        return False


def start_peak() -> int | None:
    """Reset the peak and return the bytes resident now, the base of :func:`peak_above`;
    None where /proc cannot reset it."""
    return (status_kib("VmRSS") or 0) * 1024 if reset_peak() else None


def peak_above(base: int | None) -> int | None:
    """The peak resident bytes since :func:`start_peak` above its ``base``; None without."""
    hwm = status_kib("VmHWM")
    return None if base is None or hwm is None else hwm * 1024 - base


def process_peak() -> int:
    """The process's peak resident bytes over the whole run, resets included."""
    return max(_CLEARED[0], status_kib("VmHWM") or 0) * 1024


def status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in KiB; None without it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
