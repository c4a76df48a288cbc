"""Speed of safe generation against diffusers, side by side in one process, on the same random-weight components.

Speed does not depend on weight values, so SD-1.5- and SDXL-sized components are built from configs
(``safediff.random_models``). Every row is timed in the same run and reported as a ratio to diffusers' own
eager ``StableDiffusionPipeline`` at the same batch size. Runs at tiny size on a CPU too (CI smoke test).

    python benchmarks/gpu_speed.py --arch sd15 --device cuda --dtype fp16 --out benchmarks/results/gpu_speed.json
    python benchmarks/gpu_speed.py --arch tiny-sd --steps 2 --batch-sizes 1 --repeats 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from safediff.errors import run_script
from safediff.guards import build_guard
from safediff.models import from_pipeline
from safediff.records import versions
from safediff.storage import write_json_atomic
from safediff.random_models import ARCHES, DIT_ARCHES, build_pipeline
from safediff.registry import GUARDS
from safediff.sampling import generate
from safediff.speed import optimize

PROMPT = "a photo of an astronaut riding a horse on the moon"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def diffusers_rows(pipe, bs, steps, guidance, size, device):
    gens = lambda: [torch.Generator("cpu").manual_seed(i) for i in range(bs)]  # noqa: E731
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, output_type="np")
    rows = {"diffusers eager": lambda: pipe([PROMPT] * bs, generator=gens(), **kw)}
    if type(pipe).__name__ == "StableDiffusionPipeline":
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig, StableDiffusionPipelineSafe

        safe = StableDiffusionPipelineSafe(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                           unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        safe.set_progress_bar_config(disable=True)
        rows["diffusers SLD max"] = lambda: safe([PROMPT] * bs, generator=gens(), **kw, **SafetyConfig.MAX)
    return rows


def safediff_rows(model, bs, steps, guidance, size):
    def run(guard=None):
        return lambda: generate(model, [PROMPT] * bs, list(range(bs)), steps=steps, guidance=guidance, height=size,
                                width=size, guard=guard, progress=False)

    rows = {"safediff none": run()}
    for label, spec, concept in (("safediff sld:max", "sld:max", None), ("safediff casg-sld (7 I2P)", "casg-sld",
                                                                          "i2p-all")):
        if spec.split(":")[0] in GUARDS:
            rows[label] = run(build_guard(spec, concept))
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd15", choices=[a for a in ARCHES if a not in DIT_ARCHES],
                    help="UNet architectures (SD3/FLUX side by side with diffusers at real sizes is not measured yet)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--size", type=int, default=None, help="image size (default: the architecture's native size)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", default=None, choices=["default", "reduce-overhead"],
                    help="also time safediff with a compiled UNet (CUDA graphs with reduce-overhead)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.device == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # half precision on CPU is orders of magnitude slower (ecosystem notes: 973 s)
    pipe = build_pipeline(args.arch, dtype=dtype).to(args.device)
    model = from_pipeline(pipe, spec=f"random:{args.arch}")
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    table = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        rows = diffusers_rows(pipe, bs, args.steps, args.guidance, size, args.device)
        rows.update(safediff_rows(model, bs, args.steps, args.guidance, size))
        results = {name: timed(fn, args.device, args.repeats) for name, fn in rows.items()}
        if args.compile:
            optimize(model, channels_last=True, compile=args.compile)
            results[f"safediff none, compiled ({args.compile})"] = timed(
                safediff_rows(model, bs, args.steps, args.guidance, size)["safediff none"], args.device,
                args.repeats)
            model = from_pipeline(build_pipeline(args.arch, dtype=dtype).to(args.device), spec=model.spec)
            pipe = model.pipe
        base = results["diffusers eager"]
        for name, sec in results.items():
            table.append({"batch_size": bs, "row": name, "seconds": sec, "ratio_to_diffusers_eager": sec / base})
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    record = {"arch": args.arch, "device": device_name, "dtype": str(dtype), "steps": args.steps,
              "guidance": args.guidance, "size": size, "scheduler": type(pipe.scheduler).__name__,
              "torch_threads": torch.get_num_threads(), "versions": versions(), "rows": table}
    print(f"{args.arch} on {device_name}, {dtype}, {size}², {args.steps} steps, CFG {args.guidance}")
    print(f"{'bs':>3}  {'row':<40} {'seconds':>9}  {'× diffusers eager':>18}")
    for r in table:
        print(f"{r['batch_size']:>3}  {r['row']:<40} {r['seconds']:>9.3f}  {r['ratio_to_diffusers_eager']:>18.2f}")
    if args.out:
        write_json_atomic(args.out, record)
    return record


if __name__ == "__main__":
    run_script(main)
