"""I2R's parts against independent computations: the five CAM methods by hand on a tiny classifier, the adaptive
threshold, PMGM's regions, DICM and CyCTR's masking against loops of their algorithms, and the head's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fsseg.errors import ConfigError
from fsseg.models.cam import (
    CAM_METHODS,
    adaptive_thresholds,
    class_activation_maps,
    normalise_cams,
)
from fsseg.models.i2r import (
    CrossAttentionBlock,
    I2RDecoder,
    PMGMHead,
    attention_mask,
    cam_regions,
    dicm_mask,
    masked_minmax,
)


# ---------------------------------------------------------------------------------------------------- CAMs
class SquarePoolClassifier(nn.Module):
    """logits = W GAP(x^2) + b: its gradient is known in closed form, dz_c/dA_k = 2 A_k W_ck / (h w)."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(channels, classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(classes, channels, generator=g))
            self.fc.bias.copy_(torch.randn(classes, generator=g))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.pow(2).mean(dim=(2, 3)))


def hand_cam(method: str, a: np.ndarray, w: np.ndarray, b: np.ndarray, c: int) -> np.ndarray:
    """One image: a (C, h, w). The gradient by hand, then each method's formula with explicit loops."""
    C, h, wd = a.shape
    z = w @ (a**2).mean(axis=(1, 2)) + b
    if method == "bagcam":  # target = softmax probability of c: dp_c/dz_j = p_c (delta_cj - p_j)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        coef = p[c] * (w[c] - p @ w)  # (C,)
    else:
        coef = w[c]
    g = 2 * a * coef[:, None, None] / (h * wd)
    cam = np.zeros((h, wd))
    if method == "gradcam":
        for k in range(C):
            cam += g[k].mean() * a[k]
        return np.maximum(cam, 0)
    if method == "xgradcam":
        for k in range(C):
            cam += (g[k] * a[k]).sum() / (a[k].sum() + 1e-7) * a[k]
        return np.maximum(cam, 0)
    if method == "gradcampp":
        for k in range(C):
            alpha = np.zeros((h, wd))
            for y in range(h):
                for x in range(wd):
                    gg = g[k, y, x]
                    if gg != 0:
                        alpha[y, x] = gg**2 / (2 * gg**2 + a[k].sum() * gg**3 + 1e-6)  # the reference's epsilon
            cam += (np.maximum(g[k], 0) * alpha).sum() * a[k]
        return np.maximum(cam, 0)
    if method == "hirescam":
        for k in range(C):
            cam += g[k] * a[k]
        return np.maximum(cam, 0)
    if method == "bagcam":
        for k in range(C):
            t = g[k] * a[k]
            cam += np.maximum((t + 1).mean() * t, 0)
        return cam
    raise AssertionError(method)


@pytest.mark.parametrize("method", CAM_METHODS)
@pytest.mark.parametrize("gradient_scale", [1.0, 1e-4])  # 1e-4: the size of an ImageNet head's gradients at the tap
def test_each_cam_method_equals_the_hand_computation(method, gradient_scale):
    net = SquarePoolClassifier()
    a = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    net = net.double()
    with torch.no_grad():
        net.fc.weight.mul_(gradient_scale)
    classes = torch.tensor([1, 3])
    got = class_activation_maps(net, a, classes, method)
    w, b = net.fc.weight.detach().numpy(), net.fc.bias.detach().numpy()
    for i in range(2):
        want = hand_cam(method, a[i].numpy(), w, b, int(classes[i]))
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-6, atol=1e-12)


def test_cams_take_one_gradient_and_leave_no_parameter_grad():
    net = SquarePoolClassifier()
    calls = []
    real = torch.autograd.backward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    net.fc.weight.requires_grad_(True)  # even a parameter that could take a gradient gets none
    torch.autograd.backward = counting
    try:
        with torch.no_grad():  # evaluation runs under no_grad: the CAM turns gradients on itself
            cam_from = class_activation_maps(net, torch.rand(6, 3, 4, 4), torch.arange(6) % 4, "xgradcam")
    finally:
        torch.autograd.backward = real
    assert len(calls) == 1 and cam_from.shape == (6, 4, 4)
    assert net.fc.weight.grad is None


def test_normalised_cams_are_in_unit_range_and_constant_maps_are_empty():
    cams = torch.stack([torch.rand(4, 4), torch.zeros(4, 4)])
    out = normalise_cams(cams, (8, 8))
    assert out.shape == (2, 8, 8)
    assert out[0].min() == 0 and torch.isclose(out[0].max(), torch.tensor(1.0))
    assert (out[1] == 0).all()


def test_adaptive_threshold_matches_a_loop():
    g = torch.Generator().manual_seed(2)
    cams = torch.rand(3, 6, 6, generator=g)
    masks = (torch.rand(3, 6, 6, generator=g) > 0.6).float()
    got = adaptive_thresholds(cams, masks)
    for n in range(3):
        best, best_t = -1.0, None
        for i in range(51):
            t = i / 50
            pred = cams[n].numpy() > t
            m = masks[n].numpy() > 0.5
            iou = (pred & m).sum() / ((pred | m).sum() + 1e-6)
            if iou > best + 1e-12:
                best, best_t = iou, t
        assert abs(float(got[n]) - best_t) < 1e-6


def test_cam_regions_partition_the_support_mask():
    g = torch.Generator().manual_seed(3)
    cam, mask = torch.rand(4, 9, 9, generator=g), (torch.rand(4, 9, 9, generator=g) > 0.5).float()
    pos, a1, a2 = cam_regions(cam, mask, torch.full((4,), 0.7))
    assert torch.equal(a1 | a2, mask.bool())
    assert not (a1 & a2).any()
    assert torch.equal(pos, cam > 0.7)  # strict, as the reference


def test_masked_minmax_spans_each_region_and_zeroes_the_rest():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    region = torch.zeros_like(x)
    region[..., 1:3, 1:3] = 1
    out = masked_minmax(x, region)
    inside = out[region > 0]
    assert inside.min() == 0 and abs(float(inside.max()) - 1) < 1e-4
    assert (out[region == 0] == 0).all()
    assert (masked_minmax(x, torch.zeros_like(x)) == 0).all()


# ---------------------------------------------------------------------------------------------------- masks
def dicm_loop(a: np.ndarray, ms: np.ndarray, mq: np.ndarray) -> np.ndarray:
    """Algorithm 1 as written: for each support position i, j = argmax over query positions of A[:, i]; if
    M^s[i] != M^q[j]: A'[j, i] = -inf (rows query, columns support)."""
    masked = np.zeros_like(a, dtype=bool)
    for i in range(a.shape[1]):
        j = int(np.argmax(a[:, i]))  # first maximum on ties, as torch.argmax
        if ms[i] != mq[j]:
            masked[j, i] = True
    return masked


def cyctr_loop(a: np.ndarray, ms: np.ndarray) -> np.ndarray:
    masked = np.zeros_like(a, dtype=bool)
    for j in range(a.shape[1]):
        i = int(np.argmax(a[:, j]))
        j2 = int(np.argmax(a[i, :]))
        if ms[j] != ms[j2]:
            masked[:, j] = True
    return masked


@pytest.mark.parametrize("ties", [False, True])
def test_dicm_equals_a_loop_of_algorithm_1(ties):
    g = torch.Generator().manual_seed(4)
    n, nq, ns = 3, 12, 10
    a = torch.randint(0, 3, (n, nq, ns), generator=g).float() if ties else torch.randn(n, nq, ns, generator=g)
    ms, mq = torch.rand(n, ns, generator=g) > 0.5, torch.rand(n, nq, generator=g) > 0.5
    got = dicm_mask(a, ms, mq, keep_rows=False)
    guarded = dicm_mask(a, ms, mq)
    for b in range(n):
        want = dicm_loop(a[b].numpy(), ms[b].numpy(), mq[b].numpy())
        np.testing.assert_array_equal(got[b].numpy(), want)
        want[want.all(axis=1)] = False  # rows that would lose everything are kept whole
        np.testing.assert_array_equal(guarded[b].numpy(), want)


@pytest.mark.parametrize("ties", [False, True])
def test_cyctr_masking_equals_its_loop(ties):
    g = torch.Generator().manual_seed(5)
    n, nq, ns = 3, 9, 11
    a = torch.randint(0, 3, (n, nq, ns), generator=g).float() if ties else torch.randn(n, nq, ns, generator=g)
    ms = torch.rand(n, ns, generator=g) > 0.5
    got = attention_mask(a, "cyctr", ms)
    for b in range(n):
        want = cyctr_loop(a[b].numpy(), ms[b].numpy())
        if want.all(axis=1).any():  # rows that would lose everything are kept whole
            want[want.all(axis=1)] = False
        np.testing.assert_array_equal(got[b].numpy(), want)


def test_no_softmax_row_becomes_all_minus_inf():
    # query token 0 is every support token's best match, and every pair disagrees: DICM would mask row 0 whole
    nq, ns = 4, 5
    a = torch.zeros(1, nq, ns)
    a[0, 0] = 10.0
    ms, mq = torch.ones(1, ns, dtype=torch.bool), torch.zeros(1, nq, dtype=torch.bool)
    assert dicm_mask(a, ms, mq, keep_rows=False)[0, 0].all()
    cells = attention_mask(a, "dicm", ms, mq)
    assert not cells.all(dim=2).any()
    block = CrossAttentionBlock(8)
    x, s = torch.randn(1, nq, 8), torch.randn(1, ns, 8)
    out, _ = block(x, s, lambda scores: attention_mask(scores, "dicm", ms, mq))
    assert torch.isfinite(out).all()
    # CyCTR: every column inconsistent -> every row would be empty -> nothing masked
    labels = torch.tensor([[True, False, True, False, True]])
    b = torch.zeros(1, 3, 5)
    b[0, :, 1] = 5.0  # every query token's best support token is column 1 (background)
    assert not attention_mask(b, "cyctr", labels).all(dim=2).any()


def test_dicm_reference_cells_are_the_transpose_plus_the_corner():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(2, 6, 6, generator=g)
    ms, mq = torch.rand(2, 6, generator=g) > 0.5, torch.rand(2, 6, generator=g) > 0.5
    fixed, ref = dicm_mask(a, ms, mq, keep_rows=False), dicm_mask(a, ms, mq, reference_cells=True, keep_rows=False)
    want = fixed.transpose(1, 2).clone()
    want[:, 0, 0] = True
    assert torch.equal(ref, want)
    with pytest.raises(ConfigError, match="one size"):
        dicm_mask(torch.randn(1, 4, 6), ms[:1], torch.ones(1, 4, dtype=torch.bool), reference_cells=True)


# ---------------------------------------------------------------------------------------------------- head, decoder
class TinyEncoder(nn.Module):
    """What PMGMHead needs of an encoder: taps by feature index, a kept head, ``tail(index, x)``."""

    keep_head = True

    def __init__(self) -> None:
        super().__init__()
        self.taps = {"mid": [1], "high": [1], "low": [1], "cam": [1]}
        self.net = SquarePoolClassifier(channels=6, classes=5)

    def tail(self, index: int, x: torch.Tensor) -> torch.Tensor:
        assert index == 1
        return self.net(x)


def _taps(b: int, k: int, c: int = 6, h: int = 8, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    q = {t: torch.rand(b, c, h, h, generator=g) for t in ("mid", "high", "low", "cam")}
    s = {t: torch.rand(b, k, c, h, h, generator=g) for t in ("mid", "high", "low", "cam")}
    return q, s


def test_pmgm_head_outputs_and_prior_range():
    torch.manual_seed(0)
    enc = TinyEncoder()
    head = PMGMHead({"mid": 6, "high": 6, "low": 6, "cam": 6}, encoder=enc, reduce_dim=16, dropout=0.0, cam_threshold=0.5)
    head.eval()
    q, s = _taps(2, 2)
    masks = torch.zeros(2, 2, 32, 32)
    masks[:, :, 8:24, 4:20] = 1
    out = head(q, s, masks)
    assert out["prior"].shape == (2, 1, 8, 8) and 0 <= out["prior"].min() and out["prior"].max() <= 1
    assert out["region_feat"].shape == (2, 16, 8, 8)
    assert out["support_region_feat"].shape == (2, 2, 16, 8, 8)
    assert out["support_prior"].shape == (2, 2, 1, 8, 8)
    assert out["support_mask_tokens"].dtype == torch.bool
    assert head.needs_autograd_at_eval
    assert "encoder" not in dict(head.named_modules())  # the encoder is the segmenter's, registered once


def test_pmgm_prototypes_pool_with_i2rs_epsilon():
    """I2R's Weighted_GAP divides by area + 1e-5 (BAM's and PFENet's: + 5e-4): a one-cell support region shows it."""
    head = PMGMHead({"mid": 6, "high": 6, "low": 6, "cam": 6}, encoder=TinyEncoder(), reduce_dim=16, dropout=0.0, pmgm=False)
    assert head.map_eps == 1e-5
    q, s = _taps(1, 1)
    masks = torch.zeros(1, 1, 32, 32)
    masks[..., :4, :4] = 1  # one cell of the 8 x 8 feature grid
    out = head.eval()(q, s, masks)
    f, m = out["support_feat"][0, 0], out["support_mask_feat"][0, 0]
    want = (f * m).sum(dim=(1, 2)) / (m.sum() + 1e-5)
    torch.testing.assert_close(out["support_prototype"].flatten(), want)
    torch.testing.assert_close(out["prototype"].flatten(), want)
    with pytest.raises(ConfigError, match="map_eps"):
        PMGMHead({"mid": 6, "high": 6, "low": 6, "cam": 6}, encoder=None, pmgm=False, map_eps=0.0)


def test_pmgm_config_errors_are_named():
    chans = {"mid": 6, "high": 6, "low": 6, "cam": 6}
    with pytest.raises(ConfigError, match="cam_method"):
        PMGMHead(chans, encoder=TinyEncoder(), cam_method="scorecam")
    for bad in (0.0, 1.0, 1.5, "auto"):
        with pytest.raises(ConfigError, match="cam_threshold"):
            PMGMHead(chans, encoder=TinyEncoder(), cam_threshold=bad)
    headless = TinyEncoder()
    headless.keep_head = False
    with pytest.raises(ConfigError, match="keep_head"):
        PMGMHead(chans, encoder=headless)
    with pytest.raises(ConfigError, match="keep_head"):
        PMGMHead(chans, encoder=None)
    PMGMHead(chans, encoder=None, pmgm=False)  # BAM's guidance alone needs no classifier
    with pytest.raises(ConfigError, match="num_cross_blocks"):
        I2RDecoder(dim=16, num_decoders=3, num_cross_blocks=4)
    with pytest.raises(ConfigError, match="attention_mask"):
        I2RDecoder(dim=16, attention_mask="column")


class _Ctx:
    def __init__(self, query_mask):
        self.query_mask = query_mask


def _decoder_inputs(b=2, k=2, d=16, h=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "query_feat": torch.randn(b, d, h, h, generator=g),
        "prototype": torch.randn(b, d, 1, 1, generator=g),
        "prior": torch.rand(b, 1, h, h, generator=g),
        "region_feat": torch.randn(b, d, h, h, generator=g),
        "support_feat": torch.randn(b, k, d, h, h, generator=g),
        "support_prototype": torch.randn(b, k, d, 1, 1, generator=g),
        "support_region_feat": torch.randn(b, k, d, h, h, generator=g),
        "support_prior": torch.rand(b, k, 1, h, h, generator=g),
        "support_mask_tokens": torch.rand(b, k, h, h, generator=g) > 0.5,
    }


def test_decoder_shapes_and_the_support_branch():
    torch.manual_seed(0)
    dec = I2RDecoder(dim=16, num_decoders=3, num_cross_blocks=2)
    g = _decoder_inputs()
    qm = (torch.rand(2, 24, 24) > 0.5).long()
    out = dec(g, context=_Ctx(qm))
    assert out["logits"].shape == (2, 2, 6, 6)
    assert len(out["inner_logits"]) == 2 and out["support_logits"].shape == (2, 2, 2, 6, 6)
    assert len(out["support_inner_logits"]) == 2
    plain = I2RDecoder(dim=16, num_decoders=3, num_cross_blocks=2, support_branch=False)
    assert "support_logits" not in plain(g, context=_Ctx(qm))
    assert not hasattr(plain, "support_blocks")


def test_dicm_is_training_only_and_evaluation_never_reads_the_query_mask():
    torch.manual_seed(0)
    dec = I2RDecoder(dim=16, num_decoders=2, num_cross_blocks=2, dropout=0.0)
    g = _decoder_inputs()
    dec.eval()
    a = dec(g, context=_Ctx(torch.zeros(2, 24, 24, dtype=torch.long)))["logits"]
    b = dec(g, context=_Ctx(torch.ones(2, 24, 24, dtype=torch.long)))["logits"]
    c = dec(g, context=None)["logits"]
    assert torch.equal(a, b) and torch.equal(a, c)
    dec.train()
    with pytest.raises(ConfigError, match="query mask"):
        dec(g, context=None)


def test_mask_ratio_diagnostic_counts_dicm_cells_with_the_query_mask():
    torch.manual_seed(0)
    dec = I2RDecoder(dim=16, num_decoders=2, num_cross_blocks=2).eval()
    g = _decoder_inputs(k=1)
    out = dict(g)
    out.update(dec(g))
    qm = (torch.rand(2, 6, 6) > 0.5).long()
    diag = dec.diagnostics(out, {"query_mask": qm})
    assert set(diag) == {"mask_ratio_cab0", "mask_ratio_cab1"}
    s_labels = g["support_mask_tokens"].flatten(0, 1).flatten(1)
    for i, scores in enumerate(out["cross_attention_scores"]):
        want = []
        for n in range(2):
            cells = dicm_loop(scores[n].numpy(), s_labels[n].numpy(), qm[n].flatten().bool().numpy())
            cells[cells.all(axis=1)] = False
            want.append(cells.mean())
        np.testing.assert_allclose(diag[f"mask_ratio_cab{i}"].numpy(), want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- domain head
def test_domain_classifier_replaces_the_imagenet_head_for_cams():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    head = PMGMHead({"mid": 6, "high": 6, "low": 6, "cam": 6}, encoder=None, reduce_dim=16, dropout=0.0,
                    classifier=linear, cam_threshold=0.5).eval()
    q, s = _taps(2, 1)
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 4:20, 8:28] = 1
    out = head(q, s, masks)
    assert out["prior"].shape == (2, 1, 8, 8)
    assert not any(p.requires_grad for p in head.classifier.parameters())
    head.train()
    assert not head.classifier.training
    # its CAM is the classic CAM: ReLU(sum_k w_ck A_k) / hw for GradCAM on a GAP-linear classifier
    a = s["cam"][:, 0]
    cls = torch.tensor([1, 2])
    got = class_activation_maps(head._domain_logits, a, cls, "gradcam")
    want = torch.relu(torch.einsum("nk,nkhw->nhw", linear.weight[cls], a) / 64)
    torch.testing.assert_close(got, want)


def test_stage1_domain_targets_are_the_base_classes_present():
    from fsseg.models.base_learner import BaseLearnerModule

    class Enc(nn.Module):
        name = "tiny"

        def __init__(self):
            super().__init__()
            self.tap_channels = {"base": 4, "cam": 3}

        def forward(self, x):
            return {"base": x[:, :1].expand(-1, 4, -1, -1), "cam": x}

    m = BaseLearnerModule(Enc(), base_class_ids=[6, 7, 8], fold=0, dataset="synth", domain_tap="cam")
    target = torch.tensor([[[0, 1], [3, 255]], [[2, 2], [0, 0]]])  # image 0: classes 1 and 3; image 1: class 2
    with torch.no_grad():
        m.domain.weight.zero_()
        m.domain.bias.copy_(torch.tensor([5.0, -5.0, 0.0]))  # top class = channel 1 (base index 1)
    loss, hit = m._domain_terms({"cam": torch.zeros(2, 3, 2, 2)}, target)
    present = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    want = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([5.0, -5.0, 0.0]).expand(2, 3), present)
    torch.testing.assert_close(loss, want)
    assert hit.tolist() == [1.0, 0.0]
    trained = {id(p) for g in m.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert {id(p) for p in m.domain.parameters()} <= trained  # trained at the head's rate


@pytest.mark.parametrize(("recipe", "ppm_x", "cls_x"), [("i2r_pascal", 1.0, 10.0), ("i2r_coco", 10.0, 10.0),
                                                           ("bam_pascal", 10.0, 10.0)])  # fmt: skip
def test_stage1_ppm_and_classifier_rates(recipe, ppm_x, cls_x):
    """I2R's stage-1 optimizer lists [ppm, cls]; with index_split 0 (PASCAL) only the classifier is x10, with -1
    (COCO) both; BAM's lists the encoder first, so PPM and classifier are both x10."""
    from fsseg_testing import compose

    from fsseg.models.base_learner import BaseLearnerModule

    cfg = compose(["task=base", f"method={recipe.split('_')[0]}", f"recipe={recipe}", "encoder.weights=none"])

    class Enc(nn.Module):
        name = "tiny"

        def __init__(self):
            super().__init__()
            self.tap_channels = {"base": 4}

        def forward(self, x):
            return {"base": x}

    m = BaseLearnerModule(Enc(), [6, 7, 8], 0, "pascal", base_lr=cfg.model.base_lr,
                          head_lr_multiplier=cfg.model.head_lr_multiplier, ppm_lr_multiplier=cfg.model.ppm_lr_multiplier)  # fmt: skip
    lr = {id(p): g["lr"] for g in m.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert [lr[id(p)] for p in m.head.ppm.parameters()] == pytest.approx([2.5e-4 * ppm_x] * len(list(m.head.ppm.parameters())))
    assert [lr[id(p)] for p in m.head.cls.parameters()] == pytest.approx([2.5e-4 * cls_x] * len(list(m.head.cls.parameters())))
    assert len(lr) == sum(1 for _ in m.head.parameters())


def test_a_stage1_file_without_a_domain_classifier_is_refused(tmp_path):
    from fsseg.models.base_learner import load_domain_classifier, write_artifact

    path = write_artifact(tmp_path / "fold0.pt", {"head.x": torch.zeros(1)}, {"fold": 0, "encoder": "e", "domain_tap": None})
    with pytest.raises(ConfigError, match="base_task.domain_tap=cam"):
        load_domain_classifier(path, fold=0, encoder="e", tap="cam")
    path = write_artifact(tmp_path / "ok.pt", {"domain.weight": torch.ones(3, 5), "domain.bias": torch.zeros(3)},
                          {"fold": 0, "encoder": "e", "domain_tap": "cam"})
    lin = load_domain_classifier(path, fold=0, encoder="e", tap="cam")
    assert lin.weight.shape == (3, 5) and not lin.weight.requires_grad


def test_prior_tap_cam_compares_on_the_cam_layer():
    torch.manual_seed(0)
    chans = {"mid": 6, "high": 6, "low": 6, "cam": 6}
    q, s = _taps(1, 1)
    masks = torch.zeros(1, 1, 32, 32)
    masks[..., 8:24, 8:24] = 1
    outs = {}
    for tap in ("high", "cam"):
        torch.manual_seed(0)
        head = PMGMHead(chans, encoder=TinyEncoder(), reduce_dim=8, dropout=0.0, cam_threshold=0.5, prior_tap=tap).eval()
        outs[tap] = head(q, s, masks)["prior"]
    assert not torch.equal(outs["high"], outs["cam"])  # the taps hold different features here
    with pytest.raises(ConfigError, match="prior_tap"):
        PMGMHead(chans, encoder=TinyEncoder(), prior_tap="layer4")
