"""PAHNet's PFE and ASC (fsseg.models.pahnet) in SCCAN-Plus and HDMNet: PFE against a direct computation of its
pseudocode, ASC's W_score / M_score against hand-computed cases for both hosts, no all -inf softmax row, the
neutral calibration reducing to the host, the M_aff loss forms, parameter counts against the reference's modules,
and bad configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fsseg.errors import ConfigError
from fsseg.models.hdmnet import HDMNetDecoder, MatchingAttention
from fsseg.models.pahnet import (
    AffinityMaskLoss,
    PrototypeEnhancement,
    QueryAxisScoreCalibration,
    WindowScoreCalibration,
    confidence_levels,
)
from fsseg.models.sccan import SCCABlock, SCCANDecoder
from fsseg.models.segmenter import count_parameters


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- PFE -----------------------------------------------------------------------------------------------
def _pfe_by_hand(pfe: PrototypeEnhancement, x, y, ms, mp):
    """The pseudocode one episode at a time, with explicit sums (notes "PFE")."""
    W = {n: p.detach() for n, p in pfe.named_parameters()}

    def ln(t, i):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * W[f"norm{i}.weight"] + W[f"norm{i}.bias"]

    def gap(f, m):
        return (f * m[:, None]).sum(0) / (m.sum() + 5e-4)

    def cos(a, b):
        return (a * b).sum(-1) / torch.clamp(a.norm(dim=-1) * b.norm(dim=-1), min=1e-8)

    def ffn(t, n):
        h = F.gelu(t @ W[f"{n}.0.weight"].T + W[f"{n}.0.bias"])
        return h @ W[f"{n}.3.weight"].T + W[f"{n}.3.bias"]

    outs = []
    for b in range(x.shape[0]):
        xn, yn = ln(x[b], 1), ln(y[b], 1)
        qs, kq, vq = yn @ W["q.weight"].T, xn @ W["k.weight"].T, xn @ W["v.weight"].T
        fg, bg = gap(qs, ms[b]), gap(qs, 1 - ms[b])
        lf, lb = 10 * cos(kq, fg[None]), 10 * cos(kq, bg[None])
        maff = torch.exp(lf) / (torch.exp(lf) + torch.exp(lb))
        protos = []
        for m in (maff, mp[b]):
            qp = gap(vq, m)
            s = (cos(qp, fg) + 1) / 2
            protos.append(s * fg + (1 - s) * qp)

        def inject(t, a, c, f, protos=protos):
            u = torch.cat([t, protos[0].expand_as(t)], -1) @ W[f"{a}.weight"].T
            v = torch.cat([t, protos[1].expand_as(t)], -1) @ W[f"{c}.weight"].T
            return torch.cat([u, v], -1) @ W[f"{f}.weight"].T + t

        xm = inject(x[b], "proj_x1", "proj_x2", "final_proj_x")
        ym = inject(y[b], "proj_y1", "proj_y2", "final_proj_y")
        outs.append((xn + ffn(ln(xm, 2), "ffn_x"), yn + ffn(ln(ym, 2), "ffn_y"), torch.stack([lb, lf])))
    return [torch.stack(t) for t in zip(*outs)]


def test_pfe_equals_a_direct_computation_of_its_pseudocode():
    torch.manual_seed(0)
    pfe = PrototypeEnhancement(8, mlp_ratio=2).double().eval()
    for p in pfe.parameters():  # LayerNorm affine away from 1 / 0 so that the LN1(x) residual base shows
        torch.nn.init.normal_(p, std=0.5)
    x, y = _randn(2, 12, 8, seed=1), _randn(2, 20, 8, seed=2)
    ms, mp = _rand(2, 20, seed=3), _rand(2, 12, seed=4)
    got = pfe(x, y, ms, mp)
    for g, e in zip(got, _pfe_by_hand(pfe, x, y, ms, mp)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    # the residual base is LN1(x) (the reference's quirk), not x: changing x's mean moves the output only via LN
    shifted = pfe(x + 3.0, y, ms, mp)[0]
    assert not torch.allclose(shifted, got[0] + 3.0)


# ---- ASC, SCCAN version --------------------------------------------------------------------------------
def test_confidence_levels_by_hand():
    p = torch.tensor([0.0, 0.29, 0.3, 0.5, 0.7, 0.71, 1.0, 1.4])
    assert confidence_levels(p).tolist() == pytest.approx([0, 0, 0.3, 0.5, 0.7, 1, 1, 1])


def test_window_asc_weight_and_mask_by_hand():
    cal = WindowScoreCalibration(dim=2, heads=2).double()
    with torch.no_grad():  # head h: W[h, i, j] = (a_h p_i + b_h)(c_h m_j + e_h)
        cal.proj_q.weight.copy_(torch.tensor([[2.0], [-1.0]]))
        cal.proj_q.bias.copy_(torch.tensor([0.5, 1.0]))
        cal.proj_s.weight.copy_(torch.tensor([[3.0], [1.0]]))
        cal.proj_s.bias.copy_(torch.tensor([-1.0, 2.0]))
    p = torch.tensor([[0.2, 0.5, 0.9, 1.3]], dtype=torch.float64)
    m = torch.tensor([[0.4, 0.6]], dtype=torch.float64)  # binarised at 0.5 -> [0, 1]
    cross = _randn(1, 2, 4, 2, seed=5)
    got = cal.calibrate(cross, p, m)
    pc, mb = [0.2, 0.5, 0.9, 1.0], [0.0, 1.0]
    # t = [0, 0.5, 1, 1]: -inf where t_i + m_j == 1 -> (0, 1), (2, 0), (3, 0)
    clash = {(0, 1), (2, 0), (3, 0)}
    for h, (a, b, c, e) in enumerate([(2.0, 0.5, 3.0, -1.0), (-1.0, 1.0, 1.0, 2.0)]):
        for i in range(4):
            for j in range(2):
                want = (a * pc[i] + b) * (c * mb[j] + e) * cross[0, h, i, j].item()
                if (i, j) in clash:
                    assert got[0, h, i, j].item() == float("-inf")
                else:
                    assert got[0, h, i, j].item() == pytest.approx(want, rel=1e-12)
    # the support branch: -inf exactly on FG-BG pairs of the binarised window mask
    sb = cal.support_bias(torch.tensor([[0.9, 0.1, 0.5]], dtype=torch.float64))[0, 0]
    inf = float("-inf")
    assert sb.tolist() == [[0, inf, 0], [inf, 0, inf], [0, inf, 0]]


@pytest.mark.parametrize(("p_value", "m_value"), [(0.5, 1.0), (0.5, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_no_softmax_row_is_all_minus_inf_for_uncertain_or_confident_predictors(p_value, m_value):
    torch.manual_seed(0)
    dim, heads, win = 8, 2, 4
    blk = SCCABlock(dim, heads, win, shifted=True, calibration=WindowScoreCalibration(dim, heads)).eval()
    q, s = torch.randn(2, 8, 8, dim), torch.randn(2, 8, 8, dim)
    mask, p = torch.full((2, 8, 8, 1), m_value), torch.full((2, 8, 8, 1), p_value)
    out_q, out_s = blk(q, s, mask, p)
    assert torch.isfinite(out_q).all() and torch.isfinite(out_s).all()
    # the attention rows themselves: query rows (self part never masked) and support rows
    cal = blk.calibration
    x, ctx = torch.randn(3, win * win, dim), torch.randn(3, win * win, dim)
    pw, mw = torch.full((3, win * win), p_value), torch.full((3, win * win), m_value)
    mw[0, :5] = 1 - m_value  # one window with mixed support FG / BG
    attn, _ = blk.attn_q.weights(x, ctx, cross_fn=lambda c: cal.calibrate(c, pw, mw))
    assert torch.isfinite(attn).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    sattn, _ = blk.attn_s.weights(ctx, self_bias=cal.support_bias(mw))
    assert torch.isfinite(sattn).all()
    torch.testing.assert_close(sattn.sum(-1), torch.ones(sattn.shape[:-1]))
    if p_value in (0.0, 1.0) and m_value == 1 - p_value:  # every cross pair a confident mismatch: all mass on self
        assert attn[1:, :, :, win * win :].abs().max() == 0


def test_neutral_calibration_reduces_to_the_sccan_block():
    torch.manual_seed(0)
    plain = SCCABlock(8, 2, 4, shifted=True).eval()
    neutral = SCCABlock(8, 2, 4, shifted=True, calibration=WindowScoreCalibration(8, 2, weight=False, mask=False, support_pairs=False))
    neutral.load_state_dict(plain.state_dict())
    q, s, m, p = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8), (torch.rand(2, 8, 8, 1) > 0.5).float(), torch.rand(2, 8, 8, 1)
    for a, b in zip(plain(q, s, m), neutral.eval()(q, s, m, p)):
        assert torch.equal(a, b)
    assert count_parameters(neutral) == count_parameters(plain)  # no W_score: no parameter without a gradient


def test_calibrated_block_equals_a_loop_over_windows():
    """The query branch of one unshifted calibrated block against one window computed by hand."""
    torch.manual_seed(0)
    dim, heads, win = 4, 2, 2
    blk = SCCABlock(dim, heads, win, shifted=False, calibration=WindowScoreCalibration(dim, heads)).double().eval()
    q, s = _randn(1, 2, 4, dim, seed=1), _randn(1, 2, 4, dim, seed=2)
    m = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float64)[None, ..., None]  # window 1 FG, window 0 BG
    p = _rand(1, 2, 4, 1, seed=3)
    out_q, _, idx = blk.attend(q, s, m, p)
    assert idx.tolist() == [[1, 1]]  # only window 1 has support foreground
    a = blk.attn_q
    qw = q[0, :, 0:2].reshape(4, dim)  # query window 0
    sw = s[0, :, 2:4].reshape(4, dim)  # aligned support window 1 (all FG)
    pw = p[0, :, 0:2].reshape(4)
    qq = (qw @ a.q.weight.T + a.q.bias).view(4, heads, -1).transpose(0, 1)
    kv = torch.cat([qw, sw]) @ a.kv.weight.T + a.kv.bias
    k, v = kv[:, :dim].view(8, heads, -1).transpose(0, 1), kv[:, dim:].view(8, heads, -1).transpose(0, 1)
    cal = blk.calibration
    wq = (pw[:, None] * cal.proj_q.weight[:, 0] + cal.proj_q.bias).view(4, heads, -1)
    ws = (1.0 * cal.proj_s.weight[:, 0] + cal.proj_s.bias).view(heads, -1)  # m_j = 1 everywhere
    out = []
    for h in range(heads):
        own = qq[h] @ k[h, :4].T / math.sqrt(dim // heads)
        cross = (qq[h] @ k[h, 4:].T) / (qq[h].norm(dim=-1)[:, None] * k[h, 4:].norm(dim=-1)[None] + 1e-7)
        wsc = (wq[:, h] * ws[h]).sum(-1)[:, None]
        t = confidence_levels(pw)
        ms = torch.where((t + 1.0) == 1, float("-inf"), 0.0)[:, None]
        att = torch.cat([own, wsc * cross + ms], dim=1).softmax(-1)
        out.append(att @ v[h])
    expect = torch.stack(out, 1).reshape(4, dim) @ a.proj.weight.T + a.proj.bias
    torch.testing.assert_close(out_q[0, :, 0:2].reshape(4, dim), expect, rtol=1e-10, atol=1e-10)


# ---- ASC, HDMNet version -------------------------------------------------------------------------------
def test_query_axis_asc_by_hand():
    cal = QueryAxisScoreCalibration(dim=2).double()
    with torch.no_grad():
        cal.proj_q.weight.copy_(torch.tensor([[1.0], [2.0]]))
        cal.proj_s.weight.copy_(torch.tensor([[3.0], [-0.5]]))  # alpha = 1*3 + 2*(-0.5) = 2
    p = torch.tensor([[0.1, 0.5, 0.8]], dtype=torch.float64)  # t = [0, 0.5, 1]
    m = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    scores = _randn(1, 2, 3, 2, seed=7)
    attn, weight = cal.attention(scores, p, m)
    alpha = 2.0
    t, mb = [0.0, 0.5, 1.0], [1.0, 0.0]
    for h in range(2):
        for j in range(2):
            col = torch.tensor([alpha * p[0, i].item() * mb[j] * scores[0, h, i, j].item() for i in range(3)], dtype=torch.float64)
            sm = col.softmax(0)
            for i in range(3):
                want = 0.0 if t[i] + mb[j] == 1 else sm[i].item()
                assert attn[0, h, i, j].item() == pytest.approx(want, abs=1e-12)
    # g: 2 for t + m in {0, 2}, 0 for 1, t + m otherwise
    g = [[0.0, 2.0], [1.5, 0.5], [2.0, 0.0]]
    for i in range(3):
        want = sum(
            sum(scores[0, h, i, j].item() * g[i][j] for j in range(2)) / (sum(g[i]) + 1e-9) for h in range(2)
        ) / 2
        assert weight[0, i].item() == pytest.approx(want, rel=1e-10)
    assert torch.isfinite(attn).all()


@pytest.mark.parametrize("p_value", [0.5, 1.0, 0.0])
def test_hdmnet_asc_has_no_non_finite_entry(p_value):
    torch.manual_seed(0)
    att = MatchingAttention(8, 2, calibration=QueryAxisScoreCalibration(8)).eval()
    x, src = torch.randn(2, 6, 8), torch.randn(2, 10, 8)
    for m_value in (0.0, 1.0):
        out, w = att(x, src, torch.full((2, 10), m_value), torch.full((2, 6), p_value))
        assert torch.isfinite(out).all() and torch.isfinite(w).all()


def test_encoder_support_pair_bias_is_minus_100_on_fg_bg_pairs_only_with_spatial_reduction():
    from fsseg.models.hdmnet import SelfAttention

    torch.manual_seed(0)
    att = SelfAttention(4, 1, sr=2).double()
    x = _randn(1, 16, 4, seed=1)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., :2, :] = 1  # top half FG
    got = att(x, (4, 4), -100.0, mask)
    # by hand: keys reduced 4x4 -> 2x2, key mask = bilinear (align_corners) then >= 0.5 -> [[1, 1], [0, 0]]
    kv = att.sr_norm(att.sr(x.transpose(1, 2).reshape(1, 4, 4, 4)).flatten(2).transpose(1, 2))[0]
    q, k, v = x[0] @ att.q.weight.T, kv @ att.k.weight.T, kv @ att.v.weight.T
    mq = mask.flatten(1)[0]
    mk = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    bias = torch.where((mq[:, None] + mk[None]) == 1, -100.0, 0.0)
    expect = (((q @ k.T / 2.0 + bias).softmax(-1) @ v) @ att.o.weight.T)[None]
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)
    plain = SelfAttention(4, 1, sr=1).double()
    assert torch.equal(plain(x, (4, 4), -100.0, mask), plain(x, (4, 4)))  # sr 1: the reference leaves it unmasked


# ---- M_aff loss ----------------------------------------------------------------------------------------
def test_affinity_loss_forms_by_hand():
    logits = _randn(2, 2, 4, 4, seed=8).float() * 3
    y = torch.randint(0, 2, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    y[0, 0, 0] = 255
    ref = AffinityMaskLoss(form="probability_ce")
    clean = AffinityMaskLoss(form="bce_logits")
    yd = y[:, ::2, ::2]  # nearest 8 -> 4 picks the even rows/columns
    valid = yd != 255
    pf = logits.softmax(1)[:, 1]
    # CE on probabilities = BCE-with-logits(2 p_fg - 1) (notes: the "BCE" on M_aff)
    want_ref = F.binary_cross_entropy_with_logits((2 * pf - 1)[valid], (yd == 1).float()[valid])
    want_clean = F.cross_entropy(logits, yd, ignore_index=255)
    out = {"affinity_logits": [logits, logits]}
    batch = {"query_mask": y}
    assert ref(out, batch, None)["aff"].item() == pytest.approx(want_ref.item(), rel=1e-5)
    assert clean(out, batch, None)["aff"].item() == pytest.approx(want_clean.item(), rel=1e-5)
    sign = 2 * (yd == 1).float() - 1
    perfect = torch.stack([-100 * sign, 100 * sign], 1)  # certain and right everywhere: the 0.313 floor
    assert ref({"affinity_logits": [perfect]}, batch, None)["aff"].item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))), rel=1e-4)
    with pytest.raises(ConfigError, match="form"):
        AffinityMaskLoss(form="dice")


# ---- parameter counts (ResNet-50 sizes) -----------------------------------------------------------------
def test_pfe_and_asc_parameter_counts_equal_the_reference_modules():
    # counted from the reference's PrototypeEnhanced (C=256: 2,035,200; C=64: 127,872) and SwinTransformerBlock
    # (2,827,776 with PFE and both attention's proj_q/proj_s) by instantiating them (tianyu-zou/PAHNet@37edd6b)
    assert count_parameters(PrototypeEnhancement(256)) == 2_035_200 == 31 * 256**2 + 14 * 256
    assert count_parameters(PrototypeEnhancement(64)) == 127_872
    blk = SCCABlock(256, 8, 8, False, calibration=WindowScoreCalibration(256, 8))
    # the reference block minus its support attention's proj_q/proj_s (1,024), which never get a gradient
    assert count_parameters(blk) + count_parameters(PrototypeEnhancement(256)) == 2_827_776 - 1_024
    assert count_parameters(QueryAxisScoreCalibration(64)) == 128


def test_host_parameter_counts_with_pahnet():
    base = SCCANDecoder(256, prior_channels=2)
    pah = SCCANDecoder(
        256, prior_channels=2, block_enhancement=lambda dim: PrototypeEnhancement(dim),
        score_calibration=lambda dim, heads: WindowScoreCalibration(dim, heads),
    )  # fmt: skip
    extra = count_parameters(pah) - count_parameters(base)
    # reference: +8 x (2,035,200 + 2 x 1,024) = 16,297,984; fsseg drops the 8 x 1,024 unused support projections
    assert extra == 8 * (2_035_200 + 1_024) == 16_289_792
    assert extra == pytest.approx(16_297_984, rel=0.001)
    # PAHNet's configs also drop the last block's support branch (attn_s 263,168 + mlp_s 131,584 at C = 256,
    # mlp ratio 1): its output feeds nothing, so those parameters never get a gradient in the reference either
    ddp_safe = SCCANDecoder(
        256, prior_channels=2, block_enhancement=lambda dim: PrototypeEnhancement(dim),
        score_calibration=lambda dim, heads: WindowScoreCalibration(dim, heads), final_support_branch=False,
    )  # fmt: skip
    assert count_parameters(pah) - count_parameters(ddp_safe) == 263_168 + 131_584
    hd, hp = HDMNetDecoder(), HDMNetDecoder(
        block_enhancement=lambda dim: PrototypeEnhancement(dim), score_calibration=lambda dim: QueryAxisScoreCalibration(dim)
    )
    assert count_parameters(hp) - count_parameters(hd) == 3 * (127_872 + 128) == 384_000  # 4.16 M -> 4.55 M


# ---- hosts, bad configs --------------------------------------------------------------------------------
def _sccan_guidance(b=2, d=16, g=8, seed=0):
    torch.manual_seed(seed)
    return {
        "query_feat": torch.randn(b, d, g, g), "support_fused": torch.randn(b, d, g, g),
        "support_mask_fused": (torch.rand(b, 1, g, g) > 0.5).float(), "prototype": torch.randn(b, d, 1, 1),
        "prior": torch.rand(b, 2, g, g), "m_pro": torch.rand(b, 1, 16, 16),
    }  # fmt: skip


def test_sccan_plus_with_pahnet_returns_one_affinity_map_per_block_and_trains():
    dec = SCCANDecoder(
        16, grid_size=8, num_blocks=2, num_heads=2, window_size=4, prior_channels=2, dilations=(1, 2, 3),
        block_enhancement=lambda dim: PrototypeEnhancement(dim), score_calibration=lambda dim, heads: WindowScoreCalibration(dim, heads),
        final_support_branch=False,
    )  # fmt: skip
    assert "m_pro" in dec.requires and "m_pro" not in SCCANDecoder.requires
    out = dec(_sccan_guidance())
    assert out["logits"].shape == (2, 2, 8, 8) and len(out["affinity_logits"]) == 2
    assert out["affinity_logits"][0].shape == (2, 2, 8, 8)
    (out["logits"].sum() + sum(a.sum() for a in out["affinity_logits"])).backward()
    assert all(p.grad is not None for p in dec.parameters())  # every parameter reached (DDP-safe)


def test_block_count_mismatch_and_wrong_host_are_refused():
    with pytest.raises(ConfigError, match="decoder.block_enhancement lists 3 modules but the host has 8"):
        SCCANDecoder(16, grid_size=8, window_size=4, block_enhancement=[PrototypeEnhancement(16) for _ in range(3)])
    with pytest.raises(ConfigError, match="decoder.score_calibration lists 2 modules but the host has 3"):
        HDMNetDecoder(16, 8, num_heads=(2, 2, 2), score_calibration=[QueryAxisScoreCalibration(8) for _ in range(2)])
    with pytest.raises(ConfigError, match="attention=scca"):
        SCCANDecoder(16, grid_size=8, attention="global", score_calibration=lambda dim, heads: WindowScoreCalibration(dim, heads))
    with pytest.raises(ConfigError, match="low <= high"):
        WindowScoreCalibration(8, 2, low=0.8, high=0.2)


@pytest.mark.parametrize(("affinity", "prototype"), [(True, False), (False, True)])
def test_one_branch_pfe_builds_only_its_parameters_and_all_get_gradients(affinity, prototype):
    pfe = PrototypeEnhancement(8, affinity=affinity, prototype=prototype)
    x, y = torch.randn(2, 12, 8), torch.randn(2, 20, 8)
    ms, mp = torch.rand(2, 20), torch.rand(2, 12)
    xo, yo, aff = pfe(x, y, ms, mp)
    assert (aff is not None) == affinity
    (xo.sum() + yo.sum() + (aff.sum() if aff is not None else 0)).backward()
    assert all(p.grad is not None for p in pfe.parameters())
    full = count_parameters(PrototypeEnhancement(8))
    assert count_parameters(pfe) == full - 2 * (2 * 8 * 8) - 2 * (8 * 8) - (8 * 8 if not affinity else 0)
    with pytest.raises(ConfigError, match="at least one"):
        PrototypeEnhancement(8, affinity=False, prototype=False)
    if not affinity:
        with pytest.raises(ConfigError, match="~aux.affinity_mask"):
            AffinityMaskLoss()({"logits": xo}, {"query_mask": torch.zeros(2, 4, 4, dtype=torch.long)}, None)


def test_model_cost_counts_multiply_adds_and_the_module_only_share_by_hand():
    from fsseg.cost import model_cost

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.l = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4, 5)

        def forward(self, batch):
            y = self.l(self.c(batch["query_img"]).flatten(2).transpose(1, 2))  # 1, 64, 5
            return {"logits": torch.bmm(y, y.transpose(1, 2))}

    cost = model_cost(Tiny(), 8)
    conv, linear, bmm = 64 * 4 * 27, 64 * 4 * 5, 64 * 64 * 5  # multiply-adds by hand
    assert cost["gflops"] * 1e9 == pytest.approx(conv + linear + bmm)
    assert cost["gflops_torch"] == pytest.approx(2 * cost["gflops"])
    assert cost["gflops_modules"] * 1e9 == pytest.approx(conv + linear)
    assert cost["params_m"] * 1e6 == 4 * 27 + 4 + 4 * 5 + 5 and cost["predictor_gflops"] == 0


def test_hdmnet_head_prior_option_is_checked_and_aenet_gives_fg_and_corr_channels():
    from fsseg.models.bam import BaseLearner, GramShotWeighting
    from fsseg.models.hdmnet import HDMNetHead

    taps = {"mid": 24, "high": 32, "low": 8, "base": 32}
    with pytest.raises(ConfigError, match="head.prior"):
        HDMNetHead(taps, BaseLearner(32, 15), GramShotWeighting(1), reduce_dim=8, prior="pfenet")
    torch.manual_seed(0)
    head = HDMNetHead(taps, BaseLearner(32, 15), GramShotWeighting(1), reduce_dim=8, prior="aenet").eval()
    query = {"mid": torch.randn(2, 24, 6, 6), "high": torch.randn(2, 32, 6, 6), "low": torch.randn(2, 8, 6, 6), "base": torch.randn(2, 32, 6, 6)}
    support = {k: v[:, None] + 0.1 for k, v in query.items()}
    mask = torch.zeros(2, 1, 24, 24)
    mask[..., 6:18, 6:18] = 1
    prior = head(query, support, mask)["prior"]
    assert prior.shape == (2, 2, 6, 6)
    fg, corr = prior[:, 0], prior[:, 1]
    assert fg.min() >= 0 and fg.max() <= 1 + 1e-6 and corr.min() >= 0  # min-max FG similarity, relu(FG - BG)


def test_hosts_without_the_parts_give_the_pre_pahnet_outputs():
    """Reference numbers computed with the SCCAN / HDMNet modules as they were before PAHNet's hooks (fsseg main at
    3ae77c7, float64, the same seeds): the hooks leave the hosts' own code path unchanged."""
    g = torch.Generator().manual_seed(0)
    b, d, gs = 2, 16, 8
    guid = {"query_feat": torch.randn(b, d, gs, gs, generator=g), "support_fused": torch.randn(b, d, gs, gs, generator=g),
            "support_mask_fused": (torch.rand(b, 1, gs, gs, generator=g) > 0.5).float(),
            "prototype": torch.randn(b, d, 1, 1, generator=g), "prior": torch.rand(b, 2, gs, gs, generator=g)}  # fmt: skip
    want = {"scca": (12.169688582488288, 38.51996489048625, -0.1431378397484922),
            "global": (1.6397323771308163, 25.801736794154973, -0.07081604553015772)}  # fmt: skip
    for attn, (total, absolute, one) in want.items():
        torch.manual_seed(1)
        dec = SCCANDecoder(dim=d, grid_size=gs, attention=attn, num_blocks=2, num_heads=2, window_size=4, prior_channels=2,
                           dilations=(1, 2, 3)).double().eval()  # fmt: skip
        out = dec({k: v.double() for k, v in guid.items()})["logits"]
        assert (out.sum().item(), out.abs().sum().item(), out[0, 1, 3, 5].item()) == pytest.approx((total, absolute, one), rel=1e-9)
    gh = {"query_feat": torch.randn(b, 16, gs, gs, generator=g), "support_feat": torch.randn(b, 2, 16, gs, gs, generator=g),
          "support_prototypes": torch.randn(b, 2, 16, generator=g), "prototype": torch.randn(b, 16, 1, 1, generator=g),
          "prior": torch.rand(b, 2, gs, gs, generator=g),
          "support_mask": (torch.rand(b, 2, 32, 32, generator=g) > 0.5).float()}  # fmt: skip
    torch.manual_seed(2)
    dec = HDMNetDecoder(in_dim=16, dim=8, num_heads=(2, 2, 2)).double().eval()
    out = dec({k: v.double() for k, v in gh.items()})
    assert sorted(out) == ["distill_weights", "logits"]
    assert (out["logits"].sum().item(), out["logits"].abs().sum().item()) == pytest.approx((18.174688493827276, 18.2168482921461), rel=1e-9)
    assert [w.sum().item() for w in out["distill_weights"]] == pytest.approx(
        [16.549512271582437, -13.146402602241759, -70.99603572939876], rel=1e-9
    )


def test_hdmnet_with_pahnet_two_shots_returns_three_affinity_maps_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    dec = HDMNetDecoder(
        in_dim=16, dim=8, num_heads=(2, 2, 2), block_enhancement=lambda dim: PrototypeEnhancement(dim),
        score_calibration=lambda dim: QueryAxisScoreCalibration(dim), support_pair_bias=-100.0,
    )  # fmt: skip
    assert "m_pro" in dec.requires
    b, k, g = 2, 2, 8
    gh = {"query_feat": torch.randn(b, 16, g, g), "support_feat": torch.randn(b, k, 16, g, g),
          "support_prototypes": torch.randn(b, k, 16), "prototype": torch.randn(b, 16, 1, 1), "prior": torch.rand(b, 2, g, g),
          "support_mask": (torch.rand(b, k, 32, 32) > 0.5).float(), "m_pro": torch.rand(b, 1, 16, 16)}  # fmt: skip
    out = dec(gh)
    assert [a.shape[-1] for a in out["affinity_logits"]] == [2, 4, 8]  # coarse to fine, as the distillation weights
    (out["logits"].sum() + sum(w.sum() for w in out["distill_weights"]) + sum(a.sum() for a in out["affinity_logits"])).backward()
    assert [n for n, p in dec.named_parameters() if p.grad is None] == []
