"""UCE: Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzyńska, Bau; WACV 2024, arXiv 2308.14761).

Update rule (paper Eq. 7, with the reference code's λ term and scales), for every cross-attention key/value
projection ``W`` that reads text (``attn2.to_k``/``to_v``; SDXL: both encoders' embeddings concatenated):

    W = (λ W_old + s_e Σ_{i∈E} v_i* c_iᵀ + s_p Σ_{j∈P} W_old c_j c_jᵀ) (λ I + s_e Σ_{i∈E} c_i c_iᵀ + s_p Σ_{j∈P} c_j c_jᵀ)⁻¹

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

from safediff.concepts import Concept
from safediff.erasers.base import Eraser
from safediff.erasers.closed_form import kv_projections, transformed, uce_transform
from safediff.erasers.prompts import build_rows
from safediff.options import option


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

    def touches(self, name: str) -> bool:
        component, _, rest = name.partition(".")
        return component == "unet" and (".attn2.to_k." in rest or ".attn2.to_v." in rest)

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        rows = build_rows(model, concepts, guide, preserve, self.tokens, self.expand_prompts, self.also_erase,
                          self.padding)
        t = uce_transform(rows.erase, rows.guide, rows.preserve, self.lamb, self.erase_scale, self.preserve_scale)
        weights = {name: m.weight.detach() for name, m in kv_projections(model).items()}
        return transformed(weights, t), {**rows.info, "matrices": len(weights),
                                         "transform_distance_from_identity":
                                             float(torch.linalg.matrix_norm(t - torch.eye(len(t), dtype=t.dtype)))}
