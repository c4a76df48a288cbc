"""Guards on SD3 / FLUX: SAFREE's token projection runs in every segment of the conditioning (SD3: CLIP and T5) with
that segment's own subspaces, and refuses latent re-attention (no UNet skip features); SLD's combine is unchanged."""

import torch

from float_bounds import assert_close
from safediff.concepts import Concept
from safediff.guards.safree import SafreeGuard, first_token, masked_pooled, projector


@torch.no_grad()  # as the guard computes: T5's kernels differ with gradients on, and P_I amplifies rounding
def test_safree_projects_trigger_tokens_in_every_segment(tiny_sd3):
    a = tiny_sd3.adapter
    guard = SafreeGuard([Concept("red", ("red", "crimson"))], alpha=0.0, lra=0)
    prompts = ["a photo of a red circle", "the blue square"]
    cond = a.encode(prompts)
    res = guard.filter(tiny_sd3, prompts, cond)
    untouched = ~res.triggers
    assert torch.equal(res.filtered.embeds[untouched], cond.embeds[untouched])
    assert torch.equal(res.filtered.pooled, cond.pooled)  # the separate pooled vector is left as it is
    for segment in a.segments:
        spaces = guard.subspaces(tiny_sd3, segment)
        eye = torch.eye(a.text_dim, dtype=torch.float64)
        eos = a.eos_positions(prompts, segment)
        masked = masked_pooled(a, prompts, eos, 0, segment)
        for b in range(len(prompts)):
            inside = res.triggers[b, segment.start:segment.start + segment.length]
            flagged = torch.nonzero(inside).flatten() + segment.start
            assert len(flagged) > 0  # with α = 0 some token of every segment is at or above the others' mean
            assert flagged.min() >= first_token(a, segment) and flagged.max() < eos[b]  # real tokens only
            p_input = projector(masked[b].double().T)
            for pos in flagged.tolist():
                want = (eye - spaces["global"]) @ p_input @ cond.embeds[b, pos].double()
                assert_close(res.filtered.embeds[b, pos], want, 1e-5, relative=True)
    assert len(res.distances[0]) == sum(int(e) - first_token(a, s)
                                        for s in a.segments for e in a.eos_positions(prompts[:1], s))
