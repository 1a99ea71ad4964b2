"""Reference checkpoints -> fsseg modules, by explicit key maps, strictly.

Layouts (facts from the public code, shared/notes/baselines.md §1, round2-references.md §1.1):

- ``pspnet-backbone``: PSPNet/PFENet/BAM's ImageNet ``initmodel/resnet{50,101}_v2.pth``: a deep-stem ResNet with
  top-level ``conv1 bn1 conv2 bn2 conv3 bn3`` (64-64-128), ``layer1..4``, ``fc``. -> the FrozenEncoder's timm keys
  (``conv1.0 conv1.1 conv1.3 conv1.4 conv1.6 bn1``); ``fc`` is dropped (the encoder has no classifier). The
  FrozenEncoder reads ``encoder.weights=resnet50_v2.pth`` through this same map (``fc`` kept for ``keep_head``).
- ``bam-base``: BAM's stage-1 PSPNet (``initmodel/PSPNet/{dataset}/split{k}/{backbone}/best.pth``): ``layer0``
  (= ``conv1 bn1 relu conv2 bn2 relu conv3 bn3 relu maxpool``), ``layer1..4``, ``ppm.features.{i}.{1,2}``,
  ``cls.{0,1,4}``; ``encoder.{0..4}`` repeats ``layer0..4`` (one module registered twice: checked equal, then
  dropped). -> an fsseg stage-1 file (`fsseg.models.base_learner.write_artifact`), which stage 2 reads.
- ``bam``: BAM's stage-2 model: the backbone as above, ``learner_base.{0,1}`` (PPM, cls), ``down_query``,
  ``down_supp``, ``init_merge``, ``ASPP_meta.layer6_{0..4}``, ``res1_meta``, ``res2_meta``, ``cls_meta``,
  ``gram_merge``, ``cls_merge``, ``kshot_rw`` (K > 1). -> the FewShotSegmenter of ``method=bam``.
- ``pfenet``: PFENet's model: the backbone, ``down_query``, ``down_supp``, ``init_merge.{i}``, ``alpha_conv.{i}``,
  ``beta_conv.{i}``, ``inner_cls.{i}``, ``res1``, ``res2``, ``cls``. -> the FewShotSegmenter of ``method=pfenet``.

- ``sccan``: SCCAN's model (model/SCCAN.py): ``backbone.body.{conv1 bn1 conv2 bn2 conv3 bn3 layer1..4}`` (the
  deep-stem ResNet of ``resnet50_v2.pth`` under torchvision's IntermediateLayerGetter, FrozenBatchNorm2d),
  ``down_query``, ``down_supp``, ``init_merge_{query,supp}.0``, ``transformer.layers.0.blocks.{i}.{norm1, attn_q,
  attn_s, norm2, mlp_q.fc1/fc2, mlp_s.fc1/fc2}``, ``transformer.norm0``, ``ASPP_meta``, ``res1_meta``,
  ``res2_meta``, ``cls_meta``. -> the FewShotSegmenter of ``method=sccan`` (ResNet backbones only).

- ``hdmnet``: HDMNet's model (model/HDMNet.py, Transformer.py): BAM's PSPNet parts (``layer0..4``, ``ppm``,
  ``cls.{0,1}`` = feature 5, ``base_learnear.2`` = the classifier's last conv), ``down_{query,supp}``,
  ``{query,supp}_merge``, ``gram_merge``, ``cls_merge``, ``kshot_rw``, and ``transformer.mix_transformer.``
  ``down_sample_layers.{i}.{0: PatchEmbed projection/norm, 1-2: encoder layers (norm1, attn.attn.linear_{q,k,v,o},
  attn.sr, attn.norm, norm2, ffn.layers.{0,1,4}), 3: LayerNorm}``, ``match_layers.{i}.{0: layer, 1: ConvModule
  conv/bn}``, ``parse_layers``, ``cls``. -> the FewShotSegmenter of ``method=hdmnet``; its PSPNet parts also
  become the fold's stage-1 file (`hdmnet_stage1_subset`), as for ``bam``.

VGG-16-BN backbones (``layer0..4`` = ``features[0:7] [7:14] [14:24] [24:34] [34:43]``) map onto timm's
flattened ``features_{n}``. A DDP ``module.`` prefix is removed. Every source tensor must be consumed or named
as dropped, every target tensor (``num_batches_tracked`` excepted) filled, every shape equal: otherwise
`ConvertError` lists what did not map, and nothing is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from fsseg.errors import FsSegError

__all__ = [
    "LAYOUTS",
    "STAGE1_SUBSETS",
    "ConvertError",
    "bam_stage1_subset",
    "convert_state_dict",
    "hdmnet_stage1_subset",
    "read_reference",
]

_NBT = "num_batches_tracked"
_OWN = "base_class_ids"  # fsseg's record of a base learner's classes (set from the run's data config)
_VGG_START = (0, 7, 14, 24, 34)  # PFENet's get_vgg16_layer split of vgg16_bn.features
DROP = object()


class ConvertError(FsSegError):
    """A reference checkpoint does not map onto the fsseg module: what did not map is listed."""


# ---- key maps: reference key -> fsseg key (None: not in this layout; DROP: consumed, not used) ----------
def _stem_layer0(rest: str, prefix: str) -> str | None:
    """PSPNet's layer0 = conv1 bn1 relu conv2 bn2 relu conv3 bn3 relu maxpool -> timm's deep stem + bn1."""
    m = re.match(r"(\d+)\.(.+)$", rest)
    if not m:
        return None
    idx, tail = int(m.group(1)), m.group(2)
    target = {0: "conv1.0", 1: "conv1.1", 3: "conv1.3", 4: "conv1.4", 6: "conv1.6", 7: "bn1"}.get(idx)
    return None if target is None else f"{prefix}{target}.{tail}"


def _backbone(key: str, prefix: str, vgg: bool) -> str | None:
    m = re.match(r"layer([0-4])\.(.+)$", key)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if vgg:
        j = re.match(r"(\d+)\.(.+)$", rest)
        return None if not j else f"{prefix}features_{_VGG_START[layer] + int(j.group(1))}.{j.group(2)}"
    if layer == 0:
        return _stem_layer0(rest, prefix)
    return f"{prefix}{key}"


def _pspnet_backbone(key: str) -> str | None | object:
    stem = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv1.3", "bn2": "conv1.4", "conv3": "conv1.6", "bn3": "bn1"}
    head, _, tail = key.partition(".")
    if head in stem:
        return f"model.{stem[head]}.{tail}"
    if head.startswith("layer"):
        return f"model.{key}"
    if head == "fc":
        return DROP  # the ImageNet classifier: features_only encoders have none
    return None


def _sub(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


_PPM_CLS = [(r"^ppm\.(.+)$", r"ppm.\1"), (r"^cls\.(.+)$", r"cls.\1")]


def _bam_base(vgg: bool) -> Callable[[str], object]:
    def f(key: str):
        if key.startswith("encoder."):
            return DROP  # the same modules as layer0..4 (checked equal in convert_state_dict)
        out = _backbone(key, "encoder.model.", vgg)
        if out is not None:
            return out
        head = _sub(key, _PPM_CLS)
        return None if head is None else f"head.{head}"

    return f


def _bam(vgg: bool) -> Callable[[str], object]:
    rules = [
        (r"^learner_base\.0\.(.+)$", r"ensemble.base_learner.module.ppm.\1"),
        (r"^learner_base\.1\.(.+)$", r"ensemble.base_learner.module.cls.\1"),
        (r"^down_query\.(.+)$", r"head.down_query.\1"),
        (r"^down_supp\.(.+)$", r"head.down_support.\1"),
        (r"^init_merge\.(.+)$", r"decoder.init_merge.\1"),
        (r"^ASPP_meta\.layer6_0\.(.+)$", r"decoder.aspp.pool.\1"),
        (r"^ASPP_meta\.layer6_1\.(.+)$", r"decoder.aspp.branches.0.\1"),
        (r"^ASPP_meta\.layer6_2\.(.+)$", r"decoder.aspp.branches.1.\1"),
        (r"^ASPP_meta\.layer6_3\.(.+)$", r"decoder.aspp.branches.2.\1"),
        (r"^ASPP_meta\.layer6_4\.(.+)$", r"decoder.aspp.branches.3.\1"),
        (r"^res1_meta\.(.+)$", r"decoder.res1.\1"),
        (r"^res2_meta\.(.+)$", r"decoder.res2.\1"),
        (r"^cls_meta\.(.+)$", r"decoder.cls.\1"),
        (r"^gram_merge\.(.+)$", r"ensemble.gram_merge.\1"),
        (r"^cls_merge\.(.+)$", r"ensemble.cls_merge.\1"),
        (r"^kshot_rw\.(.+)$", r"head.shot_weighting.kshot_rw.\1"),
    ]

    def f(key: str):
        return _backbone(key, "encoder.model.", vgg) or _sub(key, rules)

    return f


def _pfenet(vgg: bool) -> Callable[[str], object]:
    rules = [
        (r"^down_query\.(.+)$", r"head.down_query.\1"),
        (r"^down_supp\.(.+)$", r"head.down_support.\1"),
        (r"^init_merge\.(\d+)\.(.+)$", r"decoder.init_merge.\1.\2"),
        (r"^alpha_conv\.(\d+)\.(.+)$", r"decoder.alpha_conv.\1.\2"),
        # PFENet's beta_conv.i = [conv, relu, conv, relu]; fsseg's = [[conv, relu], [conv, relu]]
        (r"^beta_conv\.(\d+)\.0\.(.+)$", r"decoder.beta_conv.\1.0.0.\2"),
        (r"^beta_conv\.(\d+)\.2\.(.+)$", r"decoder.beta_conv.\1.1.0.\2"),
        (r"^inner_cls\.(\d+)\.(.+)$", r"decoder.inner_cls.\1.\2"),
        (r"^res1\.(.+)$", r"decoder.res1.\1"),
        (r"^res2\.0\.(.+)$", r"decoder.res2.0.0.\1"),
        (r"^res2\.2\.(.+)$", r"decoder.res2.1.0.\1"),
        (r"^cls\.(.+)$", r"decoder.cls.\1"),
    ]

    def f(key: str):
        return _backbone(key, "encoder.model.", vgg) or _sub(key, rules)

    return f


_ASPP_HEAD = [
    (r"^ASPP_meta\.layer6_0\.(.+)$", r"decoder.aspp.pool.\1"),
    (r"^res1_meta\.(.+)$", r"decoder.res1.\1"),
    (r"^res2_meta\.(.+)$", r"decoder.res2.\1"),
    (r"^cls_meta\.(.+)$", r"decoder.cls.\1"),
]


def _aspp_branch(key: str) -> str | None:
    """BAM's ASPP_meta.layer6_{1..4} (1x1 and three dilated 3x3) -> fsseg's ASPP branches 0..3."""
    m = re.match(r"ASPP_meta\.layer6_([1-4])\.(.+)$", key)
    return None if not m else f"decoder.aspp.branches.{int(m.group(1)) - 1}.{m.group(2)}"


def _sccan(vgg: bool) -> Callable[[str], object]:
    block = r"^transformer\.layers\.0\.blocks\.(\d+)\."
    rules = [
        (r"^down_query\.(.+)$", r"head.down_query.\1"),
        (r"^down_supp\.(.+)$", r"head.down_support.\1"),
        (r"^init_merge_query\.0\.(.+)$", r"decoder.init_merge_query.\1"),
        (r"^init_merge_supp\.0\.(.+)$", r"decoder.init_merge_support.\1"),
        (block + r"(norm1|norm2|attn_q|attn_s)\.(.+)$", r"decoder.transformer.blocks.\1.\2.\3"),
        (block + r"(mlp_q|mlp_s)\.fc1\.(.+)$", r"decoder.transformer.blocks.\1.\2.0.\3"),  # Mlp: fc1 GELU drop fc2 drop
        (block + r"(mlp_q|mlp_s)\.fc2\.(.+)$", r"decoder.transformer.blocks.\1.\2.3.\3"),
        (r"^transformer\.norm0\.(.+)$", r"decoder.transformer.norm.\1"),
        *_ASPP_HEAD,
    ]

    def f(key: str):
        if key.startswith("backbone.body."):
            out = _pspnet_backbone(key[len("backbone.body."):])
            return out if out is None or out is DROP else f"encoder.{out}"
        return _sub(key, rules) or _aspp_branch(key)

    return f


def _hdmnet(vgg: bool) -> Callable[[str], object]:
    t = r"^transformer\.mix_transformer\."
    layer = r"(norm1|norm2|ffn\.layers\.[014])"  # Mix-FFN: fc1 (0), depthwise (1), fc2 (4): same indices in fsseg
    rules = [
        (r"^ppm\.(.+)$", r"head.base.learner.module.ppm.\1"),
        (r"^cls\.([01])\.(.+)$", r"head.base.learner.module.cls.\1.\2"),
        (r"^base_learnear\.2\.(.+)$", r"head.base.learner.module.cls.4.\1"),
        (r"^down_query\.(.+)$", r"head.down_query.\1"),
        (r"^down_supp\.(.+)$", r"head.down_support.\1"),
        (r"^query_merge\.(.+)$", r"decoder.query_merge.\1"),
        (r"^supp_merge\.(.+)$", r"decoder.support_merge.\1"),
        (r"^gram_merge\.(.+)$", r"ensemble.gram_merge.\1"),
        (r"^cls_merge\.(.+)$", r"ensemble.cls_merge.\1"),
        (r"^kshot_rw\.(.+)$", r"head.shot_weighting.kshot_rw.\1"),
        (t + r"down_sample_layers\.(\d+)\.0\.projection\.(.+)$", r"decoder.transformer.stages.\1.embed.\2"),
        (t + r"down_sample_layers\.(\d+)\.0\.norm\.(.+)$", r"decoder.transformer.stages.\1.embed_norm.\2"),
        (t + r"down_sample_layers\.(\d+)\.3\.(.+)$", r"decoder.transformer.stages.\1.norm.\2"),
        (t + r"down_sample_layers\.(\d+)\.([12])\.attn\.sr\.(.+)$", r"decoder.transformer.stages.\1.layers.<\2>.attn.sr.0.\3"),
        (t + r"down_sample_layers\.(\d+)\.([12])\.attn\.norm\.(.+)$", r"decoder.transformer.stages.\1.layers.<\2>.attn.sr_norm.\3"),
        (t + r"down_sample_layers\.(\d+)\.([12])\.attn\.attn\.linear_([qkvo])\.(.+)$",
         r"decoder.transformer.stages.\1.layers.<\2>.attn.\3.\4"),
        (t + r"down_sample_layers\.(\d+)\.([12])\." + layer + r"\.(.+)$", r"decoder.transformer.stages.\1.layers.<\2>.\3.\4"),
        (t + r"match_layers\.(\d+)\.0\.attn\.attn\.linear_([qkvo])\.(.+)$", r"decoder.transformer.match.\1.attn.\2.\3"),
        (t + r"match_layers\.(\d+)\.0\." + layer + r"\.(.+)$", r"decoder.transformer.match.\1.\2.\3"),
        (t + r"match_layers\.(\d+)\.1\.conv\.(.+)$", r"decoder.transformer.fuse.\1.0.\2"),
        (t + r"match_layers\.(\d+)\.1\.bn\.(.+)$", r"decoder.transformer.fuse.\1.1.\2"),
        (t + r"parse_layers\.(.+)$", r"decoder.transformer.parse.\1"),
        (t + r"cls\.(.+)$", r"decoder.transformer.cls.\1"),
    ]

    def f(key: str):
        out = _backbone(key, "encoder.model.", vgg) or _sub(key, rules)
        if out is not None and "<" in out:  # the reference's encoder layers 1, 2 of a stage -> fsseg's 0, 1
            out = re.sub(r"<([12])>", lambda m: str(int(m.group(1)) - 1), out)
        return out

    return f


LAYOUTS: dict[str, Callable[[bool], Callable[[str], object]]] = {
    "pspnet-backbone": lambda vgg: _pspnet_backbone,
    "bam-base": _bam_base,
    "bam": _bam,
    "pfenet": _pfenet,
    "sccan": _sccan,
    "hdmnet": _hdmnet,
}


def _sccan_values(key: str, value: Tensor, vgg: bool) -> Tensor:
    """SCCAN concatenates [layer2, layer3] before its reductions (model/SCCAN.py); fsseg's ``mid`` tap is
    [layer3, layer2] (PFENet's order, also BAM's and AENet's): the reductions' input columns swap blocks."""
    if key in ("head.down_query.0.weight", "head.down_support.0.weight"):
        c2 = value.shape[1] // 3  # layer2's channels: layer3 has twice as many in ResNets and VGG (512/1024, 256/512)
        return torch.cat([value[:, c2:], value[:, :c2]], dim=1)
    return value


VALUE_MAPS: dict[str, Callable[[str, Tensor, bool], Tensor]] = {"sccan": _sccan_values}


# ---- conversion -------------------------------------------------------------------------------------------
def read_reference(path: str | Path) -> dict[str, Tensor]:
    """The state dict inside a reference checkpoint (``{"state_dict": ...}`` or a plain state dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConvertError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {str(err)[:200]})") from err
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConvertError(f"{path} holds no state dict (a mapping of names to tensors, possibly under 'state_dict')")
    return {k.removeprefix("module."): v for k, v in state.items()}


def convert_state_dict(
    source: Mapping[str, Tensor], layout: str, target: Mapping[str, Tensor], vgg: bool = False, what: str = "source"
) -> dict[str, Tensor]:
    """Map ``source`` (reference keys) onto ``target``'s keys; ConvertError unless the mapping is total."""
    if layout not in LAYOUTS:
        raise ConvertError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    key_map = LAYOUTS[layout](vgg)
    out: dict[str, Tensor] = {}
    unmapped, no_target, bad_shape, twins = [], [], [], []
    for key, value in source.items():
        new = key_map(key)
        if new is DROP:
            if key.startswith("encoder.") and layout == "bam-base":  # BAM's PSPNet registers layer0..4 twice
                twin = f"layer{key.split('.', 2)[1]}.{key.split('.', 2)[2]}" if key.count(".") >= 2 else None
                if twin is None or twin not in source or not torch.equal(source[twin], value):
                    twins.append(key)
            continue
        if new is None:
            unmapped.append(key)
        elif new not in target:
            no_target.append(f"{key} -> {new}")
        elif tuple(value.shape) != tuple(target[new].shape):
            bad_shape.append(f"{key} {tuple(value.shape)} -> {new} {tuple(target[new].shape)}")
        else:
            out[new] = VALUE_MAPS.get(layout, lambda k, v, vgg: v)(new, value, vgg).to(target[new].dtype)
    for k, v in target.items():  # what fsseg records beside the weights (a base learner's class ids)
        if k.endswith(_OWN) and k not in out:
            out[k] = v.clone()
    missing = [k for k in target if k not in out and not k.endswith(_NBT)]
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} {what} tensors match no rule of layout {layout!r} (e.g. {unmapped[:5]})")
    if no_target:
        problems.append(f"{len(no_target)} map to names the fsseg module does not have (e.g. {no_target[:4]})")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatches (e.g. {bad_shape[:3]})")
    if twins:
        problems.append(f"{len(twins)} 'encoder.*' tensors differ from their layer0..4 twins (e.g. {twins[:3]})")
    if missing:
        problems.append(f"{len(missing)} fsseg tensors get no value (e.g. {missing[:5]})")
    if problems:
        raise ConvertError(f"cannot convert {what} with layout {layout!r}: " + "; ".join(problems) + ". Nothing written.")
    for k, v in target.items():  # BatchNorm counters the references did not save
        if k.endswith(_NBT) and k not in out:
            out[k] = v.clone()
    return out


def hdmnet_stage1_subset(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone and base learner inside an HDMNet checkpoint, in the ``bam-base`` layout (PSPNet's
    ``cls.{0,1}`` and ``base_learnear.2`` = ``cls.4``)."""
    out = {}
    for key, value in source.items():
        if re.match(r"(layer[0-4]|ppm|cls\.[01])\.", key):
            out[key] = value
        elif key.startswith("base_learnear.2."):
            out["cls.4." + key[len("base_learnear.2."):]] = value
    return out


STAGE1_SUBSETS: dict[str, Callable[[Mapping[str, Tensor]], dict[str, Tensor]]] = {}  # filled below


def bam_stage1_subset(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone and base learner inside a BAM stage-2 checkpoint, in the ``bam-base`` layout."""
    out = {}
    for key, value in source.items():
        if re.match(r"layer[0-4]\.", key):
            out[key] = value
        elif key.startswith("learner_base.0."):
            out["ppm." + key[len("learner_base.0."):]] = value
        elif key.startswith("learner_base.1."):
            out["cls." + key[len("learner_base.1."):]] = value
    return out


STAGE1_SUBSETS.update({"bam": bam_stage1_subset, "hdmnet": hdmnet_stage1_subset})
