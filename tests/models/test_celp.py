"""CELP: latent prototype sampling against loop computations on crafted maps, the pseudo-mask's regions, the
contrast branch on a tiny segmenter, k-of-K voting, and the guarantees (PFENet at weight 0, no sampling at
evaluation, no NaN without candidates, chunking exact, config errors)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from fsseg_testing import StubEncoder, compose, tiny_overrides

from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.models import celp
from fsseg.models.celp import (
    LatentContrast,
    label_regions,
    latent_prior,
    latent_prototype,
    pseudo_mask,
    sample_latent_regions,
    similar_counts,
)
from fsseg.models.losses import CrossEntropy, DeepSupervision
from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead
from fsseg.models.segmenter import FewShotSegmenter


def make_model(contrast=None, **model_kw):
    aux = {"deep_supervision": DeepSupervision(1.0)}
    if contrast is not None:
        aux["latent_contrast"] = LatentContrast(**{"delta": 0.8, "sigma": 3, **contrast})
    torch.manual_seed(0)
    return FewShotSegmenter(
        encoder=StubEncoder(),
        head=lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=8, shared_reduction=True),
        decoder=FeatureEnrichmentModule(dim=8, bins=(1.0, 0.5)),
        main_loss=CrossEntropy(),
        aux_losses=aux,
        eval_resolution="network",
        num_eval_classes=2,
        **model_kw,
    )


def make_batch(b=2, k=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    qm = torch.zeros(b, size, size, dtype=torch.long)
    qm[:, 2:5, 3:6] = 1
    base = qm * 3  # the target class (id 3) is a base class in training
    base[:, 6:, 0:3] = 7  # another base-class object
    qm[:, 0, :] = 255
    base[:, 0, :] = 255
    sm = torch.zeros(b, k, size, size, dtype=torch.long)
    sm[..., 1:5, 1:5] = 1
    return {
        B.QUERY_IMG: torch.randn(b, 3, size, size, generator=g),
        B.QUERY_MASK: qm,
        B.SUPPORT_IMGS: torch.randn(b, k, 3, size, size, generator=g),
        B.SUPPORT_MASKS: sm,
        B.CLASS_IDX: torch.zeros(b, dtype=torch.long),
        B.QUERY_BASE_LABEL: base,
    }


def training_loss(model, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        return model.training_step(batch, 0)


def crafted_features(b=2, h=4, w=5, seed=0):
    """Each position takes one of four directions (+ small noise) or is zero: cosines are ~0, ~0.71 or ~1."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0], [0, 0, 0]])
    idx = torch.randint(0, 5, (b, h, w), generator=g)
    feat = palette[idx] + 0.02 * torch.rand(b, h, w, 3, generator=g) * (idx < 4).unsqueeze(-1)
    return feat.permute(0, 3, 1, 2).contiguous()  # B, 3, h, w


def loop_similarity(feat):
    """D(i, j) of Eq. 1 pixel by pixel: (B, N, N)."""
    b, _c, h, w = feat.shape
    f = feat.flatten(2)
    d = torch.zeros(b, h * w, h * w)
    for n in range(b):
        for i in range(h * w):
            for j in range(h * w):
                d[n, i, j] = F.cosine_similarity(f[n, :, i], f[n, :, j], dim=0)
    return d


# ------------------------------------------------------------------------------------------------ equations
def test_counts_and_candidates_match_a_loop():
    feat = crafted_features()
    g = torch.Generator().manual_seed(1)
    unlabelled = torch.rand(2, 20, generator=g) > 0.3
    delta, sigma = 0.8, 3
    d = loop_similarity(feat)
    counts = torch.zeros(2, 20, dtype=torch.long)
    for n in range(2):
        for i in range(20):
            counts[n, i] = sum(int(d[n, i, j] > delta and unlabelled[n, j]) for j in range(20))  # Eq. 2
    sample = sample_latent_regions(feat, unlabelled, delta, sigma, torch.tensor([0.3, 0.9]))
    assert torch.equal(sample.counts, counts)
    cands = [[i for i in range(20) if counts[n, i] >= sigma and unlabelled[n, i]] for n in range(2)]  # Eq. 3
    assert [torch.nonzero(sample.candidates[n]).flatten().tolist() for n in range(2)] == cands
    assert all(cands) and sample.keep.all()
    for n, u in enumerate([0.3, 0.9]):
        i_star = cands[n][int(u * len(cands[n]))]  # uniform draw among P
        assert sample.anchor[n].item() == i_star
        fg = [bool(d[n, i_star, j] > delta and unlabelled[n, j]) for j in range(20)]  # Eq. 4
        assert sample.foreground[n].tolist() == fg and fg[i_star]


def test_chunked_counts_equal_unchunked():
    g = torch.Generator().manual_seed(0)
    feat = F.normalize(torch.randn(3, 63, 16, generator=g), dim=2)
    unlabelled = torch.rand(3, 63, generator=g) > 0.2
    full = similar_counts(feat, unlabelled, 0.1, None)
    assert full.sum() > 0
    for chunk in (1, 5, 62, 63, 64, 1000):
        assert torch.equal(similar_counts(feat, unlabelled, 0.1, chunk), full)


def test_pseudo_mask_regions_are_eqs_4_to_6():
    labelled = torch.zeros(1, 4, 4, dtype=torch.bool)
    labelled[0, :2, :2] = True
    ignored = torch.zeros_like(labelled)
    ignored[0, 3, 3] = True
    fg = torch.zeros(1, 1, 4, 4)
    fg[0, 0, 1:3, 1:4] = 1  # the similar region overlaps the labelled block at (1, 1)
    fg[0, 0, 3, 3] = 1  # and covers an ignored pixel
    target = pseudo_mask(fg, labelled, ignored, torch.tensor([True]))
    expected = torch.full((4, 4), 255)
    expected[1:3, 1:4] = 1  # M^1
    expected[:2, :2] = 0  # labelled objects: background, never foreground
    assert target[0].tolist() == expected.tolist()  # 255 elsewhere, ignored pixels included (Eq. 5)
    assert (pseudo_mask(fg, labelled, ignored, torch.tensor([False])) == 255).all()  # no candidate: no loss
    # at a larger label size the foreground is the bilinear upsampling thresholded at 0.25
    big_lab = torch.zeros(1, 7, 7, dtype=torch.bool)
    up = pseudo_mask(fg, big_lab, big_lab, torch.tensor([True]))
    ref = F.interpolate(fg, size=(7, 7), mode="bilinear", align_corners=True)[:, 0] >= 0.25
    assert torch.equal(up == 1, ref) and torch.equal(up == 255, ~ref)


def test_label_regions():
    qm = torch.tensor([[[0, 1, 255, 0]]])
    base = torch.tensor([[[2, 3, 255, 0]]])
    labelled, ignored = label_regions(qm, base)
    assert labelled.tolist() == [[[True, True, False, False]]]
    assert ignored.tolist() == [[[False, False, True, False]]]


def test_latent_prototype_is_the_masked_mean():
    feat = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).view(2, 3, 2, 3)
    mask = torch.tensor([[[[1.0, 0, 1], [0, 0, 1]]], [[[0.0, 0, 0], [0, 0, 0]]]])
    proto = latent_prototype(feat, mask)
    assert proto.shape == (2, 3, 1, 1)
    hand = torch.stack([feat[0, c][mask[0, 0] > 0].mean() for c in range(3)])
    assert torch.allclose(proto[0, :, 0, 0], hand * 3 / (3 + 5e-4))  # PFENet's / the code's area + 5e-4
    assert torch.equal(proto[1], torch.zeros(3, 1, 1))  # empty region: 0, no NaN


def test_prior_is_minmax_cosine_and_eq8_masking():
    g = torch.Generator().manual_seed(0)
    feat = torch.rand(1, 4, 3, 3, generator=g)
    proto = torch.rand(1, 4, 1, 1, generator=g)
    prior = latent_prior(feat, proto)
    cos = F.cosine_similarity(feat, proto, dim=1)[:, None]
    hand = (cos - cos.min()) / (cos.max() - cos.min())
    assert torch.allclose(prior, hand, atol=1e-5)
    keep = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    keep[0, 0, 0, 0] = False
    masked = latent_prior(feat, proto, keep)
    assert masked[0, 0, 0, 0] == 0  # labelled pixel: cos(v_l, 0) = 0, the minimum of non-negative features
    assert torch.allclose(masked[keep], (cos / (cos[keep].max() + 1e-7))[keep], atol=1e-5)


# ------------------------------------------------------------------------------------------------ the branch
def test_contrast_guidance_on_the_segmenter():
    model = make_model({})
    batch = make_batch(b=3)
    branch = model.aux_losses["latent_contrast"]
    model.eval()
    with torch.no_grad():
        out = model(batch)
        guidance, target, keep = branch.contrast_guidance(out, batch)
    q = out["query_feat"]
    fg = guidance["support_mask_feat"][:, 0]  # B, 1, h, w (label size = feature size here)
    assert keep.all() and guidance["support_feat"].shape == (3, 1, *q.shape[1:])
    assert torch.equal(guidance["support_feat"][:, 0], q)
    labelled, ignored = label_regions(batch[B.QUERY_MASK], batch[B.QUERY_BASE_LABEL])
    for i in range(3):
        region = fg[i, 0] > 0
        mean = q[i][:, region].mean(1)
        n = region.sum()
        assert torch.allclose(guidance["prototype"][i, :, 0, 0], mean * n / (n + 5e-4), atol=1e-6)  # Eq. 7
        assert not (region & (labelled[i] | ignored[i])).any()
    assert torch.equal(target == 1, (fg[:, 0] > 0) & ~labelled & ~ignored)  # Eqs. 4-6
    assert torch.equal(target == 0, labelled) and torch.equal(target == 255, ~(fg[:, 0] > 0) & ~labelled)
    masked_q = q * (~labelled)[:, None].to(q.dtype)  # Eq. 8 (the default): F^m (.) M', zero on labelled objects
    cos = F.cosine_similarity(masked_q, guidance["prototype"], dim=1)[:, None]
    lo, hi = cos.amin((2, 3), keepdim=True), cos.amax((2, 3), keepdim=True)
    assert torch.allclose(guidance["prior"], (cos - lo) / (hi - lo), atol=1e-5)  # Eqs. 8-9
    for key in ("query_feat", "logits"):  # everything else is the main pass's guidance
        assert guidance[key] is out[key]


def test_labelled_pixels_are_never_foreground():
    model = make_model({"delta": 0.0, "sigma": 1})  # a permissive threshold: big similar regions
    branch = model.aux_losses["latent_contrast"]
    model.eval()
    for seed in range(5):
        batch = make_batch(b=2, size=16, seed=seed)
        batch[B.QUERY_BASE_LABEL][:, 8:, 8:] = 5
        with torch.no_grad():
            _, target, keep = branch.contrast_guidance(model(batch), batch)
        labelled, _ = label_regions(batch[B.QUERY_MASK], batch[B.QUERY_BASE_LABEL])
        assert keep.all() and (target == 1).any()
        assert (target[labelled] == 0).all() and not ((target == 1) & labelled).any()


def test_losses_are_finite_with_gradients():
    for opts in ({}, {"loss": "dice"}, {"deep_supervision": True}, {"mask_prior": True}, {"chunk_size": 5}):
        model = make_model(opts)
        batch = make_batch()
        out = model(batch)
        terms = model.aux_losses["latent_contrast"](out, batch, model)
        assert set(terms) == ({"contrast", "deep_supervision"} if opts.get("deep_supervision") else {"contrast"})
        assert all(torch.isfinite(v) and v > 0 for v in terms.values()), (opts, terms)
        sum(terms.values()).backward()
        assert model.decoder.cls[-1].weight.grad.abs().sum() > 0  # the shared decoder learns from the branch
        assert model.head.down_query[0].weight.grad.abs().sum() > 0


def test_chunked_branch_equals_unchunked():
    terms = []
    for chunk in (None, 7):
        model = make_model({"chunk_size": chunk, "seed": 4})
        model.eval()
        batch = make_batch(b=2)
        with torch.no_grad():
            out = model(batch)
            terms.append(model.aux_losses["latent_contrast"].contrast_guidance(out, batch)[1])
    assert torch.equal(terms[0], terms[1])


def test_no_candidate_gives_no_loss_and_never_nan(monkeypatch):
    model = make_model({})
    model.eval()
    branch = model.aux_losses["latent_contrast"]
    monkeypatch.setattr(branch, "_uniforms", lambda b, device: torch.full((b,), 0.4, dtype=torch.float64))
    normal = make_batch(b=1, seed=3)
    labelled = make_batch(b=1, seed=4)
    labelled[B.QUERY_BASE_LABEL][:] = 9  # every pixel is a known object: no candidate
    ignored = make_batch(b=1, seed=5)
    ignored[B.QUERY_MASK][:] = 255
    ignored[B.QUERY_BASE_LABEL][:] = 255
    mixed = {k: torch.cat([labelled[k], normal[k], ignored[k]]) for k in normal}
    alone = branch(model(normal), normal, model)["contrast"]
    both = branch(model(mixed), mixed, model)["contrast"]
    assert alone > 0 and torch.allclose(alone, both, rtol=1e-5)
    assert not branch.contrast_guidance(model(mixed), mixed)[2][[0, 2]].any()
    empty = {k: torch.cat([labelled[k], ignored[k]]) for k in normal}
    for opts in ({}, {"loss": "dice"}):
        model2 = make_model(opts)
        total = model2.aux_losses["latent_contrast"](model2(empty), empty, model2)["contrast"]
        assert total.item() == 0.0 and not math.isnan(total.item())
    isolated = make_model({"sigma": 10**6})  # no pixel has that many similar pixels: no candidate anywhere
    batch = make_batch()
    loss = isolated.aux_losses["latent_contrast"](isolated(batch), batch, isolated)["contrast"]
    assert loss.item() == 0.0
    assert torch.isfinite(training_loss(isolated, batch))


def test_weight_zero_is_pfenet_exactly(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("sampler called")

    monkeypatch.setattr(celp, "sample_latent_regions", boom)
    batch = make_batch(b=2)
    base, ours = make_model(None), make_model({"weight": 0.0})
    torch.manual_seed(5)
    l0 = training_loss(base, batch)
    torch.manual_seed(5)
    l1 = training_loss(ours, batch)
    assert torch.equal(l0, l1)
    for m in (base, ours):  # and the same training trajectory
        torch.manual_seed(7)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        for step in range(2):
            opt.zero_grad()
            training_loss(m, make_batch(seed=step)).backward()
            opt.step()
    for (n0, p0), (n1, p1) in zip(base.named_parameters(), ours.named_parameters()):
        assert n0 == n1 and torch.equal(p0, p1)


def test_total_loss_is_main_plus_aux_plus_weighted_contrast():
    model = make_model({"weight": 0.1})
    batch = make_batch()
    branch = model.aux_losses["latent_contrast"]
    state = branch.generator.get_state()
    torch.manual_seed(1)
    total = training_loss(model, batch)
    branch.generator.set_state(state)
    torch.manual_seed(1)
    out = model(batch)
    main = CrossEntropy()(out["logits"], batch[B.QUERY_MASK])
    aux = DeepSupervision()(out, batch, model)["deep_supervision"]
    contrast = branch(out, batch, model)["contrast"]
    assert torch.allclose(total, main + aux + 0.1 * contrast, rtol=1e-6)


def test_sampler_never_runs_at_evaluation(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("sampler called")

    monkeypatch.setattr(celp, "sample_latent_regions", boom)
    for kw in ({}, {"shot_fusion": "vote", "vote_k": 2}):
        model = make_model({}, **kw)
        batch = make_batch(b=2, k=2)
        model.eval()
        model.validation_step(batch, 0)
        model.test_step(batch, 0)
        assert model.predict(batch).shape == (2, 2, 8, 8)
    model.train()
    with pytest.raises(AssertionError, match="sampler called"):  # the patch is live: training does call it
        training_loss(model, batch)


def test_generator_state_is_checkpointed():
    a = LatentContrast(seed=3)
    torch.rand(5, generator=a.generator)
    b = LatentContrast(seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(torch.rand(4, generator=a.generator), torch.rand(4, generator=b.generator))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(delta=1.2), r"aux\.latent_contrast\.delta must be in \(-1, 1\); got 1\.2"),
        (dict(delta=-1.0), "delta"),
        (dict(delta=1), "delta"),
        (dict(delta=float("nan")), "delta"),
        (dict(delta="0.65"), "delta"),
        (dict(sigma=0), r"aux\.latent_contrast\.sigma must be an integer >= 1; got 0"),
        (dict(sigma=2.5), "sigma"),
        (dict(sigma=True), "sigma"),
        (dict(weight=-0.1), r"aux\.latent_contrast\.weight must be in \[0, inf\)"),
        (dict(label_threshold=1.0), "label_threshold"),
        (dict(fg_threshold=0.0), "fg_threshold"),
        (dict(loss="bce"), "loss"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_config_errors_name_the_option(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LatentContrast(**kwargs)


# ------------------------------------------------------------------------------------------------ k-of-K voting
def test_vote_logits_on_a_hand_example():
    # 5 shots, 1 x 4 pixels; per-shot foreground decisions (1 = fg logit above bg):
    fg = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]])  # votes 5, 2, 1, 0
    shot_logits = torch.stack([torch.zeros(5, 1, 4), fg.float()[:, None] * 2 - 1], dim=1)[None]  # 1, 5, 2, 1, 4
    expected = {1: [1, 1, 1, 0], 2: [1, 1, 0, 0], 3: [1, 0, 0, 0], 4: [1, 0, 0, 0], 5: [1, 0, 0, 0]}
    for k, decision in expected.items():
        model = make_model(None, shot_fusion="vote", vote_k=k)
        logits = model.vote_logits(shot_logits)
        assert logits.shape == (1, 2, 1, 4)
        assert logits.argmax(1)[0, 0].tolist() == decision
        assert logits[0, 1, 0].tolist() == [5 - k + 0.5, 2 - k + 0.5, 1 - k + 0.5, -k + 0.5]
        assert (logits[:, 0] == 0).all()
    with pytest.raises(ConfigError, match="vote_k"):
        make_model(None, shot_fusion="vote", vote_k=6).vote_logits(shot_logits)


def test_voting_folds_the_shots_into_one_pass():
    model = make_model(None, shot_fusion="vote", vote_k=2)
    model.eval()
    batch = make_batch(b=2, k=3)
    batch[B.SUPPORT_MASKS][:, 1, :, :4] = 1  # different supports: different 1-shot predictions
    batch[B.SUPPORT_MASKS][:, 2] = 0
    batch[B.SUPPORT_MASKS][:, 2, 4:, 4:] = 1
    shots = model.shot_logits(batch)
    one_shot = make_model(None)
    one_shot.load_state_dict(model.state_dict())
    one_shot.eval()
    votes = torch.zeros(2, 8, 8, dtype=torch.long)
    for j in range(3):  # the reference's K forward passes, one support each
        single = {**batch, B.SUPPORT_IMGS: batch[B.SUPPORT_IMGS][:, j : j + 1],
                  B.SUPPORT_MASKS: batch[B.SUPPORT_MASKS][:, j : j + 1]}  # fmt: skip
        logits = one_shot.predict(single)
        assert torch.allclose(shots[:, j], logits, atol=1e-5)
        votes += logits.argmax(1)
    assert torch.equal(model.predict(batch).argmax(1), (votes >= 2).long())
    model.validation_step(batch, 0)  # scoring path
    assert model.val_iou.compute()["episodes"] == 2


def test_segmenter_voting_config_errors():
    with pytest.raises(ConfigError, match="shot_fusion"):
        make_model(None, shot_fusion="max")
    with pytest.raises(ConfigError, match="vote_k"):
        make_model(None, shot_fusion="vote")
    with pytest.raises(ConfigError, match="vote_k"):
        make_model(None, shot_fusion="vote", vote_k=0)
    model = make_model(None, shot_fusion="vote", vote_k=3)
    model.eval()
    with pytest.raises(ConfigError, match=r"vote_k must be in \[1, shots\]; got vote_k=3 with 2 shot"):
        model.validation_step(make_batch(k=2), 0)  # checked at the first evaluation batch


# ------------------------------------------------------------------------------------------------ configs
def test_method_config_and_a_training_step():
    from hydra.utils import instantiate

    cfg = compose(["method=celp", "encoder.weights=none", "head.reduce_dim=16", "seed=4"])
    assert cfg.method_name == "celp" and cfg.head.shared_reduction
    assert cfg.aux.latent_contrast.weight == 0.1 and cfg.aux.deep_supervision.weight == 1.0
    model = instantiate(cfg.model)
    branch = model.aux_losses["latent_contrast"]
    assert (branch.delta, branch.sigma, branch.loss) == (0.65, 11, "ce")
    assert torch.equal(branch.generator.get_state(), torch.Generator().manual_seed(4).get_state())
    assert model.head.down_support is model.head.down_query
    model.train()
    batch = make_batch(b=2, size=64)
    assert branch(model(batch), batch, model)["contrast"] > 0  # candidates found on the 8 x 8 feature map
    loss = training_loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_fast_dev_run_of_celp_with_voting(synth_root, tmp_path):
    from fsseg.cli.train import run

    over = tiny_overrides(synth_root, tmp_path / "cache", experiment="celp_effl0_synth", debug="fdr",
                          **{"model.shot_fusion": "vote", "model.vote_k": 1})  # fmt: skip
    cfg = compose(over)
    assert cfg.method_name == "celp"
    metrics = run(cfg, tmp_path / "run")
    assert 0.0 <= metrics["miou"] <= 1.0


def test_celp_on_cyctr_uses_the_query_as_its_own_support():
    """method=celp_cyctr: CyCTR's Dice main loss and support-mask aux plus CELP's CE contrast; the contrast pass runs
    the SAME transformer decoder with the query's own features as support tokens (the pseudo-mask as their mask)."""
    from hydra.utils import instantiate

    cfg = compose(["method=celp_cyctr", "encoder.weights=none", "head.reduce_dim=16", "seed=4"])
    assert cfg.method_name == "celp_cyctr" and set(cfg.aux) == {"support_mask", "latent_contrast"}
    assert cfg.aux.latent_contrast.loss == "ce" and cfg.loss.squared  # contrast CE, main weighted Dice
    model = instantiate(cfg.model)
    model.train()
    batch = make_batch(b=2, size=64)
    out = model(batch)
    branch = model.aux_losses["latent_contrast"]
    guidance, _target, keep = branch.contrast_guidance(out, batch)
    assert torch.equal(guidance["support_feat"][:, 0], out["query_feat"]) and keep.any()
    calls = []
    model.decoder.register_forward_hook(lambda mod, args, res: calls.append(args[0]))
    terms = branch(out, batch, model)
    assert len(calls) == 1 and calls[0]["support_feat"].shape[1] == 1  # one decoder pass, one (self-)support
    assert torch.isfinite(terms["contrast"]) and terms["contrast"] > 0
    loss = training_loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("decoder.transformer."))


# ------------------------------------------------------------------------------------------------ CELP on CyCTR: the reference's forms
@pytest.mark.parametrize(
    ("overrides", "reference"),
    [
        (["method=celp_cyctr", "encoder=resnet50", "recipe=celp_cyctr_pascal"], True),
        (["method=celp_cyctr", "encoder=resnet101", "recipe=celp_cyctr_coco"], True),
        (["method=celp_cyctr", "recipe=cyctr_synth"], False),  # the embedded recipe keeps fsseg's forms
        (["method=cyctr", "encoder=resnet50", "recipe=cyctr_pascal"], False),
    ],
)
def test_celp_on_cyctr_paper_recipes_use_the_reference_forms(overrides, reference):
    cfg = compose([*overrides, "encoder.weights=none"])
    assert cfg.head.shared_reduction is reference
    assert cfg.loss.channel_reduction == ("mean" if reference else "sum")
    if "latent_contrast" in cfg.aux:
        assert cfg.aux.latent_contrast.token_mask == ("pseudo_mask" if reference else "foreground")


def _celp_cyctr(*overrides):
    from hydra.utils import instantiate

    cfg = compose(["method=celp_cyctr", "encoder.weights=none", "head.reduce_dim=16", "seed=4", *overrides])
    return instantiate(cfg.model)


def test_celp_on_cyctr_shared_reduction_is_one_module():
    """head.shared_reduction=true (CELPNet's one adjust_feature): the query and support reductions are the same
    module with the same parameters, and the model has exactly one reduction's parameters fewer."""
    from fsseg.models.segmenter import count_parameters

    separate, shared = _celp_cyctr(), _celp_cyctr("head.shared_reduction=true")
    assert separate.head.down_support is not separate.head.down_query
    assert shared.head.down_support is shared.head.down_query
    q_params = list(shared.head.down_query.parameters())
    assert all(a is b for a, b in zip(q_params, shared.head.down_support.parameters(), strict=True))
    one_reduction = sum(p.numel() for p in separate.head.down_support.parameters())
    assert one_reduction == 16 * shared.encoder.tap_channels["mid"]  # 1x1 conv, no bias
    assert count_parameters(separate) - count_parameters(shared) == one_reduction
    shared.train()
    loss = training_loss(shared, make_batch(b=2, size=64))
    loss.backward()
    assert torch.isfinite(loss) and shared.head.down_query[0].weight.grad is not None


def _contrast_pass(token_mask):
    """The contrast pass of a celp_cyctr model: its guidance and target, the transformer's (args, kwargs) and the
    cross-attentions' args."""
    model = _celp_cyctr(f"aux.latent_contrast.token_mask={token_mask}")
    model.train()
    batch = make_batch(b=2, size=64)
    out = model(batch)
    branch = model.aux_losses["latent_contrast"]
    state = branch.generator.get_state()
    guidance, target, keep = branch.contrast_guidance(out, batch)
    branch.generator.set_state(state)  # the pass below draws the same anchors
    calls, cross = [], []
    model.decoder.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    for block in model.decoder.transformer.blocks:
        block.cross_attn.register_forward_pre_hook(lambda mod, args: cross.append(args))
    terms = branch(out, batch, model)
    assert torch.isfinite(terms["contrast"]) and keep.any() and len(calls) == 1
    return out, guidance, target, calls[0], cross


def test_contrast_pass_token_sampler_sees_the_pseudo_masks_255_regions():
    """token_mask=pseudo_mask (CELPNet hands the transformer y_temp with its 255 regions): the contrast guidance
    carries [M' = 255] at feature size, the sampler keeps those tokens as background and the cross-attention gets
    their flags at the sampled positions; token_mask=foreground (default) passes no such map (M^1, all else bg)."""
    _, guidance, _, (_, kwargs), cross = _contrast_pass("foreground")
    assert kwargs["ignore"] is None and "support_ignore_feat" not in guidance
    assert all(a[3] is None for a in cross)

    out, guidance, target, (args, kwargs), cross = _contrast_pass("pseudo_mask")
    labels, ignore = args[2], kwargs["ignore"]
    h, w = out["query_feat"].shape[-2:]
    expected = F.interpolate((target == 255).float()[:, None], (h, w), mode="bilinear", align_corners=True)
    assert torch.equal(guidance["support_ignore_feat"][:, 0], expected)
    assert torch.equal(ignore, (expected >= 0.5).flatten(1))
    assert ignore.any() and (~ignore).any()  # 255 regions beside labelled and pseudo-foreground tokens
    fg = guidance["support_mask_feat"].flatten(1) >= 0.5
    assert torch.equal(labels, fg & ~ignore) and labels.any()  # 255 tokens are background (the reference: == 1)
    k_labels, k_ignore = cross[0][2], cross[0][3]  # the sampled tokens: some are 255 ones, all of those background
    assert k_ignore is not None and k_ignore.any() and not (k_labels & k_ignore).any()


def test_batched_decoder_pass_carries_the_ignore_map_of_the_contrast_share_only():
    """model.batched_aux_decoder: the main pass has no ignore map, the contrast pass has one; the merged pass
    gives the main share zeros (nothing ignored) and the contrast share its 255 regions."""
    model = _celp_cyctr("aux.latent_contrast.token_mask=pseudo_mask", "model.batched_aux_decoder=true")
    model.train()
    calls = []
    model.decoder.transformer.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs), with_kwargs=True)
    loss = training_loss(model, make_batch(b=2, size=64))
    assert torch.isfinite(loss) and len(calls) == 1
    ignore = calls[0]["ignore"]
    assert ignore.shape[0] == 4 and not ignore[:2].any() and ignore[2:].any()
