"""Issue 13 item 3, the GPU path, tested on CPU: fp32 regions under bf16 autocast, a training step without host
syncs, the every-N-steps non-finite check, one batched decoder pass for APANet/CELP, the compile / channels-last /
trainer switches. The CUDA counterparts are in tests/test_gpu.py (``gpu`` marker)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from fsseg_testing import StubEncoder, compose

import fsseg.models.kmeans as kmeans_mod
from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.models.apanet import ClassAgnosticBranch
from fsseg.models.celp import LatentContrast, latent_prior, sample_latent_regions
from fsseg.models.kmeans import cosine_kmeans
from fsseg.models.losses import CrossEntropy, DeepSupervision
from fsseg.models.ops import full_precision, max_cosine_prior
from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead
from fsseg.models.segmenter import FewShotSegmenter, NonFiniteLossError


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def make_model(aux_kind=None, dropout=0.1, **model_kw):
    aux = {"deep_supervision": DeepSupervision(0.5 if aux_kind == "apanet" else 1.0)}
    if aux_kind == "apanet":
        aux["class_agnostic"] = ClassAgnosticBranch(lambda_=0.5, n=3, seed=0, kmeans_early_stop=False)
    elif aux_kind == "celp":
        aux["latent_contrast"] = LatentContrast(delta=0.8, sigma=3, seed=0)
    torch.manual_seed(0)
    return FewShotSegmenter(
        encoder=StubEncoder(),
        head=lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=8),
        decoder=FeatureEnrichmentModule(dim=8, bins=(1.0, 0.5), dropout=dropout),
        main_loss=CrossEntropy(),
        aux_losses=aux,
        main_loss_weight=0.5 if aux_kind == "apanet" else 1.0,
        eval_resolution="network",
        num_eval_classes=2,
        **model_kw,
    )


def make_batch(b=2, k=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    qm = torch.zeros(b, size, size, dtype=torch.long)
    qm[:, 2:5, 3:6] = 1
    base = qm * 3
    base[:, 6:, 0:3] = 7
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


def step(model, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        return model.training_step(batch, 0)


def near_threshold_features(b=2, c=64, h=16, w=16, target=0.65, seed=0):
    """Features whose pairwise cosines crowd around ``target`` (a shared direction plus noise): the worst case
    for a threshold at delta and for k-means assignments."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(b, c, 1, 1, generator=g)
    noise = torch.randn(b, c, h, w, generator=g)
    # cos between two pixels ~ a^2 / (a^2 + 1) for common weight a: a^2 = target / (1 - target)
    a = (target / (1 - target)) ** 0.5
    return torch.relu(a * common + noise) + 0.01


# ------------------------------------------------------------------ fp32 regions under bf16 autocast
def test_bf16_autocast_really_changes_these_computations_without_the_region():
    """The premise: under CPU bf16 autocast, fp32 inputs alone do not keep a matmul in fp32 (so the regions
    below are needed and the equality tests can fail)."""
    x = near_threshold_features()
    flat = F.normalize(x.flatten(2).transpose(1, 2), dim=2)
    with bf16():
        sim_bf16 = torch.bmm(flat, flat.transpose(1, 2))
        with full_precision(x.device):
            sim_fp32 = torch.bmm(flat, flat.transpose(1, 2))
    assert sim_bf16.dtype == torch.bfloat16 and sim_fp32.dtype == torch.float32
    exact = torch.bmm(flat, flat.transpose(1, 2))
    assert torch.equal(sim_fp32, exact)
    flips = (sim_bf16.float() > 0.65) != (exact > 0.65)
    assert flips.any()  # pairs flip sides of delta ...
    assert (flips.sum(dim=2) > 0).float().mean() > 0.05  # ... and change many pixels' counts N(i)


def test_cosine_kmeans_labels_are_identical_under_bf16_autocast():
    x = near_threshold_features(b=3, c=128, target=0.5)
    ref = cosine_kmeans(x, 5, 10, generator=torch.Generator().manual_seed(0))
    with bf16():
        amp = cosine_kmeans(x, 5, 10, generator=torch.Generator().manual_seed(0))
        amp_bf16_input = cosine_kmeans(x.bfloat16().float(), 5, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(amp.labels, ref.labels) and torch.equal(amp.counts, ref.counts)
    assert torch.equal(amp.centres, ref.centres) and amp.centres.dtype == torch.float32
    assert amp_bf16_input.centres.dtype == torch.float32


def test_celp_counts_at_delta_are_identical_under_bf16_autocast():
    high = near_threshold_features(c=64, target=0.65)
    b, _, h, w = high.shape
    unlabelled = torch.ones(b, h * w, dtype=torch.bool)
    unlabelled[:, :20] = False
    u = torch.tensor([0.3, 0.7], dtype=torch.float64)
    ref = sample_latent_regions(high, unlabelled, 0.65, 11, u)
    with bf16():
        amp = sample_latent_regions(high, unlabelled, 0.65, 11, u)
    for name in ("counts", "candidates", "anchor", "keep", "foreground"):
        assert torch.equal(getattr(amp, name), getattr(ref, name)), name


def test_priors_are_fp32_and_identical_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    qh = torch.relu(torch.randn(2, 16, 6, 6, generator=g))
    sh = torch.relu(torch.randn(2, 2, 16, 6, 6, generator=g))
    sm = (torch.rand(2, 2, 1, 6, 6, generator=g) > 0.5).float()
    ref = max_cosine_prior(qh, sh, sm)
    feat = torch.randn(2, 8, 6, 6, generator=g, requires_grad=True)
    proto = torch.randn(2, 8, 1, 1, generator=g)
    ref_latent = latent_prior(feat, proto)
    with bf16():
        amp = max_cosine_prior(qh, sh, sm)
        amp_bf16_taps = max_cosine_prior(qh.bfloat16(), sh.bfloat16(), sm)  # a bf16 encoder's taps
        amp_latent = latent_prior(feat.bfloat16(), proto)
    assert amp.dtype == torch.float32 and torch.equal(amp, ref)
    assert amp_bf16_taps.dtype == torch.float32
    assert torch.equal(amp_bf16_taps, max_cosine_prior(qh.bfloat16().float(), sh.bfloat16().float(), sm))
    assert amp_latent.dtype == torch.float32
    assert torch.equal(amp_latent, latent_prior(feat.bfloat16().float(), proto))
    amp_latent.sum().backward()  # gradients still reach the (bf16) features through the fp32 region
    assert feat.grad is not None and torch.isfinite(feat.grad).all()
    del ref_latent


def test_apanet_partition_and_region_prior_are_identical_under_bf16_autocast():
    model = make_model("apanet")
    batch = make_batch(b=2, size=8)
    branch = model.aux_losses["class_agnostic"]
    out = model(batch)
    state = branch.generator.get_state()
    ref_guidance, ref_target = branch.class_agnostic_guidance(out, batch)
    branch.generator.set_state(state)
    with bf16():
        amp_guidance, amp_target = branch.class_agnostic_guidance(out, batch)
    assert torch.equal(amp_target, ref_target)
    assert amp_guidance["prior"].dtype == torch.float32
    assert torch.equal(amp_guidance["prior"], ref_guidance["prior"])


def test_kmeans_without_early_stop_is_bit_identical():
    """On CUDA k-means runs all rounds (no host sync per round); the rounds after a fixed point repeat it."""
    x = near_threshold_features(b=4, c=32, target=0.3)
    stop = cosine_kmeans(x, 4, 25, generator=torch.Generator().manual_seed(3), early_stop=True)
    full = cosine_kmeans(x, 4, 25, generator=torch.Generator().manual_seed(3), early_stop=False)
    for name in ("labels", "centres", "counts"):
        assert torch.equal(getattr(stop, name), getattr(full, name)), name


# ------------------------------------------------------------------ no host sync inside the training step
class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def forbid_host_syncs(monkeypatch):
    """Every Tensor -> Python conversion that would block on a CUDA device raises HostSync."""

    def boom(name):
        def raiser(*args, **kwargs):
            raise HostSync(f"host sync: {name}")

        return raiser

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, boom(f"Tensor.{name}"))
        m.setattr(torch, "equal", boom("torch.equal"))
        m.setattr(kmeans_mod.torch, "equal", boom("torch.equal"))
        yield


@pytest.mark.parametrize("kind", [None, "apanet", "celp"])
def test_training_step_has_no_host_sync(monkeypatch, kind):
    model = make_model(kind, finite_check_every=50)
    batch = make_batch()
    with forbid_host_syncs(monkeypatch):
        loss = step(model, batch)
        loss.backward()
    assert torch.isfinite(loss)


def test_the_sync_detector_catches_todays_step(monkeypatch):
    """The detector is live: the every-step finite check and k-means' fixed-point test both sync."""
    model = make_model(None)  # finite_check_every=1: `if not isfinite(loss)` reads the device
    with forbid_host_syncs(monkeypatch), pytest.raises(HostSync, match="__bool__"):
        step(model, make_batch())
    x = near_threshold_features(b=1, c=8, h=4, w=4)
    with forbid_host_syncs(monkeypatch), pytest.raises(HostSync, match="torch.equal"):
        cosine_kmeans(x, 2, 10, generator=torch.Generator().manual_seed(0), early_stop=True)


# ------------------------------------------------------------------ every-N-steps non-finite check
def test_finite_check_every_n_records_on_device_and_raises_with_the_window(monkeypatch):
    model = make_model(None, finite_check_every=3)
    steps = iter(range(100))
    monkeypatch.setattr(type(model), "global_step", property(lambda self: self._fake_step))
    good, bad = torch.tensor(1.0), torch.tensor(float("nan"))
    for loss in (good, bad, good):
        model._fake_step = 10 + next(steps)
        model._check_finite(loss, {"main": loss * 2, "aux/ce": torch.tensor(0.5)})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at global step 11 .*steps 10-12") as err:
        model.on_train_batch_end(None, None, 2)
    assert "'main': nan" in str(err.value) and "'aux/ce': 0.5" in str(err.value)
    model.raise_if_nonfinite()  # a new window after the report: nothing pending
    for loss in (good, good):
        model._fake_step = 20 + next(steps)
        model._check_finite(loss, {"main": loss})
    model.on_train_batch_end(None, None, 1)  # 2 < 3 steps: no check yet, and all finite anyway
    model.on_train_epoch_end()


def test_finite_check_every_validation():
    with pytest.raises(ConfigError, match="model.finite_check_every"):
        make_model(None, finite_check_every=0)
    with pytest.raises(ConfigError, match="model.batched_aux_decoder"):
        make_model(None, batched_aux_decoder="yes")


def test_losses_and_progress_bar_are_unchanged_by_the_check_interval(monkeypatch):
    logged = {}

    def fake_log(self, name, value, prog_bar=False, **kw):
        logged[(self.finite_check_every, name)] = (value.detach().clone(), prog_bar)

    monkeypatch.setattr(FewShotSegmenter, "log", fake_log)
    batch = make_batch()
    losses = []
    for every in (1, 50):
        model = make_model("apanet", finite_check_every=every)
        torch.manual_seed(4)
        losses.append(step(model, batch))
    assert torch.equal(losses[0], losses[1])
    assert logged[(1, "train/loss")][1] is True and logged[(50, "train/loss")][1] is False


# ------------------------------------------------------------------ one batched decoder pass (opt-in)
@pytest.mark.parametrize("kind", ["apanet", "celp"])
def test_batched_decoder_pass_gives_the_two_pass_losses_and_gradients(kind):
    batch = make_batch(b=3)
    results = []
    for batched in (False, True):
        model = make_model(kind, dropout=0.0, batched_aux_decoder=batched)
        model.head.down_query[2].p = model.head.down_support[2].p = 0.0  # no dropout anywhere: same function
        branch = next(iter(a for n, a in model.aux_losses.items() if n != "deep_supervision"))
        branch.generator.manual_seed(5)
        terms = {}
        model.log = lambda name, value, **kw: terms.__setitem__(name, value.detach())  # noqa: B023
        loss = model.training_step(batch, 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), terms, grads))
    (l0, t0, g0), (l1, t1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    assert t0.keys() == t1.keys() and len(t0) >= 3
    for k in t0:
        assert torch.allclose(t0[k], t1[k], rtol=1e-5, atol=1e-6), k
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n


def test_batched_decoder_pass_is_one_decoder_call(monkeypatch):
    model = make_model("apanet", batched_aux_decoder=True)
    calls = []
    original = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda g: calls.append(g["query_feat"].shape[0]) or original(g))
    step(model, make_batch(b=2))
    assert calls == [4]  # main (2) + class-agnostic (2) episodes in one forward


def test_batched_decoder_refuses_batchnorm():
    model_kw = {"batched_aux_decoder": True}
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="batched_aux_decoder=true needs a decoder without BatchNorm"):
        FewShotSegmenter(
            encoder=StubEncoder(),
            head=lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=8),
            decoder=torch.nn.Sequential(torch.nn.BatchNorm2d(8)),
            main_loss=CrossEntropy(),
            **model_kw,
        )


# ------------------------------------------------------------------ compile, channels-last, trainer switches
def test_compile_switch_reaches_torch_compile(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    model = make_model(None, compile=True)
    model.prepare_for_device()
    model.prepare_for_device()  # once only
    assert compiled == ["PriorPrototypeHead", "FeatureEnrichmentModule", "StubEncoder"]
    compiled.clear()
    make_model(None).prepare_for_device()
    assert compiled == []


def test_trainer_group_switches_reach_the_model_and_not_lightning():
    cfg = compose(["trainer.compile=true", "trainer.channels_last=true"])
    assert cfg.model.compile is True and cfg.model.channels_last is True and cfg.model.encoder_bf16 is False
    assert compose([]).model.compile is False
    from hydra.utils import instantiate

    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert type(trainer).__name__ == "Trainer"
    from fsseg.trainer import make_trainer

    with pytest.raises(ConfigError, match="trainer.matmul_precision"):
        make_trainer(matmul_precision="fast", accelerator="cpu", logger=False)
    with pytest.raises(ConfigError, match="trainer.compile must be true or false"):
        make_trainer(compile="yes", accelerator="cpu", logger=False)
    gpu = compose(["trainer=gpu"])
    assert gpu.trainer.matmul_precision == "high" and gpu.model.channels_last is True


def test_channels_last_keeps_the_losses_close_and_the_layout():
    batch = make_batch()
    losses = []
    for cl in (False, True):
        model = make_model("celp", dropout=0.0, channels_last=cl)
        model.eval()  # no dropout
        model.prepare_for_device()
        out = model(batch)
        if cl:
            assert out["query_feat"].is_contiguous(memory_format=torch.channels_last)
        torch.manual_seed(0)
        losses.append(step(model, batch).detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-4)


@pytest.mark.slow  # ~2.5 min of compilation on 2 CPU cores
def test_compile_runs_a_training_step_on_cpu():
    losses = []
    for compiled in (False, True):
        model = make_model(None, compile=compiled, dropout=0.0)
        model.prepare_for_device()
        loss = step(model, make_batch())
        loss.backward()
        losses.append(loss.detach())
    assert torch.isfinite(losses[1]) and torch.allclose(losses[0], losses[1], rtol=1e-4)


# ------------------------------------------------------------------ evaluation batch size (paper recipes: 8)
def test_evaluation_metrics_do_not_depend_on_the_eval_batch_size(synth_root, tmp_path):
    """The paper recipes evaluate with batch 8: per-class intersection/union sums (and the original-label
    scoring of padded batches) give the same metrics as batch 1, bit for bit."""
    import lightning as L
    from fsseg_testing import tiny_overrides
    from hydra.utils import instantiate

    from fsseg.models.segmenter import metrics_from_trainer

    results = {}
    for eval_batch in (1, 8):
        cfg = compose(tiny_overrides(synth_root, tmp_path / "cache", **{"data.eval_batch_size": eval_batch}))
        assert cfg.model.eval_resolution == "original"
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("test")
        torch.manual_seed(0)
        model = instantiate(cfg.model, num_eval_classes=dm.num_novel_classes)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.test(model, datamodule=dm, verbose=False)
        results[eval_batch] = metrics_from_trainer(trainer, "test")
    one, eight = results[1], results[8]
    assert one["episodes"] == eight["episodes"] == 12
    for key in ("miou", "fbiou", "fp_rate", "fn_rate", "class_iou"):
        assert one[key] == eight[key], key


def test_paper_recipes_evaluate_in_batches():
    from pathlib import Path

    import yaml

    recipes = [p for p in sorted(Path(__file__).resolve().parents[2].glob("conf/recipe/*.yaml")) if "synth" not in p.stem]
    assert len(recipes) >= 10
    for path in recipes:
        data = yaml.safe_load(path.read_text()).get("data", {})
        assert data.get("eval_batch_size", 8) == 8, path.name


def test_dataloaders_pin_memory_only_on_cuda_and_keep_workers(synth_root, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fsseg_testing import tiny_overrides
    from hydra.utils import instantiate

    cfg = compose(tiny_overrides(synth_root, tmp_path / "cache", **{"data.num_workers": 1}))
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers and not loader.pin_memory  # no trainer / CPU: never pinned
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory
    assert dm.val_dataloader().persistent_workers
    cfg0 = compose(tiny_overrides(synth_root, tmp_path / "cache", **{"data.num_workers": 0}))
    dm0 = instantiate(cfg0.data)
    dm0.prepare_data()
    dm0.setup("fit")
    assert not dm0.val_dataloader().persistent_workers  # only with workers
