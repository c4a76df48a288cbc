"""Which parameters play which part, read from their names (``component.module….param``), for every architecture.

Erasers declare what they may change through these roles (``Eraser.touches`` sees only a name), and trainers select
what they tune with them. ``unet.…`` names follow diffusers' ``UNet2DConditionModel``; ``transformer.…`` names its
``SD3Transformer2DModel`` and ``FluxTransformer2DModel``, which share the MM-DiT naming: double-stream (joint) blocks
``transformer_blocks.N`` whose attention ``attn`` has image projections ``to_q/to_k/to_v/to_out`` and text (context)
projections ``add_q_proj/add_k_proj/add_v_proj/to_add_out``; FLUX's single-stream blocks
``single_transformer_blocks.N``, where text and image share ``attn.to_q/to_k/to_v``; SD3.5's extra image
self-attention ``attn2``.

Roles:
- ``text_kv``: key/value projections of the text tokens: UNet ``attn2.to_k``/``to_v`` (cross-attention); MM-DiT
  ``attn.add_k_proj``/``add_v_proj`` of the joint blocks (FLUX's single-stream blocks have none: text and image
  share ``to_k``/``to_v`` there);
- ``text_reader``: layers whose input is a text encoder's output itself: UNet ``attn2.to_k``/``to_v``; MM-DiT
  ``context_embedder`` (token sequence) and ``time_text_embed.text_embedder`` (pooled vector);
- ``text_attention``: the attention where image and text meet (ESD-x): UNet ``attn2``; MM-DiT every block's joint
  attention ``attn`` (double- and single-stream);
- ``image_attention``: how the image attends (TRCE stage 2): UNet ``attn1`` and ``attn2.to_q``; MM-DiT the joint
  blocks' image-stream projections ``attn.to_q/to_k/to_v/to_out`` and q/k norms, and SD3.5's ``attn2`` (single-stream
  projections, shared with text, are not included);
- ``image_self_attention``: attention among image tokens only: UNet ``attn1``; MM-DiT SD3.5's ``attn2`` (SD3 and FLUX
  have none: their image tokens attend jointly with the text);
- ``text_conditioned``: everything ESD-u leaves out besides text attention: UNet the timestep/added embeddings and
  the output head; MM-DiT the text-stream-only layers (``context_embedder``, ``norm1_context``, ``ff_context``), the
  timestep/guidance/pooled-text embedder ``time_text_embed`` and the output head ``norm_out``/``proj_out``.

Parameter groups: what a trainer tunes, named once for every trainer (``in_group``; ``erasers.modules`` gives a model's
parameters of a group). Names carry their component (``unet.…`` / ``transformer.…``, ``text_encoder.…``,
``text_encoder_2.…``, ``text_encoder_3.…``; ``safediff.edits``):

- ``text_encoder``: every transformer layer and the final layer norm of every CLIP text encoder (AdvUnlearn's
  ``text_encoder_full``: the token and position embeddings stay; SDXL: both encoders; SD3: CLIP-L and CLIP-G; FLUX:
  CLIP-L). T5 (SD3's ``text_encoder_3``, FLUX's ``text_encoder_2``) is never in it: its layers are named
  ``encoder.block.…`` and its final norm ``encoder.final_layer_norm``, a CLIP's ``[text_model.]encoder.layers.…``
  and ``[text_model.]final_layer_norm``;
- ``text_encoder_all``: every parameter of every text encoder, embeddings included (DES's reference);
- denoiser groups, by role: ``xattn`` = ``text_attention`` (ESD-x); ``kv`` = ``text_kv`` (ESD-x-strict, Concept
  Ablation's ``cross-attn``); ``noxattn`` = ESD-u's set (neither ``text_attention`` nor ``text_conditioned``);
  ``full``: every denoiser parameter.
"""

from __future__ import annotations

import re

from safediff.errors import SafediffError

_DIT_JOINT_ATTN = re.compile(r"^transformer_blocks\.\d+\.attn\.")
_DIT_ANY_ATTN = re.compile(r"^(single_)?transformer_blocks\.\d+\.attn\.")
_DIT_IMAGE_PROJ = re.compile(r"^transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out|norm_q|norm_k)\.|attn2\.)")
_DIT_TEXT_ONLY = re.compile(r"^transformer_blocks\.\d+\.(norm1_context|ff_context)\.")
_DIT_OUTSIDE = ("context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")
_UNET_OUTSIDE = ("time_embedding.", "add_embedding.", "conv_norm_out.", "conv_out.")
_DIT_IMAGE_SELF = re.compile(r"^transformer_blocks\.\d+\.attn2\.")

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER_COMPONENTS = ("unet", "transformer")
GROUPS = {
    "text_encoder": "CLIP text-encoder transformer layers and final layer norm",
    "text_encoder_all": "every text-encoder parameter",
    "xattn": "denoiser text-image attention (UNet attn2; MM-DiT attn)",
    "kv": "denoiser text key/value projections",
    "noxattn": "denoiser without text attention, time embedding, output head",
    "full": "every denoiser parameter",
}


def roles(name: str) -> frozenset[str]:
    """The roles of parameter ``name`` (with its component prefix: ``unet.`` or ``transformer.``)."""
    component, _, rest = name.partition(".")
    out = set()
    if component == "unet":
        if ".attn2.to_k." in rest or ".attn2.to_v." in rest:
            out |= {"text_kv", "text_reader"}
        if ".attn2." in rest:
            out.add("text_attention")
        if ".attn1." in rest or ".attn2.to_q." in rest:
            out.add("image_attention")
        if ".attn1." in rest:
            out.add("image_self_attention")
        if rest.startswith(_UNET_OUTSIDE):
            out.add("text_conditioned")
    elif component == "transformer":
        if _DIT_JOINT_ATTN.match(rest) and (".attn.add_k_proj." in rest or ".attn.add_v_proj." in rest):
            out.add("text_kv")
        if rest.startswith(("context_embedder.", "time_text_embed.text_embedder.")):
            out.add("text_reader")
        if _DIT_ANY_ATTN.match(rest):
            out.add("text_attention")
        if _DIT_IMAGE_PROJ.match(rest):
            out.add("image_attention")
        if _DIT_IMAGE_SELF.match(rest):
            out.add("image_self_attention")
        if rest.startswith(_DIT_OUTSIDE) or _DIT_TEXT_ONLY.match(rest):
            out.add("text_conditioned")
    return frozenset(out)


def has_role(name: str, role: str) -> bool:
    return role in roles(name)


def denoiser_names(model, role: str) -> list[str]:
    """Names (relative to the denoiser, as ``named_parameters`` gives them) of its parameters with ``role``."""
    prefix = model.adapter.denoiser_component
    return [n for n, _ in model.denoiser.named_parameters() if role in roles(f"{prefix}.{n}")]


def check_group(group: str, owner: str, trains: str | None = None) -> str:
    """``group`` if it is a known group (of the text encoders with ``trains="text"``, of the denoiser with
    ``trains="denoiser"``); else one SafediffError line naming the accepted ones."""
    if group not in GROUPS:
        raise SafediffError(f"{owner}: unknown module '{group}'; accepted: {', '.join(GROUPS)}")
    if trains is not None and is_text_group(group) != (trains == "text"):
        accepted = [g for g in GROUPS if is_text_group(g) == (trains == "text")]
        what = "a text encoder" if trains == "text" else "the denoiser"
        raise SafediffError(f"{owner} trains {what}; module must be one of {', '.join(accepted)}, got '{group}'")
    return group


def is_text_group(group: str) -> bool:
    return group.startswith("text_encoder")


def in_group(group: str, name: str) -> bool:
    """Whether the parameter ``name`` (``unet.…``, ``transformer.…``, ``text_encoder.…``) belongs to ``group``."""
    component, _, rest = name.partition(".")
    if is_text_group(check_group(group, "parameter group")):
        if component not in TEXT_COMPONENTS:
            return False
        rest = rest.removeprefix("text_model.")  # CLIPTextModelWithProjection nests it; CLIPTextModel may not
        return group == "text_encoder_all" or rest.startswith(("encoder.layers.", "final_layer_norm."))
    if component not in DENOISER_COMPONENTS:
        return False
    if group == "noxattn":
        return not (has_role(name, "text_attention") or has_role(name, "text_conditioned"))
    return group == "full" or has_role(name, {"xattn": "text_attention", "kv": "text_kv"}[group])
