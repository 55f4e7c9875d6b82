"""Live board stats, power modes and energy per token.

`open_stats()` prefers jetson-stats (`jtop`, which needs its systemd service) and falls
back to parsing `tegrastats`; off-Jetson it returns None and callers print no power.
`PowerMeter` integrates power samples over a window (trapezoids) to give joules, so
`edge-vila bench` can report J/token. `nvpmodel`/`jetson_clocks` helpers say what to
run with sudo instead of failing with a bare permission error.

Verified here: the parsers and the integration (on recorded/synthetic samples). The jtop
and tegrastats readers run only on a Jetson: unverified on hardware in this repository.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

from .tegrastats import TegrastatsReader

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    power_w: float | None
    gpu_load: float | None
    ram_used_mb: float | None
    temps_c: dict[str, float]


class JtopStats:
    """jetson-stats' client; its `power['tot']['power']` is the module input in mW."""

    def __init__(self) -> None:
        from jtop import jtop  # jetson-stats

        self._j = jtop()
        self._j.start()

    def snapshot(self) -> Snapshot:
        j = self._j
        tot = (j.power or {}).get("tot", {})
        mem = (j.memory or {}).get("RAM", {})
        gpu = (j.gpu or {})
        load = next((g.get("status", {}).get("load") for g in gpu.values()), None) if isinstance(gpu, dict) else None
        temps = {k.lower(): float(v.get("temp")) for k, v in (j.temperature or {}).items()
                 if isinstance(v, dict) and v.get("online", True) and v.get("temp", -256) > -256}
        return Snapshot(power_w=tot.get("power") / 1000 if tot.get("power") is not None else None,
                        gpu_load=load, ram_used_mb=mem.get("used") / 1024 if mem.get("used") else None, temps_c=temps)

    def close(self) -> None:
        self._j.close()


class TegraStatsSource:
    def __init__(self, interval_ms: int = 250) -> None:
        self._r = TegrastatsReader(interval_ms)

    def snapshot(self) -> Snapshot:
        s = self._r.latest
        if s is None:
            return Snapshot(None, None, None, {})
        return Snapshot(s.power_w, s.gpu_load, s.ram_used_mb, s.temps_c)

    def close(self) -> None:
        self._r.close()


def open_stats(prefer: str = "auto"):
    """jtop -> tegrastats -> None (not a Jetson). Never raises for a missing tool."""
    if prefer in ("auto", "jtop"):
        try:
            return JtopStats()
        except Exception as e:  # not installed, or its service is not running
            log.info("jtop unavailable (%s); trying tegrastats", e)
    if prefer in ("auto", "tegrastats") and shutil.which("tegrastats"):
        return TegraStatsSource()
    return None


class PowerMeter:
    """Samples a stats source on a thread; `energy_j()` integrates the samples."""

    def __init__(self, source, interval_s: float = 0.1):
        self.source = source
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PowerMeter":
        self._stop.clear()
        self.samples.clear()
        self._thread = threading.Thread(target=self._run, name="power-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            p = self.source.snapshot().power_w
            if p is not None:
                self.samples.append((time.monotonic(), p))
            self._stop.wait(self.interval_s)

    def mean_w(self) -> float | None:
        return mean_power(self.samples)

    def energy_j(self) -> float | None:
        return integrate_energy(self.samples)


def integrate_energy(samples: list[tuple[float, float]]) -> float | None:
    """Trapezoidal integral of (time s, power W) samples -> joules."""
    if len(samples) < 2:
        return None
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(samples, samples[1:]))


def mean_power(samples: list[tuple[float, float]]) -> float | None:
    e = integrate_energy(samples)
    return e / (samples[-1][0] - samples[0][0]) if e is not None and samples[-1][0] > samples[0][0] else None


# ---- power modes ------------------------------------------------------------------

def parse_nvpmodel_query(text: str) -> tuple[str, int] | None:
    """`nvpmodel -q` prints 'NV Power Mode: MAXN\\n0' -> ('MAXN', 0)."""
    m = re.search(r"NV Power Mode:\s*(\S+)\s*\n\s*(\d+)", text)
    return (m.group(1), int(m.group(2))) if m else None


def power_mode() -> tuple[str, int] | None:
    if not shutil.which("nvpmodel"):
        return None
    r = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True)
    return parse_nvpmodel_query(r.stdout)


class PermissionNeeded(RuntimeError):
    pass


def _privileged(cmd: list[str], what: str) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise FileNotFoundError(f"{cmd[0]}: not on PATH (it ships with L4T; is this a Jetson?)")
    r = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True)
    if r.returncode != 0:
        err = (r.stderr or r.stdout).strip()
        if "permission" in err.lower() or "root" in err.lower() or "not permitted" in err.lower():
            raise PermissionNeeded(f"{what} needs root: run `sudo {' '.join(cmd)}` "
                                   "(or add a sudoers rule for it on a robot)")
        raise RuntimeError(f"{' '.join(cmd)} failed: {err}")
    return r.stdout


def set_power_mode(mode: int) -> str:
    """`nvpmodel -m N` (MAXN is 0 on Orin). Changing mode may need a reboot on some boards."""
    return _privileged(["nvpmodel", "-m", str(mode)], f"setting power mode {mode}")


def jetson_clocks(on: bool = True) -> str:
    """Pin clocks at the mode's maximum (`jetson_clocks`), or restore (`--restore`)."""
    return _privileged(["jetson_clocks"] if on else ["jetson_clocks", "--restore"], "jetson_clocks")


__all__ = ["Snapshot", "open_stats", "PowerMeter", "integrate_energy", "mean_power", "parse_nvpmodel_query",
           "power_mode", "set_power_mode", "jetson_clocks", "PermissionNeeded"]
