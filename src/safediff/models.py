"""Loading text-to-image pipelines and the per-architecture adapters every method goes through.

``load_pipeline(spec)`` accepts ``"sandbox"`` (the embedded model), a hub id such as ``CompVis/stable-diffusion-v1-4``
or ``stabilityai/stable-diffusion-xl-base-1.0``, or a local diffusers folder, optionally followed by edits:
``SPEC+EDIT[+EDIT...]``. Weights are read from safetensors only.

An *adapter* knows, for one architecture, how prompts become conditioning (SD 1.x/2.x: one CLIP encoder's last hidden
state; SDXL: two encoders' penultimate hidden states concatenated, the pooled embedding and the time ids) and which
cross-attention projections read text. Guards, erasers and attacks use the adapter, never architecture ``if``s.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safediff.errors import SafediffError

logger = logging.getLogger("safediff")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@contextlib.contextmanager
def substituted_token_embeddings(text_encoder, embeds: torch.Tensor):
    """While active, the encoder's token-embedding layer returns ``embeds`` [B, L, D] instead of looking ids up.

    A temporary forward hook on ``get_input_embeddings()`` (``embeddings.token_embedding``); gradients flow into
    ``embeds``; position embeddings, the causal mask and EOS pooling (read from the real ``input_ids``) are untouched.
    """
    layer = text_encoder.get_input_embeddings()

    def hook(module, args, output):
        if output.shape != embeds.shape:
            raise ValueError(f"token embeddings of shape {tuple(embeds.shape)} given for ids embedding to "
                             f"{tuple(output.shape)}")
        return embeds.to(output.dtype)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Conditioning:
    """Text conditioning of a batch: what the UNet's cross-attention (and SDXL's added embedding) reads."""

    embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor | None = None  # [B, P] (SDXL's text_embeds), else None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, idx) -> "Conditioning":
        return Conditioning(self.embeds[idx], None if self.pooled is None else self.pooled[idx])

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return Conditioning(torch.cat([c.embeds for c in items]), pooled)

    def where(self, mask: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Per sample: ``other`` where mask[b] is True, else self."""
        m = mask.view(-1, 1, 1).to(self.embeds.device)
        pooled = None
        if self.pooled is not None:
            pooled = torch.where(mask.view(-1, 1).to(self.pooled.device), other.pooled, self.pooled)
        return Conditioning(torch.where(m, other.embeds, self.embeds), pooled)


class Adapter:
    """SD 1.x: one CLIP text encoder, its last hidden state is the conditioning."""

    arch = "sd1"

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer]

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder]

    @property
    def max_length(self) -> int:
        return self.tokenizers[0].model_max_length

    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        """Token ids [B, max_length] (BOS ... EOS pad); warns once naming how many tokens a long prompt loses."""
        tok = tokenizer or self.tokenizers[0]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        lengths = [len(x) for x in tok(prompts, truncation=False).input_ids]
        dropped = [n - tok.model_max_length for n in lengths if n > tok.model_max_length]
        if dropped:
            logger.warning("%d prompt(s) longer than the text encoder's %d-token window were truncated "
                           "(%s token(s) dropped)", len(dropped), tok.model_max_length, ", ".join(map(str, dropped)))
        return ids

    def encode(self, prompts: list[str]) -> Conditioning:
        return self.encode_ids([self.tokenize(prompts, tok) for tok in self.tokenizers])

    def encode_ids(self, input_ids: list[torch.Tensor]) -> Conditioning:
        """As ``encode``, from prepared token ids: one [B, L] tensor per tokenizer, in ``tokenizers`` order."""
        te = self.text_encoders[0]
        return Conditioning(te(input_ids[0].to(te.device))[0].to(self.pipe.unet.dtype))

    def encode_negative(self, negative: list[str] | None, batch: int) -> Conditioning:
        """The unconditional branch: the negative prompts, or the empty prompt."""
        return self.encode(negative if negative is not None else [""] * batch)

    def unet_kwargs(self, cond: Conditioning, height: int, width: int) -> dict:
        return {}

    def cross_attention_kv(self) -> list[tuple[str, torch.nn.Linear]]:
        """The cross-attention key/value projections that read text (``attn2.to_k`` / ``attn2.to_v``)."""
        return [(n, m) for n, m in self.pipe.unet.named_modules()
                if n.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(m, torch.nn.Linear)]

    @property
    def text_dim(self) -> int:
        return self.pipe.unet.config.cross_attention_dim

    def token_embedding(self, k: int = 0) -> torch.nn.Embedding:
        """Encoder k's vocabulary embedding table (rows = token ids)."""
        return self.text_encoders[k].get_input_embeddings()

    def encode_token_embeddings(self, input_ids: list[torch.Tensor], token_embeds: list[torch.Tensor]) -> Conditioning:
        """As ``encode``, but encoder k's token embeddings are ``token_embeds[k]`` [B, L, D_k] (differentiable, e.g.
        soft or relaxed tokens); ``input_ids[k]`` [B, L] (tokenizer k's ids) still set the EOS pooling position."""
        te = self.text_encoders[0]
        with substituted_token_embeddings(te, token_embeds[0]):
            return Conditioning(te(input_ids[0].to(te.device))[0].to(self.pipe.unet.dtype))


class SD2Adapter(Adapter):
    """SD 2.x: as SD 1.x, with an OpenCLIP-H encoder (1024-d) and often v-prediction (read from the scheduler)."""

    arch = "sd2"


class SDXLAdapter(Adapter):
    """SDXL: two encoders' penultimate hidden states concatenated; pooled embedding of the second; size time ids."""

    arch = "sdxl"

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer, self.pipe.tokenizer_2]

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    def _conditioning(self, outputs: list) -> Conditioning:
        """Both encoders' penultimate hidden states concatenated; the pooled text_embeds of the projecting one."""
        pooled = next(out[0] for out in outputs if out[0].ndim == 2)  # CLIPTextModelWithProjection: text_embeds
        dtype = self.pipe.unet.dtype
        return Conditioning(torch.cat([out.hidden_states[-2] for out in outputs], dim=-1).to(dtype), pooled.to(dtype))

    def encode_ids(self, input_ids: list[torch.Tensor]) -> Conditioning:
        return self._conditioning([te(ids.to(te.device), output_hidden_states=True)
                                   for ids, te in zip(input_ids, self.text_encoders)])

    def encode_token_embeddings(self, input_ids: list[torch.Tensor], token_embeds: list[torch.Tensor]) -> Conditioning:
        outputs = []
        for ids, embeds, te in zip(input_ids, token_embeds, self.text_encoders):
            with substituted_token_embeddings(te, embeds):
                outputs.append(te(ids.to(te.device), output_hidden_states=True))
        return self._conditioning(outputs)

    def encode_negative(self, negative: list[str] | None, batch: int) -> Conditioning:
        if negative is None and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            probe = self.encode([""])
            return Conditioning(torch.zeros_like(probe.embeds).expand(batch, -1, -1).clone(),
                                torch.zeros_like(probe.pooled).expand(batch, -1).clone())
        return self.encode(negative if negative is not None else [""] * batch)

    def unet_kwargs(self, cond: Conditioning, height: int, width: int) -> dict:
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.embeds.dtype,
                                device=cond.embeds.device).repeat(len(cond), 1)
        return {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids}}


SUPPORTED = "StableDiffusionPipeline (SD 1.x/2.x, the sandbox) and StableDiffusionXLPipeline (SDXL)"


def adapter_for(pipe) -> Adapter:
    name = type(pipe).__name__
    if name == "StableDiffusionXLPipeline":
        return SDXLAdapter(pipe)
    if name in ("StableDiffusionPipeline", "StableDiffusionPipelineSafe"):
        return SD2Adapter(pipe) if pipe.unet.config.cross_attention_dim == 1024 else Adapter(pipe)
    raise SafediffError(f"unsupported architecture {name}; supported: {SUPPORTED}")


def tensors_sha256(modules: list[torch.nn.Module]) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of the given modules, in order."""
    h = hashlib.sha256()
    for mi, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{mi}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def weight_modules(self) -> list[torch.nn.Module]:
        return [self.pipe.unet, *self.adapter.text_encoders, self.pipe.vae]

    def weights_sha256(self) -> str:
        """Hash of the weights as they are now (edits included)."""
        return tensors_sha256(self.weight_modules())

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


def _defaults_for(pipe, folder: Path | None) -> dict:
    record = folder / "safediff_sandbox.json" if folder else None
    if record is not None and record.is_file():
        return dict(json.loads(record.read_text())["defaults"])
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return {"steps": 50, "guidance": 7.5, "height": size, "width": size}


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


def load_pipeline(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """``"sandbox"``, a hub id or a local diffusers folder, optionally ``+EDIT`` files applied in order."""
    base, *edit_paths = [s.strip() for s in spec.split("+")]
    folder: Path | None = None
    if base == "sandbox":
        from safediff.sandbox import WEIGHTS_DIR, verify_weights

        verify_weights()
        folder = Path(WEIGHTS_DIR)
    elif Path(base).is_dir():
        folder = Path(base)
        index = folder / "model_index.json"
        if not index.is_file():
            raise SafediffError(f"'{base}' is not a diffusers pipeline folder (no model_index.json); "
                                "accepted: 'sandbox', a hub id like CompVis/stable-diffusion-v1-4, or a local "
                                "folder written by save_pretrained")
        cls = json.loads(index.read_text()).get("_class_name")
        if cls not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionPipelineSafe"):
            raise SafediffError(f"unsupported architecture {cls} in '{base}'; supported: {SUPPORTED}")
    elif not HUB_ID.match(base):
        raise SafediffError(f"unknown model spec '{base}'; accepted: 'sandbox', a hub id like "
                            "CompVis/stable-diffusion-v1-4, or a local diffusers folder")
    for p in edit_paths:
        if not Path(p).is_file():
            raise SafediffError(f"edit file '{p}' not found (SPEC+EDIT expects a .safetensors edit)")
    pipe = _load_folder_or_hub(str(folder) if folder else base, device, dtype)
    model = Model(pipe=pipe, adapter=adapter_for(pipe), spec=spec, defaults=_defaults_for(pipe, folder))
    if edit_paths:
        from safediff.erasers.edit import Edit

        for p in edit_paths:
            Edit.load(p).apply(model)
    return model


def from_pipeline(pipe, spec: str = "in-memory", defaults: dict | None = None) -> Model:
    """Wrap an already-built diffusers pipeline (tests, notebooks)."""
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe=pipe, adapter=adapter_for(pipe), spec=spec, defaults=defaults or _defaults_for(pipe, None))
