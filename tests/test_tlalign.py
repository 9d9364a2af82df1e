"""TL-Align (tokenmix.methods.tlalign) and the q/k capture it relies on (QKCapture, attention_apply,
attention_from_qk in tokenmix.models.attention).

Expected values come from hand computations, pixel-level brute force or an independent K-dim
propagation through maps captured with AttentionCapture, never from the implementation's output.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_method

from tokenmix import methods
from tokenmix.methods import forward_outputs
from tokenmix.methods.base import MixedBatch, ModelOutputs, TokenGrid, mix_targets, one_hot
from tokenmix.methods.tlalign import TLAlign, final_label, initial_own_share, propagate_kdim, propagate_scalar
from tokenmix.models import (AttentionCapture, QKCapture, attention_apply, attention_from_qk, attention_modules,
                             create_model)
from tokenmix.train.config import ConfigError, RunConfig
from tokenmix.train.engine import build_method, train
from tokenmix.train.runs import load_run

K = 10


# ---------------------------------------------------------------------------------------------
# helpers (independent of the implementation)

def make(variant: str = "official", grid: TokenGrid | None = None, **kw) -> TLAlign:
    return make_method("tl_align", TLAlign, K, variant, grid, **kw)


def hand_batch(grid: TokenGrid, partner_mask, lam_area, y, y_partner, kind: str = "cutmix",
               smoothing: float = 0.1) -> MixedBatch:
    pm = torch.as_tensor(partner_mask, dtype=torch.float32)
    b = pm.shape[0]
    lam_t = torch.as_tensor(lam_area, dtype=torch.float32).expand(b).clone()
    y, y_partner = torch.as_tensor(y), torch.as_tensor(y_partner)
    return MixedBatch(x=torch.zeros(b, 1, *grid.img_size), y=y, y_partner=y_partner,
                      partner_index=torch.arange(b - 1, -1, -1), partner_mask=pm, lam_area=lam_t,
                      target=mix_targets(y, y_partner, lam_t, K, smoothing), kind=kind)


def qk_for_attention(probs_on_1: list[float]):
    """q, k (1, 1, 2, 2) with softmax(q k^T) = [[1 - p0, p0], [1 - p1, p1]] for T = 2, scale 1:
    key 0 = 0, key 1 = e0, query i = logit(p_i) e0."""
    q = torch.zeros(1, 1, 2, 2)
    q[0, 0, :, 0] = torch.tensor([math.log(p / (1 - p)) for p in probs_on_1])
    k = torch.zeros(1, 1, 2, 2)
    k[0, 0, 1, 0] = 1.0
    return q, k, 1.0


def random_qk(b: int, h: int, t: int, d: int = 8, layers: int = 4, sharp: float = 2.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, h, t, d, generator=g) * sharp, torch.randn(b, h, t, d, generator=g) * sharp, d ** -0.5)
            for _ in range(layers)]


def reference_target(model, x, mixed: MixedBatch, label: str, smoothing: float = 0.1) -> torch.Tensor:
    """Independent K-dim TL-Align: rows from the mixed batch, every block's head-mean map captured
    with AttentionCapture (unfused path), Y <- (A Y + Y) / 2, then the row the head reads."""
    p = int(getattr(model, "num_prefix_tokens", 0))
    with torch.no_grad(), AttentionCapture(model, blocks=None, reduce="head_mean") as cap:
        model(x)
    b = mixed.partner_mask.shape[0]
    beta0 = torch.cat([mixed.lam_area.view(b, 1).expand(b, p), 1 - mixed.partner_mask], 1).unsqueeze(-1)
    y1 = one_hot(mixed.y, K, smoothing).unsqueeze(1)
    y2 = one_hot(mixed.y_partner, K, smoothing).unsqueeze(1)
    rows = beta0 * y1 + (1 - beta0) * y2
    for i in range(len(attention_modules(model))):
        rows = 0.5 * (cap[i] @ rows + rows)
    return rows[:, 0] if label == "cls" else rows[:, p:].mean(1)


def pixel_token_share(box, grid: TokenGrid) -> torch.Tensor:
    """Share of each token's pixels inside a pixel box, by counting pixels. (N,)"""
    h, w = grid.img_size
    m = torch.zeros(h, w)
    top, bottom, left, right = box
    m[top:bottom, left:right] = 1.0
    ph, pw = grid.patch_h, grid.patch_w
    return torch.tensor([float(m[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw].mean())
                         for r in range(grid.rows) for c in range(grid.cols)])


# ---------------------------------------------------------------------------------------------
# registry and configuration

def test_registry_and_config():
    m = methods.get("tl_align", num_classes=10)
    assert isinstance(m, TLAlign) and m.variant == "official" and m.path == "scalar"
    RunConfig(method="tl_align", variant="paper")
    cfg = RunConfig(method="tl_align", method_kwargs={"path": "kdim"})
    assert build_method(cfg, 10).path == "kdim"
    with pytest.raises(ConfigError, match=r"'x'.*scalar.*kdim"):  # values are checked by the method itself
        RunConfig(method="tl_align", method_kwargs={"path": "x"})
    with pytest.raises(ConfigError, match="bogus"):
        RunConfig(method="tl_align", method_kwargs={"bogus": 1})


def test_invalid_path_names_the_choices():
    with pytest.raises(ValueError, match="scalar, kdim"):
        TLAlign(10, path="fast")
    with pytest.raises(ValueError, match="scalar, kdim"):
        methods.get("tl_align", num_classes=10, path="")


def test_grid_set_directly_is_enough_to_mix():
    m = make(grid=TokenGrid(4, 4, 4, 4))
    assert m.mix(torch.randn(4, 3, 16, 16), torch.arange(4)).kind == "cutmix"
    with pytest.raises(RuntimeError, match="prepare_model"):
        make().mix(torch.randn(4, 3, 16, 16), torch.arange(4))


# ---------------------------------------------------------------------------------------------
# attention helpers

@pytest.mark.parametrize("c", [1, 3, 8, 10])
def test_attention_apply_equals_head_mean_map_times_values(c):
    g = torch.Generator().manual_seed(c)
    q, k = torch.randn(3, 4, 9, 16, generator=g) * 2, torch.randn(3, 4, 9, 16, generator=g) * 2
    v = torch.rand(3, 9, c, generator=g)
    s = 0.25
    # the map by hand: softmax over keys of (q k^T) * s, per head, then the head mean
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * s
    a = torch.exp(logits - logits.amax(-1, keepdim=True))
    a = a / a.sum(-1, keepdim=True)
    torch.testing.assert_close(attention_from_qk(q, k, s), a, atol=1e-6, rtol=1e-5)
    expected = a.mean(1) @ v
    out = attention_apply(q, k, v, s)
    assert out.shape == (3, 9, c) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # a subset of query rows (e.g. the CLS query only) gives those rows
    torch.testing.assert_close(attention_apply(q[:, :, :1], k, v, s), expected[:, :1], atol=1e-6, rtol=1e-5)


def test_attention_helpers_stay_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 17, 32, generator=g), torch.randn(2, 3, 17, 32, generator=g)
    v = torch.rand(2, 17, 1, generator=g)
    rows = torch.rand(2, 17, K, generator=g)
    ref_a, ref_v = attention_from_qk(q, k, 32 ** -0.5), attention_apply(q, k, v, 32 ** -0.5)
    ref_rows = propagate_kdim(rows, [ref_a.mean(1)] * 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, out = attention_from_qk(q, k, 32 ** -0.5), attention_apply(q, k, v, 32 ** -0.5)
        r = propagate_kdim(rows, [ref_a.mean(1)] * 3)
    for got, ref in ((a, ref_a), (out, ref_v), (r, ref_rows)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)  # bfloat16 would be off by ~1e-3


# ---------------------------------------------------------------------------------------------
# propagation

def test_identity_attention_returns_the_initial_labels():
    b, t = 3, 5
    g = torch.Generator().manual_seed(1)
    beta0 = torch.rand(b, t, generator=g)
    rows = torch.rand(b, t, K, generator=g)
    eye = torch.eye(t).expand(b, t, t)
    torch.testing.assert_close(propagate_kdim(rows, [eye] * 4), rows)
    # near-identity attention from q, k: orthogonal one-hot keys, queries = keys, large scale
    e = torch.eye(t).expand(b, 2, t, t)  # (B, H, T, d = T)
    qk = [(e.clone(), e.clone(), 60.0)] * 4
    torch.testing.assert_close(propagate_scalar(beta0, qk), beta0, atol=1e-6, rtol=0)
    torch.testing.assert_close(propagate_scalar(beta0, qk, cls_only_last=True)[:, 0], beta0[:, 0], atol=1e-6, rtol=0)
    # through the method: the target is the initial CLS label, i.e. the area target
    grid = TokenGrid(2, 2, 4, 4)
    for path in ("scalar", "kdim"):
        m = make(grid=grid, path=path)
        mixed = hand_batch(grid, torch.rand(b, 4, generator=g), torch.rand(b, generator=g), [0, 1, 2], [5, 6, 7])
        target, beta = m.aligned_target(mixed, qk)
        torch.testing.assert_close(target, mixed.target, atol=1e-6, rtol=0)
        torch.testing.assert_close(beta, mixed.lam_area, atol=1e-6, rtol=0)


def test_hand_computed_two_tokens():
    # T = 2 (CLS + 1 patch), A = [[0.75, 0.25], [0.4, 0.6]]; CLS own share 0.7, the patch is the partner's
    qk1 = qk_for_attention([0.25, 0.6])
    torch.testing.assert_close(attention_from_qk(*qk1)[0, 0], torch.tensor([[0.75, 0.25], [0.4, 0.6]]))
    grid = TokenGrid(1, 1, 4, 4)
    # one block: beta_cls = (0.75 * 0.7 + 0.25 * 0 + 0.7) / 2 = 0.6125
    # two blocks: the patch first becomes (0.4 * 0.7 + 0.6 * 0 + 0) / 2 = 0.14, then
    # beta_cls = (0.75 * 0.6125 + 0.25 * 0.14 + 0.6125) / 2 = 0.5534375
    for layers, beta_cls in ((1, 0.6125), (2, 0.5534375)):
        expected = torch.full((1, K), 0.01)
        expected[0, 3] = beta_cls * 0.91 + (1 - beta_cls) * 0.01
        expected[0, 7] = beta_cls * 0.01 + (1 - beta_cls) * 0.91
        for path in ("scalar", "kdim"):
            m = make(grid=grid, path=path)
            mixed = hand_batch(grid, [[1.0]], 0.7, [3], [7])
            target, beta = m.aligned_target(mixed, [qk1] * layers)
            torch.testing.assert_close(beta, torch.tensor([beta_cls]))
            torch.testing.assert_close(target, expected)
            logits = torch.randn(1, K)
            mixed = hand_batch(grid, [[1.0]], 0.7, [3], [7])
            loss, info = m.loss(ModelOutputs(logits=logits, qk=[qk1] * layers), mixed)
            label_target = m.label(ModelOutputs(logits=logits, qk=[qk1] * layers), mixed)[0]
            torch.testing.assert_close(label_target, expected)
            torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, expected))
            assert info["lam_aligned"] == pytest.approx(beta_cls, abs=1e-6) and info["lam"] == pytest.approx(0.7)


def test_hand_computed_two_tokens_without_cls():
    # two patch tokens, no CLS: own shares [1, 0]; one block with the same A:
    # beta = ([0.75, 0.4] + [1, 0]) / 2 = [0.875, 0.2]; the label is their mean, 0.5375
    grid = TokenGrid(1, 2, 4, 4)
    for path in ("scalar", "kdim"):
        m = make(grid=grid, path=path)
        m.num_prefix_tokens = 0
        mixed = hand_batch(grid, [[0.0, 1.0]], 0.5, [3], [7])
        _, beta = m.aligned_target(mixed, [qk_for_attention([0.25, 0.6])])
        torch.testing.assert_close(beta, torch.tensor([0.5375]))


@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scalar_and_kdim_paths_agree_on_random_attention(prefix, seed):
    g = torch.Generator().manual_seed(100 + seed)
    b, h, n = 4, 3, 12
    t = prefix + n
    qk = random_qk(b, h, t, layers=3 + seed, seed=seed)
    beta0 = torch.rand(b, t, generator=g)
    y1 = torch.softmax(torch.randn(b, K, generator=g), 1)  # any two distributions, not only one-hots
    y2 = torch.softmax(torch.randn(b, K, generator=g), 1)
    rows = beta0[..., None] * y1[:, None] + (1 - beta0[..., None]) * y2[:, None]
    attns = [attention_from_qk(q, k, s).mean(1) for q, k, s in qk]
    for a in attns:  # genuinely row-stochastic and far from the identity
        torch.testing.assert_close(a.sum(-1), torch.ones(b, t))
        assert a.diagonal(dim1=-2, dim2=-1).max() < 0.99
    rows_l = propagate_kdim(rows, attns)
    beta_l = propagate_scalar(beta0, qk)
    # every row stays beta y1 + (1 - beta) y2
    torch.testing.assert_close(rows_l, beta_l[..., None] * y1[:, None] + (1 - beta_l[..., None]) * y2[:, None],
                               atol=1e-6, rtol=0)
    lab = final_label(rows_l, prefix)
    bl = final_label(beta_l, prefix)
    torch.testing.assert_close(lab, bl[:, None] * y1 + (1 - bl[:, None]) * y2, atol=1e-6, rtol=0)
    expected_lab = rows_l[:, 0] if prefix else rows_l.mean(1)
    torch.testing.assert_close(lab, expected_lab)
    if prefix:  # the CLS-only last block gives the same CLS entry
        torch.testing.assert_close(propagate_scalar(beta0, qk, cls_only_last=True)[:, 0], beta_l[:, 0],
                                   atol=1e-6, rtol=0)
    # the propagation moved the labels (the comparison is not between two unchanged inputs)
    assert (beta_l - beta0).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------
# initial labels and mixing

@pytest.mark.parametrize("variant,snap", [("official", "pixel"), ("official", "token"), ("paper", "pixel")])
def test_initial_own_share(variant, snap):
    grid = TokenGrid(7, 7, 4, 4)
    m = make(variant, grid, switch_prob=1.0, cutmix_snap=snap)
    fractional = 0
    for _ in range(30):
        mixed = m.mix(torch.randn(4, 3, 28, 28), torch.arange(4))
        box = mixed.extras["box"]
        share = pixel_token_share(box, grid)
        torch.testing.assert_close(mixed.partner_mask, share.expand(4, -1))
        beta0 = initial_own_share(mixed, 1)
        assert beta0.shape == (4, 50)
        torch.testing.assert_close(beta0[:, 0], torch.full((4,), 1 - float(share.mean())))
        torch.testing.assert_close(beta0[:, 1:], 1 - share.expand(4, -1))
        torch.testing.assert_close(initial_own_share(mixed, 0), 1 - share.expand(4, -1))
        fractional += int(((share > 0) & (share < 1)).any())
    if variant == "official":
        assert fractional == 0  # token-aligned CutMix whatever cutmix_snap says
    else:
        assert fractional > 0  # pixel boxes straddle tokens: within-patch ratios


def test_official_is_token_cutmix_on_every_batch():
    grid = TokenGrid(7, 7, 4, 4)
    x, y = torch.randn(4, 3, 28, 28), torch.arange(4)
    m = make("official", grid, cutmix_snap="pixel", switch_prob=0.0)  # neither can bring Mixup or pixels back
    for _ in range(100):
        mixed = m.mix(x, y)
        assert mixed.kind == "cutmix"
        assert torch.all((mixed.partner_mask == 0) | (mixed.partner_mask == 1))
        assert all(v % 4 == 0 for v in mixed.extras["box"])
        # the pixels follow the token mask
        pix = mixed.partner_mask.view(4, 1, 7, 7).repeat_interleave(4, 2).repeat_interleave(4, 3)
        torch.testing.assert_close(mixed.x, x * (1 - pix) + x.flip(0) * pix)
    half = make("official", grid, mix_prob=0.5)
    assert {half.mix(x, y).kind for _ in range(60)} == {"none", "cutmix"}


def test_paper_composes_with_the_switch_and_keeps_mixup_targets():
    grid = TokenGrid(4, 4, 4, 4)
    m = make("paper", grid, cutmix_snap="pixel")
    x, y = torch.randn(6, 3, 16, 16), torch.arange(6)
    kinds = []
    qk = random_qk(6, 2, 17, layers=3)
    for _ in range(40):
        mixed = m.mix(x, y)
        kinds.append(mixed.kind)
        if mixed.kind != "mixup":
            continue
        lam = float(mixed.lam_area[0])
        area = mix_targets(y, y.flip(0), lam, K, 0.1)
        torch.testing.assert_close(mixed.target, area)
        logits = torch.randn(6, K)
        loss, info = m.loss(ModelOutputs(logits=logits), mixed)  # no q, k needed
        label_target = m.label(ModelOutputs(logits=logits), mixed)[0]
        torch.testing.assert_close(label_target, area)
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, area))
        assert info["lam_aligned"] == pytest.approx(lam)
        # and the propagation itself is the identity on a Mixup batch (every row is the mixed label)
        for path in ("scalar", "kdim"):
            m.path = path
            target, _ = m.aligned_target(mixed, qk)
            torch.testing.assert_close(target, area, atol=1e-6, rtol=0)
        m.path = "scalar"
    assert set(kinds) == {"mixup", "cutmix"}


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("path", ["scalar", "kdim"])
def test_targets_are_distributions_in_the_convex_hull(variant, path):
    grid = TokenGrid(4, 4, 4, 4)
    m = make(variant, grid, switch_prob=1.0, cutmix_snap="pixel", path=path)
    y = torch.arange(8)
    for seed in range(8):
        mixed = m.mix(torch.randn(8, 3, 16, 16), y)
        qk = random_qk(8, 3, 17, layers=4, sharp=3.0, seed=seed)
        target, beta = m.aligned_target(mixed, qk)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        beta0 = initial_own_share(mixed, 1)
        # the final own share is an average of the initial ones
        assert torch.all(beta >= beta0.amin(1) - 1e-6) and torch.all(beta <= beta0.amax(1) + 1e-6)
        torch.testing.assert_close(target, mix_targets(y, mixed.y_partner, beta, K, 0.1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ["scalar", "kdim"])
def test_no_gradient_flows_into_the_target(path):
    grid = TokenGrid(4, 4, 4, 4)
    m = make(grid=grid, path=path)
    mixed = hand_batch(grid, (torch.rand(4, 16) < 0.5).float(), 0.5, [0, 1, 2, 3], [3, 2, 1, 0])
    qk = [(q.requires_grad_(), k.requires_grad_(), s) for q, k, s in random_qk(4, 2, 17, layers=2)]
    logits = torch.randn(4, K, requires_grad=True)
    loss, _ = m.loss(ModelOutputs(logits=logits, qk=[(q * 1.0, k * 1.0, s) for q, k, s in qk]), mixed)
    label_target = m.label(ModelOutputs(logits=logits, qk=[(q * 1.0, k * 1.0, s) for q, k, s in qk]), mixed)[0]
    assert not label_target.requires_grad
    grads = torch.autograd.grad(loss, [logits] + [t for q, k, _ in qk for t in (q, k)], allow_unused=True)
    assert all(g is None for g in grads[1:])
    torch.testing.assert_close(grads[0], (logits.softmax(1) - label_target).detach() / 4)


# ---------------------------------------------------------------------------------------------
# with real models

def model_case(name: str, request):
    if name == "vit_cpu_gray":
        return request.getfixturevalue("vit_cpu_gray"), torch.randn(4, 1, 16, 16), "cls"
    if name == "deit_tiny_32":
        return request.getfixturevalue("deit_tiny_32"), torch.randn(4, 3, 32, 32), "cls"
    torch.manual_seed(7)
    kw, label = {"cls": ({}, "cls"), "no_cls": (dict(class_token=False, global_pool="avg"), "mean"),
                 "reg_no_cls": (dict(class_token=False, reg_tokens=2, global_pool="avg"), "mean"),
                 "cls_avg": (dict(global_pool="avg"), "mean")}[name]
    model = create_model("vit_cpu", 10, 16, 1, **kw).eval()
    with torch.no_grad():  # sharpen every block's attention so that the CLS row and the mean differ
        for mod in attention_modules(model):
            d = mod.qkv.weight.shape[1]
            mod.qkv.weight[: 2 * d] *= 4.0
    return model, torch.randn(4, 1, 16, 16), label


@pytest.mark.parametrize("name", ["vit_cpu_gray", "deit_tiny_32", "cls", "no_cls", "reg_no_cls", "cls_avg"])
def test_real_model_paths_agree_and_match_an_independent_reference(request, name):
    model, x, label = model_case(name, request)
    ms = {path: make("paper", switch_prob=1.0, cutmix_snap="pixel", path=path) for path in ("scalar", "kdim")}
    for m in ms.values():
        m.prepare_model(model)
    mixed = ms["scalar"].mix(x, torch.arange(4))
    assert mixed.kind == "cutmix"
    with torch.no_grad():
        out = forward_outputs(model, ms["scalar"].needs, mixed.x)
    t_scalar, b_scalar = ms["scalar"].aligned_target(mixed, ms["scalar"].attention_inputs(out))
    t_kdim, b_kdim = ms["kdim"].aligned_target(mixed, ms["kdim"].attention_inputs(out))
    torch.testing.assert_close(t_scalar, t_kdim, atol=1e-5, rtol=0)
    torch.testing.assert_close(b_scalar, b_kdim, atol=1e-5, rtol=0)
    # the row the head reads: the CLS row, or the mean of the patch rows for pooled models
    ref = reference_target(model, mixed.x, mixed, label)
    torch.testing.assert_close(t_kdim, ref, atol=1e-5, rtol=1e-4)
    other = reference_target(model, mixed.x, mixed, "mean" if label == "cls" else "cls")
    if name not in ("vit_cpu_gray", "deit_tiny_32", "no_cls"):  # sharpened models with prefix tokens
        assert (other - ref).abs().max() > 1e-3  # the two readings differ, so the check can fail


def test_trains_one_step_through_train_forward():
    torch.manual_seed(8)
    model = create_model("vit_cpu", 10, 16, 1)
    m = make("official")
    model = m.prepare_model(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mixed = m.mix(torch.randn(8, 1, 16, 16), torch.arange(8))
    out = forward_outputs(model, m.needs, mixed.x)
    maps = m.attention_inputs(out)  # source "auto" on CPU: the maps of the (unfused) forward
    assert len(maps) == 4 and all(a.shape == (8, 17, 17) and not a.requires_grad for a in maps)
    loss, info = m.loss(out, mixed)
    label_target = m.label(out, mixed)[0]
    assert not label_target.requires_grad and math.isfinite(float(loss.detach()))
    assert 0.0 <= info["lam_aligned"] <= 1.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert sum(not torch.equal(b, p) for b, p in zip(before, model.parameters())) > len(before) // 2


# ---------------------------------------------------------------------------------------------
# QKCapture

@pytest.fixture(scope="module")
def vit_qknorm():
    torch.manual_seed(1)
    return create_model("vit_cpu_patch", 10, 16, 1, qk_norm=True).eval()


@pytest.mark.parametrize("model_name", ["vit_cpu_gray", "vit_qknorm", "deit_tiny_32"])
def test_qkcapture_matches_the_captured_maps(request, model_name):
    model = request.getfixturevalue(model_name)
    x = torch.randn(2, 3, 32, 32) if model_name == "deit_tiny_32" else torch.randn(2, 1, 16, 16)
    mods = attention_modules(model)
    with torch.no_grad():
        with QKCapture(model) as fused:  # fused attention left on
            model(x)
        with AttentionCapture(model, blocks=None, reduce="none") as cap, QKCapture(model) as qc:
            model(x)
    got = qc.all()
    assert len(got) == len(mods) == len(fused.all())
    for i, ((q, k, s), (qf, kf, sf)) in enumerate(zip(got, fused.all())):
        assert s == pytest.approx(mods[i].head_dim ** -0.5) and sf == s
        assert q.shape == k.shape == (2, mods[i].num_heads, cap[i].shape[-1], mods[i].head_dim)
        torch.testing.assert_close(attention_from_qk(q, k, s), cap[i], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(qf, q)  # the same q, k on the fused path
        torch.testing.assert_close(kf, k)


def test_qkcapture_blocks_subset_and_range():
    model = create_model("vit_cpu", 10, 16, 1).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad(), QKCapture(model) as every, QKCapture(model, blocks=[-1, 1]) as some:
        model(x)
    a, s = every.all(), some.all()
    assert len(s) == 2
    torch.testing.assert_close(s[0][0], a[3][0])
    torch.testing.assert_close(s[1][1], a[1][1])
    for bad in (4, -5):
        with pytest.raises(IndexError, match="out of range"):
            QKCapture(model, blocks=[bad])


def test_qkcapture_leaves_flags_and_removes_hooks():
    model = create_model("vit_cpu", 10, 16, 1).eval()
    mods = attention_modules(model)
    flags = [True, False, True, False]
    for mod, f in zip(mods, flags):
        mod.fused_attn = f

    def hooks() -> int:
        return sum(len(m.q_norm._forward_hooks) + len(m.k_norm._forward_hooks) for m in mods)

    with QKCapture(model) as cap:
        assert hooks() == 2 * len(mods)
        assert [m.fused_attn for m in mods] == flags
        model(torch.randn(2, 1, 16, 16))
    assert hooks() == 0 and [m.fused_attn for m in mods] == flags
    assert len(cap.all()) == 4

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with QKCapture(model):
            model(torch.randn(2, 1, 16, 16))
            raise Boom
    assert hooks() == 0 and [m.fused_attn for m in mods] == flags


def test_qkcapture_raises_when_nothing_was_captured():
    model = create_model("vit_cpu", 10, 16, 1).eval()
    with QKCapture(model) as cap:
        pass
    with pytest.raises(RuntimeError, match="no queries/keys"):
        cap.all()


# ---------------------------------------------------------------------------------------------
# end to end

@pytest.mark.parametrize("variant,path", [("official", "scalar"), ("paper", "scalar"), ("official", "kdim")])
def test_train_end_to_end(tmp_path, variant, path):
    cfg = RunConfig(method="tl_align", variant=variant, method_kwargs={"path": path}, dataset="synthetic",
                    img_size=32, train_subset=64, test_subset=32, epochs=1, batch_size=32, warmup_epochs=0,
                    out_dir=str(tmp_path), progress=False, run_id="tla", seed=2)
    summary = train(cfg)
    assert summary["status"] == "complete" and summary["method"] == "tl_align" and summary["variant"] == variant
    for key in ("final_top1", "final_top5", "best_top1", "train_time_s", "images_per_s", "params"):
        assert math.isfinite(summary[key]), key
    assert load_run(tmp_path / "tla").complete
    rec = [json.loads(line) for line in (tmp_path / "tla" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 1
    assert math.isfinite(rec[0]["train_loss"]) and rec[0]["train_loss"] > 0
    assert 0.0 <= rec[0]["lam_aligned"] <= 1.0 and 0.0 <= rec[0]["lam"] <= 1.0


@pytest.mark.parametrize("path", ["scalar", "kdim"])
def test_attention_sources_maps_and_qk_agree(path, deit_tiny_32):
    """Maps captured from the unfused forward and maps recomputed from q/k give the same target."""
    ms = {src: make("paper", switch_prob=1.0, cutmix_snap="pixel", path=path, source=src) for src in ("maps", "qk")}
    for m in ms.values():
        m.prepare_model(deit_tiny_32)
    assert ms["maps"].needs.attention_blocks == tuple(range(12)) and not ms["maps"].needs.qk
    assert ms["qk"].needs.qk is True and not ms["qk"].needs.attention_blocks
    torch.manual_seed(3)
    mixed = ms["maps"].mix(torch.randn(4, 3, 32, 32), torch.arange(4))
    targets = {}
    with torch.no_grad():
        for src, m in ms.items():
            out = forward_outputs(deit_tiny_32, m.needs, mixed.x)
            targets[src] = m.aligned_target(mixed, m.attention_inputs(out))[0]
    torch.testing.assert_close(targets["maps"], targets["qk"], atol=1e-5, rtol=0)
    assert all(a.fused_attn for a in attention_modules(deit_tiny_32))  # captures restored the model


def test_auto_source_is_maps_on_cpu_and_bad_source_rejected():
    m = make("official")
    m.prepare_model(create_model("vit_cpu", 10, 16, 1))
    assert m.needs.attention_blocks == (0, 1, 2, 3) and m.needs.attention_reduce == "head_mean"
    with pytest.raises(ValueError, match="auto, maps, qk"):
        make("official", source="gpu")
