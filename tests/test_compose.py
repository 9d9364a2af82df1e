"""Compose (tokenmix.methods.compose): any mask with any label rule.

The composition must be faithful: a pair that a registered method hard-wires gives that method's
loss and target exactly (same RNG draws); every valid pair trains one step on the CPU preset with a
finite loss and targets that sum to one; invalid pairs fail at construction or preparation with the
reason."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmix import methods
from tokenmix.methods import Compose, MixStep, forward_outputs
from tokenmix.methods.compose import LABELS, MASKS, PAPER_ABLATIONS
from tokenmix.methods.teacher_maps import TeacherMaps
from tokenmix.methods.tokenmix import teacher_masses
from tokenmix.models import create_model, create_tiny_model

K = 10
B = 6


def fake_teacher(num_images=16, k=3, h=7):
    rng = np.random.default_rng(0)
    return TeacherMaps(values=rng.standard_normal((num_images, k, h, h)).astype(np.float16),
                       classes=rng.integers(0, K, (num_images, k, h, h)).astype(np.int16), meta={"dataset": "fake"})


def meta(b=B):
    return {"index": torch.arange(b), "box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * b),
            "flip": torch.zeros(b, dtype=torch.bool)}


def fresh_vit():
    torch.manual_seed(0)
    return create_model("vit_cpu", num_classes=K, img_size=28, in_chans=1)


def run(method, seed=5, b=B):
    """One step of ``method`` on a fresh vit_cpu with fixed data and seed -> (loss, target, mixed)."""
    model = fresh_vit()
    if getattr(method, "needs").teacher_maps:
        method.maps = fake_teacher()
    step = MixStep(model, method)
    torch.manual_seed(123)
    x, y = torch.randn(b, 1, 28, 28), torch.randint(0, K, (b,))
    torch.manual_seed(seed)
    out = step(x, y, meta(b))
    target = method.label(out.outputs, out.mixed)[0]
    return out.loss, target, out.mixed


@pytest.mark.parametrize("registered, kw, mask, label, mask_kw", [
    ("transmix", {}, "mixup_cutmix", "transmix", {}),
    ("transmix", {"variant": "paper"}, "mixup_cutmix", "transmix", {}),
    ("tl_align", {"variant": "paper"}, "mixup_cutmix", "tl_align", {"cutmix_snap": "token"}),
    ("tl_align", {}, "cutmix_token", "tl_align", {}),
    ("tokenmix", {}, "tokenmix_block", "teacher", {"switch_prob": 0.5}),
    ("tokenmix", {"variant": "paper", "mask": "random"}, "tokenmix_random", "teacher", {"switch_prob": 0.5}),
    ("mixpro", {}, "maskmix", "pal", {}),
    ("smmix", {}, "smmix", "area", {"switch_prob": 0.5}),
    ("cutmix", {}, "cutmix", "area", {}),
])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_composition_reproduces_the_registered_methods(registered, kw, mask, label, mask_kw, seed):
    variant = kw.get("variant", methods.parameters(registered)["variant"])  # the default (MixPro: paper)
    ref = methods.get(registered, num_classes=K, **kw)
    comp = methods.get("compose", num_classes=K, variant=variant, mask=mask, label=label, mask_kwargs=mask_kw)
    loss_r, target_r, mixed_r = run(ref, seed)
    loss_c, target_c, mixed_c = run(comp, seed)
    assert mixed_c.kind == mixed_r.kind
    torch.testing.assert_close(mixed_c.x, mixed_r.x)
    torch.testing.assert_close(target_c, target_r)
    torch.testing.assert_close(loss_c, loss_r)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("label", list(LABELS))
def test_every_pair_trains_on_the_cpu_preset(mask, label):
    """The test matrix: one step, finite loss, gradients, targets that sum to one (``paper``
    variants: soft-target CE everywhere), and an odd batch."""
    comp = methods.get("compose", num_classes=K, variant="paper", mask=mask, label=label)
    for b in (B, 5):
        loss, target, mixed = run(comp, seed=0, b=b)
        assert torch.isfinite(loss), (mask, label)
        assert target.shape == (b, K) and bool((target >= -1e-7).all())
        torch.testing.assert_close(target.sum(1), torch.ones(b), atol=1e-5, rtol=0)
        if mask != "mixup":
            assert mixed.kind not in ("none", "mixup")
    official = methods.get("compose", num_classes=K, mask=mask, label=label)
    loss, _, _ = run(official, seed=1)
    assert torch.isfinite(loss)
    loss.backward()


def test_teacher_reads_moved_windows_where_they_came_from():
    """SMMix moves the partner's window: the teacher mass of the partner is read at the source."""
    own_maps = torch.zeros(2, 4)
    own_maps[0] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    own_maps[1] = torch.tensor([0.1, 0.1, 0.1, 0.7])
    dst = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]])  # pasted on token 0 (sample 0), token 3 (sample 1)
    src = torch.tensor([[0, 0, 0, 1.0], [1.0, 0, 0, 0]])  # taken from the partner's token 3 / token 0
    idx = torch.tensor([1, 0])
    y_own, y_par = teacher_masses(own_maps, dst, idx, src)
    torch.testing.assert_close(y_own, torch.tensor([0.3, 0.3]))
    torch.testing.assert_close(y_par, torch.tensor([0.7, 0.7]))  # partner 1's token 3; partner 0's token 0
    y_same = teacher_masses(own_maps, dst, idx)[1]  # read at the destination instead
    torch.testing.assert_close(y_same, torch.tensor([0.1, 0.1]))


def test_invalid_pairs_fail_with_the_reason():
    with pytest.raises(ValueError, match=r"unknown mask 'box'.*valid: mixup, cutmix"):
        methods.get("compose", num_classes=K, mask="box")
    with pytest.raises(ValueError, match=r"unknown label 'attention'.*valid: area, transmix"):
        methods.get("compose", num_classes=K, label="attention")
    with pytest.raises(ValueError, match="mask_kwargs may not set labels"):
        methods.get("compose", num_classes=K, mask="tokenmix_block", mask_kwargs={"labels": "teacher"})
    with pytest.raises(ValueError, match="no parameter"):
        methods.get("compose", num_classes=K, mask="cutmix", mask_kwargs={"mask_patch": 8})
    comp = methods.get("compose", num_classes=K, mask="smmix", label="transmix")
    with pytest.raises(ValueError, match="last stage's grid"):
        comp.prepare_model(create_tiny_model("swin", K, 32, 3))
    comp = methods.get("compose", num_classes=K, mask="maskmix", label="pal", mask_kwargs={"mask_patch": 6})
    with pytest.raises(ValueError, match="mask_patch 6 px is not a multiple"):
        comp.prepare_model(fresh_vit())
    comp = methods.get("compose", num_classes=K, mask="cutmix", label="transmix")
    with pytest.raises(ValueError, match="cannot read a token grid"):
        comp.prepare_model(create_model("cnn_small", num_classes=K, img_size=28, in_chans=1))


@pytest.mark.parametrize("fam", ["deit", "cait", "swin", "pvt_v2", "cct"])
@pytest.mark.parametrize("label", ["transmix", "tl_align", "pal"])
def test_attention_rules_on_maskmix_across_backbones(fam, label):
    torch.manual_seed(0)
    model = create_tiny_model(fam, K, 32, 3)
    step = MixStep(model, "compose", mask="maskmix", label=label)
    out = step(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_paper_ablations_are_valid_pairs_and_idempotent_preparation():
    for name, (mask, label) in PAPER_ABLATIONS.items():
        assert mask in MASKS and label in LABELS, name
        comp = methods.get("compose", num_classes=K, mask=mask, label=label)  # every row builds and prepares
        comp.prepare_model(fresh_vit())
    comp = methods.get("compose", num_classes=K, mask="smmix", label="tl_align")
    model = fresh_vit()
    n = sum(1 for _ in model.parameters())
    comp.prepare_model(model)
    comp.prepare_model(model)
    assert sum(1 for _ in model.parameters()) == n + 2  # SMMix's token head, once
    comp.release_model(model)
    assert sum(1 for _ in model.parameters()) == n
    assert isinstance(comp, Compose) and "smmix mask; tl_align label" == comp.describe()
    out = forward_outputs(model, comp.needs, torch.randn(2, 1, 28, 28))
    assert out.tokens is not None and (out.qk or out.attention)  # both halves' captures


def test_the_data_context_reaches_the_teacher_rule():
    """RunConfig fills dataset / img_size / data_dir; the teacher rule looks its cache up with them."""
    from tokenmix import RunConfig

    cfg = RunConfig(method="compose", dataset="cifar100", img_size=32, data_dir="/somewhere",
                    method_kwargs={"mask": "tokenmix_block", "label": "teacher"})
    m = methods.get("compose", **cfg.method_params(100))
    assert (m.labeller.dataset, m.labeller.img_size, m.labeller.data_dir) == ("cifar100", 32, "/somewhere")
    assert m.masker.dataset == "cifar100"  # the mask half (TokenMix) takes them too


def test_each_half_can_have_its_own_variant_and_rules_cannot_be_unmade():
    comp = methods.get("compose", num_classes=K, mask="maskmix", label="transmix",
                       mask_kwargs={"variant": "paper"}, label_kwargs={"variant": "official"})
    assert (comp.masker.variant, comp.labeller.variant) == ("paper", "official")
    with pytest.raises(ValueError, match="label_kwargs may not change pal"):
        methods.get("compose", num_classes=K, mask="maskmix", label="pal", label_kwargs={"pal": False})


def test_a_failed_preparation_leaves_nothing_on_the_model():
    """SMMix's mask attaches its token head; when the label rule then refuses the model, the head goes."""
    torch.manual_seed(0)
    model = create_tiny_model("cait", K, 32, 3)
    comp = methods.get("compose", num_classes=K, mask="smmix", label="tl_align", label_kwargs={"source": "qk"})
    with pytest.raises(ValueError, match="label rule 'tl_align' cannot run"):
        comp.prepare_model(model)
    assert "smmix_token_head" not in model._modules


def test_smmix_windows_carry_their_source_and_the_teacher_reads_it():
    """End to end: the SMMix mask records where the pasted window came from, and compose's teacher
    rule takes the partner's map mass there (by hand from the same maps)."""
    comp = methods.get("compose", num_classes=K, variant="paper", mask="smmix", label="teacher")
    comp.maps = fake_teacher()
    model = fresh_vit()
    MixStep(model, comp)
    torch.manual_seed(123)
    x, y = torch.randn(B, 1, 28, 28), torch.randint(0, K, (B,))
    torch.manual_seed(4)
    mixed = comp.mix(x, y, meta())
    e = mixed.extras
    src = e["partner_source_mask"]
    assert src.sum(1).tolist() == [e["k"] ** 2] * B and torch.equal(mixed.partner_mask.sum(1), src.sum(1))
    own = comp.maps.token_maps(meta()["index"], y, meta()["box"], meta()["flip"], 7, 7, True)
    idx = mixed.partner_index
    y_par = (own[idx] * src).sum(1)
    torch.testing.assert_close(e["y_partner"], y_par.to(e["y_partner"].dtype))
    assert not torch.equal(src, mixed.partner_mask)  # max -> min: the windows moved in this draw
    # reading at the destination would give another mass
    assert not torch.allclose(e["y_partner"], (own[idx] * mixed.partner_mask).sum(1))
