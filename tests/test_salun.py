"""SalUn: the mask keeps the most (or, as the released code, the least) salient share jointly over tensors, training
changes only masked weights (the saliency recomputed independently), an empty mask changes nothing, bad input."""

import pytest
import torch

from safediff.concepts import resolve
from safediff.erasers.modules import all_weights, group_parameters
from safediff.erasers.salun import SalUn, SalUnRun, saliency_mask
from safediff.erasers.training import trainable
from safediff.errors import SafediffError

RED = resolve("red")
SMALL = dict(n_forget=4, n_retain=4, batch=2, epochs=2, lr=1e-2, module="kv", seed=1)


def test_mask_keeps_the_share_with_the_largest_or_smallest_gradient_jointly():
    grads = {"a": torch.tensor([[0.1, -5.0], [0.3, 2.0]]), "b": torch.tensor([-0.2, 4.0, 0.05, 1.0])}
    top = saliency_mask(grads, 0.25, "largest")  # 2 of 8 elements: |-5| and |4|
    assert top["a"].tolist() == [[False, True], [False, False]] and top["b"].tolist() == [False, True, False, False]
    bottom = saliency_mask(grads, 0.25, "smallest")  # 0.05 and 0.1
    assert bottom["a"].tolist() == [[True, False], [False, False]] and bottom["b"].tolist() == [False, False, True,
                                                                                                 False]
    assert not any(m.any() for m in saliency_mask(grads, 0.0, "largest").values())


def test_training_changes_only_salient_weights(tiny_sd):
    eraser = SalUn(**SMALL, mask_fraction=0.3)
    params = group_parameters(tiny_sd, eraser.module)
    original = {n: p.detach().clone() for n, p in params.items()}
    with trainable(all_weights(tiny_sd), params, original), torch.enable_grad():
        mask = SalUnRun(eraser, tiny_sd, RED, None, None).mask(params)  # the same data and draws as the fit's
    edit = eraser.fit(tiny_sd, RED, progress=False)
    assert edit.tensors
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == int(0.3 * sum(m.numel() for m in mask.values()))
    for name, value in edit.tensors.items():
        changed = value != original[name]
        assert not (changed & ~mask[name]).any(), name  # nothing outside the mask moves
        assert changed.any()


def test_empty_mask_changes_nothing(tiny_sd):
    assert not SalUn(**SMALL, mask_fraction=0.0).fit(tiny_sd, RED, progress=False).tensors


def test_random_label_uses_preserved_concepts_of_the_same_category(tiny_sd):
    run = SalUnRun(SalUn(**SMALL, pseudo="random"), tiny_sd, RED, None, None)
    picked = {run._pseudo("a red circle") for _ in range(20)}
    assert picked and all(p.endswith(" circle") and "red" not in p for p in picked) and len(picked) > 1
    with pytest.raises(SafediffError, match="pseudo=random needs preserved concepts"):
        SalUnRun(SalUn(**SMALL, pseudo="random"), tiny_sd, RED, ["circle", "square"], None)


@pytest.mark.parametrize("options,message", [({"module": "text_encoder"}, "trains the denoiser"),
                                             ({"module": "attn"}, "unknown module 'attn'"),
                                             ({"salient": "top"}, "salient must be one of largest, smallest"),
                                             ({"mask_fraction": 2.0}, r"mask_fraction must be in \[0, 1\]"),
                                             ({"epochs": 0}, r"epochs must be in \[1, 10000\]")])
def test_bad_input_is_one_line(options, message):
    with pytest.raises(SafediffError, match=message) as err:
        SalUn(**options)
    assert "\n" not in str(err.value)
