"""APANet/SCNet class-agnostic branch: the equations on crafted maps, the loss wiring on a tiny segmenter, and
the guarantees (PFENet at lambda = 0, no k-means at evaluation, no NaN, config errors)."""

import math
import warnings
from pathlib import Path

import pytest
import torch
from fsseg_testing import StubEncoder

from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.models import apanet, kmeans
from fsseg.models.apanet import (
    ClassAgnosticBranch,
    agnostic_target,
    expand_prototypes,
    one_hot_regions,
    region_prototypes,
    remove_foreground,
)
from fsseg.models.losses import CrossEntropy, DeepSupervision
from fsseg.models.ops import choose_uniform, mask_to_feature
from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead
from fsseg.models.segmenter import FewShotSegmenter

CONF = Path(__file__).resolve().parents[2] / "conf"


def make_model(lam=None, main_weight=None, ds_weight=None, **branch):
    aux = {"deep_supervision": DeepSupervision(1.0 if ds_weight is None else ds_weight)}
    if lam is not None:
        aux["class_agnostic"] = ClassAgnosticBranch(lambda_=lam, **branch)
    torch.manual_seed(0)
    return FewShotSegmenter(
        encoder=StubEncoder(),
        head=lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=8),
        decoder=FeatureEnrichmentModule(dim=8, bins=(1.0, 0.5)),
        main_loss=CrossEntropy(),
        aux_losses=aux,
        main_loss_weight=(1.0 - (lam or 0.0)) if main_weight is None else main_weight,
        eval_resolution="network",
        num_eval_classes=2,
    )


def make_batch(b=2, k=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    qm = torch.zeros(b, size, size, dtype=torch.long)
    qm[:, 2:6, 3:7] = 1
    qm[:, 0, :] = 255
    sm = torch.zeros(b, k, size, size, dtype=torch.long)
    sm[..., 1:5, 1:5] = 1
    return {
        B.QUERY_IMG: torch.randn(b, 3, size, size, generator=g),
        B.QUERY_MASK: qm,
        B.SUPPORT_IMGS: torch.randn(b, k, 3, size, size, generator=g),
        B.SUPPORT_MASKS: sm,
        B.CLASS_IDX: torch.zeros(b, dtype=torch.long),
    }


def training_loss(model, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        return model.training_step(batch, 0)


# ------------------------------------------------------------------------------------------------ equations
def test_eq5_removes_exactly_the_foreground():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 1], [2, 2, 1, 1]]])  # 1 x 3 x 4 clusters
    qmask = torch.tensor([[[0, 1, 1, 0], [0, 1, 255, 0], [0, 0, 0, 1]]])
    regions = one_hot_regions(labels, 3)
    bg = mask_to_feature((qmask == 0).float(), (3, 4))  # same size: the exact mask
    out = remove_foreground(regions, bg)
    expected = regions * (qmask == 0).float().unsqueeze(1)
    assert torch.equal(out, expected)
    fg = (qmask == 1).unsqueeze(1).expand_as(out)
    assert (out[fg] == 0).all()  # no foreground pixel in any region
    assert torch.equal(out.sum(1)[0] > 0, qmask[0] == 0)  # every background pixel kept, in its own region
    # without 255 the update is literally M_k - M_k n M^q
    qm2 = torch.where(qmask == 255, torch.zeros_like(qmask), qmask)
    m = (qm2 == 1).float().unsqueeze(1)
    assert torch.equal(remove_foreground(regions, 1 - m), regions - regions * m)


def test_eq6_prototypes_are_masked_means():
    feat = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[10.0, 0.0, 10.0], [0.0, 10.0, 0.0]]]])  # 1,2,2,3
    masks = torch.tensor([[[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]], [[0.0] * 3] * 2]])
    protos, area = region_prototypes(feat, masks)
    assert area.tolist() == [[2.0, 4.0, 0.0]]
    hand = torch.tensor([[[1.5, 5.0], [(3 + 4 + 5 + 6) / 4, (10 + 0 + 10 + 0) / 4], [0.0, 0.0]]])
    assert torch.allclose(protos, hand, rtol=1e-3)  # PFENet's MAP: area + 5e-4
    assert torch.allclose(protos[0, :2], hand[0, :2] * area[0, :2, None] / (area[0, :2, None] + 5e-4))


def test_expansion_regions_and_one_negative_on_the_foreground():
    regions = one_hot_regions(torch.tensor([[[0, 0, 1], [2, 2, 1], [0, 2, -1]]]), 3)
    fg = torch.tensor([[[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]])
    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # p_0, p_1, p_2 (D = 2)
    out = expand_prototypes(protos, regions, fg, torch.tensor([2]))  # p_r = p_2
    p0, p1, pr = [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]
    expected = torch.tensor(  # (h, w, D): background -> its region's prototype, foreground and (2, 2) (no region) -> p_r
        [[p0, pr, p1],
         [pr, pr, pr],
         [pr, pr, pr]]
    )
    assert torch.equal(out[0].permute(1, 2, 0), expected)
    out1 = expand_prototypes(protos, regions, fg, torch.tensor([0]))
    assert torch.equal(out1[0, :, fg[0, 0] > 0], protos[0, 0][:, None].expand(2, 3))  # one prototype on all fg
    bgpix = (fg[0, 0] == 0) & (regions[0].sum(0) > 0)
    assert torch.equal(out1[0, :, bgpix], out[0, :, bgpix])  # background keeps its region's prototype


def test_choose_negative_only_valid_regions():
    valid = torch.tensor([[True, False, True], [False, False, True], [False, False, False]])
    u = torch.tensor([0.0, 0.99, 0.5])
    assert choose_uniform(valid, u).tolist() == [0, 2, 0]
    assert choose_uniform(valid[:1], torch.tensor([0.75])).tolist() == [2]
    draws = choose_uniform(valid[:1].expand(1000, 3), torch.rand(1000, generator=torch.Generator().manual_seed(0)))
    assert set(draws.tolist()) == {0, 2} and 400 < (draws == 0).sum() < 600


def test_target_is_one_minus_mask_with_255_kept():
    m = torch.tensor([[[0, 1, 255], [1, 0, 0]], [[1, 1, 1], [0, 255, 0]]])
    assert agnostic_target(m).tolist() == [[[1, 0, 255], [0, 1, 1]], [[0, 0, 0], [1, 255, 1]]]
    assert agnostic_target(m, torch.tensor([True, False])).tolist()[1] == [[255] * 3] * 2


# ------------------------------------------------------------------------------------------------ the branch
def test_guidance_on_the_segmenter():
    model = make_model(0.5, n=3)
    batch = make_batch(b=2, k=2)
    branch = model.aux_losses["class_agnostic"]
    model.eval()
    with torch.no_grad():
        out = model(batch)
        guidance, target = branch.class_agnostic_guidance(out, batch)
    proto, q = guidance["prototype"], out["query_feat"]
    assert proto.shape == q.shape and guidance["prior"].shape == out["prior"].shape
    assert 0.0 <= guidance["prior"].min() and guidance["prior"].max() <= 1.0
    fg = batch[B.QUERY_MASK] == 1
    bgm = batch[B.QUERY_MASK] == 0
    for i in range(2):
        pf = proto[i][:, fg[i]]
        assert torch.allclose(pf, pf[:, :1].expand_as(pf))  # one prototype on every foreground pixel
        # background pixels carry the masked mean of query_feat over their (foreground-removed) region
        vals = proto[i][:, bgm[i]].T.unique(dim=0)
        assert 1 <= len(vals) <= 3
        for v in vals:
            region = bgm[i] & (proto[i] == v[:, None, None]).all(0)
            mean = q[i][:, region].mean(1)
            assert torch.allclose(v, mean * region.sum() / (region.sum() + 5e-4), atol=1e-5)
        assert any(torch.allclose(pf[:, 0], v) for v in vals)  # the negative is one of the region prototypes
    assert torch.equal(target, agnostic_target(batch[B.QUERY_MASK]))


@pytest.mark.parametrize(
    "opts",
    [
        dict(n=1),
        dict(n=4, cluster_on="background"),
        dict(partition="spp", spp_bins=2),
        dict(source="support", n=1),
        dict(prior="query_prior"),
        dict(prior="zeros", deep_supervision=False),
    ],
)
def test_variants_give_finite_losses_and_gradients(opts):
    model = make_model(0.5, **opts)
    batch = make_batch(b=2, k=2)
    torch.manual_seed(0)
    out = model(batch)
    terms = model.aux_losses["class_agnostic"](out, batch, model)
    assert set(terms) == ({"ce", "deep_supervision"} if opts.get("deep_supervision", True) else {"ce"})
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    sum(terms.values()).backward()
    assert model.decoder.cls[-1].weight.grad.abs().sum() > 0
    assert model.head.down_query[0].weight.grad.abs().sum() > 0  # the prototypes come from query_feat


def test_support_source_prototype_is_the_support_background_mean():
    model = make_model(0.5, source="support", n=1, prior="zeros")
    batch = make_batch(b=1, k=2)
    model.eval()
    with torch.no_grad():
        out = model(batch)
        guidance, _ = model.aux_losses["class_agnostic"].class_agnostic_guidance(out, batch)
    sf = out["support_feat"][0]  # K, D, h, w
    bg = (batch[B.SUPPORT_MASKS][0] == 0).float().unsqueeze(1)
    expected = (sf * bg).sum((0, 2, 3)) / (bg.sum() + 5e-4)
    proto = guidance["prototype"][0]
    assert torch.allclose(proto, expected[:, None, None].expand_as(proto), atol=1e-6)
    assert (guidance["prior"] == 0).all()


def test_lambda_zero_is_pfenet_exactly():
    batch = make_batch(b=2, k=1)
    base, ours = make_model(None), make_model(0.0, n=3)
    assert ours.main_loss_weight == 1.0
    torch.manual_seed(5)
    l0 = training_loss(base, batch)
    torch.manual_seed(5)
    l1 = training_loss(ours, batch)
    assert torch.equal(l0, l1)
    # and the same training trajectory: two SGD steps give identical weights
    for m in (base, ours):
        torch.manual_seed(7)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        for step in range(2):
            opt.zero_grad()
            training_loss(m, make_batch(seed=step)).backward()
            opt.step()
    for (n0, p0), (n1, p1) in zip(base.named_parameters(), ours.named_parameters()):
        assert n0 == n1 and torch.equal(p0, p1)


def test_loss_is_eq9():
    lam = 0.3
    model = make_model(lam, ds_weight=1 - lam, n=2)
    batch = make_batch(b=2)
    branch = model.aux_losses["class_agnostic"]
    state = branch.generator.get_state()
    torch.manual_seed(1)
    total = training_loss(model, batch)
    branch.generator.set_state(state)
    torch.manual_seed(1)
    out = model(batch)
    l1 = CrossEntropy()(out["logits"], batch[B.QUERY_MASK]) + DeepSupervision()(out, batch, model)["deep_supervision"]
    terms = branch(out, batch, model)
    l2 = terms["ce"] + terms["deep_supervision"]
    assert torch.allclose(total, (1 - lam) * l1 + lam * l2, rtol=1e-6)


def test_kmeans_never_runs_at_evaluation(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("k-means called")

    monkeypatch.setattr(apanet, "cosine_kmeans", boom)
    monkeypatch.setattr(kmeans, "cosine_kmeans", boom)
    model = make_model(0.5, n=3)
    batch = make_batch(b=2)
    model.eval()
    model.validation_step(batch, 0)
    model.test_step(batch, 0)
    assert model.predict(batch).shape == (2, 2, 8, 8)
    model.train()
    with pytest.raises(AssertionError, match="k-means called"):  # the patch is live: training does call it
        training_loss(model, batch)


def test_empty_background_contributes_no_loss_and_never_nan():
    model = make_model(0.5, n=1, prior="zeros")
    model.eval()  # no dropout: per-image results comparable across batches
    branch = model.aux_losses["class_agnostic"]
    normal = make_batch(b=1, seed=3)
    full = make_batch(b=1, seed=4)
    full[B.QUERY_MASK][:] = 1  # the object fills the crop: no background after Eq. 5
    ignored = make_batch(b=1, seed=5)
    ignored[B.QUERY_MASK][:] = 255
    both = {k: torch.cat([full[k], normal[k], ignored[k]]) for k in normal}
    alone = branch(model(normal), normal, model)
    mixed = branch(model(both), both, model)
    for key in alone:
        assert torch.allclose(alone[key], mixed[key], rtol=1e-5)
    empty = {k: torch.cat([full[k], ignored[k]]) for k in normal}
    terms = branch(model(empty), empty, model)
    total = sum(terms.values())
    assert total.item() == 0.0 and not math.isnan(total.item())
    total.backward()  # a graph is still there, with zero gradients


def test_main_loss_weight_must_follow_lambda():
    model = make_model(0.5, main_weight=1.0, n=2)
    with pytest.raises(ConfigError, match="main_loss_weight"):
        training_loss(model, make_batch())
    unchecked = make_model(0.5, main_weight=1.0, n=2, check_main_loss_weight=False)
    assert torch.isfinite(training_loss(unchecked, make_batch()))


def test_n_zero_is_the_baseline():
    branch = ClassAgnosticBranch(lambda_=0.0, n=0)
    model = make_model(None)
    out = model(make_batch())
    assert all(v.item() == 0.0 for v in branch(out, make_batch(), model).values())


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(n=-1), "n"),
        (dict(n=2.5), "n"),
        (dict(n="3"), "n"),
        (dict(lambda_=-0.1), "lambda_"),
        (dict(lambda_=1.5), "lambda_"),
        (dict(lambda_=float("nan")), "lambda_"),
        (dict(lambda_="0.5"), "lambda_"),
        (dict(partition="spp", spp_bins=0), "spp_bins"),
        (dict(spp_bins=2.0), "spp_bins"),
        (dict(partition="grid"), "partition"),
        (dict(source="both"), "source"),
        (dict(prior="max"), "prior"),
        (dict(cluster_on="fg"), "cluster_on"),
        (dict(kmeans_iters=0), "kmeans_iters"),
        (dict(n=0, lambda_=0.5), "n=0"),
        (dict(source="support", n=3), "source=support"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_config_errors_name_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        ClassAgnosticBranch(**kwargs)


def test_generator_state_is_checkpointed():
    a = ClassAgnosticBranch(seed=3)
    torch.rand(5, generator=a.generator)
    state = a.state_dict()
    b = ClassAgnosticBranch(seed=99)
    b.load_state_dict(state)
    assert torch.equal(torch.rand(4, generator=a.generator), torch.rand(4, generator=b.generator))


def test_method_configs_tie_lambda():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for method in ("apanet", "scnet"):
            cfg = compose("train", overrides=[f"method={method}", "apanet_lambda=0.3", "seed=4"])
            assert math.isclose(cfg.model.main_loss_weight, 0.7)
            aux = instantiate(cfg.aux)
            assert math.isclose(aux["deep_supervision"].weight, 0.7)
            assert aux["class_agnostic"].weight == 0.3 and aux["class_agnostic"].n == 3
            seeded = torch.Generator().manual_seed(4).get_state()
            assert torch.equal(aux["class_agnostic"].generator.get_state(), seeded)
        cfg = compose("train", overrides=["method=apanet", "apanet_lambda=0"])
        assert cfg.model.main_loss_weight == 1.0 and cfg.aux.deep_supervision.weight == 1.0
        for bad in ("2", "-0.5", "abc"):
            cfg = compose("train", overrides=["method=apanet", f"apanet_lambda={bad}"])
            with pytest.raises(Exception, match="apanet_lambda"):  # the resolver names the key
                _ = cfg.model.main_loss_weight
