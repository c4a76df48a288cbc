"""SPEED: Scalable, Precise, and Efficient Concept Erasure (Li, Wang, Hu, Jiang, Liang, Hao, Ma, Feng; ICLR 2026,
arXiv 2503.07392; reference code Ouxiang-Li/SPEED ``train_erase_null.py``). Multi-concept: every concept at once.

Closed-form null-space editing of the projections that read text. For each edited projection ``W`` (UNet models:
by default ``attn2.to_v`` only, as the reference scripts' ``--params V``), with ``C_t`` the target rows (each
concept word's last token; ``tokens=to_end``: and every later row, see below), ``C_a`` the anchor rows paired with
them (the guide's; guide "" -> BOS, exactly as UCE's pairing) and ``S_tt = mean c_t c_tᵀ``, ``S_at = mean c_a c_tᵀ``:

1. Influence-based prior filtering (IPF). ``Δ₀ = W (S_at − S_tt)(I + S_tt)⁻¹`` is the unconstrained edit; a retain
   row ``r`` (the last token of each preserved concept, never one holding an erased word) is kept only when
   ``‖Δ₀ r‖`` is above the mean over the retain rows (the priors the edit would move most).
2. Directed prior augmentation (DPA). Each kept row gets ``n_aug`` copies ``r + (zᵀv) v``, ``z ~ N(0, I)``, ``v`` the
   right singular vector of ``W`` with the smallest singular value (noise where ``W`` barely responds, so the copy
   means the same to the layer); a copy is kept when ``‖Δ₀ r'‖`` is above the mean over the copies.
3. Null space. ``P`` projects onto the eigenvectors of ``K₀K₀ᵀ = mean r rᵀ`` (kept rows and copies) with eigenvalue
   below ``threshold``.
4. Invariant equality constraints (IEC). ``K`` holds the empty prompt's BOS row and the 3 k-means centres of its
   other rows (EOS and padding): ``Δ P K = 0`` is imposed exactly (λ = 0) or softly (λ > 0).
5. The update (``closed_form.null_space_delta``):
   ``Δ = s_e W (S_at − S_tt) P (I − M K (Kᵀ P M K + λ I)⁻¹ Kᵀ P) M``, ``M = (S_tt P + α I)⁻¹``, ``W ← W + Δ``.
   ``Δ r = 0`` for every retain row in the null-space complement; ``s_e`` (not in the paper; Δ is linear in it, 1 is
   the paper's rule) is the strength knob whose 0 leaves the model unchanged.

Defaults follow the reference's few-concept script (``--params V --aug_num 10 --threshold 1e-1``, α = 1); its
multi-concept script uses ``threshold=1e-4, retain_scale=0.05, filter=False``. The reference's λ default could not be
read (the training script is not in the index we searched); λ = 0 states IEC as the paper does, an exact equality
(``pinv`` handles invariants that already lie in the retain set, for which the constraint holds by itself).
Deviations: the DPA copies are filtered against the mean over all copies of a layer (the reference: per mini-batch
of 8 rows); the k-means of IEC is Lloyd's algorithm from evenly spaced rows (the reference: random initialisation).
Retain rows come from the concepts' preserve lists (``erasers.prompts.preserve_prompts``; the empty prompt's row is
BOS, an invariant anyway) instead of the reference's per-task CSVs.

Rows (``tokens``): ``last`` (default) is the paper's and the reference's, the word's last token only. ``to_end`` (not
in the paper) takes, for targets, anchors and retain rows alike, that row and every later one (end-of-text and
padding), UCE's 2023 convention. It exists because a causal text encoder writes a word into every later row, and a
denoiser may read it there: on the UNet sandbox a colour is read from the rows after the word and not from the
word's row (``benchmarks/token_rows_probe.py``: swapping red's row for blue's leaves red at 100 %, swapping the later
rows draws blue 100 %), so no edit of the word's row can erase it.

SD3 / FLUX (MM-DiT; not in the paper, which edits SD 1.4's cross-attention). The rule is a least-squares edit over
rows the layer reads, so it is applied where the rows are the layer's inputs: ``context_embedder``, the one layer
that reads the encoders' token rows (as ``UCE(layers="readers")``); the joint blocks' context K/V read a text stream
transformed block by block (see ``erasers.uce``), so ``params`` has no meaning there and is ignored. Target, anchor
and retain rows are taken in every segment (SD3: the CLIP and the T5 tokens; FLUX: T5), the invariants are the empty
prompt's first row (SD3: CLIP's BOS; FLUX: T5 has no BOS, its EOS) and 3 k-means centres of its others. The pooled
vector's embedder (``time_text_embed.text_embedder``) is not edited: SPEED has no pooled rows; to erase through it
too, use UCE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from safediff.concepts import Concept
from safediff.errors import SafediffError
from safediff.erasers.base import Eraser
from safediff.erasers.closed_form import null_space_delta, null_space_projector, token_row_readers
from safediff.erasers.prompts import build_rows, encode_prompts, last_token_rows, preserve_prompts
from safediff.options import option

PARAMS = {"V": (".attn2.to_v.",), "K": (".attn2.to_k.",), "KV": (".attn2.to_k.", ".attn2.to_v.")}  # UNet models
DIT_READER = "context_embedder."  # MM-DiT: the layer reading the encoders' token rows
N_CLUSTERS = 3  # k-means centres of the empty prompt's EOS/padding rows (reference)
KMEANS_ITERATIONS = 20


def kmeans(rows: torch.Tensor, k: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """``k`` centres of ``rows`` [N, D] by Lloyd's algorithm from ``k`` evenly spaced rows (deterministic)."""
    centres = rows[torch.linspace(0, len(rows) - 1, k).round().long()].clone()
    for _ in range(iterations):
        label = torch.cdist(rows, centres).argmin(dim=1)
        centres = torch.stack([rows[label == j].mean(0) if (label == j).any() else centres[j] for j in range(k)])
    return centres


def above_mean(rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The rows ``r`` whose ``‖Δ r‖`` is above the mean over ``rows`` (SPEED's influence filter)."""
    norms = (rows @ delta.T).norm(dim=1)
    return rows[norms > norms.mean()]


@dataclass
class SPEED(Eraser):
    name: ClassVar[str] = "speed"
    paper: ClassVar[str] = ("Li et al., SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion Models, "
                            "ICLR 2026 (arXiv 2503.07392)")
    # closed form: 0.4 CPU-seconds for one concept on random weights of the v2 sandbox architecture
    sandbox: ClassVar[dict[str, dict]] = {"benchmark": {}, "demo": {}, "smoke": {"n_aug": 2}}
    zero_strength: ClassVar[dict] = {"erase_scale": 0.0}

    params: str = option("V", help="projections edited: V (reference scripts), K or KV")
    threshold: float = option(0.1, low=0.0, help="eigenvalue bound of the retain null space (multi-concept: 1e-4)")
    retain_scale: float = option(1.0, low=0.0, help="α (multi-concept script: 0.05)")
    lamb: float = option(0.0, low=0.0, help="λ of the invariant equality constraints; 0 = exact")
    n_aug: int = option(10, low=0, help="DPA copies per kept retain row; 0 = no augmentation")
    filter: bool = option(True, help="influence-based prior filtering (multi-concept script: off)")
    erase_scale: float = option(1.0, low=0.0, help="s_e: Δ is linear in it; 1 = the paper, 0 = no change")
    tokens: str = option("last", help="rows: 'last' (the paper: the word's last token) or 'to_end' (and every later "
                                      "row, as UCE's 2023 code)")
    expand_prompts: bool = option(False, help="also the word in the concept's contexts (reference: the word alone)")
    also_erase: tuple[str, ...] = option((), help="extra words erased like the keywords (e.g. known synonyms)")
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.params not in PARAMS:
            raise SafediffError(f"speed: params must be one of {', '.join(PARAMS)}, got {self.params!r}")
        if self.tokens not in ("last", "to_end"):
            raise SafediffError(f"speed: tokens must be 'last' or 'to_end', got {self.tokens!r}")
        if self.retain_scale == 0.0:
            raise SafediffError("speed: retain_scale (α) must be > 0 (it makes S_tt P + α I invertible)")

    def touches(self, name: str) -> bool:
        component, _, rest = name.partition(".")
        if component == "transformer":
            return rest.startswith(DIT_READER)
        return component == "unet" and any(p in rest for p in PARAMS[self.params])

    def projections(self, model) -> dict[str, torch.nn.Linear]:
        """The edited Linears by edit-parameter name: UNet ``params`` among the cross-attention K/V; MM-DiT the layer
        reading the token rows (``context_embedder``)."""
        return {name: m for name, m in token_row_readers(model).items() if self.touches(name)}

    def compute(self, model, concepts: list[Concept], preserve, guide, progress):
        rows = build_rows(model, concepts, guide, [], self.tokens, self.expand_prompts, self.also_erase)
        c_t, c_a = rows.erase, rows.guide
        s_tt, s_at = c_t.T @ c_t / len(c_t), c_a.T @ c_t / len(c_t)
        items = [p for c in concepts for p in c.preserve] if preserve is None else [p for p in preserve if p.strip()]
        kept = preserve_prompts(list(dict.fromkeys(items)), rows.info["erase_words"], self.expand_prompts)
        retain = last_token_rows(model, kept, to_end=self.tokens == "to_end")
        empty = encode_prompts(model, [""])[0]
        invariants = torch.cat([empty[:1], kmeans(empty[1:], N_CLUSTERS)]).T  # [D, 1 + 3]
        generator = torch.Generator().manual_seed(int(self.seed))
        eye = torch.eye(s_tt.shape[0], dtype=torch.float64)
        out, sizes = {}, []
        for name, module in self.projections(model).items():
            w = module.weight.detach().double().cpu()
            initial = w @ (s_at - s_tt) @ torch.linalg.inv(eye + s_tt)
            priors = above_mean(retain, initial) if self.filter else retain
            if self.n_aug:
                v = torch.linalg.svd(w, full_matrices=False).Vh[-1]  # least-sensitive input direction of W
                noise = torch.randn((self.n_aug * len(priors), len(v)), generator=generator, dtype=torch.float64)
                copies = priors.repeat(self.n_aug, 1) + (noise @ v)[:, None] * v
                priors = torch.cat([priors, above_mean(copies, initial)])
            projector = null_space_projector(priors.T @ priors / len(priors), self.threshold)
            delta = null_space_delta(w, s_tt, s_at, projector, invariants, self.retain_scale, self.lamb)
            out[name] = (w + self.erase_scale * delta).to(module.weight.dtype)
            sizes.append((len(priors), int(torch.trace(projector).round())))
        info = {**rows.info, "retain_prompts": len(kept), "invariants": invariants.shape[1], "matrices": len(out),
                "retain_rows_per_layer": [n for n, _ in sizes], "null_space_dim_per_layer": [k for _, k in sizes]}
        return out, info
