"""SMMix: window search vs brute force, ties, pasting, losses on hand cases, the extra forward."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from tokenmix import RunConfig, methods
from tokenmix.methods import ModelOutputs, TokenGrid
from tokenmix.methods.smmix import (PLACEMENTS, consistency_loss, fine_loss, paste_windows, region_mean,
                                    sample_window_side, select_window, window_mask, window_scores, window_side_range)
from tokenmix.models import create_model


def brute_scores(sal: torch.Tensor, k: int) -> torch.Tensor:
    b, r, c = sal.shape
    out = torch.zeros(b, r - k + 1, c - k + 1)
    for i in range(r - k + 1):
        for j in range(c - k + 1):
            out[:, i, j] = sal[:, i:i + k, j:j + k].sum((1, 2))
    return out


@pytest.mark.parametrize("shape, k", [((3, 7, 7), 1), ((3, 7, 7), 5), ((2, 14, 14), 3), ((2, 6, 9), 4)])
def test_window_search_equals_brute_force(shape, k):
    torch.manual_seed(k)
    sal = torch.rand(shape)
    scores = window_scores(sal, k)
    torch.testing.assert_close(scores, brute_scores(sal, k), atol=1e-5, rtol=1e-5)
    for how, pick in (("max", torch.argmax), ("min", torch.argmin)):
        pos = select_window(scores, how)
        for b in range(shape[0]):
            flat = int(pick(brute_scores(sal, k)[b]))
            assert tuple(pos[b].tolist()) == (flat // scores.shape[2], flat % scores.shape[2])


def test_ties_go_to_the_first_position_row_major():
    scores = torch.zeros(1, 3, 3)
    scores[0, 1, 2] = scores[0, 2, 0] = 5.0
    assert select_window(scores, "max").tolist() == [[1, 2]]
    assert select_window(torch.zeros(1, 3, 3), "min").tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="valid: max, min, random"):
        select_window(scores, "mean")


def test_window_side_range():
    assert window_side_range(14) == (3, 10) and window_side_range(7) == (1, 5)
    torch.manual_seed(0)
    sides = {sample_window_side(14) for _ in range(400)}
    assert sides == set(range(3, 11))
    paper = {sample_window_side(14, "paper") for _ in range(400)}
    assert min(paper) >= 3 and max(paper) <= 10


def test_pasted_pixels_come_from_the_partner_window():
    grid = TokenGrid(4, 5, 2, 3)
    torch.manual_seed(0)
    x, xp = torch.rand(2, 1, 8, 15), torch.rand(2, 1, 8, 15)
    src, dst = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[2, 0], [0, 0]])
    out = paste_windows(x, xp, src, dst, 2, grid)
    # sample 0: partner tokens rows 0-1, cols 1-2 -> own rows 2-3, cols 0-1 (pixels: 2x3 per token)
    assert torch.equal(out[0, :, 4:8, 0:6], xp[0, :, 0:4, 3:9])
    assert torch.equal(out[1, :, 0:4, 0:6], xp[1, :, 4:8, 9:15])
    m = window_mask(dst, 2, grid)  # (2, 20)
    keep = (1 - m).view(2, 1, 4, 5).repeat_interleave(2, 2).repeat_interleave(3, 3).bool()
    assert torch.equal(out[keep], x[keep])  # everything else is the own image
    assert m.sum(1).tolist() == [4.0, 4.0]


def test_region_mean_and_fine_loss_by_hand():
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])
    assert region_mean(tokens, torch.tensor([[1.0, 0.0, 1.0]])).tolist() == [[3.0, 2.0]]
    own, pasted = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    y, yp = torch.tensor([0]), torch.tensor([0])
    # CE(own, 0) = log(1 + e^-2); CE(pasted, 0) = log(1 + e^1)
    expect = 0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1)))
    assert fine_loss(own, pasted, y, yp).item() == pytest.approx(expect, rel=1e-6)


def test_fine_loss_uses_smoothed_targets():
    # K = 2, smoothing 0.1: target (0.95, 0.05); with logits (2, 0) the soft CE is
    # 0.95 log(1 + e^-2) + 0.05 log(1 + e^2) = log(1 + e^-2) + 0.05 * 2, i.e. hard CE + 0.1
    own = pasted = torch.tensor([[2.0, 0.0]])
    y = torch.tensor([0])
    hard = math.log(1 + math.exp(-2))
    assert fine_loss(own, pasted, y, y, smoothing=0.1).item() == pytest.approx(hard + 0.1, rel=1e-6)
    assert fine_loss(own, pasted, y, y, smoothing=0.0).item() == pytest.approx(hard, rel=1e-6)


def test_smmix_loss_passes_its_smoothing_to_fine_loss():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)
    terms = {}
    for s in (0.0, 0.1):
        m = methods.get("smmix", num_classes=10, smoothing=s, switch_prob=1.0, w_cls=0.0, w_con=0.0)
        net = m.prepare_model(model)
        torch.manual_seed(1)
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        mixed = m.mix(x, y)
        tokens = net.forward_features(mixed.x)
        out = ModelOutputs(logits=net.forward_head(tokens), tokens=tokens)
        regions = m.forward_extras(tokens, mixed)["smmix_region_logits"]
        terms[s] = (m.loss(out, mixed)[0].item(), fine_loss(*regions, mixed.y, mixed.y_partner, s).item())
    for s, (total, expect) in terms.items():
        assert total == pytest.approx(expect, rel=1e-6)
    assert terms[0.0][0] != pytest.approx(terms[0.1][0])


def test_consistency_loss_by_hand():
    logits, z, zp = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    lam = torch.tensor([0.75])
    # official: teacher = softmax(0.75 z + 0.25 zp) = softmax([1.5, 0.5]); student uniform
    t = torch.softmax(torch.tensor([1.5, 0.5]), 0)
    expect = float((t * (t.log() - math.log(0.5))).sum())
    assert consistency_loss(logits, z, zp, lam, "official").item() == pytest.approx(expect, rel=1e-5)
    # paper: teacher = 0.75 softmax(z) + 0.25 softmax(zp)
    t2 = 0.75 * torch.softmax(z[0], 0) + 0.25 * torch.softmax(zp[0], 0)
    expect2 = float((t2 * (t2.log() - math.log(0.5))).sum())
    assert consistency_loss(logits, z, zp, lam, "paper").item() == pytest.approx(expect2, rel=1e-5)


def _setup(variant="official", **kw):
    torch.manual_seed(0)
    model = create_model("vit_cpu", 10, 28, 1)
    method = methods.get("smmix", num_classes=10, variant=variant, switch_prob=1.0, **kw)
    return method.prepare_model(model), method


def test_extra_forward_has_no_grad_and_restores_mode_and_rng():
    model, method = _setup()
    model.train()
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    z, sal = method.clean_forward(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and not z.requires_grad and not sal.requires_grad
    assert z.dtype == torch.float32 and sal.shape == (4, 49)
    model.eval()
    method.clean_forward(x)
    assert not model.training
    # the extra forward is the eval-mode forward of the unmixed images
    torch.testing.assert_close(z, model(x))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_mix_follows_the_placement(placement):
    model, method = _setup(placement=placement)
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6)
    mixed = method.mix(x, y)
    e, k = mixed.extras, mixed.extras["k"]
    scores = window_scores(e["saliency"].view(6, 7, 7), k)
    src_how, dst_how = placement.split("->")
    if src_how == "max":
        assert torch.equal(e["src"], select_window(scores[mixed.partner_index], "max"))
    if dst_how == "same":
        assert torch.equal(e["dst"], e["src"])
    else:
        assert torch.equal(e["dst"], select_window(scores, dst_how))
    assert torch.equal(mixed.x, paste_windows(x, x[mixed.partner_index], e["src"], e["dst"], k, method.grid))
    torch.testing.assert_close(mixed.lam_area, torch.full((6,), 1 - k * k / 49))
    assert mixed.partner_mask.sum(1).tolist() == [float(k * k)] * 6


def test_loss_is_the_weighted_sum_of_the_three_terms_and_mixup_batches_use_cls_only():
    model, method = _setup(w_cls=1.0, w_fine=0.5, w_con=2.0)
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    mixed = method.mix(x, y)
    model.train()
    tokens = model.forward_features(mixed.x)
    logits = model.forward_head(tokens)
    loss, info = method.loss(ModelOutputs(logits=logits, tokens=tokens), mixed)
    assert loss.item() == pytest.approx(info["l_cls"] + 0.5 * info["l_fine"] + 2.0 * info["l_con"], rel=1e-5)
    loss.backward()
    assert model.smmix_token_head.weight.grad is not None
    method.switch_prob = 0.0
    mixed = method.mix(x, y)
    assert mixed.kind == "mixup"
    loss, info = method.loss(ModelOutputs(logits=model(mixed.x)), mixed)
    assert set(info) == {"lam"}


def test_paper_variant_uses_the_cls_row_on_cls_models():
    model, method = _setup("paper")
    from tokenmix.models import AttentionCapture
    x = torch.randn(2, 1, 28, 28)
    _, sal = method.clean_forward(x)
    model.eval()
    with AttentionCapture(model, (-1,), "cls") as cap:
        model(x)
    torch.testing.assert_close(sal, cap[-1])


def test_bad_placement_raises():
    with pytest.raises(ValueError, match="valid: max->min"):
        methods.get("smmix", num_classes=10, placement="min->max")


@pytest.mark.parametrize("model", ["vit_cpu", "deit_tiny_patch16_224"])
def test_engine_trains_smmix(tmp_path, model):
    from tokenmix.train.engine import train
    s = train(RunConfig(method="smmix", model=model, dataset="synthetic", img_size=32, train_subset=64,
                        test_subset=32, epochs=1, batch_size=16, warmup_epochs=0.0, out_dir=str(tmp_path),
                        run_id="r", progress=False, switch_prob=1.0))
    assert s["status"] == "complete"
