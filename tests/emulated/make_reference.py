"""Host half of the emulated checks (scripts/arm64_check.sh, scripts/avx2_check.sh): export the
shipped tiny VLM (models/shapes-tiny) as an INT4 bundle with the INT8 ViT and again with the
float ViT, and record on this machine the greedy tokens in the modes the emulated side reruns and
the float ViT's features its INT8 forms are held against."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from common import FORMS, MODES, PROMPTS, image, run_modes, vision_cosines, vision_features  # noqa: E402


def main() -> None:
    work = Path(sys.argv[1])
    bundle = work / "bundle"
    for out, vision in ((bundle, "int8"), (work / "bundle-fp32", "fp32")):
        subprocess.run([sys.executable, "-m", "edge_vila", "-q", "export", str(ROOT / "models" / "shapes-tiny"),
                        "--out", str(out), "--max-context", "256", "--quant-method", "rtn", "--vision-quant", vision,
                        "--no-report"], check=True)
    ref = {"modes": run_modes(bundle), "prompts": PROMPTS, "image_sha": image().tobytes().hex()[:32]}
    fp32, _ = vision_features(work / "bundle-fp32")
    np.save(work / "vision_fp32.npy", fp32)
    ref["host_vision_cosines"] = {f: vision_cosines(vision_features(bundle, vision_int8=f)[0], fp32) for f in FORMS}
    (work / "reference.json").write_text(json.dumps(ref, indent=1))
    print(f"host reference: {len(MODES)} modes x {len(PROMPTS)} prompts, INT8 ViT forms' cosine to fp32 "
          + ", ".join(f"{f} {min(c):.5f}" for f, c in ref["host_vision_cosines"].items())
          + f" (min) -> {work / 'reference.json'}")


if __name__ == "__main__":
    main()
