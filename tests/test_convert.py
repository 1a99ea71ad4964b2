"""fsseg-convert: reference key layouts (built from modules structured as the references define them, sharing
fsseg's tensors) convert totally and strictly; a converted model's forward equals the original's."""

from __future__ import annotations

import pytest
import torch
from fsseg_testing import compose
from torch import nn

from fsseg.cli.common import instantiate
from fsseg.cli.convert import convert
from fsseg.convert import ConvertError, convert_state_dict
from fsseg.data import batch as B
from fsseg.models.base_learner import write_artifact

SMALL = ["encoder.name=resnet18", "+encoder.model_kwargs.stem_type=deep", "+encoder.model_kwargs.stem_width=64",
         "head.reduce_dim=16", "data.fold=0"]  # fmt: skip


def _layer0(model) -> nn.Sequential:
    """PSPNet/PFENet/BAM's layer0 from a timm deep-stem ResNet: conv1 bn1 relu conv2 bn2 relu conv3 bn3 relu maxpool."""
    s = model.conv1
    return nn.Sequential(s[0], s[1], nn.ReLU(), s[3], s[4], nn.ReLU(), s[6], model.bn1, nn.ReLU(), model.maxpool)


def _backbone(ref: nn.Module, timm_model) -> None:
    ref.layer0 = _layer0(timm_model)
    for i in range(1, 5):
        setattr(ref, f"layer{i}", getattr(timm_model, f"layer{i}"))


def _old_style(state: dict) -> dict:
    """Reference files predate BatchNorm's num_batches_tracked, and DDP saves add 'module.'."""
    return {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _randomise_bn(module: nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)


def test_pspnet_backbone_resnet_v2(tmp_path):
    cfg = compose(["encoder=resnet50", *SMALL, "encoder.weights=none"])
    torch.manual_seed(0)
    original = instantiate(cfg.encoder)
    _randomise_bn(original)
    m = original.model
    ref = nn.Module()  # resnet50_v2.pth: conv1 bn1 conv2 bn2 conv3 bn3 at the top, then layers and fc
    ref.conv1, ref.bn1, ref.conv2, ref.bn2, ref.conv3, ref.bn3 = m.conv1[0], m.conv1[1], m.conv1[3], m.conv1[4], m.conv1[6], m.bn1
    for i in range(1, 5):
        setattr(ref, f"layer{i}", getattr(m, f"layer{i}"))
    ref.fc = nn.Linear(512, 1000)
    src = tmp_path / "resnet_v2.pth"
    torch.save(_old_style(ref.state_dict()), src)
    out = convert("pspnet-backbone", src, str(tmp_path / "enc.pth"), ["encoder=resnet50", *SMALL])
    loaded = instantiate(compose(["encoder=resnet50", *SMALL, f"encoder.weights={out}"]).encoder)
    x = torch.randn(2, 3, 64, 64)
    for tap, value in original(x).items():
        assert torch.equal(loaded(x)[tap], value), tap


def _bam_model(tmp_path, name: str, seed: int):
    """An fsseg BAM model of experiment bam_resnet50_pascal at resnet18 size, with its own stage-1 file."""
    from fsseg.models.bam import BaseLearner

    torch.manual_seed(seed)
    learner = BaseLearner(512, 15, list(range(6, 21)))
    meta = {"fold": 0, "encoder": "resnet18", "tap": "base", "in_dim": 512, "base_class_ids": list(range(6, 21)),
            "bins": [1, 2, 3, 6], "dataset": "pascal"}  # fmt: skip
    path = write_artifact(tmp_path / f"{name}.pt", {f"head.{k}": v for k, v in learner.state_dict().items()}, meta)
    cfg = compose(["method=bam", "encoder=resnet50", "recipe=bam_pascal", *SMALL, "encoder.weights=none", f"base_learner_path={path}"])
    model = instantiate(cfg.model, num_eval_classes=5).eval()
    _randomise_bn(model)
    return model


def _episode():
    g = torch.Generator().manual_seed(4)
    return {B.QUERY_IMG: torch.randn(2, 3, 65, 65, generator=g), B.SUPPORT_IMGS: torch.randn(2, 1, 3, 65, 65, generator=g),
            B.SUPPORT_MASKS: torch.randint(0, 2, (2, 1, 65, 65), generator=g), B.CLASS_IDX: torch.tensor([0, 3])}  # fmt: skip


def test_bam_full_model_and_its_base_learner(tmp_path):
    original = _bam_model(tmp_path, "orig", seed=0)
    enc, dec, ens = original.encoder.model, original.decoder, original.ensemble
    ref = nn.Module()  # BAM's OneModel attribute names (model/BAM.py)
    _backbone(ref, enc)
    ref.learner_base = nn.Sequential(ens.base_learner.module.ppm, ens.base_learner.module.cls)
    ref.down_query, ref.down_supp = original.head.down_query, original.head.down_support
    ref.init_merge, ref.res1_meta, ref.res2_meta, ref.cls_meta = dec.init_merge, dec.res1, dec.res2, dec.cls
    ref.ASPP_meta = nn.Module()
    for i, m in enumerate([dec.aspp.pool, *dec.aspp.branches]):
        setattr(ref.ASPP_meta, f"layer6_{i}", m)
    ref.gram_merge, ref.cls_merge = ens.gram_merge, ens.cls_merge
    with torch.no_grad():  # away from their [1, 0] start, so a swap would show
        ref.gram_merge.weight.copy_(torch.tensor([0.7, 0.2]).view_as(ref.gram_merge.weight))
        ref.cls_merge.weight.copy_(torch.tensor([0.9, -0.4]).view_as(ref.cls_merge.weight))
    src = tmp_path / "bam_best.pth"
    torch.save({"state_dict": _old_style(ref.state_dict())}, src)

    out = tmp_path / "bam.ckpt"
    stage1_auto = tmp_path / "outputs" / "base_learners" / "pascal_resnet18" / "fold0.pt"
    convert("bam", src, str(out), ["method=bam", "encoder=resnet50", "recipe=bam_pascal", *SMALL, f"paths.output_dir={tmp_path / 'outputs'}"])
    assert stage1_auto.is_file()  # the base learner inside became the fold's stage-1 file
    converted = _bam_model(tmp_path, "other", seed=1)
    converted.load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
    a, b = original(_episode()), converted(_episode())
    for key in ("logits", "meta_logits", "base_logits"):
        assert torch.equal(a[key], b[key]), key


def test_pfenet_full_model(tmp_path):
    cfg = compose(["method=pfenet", "encoder=resnet50", "recipe=pascal", *SMALL, "encoder.weights=none", "decoder.bins=[8,4,2,1]"])
    torch.manual_seed(0)
    original = instantiate(cfg.model, num_eval_classes=5).eval()
    _randomise_bn(original)
    dec = original.decoder
    ref = nn.Module()  # PFENet's model/PFENet.py attribute names
    _backbone(ref, original.encoder.model)
    ref.down_query, ref.down_supp = original.head.down_query, original.head.down_support
    ref.init_merge, ref.alpha_conv, ref.inner_cls, ref.res1, ref.cls = dec.init_merge, dec.alpha_conv, dec.inner_cls, dec.res1, dec.cls
    ref.beta_conv = nn.ModuleList(nn.Sequential(b[0][0], nn.ReLU(), b[1][0], nn.ReLU()) for b in dec.beta_conv)
    ref.res2 = nn.Sequential(dec.res2[0][0], nn.ReLU(), dec.res2[1][0], nn.ReLU())
    src = tmp_path / "pfenet.pth"
    torch.save({"state_dict": _old_style(ref.state_dict())}, src)
    out = tmp_path / "pfenet.ckpt"
    convert("pfenet", src, str(out), ["method=pfenet", "encoder=resnet50", "recipe=pascal", *SMALL, "decoder.bins=[8,4,2,1]"])
    torch.manual_seed(1)
    converted = instantiate(cfg.model, num_eval_classes=5).eval()
    converted.load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
    batch = _episode()
    assert torch.equal(original(batch)["logits"], converted(batch)["logits"])


def test_partial_or_foreign_files_are_refused_and_nothing_is_written(tmp_path):
    cfg = compose(["encoder=resnet50", *SMALL, "encoder.weights=none"])
    encoder = instantiate(cfg.encoder)
    m = encoder.model
    ref = nn.Module()
    ref.conv1, ref.bn1, ref.conv2, ref.bn2, ref.conv3, ref.bn3 = m.conv1[0], m.conv1[1], m.conv1[3], m.conv1[4], m.conv1[6], m.bn1
    for i in range(1, 5):
        setattr(ref, f"layer{i}", getattr(m, f"layer{i}"))
    state = ref.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    partial["extra.weight"] = torch.zeros(3)
    with pytest.raises(ConvertError) as err:
        convert_state_dict(partial, "pspnet-backbone", encoder.state_dict())
    msg = str(err.value)
    assert "extra.weight" in msg and "model.layer4.1.conv1.weight" in msg and "Nothing written" in msg
    src, out = tmp_path / "partial.pth", tmp_path / "out.pth"
    torch.save(partial, src)
    with pytest.raises(ConvertError):
        convert("pspnet-backbone", src, str(out), ["encoder=resnet50", *SMALL])
    assert not out.exists()
    torch.save([1, 2, 3], src)
    with pytest.raises(ConvertError, match="holds no state dict"):
        convert("pspnet-backbone", src, str(out), ["encoder=resnet50", *SMALL])
    with pytest.raises(ConvertError, match="unknown layout"):
        convert("hsnet", src, str(out), [])
