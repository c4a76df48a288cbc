"""Loading text-to-image pipelines: model specs, weights identity, sampler defaults, edits applied at load.

``load_pipeline(spec)`` accepts ``"sandbox"`` or ``"sandbox-flux"`` (the embedded models), a hub id such as
``CompVis/stable-diffusion-v1-4``, ``stabilityai/stable-diffusion-xl-base-1.0``,
``stabilityai/stable-diffusion-3.5-medium`` or ``black-forest-labs/FLUX.1-dev``, or a local diffusers folder,
optionally followed by edits: ``SPEC+EDIT[+EDIT...]``.
Weights are read from safetensors only. How each architecture encodes text, calls its denoiser and which projections
read text is the adapter's business (``safediff.adapters``).

Memory options for large models (SD3.5, FLUX.1 on one 24 GB GPU): ``dtype=torch.bfloat16`` halves every weight;
``text_encoder_device="cpu"`` keeps the text encoders (T5-XXL: 4.7 B parameters, 9.5 GB in bf16) in host memory
while the denoiser and the VAE use ``device`` (encodings are moved to the denoiser; encoding is slower); ``cache_text``
(SD3/FLUX) computes the encoding of an identical token batch once per weights version (the empty negative prompt of
every batch, a guard's concept texts). FLUX.1's transformer alone is 12 B parameters (24 GB in bf16), so FLUX.1 on a
24 GB GPU needs more than these (a quantized transformer), which safediff does not provide.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safediff.adapters import PIPELINE_CLASSES, SUPPORTED, Adapter, adapter_for
from safediff.errors import SafediffError
from safediff.hashing import state_sha256

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


@dataclass
class Model:
    """A loaded pipeline, its adapter, where it came from, and the edits applied to it."""

    pipe: object
    adapter: Adapter
    spec: str
    defaults: dict
    edits: list = field(default_factory=list)
    _base_sha256: str | None = None

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or the transformer."""
        return self.adapter.denoiser

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def negative_prompt(self) -> str | None:
        """The negative prompt the applied edits generate with (the last edit that declares one in its
        ``info.negative_prompt``, e.g. Geom-Erasing's), or None: the sampler uses it when given none."""
        for edit in reversed(self.edits):
            declared = edit.metadata.get("info", {}).get("negative_prompt")
            if declared:
                return str(declared)
        return None

    def weight_modules(self) -> list[torch.nn.Module]:
        return [self.denoiser, *self.adapter.text_encoders, self.pipe.vae]

    def weights_sha256(self) -> str:
        """Hash of the weights as they are now (edits included)."""
        return state_sha256(self.weight_modules())

    @property
    def base_sha256(self) -> str:
        """Hash of the weights as loaded, before any edit (computed on first use, which edits ensure)."""
        if self._base_sha256 is None:
            if self.edits:
                raise RuntimeError("base hash requested after an edit was applied")
            self._base_sha256 = self.weights_sha256()
        return self._base_sha256

    def protocol(self) -> dict:
        return {
            "spec": self.spec,
            "architecture": self.adapter.arch,
            "base_weights_sha256": self.base_sha256,
            "edits": [e.protocol() for e in self.edits],
            "dtype": str(self.dtype).replace("torch.", ""),
        }


def _defaults_for(adapter: Adapter, folder: Path | None) -> dict:
    record = folder / "safediff_sandbox.json" if folder else None
    if record is not None and record.is_file():
        return dict(json.loads(record.read_text())["defaults"])
    return adapter.default_settings()


def dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` from diffusers 0.40 (which deprecates ``torch_dtype``)."""
    from packaging.version import Version

    return "dtype" if Version(importlib.metadata.version("diffusers")) >= Version("0.40.0") else "torch_dtype"


def _load_folder_or_hub(source: str, device, dtype):
    from diffusers import DiffusionPipeline

    kwargs = {dtype_keyword(): dtype, "use_safetensors": True}
    try:
        pipe = DiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False, **kwargs)
    except TypeError:  # pipelines without a safety checker (SDXL) reject those arguments
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as e:
        raise SafediffError(f"could not load '{source}': {str(e).splitlines()[0]} (no network? weights must be "
                            "safetensors)") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_pipeline(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  text_encoder_device: str | torch.device | None = None, cache_text: bool = False) -> Model:
    """``"sandbox"``, ``"sandbox-flux"``, a hub id or a local diffusers folder, optionally ``+EDIT`` files applied in
    order; the memory options ``text_encoder_device`` and ``cache_text`` are described in the module docstring."""
    from safediff.edits import Edit

    base, *edit_paths = [s.strip() for s in spec.split("+")]
    folder: Path | None = None
    if base in ("sandbox", "sandbox-flux"):
        from safediff.sandbox import MODELS, verify_weights

        folder = verify_weights(MODELS[base])
    elif Path(base).is_dir():
        folder = Path(base)
        index = folder / "model_index.json"
        if not index.is_file():
            raise SafediffError(f"'{base}' is not a diffusers pipeline folder (no model_index.json); "
                                "accepted: 'sandbox', a hub id like CompVis/stable-diffusion-v1-4, or a local "
                                "folder written by save_pretrained")
        cls = json.loads(index.read_text()).get("_class_name")
        if cls not in PIPELINE_CLASSES:
            raise SafediffError(f"unsupported architecture {cls} in '{base}'; supported: {SUPPORTED}")
    elif Path(base).suffix in SINGLE_FILE_SUFFIXES:
        raise SafediffError(f"'{base}': single-file checkpoints are not supported; convert it to a diffusers folder "
                            "(diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR, "
                            "safe_serialization=True)) and give DIR")
    elif not HUB_ID.match(base):
        raise SafediffError(f"unknown model spec '{base}'; accepted: 'sandbox', 'sandbox-flux', a hub id like "
                            "CompVis/stable-diffusion-v1-4, or a local diffusers folder")
    edits = [Edit.load(p) for p in edit_paths]  # every file is checked before the weights are loaded
    pipe = _load_folder_or_hub(str(folder) if folder else base, device, dtype)
    adapter = adapter_for(pipe, cache_text)
    if text_encoder_device is not None:
        for te in adapter.text_encoders:
            te.to(text_encoder_device)
    model = Model(pipe=pipe, adapter=adapter, spec=spec, defaults=_defaults_for(adapter, folder))
    for edit in edits:
        edit.apply(model)
    return model


def from_pipeline(pipe, spec: str = "in-memory", defaults: dict | None = None) -> Model:
    """Wrap an already-built diffusers pipeline (tests, notebooks)."""
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for(pipe)
    return Model(pipe=pipe, adapter=adapter, spec=spec, defaults=defaults or _defaults_for(adapter, None))
