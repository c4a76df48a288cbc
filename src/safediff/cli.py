"""The ``safediff`` command line. User errors print one line and exit with code 2."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from safediff import cli_inputs as check
from safediff.errors import SafediffError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Erase, guard, attack and benchmark concepts in text-to-image diffusion models.")


@app.command()
def generate(
    model: str = typer.Option("sandbox", help="'sandbox', 'sandbox-flux', a hub id, or a diffusers folder; SPEC+EDIT "
                                              "applies edits"),
    prompt: Optional[str] = typer.Option(None, help="Prompt text ('' = unconditional)."),
    prompts_file: Optional[Path] = typer.Option(None, help="CSV with a 'prompt' column (optional 'seed')."),
    seed: int = typer.Option(0, help="Seed of the first image; image j of a prompt uses seed + j."),
    n: int = typer.Option(1, help="Images per prompt."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (<= 1 disables CFG; FLUX: "
                                                        "true CFG, default 1)."),
    embedded_guidance: Optional[float] = typer.Option(None, help="FLUX.1 dev's distilled guidance input (default: "
                                                                 "3.5)."),
    height: Optional[int] = typer.Option(None, help="Image height, a multiple of 8 (SD3/FLUX: 16; default: the "
                                                    "model's)."),
    width: Optional[int] = typer.Option(None, help="Image width, a multiple of 8 (SD3/FLUX: 16; default: the "
                                                   "model's)."),
    negative_prompt: Optional[str] = typer.Option(None, help="Negative prompt for the unconditional branch."),
    guard: Optional[str] = typer.Option(None, help="Guard NAME[:PRESET], e.g. sld:max, casg-sld, safree."),
    concept: Optional[str] = typer.Option(None, help="Concept(s) for the guard: a preset (sexual, i2p-all, red), "
                                                     "a,b, or free text."),
    scheduler: Optional[str] = typer.Option(None, help="ddim, dpm++, euler, euler-a, pndm, lms, ddpm "
                                                       "(default: the model's)."),
    batch_size: int = typer.Option(8, help="Images per UNet batch."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    text_encoder_device: Optional[str] = typer.Option(None, help="Keep the text encoders here (e.g. cpu) while the "
                                                                 "denoiser uses --device (memory)."),
    cache_text: bool = typer.Option(False, help="SD3/FLUX: encode identical prompt batches once (memory/time)."),
    out: Path = typer.Option(..., help="New folder for the PNGs and protocol.json."),
):
    """Generate images and record the whole protocol next to them."""

    from safediff.bench.datasets import read_prompts_csv
    from safediff.guards import build_guard
    from safediff.models import load_pipeline
    from safediff.records import record
    from safediff.sampling import MAX_IMAGES, SCHEDULERS, check_settings, generate as run
    from safediff.storage import staged_folder, write_json_atomic

    if (prompt is None) == (prompts_file is None):
        raise SafediffError("give exactly one of --prompt TEXT or --prompts-file CSV")
    for value, what in ((prompt, "--prompt"), (negative_prompt, "--negative-prompt"), (concept, "--concept"),
                        (guard, "--guard"), (model, "--model")):
        check.text(value, what)
    check.seed(seed)
    check_settings(1 if steps is None else steps, 1.0 if guidance is None else guidance,
                   8 if height is None else height, 8 if width is None else width, n)
    if batch_size <= 0:
        raise SafediffError(f"batch-size must be a positive integer, got {batch_size}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise SafediffError(f"unknown scheduler '{scheduler}'; accepted: {', '.join(SCHEDULERS)}")
    rows = [{"prompt": prompt, "seed": seed}] if prompt is not None else read_prompts_csv(prompts_file)
    if len(rows) * n > MAX_IMAGES:
        raise SafediffError(f"{len(rows)} prompt(s) x --n {n} = {len(rows) * n} images; at most {MAX_IMAGES} per "
                            "command")
    jobs = [(r["prompt"], r.get("seed", seed + i) + j) for i, r in enumerate(rows) for j in range(n)]
    the_guard = build_guard(guard, concept)
    dev, dt = check.device(device), check.dtype(dtype)
    te_dev = None if text_encoder_device is None else check.device(text_encoder_device)
    with staged_folder(out) as tmp:
        m = load_pipeline(model, device=dev, dtype=dt, text_encoder_device=te_dev, cache_text=cache_text)
        result = run(m, [p for p, _ in jobs], [s for _, s in jobs], steps=steps, guidance=guidance, height=height,
                     width=width, negative_prompt=negative_prompt, guard=the_guard, scheduler=scheduler,
                     batch_size=batch_size, embedded_guidance=embedded_guidance)
        records = []
        for k, ((p, s), image) in enumerate(zip(jobs, result.images)):
            name = f"{k:06d}.png"
            image.save(tmp / name)
            records.append({"file": name, "prompt": p, "seed": s})
        write_json_atomic(tmp / "protocol.json", record("generation", model=m.protocol(), generation=result.settings,
                                                        images=records, device=dev))
    typer.echo(f"wrote {len(records)} image(s) and protocol.json to {out}")


@app.command()
def bench(
    benchmark: str = typer.Option(..., help="A benchmark name (i2p, i2p-sexual, coco-utility, sandbox-multi, "
                                            "sandbox-erase-red, ...) or a CSV with a 'prompt' column."),
    model: str = typer.Option("sandbox", help="'sandbox', 'sandbox-flux', a hub id, or a diffusers folder; SPEC+EDIT "
                                              "applies edits."),
    out: Path = typer.Option(..., help="Run folder: created, or resumed when it holds the same protocol."),
    guard: Optional[str] = typer.Option(None, help="Guard NAME[:PRESET], e.g. sld:max, casg-sld, safree."),
    concept: Optional[str] = typer.Option(None, help="Concept(s) for the guard (default: the benchmark's)."),
    detector: Optional[list[str]] = typer.Option(None, help="Detector NAME[:PRESET][,KEY=VALUE] (repeatable; "
                                                           "default: the benchmark's), e.g. nudenet:exposed9,"
                                                           "threshold=0.45."),
    data: Optional[str] = typer.Option(None, help="Local data file for the benchmark (I2P or COCO CSV)."),
    category: Optional[list[str]] = typer.Option(None, help="Keep rows of these categories (repeatable)."),
    hard: Optional[bool] = typer.Option(None, "--hard/--not-hard", help="Keep only hard / only non-hard rows."),
    limit: Optional[int] = typer.Option(None, help="Keep the first N prompts after selection."),
    skip_bad_rows: bool = typer.Option(False, help="Use the well-formed rows of a CSV with malformed ones."),
    images_per_prompt: int = typer.Option(1, help="Images per prompt; image j uses the row's seed + j."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, help="Guidance for every row (default: the row's, else the "
                                                        "model's)."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: the model's)."),
    scheduler: Optional[str] = typer.Option(None, help="ddim, dpm++, euler, euler-a, pndm, lms, ddpm."),
    negative_prompt: Optional[str] = typer.Option(None, help="Negative prompt for the unconditional branch."),
    batch_size: int = typer.Option(8, help="Images per batch (part of the protocol)."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    backend: str = typer.Option("local", help="local, or ray (pip install safediff\\[ray])."),
    workers: int = typer.Option(2, help="Ray workers (backend ray)."),
    name: Optional[str] = typer.Option(None, help="Method label in the results (default: model | guard)."),
):
    """Generate, detect and score a benchmark into a resumable run folder (results.json)."""
    from safediff.bench.runner import BenchConfig, run_benchmark

    texts = [(benchmark, "--benchmark"), (model, "--model"), (guard, "--guard"), (concept, "--concept"),
             (negative_prompt, "--negative-prompt"), (name, "--name"), *((d, "--detector") for d in detector or [])]
    for value, what in texts:
        check.text(value, what)
    results = run_benchmark(BenchConfig(
        benchmark=benchmark, model=model, out=out, guard=guard, concept=concept, detectors=detector or None,
        data=data, categories=tuple(category) if category else None, hard=hard, limit=limit,
        skip_bad_rows=skip_bad_rows, images_per_prompt=images_per_prompt, steps=steps, guidance=guidance,
        height=height, width=width, scheduler=scheduler, negative_prompt=negative_prompt, batch_size=batch_size,
        device=check.device(device), dtype=str(check.dtype(dtype)).replace("torch.", ""), backend=backend,
        workers=workers,
        name=name))
    n = results["n_samples"]
    typer.echo(f"{n['images']} image(s) of {n['prompts']} prompt(s); results in {out / 'results.json'}")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Finished bench or attack RUN folders."),
    out: Path = typer.Option(Path("report.html"), help="The HTML file to write (charts also as PNG beside it)."),
    max_prompts: int = typer.Option(8, help="Prompts shown in each image grid."),
    show_flagged: bool = typer.Option(False, help="Show flagged images unblurred."),
):
    """One self-contained HTML report: metrics with intervals, charts, ASR tables, image grids, protocols."""
    from safediff.bench.report import build_report

    path = build_report(runs, out, max_prompts=max_prompts, show_flagged=show_flagged)
    typer.echo(f"wrote {path}")


@app.command()
def attack(
    target: str = typer.Option(..., help="SPEC[+EDIT...][:GUARD[:PRESET]], e.g. sandbox, sandbox+uce.safetensors, "
                                         "sandbox:sld:max."),
    method: str = typer.Option(..., help="Attack NAME[:KEY=VALUE,...], e.g. p4d-n, unlearndiff:k=5 (lists: a;b)."),
    concept: str = typer.Option(..., help="The erased/guarded concept (a preset such as red or sexual, or text)."),
    prompts: Path = typer.Option(..., help="CSV with a 'prompt' column (optional seed; 'image' = a target image)."),
    judge: str = typer.Option(..., help="Detector NAME[:PRESET][,KEY=VALUE][,labels=A+B], e.g. sandbox-colour or "
                                        "nudenet:exposed9,threshold=0.45."),
    out: Path = typer.Option(..., help="RUN folder: created, or resumed when it holds the same protocol."),
    budget: Optional[str] = typer.Option(None, help="Per-prompt limits key=value[,key=value]: iterations, "
                                                    "unet_forward, unet_backward (denoiser calls: UNet or "
                                                    "transformer), text_encoder, seconds."),
    seed: int = typer.Option(0, help="Seed of prompt i is the row's seed, else seed + i."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps of judged generations (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, help="CFG scale (default: the model's)."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
):
    """Search for prompts that bring an erased or guarded concept back; resumable per prompt."""
    from safediff.attacks.budget import Budget
    from safediff.attacks.judge import build_judge
    from safediff.attacks.target import parse_target
    from safediff.attacks.runner import build_attack, read_attack_prompts, run_attack
    from safediff.guards import build_guard
    from safediff.sampling import check_settings

    for value, what in ((target, "--target"), (method, "--method"), (concept, "--concept"), (judge, "--judge"),
                        (budget, "--budget")):
        check.text(value, what)
    check.seed(seed)
    the_attack = build_attack(method)
    the_budget = Budget.parse(budget, the_attack.default_budget)
    the_judge = build_judge(judge, concept)
    rows = read_attack_prompts(prompts, the_attack.required_columns)
    check_settings(1 if steps is None else steps, 1.0 if guidance is None else guidance, 8, 8)
    _, _, guard_spec = target.partition(":")
    if guard_spec:
        build_guard(guard_spec, concept)  # reject an unknown guard before loading any model
    the_target = parse_target(target, concept, device=check.device(device), dtype=check.dtype(dtype), steps=steps,
                              guidance=guidance)
    results = run_attack(the_target, the_attack, the_judge, rows, the_budget, seed, out, prompts_file=str(prompts))
    typer.echo(f"{method} on {target}: Pre-ASR {results['pre_asr']:.3f} -> ASR {results['asr']:.3f} over "
               f"{results['n']} prompt(s); results in {out / 'results.json'}")


@app.command()
def erase(
    model: str = typer.Option("sandbox", help="'sandbox', 'sandbox-flux', a hub id, or a diffusers folder; SPEC+EDIT "
                                              "stacks this edit on earlier ones"),
    method: str = typer.Option(..., help="Eraser NAME[:KEY=VALUE,...], e.g. uce, uce:lamb=0.3, esd-x:iterations=150 "
                                         "(lists: a;b)."),
    concept: str = typer.Option(..., help="Concept(s) to erase: a preset (red, sexual, i2p-all), a,b, or free text."),
    preserve: Optional[str] = typer.Option(None, help="Comma-separated concepts/prompts to keep (default: the "
                                                      "concept's own preserve list; '' is always kept)."),
    guide: Optional[str] = typer.Option(None, help="What the concept is mapped to ('' = unconditional; default: "
                                                   "the concept's guide)."),
    validator: Optional[str] = typer.Option(None, help="How erasers that validate (RECE) rate an edit: sandbox (the "
                                                       "exact sandbox detectors). Default: none."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    text_encoder_device: Optional[str] = typer.Option(None, help="Keep the text encoders here (e.g. cpu) while the "
                                                                 "denoiser uses --device (memory)."),
    out: Path = typer.Option(..., help="Edit file to write (.safetensors); load it with --model SPEC+FILE."),
    export_text_encoder: Optional[Path] = typer.Option(None, help="Also write the edited text encoder(s) as "
                                                                  "transformers folders (text-encoder erasers: "
                                                                  "advunlearn, des)."),
):
    """Erase a concept from a model's weights and write the edit (only the changed tensors + its record).

    Iterative erasers (ESD, TRCE) checkpoint next to --out; the same command after a crash resumes where it stopped.
    """
    import time

    import torch

    from safediff.concepts import resolve
    from safediff.erasers import build_eraser
    from safediff.erasers.base import fit_to_file
    from safediff.models import load_pipeline

    if out.suffix != ".safetensors":
        raise SafediffError(f"--out must be a .safetensors file, got '{out}'")
    if out.exists():
        raise SafediffError(f"--out '{out}' exists; choose a new file")
    if export_text_encoder is not None and export_text_encoder.exists():
        raise SafediffError(f"--export-text-encoder '{export_text_encoder}' exists; choose a new folder")
    for value, what in ((model, "--model"), (method, "--method"), (concept, "--concept"), (preserve, "--preserve"),
                        (guide, "--guide")):
        check.text(value, what)
    concepts = resolve(concept)
    settings = {}
    if validator is not None:
        if validator != "sandbox":
            raise SafediffError(f"unknown validator '{validator}'; accepted: sandbox")
        from safediff.sandbox.validation import sandbox_validator

        settings["validator"] = sandbox_validator(concepts)
    eraser = build_eraser(method, **settings)
    keep = None if preserve is None else [p.strip() for p in preserve.split(",") if p.strip()]
    m = load_pipeline(model, device=check.device(device), dtype=check.dtype(dtype),
                      text_encoder_device=None if text_encoder_device is None else check.device(text_encoder_device))
    text_names = [f"{c}.{n}" for c in ("text_encoder", "text_encoder_2", "text_encoder_3")
                  if isinstance(getattr(m.pipe, c, None), torch.nn.Module)
                  for n, _ in getattr(m.pipe, c).named_parameters()]
    if export_text_encoder is not None and not any(eraser.touches(n) for n in text_names):
        raise SafediffError(f"--export-text-encoder: {eraser.name} does not change the text encoder (text-encoder "
                            "erasers: advunlearn, des)")
    start = time.perf_counter()
    edit = fit_to_file(eraser, m, concepts, out, preserve=keep, guide=guide)
    seconds = time.perf_counter() - start
    elements = sum(t.numel() for t in edit.tensors.values())
    typer.echo(f"{eraser.name}: erased {', '.join(c.name for c in concepts)}; {len(edit.tensors)} parameter "
               f"tensor(s) changed ({elements:,} values); {seconds:.1f} s; wrote {out}")
    if export_text_encoder is not None:
        edit.export_text_encoders(m, export_text_encoder)
        typer.echo(f"wrote the edited text encoder(s) to {export_text_encoder}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-run"), help="Demo folder: created, or continued when it holds the same "
                                                    "plan."),
    quick: bool = typer.Option(False, help="Tiny sets, 5 steps, token budgets: a smoke test (numbers mean nothing)."),
    workers: Optional[int] = typer.Option(None, help="Stages run side by side in this many processes (default: the "
                                                     "cores, at most 4; 1: all in this process)."),
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads per worker (default: the cores shared among "
                                                     "the workers)."),
    model: str = typer.Option("sandbox", help="sandbox (the UNet) or sandbox-flux (the FLUX-format transformer)."),
):
    """Every registered guard and eraser (and Ring-A-Bell) on a sandbox model, offline on a CPU, in one HTML report."""
    from safediff.demo import available_cores, format_table, run_demo

    for name, value in (("workers", workers), ("threads", threads)):
        if value is not None and value <= 0:
            raise SafediffError(f"{name} must be a positive integer, got {value}")
    workers = workers or min(4, available_cores())
    summary = run_demo(out, quick=quick, model=model, workers=workers, threads=threads)
    typer.echo(format_table(summary["methods"], summary["attack"]))
    typer.echo(f"report: {Path(summary['report']).resolve()}")


@app.command()
def ui(
    model: str = typer.Option("sandbox", help="Model shown first (any other can be typed in the page)."),
    host: str = typer.Option("127.0.0.1", help="Address to serve on (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, help="Port to serve on."),
    device: str = typer.Option("cpu"),
):
    """A local web page: one prompt on the base, edited and guarded model, same seeds (needs the ui extra)."""
    from safediff.ui import build_app

    if not 0 < port < 65536:
        raise SafediffError(f"port must be in 1..65535, got {port}")
    build_app(model, check.device(device)).launch(server_name=host, server_port=port)


def _mount_subcommands() -> None:
    from safediff.backdoors.cli import detect_backdoor
    from safediff.sandbox.cli import app as sandbox_app

    app.add_typer(sandbox_app, name="sandbox", help="Train and inspect the sandbox model.")
    app.command("detect-backdoor")(detect_backdoor)


_mount_subcommands()


class _QuietOptionalBackends(logging.Filter):
    """transformers announces on every import that torchvision is absent (safediff never needs it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def main() -> None:
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    logging.getLogger("transformers.utils.import_utils").addFilter(_QuietOptionalBackends())
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        app(standalone_mode=True)
    except SafediffError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
