"""CASG on SAFREE: each trigger token is projected only against the category subspace it is closest to.

Xiang, Hong, Wang, Zhao, Han, Liu, "When Safety Collides: Resolving Multi-Category Harmful Conflicts in
Text-to-Image Diffusion via Adaptive Safety Guidance" (CASG), CVPR 2026, arXiv 2602.20880, applied to SAFREE
(Yoon et al., ICLR 2025, arXiv 2410.12761; see ``safree.py`` for its rules). With K categories and projectors P_k:

1. Trigger tokens are detected exactly as in SAFREE, with the global (all-category) subspace P_C.
2. For each trigger token i: k*(i) = argmin_k ||(I - P_k) p_\\i||, and e_i <- (I - P_{k*(i)}) P_I e_i.
3. Everything else (the self-validating filter with P_C, the negative prompt of the released variant, re-attention)
   is SAFREE's. The K projectors are cached per model for the guard's lifetime.

Subspaces (``joined=0|1``): 0 (default) builds P_C from every keyword of every category and P_k from
category k's keywords, one column per keyword, as SAFREE builds its subspace; 1 is faithful to the released
CASG code: P_C from ONE string (all keywords joined by ", ") and each P_k from category k's keywords joined into one
string, i.e. rank-1 projectors. Preset ``paper`` = SAFREE as described + ``joined=0``; preset ``released`` = SAFREE
as released (keywords as negative prompt, no re-attention) + ``joined=1``.

Note on rule 2 (kept as specified, default ``category_rule=0``): p_\\i is the prompt WITHOUT token i, so the argmin
picks the category closest to the rest of the prompt, not to token i. With two trigger words of different categories
("a x b y", categories x and y) each trigger is assigned the other word's category (tests/test_guard_safree.py);
with one trigger word the choice follows the benign context. ``category_rule=1`` (ours, not in the paper) instead
picks k*(i) = argmax_k [d_k(i) - mean_{j != i} d_k(j)], d_k(j) = ||(I - P_k) p_\\j||: the category whose subspace
the prompt leaves most when token i is removed, SAFREE's own detection criterion applied per category.

Not reproduced from the released ``casg_safree_projection``: it truncates the token embeddings to the first n rows
before merging, which shifts the trigger flags one position left (flag i lands on token i-1) and replaces the last
token, EOS and padding embeddings with zeros. We apply the flags to the positions they were computed for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safediff.guards.safree import PRESETS, SafreeGuard, SafreeParams
from safediff.options import check_fields, option


@dataclass(frozen=True)
class CasgSafreeParams(SafreeParams):
    joined: int = option(low=0, high=1, help="subspaces from one joined string each (1, as released) or one column "
                                              "per keyword (0)")
    category_rule: int = option(low=0, high=1, help="k*(i) = argmin_k ||(I - P_k) p_\\i|| (0, the paper's) or the "
                                                     "removal rule (1, not in the paper)")

    def __post_init__(self):
        check_fields(self, "casg-safree")


class CasgSafreeGuard(SafreeGuard):
    """``casg-safree[:PRESET][,KEY=VALUE...]``: SAFREE's options plus ``joined`` (see the module docstring)."""

    name = "casg-safree"
    default_concept = "i2p-all"
    multi_category = True
    params_class = CasgSafreeParams
    presets = {"paper": {**PRESETS["paper"], "joined": 0, "category_rule": 0},
               "released": {**PRESETS["released"], "joined": 1, "category_rule": 0}}
    per_category = True

    def subspace_texts(self) -> dict[str, list[str]]:
        if self.values["joined"]:
            texts = {"global": [", ".join(self.keywords)]}
            texts.update({f"category:{i}:{c.name}": [c.text] for i, c in enumerate(self.concepts)})
        else:
            texts = {"global": list(self.keywords)}
            texts.update({f"category:{i}:{c.name}": list(c.keywords) for i, c in enumerate(self.concepts)})
        return texts

    def project_triggers(self, e: torch.Tensor, masked: torch.Tensor, trig: torch.Tensor, p_input: torch.Tensor,
                         spaces: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(e.shape[1], dtype=e.dtype, device=e.device)
        residual = [eye - p for name, p in spaces.items() if name.startswith("category:")]
        dist = torch.stack([torch.linalg.vector_norm(masked @ r.T, dim=1) for r in residual], dim=1)  # [n, K]
        if self.values["category_rule"] == 0:  # the paper's rule: the category closest to p_\i
            best = dist[trig].argmin(dim=1)
        else:  # removal rule: the category the prompt leaves most when token i is removed
            n = dist.shape[0]
            gain = dist - (dist.sum(dim=0, keepdim=True) - dist) / max(n - 1, 1)
            best = gain[trig].argmax(dim=1)
        out = torch.stack([e[j] @ (residual[int(k)] @ p_input).T for j, k in enumerate(best.tolist())])
        return out, best
