"""Concept Inversion (CCE): the placeholder path is exact, training lowers the denoising loss, budgets, determinism,
guarded targets, the saved embedding file."""

import pytest
import torch
from safetensors.torch import load_file

from float_bounds import assert_close
from attack_recipe_helpers import ROW, never_flags, red_target
from safediff.attacks.budget import Budget
from safediff.attacks.concept_inversion import (ConceptInversion, placeholder_conditioning, placeholder_template,
                                                template_tokens)
from safediff.errors import SafediffError


def test_placeholder_template():
    assert placeholder_template("a red circle", ["red", "crimson"]) == "a {} circle"
    assert placeholder_template("A Crimson disc", ["red", "crimson"]) == "A {} disc"
    assert placeholder_template("a bored cat", ["red"]) == "a bored cat, {}"  # whole words only
    with pytest.raises(SafediffError):
        template_tokens(None, "no slot here", 5)


def test_placeholder_embedding_path_equals_the_text_encoder_on_ids(tiny_sd):
    a = tiny_sd.adapter
    tok, te = a.tokenizers[0], a.text_encoders[0]
    slot = tok("q", add_special_tokens=False).input_ids[0]
    ids, pos = template_tokens(tok, "a {} circle", slot)
    full = torch.full((1, 77), tok.pad_token_id)
    full[0, 0], full[0, 1:len(ids) + 1], full[0, len(ids) + 1] = tok.bos_token_id, torch.tensor(ids), tok.eos_token_id
    with torch.no_grad():
        mine = placeholder_conditioning(a, ["a {} circle"], [slot], [a.token_embedding(0).weight[slot]])
        ref = te(full)[0]
        moved = placeholder_conditioning(a, ["a {} circle"], [slot], [a.token_embedding(0).weight[slot] + 1.0])
    assert ids[pos] == slot
    assert_close(mine.embeds, ref, 1e-6)  # same shapes and kernels both ways: 0 measured
    assert not torch.allclose(moved.embeds, ref)  # the vector, not the id, is what the encoder reads


def test_training_lowers_the_denoising_loss_within_budget(tiny_sd):
    target = red_target(tiny_sd)
    r = ConceptInversion(lr=0.05).run(target, ROW, never_flags(), Budget(iterations=25), seed=0)
    assert r.extra["probe_after"] < r.extra["probe_before"]
    assert r.compute["iterations"] == r.compute["unet_backward"] == 25
    # 25 training steps + 2 probes + the judged generation; target images are setup, recorded apart
    assert r.compute["unet_forward"] == 25 + 2 + target.steps
    assert r.extra["setup_compute"]["target_images"]["unet_forward"] == target.steps
    assert r.adversarial_prompt == "a <concept> circle" and r.embedding.shape == (32,)


def test_budget_is_respected_exactly(tiny_sd):
    r = ConceptInversion().run(red_target(tiny_sd), ROW, never_flags(), Budget(unet_forward=12), seed=0)
    assert r.compute["unet_forward"] == 12 and r.image is not None  # 7 steps + 2 probes + 3 judging calls


def test_same_seed_same_embedding(tiny_sd):
    runs = [ConceptInversion().run(red_target(tiny_sd), ROW, never_flags(), Budget(iterations=3), seed=s)
            for s in (4, 4, 5)]
    assert torch.equal(runs[0].embedding, runs[1].embedding)
    assert not torch.equal(runs[0].embedding, runs[2].embedding)


def test_guarded_sdxl_target(tiny_sdxl):
    from safediff.guards.negative_prompt import NegativePromptGuard
    from safediff.concepts import resolve

    target = red_target(tiny_sdxl, guard=NegativePromptGuard(resolve("red")))
    r = ConceptInversion(lr=0.05).run(target, ROW, never_flags(), Budget(iterations=4), seed=0)
    dims = [tiny_sdxl.adapter.token_embedding(k).weight.shape[1] for k in range(2)]
    assert r.embedding.shape == (sum(dims),) and r.extra["embedding_dims"] == dims and r.image is not None


def test_runner_writes_a_textual_inversion_file_diffusers_loads(tmp_path, tiny_sd):
    from safediff.attacks.runner import run_attack

    attack = ConceptInversion(lr=0.05, n_images=1, batch=1)
    run_attack(red_target(tiny_sd), attack, never_flags(), [ROW], Budget(iterations=3), 0, tmp_path / "run",
               progress=False)
    path = tmp_path / "run" / "prompts" / "000000_embedding.safetensors"
    learned = load_file(path)
    assert list(learned) == ["<concept>"] and learned["<concept>"].shape == (1, tiny_sd.adapter.text_dim)
    slot = tiny_sd.adapter.tokenizers[0]("q", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        ours = placeholder_conditioning(tiny_sd.adapter, ["a {} circle"], [slot], [learned["<concept>"][0]])
    tiny_sd.pipe.load_textual_inversion(str(path))  # diffusers' own loader: a new token with that vector
    with torch.no_grad():
        theirs = tiny_sd.adapter.encode(["a <concept> circle"])
    assert_close(ours.embeds, theirs.embeds, 1e-5)  # 0 measured


def test_sdxl_embedding_file_has_one_vector_per_encoder(tiny_sdxl):
    dims = [tiny_sdxl.adapter.token_embedding(k).weight.shape[1] for k in range(2)]
    v = [torch.randn(d) for d in dims]
    xl = ConceptInversion().embedding_tensors(torch.cat(v), tiny_sdxl.adapter)
    assert set(xl) == {"clip_l", "clip_g"} and torch.equal(xl["clip_l"][0], v[0]) and torch.equal(xl["clip_g"][0], v[1])
