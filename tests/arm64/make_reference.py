"""x86 half of scripts/arm64_check.sh: export the shipped tiny VLM (models/shapes-tiny) as an
INT4 bundle and record its greedy tokens on this machine, in the modes the aarch64 side reruns."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from common import MODES, PROMPTS, image, run_modes  # noqa: E402


def main() -> None:
    work = Path(sys.argv[1])
    bundle = work / "bundle"
    subprocess.run([sys.executable, "-m", "edge_vila", "-q", "export", str(ROOT / "models" / "shapes-tiny"),
                    "--out", str(bundle), "--max-context", "256", "--quant-method", "rtn", "--no-report"],
                   check=True)
    ref = {"modes": run_modes(bundle), "prompts": PROMPTS, "image_sha": image().tobytes().hex()[:32]}
    (work / "reference.json").write_text(json.dumps(ref, indent=1))
    print(f"x86 reference: {len(MODES)} modes x {len(PROMPTS)} prompts -> {work / 'reference.json'}")


if __name__ == "__main__":
    main()
