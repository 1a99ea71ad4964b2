"""PAHNet's frozen prototype predictors (fsseg.models.predictors) and their plumbing into a host segmenter."""

from __future__ import annotations

import pytest
import torch
from test_segmenter import TinyEncoder
from torch import nn

from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.models.losses import CrossEntropy
from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead
from fsseg.models.predictors import FrozenPredictor
from fsseg.models.segmenter import FewShotSegmenter


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


# ---------------------------------------------------------------------------------------------- SSP and Pro
from fsseg.models.ssp import SelfMatchingLoss, SelfSupportMatching, SupportPrototypes


def _cos(a, b):  # per-pixel cosine by hand: a (C, h, w), b (C,) or (C, h, w)
    b = b[:, None, None] if b.dim() == 1 else b
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))


def test_pro_logits_are_ten_times_cosine_to_masked_average_prototypes():
    g = torch.Generator().manual_seed(1)
    q, s = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 1, 3, 4, 4, generator=g)
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    labels[..., :2, :] = 1
    labels[..., 3, 3] = 255  # neither FG nor BG
    head = SupportPrototypes({"ssp": 3})
    ctx = type("Ctx", (), {"support_labels": labels})()
    guidance = head({"ssp": q}, {"ssp": s}, (labels == 1).float(), context=ctx)
    fg = s[0, 0][:, :2, :].flatten(1).sum(1) / (8 + 1e-5)
    bg_mask = torch.zeros(4, 4)
    bg_mask[2:, :] = 1
    bg_mask[3, 3] = 0
    bg = (s[0, 0] * bg_mask).flatten(1).sum(1) / (7 + 1e-5)
    torch.testing.assert_close(guidance["prototype"].flatten(), fg)
    torch.testing.assert_close(guidance["bg_prototype"].flatten(), bg)
    out = SelfSupportMatching(self_support=False)(guidance)
    expected = torch.stack([_cos(q[0], bg), _cos(q[0], fg)]) * 10
    torch.testing.assert_close(out["logits"][0], expected)


def _self_support_loop(feat, logits, fg_t=0.7, bg_t=0.6, k=12):
    """SSP's self-support step, one episode at a time with explicit index selection (the paper's description)."""
    fps, bps, asbps = [], [], []
    for e in range(feat.shape[0]):
        f = feat[e].flatten(1)  # C, N
        p = logits[e].softmax(0).flatten(1)  # 2, N
        idx_fg = torch.nonzero(p[1] > fg_t).flatten()
        if len(idx_fg) == 0:
            idx_fg = torch.topk(p[1], k).indices
        idx_bg = torch.nonzero(p[0] > bg_t).flatten()
        if len(idx_bg) == 0:
            idx_bg = torch.topk(p[0], k).indices
        fg_feats, bg_feats = f[:, idx_fg], f[:, idx_bg]
        fps.append(fg_feats.mean(1))
        bps.append(bg_feats.mean(1))
        local = torch.zeros_like(f)
        for x in range(f.shape[1]):
            w = torch.stack([2 * torch.dot(f[:, x], bg_feats[:, j]) / (f[:, x].norm() * bg_feats[:, j].norm())
                             for j in range(bg_feats.shape[1])]).softmax(0)  # fmt: skip
            local[:, x] = (bg_feats * w).sum(1)
        asbps.append(local.view_as(feat[e]))
    return torch.stack(fps), torch.stack(bps), torch.stack(asbps)


def test_ssp_self_support_matches_a_direct_loop_including_the_top_k_fallback():
    g = torch.Generator().manual_seed(2)
    feat = torch.randn(3, 5, 5, 5, generator=g)
    logits = torch.randn(3, 2, 5, 5, generator=g) * 2
    logits[1, 1] = -5.0  # episode 1: no pixel has p_fg > 0.7 -> top-12 fallback for FG
    logits[1, 0] = 0.0
    logits[2, 0] = 0.0  # episode 2: p_bg = sigmoid(-l1) > 0.6 nowhere -> top-12 fallback for BG
    logits[2, 1] = -0.2 + torch.rand(5, 5, generator=g) * 0.1
    dec = SelfSupportMatching(fallback_k=12)
    probs = logits.softmax(1)
    assert not (probs[1, 1] > 0.7).any() and not (probs[2, 0] > 0.6).any()
    ssfp, ssbp, asbp = dec.self_support_prototypes(feat, logits)
    want = _self_support_loop(feat, logits)
    for got, exp in zip((ssfp, ssbp, asbp), want, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    # out_1 by hand from those prototypes: FP1 = 0.5 FP + 0.5 SSFP, BP1 = 0.3 SSBP + 0.7 ASBP
    fp, bp = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    guidance = {"query_feat": feat, "prototype": fp[..., None, None], "bg_prototype": bp[..., None, None]}
    out = dec(guidance)
    out0 = torch.stack([torch.stack([_cos(feat[e], bp[e]), _cos(feat[e], fp[e])]) * 10 for e in range(3)])
    torch.testing.assert_close(out["ssp_out0"], out0)
    s_fp, s_bp, a_bp = _self_support_loop(feat, out0)
    fp1, bp1 = 0.5 * fp + 0.5 * s_fp, 0.3 * s_bp[..., None, None] + 0.7 * a_bp
    out1 = torch.stack([torch.stack([_cos(feat[e], bp1[e]), _cos(feat[e], fp1[e])]) * 10 for e in range(3)])
    torch.testing.assert_close(out["logits"], out1, rtol=1e-5, atol=1e-5)
    assert "ssp_out1" not in out
    # refinement: out_2 = 0.7 sim(FP2, BP2) + 0.3 out_1, with the mixes of SSP's refinement
    ref = SelfSupportMatching(refine=True)(guidance)
    s_fp2, s_bp2, a_bp2 = _self_support_loop(feat, out1)
    fp2 = 0.5 * fp + 0.2 * fp1 + 0.3 * (0.5 * fp + 0.5 * s_fp2)
    bp2 = 0.5 * bp[..., None, None] + 0.2 * bp1 + 0.3 * (0.3 * s_bp2[..., None, None] + 0.7 * a_bp2)
    out2 = torch.stack([torch.stack([_cos(feat[e], bp2[e]), _cos(feat[e], fp2[e])]) * 10 for e in range(3)])
    torch.testing.assert_close(ref["logits"], 0.7 * out2 + 0.3 * out1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref["ssp_out1"], out1, rtol=1e-5, atol=1e-5)


def test_ssp_self_matching_loss_against_hand_cross_entropy():
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(1, 4, 2, 2, generator=g)
    mask = torch.tensor([[[1, 0], [0, 255]]])
    loss = SelfMatchingLoss(side="query")({"query_feat": feat}, {B.QUERY_MASK: mask}, None)["query_self"]
    f = feat[0].flatten(1)
    fp, bp = f[:, 0] / (1 + 1e-5), (f[:, 1] + f[:, 2]) / (2 + 1e-5)
    terms = []
    for x, y in ((0, 1), (1, 0), (2, 0)):
        lg = 10 * torch.stack([torch.cosine_similarity(f[:, x], bp, 0), torch.cosine_similarity(f[:, x], fp, 0)])
        terms.append(-lg.log_softmax(0)[y])
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    with pytest.raises(ConfigError, match="side"):
        SelfMatchingLoss(side="both")
    with pytest.raises(ConfigError, match="self_support"):
        SelfSupportMatching(self_support=False, refine=True)


def test_bam_predictor_reads_the_meta_learners_logits_not_the_ensembles():
    class BamLike(nn.Module):  # what a BAM run returns: the ensemble's logits and the meta learner's
        def forward(self, batch):
            q = batch[B.QUERY_IMG][:, :2, ::4, ::4]
            return {"logits": -q, "meta_logits": q}

    batch = episode()
    m = FrozenPredictor(BamLike(), output="meta_logits")(batch)
    q = batch[B.QUERY_IMG][:, :2, ::4, ::4]
    torch.testing.assert_close(m, torch.sigmoid(q[:, 1:2] - q[:, 0:1]))
    from fsseg_testing import compose

    cfg = compose(["experiment=pfenet_effl0_synth", "predictor=bam", "data.fold=2"])
    assert cfg.model.predictor.output == "meta_logits" and cfg.model.predictor.run.endswith("predictors/bam_bam_synth/fold2")
