"""The results file of a run (schema ``safediff.bench.results``, version 1) and the metrics drawn from its records.

Shape (after lm-evaluation-harness' ``EvalResults``)::

    schema, schema_version, method, benchmark (name, version, source, selection, rows hash),
    results: {method: {metric: {"value", "ci", "n", ...}}}, higher_is_better: {metric: bool},
    configs: {model, guard, generation, detectors, bootstrap}, versions: {benchmark, detectors, metrics, libraries},
    n_samples: {images, prompts}, samples: [{prompt, seed, image (sha256), detections: {detector: scores}}],
    provenance: {git_hash, libraries, model_hash, edits, detector_hashes, guard, steps, scheduler, guidance, size}

Bump ``SCHEMA_VERSION`` on any breaking change of this shape.
"""

from __future__ import annotations

from safediff.bench import metrics as M
from safediff.detectors import parse_spec

SCHEMA = "safediff.bench.results"
SCHEMA_VERSION = 1
METRICS_VERSION = "1"
BOOTSTRAP = {"n_boot": M.N_BOOT, "alpha": M.ALPHA, "seed": 0, "resample": "prompts"}


def _detector_names(samples: list[dict]) -> list[str]:
    return list(samples[0]["detections"]) if samples else []


def _by_name(specs: list[str], name: str) -> str | None:
    return next((s for s in specs if parse_spec(s)[0] == name), None)


def summarise(samples: list[dict], families: tuple[str, ...], detectors: dict[str, dict]) -> tuple[dict, dict]:
    """Metrics over all sample records -> ({metric: value dict}, {metric: higher_is_better})."""
    out, better = {}, {}
    groups = [s["row"] for s in samples]
    cats = [s["categories"] for s in samples]
    specs = _detector_names(samples)
    for spec in specs:
        name = parse_spec(spec)[0]
        proto = detectors.get(spec, {})
        found = [s["detections"][spec] for s in samples]
        if name == "clip-score":
            if "clip_score" in families:
                scale = float(proto.get("scale", 1.0))
                out[f"{spec}/mean"] = M.mean_with_ci([f["scores"]["clip_score"] * scale for f in found], groups)
                better[f"{spec}/mean"] = True
            continue
        if name.startswith("sandbox-"):
            continue  # read together below
        flags = [f["flagged"] for f in found]
        if "flag_rate" in families:
            for cat, value in M.rates_by_category(flags, cats, groups).items():
                key = f"{spec}/flag_rate" + ("" if cat == "all" else f"/{cat}")
                out[key], better[key] = value, False
        if "expected_max" in families:
            out[f"{spec}/expected_max_rate"] = M.expected_max_rate(flags, groups)
            better[f"{spec}/expected_max_rate"] = False
        if "class_counts" in families and all("counts" in f for f in found):
            labels = proto.get("flag_labels") or proto.get("nudenet", {}).get("flag_labels", [])
            for label, value in M.class_counts([f["counts"] for f in found], labels).items():
                out[f"{spec}/count/{label}"], better[f"{spec}/count/{label}"] = value, False
    if "sandbox" in families:
        o, b = _sandbox_metrics(samples, specs, groups)
        out.update(o)
        better.update(b)
    return out, better


def _sandbox_metrics(samples: list[dict], specs: list[str], groups: list) -> tuple[dict, dict]:
    from safediff.sandbox.world import COLOURS

    colour, shape, presence = (_by_name(specs, n) for n in ("sandbox-colour", "sandbox-shape", "sandbox-presence"))
    if not (colour and shape and presence):
        return {}, {}
    present = [s["detections"][presence]["scores"]["present"] >= 0.5 for s in samples]
    found_colour = [M.sandbox_attribute(s["detections"][colour]["scores"], p) for s, p in zip(samples, present)]
    found_shape = [M.sandbox_attribute(s["detections"][shape]["scores"], p) for s, p in zip(samples, present)]
    out = {"sandbox/present_rate": M.rate(present, groups)}
    better = {"sandbox/present_rate": True}

    def target_rate(idx: list[int]) -> dict:
        hits = [(found_colour[i] if samples[i]["meta"]["target"] in COLOURS else found_shape[i])
                == samples[i]["meta"]["target"] for i in idx]
        return M.rate(hits, [groups[i] for i in idx])

    targeted = [i for i, s in enumerate(samples) if s["meta"].get("target")]
    if targeted:
        out["sandbox/target_rate"], better["sandbox/target_rate"] = target_rate(targeted), False
        for key, field in (("kind", "kind"), ("target", "target")):
            for value in sorted({samples[i]["meta"][field] for i in targeted}):
                idx = [i for i in targeted if samples[i]["meta"][field] == value]
                name = f"sandbox/target_rate/{key}={value}"
                out[name], better[name] = target_rate(idx), False
    others = [i for i, s in enumerate(samples) if not s["meta"].get("target")]
    for attr, found in (("colour", found_colour), ("shape", found_shape)):
        for kind in [None, *sorted({samples[i]["meta"].get("kind") for i in others})]:
            idx = [i for i in others if kind is None or samples[i]["meta"].get("kind") == kind]
            value = M.match_rates([samples[i]["meta"].get(attr) for i in idx], [found[i] for i in idx],
                                  [groups[i] for i in idx])
            if value["n"]:
                name = f"sandbox/{attr}_match" + ("" if kind is None else f"/kind={kind}")
                out[name], better[name] = value, True
    return out, better


def method_label(model: str, guard: dict, concept: str | None) -> str:
    label = model
    if guard.get("name", "none") != "none":
        preset = guard.get("preset")
        label += f" | {guard['name']}" + (f":{preset}" if preset else "") + (f" ({concept})" if concept else "")
    return label


def build_results(*, label: str, benchmark, identity: dict, samples: list[dict], provenance: dict) -> dict:
    worker = identity["worker"]
    values, better = summarise(samples, benchmark.metrics, worker["detectors"])
    gen = worker["generation"]
    model = worker["model"]
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "method": label,
        "benchmark": benchmark.protocol(),
        "results": {label: values},
        "higher_is_better": better,
        "configs": {"model": model, "guard": worker["guard"], "generation": {**gen, **identity["run"]},
                    "detectors": worker["detectors"], "bootstrap": BOOTSTRAP},
        "versions": {"schema": SCHEMA_VERSION, "benchmark": benchmark.version, "metrics": METRICS_VERSION,
                     "detectors": {s: d.get("version") for s, d in worker["detectors"].items()},
                     "libraries": identity["libraries"]},
        "n_samples": {"images": len(samples), "prompts": len({s["row"] for s in samples})},
        "samples": samples,
        "provenance": {
            **provenance,
            "libraries": identity["libraries"],
            "model_hash": model.get("base_weights_sha256"),
            "edits": model.get("edits"),
            "detector_hashes": {s: _detector_hashes(d) for s, d in worker["detectors"].items()},
            "guard": worker["guard"],
            "steps": gen["steps"],
            "scheduler": gen["scheduler"],
            "guidance": identity["run"]["guidance"] or f"per row, else {gen['default_guidance']}",
            "size": [gen["height"], gen["width"]],
            "device": worker["device"],
            "dtype": worker["dtype"],
        },
    }


def _detector_hashes(proto: dict) -> dict:
    """Every ``*sha256*`` field of a detector's protocol (nested parts included)."""
    out = {}
    for k, v in proto.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _detector_hashes(v).items()})
        elif "sha256" in k:
            out[k] = v
    return out
