"""Backbones: the model-independent attention sites (ViT/DeiT, CaiT, Swin, PVT v2, CCT), their
readings against brute force, label merging, and the method x backbone matrix (one training step
and one evaluation step per cell)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenmix import methods
from tokenmix.methods import forward_outputs
from tokenmix.methods.teacher_maps import TeacherMaps
from tokenmix.methods.tlalign import align_labels, align_site, propagate_kdim
from tokenmix.models import TINY_CONFIGS, AttentionCapture, Backbone, create_model, create_tiny_model, reduce_attention

FAMILIES = ["deit", "cait", "swin", "pvt_v2", "cct"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return {f: create_tiny_model(f, 10, 32, 3) for f in FAMILIES}


def capture_all(model, x, reduce="site"):
    with AttentionCapture(model, None, reduce) as cap:
        model(x)
    return [cap[i] for i in range(len(Backbone.of(model).sites))]


# ---------------------------------------------------------------------------------------------
# description of each family

@pytest.mark.parametrize("fam, family, grids, kinds, cls_token", [
    ("deit", "vit", [(8, 8)], ["global"] * 4, True),
    ("cait", "cait", [(8, 8), (8, 8)], ["global"] * 4 + ["class"], True),
    ("swin", "swin", [(8, 8), (4, 4)], ["window"] * 3, False),
    ("pvt_v2", "pvt_v2", [(8, 8), (4, 4)], ["reduced"] * 2, False),
    ("cct", "vit", [(16, 16)], ["global"] * 7, False),
])
def test_backbone_description(tiny, fam, family, grids, kinds, cls_token):
    bb = Backbone.of(tiny[fam])
    assert bb.family == family and bb.stage_grids == grids and bb.class_token == cls_token
    assert [s.kind for s in bb.sites] == kinds and [s.index for s in bb.sites] == list(range(len(kinds)))
    x = torch.randn(2, 3, 32, 32)
    tokens = bb.final_patch_tokens(tiny[fam].eval().forward_features(x))
    assert tokens.shape[:2] == (2, bb.final_grid[0] * bb.final_grid[1])
    assert bb.final_cell == (32 // bb.final_grid[0], 32 // bb.final_grid[1])


def test_unsupported_model_and_site_index_errors(tiny):
    with pytest.raises(ValueError, match="supported backbones"):
        Backbone.of(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(IndexError, match="valid: -3..2"):
        Backbone.of(tiny["swin"]).site(3)
    pvt = create_tiny_model("pvt_v2")
    del pvt.tokenmix_img_size
    with pytest.raises(ValueError, match="tokenmix_img_size"):
        Backbone.of(pvt)


def test_create_model_family_arguments():
    with pytest.raises(ValueError, match="fixed stem stride"):
        create_model("pvt_v2_b0", 10, 32, 3, patch_size=8)
    m = create_model("swin_tiny_patch4_window7_224", 10, 32, 3, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
    assert tuple(m.layers[0].blocks[0].window_size) == (4, 4)  # small images: window 4
    with pytest.raises(ValueError, match="unknown tiny family"):
        create_tiny_model("resnet")
    assert set(TINY_CONFIGS) == set(FAMILIES)


# ---------------------------------------------------------------------------------------------
# captured maps are the modules' softmax maps

@pytest.mark.parametrize("fam", FAMILIES)
def test_captured_rows_are_distributions(tiny, fam):
    for sm in capture_all(tiny[fam].eval(), torch.randn(2, 3, 32, 32)):
        torch.testing.assert_close(sm.attn.sum(-1), torch.ones(sm.attn.shape[:-1]), atol=1e-5, rtol=0)


def test_cait_talking_heads_map_is_the_softmax_before_proj_w(tiny):
    model = tiny["cait"].eval()
    seen = {}
    h = model.blocks[0].attn.proj_w.register_forward_pre_hook(lambda m, a: seen.setdefault("a", a[0].detach()))
    maps = capture_all(model, torch.randn(2, 3, 32, 32))
    h.remove()
    torch.testing.assert_close(maps[0].attn, seen["a"].permute(0, 3, 1, 2).mean(1))


def test_capture_restores_fused_flags(tiny):
    model = tiny["swin"]
    flags = [b.attn.fused_attn for st in model.layers for b in st.blocks]
    with AttentionCapture(model, None, "site"):
        assert not any(b.attn.fused_attn for st in model.layers for b in st.blocks)
    assert [b.attn.fused_attn for st in model.layers for b in st.blocks] == flags


# ---------------------------------------------------------------------------------------------
# readings against brute force

def dense_window_matrix(sm):
    """The block-sparse (B, N, N) matrix of a Swin window site, built token by token."""
    (h, w), (wh, ww), (sh, sw) = sm.grid, sm.window, sm.shift
    nwin = (h // wh) * (w // ww)
    b = sm.attn.shape[0] // nwin
    dense = torch.zeros(b, h * w, h * w)
    for bi in range(b):
        for wi in range(nwin):
            r0, c0 = (wi // (w // ww)) * wh, (wi % (w // ww)) * ww
            pos = [(((r0 + i // ww) + sh) % h) * w + ((c0 + i % ww) + sw) % w for i in range(wh * ww)]
            for qi, q in enumerate(pos):
                for ki, k in enumerate(pos):
                    dense[bi, q, k] = sm.attn[bi * nwin + wi, qi, ki]
    return dense


def test_window_sites_match_dense_brute_force(tiny):
    model = tiny["swin"].eval()
    maps = capture_all(model, torch.randn(2, 3, 32, 32))
    assert maps[1].shift == (2, 2) and maps[0].shift == (0, 0)  # the second block of stage 0 is shifted
    y = torch.rand(2, 64, 3)
    for sm in maps[:2]:
        dense = dense_window_matrix(sm)
        torch.testing.assert_close(dense.sum(-1), torch.ones(2, 64), atol=1e-5, rtol=0)
        torch.testing.assert_close(align_site(sm, y), 0.5 * (dense @ y + y), atol=1e-5, rtol=1e-5)
        area = sm.window[0] * sm.window[1]  # mean over the queries of the window
        torch.testing.assert_close(sm.received(), dense.sum(1) / area, atol=1e-6, rtol=1e-5)


def test_reduced_sites_match_brute_force(tiny):
    sm = capture_all(tiny["pvt_v2"].eval(), torch.randn(2, 3, 32, 32))[0]
    assert sm.grid == (8, 8) and sm.key_grid == (4, 4)
    y = torch.rand(2, 64, 3)
    keys = torch.stack([y.reshape(2, 4, 2, 4, 2, 3)[:, r, :, c].mean((1, 2)) for r in range(4) for c in range(4)], 1)
    torch.testing.assert_close(align_site(sm, y), 0.5 * (sm.attn @ keys + y))
    torch.testing.assert_close(sm.received(), sm.attn.mean(1))


def test_global_and_class_readings(tiny):
    x = torch.randn(2, 3, 32, 32)
    deit = tiny["deit"].eval()
    with AttentionCapture(deit, (-1,), "none") as cap:
        deit(x)
    raw = cap[-1]
    sm = capture_all(deit, x)[-1]
    torch.testing.assert_close(sm.received(), reduce_attention(raw, "query_mean", 1))
    torch.testing.assert_close(sm.cls_row(), reduce_attention(raw, "cls", 1))
    y = torch.rand(2, 65, 4)
    torch.testing.assert_close(align_site(sm, y), 0.5 * (raw.mean(1) @ y + y))
    cls_site = capture_all(tiny["cait"].eval(), x)[-1]
    out = align_site(cls_site, y)
    torch.testing.assert_close(out[:, 1:], y[:, 1:])  # patch tokens pass a class-attention block unchanged
    by_hand = torch.stack([cls_site.attn[i, 0] @ y[i] for i in range(2)])  # the CLS query's row
    torch.testing.assert_close(out[:, 0], 0.5 * (by_hand + y[:, 0]))
    with pytest.raises(ValueError, match="no class-token query"):
        capture_all(tiny["swin"].eval(), x)[-1].cls_row()


def test_merge_labels_hand_cases(tiny):
    y = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid of scalars
    swin = Backbone.of(tiny["swin"]).merge_labels(y, (4, 4), (2, 2))
    torch.testing.assert_close(swin.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))  # 2x2 means
    pvt = Backbone.of(tiny["pvt_v2"]).merge_labels(y, (4, 4), (2, 2))
    # 3x3 footprints centred on (0,0), (0,2), (2,0), (2,2) with padding 1 (padding not counted)
    g = y.reshape(4, 4)
    expect = [g[0:2, 0:2].mean(), g[0:2, 1:4].mean(), g[1:4, 0:2].mean(), g[1:4, 1:4].mean()]
    torch.testing.assert_close(pvt.flatten(), torch.stack(expect))
    # a mixture of two labels stays a mixture: rows of a distribution still sum to 1
    rows = F.softmax(torch.randn(1, 16, 5), -1)
    torch.testing.assert_close(Backbone.of(tiny["swin"]).merge_labels(rows, (4, 4), (2, 2)).sum(-1), torch.ones(1, 4))


def test_align_labels_on_vit_equals_plain_propagation(tiny):
    model = tiny["deit"].eval()
    x = torch.randn(2, 3, 32, 32)
    maps = capture_all(model, x)
    own = torch.rand(2, 64, 1)
    prefix = torch.rand(2, 1)
    rows = torch.cat([prefix.unsqueeze(1), own], 1)  # (B, 65, 1)
    expect = propagate_kdim(rows, [m.attn for m in maps])[:, 0]
    torch.testing.assert_close(align_labels(Backbone.of(model), maps, own, prefix), expect)


def test_align_labels_is_linear_and_keeps_distributions(tiny):
    """Scalar own share and K-dim rows agree on every family (all steps are row-stochastic)."""
    x = torch.randn(2, 3, 32, 32)
    for fam in ["cait", "swin", "pvt_v2"]:
        model = tiny[fam].eval()
        bb, maps = Backbone.of(model), capture_all(model, x)
        n = bb.input_grid[0] * bb.input_grid[1]
        beta = torch.rand(2, n, 1)
        lam = torch.rand(2, 1)
        y1, y2 = torch.eye(4)[0], torch.eye(4)[2]
        rows = beta * y1 + (1 - beta) * y2
        out_rows = align_labels(bb, maps, rows, lam * y1 + (1 - lam) * y2)
        out_beta = align_labels(bb, maps, beta, lam)
        torch.testing.assert_close(out_rows, out_beta * y1 + (1 - out_beta) * y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_rows.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
        # all-own tokens stay all-own
        torch.testing.assert_close(align_labels(bb, maps, torch.ones(2, n, 1), torch.ones(2, 1)), torch.ones(2, 1))


def test_downsample_mask_is_area_average(tiny):
    bb = Backbone.of(tiny["swin"])
    m = torch.zeros(1, 64)
    m[0, :8] = 1.0  # the first token row
    out = bb.downsample_mask(m, (4, 4)).reshape(4, 4)
    torch.testing.assert_close(out[0], torch.full((4,), 0.5))
    torch.testing.assert_close(out[1:], torch.zeros(3, 4))


# ---------------------------------------------------------------------------------------------
# the method x backbone matrix

METHODS = ["none", "mixup", "cutmix", "mixup_cutmix", "transmix", "tokenmix", "tokenmixup", "smmix", "tl_align", "mixpro"]
#: cells that must raise, and what the error says
UNSUPPORTED = {("tokenmixup", "swin"): "Swin", ("tokenmixup", "pvt_v2"): "PVT"}


def fake_teacher(num_images=16, k=3, h=8):
    rng = np.random.default_rng(0)
    return TeacherMaps(values=rng.standard_normal((num_images, k, h, h)).astype(np.float16),
                       classes=rng.integers(0, 10, (num_images, k, h, h)).astype(np.int16), meta={"dataset": "fake"})


def make_method(name, fam):
    kw = {"tokenmixup": dict(tau=100.0, tokenmixup_mode="hvtm", horizontal_layer=1, vertical_layer=1),
          "smmix": dict(switch_prob=1.0), "tokenmix": dict(switch_prob=1.0),
          "transmix": dict(switch_prob=1.0), "tl_align": {}, "mixpro": dict(variant="official", pal=True, switch_prob=1.0)}.get(name, {})
    m = methods.get(name, num_classes=10, **kw)
    if name == "tokenmix":
        m.maps = fake_teacher()
    return m


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_method_backbone_matrix(name, fam):
    torch.manual_seed(0)
    model = create_tiny_model(fam, 10, 32, 3)
    method = make_method(name, fam)
    if (name, fam) in UNSUPPORTED:
        with pytest.raises(ValueError, match=UNSUPPORTED[(name, fam)]):
            method.prepare_model(model)
        return
    model = method.prepare_model(model)
    method.prepare_training()
    b = 4
    x, y = torch.randn(b, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    if method.needs.sample_meta:
        meta = {"index": torch.arange(b), "box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * b), "flip": torch.zeros(b, dtype=torch.bool)}
        mixed = method.mix(x, y, meta=meta)
    else:
        mixed = method.mix(x, y)
    model.train()
    loss, info = method.loss(forward_outputs(model, method.needs, mixed.x), mixed)
    label_target = method.label(forward_outputs(model, method.needs, mixed.x), mixed)[0]
    assert torch.isfinite(loss), (name, fam, loss)
    t = label_target
    assert t.shape == (b, 10) and torch.isfinite(t).all()
    if getattr(method, "loss_kind", "ce") == "bce":
        # TokenMix's released BCE target (documented in tokenmix.methods.tokenmix.official_target):
        # eps/K + (y_own - eps/2) on the own class + (y_partner - eps/2) on the partner's, masses in [0, 1]
        assert bool((t >= -method.smoothing / 2 - 1e-6).all()) and bool((t.sum(1) <= 2 + 1e-5).all())
    else:
        assert bool((t >= 0).all())
        torch.testing.assert_close(t.sum(1), torch.ones(b), atol=1e-5, rtol=0)
    loss.backward()
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (b, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("model, method", [("tiny_swin", "tl_align"), ("tiny_pvt_v2", "smmix"), ("tiny_cait", "transmix")])
def test_train_command_runs_backbones_through_the_engine(tmp_path, model, method):
    from tokenmix.__main__ import main
    rc = main(["train", "--dataset", "synthetic", "--model", model, "--method", method, "--img_size", "32",
               "--epochs", "1", "--warmup_epochs", "0", "--train_subset", "64", "--test_subset", "32",
               "--batch_size", "16", "--out_dir", str(tmp_path), "--run_id", "r", "--progress", "false"])
    assert rc == 0
    import json
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["model"] == model


@pytest.mark.parametrize("name, grids, smmix_grid", [
    ("deit_small_patch16_224", [(14, 14)], (14, 14)),
    ("cait_xxs24_224", [(14, 14), (14, 14)], (14, 14)),
    ("swin_tiny_patch4_window7_224", [(56, 56), (28, 28), (14, 14), (7, 7)], (7, 7)),
    ("pvt_v2_b0", [(56, 56), (28, 28), (14, 14), (7, 7)], (7, 7)),
])
def test_paper_architectures_at_224(name, grids, smmix_grid):
    """The papers' models at 224 px: their stage grids, and SMMix on the last stage (side 7 for
    PVT, as the official code; Swin's window 7 covers that whole stage)."""
    model = create_model(name, 1000, 224, 3)
    bb = Backbone.of(model)
    assert bb.stage_grids == grids
    m = methods.get("smmix", num_classes=1000)
    m.prepare_model(model)
    assert (m.grid.rows, m.grid.cols) == smmix_grid and m.grid.img_size == (224, 224)
    if name.startswith("swin"):
        assert tuple(model.layers[-1].blocks[0].window_size) == (7, 7)


def test_pvt_too_small_image_fails_with_the_reason():
    with pytest.raises(ValueError, match="too small.*sr_ratio.*>= 32"):
        create_model("pvt_v2_b0", 10, 28, 1)
