"""TransMix (tokenmix.methods.transmix): the CutMix label re-weighted by the last block's attention.

Expected values are computed independently in the tests (by hand, by pixel-level brute force or
with torch's nearest interpolation), never copied from the implementation's output.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_method

from tokenmix import methods
from tokenmix.methods import forward_outputs
from tokenmix.methods.base import MixedBatch, ModelOutputs, TokenGrid, mix_targets, one_hot
from tokenmix.methods.transmix import TransMix, attention_partner_share, nearest_partner_mask
from tokenmix.models import AttentionCapture, create_model
from tokenmix.train.config import RunConfig
from tokenmix.train.engine import train
from tokenmix.train.runs import load_run

K = 10
GRIDS = [TokenGrid(4, 4, 4, 4), TokenGrid(7, 7, 4, 4), TokenGrid(6, 4, 4, 8), TokenGrid(3, 5, 6, 2)]


# ---------------------------------------------------------------------------------------------
# helpers (independent of the implementation)

def pixel_box_mask(box, h: int, w: int) -> torch.Tensor:
    """(H, W) 0/1 mask of a half-open pixel box, by assignment."""
    top, bottom, left, right = box
    m = torch.zeros(h, w)
    m[top:bottom, left:right] = 1.0
    return m


def brute_nearest(box, grid: TokenGrid) -> torch.Tensor:
    """Token (r, c) pasted iff pixel (r*ph, c*pw) is in the box: read off the pixel mask. (N,)"""
    m = pixel_box_mask(box, *grid.img_size)
    return torch.tensor([float(m[r * grid.patch_h, c * grid.patch_w])
                         for r in range(grid.rows) for c in range(grid.cols)])


def brute_area_share(box, grid: TokenGrid) -> torch.Tensor:
    """Share of each token's pixels inside the box, by counting pixels. (N,)"""
    m = pixel_box_mask(box, *grid.img_size)
    ph, pw = grid.patch_h, grid.patch_w
    return torch.tensor([float(m[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw].mean())
                         for r in range(grid.rows) for c in range(grid.cols)])


def random_box(gen: torch.Generator, h: int, w: int):
    """Any half-open box inside (h, w), empty and full boxes included."""
    t, b = sorted(torch.randint(0, h + 1, (2,), generator=gen).tolist())
    le, r = sorted(torch.randint(0, w + 1, (2,), generator=gen).tolist())
    return t, b, le, r


def hand_batch(grid: TokenGrid, partner_mask: torch.Tensor, lam_area, y, y_partner, box=None,
               kind: str = "cutmix", smoothing: float = 0.1) -> MixedBatch:
    """A MixedBatch built by hand (x is a dummy of the right size)."""
    b = partner_mask.shape[0]
    lam_t = torch.as_tensor(lam_area, dtype=torch.float32).expand(b).clone()
    y, y_partner = torch.as_tensor(y), torch.as_tensor(y_partner)
    return MixedBatch(
        x=torch.zeros(b, 1, *grid.img_size), y=y, y_partner=y_partner,
        partner_index=torch.arange(b - 1, -1, -1), partner_mask=partner_mask.float(), lam_area=lam_t,
        target=mix_targets(y, y_partner, lam_t, K, smoothing), kind=kind,
        extras={} if box is None else {"box": box},
    )


def make(variant: str = "official", grid: TokenGrid | None = None, **kw) -> TransMix:
    return make_method("transmix", TransMix, K, variant, grid, **kw)


def loss_outputs(b: int, attn: torch.Tensor, logits: torch.Tensor | None = None, cls_self: float = 0.1) -> ModelOutputs:
    """ModelOutputs whose last block attends to the patches in proportion to ``attn`` (B, N).

    The attention is given both as a captured map (``attention[-1]``, CLS row without CLS->CLS)
    and as queries/keys (``qk[-1]``): one head, every query e0 and key t = log(w_t) e0, so that
    every row of softmax(q k^T) is w = [cls_self, attn] / sum (the CLS row, and the mean over the
    patch queries, are then both proportional to attn; the partner share is scale-free).
    """
    n = attn.shape[1]
    w = torch.cat([torch.full((b, 1), cls_self), attn], 1)
    w = w / w.sum(1, keepdim=True)
    q = torch.zeros(b, 1, n + 1, 2)
    q[..., 0] = 1.0
    k = torch.stack([w.log(), torch.zeros_like(w)], -1).unsqueeze(1)  # (B, 1, T, 2)
    return ModelOutputs(logits=torch.randn(b, K) if logits is None else logits, attention={-1: attn},
                        qk=[(q, k, 1.0)])


def partner_share_of_target(target: torch.Tensor, y, yp, smoothing: float = 0.1) -> torch.Tensor:
    """Read lam_p back from a two-class target: t[yp] = s/K + lam_p (1 - s) when y != yp."""
    idx = torch.arange(target.shape[0])
    return (target[idx, yp] - smoothing / K) / (1 - smoothing)


# ---------------------------------------------------------------------------------------------
# registry / construction

def test_registry_builds_both_variants():
    assert "transmix" in methods.available()
    for v in ("official", "paper"):
        m = methods.get("transmix", num_classes=10, variant=v)
        assert isinstance(m, TransMix) and m.variant == v
    with pytest.raises(ValueError, match="official, paper"):
        methods.get("transmix", num_classes=10, variant="both")
    RunConfig(method="transmix", variant="paper")  # valid config


def test_grid_set_directly_is_enough_to_mix():
    """The documented alternative to prepare_model (``method.grid = TokenGrid(...)``) must work."""
    grid = TokenGrid(4, 4, 4, 4)
    m = make(grid=grid, switch_prob=1.0)
    mixed = m.mix(torch.randn(4, 3, 16, 16), torch.arange(4))
    assert mixed.kind == "cutmix" and mixed.partner_mask.shape == (4, 16)


# ---------------------------------------------------------------------------------------------
# the lambda rule

@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_paper_lambda_is_area_share_under_uniform_attention(grid):
    gen = torch.Generator().manual_seed(1)
    m = make("paper", grid)
    h, w = grid.img_size
    for _ in range(50):
        box = random_box(gen, h, w)
        share = brute_area_share(box, grid)
        mixed = hand_batch(grid, share.expand(2, -1), 1 - share.mean(), [1, 2], [2, 1], box=box)
        attn = torch.full((2, grid.num_tokens), 0.37)  # any constant: CLS->CLS dropped, not renormalised
        lam_p = m.partner_share(attn, mixed)
        area = (box[1] - box[0]) * (box[3] - box[2]) / (h * w)
        torch.testing.assert_close(lam_p, torch.full((2,), float(area)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_official_lambda_is_mean_of_area_and_nearest_attention_share(grid):
    torch.manual_seed(2)
    m = make("official", grid, switch_prob=1.0, cutmix_snap="pixel")
    b = 6
    for _ in range(25):
        x, y = torch.randn(b, 1, *grid.img_size), torch.randperm(K)[:b]  # own != partner class
        mixed = m.mix(x, y)
        assert mixed.kind == "cutmix"
        box = mixed.extras["box"]
        h, w = grid.img_size
        area_partner = (box[1] - box[0]) * (box[3] - box[2]) / (h * w)
        # the official nearest downsampling, as torch's nearest interpolation of the pixel mask
        nearest = F.interpolate(pixel_box_mask(box, h, w)[None, None], size=(grid.rows, grid.cols),
                                mode="nearest").flatten()
        attn = torch.rand(b, grid.num_tokens) * 0.9
        lam_attn = (attn * nearest).sum(1) / attn.sum(1)
        expected = 0.5 * (area_partner + lam_attn)
        _, info = m.loss(loss_outputs(b, attn), mixed)
        label_target = m.label(loss_outputs(b, attn), mixed)[0]
        torch.testing.assert_close(partner_share_of_target(label_target, y, mixed.y_partner), expected,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(label_target, mix_targets(y, mixed.y_partner, 1 - expected, K, 0.1),
                                   atol=1e-6, rtol=0)
        assert info["lam_transmix"] == pytest.approx(float(1 - expected.mean()), abs=1e-6)


def test_hand_computed_small_grid_both_variants():
    # 2 x 3 tokens of 4 x 4 px (8 x 12 image); box rows [2, 8), cols [4, 12): 48 of 96 px.
    grid = TokenGrid(2, 3, 4, 4)
    box = (2, 8, 4, 12)
    # token shares by hand: row 0 covers pixel rows 0-3 (2 of 4 inside), row 1 rows 4-7 (all);
    # col 0 px 0-3 (none), col 1 px 4-7 (all), col 2 px 8-11 (all)
    area = torch.tensor([[0.0, 0.5, 0.5, 0.0, 1.0, 1.0]])
    # top-left pixels: (0,0) (0,4) (0,8) (4,0) (4,4) (4,8) -> only the last two lie in the box
    nearest = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    attn = torch.tensor([[0.10, 0.20, 0.05, 0.15, 0.30, 0.10]])  # sums to 0.9 (CLS->CLS = 0.1 dropped)
    mixed = hand_batch(grid, area, 0.5, [3], [7], box=box)
    assert torch.equal(nearest_partner_mask(mixed, grid), nearest)

    off = make("official", grid)
    lam_off = 0.5 * (0.5 + 0.4 / 0.9)  # (area share + (0.3 + 0.1) / 0.9) / 2 = 0.47222...
    torch.testing.assert_close(off.partner_share(attn, mixed), torch.tensor([lam_off]))

    pap = make("paper", grid)
    lam_pap = (0.2 * 0.5 + 0.05 * 0.5 + 0.3 + 0.1) / 0.9  # = 0.58333...
    torch.testing.assert_close(pap.partner_share(attn, mixed), torch.tensor([lam_pap]))

    # the target (smoothing 0.1, K = 10): 0.01 off-class, 0.91 on-class for each source
    logits = torch.randn(1, K)
    for method, lam_p in ((off, lam_off), (pap, lam_pap)):
        mb = hand_batch(grid, area, 0.5, [3], [7], box=box)
        loss, info = method.loss(loss_outputs(1, attn, logits), mb)
        label_target = method.label(loss_outputs(1, attn, logits), mb)[0]
        expected = torch.full((1, K), 0.01)
        expected[0, 3] = (1 - lam_p) * 0.91 + lam_p * 0.01
        expected[0, 7] = (1 - lam_p) * 0.01 + lam_p * 0.91
        torch.testing.assert_close(label_target, expected)
        torch.testing.assert_close(loss, F.cross_entropy(logits, expected))
        assert info["lam_transmix"] == pytest.approx(1 - lam_p, abs=1e-6)
        assert info["lam"] == pytest.approx(0.5)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_nearest_partner_mask_equals_brute_force(grid):
    gen = torch.Generator().manual_seed(3)
    h, w = grid.img_size
    boxes = [(0, 0, 0, 0), (0, h, 0, w), (1, h, 1, w), (0, 1, 0, 1)] + [random_box(gen, h, w) for _ in range(200)]
    for box in boxes:
        mixed = hand_batch(grid, torch.zeros(3, grid.num_tokens), 1.0, [0, 1, 2], [2, 1, 0], box=box)
        got = nearest_partner_mask(mixed, grid)
        assert got.shape == (3, grid.num_tokens)
        expected = brute_nearest(box, grid)
        assert torch.equal(got, expected.expand(3, -1)), box
        # and torch's nearest interpolation (the official 224 -> 14 downsampling) agrees
        interp = F.interpolate(pixel_box_mask(box, h, w)[None, None], size=(grid.rows, grid.cols), mode="nearest")
        assert torch.equal(got[0], interp.flatten()), box


def test_nearest_mask_differs_from_area_mask_for_straddling_boxes():
    """Guard against the two rules collapsing: a box starting mid-patch is counted by its top-left."""
    grid = TokenGrid(2, 2, 4, 4)
    mixed = hand_batch(grid, torch.zeros(1, 4), 1.0, [0], [1], box=(1, 8, 1, 8))
    # top-left pixels (0,0) (0,4) (4,0) (4,4): only (4,4) is inside [1,8) x [1,8)
    assert nearest_partner_mask(mixed, grid).tolist() == [[0.0, 0.0, 0.0, 1.0]]
    mixed = hand_batch(grid, torch.zeros(1, 4), 1.0, [0], [1], box=(0, 3, 0, 3))
    assert nearest_partner_mask(mixed, grid).tolist() == [[1.0, 0.0, 0.0, 0.0]]  # 9 of 16 px, top-left in


def test_token_aligned_mask_without_box_is_rounded():
    grid = TokenGrid(2, 3, 4, 4)
    pm = torch.tensor([[0.0, 0.2, 0.49, 0.51, 0.8, 1.0],
                       [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    mixed = hand_batch(grid, pm, 1 - pm.mean(1), [0, 1], [1, 0], box=None)
    assert nearest_partner_mask(mixed, grid).tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 1, 0]]


def test_attention_partner_share_formula():
    attn = torch.tensor([[1.0, 3.0, 0.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 0.5, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    # (1 + 1.5 + 0 + 0) / 8 and (0.5 + 0.5) / 2
    torch.testing.assert_close(attention_partner_share(attn, mask), torch.tensor([2.5 / 8, 0.5]))


# ---------------------------------------------------------------------------------------------
# composition

@pytest.mark.parametrize("variant", ["official", "paper"])
def test_mixup_and_unmixed_batches_keep_area_target(variant):
    grid = TokenGrid(4, 4, 4, 4)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, K, (8,))
    for kw, kind in (({"switch_prob": 0.0}, "mixup"), ({"mix_prob": 0.0}, "none")):
        m = make(variant, grid, **kw)
        for _ in range(5):
            mixed = m.mix(x, y)
            assert mixed.kind == kind
            lam = mixed.lam_area
            area_target = mix_targets(y, y.flip(0), lam, K, 0.1) if kind == "mixup" else one_hot(y, K, 0.1)
            torch.testing.assert_close(mixed.target, area_target)
            before = mixed.target.clone()
            logits = torch.randn(8, K)
            # the attention is never read: empty captures would fail if it were
            loss, info = m.loss(ModelOutputs(logits=logits, attention={}), mixed)
            label_target = m.label(ModelOutputs(logits=logits, attention={}), mixed)[0]
            assert torch.equal(label_target, before)
            torch.testing.assert_close(loss, F.cross_entropy(logits, area_target))
            assert info["lam_transmix"] == pytest.approx(float(lam.mean()))


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_switch_produces_both_kinds(variant):
    grid = TokenGrid(4, 4, 4, 4)
    m = make(variant, grid)
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    kinds = {m.mix(x, y).kind for _ in range(60)}
    assert kinds == {"mixup", "cutmix"}


def test_any_mask_without_box():
    """A MixedBatch from any mask generator (fractional/binary partner_mask, no box)."""
    grid = TokenGrid(4, 4, 4, 4)
    gen = torch.Generator().manual_seed(4)
    b, n = 6, grid.num_tokens
    frac = torch.rand(b, n, generator=gen)
    binary = (torch.rand(b, n, generator=gen) < 0.4).float()
    y = torch.arange(b)
    for pm in (frac, binary):
        lam_area = 1 - pm.mean(1)
        attn = torch.rand(b, n, generator=gen)
        # brute force, sample by sample and token by token
        exp_paper = torch.tensor([sum(float(attn[i, t] * pm[i, t]) for t in range(n)) / float(attn[i].sum())
                                  for i in range(b)])
        rounded = torch.tensor([[1.0 if float(v) >= 0.5 else 0.0 for v in row] for row in pm])
        exp_off = 0.5 * ((1 - lam_area) + (attn * rounded).sum(1) / attn.sum(1))
        for variant, exp in (("paper", exp_paper), ("official", exp_off)):
            m = make(variant, grid)
            mixed = hand_batch(grid, pm, lam_area, y, y.flip(0), box=None, kind="blocks")
            m.loss(loss_outputs(b, attn), mixed)
            label_target = m.label(loss_outputs(b, attn), mixed)[0]
            torch.testing.assert_close(partner_share_of_target(label_target, y, y.flip(0)), exp,
                                       atol=1e-5, rtol=0)
    # the binary mask needs no rounding: both rules then use the same attention share
    m_off, m_pap = make("official", grid), make("paper", grid)
    mixed = hand_batch(grid, binary, 1 - binary.mean(1), y, y.flip(0), box=None, kind="blocks")
    attn = torch.rand(b, n, generator=gen)
    torch.testing.assert_close(m_off.partner_share(attn, mixed),
                               0.5 * (binary.mean(1) + m_pap.partner_share(attn, mixed)))


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("snap", ["pixel", "token"])
def test_targets_are_distributions_between_the_two_labels(variant, snap):
    grid = TokenGrid(7, 7, 4, 4)
    m = make(variant, grid, switch_prob=1.0, cutmix_snap=snap)
    b = 8
    y = torch.arange(b)  # y != y.flip(0)
    for _ in range(20):
        mixed = m.mix(torch.randn(b, 3, 28, 28), y)
        attn = torch.rand(b, grid.num_tokens) ** 4  # peaked
        m.loss(loss_outputs(b, attn), mixed)
        label_target = m.label(loss_outputs(b, attn), mixed)[0]
        t = label_target
        torch.testing.assert_close(t.sum(1), torch.ones(b))
        assert torch.all(t >= 0.01 - 1e-6) and torch.all(t <= 0.91 + 1e-6)
        lam_p = partner_share_of_target(t, y, mixed.y_partner)
        assert torch.all(lam_p >= -1e-6) and torch.all(lam_p <= 1 + 1e-6)
        # the only mass off the two classes is the smoothing floor
        other = torch.ones_like(t, dtype=torch.bool)
        other[torch.arange(b), y] = False
        other[torch.arange(b), mixed.y_partner] = False
        torch.testing.assert_close(t[other], torch.full_like(t[other], 0.01))


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_no_gradient_flows_into_the_target(variant):
    grid = TokenGrid(4, 4, 4, 4)
    m = make(variant, grid, switch_prob=1.0)
    mixed = m.mix(torch.randn(4, 3, 16, 16), torch.arange(4))
    while float(mixed.lam_area.mean()) in (0.0, 1.0):  # need a real box
        mixed = m.mix(torch.randn(4, 3, 16, 16), torch.arange(4))
    attn = (torch.rand(4, 16) + 0.05).requires_grad_()
    logits = torch.randn(4, K, requires_grad=True)
    loss, _ = m.loss(loss_outputs(4, attn, logits), mixed)  # the map and q, k both depend on attn
    label_target = m.label(loss_outputs(4, attn, logits), mixed)[0]
    assert not label_target.requires_grad
    g_attn, g_logits = torch.autograd.grad(loss, [attn, logits], allow_unused=True)
    assert g_attn is None
    # the gradient of soft CE w.r.t. the logits with a constant target
    torch.testing.assert_close(g_logits, (logits.softmax(1) - label_target).detach() / 4)


# ---------------------------------------------------------------------------------------------
# with real models

def test_prepare_model_reads_the_grid(vit_cpu_gray):
    m = make()
    assert m.prepare_model(vit_cpu_gray) is vit_cpu_gray
    assert m.grid == TokenGrid(4, 4, 4, 4)
    with pytest.raises(RuntimeError, match="prepare_model"):
        make().mix(torch.randn(2, 1, 16, 16), torch.arange(2))


def forward_and_expected(model, m: TransMix, x, y):
    """One forward_outputs pass with the method's needs, and the full last-block map (B, H, T, T)."""
    mixed = m.mix(x, y)
    outputs = forward_outputs(model, m.needs, mixed.x)
    with torch.no_grad(), AttentionCapture(model, blocks=[-1], reduce="none") as cap:
        model(mixed.x)
    return mixed, outputs, cap[-1]


def peaked(model):
    """Sharpen the last block's attention (scale its q and k weights) so that rules differ clearly."""
    attn = model.blocks[-1].attn
    d = attn.qkv.weight.shape[1]
    with torch.no_grad():
        attn.qkv.weight[: 2 * d] *= 6.0
    return model


def test_cls_model_uses_last_block_cls_row():
    torch.manual_seed(6)
    model = peaked(create_model("vit_cpu", 10, 16, 1).eval())
    m = make("paper", switch_prob=1.0)
    m.prepare_model(model)
    y = torch.arange(4)
    with torch.no_grad():
        mixed, out, full = forward_and_expected(model, m, torch.randn(4, 1, 16, 16), y)
    m.loss(out, mixed)
    label_target = m.label(out, mixed)[0]
    cls_row = full[:, :, 0, 1:].mean(1)  # (B, 16): head mean, CLS query, patches only
    expected = (cls_row * mixed.partner_mask).sum(1) / cls_row.sum(1)
    torch.testing.assert_close(partner_share_of_target(label_target, y, mixed.y_partner), expected,
                               atol=1e-5, rtol=0)
    # and not the query mean (the two differ on a random model, so the test can tell them apart)
    qm = full[:, :, 1:, 1:].mean(dim=(1, 2))
    other = (qm * mixed.partner_mask).sum(1) / qm.sum(1)
    assert (other - expected).abs().max() > 1e-2


def test_model_without_cls_trains_one_step_through_train_forward():
    torch.manual_seed(5)
    model = peaked(create_model("vit_cpu", 10, 28, 1, class_token=False, global_pool="avg"))
    m = make("official", switch_prob=1.0)
    model = m.prepare_model(model)
    if m.needs.attention_blocks:  # when the method asks for a captured map, it is the query mean
        assert m.needs.attention_reduce == "query_mean"
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.arange(8)
    mixed, outputs, full = forward_and_expected(model, m, torch.randn(8, 1, 28, 28), y)
    assert mixed.kind == "cutmix"
    outputs = forward_outputs(model, m.needs, mixed.x)
    loss, info = m.loss(outputs, mixed)
    label_target = m.label(outputs, mixed)[0]
    # query_mean: head- and query-mean of the attention received by each patch token
    qm = full.mean(dim=(1, 2))  # (B, 49), no prefix tokens
    box = mixed.extras["box"]
    nearest = torch.stack([brute_nearest(box, m.grid)] * 8)
    expected = 0.5 * ((1 - mixed.lam_area) + (qm * nearest).sum(1) / qm.sum(1))
    torch.testing.assert_close(partner_share_of_target(label_target, y, mixed.y_partner), expected,
                               atol=1e-5, rtol=0)
    uniform = 0.5 * ((1 - mixed.lam_area) + nearest.mean(1))  # what an ignored attention would give
    assert (uniform - expected).abs().max() > 1e-3
    assert not label_target.requires_grad
    assert math.isfinite(float(loss.detach())) and 0.0 <= info["lam_transmix"] <= 1.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert changed > len(before) // 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# end to end

@pytest.mark.parametrize("variant", ["official", "paper"])
def test_train_end_to_end(tmp_path, variant):
    cfg = RunConfig(method="transmix", variant=variant, dataset="synthetic", img_size=32, train_subset=64,
                    test_subset=32, epochs=1, batch_size=32, warmup_epochs=0, out_dir=str(tmp_path),
                    progress=False, run_id=f"tm-{variant}", seed=1)
    summary = train(cfg)
    assert summary["status"] == "complete" and summary["method"] == "transmix" and summary["variant"] == variant
    for key in ("final_top1", "final_top5", "best_top1", "train_time_s", "images_per_s", "params"):
        assert math.isfinite(summary[key]), key
    run = load_run(tmp_path / f"tm-{variant}")
    assert run.complete
    rec = [json.loads(line) for line in (tmp_path / f"tm-{variant}" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 1
    assert math.isfinite(rec[0]["train_loss"]) and rec[0]["train_loss"] > 0
    assert 0.0 <= rec[0]["lam_transmix"] <= 1.0 and 0.0 <= rec[0]["lam"] <= 1.0
