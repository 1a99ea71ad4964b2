"""fsseg-convert: a reference checkpoint -> a file fsseg reads (layouts: fsseg.convert).

    fsseg-convert pspnet-backbone initmodel/resnet50_v2.pth weights/resnet50s_pspnet.pth encoder=resnet50
        # -> encoder.weights=weights/resnet50s_pspnet.pth (a timm state dict)
    fsseg-convert bam-base initmodel/PSPNet/pascal/split0/resnet50/best.pth auto method=bam encoder=resnet50 recipe=bam_pascal data.fold=0
        # -> the fold's stage-1 file where stage 2 looks for it (auto = the experiment's base_learner_path)
    fsseg-convert bam BAM/exp/.../best.pth bam_fold0.ckpt method=bam encoder=resnet50 recipe=bam_pascal data.fold=0
    fsseg-convert pfenet PFENet/exp/.../best.pth pfenet_fold0.ckpt method=pfenet encoder=resnet50 recipe=pascal data.fold=0
    fsseg-convert sccan SCCAN/exp/.../best.pth sccan_fold0.ckpt method=sccan encoder=resnet50 recipe=sccan_pascal data.fold=0
    fsseg-convert hdmnet HDMNet/exp/.../best.pth hdmnet_fold0.ckpt method=hdmnet encoder=resnet50 recipe=hdmnet_pascal data.fold=0
        # -> fsseg-eval run_dir=<a run of that experiment> checkpoint=<the .ckpt>

Arguments after the output path are Hydra overrides of the training config: they say which fsseg module the
tensors go into (its encoder, taps, shots). The conversion is strict: every tensor consumed, every shape
checked; on any mismatch it lists what did not map and writes nothing. Output files are written atomically.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import torch

from fsseg.cli.common import config_dir, instantiate
from fsseg.convert import LAYOUTS, STAGE1_SUBSETS, ConvertError, convert_state_dict, read_reference
from fsseg.errors import FsSegError


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides)


def _save(obj, path: Path) -> Path:
    from fsseg.io import write_atomic

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_atomic(path, buf.getvalue())


def _is_vgg(cfg) -> bool:
    return str(cfg.encoder.name).startswith("vgg")


def convert(layout: str, src: str | Path, out: str, overrides: list[str]) -> Path:
    if layout not in LAYOUTS:
        raise ConvertError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    source = read_reference(src)  # fails before anything is built
    if layout == "pspnet-backbone":
        cfg = _compose([*overrides, "encoder.weights=none"])
        encoder = instantiate(cfg.encoder)
        state = convert_state_dict(source, layout, encoder.state_dict(), what=str(src))
        return _save({k[len("model."):]: v for k, v in state.items()}, Path(out))
    if layout == "bam-base":
        return _stage1(source, str(src), out, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        staged = None
        if layout in STAGE1_SUBSETS:  # BAM's/HDMNet's checkpoint holds the stage-1 parts: the fold's stage-1 file
            staged = _stage1(STAGE1_SUBSETS[layout](source), str(src), str(Path(tmp) / "stage1.pt"), overrides)
            overrides = [*overrides, f"base_learner_path={staged}"]
        cfg = _compose([*overrides, "encoder.weights=none"])
        model = instantiate(cfg.model, num_eval_classes=5)
        state = convert_state_dict(source, layout, model.state_dict(), vgg=_is_vgg(cfg), what=str(src))
        path = _save({"state_dict": state}, Path(out))  # everything mapped: now write
        if staged is not None:
            final = Path(_compose([o for o in overrides if not o.startswith("base_learner_path=")]).base_learner_path)
            _save(torch.load(staged, weights_only=True), final)
            print(f"fsseg-convert: its base learner -> {final}")
        return path


def _stage1(source, what: str, out: str, overrides: list[str]) -> Path:
    """BAM's backbone + PSPNet head -> the fold's stage-1 file (``auto``: where the experiment looks for it)."""
    from fsseg.models.base_learner import write_artifact

    cfg = _compose([*overrides, "task=base", "base_task.encoder_weights=none"])
    data = instantiate(cfg.data)
    model = instantiate(cfg.model, **data.model_args())
    target = {k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "head."))}
    state = convert_state_dict(source, "bam-base", target, vgg=_is_vgg(cfg), what=what)
    return write_artifact(Path(cfg.base_learner_path if out == "auto" else out), state, model.meta())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("layouts:", ", ".join(sorted(LAYOUTS)))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    layout, src, out, *overrides = argv
    try:
        path = convert(layout, src, out, overrides)
    except FsSegError as err:
        raise SystemExit(f"fsseg-convert: {err}") from None
    print(f"fsseg-convert: {layout} {src} -> {path}")


if __name__ == "__main__":
    main()
