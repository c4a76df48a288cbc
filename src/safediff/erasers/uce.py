"""UCE: Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzyńska, Bau; WACV 2024, arXiv 2308.14761).

Update rule (paper Eq. 7, with the reference code's λ term and scales), for every projection ``W`` that reads text
(UNet: the cross-attention keys/values ``attn2.to_k``/``to_v``; SDXL: both encoders' embeddings concatenated):

    W = (λ W_old + s_e Σ_{i∈E} v_i* c_iᵀ + s_p Σ_{j∈P} W_old c_j c_jᵀ)
        · (λ I + s_e Σ_{i∈E} c_i c_iᵀ + s_p Σ_{j∈P} c_j c_jᵀ)⁻¹

``c_i``: text-embedding rows of the erase prompts; ``v_i* = W_old c_i^guide`` (technique "replace"), the guide's row
paired with ``c_i``; ``P``: rows of the preserved prompts, the empty prompt always among them. Solved in float64
(``safediff.erasers.closed_form``), written back in the model's dtype. Nothing else changes.

Rows (``safediff.erasers.prompts``): ``tokens="to_end"`` (default) is the 2023 code's convention, the word's last
token through the end of the sequence; ``tokens="last"`` is the 2025 code's, the last word token only. ``to_end`` is
the default because through causal attention every later token (following words, EoT, padding) carries the concept,
and in a prompt such as "a red triangle" those later tokens are what the UNet reads (on the sandbox, ``last`` leaves
much more of the concept; see benchmarks/results). Padding rows meet the guide's padding at the same position by
default (``padding="shifted"``: the 2023 pairing; see ``safediff.erasers.prompts``); ``UCE(expand_prompts=False,
padding="shifted")`` is the 2023 script's edit. ``expand_prompts=True`` (default; the 2025 code's
``--expand_prompts``, off there) edits the word inside template prompts, each occurrence located in the token ids.
Synonyms are never added by themselves; pass them in ``also_erase`` if you know them.

SD3 / FLUX (MM-DiT). The formula is a least-squares fit over rows the edited layer *reads*; it is exact only for a
layer whose input is the text encoders' output. In an MM-DiT the context key/value projections of block k read the
text stream after k blocks (normalised, modulated by the timestep, and mixed with the image stream by joint
attention), not the encoder output, so rows computed from the encoders are not their inputs. Two choices
(``layers``):
- ``readers`` (default): edit the layers that read the encoder outputs directly: ``context_embedder`` (the token
  rows of every segment: SD3's CLIP and T5 tokens, FLUX's T5 tokens) and the pooled-text embedder's first layer
  ``time_text_embed.text_embedder.linear_1`` (pooled rows: one per prompt), each with its own ``T``. This is what
  the 2025 UCE code does for FLUX (``uce_flux_edit.py``; it takes only the word's last T5 token). Guarantee: the
  objective above is solved exactly for these layers, so after them the erase prompts' text stream starts where the
  guide's would (up to the least-squares residual) and everything downstream, joint attention included, reads that.
- ``text-kv``: edit the joint blocks' context K/V (``attn.add_k_proj``/``add_v_proj``; on UNet models the same
  cross-attention K/V as ``readers``), each fitted on the inputs it actually reads, recorded from the denoiser
  (``safediff.erasers.text_stream``). FLUX's single-stream blocks are not edited: their ``to_k``/``to_v`` project
  text and image tokens alike, so a text edit there would change the image's keys too.

Defaults: λ = 0.5, s_e = 1, s_p = 1 (2025 code; the 2023 script used s_p = 0.1). Differences from the reference code:
the 2025 ``--expand_prompts`` loop zips the erase concepts with the *preserve* concepts (so nothing is expanded
without a preserve list), adds the templated erase prompts to the preserve set too, and guides them to the preserve
concept; here templated erase prompts are guided to the same template with the guide text, and preserved prompts
never contain an erased word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from safediff.adapters.roles import has_role
from safediff.concepts import Concept
from safediff.erasers.base import Eraser
from safediff.erasers.closed_form import kv_projections, reader_projections, transformed, uce_transform
from safediff.erasers.prompts import build_rows
from safediff.errors import SafediffError
from safediff.options import option

LAYERS = ("readers", "text-kv")


@dataclass
class UCE(Eraser):
    name: ClassVar[str] = "uce"
    paper: ClassVar[str] = "Gandikota et al., Unified Concept Editing in Diffusion Models, WACV 2024 (arXiv 2308.14761)"

    zero_strength: ClassVar[dict] = {"erase_scale": 0.0}

    lamb: float = option(0.5, low=0.0, help="λ: weight of keeping W near W_old")
    erase_scale: float = option(1.0, low=0.0, help="s_e: weight of the erase rows")
    preserve_scale: float = option(1.0, low=0.0, help="s_p: weight of the preserve rows")
    tokens: str = option("to_end", help="'to_end' (2023 code) or 'last' (2025 code)")
    padding: str = option("same_position", help="padding rows' guide rows: 'same_position' or 'shifted' (2023)")
    expand_prompts: bool = option(True, help="the word in template prompts too (2025 code's --expand_prompts)")
    also_erase: tuple[str, ...] = option((), help="extra words erased like the keywords (e.g. known synonyms)")
    layers: str = option("readers", help="'readers': the layers that read the encoder outputs; 'text-kv': the "
                                         "text K/V (SD3/FLUX: fitted on recorded text-stream inputs)")
    probes: int = option(2, low=1, help="(x_t, t) draws the text-kv fit records the text stream at (SD3/FLUX)")
    seed: int = option(0, help="seed of the text-kv probes' noise")

    def __post_init__(self):
        super().__post_init__()
        if self.layers not in LAYERS:
            raise SafediffError(f"unknown layers '{self.layers}'; accepted: {', '.join(LAYERS)}")

    def touches(self, name: str) -> bool:
        return has_role(name, "text_reader" if self.layers == "readers" else "text_kv")

    def layer_spaces(self, model) -> dict[str, dict[str, torch.nn.Linear]]:
        """The edited projections per space their input lives in (closed form over encoder outputs)."""
        return reader_projections(model) if self.layers == "readers" else {"tokens": kv_projections(model)}

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        if self.layers == "text-kv" and not model.adapter.text_stream_is_encoder_output():
            from safediff.erasers.text_stream import fit_text_stream

            return fit_text_stream(self, model, concepts, preserve, guide, progress)
        rows = build_rows(model, concepts, guide, preserve, self.tokens, self.expand_prompts, self.also_erase,
                          self.padding)
        new, distances = {}, {}
        for space, layers in self.layer_spaces(model).items():
            r = rows.space(space)
            t = uce_transform(r.erase, r.guide, r.preserve, self.lamb, self.erase_scale, self.preserve_scale)
            new.update(transformed({name: m.weight.detach() for name, m in layers.items()}, t))
            key = "transform_distance_from_identity" + ("" if space == "tokens" else f"_{space}")
            distances[key] = float(torch.linalg.matrix_norm(t - torch.eye(len(t), dtype=t.dtype)))
        return new, {**rows.info, "matrices": len(new), **distances}
