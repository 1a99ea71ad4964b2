"""CyCTR: the cycle-consistency rule against a loop, the plain-PyTorch deformable attention against hand-computed
bilinear samples, support-token sampling, the weighted Dice, the composite optimizer's exact resume, and a
training step of method=cyctr (gradients, AdamW constant lr / SGD poly) and deterministic evaluation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from fsseg_testing import compose

from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.models.cyctr import (
    CycleCrossAttention,
    CyCTRDecoder,
    DeformableSelfAttention,
    SupportMaskPrediction,
    cycle_consistency_mask,
    default_heads,
    deformable_attention,
    sample_support_tokens,
    sine_positional_encoding,
)
from fsseg.models.losses import DiceLoss
from fsseg.models.optim import CompositeOptimizer, build_optimizer


# ------------------------------------------------------------------------------------------------ cycle consistency
def loop_cycle_consistency(attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The rule written out: for each support token j, i* = argmax_i attn[i, j], j* = argmax_j' attn[i*, j']."""
    nq, ns = attn.shape
    out = torch.zeros(ns, dtype=torch.bool)
    for j in range(ns):
        i_star = max(range(nq), key=lambda i: attn[i, j].item())
        j_star = max(range(ns), key=lambda jj: attn[i_star, jj].item())
        out[j] = bool(labels[j] == labels[j_star])
    return out


@pytest.mark.parametrize("shape", [(1, 1, 4, 3), (2, 3, 7, 5), (3, 8, 16, 2 * 9), (2, 4, 9, 5 * 4)])
def test_cycle_consistency_matches_loop(shape):
    g = torch.Generator().manual_seed(sum(shape))
    b, heads, _nq, ns = shape  # ns = K shots x tokens per shot, concatenated
    attn = torch.randn(shape, generator=g)
    labels = torch.rand(b, ns, generator=g) > 0.5
    got = cycle_consistency_mask(attn, labels[:, None, :])
    assert got.shape == (b, heads, ns)
    for i in range(b):
        for h in range(heads):
            assert torch.equal(got[i, h], loop_cycle_consistency(attn[i, h], labels[i]))
    if got.numel() >= 20:
        assert (~got).any() and got.any()  # both outcomes occur on random maps


def test_cycle_consistency_hand_case():
    # query 0 prefers support 1 (bg); support 0 (fg) is best matched by query 0 -> its cycle lands on a bg token
    attn = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.0, 0.8]])  # Nq = 2, Ns = 3
    labels = torch.tensor([True, False, True])
    # j=0: i*=1 (0.2), j*=2 (fg) -> consistent; j=1: i*=0, j*=1 -> consistent; j=2: i*=1, j*=2 -> consistent
    assert cycle_consistency_mask(attn, labels).tolist() == [True, True, True]
    attn[1, 0] = 0.05  # now i*(0) = 0, whose best support token is 1 (bg): inconsistent
    assert cycle_consistency_mask(attn, labels).tolist() == [False, True, True]


def test_cross_attention_bias_matches_manual_computation():
    torch.manual_seed(0)
    att = CycleCrossAttention(dim=16, heads=4).eval()
    q, s = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    labels = torch.tensor([[True, False, True, False, False], [False, False, True, True, True]])
    out, consistent = att(q, s, labels)
    qh = att.q_fc(q).view(2, 6, 4, 4).transpose(1, 2)
    kh = att.k_fc(s).view(2, 5, 4, 4).transpose(1, 2)
    vh = att.v_fc(s).view(2, 5, 4, 4).transpose(1, 2)
    scores = qh @ kh.transpose(-2, -1) / 2.0
    expected_consistent = torch.stack(
        [torch.stack([loop_cycle_consistency(scores[i, h], labels[i]) for h in range(4)]) for i in range(2)]
    )
    assert torch.equal(consistent, expected_consistent) and (~consistent).any()
    scores = scores + (~expected_consistent)[:, :, None, :].float() * -10000.0
    manual = att.proj((scores.softmax(-1) @ vh).transpose(1, 2).reshape(2, 6, 16))
    assert torch.allclose(out, manual, atol=1e-6)


def test_cross_attention_ignored_tokens_get_the_key_bias_whatever_their_consistency():
    """The reference's valid mask (CELP's contrast pass, token_mask=pseudo_mask: the pseudo-mask's 255 tokens):
    bias -10000 on ignored OR inconsistent tokens, once (not twice); the consistency map is the plain rule's."""
    torch.manual_seed(0)
    att = CycleCrossAttention(dim=16, heads=4).eval()
    q, s = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    labels = torch.tensor([[True, False, True, False, False], [False, False, True, True, True]])
    ignore = torch.tensor([[False, True, False, False, True], [True, False, False, False, False]])
    out, consistent = att(q, s, labels, ignore)
    assert torch.equal(consistent, att(q, s, labels)[1])  # the rule does not look at the flags
    qh = att.q_fc(q).view(2, 6, 4, 4).transpose(1, 2)
    kh = att.k_fc(s).view(2, 5, 4, 4).transpose(1, 2)
    vh = att.v_fc(s).view(2, 5, 4, 4).transpose(1, 2)
    scores = qh @ kh.transpose(-2, -1) / 2.0
    masked = ~consistent | ignore[:, None, :]
    assert (ignore[:, None, :] & ~consistent).any() and (ignore[:, None, :] & consistent).any()
    manual = att.proj(((scores + masked[:, :, None, :].float() * -10000.0).softmax(-1) @ vh).transpose(1, 2).reshape(2, 6, 16))
    assert torch.allclose(out, manual, atol=1e-6)
    assert not torch.allclose(out, att(q, s, labels)[0], atol=1e-4)


# ------------------------------------------------------------------------------------------------ deformable attention
def test_deformable_attention_is_a_hand_computable_bilinear_sample():
    value = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(1, 1, 1, 2, 3)  # B, M, Dh, h=2, w=3
    # (x, y) in [0, 1]; pixel (row r, col c) has its centre at ((c + 0.5) / 3, (r + 0.5) / 2)
    pts = torch.tensor(
        [
            [0.5 / 3, 0.25],  # centre of (0, 0): 1
            [1.0 / 3, 0.25],  # between (0, 0) and (0, 1): 1.5
            [1.0 / 3, 0.5],  # between (0,0), (0,1), (1,0), (1,1): 3
            [3.0 / 3, 0.75],  # between (1, 2) and the zero padding on the right: 3
        ]
    ).view(1, 1, 1, 4, 2)  # B, N=1, M=1, P=4, 2
    uniform = torch.full((1, 1, 1, 4), 0.25)
    out = deformable_attention(value, pts, uniform)
    assert out.shape == (1, 1, 1)
    assert out.item() == pytest.approx((1 + 1.5 + 3 + 3) / 4)
    # weights select: one-hot on the third point
    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    assert deformable_attention(value, pts, one_hot).item() == pytest.approx(3.0)


def _identity_deformable(dim=4, heads=2, points=9, offset_x=0.0):
    att = DeformableSelfAttention(dim, heads, points).eval()
    with torch.no_grad():
        att.sampling_offsets.weight.zero_()
        att.sampling_offsets.bias.zero_()
        att.sampling_offsets.bias.view(heads, points, 2)[..., 0] = offset_x  # offsets in feature pixels
        att.attention_weights.weight.zero_()  # -> uniform weights over the points
        att.attention_weights.bias.zero_()
        att.value_proj.weight.copy_(torch.eye(dim))
        att.output_proj.weight.copy_(torch.eye(dim))
    return att


def test_deformable_self_attention_zero_offsets_uniform_weights_returns_the_values():
    x = torch.randn(2, 3 * 5, 4)
    att = _identity_deformable()
    assert torch.allclose(att(torch.randn_like(x), x, (3, 5)), x, atol=1e-6)
    # half a pixel to the right: the mean of each pixel and its right neighbour (zero beyond the border)
    att = _identity_deformable(offset_x=0.5)
    grid = x.view(2, 3, 5, 4)
    right = torch.cat([grid[:, :, 1:], torch.zeros_like(grid[:, :, :1])], dim=2)
    assert torch.allclose(att(x, x, (3, 5)), ((grid + right) / 2).view(2, 15, 4), atol=1e-6)


def test_deformable_init_ring_and_shapes():
    att = DeformableSelfAttention(16, 8, 9)
    bias = att.sampling_offsets.bias.view(8, 9, 2)
    assert torch.allclose(bias[0, :, 0], torch.arange(1.0, 10.0)) and torch.allclose(bias[0, :, 1], torch.zeros(9))
    assert att(torch.randn(2, 12, 16), torch.randn(2, 12, 16), (3, 4)).shape == (2, 12, 16)
    assert default_heads(384) == 12 and default_heads(256) == 8
    assert sine_positional_encoding(3, 4, 16).shape == (12, 16)


# ------------------------------------------------------------------------------------------------ token sampling
def test_token_sampling_picks_the_right_class_and_handles_small_masks():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(4, 40, dtype=torch.bool)
    labels[0, :20] = True  # plenty of both
    labels[1, :2] = True  # 2 foreground tokens only
    labels[2, 5:] = True  # 5 background tokens only
    # row 3: no foreground at all
    idx = sample_support_tokens(labels, 6, 6, torch.rand(4, 40, generator=g))
    assert idx.shape == (4, 12)
    picked = torch.gather(labels, 1, idx)
    assert picked[0].tolist() == [True] * 6 + [False] * 6
    assert picked[1].tolist() == [True] * 2 + [False] * 10  # all foreground, the rest background
    assert picked[2].tolist() == [True] * 7 + [False] * 5  # all background, the rest foreground
    assert not picked[3].any()
    assert all(len(set(row.tolist())) == 12 for row in idx)  # no token twice
    # more requested than available: every token, each once
    idx = sample_support_tokens(labels, 30, 30, torch.rand(1, 40, generator=g))
    assert idx.shape == (4, 40) and all(sorted(row.tolist()) == list(range(40)) for row in idx)


def _guidance(b=3, k=2, d=16, h=6, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(b, k, 1, h, w, generator=g) > 0.6).float()
    return {
        "query_feat": torch.randn(b, d, h, w, generator=g),
        "support_feat": torch.randn(b, k, d, h, w, generator=g),
        "support_mask_feat": m,
        "prototype": torch.randn(b, d, 1, 1, generator=g),
        "prior": torch.rand(b, 1, h, w, generator=g),
    }


def test_training_sampling_is_seeded_and_checkpointed():
    dec = lambda seed: CyCTRDecoder(dim=16, fg_tokens=4, bg_tokens=4, seed=seed).train()
    gd = _guidance()
    torch.manual_seed(1)
    a = dec(3)(gd)["cycle_consistent"]
    torch.manual_seed(1)
    b = dec(3)(gd)["cycle_consistent"]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    one, two = dec(3).transformer, dec(99).transformer
    torch.rand(7, generator=one.generator)
    two.load_state_dict(one.state_dict())  # the generator state travels in the state dict (get_extra_state)
    assert torch.equal(torch.rand(5, generator=one.generator), torch.rand(5, generator=two.generator))


def test_decoder_shapes_kshot_and_self_support():
    gd = _guidance(b=2, k=3, d=24, h=5, w=7)
    dec = CyCTRDecoder(dim=24, fg_tokens=10, bg_tokens=10).eval()
    out = dec(gd)
    assert out["logits"].shape == (2, 2, 5, 7) and out["fused_query_feat"].shape == (2, 24, 5, 7)
    assert len(out["cycle_consistent"]) == 2 and out["cycle_consistent"][0].shape == (2, 12, 60)  # 24 % 12 == 0
    # CELP's latent branch: the query is its own support, a pseudo-mask marks the "foreground"
    pseudo = (torch.rand(2, 1, 1, 5, 7) > 0.5).float()
    celp = dict(gd, support_feat=gd["query_feat"][:, None], support_mask_feat=pseudo)
    assert dec(celp)["logits"].shape == (2, 2, 5, 7)
    with pytest.raises(ConfigError, match="token_scale_1shot"):
        CyCTRDecoder(dim=16, token_scale_1shot=(2.0, 1.0))


def test_evaluation_tokens_are_deterministic_and_batch_independent():
    gd = _guidance(b=3, k=2, h=8, w=8)  # 128 support tokens, 8 + 8 sampled per shot
    dec = CyCTRDecoder(dim=16, fg_tokens=4, bg_tokens=4, seed=5).eval()
    state = dec.transformer.generator.get_state()
    a, b = dec(gd), dec(gd)
    assert torch.equal(a["logits"], b["logits"])
    assert all(torch.equal(x, y) for x, y in zip(a["cycle_consistent"], b["cycle_consistent"]))
    assert torch.equal(dec.transformer.generator.get_state(), state)  # evaluation never consumes training randomness
    first = dec({k: v[:1] for k, v in gd.items()})
    assert torch.allclose(first["logits"], a["logits"][:1], atol=1e-5)
    dec.train()
    torch.manual_seed(0)
    c = dec(gd)["cycle_consistent"][0]
    assert not torch.equal(dec.transformer.generator.get_state(), state)  # training draws from the generator
    assert 2 * int(8 * 0.6) <= c.shape[-1] <= 2 * int(8 * 1.4)  # (4 + 4) x 2 shots, scaled by U(0.6, 1.4)


# ------------------------------------------------------------------------------------------------ losses
def test_weighted_dice_hand_computed():
    logits = torch.zeros(1, 2, 1, 3)  # sigmoid 0.5 on both channels
    target = torch.tensor([[[1, 0, 255]]])
    # bg channel: p = [.5, .5, 0], t = [0, 1, 0]: 1 - 2 * .5 / (.5 + 1) = 1/3; fg channel: the same -> 2/3
    loss = DiceLoss(smooth=0.0, squared=True, sigmoid_both=True)(logits, target)
    assert loss.item() == pytest.approx(2 / 3, rel=1e-6)


def test_weighted_dice_channel_reduction_sum_and_mean_by_hand():
    """CyCTR's reduction "sum" (channels summed, batch mean) and CELP_CyCTR's "mean" (over images and channels):
    the same per-channel losses, so the ratio is exactly 2 with two channels."""
    logits = torch.zeros(2, 2, 2, 2)  # sigmoid 0.5 everywhere on both channels
    target = torch.tensor([[[1, 0], [0, 255]], [[1, 1], [0, 0]]])
    # image 0 (the 255 pixel has p = 0, t = 0): bg t = [0, 1, 1, 0], sum p^2 = 3 / 4: 1 - 2 * 1 / (3/4 + 2) = 3/11;
    #   fg t = [1, 0, 0, 0]: 1 - 2 * (1/2) / (3/4 + 1) = 3/7
    # image 1: bg and fg t with two 1s each, sum p^2 = 1: 1 - 2 * 1 / (1 + 2) = 1/3 on each channel
    per_channel = [[3 / 11, 3 / 7], [1 / 3, 1 / 3]]
    summed = sum(sum(row) for row in per_channel) / 2  # (3/11 + 3/7 + 2/3) / 2
    averaged = sum(sum(row) for row in per_channel) / 4
    kw = {"smooth": 0.0, "squared": True, "sigmoid_both": True}
    loss_sum = DiceLoss(**kw)(logits, target)  # the default: CyCTR's
    loss_mean = DiceLoss(**kw, channel_reduction="mean")(logits, target)
    assert loss_sum.item() == pytest.approx(summed, rel=1e-6) and loss_sum.item() == pytest.approx(0.6840, abs=1e-4)
    assert loss_mean.item() == pytest.approx(averaged, rel=1e-6)
    assert loss_sum.item() == pytest.approx(2 * loss_mean.item(), rel=1e-6)
    assert DiceLoss(**kw, channel_reduction="sum")(logits, target).item() == loss_sum.item()
    plain = torch.zeros(1, 2, 1, 2), torch.tensor([[[1, 0]]])  # one channel (softmax fg): mean = sum
    assert DiceLoss(channel_reduction="mean")(*plain).item() == pytest.approx(DiceLoss()(*plain).item())
    with pytest.raises(ConfigError, match="channel_reduction"):
        DiceLoss(channel_reduction="max")


def test_weighted_dice_equals_the_reference_formula_without_ignored_pixels():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(3, 2, 5, 4, generator=g), torch.randint(0, 2, (3, 5, 4), generator=g)
    t = torch.stack([target == 0, target == 1], 1).float().flatten(2)
    p = logits.sigmoid().flatten(2)
    ref = (1 - 2 * (t * p).sum(-1) / ((p**2).sum(-1) + (t**2).sum(-1)).clamp(min=1e-8)).sum() / 3
    loss = DiceLoss(smooth=0.0, squared=True, sigmoid_both=True)(logits, target)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_support_mask_prediction_loss():
    gd = _guidance(b=2, k=3, d=16, h=6, w=6)
    out = dict(gd, fused_query_feat=torch.randn(2, 16, 6, 6))
    aux = SupportMaskPrediction(dim=16)
    batch = {B.QUERY_MASK: torch.randint(0, 2, (2, 24, 24)), B.SUPPORT_MASKS: torch.randint(0, 2, (2, 3, 24, 24))}
    assert aux.support_logits(out, batch[B.QUERY_MASK]).shape == (2, 3, 2, 6, 6)
    terms = aux(out, batch, None)
    assert set(terms) == {"support_mask"} and torch.isfinite(terms["support_mask"])
    terms["support_mask"].backward()
    assert aux.cls[-1].weight.grad is not None


# ------------------------------------------------------------------------------------------------ optimisation
def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, generator=g)) for _ in range(3)]


def _composite(params):
    groups = [
        {"params": [params[0]], "lr": 0.1},
        {"params": [params[1]], "lr": 1e-2},
        {"params": [params[2]], "lr": 1e-2, "weight_decay": 0.0},
    ]
    sgd = lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-4)
    adamw = lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=1e-2)
    opt, order = build_optimizer(groups, [sgd, adamw, adamw])
    poly = lambda step: (1 - step / 20) ** 0.9
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [poly, lambda s: 1.0, lambda s: 1.0]), order


def _steps(params, opt, sched, n, start):
    for i in range(start, start + n):
        def closure(i=i):
            opt.zero_grad()
            loss = sum(((p - i) ** 2).sum() for p in params)
            loss.backward()
            return loss
        opt.step(closure)
        sched.step()


def test_composite_optimizer_state_dict_round_trip_resumes_exactly():
    params = _params()
    opt, sched, order = _composite(params)
    assert isinstance(opt, CompositeOptimizer) and order == [0, 1, 2]
    assert [type(o).__name__ for o in opt.optimizers] == ["SGD", "AdamW"] and len(opt.optimizers[1].param_groups) == 2
    _steps(params, opt, sched, 3, 0)
    saved = copy.deepcopy({"params": [p.detach() for p in params], "opt": opt.state_dict(), "sched": sched.state_dict()})
    _steps(params, opt, sched, 4, 3)
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    opt2, sched2, _ = _composite(resumed)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    _steps(resumed, opt2, sched2, 4, 3)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert opt2.param_groups[0] is opt2.optimizers[0].param_groups[0]  # the scheduler still drives the sub-optimizers
    with pytest.raises(ValueError, match="sub-optimizer states"):
        opt2.load_state_dict({"optimizers": [saved["opt"]["optimizers"][0]]})


def _tiny_batch(b=2, k=1, size=64):
    qm = torch.zeros(b, size, size, dtype=torch.long)
    qm[:, 10:40, 16:48] = 1
    qm[:, :, :4] = 255
    sm = torch.zeros(b, k, size, size, dtype=torch.long)
    sm[..., 8:36, 8:40] = 1
    g = torch.Generator().manual_seed(0)
    return {
        B.QUERY_IMG: torch.randn(b, 3, size, size, generator=g),
        B.SUPPORT_IMGS: torch.randn(b, k, 3, size, size, generator=g),
        B.QUERY_MASK: qm,
        B.SUPPORT_MASKS: sm,
        B.CLASS_IDX: torch.zeros(b, dtype=torch.long),
    }


@pytest.fixture(scope="module")
def cyctr_model():
    from fsseg.cli.common import instantiate

    cfg = compose(["method=cyctr", "encoder.weights=none", "head.reduce_dim=32", "seed=7"])
    assert cfg.method_name == "cyctr" and cfg.optim.lr_multiplier == 15.0
    torch.manual_seed(0)
    return instantiate(cfg.model, num_eval_classes=5)


def test_method_cyctr_training_step(cyctr_model):
    model = cyctr_model
    model.train()

    class T:  # the trainer attribute configure_optimizers reads
        estimated_stepping_batches = 10

    model._trainer = T()
    conf = model.configure_optimizers()
    model._trainer = None
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    sgd, adamw = opt.optimizers
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adamw, torch.optim.AdamW)
    named = dict(model.named_parameters())
    transformer = {id(p) for n, p in named.items() if n.startswith("decoder.transformer.")}
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == transformer
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.0, 1e-2]  # biases first, no decay
    no_decay = {id(q) for q in adamw.param_groups[0]["params"]}
    assert all(n.endswith(".bias") for n, p in named.items() if id(p) in no_decay)
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.0025 * 15)
    batch = _tiny_batch(size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        for step in range(3):
            opt.zero_grad()
            loss = model.training_step(batch, step)
            assert torch.isfinite(loss)
            loss.backward()
            if step == 0:
                for n, p in named.items():
                    if n.startswith("decoder.transformer."):
                        assert p.grad is not None and torch.isfinite(p.grad).all(), n
                grads = [p.grad.abs().sum() for n, p in named.items() if n.startswith("decoder.transformer.")]
                assert float(sum(grads)) > 0
                assert model.aux_losses["support_mask"].cls[-1].weight.grad is not None
            opt.step()
            sched.step()
    assert [g["lr"] for g in adamw.param_groups] == [1e-4, 1e-4]  # constant
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.0375 * (1 - 3 / 10) ** 0.9)  # poly decay


def test_method_cyctr_evaluation_is_deterministic(cyctr_model):
    model = cyctr_model.eval()
    batch = _tiny_batch(b=2, k=2, size=32)
    a, b = model.predict(batch), model.predict(batch)
    assert torch.equal(a, b) and a.shape == (2, 2, 32, 32)


def test_lightning_resume_with_the_composite_optimizer_is_exact(tmp_path):
    """Lightning drives the composite (one closure, one scheduler); a run resumed from the epoch-0 checkpoint
    ends with the same weights as the uninterrupted run (optimizer states, token generator, dropout RNG)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fsseg.cli.common import instantiate

    def make():
        cfg = compose(["method=cyctr", "encoder.weights=none", "head.reduce_dim=16", "seed=7"])
        torch.manual_seed(0)
        return instantiate(cfg.model, num_eval_classes=5)

    batches = [_tiny_batch(size=32) for _ in range(4)]
    loader = lambda: torch.utils.data.DataLoader(batches, batch_size=None)
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0, max_epochs=2, limit_train_batches=2)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = make()
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        L.Trainer(callbacks=[ckpt], **kw).fit(full, loader())
        resumed = make()
        trainer = L.Trainer(enable_checkpointing=False, **kw)
        trainer.fit(resumed, loader(), ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert isinstance(trainer.optimizers[0], CompositeOptimizer)
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
