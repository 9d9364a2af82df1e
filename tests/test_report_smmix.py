"""SMMix figures and tables: the Figure 4 panel, the short run's loss terms and the mixed top-1/top-2
shares on a crafted case (hand-computed)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tokenmix import methods  # noqa: E402
from tokenmix.analysis.experiments import short_run  # noqa: E402
from tokenmix.methods.base import MixedBatch, TokenGrid  # noqa: E402
from tokenmix.methods.baselines import cutmix_batch  # noqa: E402
from tokenmix.models import create_model  # noqa: E402
from tokenmix.report.smmix import mixed_topk_accuracy, plot_loss_terms, plot_smmix_vs_cutmix  # noqa: E402

GRID = TokenGrid(4, 4, 4, 4)  # vit_cpu at 16 px


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 16, 16, generator=g), torch.randint(0, 10, (b,), generator=g)


def test_figure_returns_a_figure():
    torch.manual_seed(0)
    method = methods.get("smmix", num_classes=10, switch_prob=1.0)
    method.prepare_model(create_model("vit_cpu", 10, 16, 1))
    x, y = batch()
    sb = method.mix(x, y)
    cb = cutmix_batch(x, y, 0.6, GRID, 10, 0.1)
    fig = plot_smmix_vs_cutmix(x, sb, cb, GRID, n=3, mean=(0.5,), std=(0.25,))
    assert isinstance(fig, Figure) and len(fig.axes) == 12


def test_short_run_records_finite_loss_terms():
    x, y = batch(32)
    df = short_run(x, y, steps=3, batch_size=8)
    assert len(df) == 3 and list(df["step"]) == [1, 2, 3]
    for term in ("l_cls", "l_fine", "l_con"):
        assert all(math.isfinite(v) for v in df[term])
    assert isinstance(plot_loss_terms(df), Figure)


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def mixed(y, yp):
    b = len(y)
    return MixedBatch(x=torch.zeros(b, 1, 4, 4), y=torch.tensor(y), y_partner=torch.tensor(yp),
                      partner_index=torch.arange(b), partner_mask=torch.zeros(b, 1), lam_area=torch.ones(b),
                      target=torch.zeros(b, 3))


def test_mixed_topk_accuracy_by_hand():
    logits = torch.tensor([[3.0, 2.0, 0.0],   # top-1 0, top-2 {0, 1}
                           [0.0, 1.0, 3.0],   # top-1 2, top-2 {2, 1}
                           [1.0, 0.0, 2.0],   # top-1 2, top-2 {2, 0}
                           [0.0, 3.0, 2.0],   # top-1 1, top-2 {1, 2}
                           [5.0, 0.0, 0.0]])  # same-class pair: left out
    model = FixedLogits(logits).train()
    # own / partner: (0, 1) own + both; (1, 2) partner + both; (1, 0) neither top-1, not both; (2, 0) neither
    df = mixed_topk_accuracy(model, {"a": mixed([0, 1, 1, 2, 0], [1, 2, 0, 0, 0])})
    row = df.loc["a"]
    assert row["n"] == 4
    assert row["top-1 = own (%)"] == pytest.approx(25.0)
    assert row["top-1 = partner (%)"] == pytest.approx(25.0)
    assert row["top-2 = both (%)"] == pytest.approx(50.0)
    assert model.training  # mode restored
