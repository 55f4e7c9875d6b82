"""ctest fixture: start/stop `edge-vila serve` on loopback with a tiny random-weight bundle.

    python live_server.py start STATE_DIR   # builds the bundle once, starts the server, waits for /health
    python live_server.py stop STATE_DIR
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start(state: Path) -> int:
    state.mkdir(parents=True, exist_ok=True)
    bundle = state / "bundle"
    if not (bundle / "manifest.json").exists():
        from edge_vila.export.bundle import ExportOptions, export_bundle
        from edge_vila.testing import make_tiny_checkpoint

        ckpt = make_tiny_checkpoint(state / "ckpt", llm_hidden=128, intermediate=256, image_size=32)
        export_bundle(ckpt, bundle, ExportOptions(group_size=32, max_context=512, report=False))
    from edge_vila.synthetic.world import random_scene, rng_for

    random_scene(rng_for(0, 1)).render(64).save(state / "frame.png")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(state / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "edge_vila", "serve", str(bundle), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (state / "pid").write_text(str(proc.pid))
    (state / "port").write_text(str(port))
    for _ in range(1200):
        if proc.poll() is not None:
            print((state / "server.log").read_text(), file=sys.stderr)
            return 1
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    print(f"edge-vila serve up on 127.0.0.1:{port} (pid {proc.pid})")
                    return 0
        except OSError:
            time.sleep(0.1)
    return 1


def stop(state: Path) -> int:
    pid_file = state / "pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass
        pid_file.unlink()
    return 0


if __name__ == "__main__":
    cmd, state = sys.argv[1], Path(sys.argv[2])
    sys.exit(start(state) if cmd == "start" else stop(state))
