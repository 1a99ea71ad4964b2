"""Every experiment file composes and instantiates; bad config values fail before training, naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf.errors import InterpolationResolutionError

from fsseg.cli.common import instantiate
from fsseg.errors import ConfigError
from fsseg_testing import CONF, compose

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def test_there_are_experiments_and_methods():
    assert "pfenet_effl0_synth" in EXPERIMENTS and {"pfenet", "apanet", "scnet"} <= set(METHODS)


def _stage1_file(name: str, tmp_path: Path) -> list[str]:
    """BAM-based experiments read a stage-1 base learner: give them one with the right shapes."""
    import torch

    from fsseg.models.bam import BaseLearner
    from fsseg.models.base_learner import write_artifact

    cfg = compose([f"experiment={name}", "encoder.weights=none"])
    if "base_learner_path" not in cfg:
        return []
    encoder = instantiate(cfg.encoder)
    n_base = 60 if "coco" in name else 15
    learner = BaseLearner(encoder.tap_channels["base"], n_base, list(range(1, n_base + 1)))
    meta = {"fold": 0, "encoder": encoder.name, "tap": "base", "in_dim": learner.in_dim,
            "base_class_ids": list(range(1, n_base + 1)), "bins": [1, 2, 3, 6]}  # fmt: skip
    path = tmp_path / "fold0.pt"
    write_artifact(path, {f"head.{k}": v for k, v in learner.state_dict().items()}, meta)
    torch.manual_seed(0)
    return [f"base_learner_path={path}"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name, tmp_path):
    extra = _stage1_file(name, tmp_path)
    cfg = compose([f"experiment={name}", "encoder.weights=none", "hydra.run.dir=/tmp/x", "run_dir=/tmp/x", *extra])
    assert cfg.method_name in name
    data = instantiate(cfg.data)  # constructors do not touch the disk
    assert data.shots == 1 and data.fold == 0
    model = instantiate(cfg.model, num_eval_classes=data.num_novel_classes if Path(cfg.data.source.root).exists() else 5)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert not any(p.requires_grad for p in model.encoder.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_method_sets_its_name(method):
    assert compose([f"method={method}"]).method_name == method


BAD = [
    (["data.shots=0"], "shots"),
    (["data.fold=4"], "fold"),
    (["optim.base_lr=-0.01"], "base_lr"),
    (["model.main_loss_weight=-1"], "main_loss_weight"),
    (["aux.deep_supervision.weight=-0.5"], "weight"),
    (["encoder.name=resnet_does_not_exist"], "resnet_does_not_exist"),
    (["method=apanet", "apanet_lambda=1.5"], "apanet_lambda"),
    (["data.train_filter=sometimes"], "train_filter"),
]


@pytest.mark.parametrize(("overrides", "named"), BAD, ids=[b[1] for b in BAD])
def test_bad_config_values_fail_before_training_naming_the_option(overrides, named, synth_root, tmp_path):
    # a bad value fails while the config resolves (resolver), or when the objects are built: never later
    with pytest.raises((ConfigError, InterpolationResolutionError), match=named):
        cfg = compose([*overrides, f"data.source.root={synth_root}", f"paths.cache_dir={tmp_path}", "encoder.weights=none"])
        cfg.model.main_loss_weight  # noqa: B018 - resolves the interpolation
        data = instantiate(cfg.data)
        data.prepare_data()
        data.setup("fit")
        instantiate(cfg.model, num_eval_classes=data.num_novel_classes)


def test_unknown_method_is_named():
    with pytest.raises(MissingConfigException, match="method"):
        compose(["method=no_such_method"])


@pytest.mark.parametrize(
    ("name", "masking", "bn"),
    [
        ("pfenet_resnet50_pascal", "deepest", "train"),  # PFENet's code: model.train() on the no-grad backbone
        ("apanet_vgg16_bn_coco", "deepest", "train"),
        ("celp_resnet101_pascal", "deepest", "frozen"),  # CELP's train_mode() puts layer0-4 in eval
        ("pfenet_effl0_synth", "none", "frozen"),  # the embedded recipe keeps the one-pass path
    ],
)
def test_paper_recipes_default_to_the_reference_behaviours(name, masking, bn):
    cfg = compose([f"experiment={name}", "encoder.weights=none", "hydra.run.dir=/tmp/x", "run_dir=/tmp/x"])
    assert (cfg.model.support_masking, cfg.encoder.bn) == (masking, bn)
