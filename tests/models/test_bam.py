"""BAM's parts against hand computations and loops: Gram estimate, K-shot re-weighting, ensemble, base map,
the composition (episode context, frozen sub-model, one encoder pass) and the reference's parameter count."""

from __future__ import annotations

import functools
import itertools
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.models.bam import ASPP, BAMEnsemble, BAMMetaDecoder, BaseLearner, FrozenSubModel, GramShotWeighting
from fsseg.models.losses import CrossEntropy, EnsembleNLL, OutputCE
from fsseg.models.ops import gram_matrix, scene_difference
from fsseg.models.pfenet import PriorPrototypeHead
from fsseg.models.segmenter import EpisodeContext, FewShotSegmenter, count_parameters


def _gram_by_hand(f: np.ndarray) -> np.ndarray:
    c = f.shape[0]
    flat = f.reshape(c, -1)
    g = np.zeros((c, c))
    for i, j in itertools.product(range(c), range(c)):
        g[i, j] = (flat[i] * flat[j]).sum() / (math.sqrt((flat[i] ** 2).sum()) * math.sqrt((flat[j] ** 2).sum()) + 1e-7)
    return g


def test_gram_and_scene_difference_by_hand():
    g = torch.Generator().manual_seed(0)
    q = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    s = torch.rand(2, 2, 3, 6, 3, generator=g, dtype=torch.float64)  # supports may have another size
    np.testing.assert_allclose(gram_matrix(q)[1].numpy(), _gram_by_hand(q[1].numpy()), rtol=1e-10)
    est = scene_difference(q, s)
    assert est.shape == (2, 2)
    for b, k in itertools.product(range(2), range(2)):
        diff = _gram_by_hand(q[b].numpy()) - _gram_by_hand(s[b, k].numpy())
        assert est[b, k].item() == pytest.approx(math.sqrt((diff**2).sum()) / 3, rel=1e-9)  # ||1_{3x3}||_F = 3
    assert scene_difference(q, q[:, None]).abs().max() < 1e-6  # the same scene: no difference


def _taps(b: int, k: int, c: int = 4) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(1)
    return {"low": torch.rand(b, c, 5, 5, generator=g)}, {"low": torch.rand(b, k, c, 5, 5, generator=g)}


def test_shot_weighting_one_shot_and_uniform_init():
    q, s = _taps(3, 1)
    w, est = GramShotWeighting(1)(q, s)
    assert torch.equal(w, torch.ones(3, 1)) and torch.allclose(est, scene_difference(q["low"], s["low"])[:, 0])
    q, s = _taps(3, 4)
    w, _ = GramShotWeighting(4, hidden=0)(q, s)  # one K -> K conv at 1/K: equal scores, equal weights
    assert torch.allclose(w, torch.full((3, 4), 0.25))


@pytest.mark.parametrize("gather", ["bam", "hdmnet"])
def test_shot_weighting_matches_a_loop_over_the_reference_steps(gather):
    torch.manual_seed(0)
    q, s = _taps(4, 3)
    mod = GramShotWeighting(3, hidden=2, gather=gather)
    w, est_w = mod(q, s)
    est = scene_difference(q["low"], s["low"])
    for b in range(4):
        order = sorted(range(3), key=lambda i: est[b, i].item())  # ascending, as torch.sort
        sorted_vals = est[b, order].view(1, 3, 1, 1)
        scores = mod.kshot_rw(sorted_vals).view(3)  # scores for the sorted positions
        if gather == "bam":  # each shot gets the score of its own sorted position
            per_shot = torch.stack([scores[order.index(i)] for i in range(3)])
        else:  # HDMNet's idx1.gather(1, idx2) is the identity: scores stay in sorted order
            per_shot = scores
        expect = torch.softmax(per_shot, dim=0)
        torch.testing.assert_close(w[b], expect)
        torch.testing.assert_close(est_w[b], (expect * est[b]).sum())


def test_shot_weighting_refuses_another_shot_count():
    q, s = _taps(2, 3)
    with pytest.raises(ConfigError, match="built for 5 shots"):
        GramShotWeighting(5)(q, s)


def _ctx(class_idx, training=True):
    return EpisodeContext(class_idx=torch.as_tensor(class_idx))


def test_ensemble_at_initial_merge_weights_is_the_meta_probabilities():
    torch.manual_seed(0)
    ens = BAMEnsemble(None)
    meta, base = torch.randn(3, 2, 6, 6), torch.randn(3, 16, 6, 6)
    final = ens.combine(meta, base, torch.rand(3), _ctx([0, 4, 14]))
    assert torch.equal(final, meta.softmax(dim=1))  # gram_merge and cls_merge start at [1, 0]


def test_base_map_excludes_the_episode_class_in_training_only():
    torch.manual_seed(0)
    ens = BAMEnsemble(None)
    with torch.no_grad():  # merged background = base map exactly
        ens.cls_merge.weight.copy_(torch.tensor([0.0, 1.0]).view_as(ens.cls_merge.weight))
    meta, base = torch.randn(3, 2, 4, 4), torch.randn(3, 16, 4, 4)
    idx = [0, 7, 14]
    soft = base.softmax(dim=1)
    ens.train()
    trained = ens.combine(meta, base, torch.rand(3), _ctx(idx))[:, 0]
    for b, c in enumerate(idx):  # the reference's loop: every base channel but background and the class's own
        keep = [ch for ch in range(1, 16) if ch != c + 1]
        torch.testing.assert_close(trained[b], soft[b, keep].sum(dim=0))
    ens.eval()
    tested = ens.combine(meta, base, torch.rand(3), _ctx(idx))[:, 0]
    torch.testing.assert_close(tested, soft[:, 1:].sum(dim=1))


@pytest.mark.parametrize("base_resize", ["logits", "map"])
def test_base_map_of_a_coarser_base_learner(base_resize):
    """I2R's grids differ (base 15 x 15, meta 30 x 30): its code sums the base softmax at 15 x 15 and resizes that
    map (``map``); BAM's order resizes the logits first (``logits``). Evaluation, merged background = base map."""
    torch.manual_seed(0)
    ens = BAMEnsemble(None, base_resize=base_resize).eval()
    with torch.no_grad():
        ens.cls_merge.weight.copy_(torch.tensor([0.0, 1.0]).view_as(ens.cls_merge.weight))
    meta, base = torch.randn(2, 2, 8, 8), torch.randn(2, 16, 4, 4)
    out = ens({"logits": meta, "base_logits": base, "scene_difference": torch.rand(2)}, _ctx([0, 1]))
    up = functools.partial(torch.nn.functional.interpolate, size=(8, 8), mode="bilinear", align_corners=True)
    if base_resize == "map":
        want = up(base.softmax(dim=1)[:, 1:].sum(dim=1, keepdim=True))
    else:
        want = up(base).softmax(dim=1)[:, 1:].sum(dim=1, keepdim=True)
    torch.testing.assert_close(out["logits"][:, :1], want)
    with pytest.raises(ConfigError, match="base_resize"):
        BAMEnsemble(None, base_resize="features")


def test_ensemble_nll_at_initial_weights_equals_ce_of_the_meta_logits():
    torch.manual_seed(0)
    meta = torch.randn(2, 2, 8, 8)
    target = torch.randint(0, 2, (2, 16, 16))
    target[0, :3] = 255
    final = BAMEnsemble(None).combine(meta, torch.randn(2, 6, 8, 8), torch.rand(2), _ctx([0, 1]))
    # the upsampled probabilities are a convex mix of probabilities, so they still sum to one: NLL = CE
    upsampled = torch.nn.functional.interpolate(meta.softmax(1), size=(16, 16), mode="bilinear", align_corners=True)
    expect = torch.nn.functional.nll_loss(upsampled.log(), target, ignore_index=255)
    torch.testing.assert_close(EnsembleNLL()(final, target), expect)


def test_base_learner_label_remap():
    bl = BaseLearner(8, 3, base_class_ids=[2, 5, 9])
    label = torch.tensor([[0, 2, 5], [9, 7, 255]])
    assert bl.base_index_label(label).tolist() == [[0, 1, 2], [3, 0, 255]]
    assert bl(torch.randn(2, 8, 6, 6)).shape == (2, 4, 6, 6)


def test_meta_learner_parameter_count_matches_the_reference():
    # round2-references.md §1.1: 4.92 M trainable parameters in 1-shot with ResNet-50 channels
    head = PriorPrototypeHead({"mid": 1536, "high": 2048}, shot_weighting=GramShotWeighting(1))
    n = count_parameters(head) + count_parameters(BAMMetaDecoder(256)) + count_parameters(BAMEnsemble(None))
    assert n == pytest.approx(4.92e6, rel=0.01)
    assert n == 4_917_254  # hand count: reductions 786,432 + init_merge 131,328 + ASPP 1,901,824 + res 1,507,328 + cls 590,338 + merges 4


def test_aspp_keeps_the_size_and_concatenates_five_branches():
    x = torch.randn(2, 16, 9, 9)
    assert ASPP(16, (2, 3, 5))(x).shape == (2, 80, 9, 9)


# ---- the composition ---------------------------------------------------------------------------------
class CountingEncoder(nn.Module):
    """Stub encoder with BAM's four taps; counts the images it encodes."""

    tap_channels: ClassVar[dict[str, int]] = {"mid": 6, "high": 5, "low": 4, "base": 5}
    taps: ClassVar[dict[str, list[int]]] = {"mid": [1], "high": [2], "low": [0], "base": [2]}

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.low = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.mid = nn.Conv2d(4, 6, 1)
        self.high = nn.Conv2d(6, 5, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                p.requires_grad_(False)
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        low = torch.relu(self.low(x))
        mid = torch.relu(self.mid(low))
        high = torch.relu(self.high(mid)) + 0.01
        return {"low": low, "mid": mid, "high": high, "base": high}


def _bam(shots=1, **kw):
    torch.manual_seed(0)
    base = BaseLearner(5, 15, base_class_ids=list(range(6, 21)), bins=(1,), hidden=8)
    return FewShotSegmenter(
        CountingEncoder(),
        lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=8, shot_weighting=GramShotWeighting(shots)),
        BAMMetaDecoder(dim=8, dilations=(1, 2, 3)),
        CrossEntropy(),
        aux_losses={"meta_ce": OutputCE()},
        ensemble=BAMEnsemble(base),
        **kw,
    )


def _batch(b=2, k=1, size=32):
    g = torch.Generator().manual_seed(2)
    return {
        B.QUERY_IMG: torch.randn(b, 3, size, size, generator=g),
        B.SUPPORT_IMGS: torch.randn(b, k, 3, size, size, generator=g),
        B.QUERY_MASK: torch.randint(0, 2, (b, size, size), generator=g),
        B.SUPPORT_MASKS: torch.randint(0, 2, (b, k, size, size), generator=g),
        B.CLASS_IDX: torch.tensor([3, 9][:b]),
        B.CLASS_ID: torch.tensor([10, 16][:b]),
        B.QUERY_BASE_LABEL: torch.zeros(b, size, size, dtype=torch.long),
    }


@pytest.mark.parametrize("shots", [1, 3])
def test_bam_step_encodes_each_image_once_and_trains_only_the_meta_parts(shots):
    model = _bam(shots)
    model.train()
    batch = _batch(k=shots)
    out = model(batch)
    assert model.encoder.images == 2 * (1 + shots)  # base learner reads the query's taps: no second pass
    assert {"logits", "meta_logits", "base_logits", "scene_difference", "shot_weights"} <= out.keys()
    assert out["base_logits"].shape[1] == 16
    loss = model.main_loss(out["logits"], batch[B.QUERY_MASK]) + model.aux_losses["meta_ce"](out, batch, model)["meta"]
    loss.backward()
    base_params = list(model.ensemble.base_learner.parameters())
    assert base_params and all(not p.requires_grad and p.grad is None for p in base_params)
    assert model.ensemble.cls_merge.weight.grad is not None and model.decoder.cls[-1].weight.grad is not None
    trainable = {id(p) for g in model.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert not trainable & {id(p) for p in base_params}
    assert not model.ensemble.base_learner.module.training  # frozen sub-model stays in eval under train()


def test_evaluation_never_sees_the_query_mask():
    seen = []

    class SpyHead(PriorPrototypeHead):
        def forward(self, query, support, support_mask, context=None):
            seen.append(context)
            return super().forward(query, support, support_mask)

    model = FewShotSegmenter(
        CountingEncoder(), lambda tap_channels: SpyHead(tap_channels, reduce_dim=8, shot_weighting=GramShotWeighting(1)),
        BAMMetaDecoder(dim=8, dilations=(1,)), CrossEntropy(),
        ensemble=BAMEnsemble(BaseLearner(5, 15, list(range(6, 21)), bins=(1,), hidden=4)),
    ).eval()
    batch = _batch()
    a = model.predict(batch)
    batch[B.QUERY_MASK] = 1 - batch[B.QUERY_MASK]
    batch[B.QUERY_BASE_LABEL] = torch.full_like(batch[B.QUERY_BASE_LABEL], 7)
    assert torch.equal(a, model.predict(batch))
    assert seen and all(c.query_mask is None and c.query_base_label is None for c in seen)
    assert torch.equal(seen[0].class_idx, batch[B.CLASS_IDX])
    model.train()
    model(batch)
    assert torch.equal(seen[-1].query_mask, batch[B.QUERY_MASK])  # training does


def test_a_decoder_output_may_not_overwrite_a_head_output():
    class Clobber(nn.Module):
        def forward(self, guidance):
            return {"logits": guidance["prior"].repeat(1, 2, 1, 1), "prior": guidance["prior"] * 0}

    model = FewShotSegmenter(
        CountingEncoder(), lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=8), Clobber(), CrossEntropy()
    )
    with pytest.raises(ConfigError, match=r"Clobber returns \['prior'\]"):
        model(_batch())


def test_declared_guidance_is_checked_at_build():
    class NeedsGram(nn.Module):
        requires = ("query_feat", "gram")

    class Head(nn.Module):
        provides = ("query_feat", "prior")

    with pytest.raises(ConfigError, match=r"needs guidance \['gram'\]"):
        FewShotSegmenter(CountingEncoder(), Head(), NeedsGram(), CrossEntropy())


def test_a_base_learner_of_another_fold_is_refused():
    with pytest.raises(ConfigError, match="trained on base classes"):
        _bam(base_class_ids=list(range(1, 16)))
    _bam(base_class_ids=list(range(6, 21)))  # the matching fold builds


def test_frozen_sub_model_stays_in_eval_and_out_of_autograd():
    sub = FrozenSubModel(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.5)))
    sub.train()
    assert not sub.module.training
    x = torch.randn(2, 2, 3, 3, requires_grad=True)
    y = sub(x)
    assert not y.requires_grad and torch.equal(y, sub(x))  # no dropout, no batch statistics


def test_frozen_sub_model_with_train_dropout_drops_in_training_only_with_bn_frozen():
    """BAM's code: model.train() then fix_bn, so the frozen learner's Dropout trains and its BatchNorm does not."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(2)
    bn.running_mean.fill_(0.5)
    sub = FrozenSubModel(nn.Sequential(nn.Conv2d(2, 2, 1), bn, nn.Dropout2d(0.5)), train_dropout=True)
    x = torch.randn(4, 2, 3, 3)
    sub.eval()
    ref = sub(x)
    sub.train()
    assert sub.module[2].training and not sub.module[1].training
    y = sub(x)
    dropped = (y == 0).all(dim=(2, 3))
    assert dropped.any() and not dropped.all()  # whole channels zeroed, the others scaled by 1 / (1 - p)
    assert torch.allclose(y[~dropped], 2 * ref[~dropped]) and torch.equal(bn.running_mean, torch.full((2,), 0.5))
    sub.eval()
    assert torch.equal(sub(x), ref)


def test_base_learner_features_classify_at_feature_size_or_resized_to_a_grid():
    """SCCANPlus (AENet, PAHNet): base_out = learner(resize(feature 5, grid)); fsseg's default classifies at feature
    size. By hand: relu -> 1x1 conv of the resized feature 5; and the two differ (the ReLU does not commute)."""
    from fsseg.models.bam import BaseLearnerFeatures
    from fsseg.models.ops import resize

    torch.manual_seed(0)
    learner = BaseLearner(6, 3, base_class_ids=[1, 2, 3], bins=(1,), hidden=4)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    feats = BaseLearnerFeatures(learner, "base").eval()
    q, s = {"base": torch.randn(2, 6, 5, 5)}, {"base": torch.randn(2, 1, 6, 5, 5)}
    qf5, _, at_feature = feats(q, s)
    _, _, at_grid = feats(q, s, (8, 8))
    conv = learner.cls[4]
    by_hand = F.conv2d(F.relu(resize(qf5, (8, 8))), conv.weight, conv.bias)
    assert at_feature.shape[-2:] == (5, 5) and torch.allclose(at_grid, by_hand, atol=1e-6)
    assert not torch.allclose(resize(at_feature, (8, 8)), at_grid, atol=1e-3)


def test_bam_recipes_train_the_base_learners_dropout_as_the_reference():
    from fsseg_testing import compose

    for recipe, expected in (("bam_pascal", True), ("bam_coco", True), ("bam_synth", False)):
        cfg = compose(["method=bam", "encoder=resnet50", f"recipe={recipe}", "encoder.weights=none"])
        assert cfg.ensemble.base_dropout is expected, recipe


class GradHead(PriorPrototypeHead):
    """A head that needs autograd at evaluation: the gradient of its prior's sum w.r.t. the detached query tap."""

    needs_autograd_at_eval = True

    def forward(self, query, support, support_mask):
        out = super().forward(query, support, support_mask)
        with torch.enable_grad():
            tap = query["high"].detach().requires_grad_(True)
            (grad,) = torch.autograd.grad((tap**2).sum(), tap)
        out["grad_check"] = (grad - 2 * tap.detach()).abs().amax(dim=(1, 2, 3))  # 0 when autograd ran
        return out


@pytest.mark.parametrize("inference_mode", [True, False])
def test_a_part_needing_autograd_at_eval_gets_it_or_a_clear_error(inference_mode):
    import lightning as L
    from torch.utils.data import DataLoader

    model = FewShotSegmenter(
        CountingEncoder(), lambda tap_channels: GradHead(tap_channels, reduce_dim=8),
        BAMMetaDecoder(dim=8, dilations=(1,)), CrossEntropy(),
    )
    seen = []
    model.decoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0]["grad_check"]))
    batch = {k: v for k, v in _batch().items() if k != B.QUERY_BASE_LABEL}
    batch[B.CLASS_IDX] = torch.tensor([0, 4])  # evaluation: indices of the novel classes
    loader = DataLoader([{k: v[i] for k, v in batch.items()} for i in range(2)], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=inference_mode)  # fmt: skip
    if inference_mode:
        with pytest.raises(ConfigError, match="trainer.inference_mode=false"):
            trainer.test(model, loader, verbose=False)
    else:
        trainer.test(model, loader, verbose=False)
        assert seen and torch.equal(seen[-1], torch.zeros(2))
        assert all(p.grad is None for p in model.parameters())  # no parameter received a gradient
