"""HDMNet: the matching's query-axis softmax and zeroed background entries, the distillation weights and KL
against hand computations, the prior, BatchNorm modes, the support-image masking, the reference's parameter
count, and the composition end to end on the embedded size."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from test_sccan import run_tiny
from torch import nn

from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.models.bam import BAMEnsemble, BaseLearner, GramShotWeighting
from fsseg.models.hdmnet import (
    HDMNetDecoder,
    HDMNetHead,
    HierarchicalDistillation,
    MatchingAttention,
    distillation_kl,
    hdmnet_prior,
)
from fsseg.models.losses import CrossEntropy, OutputCE
from fsseg.models.segmenter import FewShotSegmenter, count_parameters


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- matching --------------------------------------------------------------------------------------------
def test_matching_softmax_runs_over_the_query_axis_and_zeroes_background_keys():
    torch.manual_seed(0)
    att = MatchingAttention(4, 2, temperature=0.1).double()
    x, src = _rand(2, 5, 4, seed=1) - 0.5, _rand(2, 6, 4, seed=2) - 0.5
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float64)  # episode 2: no foreground
    with torch.no_grad():
        attn, _, scores = att.attention(x, src, mask)
        q, k = att.q(x), att.k(src)
    for b in range(2):
        for h in range(2):
            qh, kh = q[b, :, 2 * h : 2 * h + 2].numpy(), k[b, :, 2 * h : 2 * h + 2].numpy()
            s = (qh / np.linalg.norm(qh, axis=1, keepdims=True)) @ (kh / np.linalg.norm(kh, axis=1, keepdims=True)).T / 0.1
            np.testing.assert_allclose(scores[b, h].numpy(), s, rtol=1e-10)
            e = np.exp(s - s.max(axis=0, keepdims=True))
            expect = e / e.sum(axis=0, keepdims=True) * mask[b].numpy()[None, :]  # per key, over the query axis
            np.testing.assert_allclose(attn[b, h].numpy(), expect, rtol=1e-10, atol=1e-14)
    assert torch.allclose(attn[0][..., mask[0] == 1].sum(dim=1), torch.ones(2, 3, dtype=torch.float64))  # columns sum to 1
    assert (attn[0][..., mask[0] == 0] == 0).all() and (attn[1] == 0).all()
    out, weight = att(x, src, mask)
    assert torch.isfinite(out).all() and torch.isfinite(weight).all()
    # the distillation weight: mean over foreground keys of the scores, then over heads; 0 without foreground
    fg = mask[0] == 1
    torch.testing.assert_close(weight[0], scores[0][..., fg].mean(dim=-1).mean(dim=0))
    assert torch.equal(weight[1], torch.zeros(5, dtype=torch.float64))


# ---- distillation ----------------------------------------------------------------------------------------
def _kl_by_hand(t: np.ndarray, s: np.ndarray) -> float:
    loss = 0.0
    for tb, sb in zip(t.reshape(len(t), -1), s.reshape(len(s), -1), strict=True):
        pt, ps = np.exp(tb - tb.max()), np.exp(sb - sb.max())
        pt, ps = pt / pt.sum(), ps / ps.sum()
        loss += float((pt * (np.log(pt + 1e-12) - np.log(ps + 1e-12))).sum())
    return loss / len(t)


def test_distillation_kl_and_the_stage_chain_by_hand():
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 2, (2, 4, 4), generator=g)
    y[0, 0, 0] = 255  # ignored pixels count as background (-1e9), as the reference
    stages = [torch.randn(2, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 8, 8, generator=g, dtype=torch.float64)]
    terms = HierarchicalDistillation()({"distill_weights": stages}, {B.QUERY_MASK: y}, None)
    teacher0 = np.where(y.numpy() == 1, 1.0, -1e9)  # already at the coarsest size: no resize
    teacher1 = torch.nn.functional.interpolate(stages[0][:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    expect = (_kl_by_hand(teacher0, stages[0].numpy()) + _kl_by_hand(teacher1.numpy(), stages[1].numpy())) / 2
    assert terms["kl"].item() == pytest.approx(expect, rel=1e-9)
    # identical teacher and student: KL 0; the gradient reaches the student only, not the detached teacher
    s = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert distillation_kl(s.detach(), s).item() == pytest.approx(0.0, abs=1e-12)
    a, b2 = torch.randn(1, 2, 2, requires_grad=True), torch.randn(1, 4, 4, requires_grad=True)
    HierarchicalDistillation()({"distill_weights": [a, b2]}, {B.QUERY_MASK: torch.ones(1, 2, 2, dtype=torch.long)}, None)["kl"].backward()
    assert a.grad is not None and b2.grad is not None


# ---- prior ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("minmax", [False, True])
def test_prior_is_the_max_cosine_to_masked_support_positions(minmax):
    q, s = _rand(1, 3, 2, 2, seed=4) - 0.3, _rand(1, 2, 3, 2, 2, seed=5) - 0.3
    label = torch.zeros(1, 2, 4, 4)
    label[0, 0, :2, :2], label[0, 1, 2:, :] = 1, 1  # nearest to 2x2: shot 0 keeps (0, 0); shot 1 keeps row 1
    got = hdmnet_prior(q, s, label, minmax)
    expect = np.zeros(4)
    keep = [[(0, 0)], [(1, 0), (1, 1)]]
    for k in range(2):
        sims = []
        for i in range(4):
            qi = q[0, :, i // 2, i % 2].numpy()
            cos = [0.0 if (r, c) not in keep[k] else
                   float(qi @ s[0, k, :, r, c].numpy()) / (np.linalg.norm(qi) * np.linalg.norm(s[0, k, :, r, c].numpy()) + 1e-7)
                   for r in range(2) for c in range(2)]  # fmt: skip
            sims.append(max(cos))
        sims = np.array(sims)
        if minmax:
            sims = (sims - sims.min()) / (sims.max() - sims.min() + 1e-7)
        expect += sims / 2
    np.testing.assert_allclose(got.view(-1).numpy(), expect, rtol=1e-5, atol=1e-6)


# ---- parameter counts, BN modes, bad configs -------------------------------------------------------------
def test_hdmnet_parameter_count_matches_the_reference():
    # notes: HDMNet ~ 4.16 M trainable, frozen backbone and base learner excluded (ResNet-50 channels, 1-shot)
    taps = {"mid": 1536, "high": 2048, "low": 512, "base": 2048}
    head = HDMNetHead(taps, BaseLearner(2048, 15), GramShotWeighting(1))
    dec = HDMNetDecoder()
    n = count_parameters(head) + count_parameters(dec) + count_parameters(BAMEnsemble(None))
    assert n == pytest.approx(4.16e6, rel=0.01)
    assert n == 4_161_734  # round2-references.md §3.3 recount
    assert count_parameters(dec.transformer) == 3_309_634  # mix_transformer
    five = HDMNetHead(taps, BaseLearner(2048, 15), GramShotWeighting(5))  # kshot_rw: outside the optimizer (reference)
    assert count_parameters(five) == count_parameters(head)
    trained = HDMNetHead(taps, BaseLearner(2048, 15), GramShotWeighting(5), train_shot_weighting=True)
    assert count_parameters(trained) == count_parameters(head) + (5 * 2 + 2) + (2 * 5 + 5)


@pytest.mark.parametrize("bn_eval", [False, True])
def test_transformer_batchnorm_modes(bn_eval):
    dec = HDMNetDecoder(8, 8, num_heads=(2, 2, 2), bn_eval=bn_eval).train()
    bns = [m for m in dec.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training != bn_eval for m in bns)
    assert dec.query_merge.training  # everything else follows train()


def test_bad_heads_are_refused_naming_the_option():
    with pytest.raises(ConfigError, match="decoder.num_heads"):
        HDMNetDecoder(8, 12, num_heads=(2, 5, 2))
    with pytest.raises(ConfigError, match="decoder.match_heads"):
        HDMNetDecoder(8, 12, num_heads=(2, 2, 2), match_heads=5)


# ---- support image masking -------------------------------------------------------------------------------
class RecordingEncoder(nn.Module):
    tap_channels: ClassVar[dict[str, int]] = {"mid": 6, "high": 5, "low": 4, "base": 5}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=4, padding=1).requires_grad_(False)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        mid = torch.relu(self.conv(x)) + 0.01
        return {"mid": mid, "high": mid[:, :5], "low": mid[:, :4], "base": mid[:, 1:6]}


def test_support_image_masking_multiplies_each_support_by_its_mask_before_the_encoder():
    torch.manual_seed(0)
    model = FewShotSegmenter(
        RecordingEncoder(),
        lambda tap_channels: HDMNetHead(tap_channels, BaseLearner(5, 15, list(range(6, 21)), bins=(1,), hidden=8),
                                        GramShotWeighting(2), reduce_dim=8),
        HDMNetDecoder(8, 8, num_heads=(2, 2, 2)), CrossEntropy(), aux_losses={"meta_ce": OutputCE()},
        ensemble=BAMEnsemble(None), support_masking="image",
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    batch = {
        B.QUERY_IMG: torch.randn(2, 3, 32, 32, generator=g), B.SUPPORT_IMGS: torch.randn(2, 2, 3, 32, 32, generator=g),
        B.QUERY_MASK: torch.randint(0, 2, (2, 32, 32), generator=g), B.CLASS_IDX: torch.tensor([3, 9]),
        B.SUPPORT_MASKS: torch.randint(0, 2, (2, 2, 32, 32), generator=g),
    }  # fmt: skip
    batch[B.SUPPORT_MASKS][0, 1, :4] = 255  # ignore pixels are not foreground
    model.train()
    out = model(batch)
    (seen,) = model.encoder.seen  # one pass: query and masked supports together
    m = (batch[B.SUPPORT_MASKS] == 1).float().unsqueeze(2)
    assert torch.equal(seen[:2], batch[B.QUERY_IMG])
    assert torch.equal(seen[2:], (batch[B.SUPPORT_IMGS] * m).flatten(0, 1))
    assert {"logits", "meta_logits", "base_logits", "distill_weights", "scene_difference"} <= out.keys()
    assert [tuple(w.shape[-2:]) for w in out["distill_weights"]] == [(2, 2), (4, 4), (8, 8)]  # coarse to fine
    loss = model.main_loss(out["logits"], batch[B.QUERY_MASK])
    loss = loss + HierarchicalDistillation()(out, batch, model)["kl"]
    loss.backward()
    assert model.decoder.transformer.match[0].attn.q.weight.grad is not None
    assert all(p.grad is None for p in model.head.base.parameters())  # the frozen base learner
    with pytest.raises(ConfigError, match="support_masking"):
        FewShotSegmenter(RecordingEncoder(), model.head, model.decoder, CrossEntropy(), support_masking="images")


# ---- the composition end to end --------------------------------------------------------------------------
def test_hdmnet_trains_one_step_and_evaluates(synth_root, tmp_path):
    metrics = run_tiny("hdmnet_effl0_synth", synth_root, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0 and len(metrics["class_iou"]) == 5
    assert 0.0 <= metrics["base_fp_rate"] <= 1.0 and 0.0 <= metrics["base_fp_rate_meta"] <= 1.0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]  # one AdamW: transformer at base_lr, the rest x10
    assert sorted(g["initial_lr"] for g in groups) == pytest.approx([1e-4, 1e-3])
    assert all(g["weight_decay"] == pytest.approx(0.01) for g in groups)
    assert math.isfinite(metrics["fp_rate"])


@pytest.mark.parametrize("experiment", ["hdmnet_effl0_synth", "sccan_plus_effl0_synth"])
def test_missing_base_learner_file_is_named_before_any_work(experiment, tmp_path):
    from fsseg_testing import compose
    from omegaconf.errors import InterpolationResolutionError

    from fsseg.cli.common import instantiate

    cfg = compose([f"experiment={experiment}", f"paths.output_dir={tmp_path}", "encoder.weights=none"])
    with pytest.raises((ConfigError, InterpolationResolutionError), match=r"no stage-1 base learner at .*fold0\.pt.*task=base"):
        instantiate(cfg.model, num_eval_classes=5)


# ---- fsseg-convert: HDMNet's released checkpoints --------------------------------------------------------
def _hdmnet_model(tmp_path, name: str, seed: int, over: list[str]):
    from fsseg_testing import compose

    from fsseg.cli.common import instantiate
    from fsseg.models.base_learner import write_artifact

    torch.manual_seed(seed)
    learner = BaseLearner(512, 15, list(range(6, 21)))
    meta = {"fold": 0, "encoder": "resnet18", "tap": "base", "in_dim": 512, "base_class_ids": list(range(6, 21)),
            "bins": [1, 2, 3, 6], "dataset": "pascal"}  # fmt: skip
    path = write_artifact(tmp_path / f"{name}.pt", {f"head.{k}": v for k, v in learner.state_dict().items()}, meta)
    model = instantiate(compose([*over, "encoder.weights=none", f"base_learner_path={path}"]).model, num_eval_classes=5)
    return model.eval()


def _reference_layer(layer: nn.Module) -> nn.Module:
    """An fsseg EncoderLayer under mmcv/mmseg's names (TransformerEncoderLayer, EfficientMultiheadAttention)."""
    ref, attn, inner = nn.Module(), nn.Module(), nn.Module()
    ref.norm1, ref.norm2, ref.ffn = layer.norm1, layer.norm2, nn.Module()
    ref.ffn.layers = layer.ffn.layers
    a = layer.attn
    inner.linear_q, inner.linear_k, inner.linear_v, inner.linear_o = a.q, a.k, a.v, a.o
    attn.attn = inner
    if getattr(a, "sr", None) is not None:
        attn.sr, attn.norm = a.sr[0], a.sr_norm
    ref.attn = attn
    return ref


def test_hdmnet_checkpoint_layout_converts_to_the_same_forward(tmp_path):
    from test_convert import SMALL, _backbone, _episode, _old_style, _randomise_bn

    from fsseg.cli.convert import convert

    over = ["method=hdmnet", "encoder=resnet50", "recipe=hdmnet_pascal", *SMALL]
    original = _hdmnet_model(tmp_path, "orig", 0, over)
    _randomise_bn(original)
    with torch.no_grad():  # LayerNorms, biases and the merges away from their init, so a swapped name would show
        for p in [*original.decoder.transformer.parameters(), *original.ensemble.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    learner, dec, tr = original.head.base.learner.module, original.decoder, original.decoder.transformer
    ref = nn.Module()  # HDMNet's OneModel attribute names (model/HDMNet.py, Transformer.py)
    _backbone(ref, original.encoder.model)
    ref.ppm, ref.cls = learner.ppm, nn.Sequential(learner.cls[0], learner.cls[1])
    ref.base_learnear = nn.Sequential(learner.cls[2], learner.cls[3], learner.cls[4])
    ref.down_query, ref.down_supp = original.head.down_query, original.head.down_support
    ref.query_merge, ref.supp_merge = dec.query_merge, dec.support_merge
    ref.gram_merge, ref.cls_merge = original.ensemble.gram_merge, original.ensemble.cls_merge
    mix = nn.Module()
    ref.transformer = nn.Module()
    ref.transformer.mix_transformer = mix
    stages = []
    for stage in tr.stages:
        embed = nn.Module()
        embed.projection, embed.norm = stage.embed, stage.embed_norm
        stages.append(nn.ModuleList([embed, *(_reference_layer(la) for la in stage.layers), stage.norm]))
    mix.down_sample_layers = nn.ModuleList(stages)
    matches = []
    for match, fuse in zip(tr.match, tr.fuse, strict=True):
        conv_module = nn.Module()
        conv_module.conv, conv_module.bn = fuse[0], fuse[1]
        matches.append(nn.ModuleList([_reference_layer(match), conv_module]))
    mix.match_layers = nn.ModuleList(matches)
    mix.parse_layers, mix.cls = tr.parse, tr.cls
    src = tmp_path / "hdmnet_best.pth"
    torch.save({"state_dict": _old_style(ref.state_dict())}, src)

    out = tmp_path / "hdmnet.ckpt"
    stage1_auto = tmp_path / "outputs" / "base_learners" / "pascal_resnet18" / "fold0.pt"
    convert("hdmnet", src, str(out), [*over, f"paths.output_dir={tmp_path / 'outputs'}"])
    assert stage1_auto.is_file()  # the PSPNet parts inside became the fold's stage-1 file
    converted = _hdmnet_model(tmp_path, "other", 1, over)
    converted.load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
    blob = torch.load(stage1_auto, weights_only=True)["state_dict"]
    assert torch.equal(blob["head.cls.4.weight"], learner.cls[4].weight)  # base_learnear.2 = PSPNet cls[4]
    a, b = original(_episode()), converted(_episode())
    for key in ("logits", "meta_logits", "base_logits"):
        assert torch.equal(a[key], b[key]), key
