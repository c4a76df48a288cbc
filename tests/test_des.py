"""DES: the step's loss is the reference's formula recomputed from the frozen encoder's embeddings, the target is the
least similar safe embedding minus σ d̂, only the text encoder changes and the safe prompts keep their embeddings
better than the unsafe ones, resume, bad input."""

import pytest
import torch
import torch.nn.functional as F

from safediff.concepts import resolve
from safediff.erasers.des import DES, DESRun, farthest
from safediff.errors import SafediffError

RED = resolve("red")


def test_farthest_is_the_least_cosine_similar_row():
    codebook = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.1]]])
    queries = torch.tensor([[[2.0, 0.0]], [[0.0, -3.0]]])
    assert farthest(queries, codebook).tolist() == [2, 1]


def test_step_loss_is_the_reference_formula(tiny_sd):
    eraser = DES(batch=4, concept_scale=0.5)
    run = DESRun(eraser, tiny_sd, RED, None, None)
    loss, _ = run.step(0, per_epoch=1)
    enc = lambda prompts: tiny_sd.adapter.encode(prompts).embeds.flatten(1)  # noqa: E731
    with torch.no_grad():
        safe_all, unsafe_all = enc(run.safe), enc(run.unsafe)
        d = F.normalize(enc(["red"]), dim=-1)
        sigma = 0.5 * safe_all.norm(dim=-1).mean()
        idx = run.pair_indices(0, 1)
        u = [i % len(run.unsafe) for i in idx]
        s = [i % len(run.safe) for i in idx]
        sims = F.normalize(unsafe_all[u], dim=-1) @ F.normalize(safe_all, dim=-1).T
        target = safe_all[sims.argmin(dim=1)] - sigma * d
        cos = lambda a, b: (1 - F.cosine_similarity(a, b, dim=-1)).mean()  # noqa: E731
        safe = cos(safe_all[s], safe_all[s]) + cos(safe_all[s] + sigma * d, safe_all[s])
        unsafe = cos(unsafe_all[u], target) + cos(enc(["red"]), enc([""]))
        expected = 0.5 * safe + 0.5 * unsafe
    assert abs(run.sigma - float(sigma)) < 1e-4 * float(sigma)
    assert torch.allclose(loss.detach(), expected, atol=1e-6)


def test_fit_moves_unsafe_embeddings_more_than_safe_ones(tiny_sd):
    with torch.no_grad():
        before = {k: tiny_sd.adapter.encode(p).embeds.clone() for k, p in
                  (("unsafe", ["a red circle", "a red square"]), ("safe", ["a blue circle", "a green square"]))}
    edit = DES(epochs=2, lr=3e-3, batch=16).fit(tiny_sd, RED, progress=False)
    assert edit.tensors and all(n.startswith("text_encoder.") for n in edit.tensors)
    edit.apply(tiny_sd)
    with torch.no_grad():
        moved = {k: float((1 - F.cosine_similarity(tiny_sd.adapter.encode(p).embeds.flatten(1),
                                                       before[k].flatten(1))).mean())
                 for k, p in (("unsafe", ["a red circle", "a red square"]), ("safe", ["a blue circle",
                                                                                      "a green square"]))}
    assert moved["unsafe"] > 2 * moved["safe"]


def test_resume_is_bit_identical(tiny_sd, tmp_path, monkeypatch):
    kwargs = dict(epochs=1, lr=1e-3, batch=64, seed=2)
    straight = DES(**kwargs).fit(tiny_sd, RED, progress=False)
    step, calls = DESRun.step, {"n": 0}

    def interrupted(self, iteration, per_epoch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(self, iteration, per_epoch)

    ckpt = tmp_path / "des.safetensors"
    monkeypatch.setattr(DESRun, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        DES(**kwargs, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, RED, progress=False)
    monkeypatch.setattr(DESRun, "step", step)
    resumed = DES(**kwargs, checkpoint=str(ckpt), checkpoint_every=2).fit(tiny_sd, RED, progress=False)
    assert resumed.metadata["info"]["resumed_at_iteration"] == 2
    assert resumed.digest == straight.digest


@pytest.mark.parametrize("options,message", [({"module": "kv"}, "trains a text encoder"),
                                             ({"module": "encoder"}, "unknown module 'encoder'"),
                                             ({"batch": 0}, r"batch must be in \[1, 65536\]"),
                                             ({"safe_weight": 1.5}, r"safe_weight must be in \[0, 1\]")])
def test_bad_input_is_one_line(options, message):
    with pytest.raises(SafediffError, match=message) as err:
        DES(**options)
    assert "\n" not in str(err.value)
