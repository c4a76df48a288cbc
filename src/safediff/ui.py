"""``safediff ui``: a local web page showing what a guard and an erasure do to one prompt (``pip install
safediff[ui]``).

Give a model (``sandbox``, a hub id or a local folder, optionally ``+EDIT`` files), a prompt, a first seed and a
number of images, and a guard with its concept. For the same seeds the page shows one panel each for the base
model without its edits (when edits are given), the model as given, and the model behind the guard (when one is
chosen), plus the recorded protocol of every panel. ``compare`` does the work (plain Python, tested without gradio);
``build_app`` only lays out the widgets (its steps and guidance start at the first model's defaults); models stay
loaded between clicks.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from safediff.errors import SafediffError

INSTALL = "pip install safediff[ui]"
MAX_IMAGES = 8
IMAGE_ROW_PX = 300  # each panel: one row of images, this tall


ROLES = ("base", "model", "guarded")  # base model without its edits; the model as given; the model behind the guard


@dataclass
class Column:
    role: str  # one of ROLES
    label: str
    images: list[Image.Image]
    settings: dict  # what sampling.generate recorded: steps, guidance, size, scheduler, guard


@dataclass
class Comparison:
    prompt: str
    seeds: list[int]
    columns: list[Column]
    protocol: dict


class ModelCache:
    """Loaded models by spec (``SPEC`` and ``SPEC+EDIT`` are two entries: an edit changes the weights); the
    ``keep`` most recently used stay loaded (a comparison needs two), so typing many specs does not fill the GPU."""

    def __init__(self, device: str = "cpu", keep: int = 2):
        self.device, self.keep = device, keep
        self._models: dict = {}

    def get(self, spec: str):
        from safediff.models import load_pipeline

        model = self._models.pop(spec, None) or load_pipeline(spec, device=self.device)
        self._models[spec] = model  # most recent last
        while len(self._models) > self.keep:
            self._models.pop(next(iter(self._models)))
        return model


def compare(models: ModelCache, spec: str, prompt: str, seed: int, n: int, guard: str | None = None,
            concept: str | None = None, steps: int | None = None, guidance: float | None = None) -> Comparison:
    """Generate ``n`` images (seeds ``seed`` … ``seed + n - 1``) per column: base model (if ``spec`` has edits),
    ``spec``, and ``spec`` behind ``guard`` (if one is given)."""
    from safediff.guards import build_guard
    from safediff.records import provenance
    from safediff.sampling import generate

    spec = (spec or "").strip()
    if not spec:
        raise SafediffError("empty model; give 'sandbox', a hub id or a local diffusers folder (optionally +EDIT)")
    if not 1 <= int(n) <= MAX_IMAGES:
        raise SafediffError(f"images must be between 1 and {MAX_IMAGES}, got {n}")
    guard = None if not guard or guard == "none" else guard
    the_guard = build_guard(guard, concept or None) if guard else None
    seeds = [int(seed) + j for j in range(int(n))]
    base = spec.split("+")[0].strip()
    plan = ([("base", f"{base} (no edits)", base, None)] if base != spec else []) + [("model", spec, spec, None)]
    if the_guard is not None:
        plan.append(("guarded", f"{spec} + {guard}", spec, the_guard))
    columns, models_used = [], {}
    for role, label, model_spec, g in plan:
        model = models.get(model_spec)
        out = generate(model, [prompt] * len(seeds), seeds, steps=steps, guidance=guidance, guard=g, progress=False)
        columns.append(Column(role, label, out.images, out.settings))
        models_used[model_spec] = model.protocol()
    protocol = {"prompt": prompt, "seeds": seeds, "models": models_used,
                "columns": [{"label": c.label, "generation": c.settings} for c in columns],
                "provenance": provenance()}
    return Comparison(prompt, seeds, columns, protocol)


def panels(result: Comparison) -> list[Column | None]:
    """The page's image panels in ``ROLES`` order (None: not shown for this comparison)."""
    by_role = {c.role: c for c in result.columns}
    return [by_role.get(role) for role in ROLES]


def build_app(model: str = "sandbox", device: str = "cpu"):
    """The gradio Blocks app (not launched)."""
    try:
        import gradio as gr
    except ImportError:
        raise SafediffError(f"the UI needs the optional extra: {INSTALL}") from None
    from safediff.registry import GUARDS

    models = ModelCache(device)
    defaults = models.get(model).defaults  # the first model's sampler settings fill the form (loaded once, kept)

    def run(spec, prompt, seed, n, guard, preset, concept, steps, guidance):
        guard_spec = guard if guard == "none" or not preset.strip() else f"{guard}:{preset.strip()}"
        try:
            result = compare(models, spec, prompt, int(seed), int(n), guard_spec, concept.strip() or None,
                             int(steps), float(guidance))
        except SafediffError as e:
            raise gr.Error(str(e)) from None
        shown = [gr.Gallery(visible=False) if c is None else
                 gr.Gallery(value=[(im, f"seed {sd}") for im, sd in zip(c.images, result.seeds)], label=c.label,
                            visible=True, columns=len(result.seeds), height=IMAGE_ROW_PX) for c in panels(result)]
        return *shown, result.protocol

    with gr.Blocks(title="safediff") as app:
        gr.Markdown("## safediff — one prompt, with and without a guard and an erasure\n"
                    "Panels: the base model without its edits (when the model names `+EDIT` files), the model as "
                    "given, and the model behind the guard; the same seeds in each.")
        with gr.Row():
            spec = gr.Textbox(model, label="model (sandbox, hub id, folder; +EDIT.safetensors applies an edit)")
            prompt = gr.Textbox("a red circle", label="prompt")
        with gr.Row():
            guard = gr.Dropdown(GUARDS.names(), value="sld", label="guard")
            preset = gr.Textbox("max", label="guard preset / options (e.g. max, or safety_scale=2000)")
            concept = gr.Textbox("red", label="concept (preset such as sexual, i2p-all, red; a,b; or free text)")
        with gr.Row():
            seed = gr.Number(0, precision=0, label="first seed")
            n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="images per panel")
            steps = gr.Number(defaults["steps"], precision=0, label="denoising steps")
            guidance = gr.Number(defaults["guidance"], label="guidance scale (CFG)")
        button = gr.Button("Generate", variant="primary")
        images = [gr.Gallery(label=label, format="png", object_fit="contain", visible=False, allow_preview=True)
                  for label in ROLES]
        protocol = gr.JSON(label="protocol")
        button.click(run, [spec, prompt, seed, n, guard, preset, concept, steps, guidance], [*images, protocol])
    return app
