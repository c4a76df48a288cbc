"""UCE on an MM-DiT's context key/value projections, fitted on the inputs they read (``UCE(layers="text-kv")``).

Why a fit on recorded inputs. In SD3/FLUX the context K/V of joint block b (``attn.add_k_proj``/``add_v_proj``) read
``norm1_context(h_b, temb)``: the text stream after b blocks, normalised and modulated by the timestep and pooled
text, having attended to the image in every earlier block. These inputs depend on (prompt, x_t, t) and on the weights
of the earlier blocks, so UCE's closed form over text-encoder outputs would solve for rows the layer never sees.

What is fitted. A few probes (x_t, t): x_t from the model's own unconditional sampling (empty prompt, no guidance,
from seeded noise) stopped at evenly spread steps of its default schedule, t that step's timestep. Block by block, in
order, with the blocks before b already holding their new weights:

    C_b: block b's inputs at the erase rows of the erase prompts (edited model so far)
    G_b: block b's inputs at the paired rows of the guide prompts (original model)
    P_b: block b's inputs at every row of the preserved prompts (edited model so far), Q_b the same rows (original)
    W_b = W_b,old T_b,  T_b = (λ I + s_e G_bᵀ C_b + s_p Q_bᵀ P_b)(λ I + s_e C_bᵀ C_b + s_p P_bᵀ P_b)⁻¹

i.e. UCE's objective with targets from the original model, ``s_e Σ ‖W c − W_old g‖² + s_p Σ ‖W p − W_old q‖² + λ
‖W − W_old‖²``, solved exactly for the inputs the layer reads once the earlier blocks are edited (K and V of a block
read the same input and share T_b). Guarantee (tested): on the probes, each edited projection satisfies the normal
equations of that objective; on other (x_t, t) it is a least-squares fit, not exact. Rows are UCE's
(``erasers.prompts``: the text stream keeps the encoder's positions). Cost: two forward passes of the prompts per
block and probe (each stopped at the block), no gradient. FLUX's single-stream blocks are not edited (their
projections read text and image tokens alike).
"""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from safediff.adapters import Conditioning
from safediff.erasers.base import weights_set_to
from safediff.erasers.closed_form import uce_transform
from safediff.erasers.prompts import plan_rows
from safediff.sampling import Trajectories, denoiser_output

CHUNK = 16  # prompts per denoiser call while recording


class _Recorded(Exception):
    """Raised by the recording hook once it has the input: the rest of the forward is not needed."""


def probes(model, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (x_t [1, C, h, w], t) pairs: unconditional sampling from seeded noise, stopped at evenly spread steps."""
    traj = Trajectories(model)
    empty = model.adapter.encode([""])
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    out = []
    for k in range(n):
        i = math.floor(k * traj.steps / n)
        x = traj.run(empty, empty, 1.0, traj.noise(1, g), n_steps=i)
        out.append((x, traj.scheduler.timesteps[i]))
    return out


@torch.no_grad()
def block_inputs(model, layer: torch.nn.Module, cond: Conditioning, points) -> torch.Tensor:
    """[P × B, L, d]: what ``layer`` reads for every probe (outer) and prompt of ``cond`` (inner), float64."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0].detach().double().cpu())
        raise _Recorded

    handle = layer.register_forward_pre_hook(hook)
    try:
        for x, t in points:
            for s in range(0, len(cond), CHUNK):
                part = cond[s:s + CHUNK]
                with contextlib.suppress(_Recorded):
                    denoiser_output(model, x.expand(len(part), -1, -1, -1), t, part)
    finally:
        handle.remove()
    return torch.cat(seen)


def joint_blocks(model) -> list[tuple[tuple[str, torch.nn.Linear], tuple[str, torch.nn.Linear]]]:
    """(K, V) context projections of each joint block, in block order, with their edit-parameter names."""
    prefix = model.adapter.denoiser_component
    layers = dict(model.adapter.text_kv())
    keys = [n for n in layers if n.endswith("add_k_proj")]
    return [((f"{prefix}.{k}.weight", layers[k]), (f"{prefix}.{k[:-len('add_k_proj')]}add_v_proj.weight",
                                                    layers[k[:-len("add_k_proj")] + "add_v_proj"])) for k in keys]


def fit_text_stream(uce, model, concepts, preserve, guide, progress) -> tuple[dict[str, torch.Tensor], dict]:
    """The edit of every joint block's context K/V (see the module docstring) and an info dict."""
    plan = plan_rows(model, concepts, guide, preserve, uce.tokens, uce.expand_prompts, uce.also_erase, uce.padding)
    adapter = model.adapter
    with torch.no_grad():
        erase = adapter.encode([p for p, _ in plan.pairs])
        guides = adapter.encode([g for _, g in plan.pairs])
        kept = adapter.encode(plan.kept)
        points = probes(model, uce.probes, uce.seed)
    pairs = len(plan.pairs)
    new: dict[str, torch.Tensor] = {}
    distances = []
    for (k_name, k_layer), (v_name, v_layer) in tqdm(joint_blocks(model), desc="uce text-kv", disable=not progress,
                                                      leave=False):
        with weights_set_to(model, new):
            now = block_inputs(model, k_layer, Conditioning.cat([erase, kept]), points)
        before = block_inputs(model, k_layer, Conditioning.cat([guides, kept]), points)
        c_rows, g_rows, p_rows, q_rows = [], [], [], []
        for p in range(len(points)):
            base = p * (pairs + len(plan.kept))
            for k, rows in enumerate(plan.positions):
                i, j = zip(*rows)
                c_rows.append(now[base + k, list(i)])
                g_rows.append(before[base + k, list(j)])
            p_rows.append(now[base + pairs:base + pairs + len(plan.kept)].flatten(0, 1))
            q_rows.append(before[base + pairs:base + pairs + len(plan.kept)].flatten(0, 1))
        t = uce_transform(torch.cat(c_rows), torch.cat(g_rows), torch.cat(p_rows), uce.lamb, uce.erase_scale,
                          uce.preserve_scale, preserve_target=torch.cat(q_rows))
        for name, layer in ((k_name, k_layer), (v_name, v_layer)):
            new[name] = (layer.weight.detach().double() @ t.to(layer.weight.device)).to(layer.weight.dtype)
        distances.append(float(torch.linalg.matrix_norm(t - torch.eye(len(t), dtype=t.dtype))))
    info = {**plan.info, "layers": "text-kv", "probe_timesteps": [float(t) for _, t in points],
            "blocks": len(distances), "matrices": len(new), "transform_distance_from_identity": distances}
    return new, info
