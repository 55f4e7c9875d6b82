"""Parse `tegrastats` lines (the fallback when jetson-stats' jtop service is absent).

One line per interval, fields separated by spaces, e.g. on an Orin Nano (JetPack 6):

    11-22-2026 10:00:00 RAM 1816/7620MB (lfb 1199x4MB) SWAP 0/3810MB (cached 0MB)
    CPU [1%@1510,0%@1510,...] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] ... cpu@47.625C
    soc2@46.406C ... tj@47.718C VDD_IN 4987mW/4987mW VDD_CPU_GPU_CV 515mW/515mW ...

AGX Orin names other rails (VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, ...) and reports
GR3D per GPC (`0%@[0,0]`); older releases wrote rails as `POM_5V_IN 2000/2000` and
lacked the timestamp. Rails are instantaneous/average milliwatts.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field

# rails that measure the whole module's input, by board family; the first present wins
_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")

_RAM = re.compile(r"RAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"SWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"CPU \[([^\]]*)\]")
_GR3D = re.compile(r"GR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_EMC = re.compile(r"EMC_FREQ (\d+)%(?:@(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?[\d.]+)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?\b")


@dataclass
class TegraStats:
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    cpu_load: list[float | None] = field(default_factory=list)  # None for a core that is off
    cpu_mhz: list[int | None] = field(default_factory=list)
    gpu_load: float | None = None
    gpu_mhz: int | None = None
    emc_load: float | None = None
    temps_c: dict[str, float] = field(default_factory=dict)  # sensors at -256 C are absent ones: dropped
    rails_mw: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (now, average)

    @property
    def power_w(self) -> float | None:
        """Module input power now (W): the board's input rail, else the sum of the rails."""
        for r in _TOTAL_RAILS:
            if r in self.rails_mw:
                return self.rails_mw[r][0] / 1000
        return sum(v[0] for v in self.rails_mw.values()) / 1000 if self.rails_mw else None


def parse_line(line: str) -> TegraStats:
    """One tegrastats line -> TegraStats. Fields a board does not print stay None/empty."""
    s = TegraStats()
    if m := _RAM.search(line):
        s.ram_used_mb, s.ram_total_mb = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(line):
        s.swap_used_mb = int(m.group(1))
    if m := _CPU.search(line):
        for core in m.group(1).split(","):
            core = core.strip()
            if core == "off" or not core:
                s.cpu_load.append(None)
                s.cpu_mhz.append(None)
                continue
            load, _, mhz = core.partition("@")
            s.cpu_load.append(float(load.rstrip("%")))
            s.cpu_mhz.append(int(mhz) if mhz else None)
    if m := _GR3D.search(line):
        s.gpu_load = float(m.group(1))
        if m.group(2):
            s.gpu_mhz = max(int(x) for x in m.group(2).split(",") if x)
    if m := _EMC.search(line):
        s.emc_load = float(m.group(1))
    for name, val in _TEMP.findall(line):
        if name in ("EMC_FREQ", "GR3D_FREQ") or float(val) <= -256:
            continue
        s.temps_c[name.lower()] = float(val)
    for name, now, avg in _RAIL.findall(line):
        if name in ("RAM", "SWAP"):
            continue
        s.rails_mw[name] = (int(now), int(avg))
    return s


class TegrastatsReader:
    """Runs `tegrastats --interval MS` on a thread and keeps the newest parsed line."""

    def __init__(self, interval_ms: int = 500, command: str = "tegrastats"):
        exe = shutil.which(command)
        if exe is None:
            raise FileNotFoundError(f"{command}: not on PATH (it ships with L4T on Jetson)")
        self._proc = subprocess.Popen([exe, "--interval", str(interval_ms)], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.latest: TegraStats | None = None
        self.samples: list[tuple[float, TegraStats]] = []
        self._keep = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tegrastats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            s = parse_line(line)
            with self._lock:
                self.latest = s
                if self._keep:
                    self.samples.append((time.monotonic(), s))

    def record(self, on: bool = True) -> None:
        with self._lock:
            self._keep = on
            if on:
                self.samples.clear()

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()


__all__ = ["TegraStats", "parse_line", "TegrastatsReader"]
