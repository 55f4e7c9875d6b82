"""The quality gate: a quantized model that lost too much against its float original is
not written (`quantize --max-drop`, `export --max-drop`).

Two drops are measured where they mean something: the held-out text perplexity increase
of the method used (percent, every model), and the shapes-VQA accuracy drop (points, only
for checkpoints that know the synthetic world: the recipe's). Either above `max_drop`
refuses the artifact; the refusal names the drop, both numbers it came from, and the
decoder layers whose quantized output strayed most from the float one (the per-layer
errors the quality check records), and the report is kept beside the output so it can be
read.
"""
from __future__ import annotations

import logging
from pathlib import Path

from edge_vila.errors import EdgeVilaError
from edge_vila.fsutil import atomic_write_json

log = logging.getLogger(__name__)

# Today's recipe bundles (AWQ W4, group 32/128) lose well under this on both measures; a
# real 3-8B W4 g128 model loses a few percent of perplexity.
DEFAULT_MAX_DROP = 10.0


class QualityGateError(EdgeVilaError):
    """The quantized model lost more than --max-drop against the float one."""


def quality_drops(report: dict) -> dict[str, dict]:
    """{measure: {"float", "quantized", "drop"}} from a quantize report (its perplexity of the
    method used, its VQA) and, when given, an export report's bundle VQA."""
    out: dict[str, dict] = {}
    ppl, method = report.get("perplexity") or {}, report.get("method")
    if ppl.get("float") and method in ppl:
        out["perplexity"] = {"float": ppl["float"], "quantized": ppl[method],
                             "drop": 100.0 * (ppl[method] / ppl["float"] - 1.0), "unit": "%"}
    vqa = report.get("vqa")
    if vqa and "delta_points" in vqa:
        out["shapes_vqa"] = {"float": vqa["float"]["accuracy"], "quantized": vqa["quantized"]["accuracy"],
                             "drop": 0.0 - float(vqa["delta_points"]), "unit": " points"}
    return out


def bundle_drops(export_report: dict) -> dict[str, dict]:
    """The bundle's own shapes-VQA drop against the float checkpoint (export's report.json)."""
    v = export_report.get("shapes_vqa")
    if not v:
        return {}
    return {"bundle_shapes_vqa": {"float": v["float"], "quantized": v["bundle"], "drop": 0.0 - float(v["delta_points"]),
                                  "unit": " points"}}


def worst_layers(report: dict, k: int = 3) -> list[tuple[int, float]]:
    errs = (report.get("layer_error") or {}).get(report.get("method"), [])
    return sorted(enumerate(errs), key=lambda e: -e[1])[:k]


def rejected_path(where: Path) -> Path:
    """Where the gate writes the report of an output it refused to write at `where`."""
    return where.with_name(where.name + ".rejected.json")


def check(drops: dict[str, dict], max_drop: float | None, report: dict, where: Path) -> dict:
    """The gate's record for the report; raises QualityGateError (after writing the report to
    `<where>.rejected.json`) when a drop exceeds max_drop. No measure: passes, and says so."""
    rec = {"max_drop": max_drop, "drops": drops, "passed": True}
    if max_drop is None:
        rec["note"] = "gate off (--max-drop none)"
        return rec
    if not drops:
        rec["note"] = "nothing measured (quality check off): not gated"
        log.info("quality gate: nothing measured, not gated")
        return rec
    over = {k: d for k, d in drops.items() if d["drop"] > max_drop}
    if not over:
        log.info("quality gate passed: %s (--max-drop %g)",
                 ", ".join(f"{k} {d['drop']:+.2f}{d['unit']}" for k, d in drops.items()), max_drop)
        return rec
    rec["passed"] = False
    worst = worst_layers(report)
    rec["worst_layers"] = [{"layer": i, "relative_error": e} for i, e in worst]
    rejected = rejected_path(where)
    atomic_write_json(rejected, {**report, "quality_gate": rec})
    k, d = next(iter(over.items()))
    layers = ", ".join(f"{i} ({e:.3f})" for i, e in worst) or "not recorded"
    raise QualityGateError(
        f"{where}: not written — {k} dropped {d['drop']:.2f}{d['unit']} ({d['float']:.4g} -> {d['quantized']:.4g}), "
        f"more than --max-drop {max_drop:g}; layers that lost most: {layers}; report: {rejected}")


__all__ = ["DEFAULT_MAX_DROP", "QualityGateError", "quality_drops", "bundle_drops", "worst_layers", "rejected_path", "check"]
