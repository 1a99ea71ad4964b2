"""The GPU path on CUDA (issue 13 item 3): ``gpu``-marked, skipped where CUDA is absent (CI has none); run with
``make test-full`` or ``pytest -m gpu`` on a machine with a GPU. Written and checked on CPU only so far: see
docs/notes.md "GPU path" for what has never run on a GPU.

- a training step and evaluation on CUDA give finite losses and metrics equal to the CPU fp32 ones;
- bf16 autocast: finite, within tolerance of fp32, k-means labels / CELP counts identical to fp32;
- no host sync inside the training step (``torch.cuda.set_sync_debug_mode("error")``);
- 2-GPU DDP: fit + test with trainer=ddp and devices=2 complete with the 1-GPU metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))
from test_gpu_path import make_batch, make_model, near_threshold_features


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def _step(model, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.training_step(batch, 0)


@pytest.mark.parametrize("kind", [None, "apanet", "celp"])
def test_training_step_on_cuda_equals_cpu_fp32(kind):
    batch = make_batch(b=2)
    losses = {}
    for device in ("cpu", "cuda"):
        model = make_model(kind, dropout=0.0).to(device)
        model.eval()  # dropout off: the same function on both devices
        losses[device] = _step(model, _to(batch, device)).detach().cpu()
    assert torch.isfinite(losses["cuda"])
    torch.testing.assert_close(losses["cuda"], losses["cpu"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", [None, "apanet", "celp"])
def test_bf16_step_is_finite_and_close_to_fp32(kind):
    batch = _to(make_batch(b=2), "cuda")
    model = make_model(kind, dropout=0.0).cuda().eval()
    fp32 = _step(model, batch).detach()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = _step(model, batch)
    bf16.backward()
    assert torch.isfinite(bf16)
    torch.testing.assert_close(bf16.detach().float(), fp32, rtol=5e-2, atol=5e-2)


def test_fp32_regions_on_cuda_under_bf16_and_tf32():
    from fsseg.models.celp import sample_latent_regions
    from fsseg.models.kmeans import cosine_kmeans

    x = near_threshold_features(b=3, c=128, target=0.5).cuda()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 elsewhere; the regions force full fp32
    try:
        ref = cosine_kmeans(x, 5, 10, generator=torch.Generator().manual_seed(0))
        high = near_threshold_features(c=64, target=0.65).cuda()
        unl = torch.ones(2, 256, dtype=torch.bool, device="cuda")
        u = torch.tensor([0.3, 0.7], dtype=torch.float64, device="cuda")
        ref_s = sample_latent_regions(high, unl, 0.65, 11, u)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            amp = cosine_kmeans(x, 5, 10, generator=torch.Generator().manual_seed(0))
            amp_s = sample_latent_regions(high, unl, 0.65, 11, u)
        assert torch.get_float32_matmul_precision() == "high"  # restored after each region
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(amp.labels, ref.labels)
    assert torch.equal(amp_s.counts, ref_s.counts)
    cpu = cosine_kmeans(x.cpu(), 5, 10, generator=torch.Generator().manual_seed(0))
    assert (cpu.labels == ref.labels.cpu()).float().mean() > 0.99  # CPU vs CUDA: different kernels, near-equal


@pytest.mark.parametrize("kind", [None, "apanet", "celp"])
def test_no_host_sync_inside_the_training_step(kind):
    model = make_model(kind, finite_check_every=50).cuda()
    batch = _to(make_batch(b=2), "cuda")
    _step(model, batch).backward()  # warm-up (allocator, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = _step(model, batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_evaluation_on_cuda_equals_cpu(synth_root, tmp_path):
    import lightning as L
    from fsseg_testing import compose, tiny_overrides
    from hydra.utils import instantiate

    from fsseg.models.segmenter import metrics_from_trainer

    results = {}
    for accelerator, precision in (("cpu", "32-true"), ("gpu", "32-true"), ("gpu", "bf16-mixed")):
        cfg = compose(tiny_overrides(synth_root, tmp_path / "cache"))
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("test")
        torch.manual_seed(0)
        model = instantiate(cfg.model, num_eval_classes=dm.num_novel_classes)
        trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.test(model, datamodule=dm, verbose=False)
        results[(accelerator, precision)] = metrics_from_trainer(trainer, "test")
    cpu, gpu, bf16 = results.values()
    assert cpu["episodes"] == gpu["episodes"] == bf16["episodes"] == 12
    for key in ("miou", "fbiou"):
        assert abs(cpu[key] - gpu[key]) < 1e-3, key
        assert abs(cpu[key] - bf16[key]) < 2e-2, key


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_two_gpus_fit_and_test(synth_root, tmp_path):
    from fsseg_testing import tiny_overrides

    exe = Path(sys.executable).parent / "fsseg-train"
    env = {**os.environ, "FSSEG_CONF": str(Path(__file__).resolve().parents[1] / "conf")}
    metrics = {}
    for trainer, devices in (("gpu", 1), ("ddp", 2)):
        run_dir = tmp_path / f"run_{trainer}"
        args = [*tiny_overrides(synth_root, tmp_path / "cache", trainer=trainer), f"trainer.devices={devices}",
                f"hydra.run.dir={run_dir}"]  # fmt: skip
        proc = subprocess.run([str(exe), *args], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        metrics[trainer] = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert metrics["ddp"]["episodes"] == metrics["gpu"]["episodes"] == 12
    for key in ("miou", "fbiou"):
        assert 0.0 <= metrics["ddp"][key] <= 1.0 and abs(metrics["ddp"][key] - metrics["gpu"][key]) < 0.1, key
