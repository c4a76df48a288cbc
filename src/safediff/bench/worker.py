"""One benchmark worker: a loaded model, guard and detectors that turn a batch of jobs into PNGs and records.

The local backend runs one worker in-process; the Ray backend runs one per Ray worker. A batch's output depends
only on the worker's spec and the batch (each image has its own seeded generator), so any worker, in any process,
produces the same bytes for it.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from safediff.detectors.base import degenerate
from safediff.errors import SafediffError
from safediff.storage import png_bytes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def detect(detector, images: list[Image.Image], prompts: list[str]) -> list[dict]:
    """Per image: ``{"scores": {label: score}, "flagged": bool}`` plus the detector's extras (NudeNet counts)."""
    extras = [{} for _ in images]
    if getattr(detector, "needs_prompts", False):
        scores = detector.scores(images, prompts)
    elif hasattr(detector, "analyse"):
        scores, extras = detector.analyse(images)
    else:
        scores = detector.scores(images)
    flags = detector.flags(scores)
    return [{"scores": {label: float(v) for label, v in zip(detector.labels, row.tolist())}, "flagged": bool(f), **e}
            for row, f, e in zip(scores, flags.tolist(), extras)]


class Worker:
    """``spec``: model, device, dtype, guard, concept, detectors (spec strings), generation (steps, height, width,
    scheduler, negative_prompt, eta; None = the model's default)."""

    def __init__(self, spec: dict):
        from safediff.detectors import build_detector
        from safediff.guards import build_guard
        from safediff.models import load_pipeline

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        if spec["dtype"] not in DTYPES:
            raise SafediffError(f"unknown dtype '{spec['dtype']}'; accepted: {', '.join(DTYPES)}")
        self.spec = spec
        self.guard = build_guard(spec["guard"], spec["concept"])
        self.detectors = {s: build_detector(s) for s in spec["detectors"]}
        for det in self.detectors.values():
            if hasattr(det, "to_device"):
                det.to_device(spec["device"])
        self.model = load_pipeline(spec["model"], device=spec["device"], dtype=DTYPES[spec["dtype"]])
        from safediff.sampling import SamplerSettings

        g = spec["generation"]
        self.sampler = SamplerSettings.of(self.model, g.get("steps"), None, g.get("height"), g.get("width"),
                                          g.get("scheduler"), float(g.get("eta") or 0.0))
        self.negative_prompt = g.get("negative_prompt")

    def protocol(self) -> dict:
        """Everything the worker contributes to a run's identity (model hash, guard, detectors, settings)."""
        s = self.sampler.record(self.model)
        generation = {"steps": s["steps"], "height": s["height"], "width": s["width"],
                      "default_guidance": s["guidance"], "scheduler": s["scheduler"],
                      "negative_prompt": self.negative_prompt, "eta": s["eta"],
                      "scheduler_config": s["scheduler_config"]}
        if "embedded_guidance" in s:  # guidance-distilled models (FLUX.1 dev)
            generation["embedded_guidance"] = s["embedded_guidance"]
        return {
            "model": self.model.protocol(),
            "guard": self.guard.config(),
            "detectors": {s: d.protocol() for s, d in self.detectors.items()},
            "generation": generation,
            "device": str(self.model.device),
            "dtype": self.spec["dtype"],
        }

    def run(self, jobs: list[dict]) -> list[tuple[bytes, dict]]:
        """Generate and detect one batch (all jobs share one guidance) -> (PNG bytes, record) per job."""
        from safediff.sampling import generate

        s = self.sampler
        guidance = {j["guidance"] for j in jobs}
        if len(guidance) != 1:
            raise ValueError(f"a batch must share one guidance, got {sorted(guidance)}")
        prompts = [j["prompt"] for j in jobs]
        out = generate(self.model, prompts, [j["seed"] for j in jobs], steps=s.steps, guidance=guidance.pop(),
                       height=s.height, width=s.width, negative_prompt=self.negative_prompt, guard=self.guard,
                       scheduler=s.scheduler, eta=s.eta, batch_size=len(jobs), progress=False)
        pngs = [png_bytes(im) for im in out.images]
        images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]  # detect exactly what is stored
        found = {name: detect(det, images, prompts) for name, det in self.detectors.items()}
        blank = degenerate(images).tolist()
        return [(png, {"detections": {name: found[name][i] for name in found}, "degenerate": blank[i]})
                for i, png in enumerate(pngs)]
