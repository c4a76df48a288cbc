"""CLIP score (Hessel et al., EMNLP 2021, without the 2.5 weight): image-text agreement for utility.

    CLIPScore(x, c) = max(cos(E_I(x), E_T(c)), 0)

with E_I, E_T CLIP's projected image and text embeddings (``visual_projection(pooler_output)``,
``text_projection(pooler_output)``). The score is in [0, 1]; the report multiplies it by ``scale``: 1 gives the
UnlearnDiffAtk / AdvUnlearn numbers (``logits_per_image / 100`` with ``openai/clip-vit-base-patch32``, ~0.30 on
COCO), 100 gives torchmetrics' ``CLIPScore`` convention (~30). Numbers are comparable only for the same CLIP model
and scale, so both are recorded. Own implementation: torchmetrics' breaks on transformers 5.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from safediff.detectors.base import Detector, module_sha256
from safediff.detectors.q16 import pixel_values
from safediff.errors import SafediffError

CLIP_ID = "openai/clip-vit-base-patch32"


def load_clip(source: str):
    """CLIPModel, its tokenizer and image processor, from a hub id or a local folder (safetensors only)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(source, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(source)
        processor = CLIPImageProcessor.from_pretrained(source)
    except OSError as e:
        raise SafediffError(f"could not load CLIP '{source}': {str(e).splitlines()[0]} (no network? weights must be "
                            "safetensors)") from None
    if len(tokenizer) <= 2:  # transformers 5 silently returns a 2-token vocabulary for a missing tokenizer
        raise SafediffError(f"the tokenizer of CLIP '{source}' has {len(tokenizer)} tokens; it did not load")
    return model.eval(), tokenizer, processor


class ClipScore(Detector):
    name = "clip-score"
    version = "1"
    labels = ("clip_score",)
    flag_labels = ()
    needs_prompts = True

    def __init__(self, model: str = CLIP_ID, scale: str = "1"):
        if scale not in ("1", "100"):
            raise SafediffError(f"clip-score: scale must be 1 (cosine, UnlearnDiffAtk) or 100 (torchmetrics), "
                                f"got {scale}")
        self.source = model
        self.scale = float(scale)
        self.threshold = 0.0
        self._parts = None
        self.device = "cpu"

    def to_device(self, device: str) -> "ClipScore":
        """Run CLIP on ``device`` (the generation device in a benchmark run)."""
        self.device = device
        if self._parts is not None:
            self._parts[0].to(device)
        return self

    @classmethod
    def from_parts(cls, model, tokenizer, processor, scale: str = "1", source: str = "in-memory") -> "ClipScore":
        c = cls(model=source, scale=scale)
        c._parts = (model.eval(), tokenizer, processor)
        return c

    def _load(self):
        if self._parts is None:
            model, tokenizer, processor = load_clip(self.source)
            self._parts = (model.to(self.device), tokenizer, processor)
        return self._parts

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image] | torch.Tensor,
               prompts: Sequence[str] | None = None) -> torch.Tensor:
        if prompts is None or len(prompts) != len(images):
            raise SafediffError("clip-score needs one prompt per image")
        model, tokenizer, processor = self._load()
        x = pixel_values(processor, images).to(model.device, model.dtype)
        img = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
        tok = tokenizer(list(prompts), padding=True, truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").to(model.device)
        txt = model.text_projection(model.text_model(input_ids=tok.input_ids,
                                                     attention_mask=tok.attention_mask).pooler_output)
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return cos.clamp(min=0).cpu()[:, None]

    def flags(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.zeros(scores.shape[0], dtype=torch.bool)  # a utility score, never a verdict

    def weights_sha256(self) -> str | None:
        return module_sha256(self._load()[0])

    def protocol(self) -> dict:
        return {**super().protocol(), "clip": self.source, "scale": self.scale,
                "image_processor": type(self._load()[2]).__name__,
                "rule": "max(cos(image_embeds, text_embeds), 0) * scale"}
