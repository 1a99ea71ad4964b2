"""PAHNet's frozen prototype predictors (fsseg.models.predictors) and their plumbing into a host segmenter."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.models.losses import CrossEntropy
from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead
from fsseg.models.predictors import FrozenPredictor
from fsseg.models.segmenter import FewShotSegmenter


class TinyEncoder(nn.Module):
    tap_channels: ClassVar[dict[str, int]] = {"mid": 6, "high": 4}

    def __init__(self):
        super().__init__()
        self.mid = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.high = nn.Conv2d(6, 4, 1)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        m = self.mid(x)
        return {"mid": m, "high": self.high(m)}


class ConvPredictorModel(nn.Module):
    """A stand-in trained model: 2-channel logits of the query by one conv (with BatchNorm and dropout, whose
    training-mode behaviour would show if the predictor were not kept in eval mode)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)

    def forward(self, batch):
        return {"logits": self.drop(self.bn(self.conv(batch[B.QUERY_IMG])))}


class RecordingDecoder(FeatureEnrichmentModule):
    requires = ("query_feat", "prototype", "prior", "m_pro")

    def forward(self, guidance):
        self.seen = guidance.get("m_pro")
        return super().forward(guidance)


class RecordingHead(PriorPrototypeHead):
    provides = ("query_feat", "prototype", "prior")

    def forward(self, query, support, support_mask, context=None):
        self.seen = None if context is None else context.m_pro
        return super().forward(query, support, support_mask)


def host(predictor=None, decoder=None):
    return FewShotSegmenter(
        TinyEncoder(),
        lambda tap_channels: RecordingHead(tap_channels, reduce_dim=8),
        decoder or FeatureEnrichmentModule(dim=8, bins=(1.0, 0.5)),
        CrossEntropy(),
        predictor=predictor,
    )


def episode(b=2, size=32):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(b, 1, size, size, dtype=torch.long)
    mask[..., 8:24, 8:24] = 1
    return {
        B.QUERY_IMG: torch.randn(b, 3, size, size, generator=g),
        B.SUPPORT_IMGS: torch.randn(b, 1, 3, size, size, generator=g),
        B.SUPPORT_MASKS: mask,
        B.QUERY_MASK: mask[:, 0].clone(),
        B.CLASS_IDX: torch.zeros(b, dtype=torch.long),
    }


def test_m_pro_is_the_predictors_foreground_softmax_seen_by_head_and_decoder():
    torch.manual_seed(0)
    inner = ConvPredictorModel()
    inner.bn.running_mean.uniform_(-1, 1)
    inner.bn.running_var.uniform_(0.5, 2)
    model = host(FrozenPredictor(inner), RecordingDecoder(dim=8, bins=(1.0, 0.5)))
    model.train()  # the host trains; the predictor must stay in eval mode
    batch = episode()
    out = model(batch)
    # by hand: eval-mode BatchNorm with the running statistics, no dropout, softmax channel 1 = sigmoid(l1 - l0)
    conv = torch.nn.functional.conv2d(batch[B.QUERY_IMG], inner.conv.weight, inner.conv.bias, stride=2, padding=1)
    bn = (conv - inner.bn.running_mean[None, :, None, None]) / torch.sqrt(inner.bn.running_var[None, :, None, None] + inner.bn.eps)
    bn = bn * inner.bn.weight[None, :, None, None] + inner.bn.bias[None, :, None, None]
    expected = torch.sigmoid(bn[:, 1:2] - bn[:, 0:1])
    assert out["m_pro"].shape == (2, 1, 16, 16)
    torch.testing.assert_close(out["m_pro"], expected)
    assert model.decoder.seen is out["m_pro"] and model.head.seen is out["m_pro"]
    assert not out["m_pro"].requires_grad and not inner.training


def test_no_gradient_or_optimizer_slot_for_the_predictor_and_no_weights_in_the_state_dict():
    inner = ConvPredictorModel()
    model = host(FrozenPredictor(inner))
    model.train()
    loss = CrossEntropy()(model(episode())["logits"], episode()[B.QUERY_MASK])
    loss.backward()
    assert all(p.grad is None for p in inner.parameters())
    assert any(p.grad is not None for p in model.decoder.parameters())

    class T:
        estimated_stepping_batches = 10

    model._trainer = T()
    opt = model.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in inner.parameters()}
    assert in_opt  # the host's own parameters are there
    state = model.state_dict()
    assert not [k for k in state if k.startswith("predictor.")]
    # the host's checkpoint loads back (strict) into a host with a predictor, which keeps its own weights
    other = host(FrozenPredictor(ConvPredictorModel()))
    before = {k: v.clone() for k, v in other.predictor.state_dict().items()}
    other.load_state_dict(state, strict=True)
    for k, v in other.predictor.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_no_predictor_no_m_pro_and_a_part_requiring_it_is_refused():
    assert "m_pro" not in host()(episode())
    with pytest.raises(ConfigError, match=r"m_pro.*predictor is null"):
        host(None, RecordingDecoder(dim=8, bins=(1.0, 0.5)))


def test_frozen_predictor_output_checks_and_output_size():
    inner = ConvPredictorModel()
    pred = FrozenPredictor(inner, output_size=(4, 4))
    assert pred(episode()).shape == (2, 1, 4, 4)
    with pytest.raises(ConfigError, match="'nope' not among"):
        FrozenPredictor(inner, output="nope")(episode())
    with pytest.raises(ConfigError, match="output_size"):
        FrozenPredictor(inner, output_size=(0, 4))
