"""The public API, as the README's "Use it in your own training loop" uses it: a timm model made
directly, ``tokenmix.MixStep``, a plain optimiser loop -- for every registered method, through
public names only. Also: odd batches, stateless methods, idempotent and removable preparation,
timm's argument names."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import timm.data
import torch

import tokenmix
from tokenmix.methods import MixedBatch, ModelOutputs

K = 10
#: per-method arguments the snippet passes (TokenMix's teacher cache comes from a fixture)
EXTRA = {"tokenmixup": {"tau": 1e9}, "tokenmix": {}}


def tiny_vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=K, img_size=32, patch_size=8,
                             embed_dim=48, depth=3, num_heads=3)


def method_kwargs(name: str, teacher_cache) -> dict:
    kw = dict(EXTRA.get(name, {}))
    if name == "tokenmix":
        data_dir, path = teacher_cache
        kw.update(teacher_cache=str(path), dataset="synthetic", img_size=32, data_dir=str(data_dir))
    return kw


def meta_for(step: tokenmix.MixStep, b: int):
    """Each sample's metadata (what a ``train_meta=True`` loader yields) for a method that needs it
    (TokenMix's teacher labels); None for the others."""
    return tokenmix.data.random_meta(b, 128, 32, 4) if step.method.needs.sample_meta else None


@pytest.mark.parametrize("name", tokenmix.methods.available())
def test_every_method_trains_in_a_plain_loop(name, teacher_cache):
    torch.manual_seed(0)
    model = tiny_vit()
    step = tokenmix.MixStep(model, name, label_smoothing=0.1, **method_kwargs(name, teacher_cache))
    opt = torch.optim.AdamW(step.parameters(), lr=1e-3)
    before = copy.deepcopy(model.state_dict())
    for b in (8, 8, 7):  # the last, partial batch of a loader with drop_last=False
        x, y = torch.randn(b, 3, 32, 32), torch.randint(0, K, (b,))
        out = step(x, y, meta_for(step, b))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss) and out.loss.ndim == 0
        assert all(isinstance(v, float) for v in out.info.values()) and "lam" in out.info
        assert isinstance(out.mixed, MixedBatch) and isinstance(out.outputs, ModelOutputs)
        assert out.outputs.logits.shape == (b, K)
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "the optimiser changed no parameter"
    step.eval()
    assert step.model(torch.randn(2, 3, 32, 32)).shape == (2, K)  # plain inference after training


@pytest.mark.parametrize("name", tokenmix.methods.available())
def test_odd_batch_leaves_the_unpaired_sample_unmixed_with_its_own_label(name, teacher_cache):
    torch.manual_seed(1)
    step = tokenmix.MixStep(tiny_vit(), name, smoothing=0.1, mix_prob=1.0, **method_kwargs(name, teacher_cache))
    b, mid = 5, 2
    for _ in range(4):  # several draws: Mixup and each method's own mask
        x, y = torch.randn(b, 3, 32, 32), torch.randint(0, K, (b,))
        out = step(x, y, meta_for(step, b))
        m = out.mixed
        own = tokenmix.methods.one_hot(y[mid:mid + 1], K, 0.1)[0]
        assert torch.equal(m.x[mid], x[mid]), m.kind
        assert float(m.partner_mask[mid].abs().sum()) == 0.0 and float(m.lam_area[mid]) == 1.0
        target, _ = step.method.label(out.outputs, m)
        if name != "tokenmixup":  # HTM relabels samples inside the network (its own partners)
            torch.testing.assert_close(target[mid], own)
        assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", tokenmix.methods.available())
def test_loss_and_label_change_no_input_and_nothing_stays_on_the_method(name, teacher_cache):
    torch.manual_seed(2)
    step = tokenmix.MixStep(tiny_vit(), name, **method_kwargs(name, teacher_cache))
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, K, (6,))
    out = step(x, y, meta_for(step, 6))
    attrs = dict(vars(step.method))
    fields = {k: v.clone() for k, v in vars(out.mixed).items() if isinstance(v, torch.Tensor)}
    extras = dict(out.outputs.extras)
    step.method.loss(out.outputs, out.mixed)
    step.method.label(out.outputs, out.mixed)
    assert all(torch.equal(getattr(out.mixed, k), v) for k, v in fields.items())
    assert out.outputs.extras.keys() == extras.keys()
    assert vars(step.method).keys() == attrs.keys() and all(vars(step.method)[k] is v for k, v in attrs.items())
    assert getattr(step.method, "_active", None) is None


@pytest.mark.parametrize("name", tokenmix.methods.available())
def test_prepare_model_is_idempotent_and_release_removes_what_it_added(name, teacher_cache):
    model = tiny_vit()
    plain = copy.deepcopy(model)
    method = tokenmix.methods.get(name, num_classes=K, **method_kwargs(name, teacher_cache))

    def hooks(m):
        return sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.modules())

    once = method.prepare_model(model)
    n_params, n_hooks = len(list(once.parameters())), hooks(once)
    twice = method.prepare_model(once)
    assert twice is once and len(list(twice.parameters())) == n_params and hooks(twice) == n_hooks
    method.release_model(once)
    assert hooks(once) == 0 and once.state_dict().keys() == plain.state_dict().keys()
    assert [type(m) for m in once.modules()] == [type(m) for m in plain.modules()]
    x = torch.randn(3, 3, 32, 32)
    once.train(), plain.train()
    torch.testing.assert_close(once(x), plain(x))


def test_another_method_takes_over_a_prepared_model():
    model = tiny_vit()
    a = tokenmix.methods.get("tokenmixup", num_classes=K, tokenmixup_mode="hvtm", vertical_layer=2)
    a.prepare_model(model)
    b = tokenmix.methods.get("smmix", num_classes=K)
    b.prepare_model(model)
    assert not hasattr(model, "tokenmixup_scorenet") and hasattr(model, "smmix_token_head")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("mode, kw", [("cutmix", dict(mixup_alpha=0.0, cutmix_alpha=1.0)),
                                      ("mixup", dict(mixup_alpha=0.8, cutmix_alpha=0.0))])
def test_timm_argument_names_mean_what_they_mean_in_timm(mode, kw):
    """Same arguments under timm's names -> the same targets as ``timm.data.Mixup`` for the same lam."""
    method = tokenmix.methods.get(mode, num_classes=K, label_smoothing=0.1, prob=1.0, mode="batch",
                                  **{k: v for k, v in kw.items() if v})
    assert method.smoothing == 0.1 and method.mix_prob == 1.0
    mixup_fn = timm.data.Mixup(num_classes=K, label_smoothing=0.1, prob=1.0, mode="batch", **kw)
    assert (method.smoothing, method.mix_prob) == (mixup_fn.label_smoothing, mixup_fn.mix_prob)
    for name in ("mixup_alpha", "cutmix_alpha"):
        if hasattr(method, name):
            assert getattr(method, name) == getattr(mixup_fn, name)
    y = torch.arange(6)
    lam = 0.7
    ours = tokenmix.methods.base.mix_targets(y, y.flip(0), lam, K, method.smoothing)
    theirs = timm.data.mixup.mixup_target(y, K, lam, 0.1)
    torch.testing.assert_close(ours, theirs)


def test_timm_names_reject_what_the_methods_do_not_do():
    with pytest.raises(ValueError, match=r"mode='elem'.*valid: 'batch'"):
        tokenmix.methods.get("cutmix", num_classes=K, mode="elem")
    with pytest.raises(ValueError, match="either label_smoothing"):
        tokenmix.methods.get("cutmix", num_classes=K, label_smoothing=0.1, smoothing=0.1)
    with pytest.raises(ValueError, match="no parameter.*cutmix_minmax"):
        tokenmix.methods.get("cutmix", num_classes=K, cutmix_minmax=(0.2, 0.8))


@pytest.mark.parametrize("name", tokenmix.methods.available())
def test_what_reports_ask_of_a_method_is_declared_by_its_class(name):
    """The report and sweep read these class attributes instead of branching on method names."""
    import matplotlib.colors

    from tokenmix.report.study import paper_results
    cls, params = tokenmix.methods.method_class(name), tokenmix.methods.parameters(name)
    assert set(cls.display_kwargs) <= set(params) and set(cls.fallback_kwargs) <= set(params)
    assert matplotlib.colors.is_color_like(cls.colour)
    m = tokenmix.methods.get(name, num_classes=K, **cls.display_kwargs)
    assert isinstance(m.describe(), str) and m.describe()
    if cls.paper:  # the paper tables name the method's own paper
        assert cls.paper in set(paper_results()["paper"])
    if m.needs.teacher_maps:  # the fallback runs without the teacher cache
        assert not tokenmix.methods.get(name, num_classes=K, **cls.display_kwargs, **cls.fallback_kwargs).needs.teacher_maps
    else:
        assert not cls.fallback_kwargs


def _readme_snippet(repo_root: Path) -> str:
    text = (repo_root / "README.md").read_text()
    section = text.split("## Use it in your own training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_own_loop_snippet_runs_from_an_empty_folder(repo_root, tmp_path):
    """The first python block of the README section, as a user pastes it into a new folder."""
    code = _readme_snippet(repo_root)
    assert "timm.create_model(" in code and "tokenmix" in code
    (tmp_path / "snippet.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step 3" in res.stdout, res.stdout
