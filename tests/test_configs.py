"""Every experiment alias and every method x encoder x recipe composition the sweeps name composes and
instantiates; bad config values fail before training, naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
from fsseg_testing import CONF, compose
from hydra.errors import MissingConfigException
from omegaconf.errors import InterpolationResolutionError

from fsseg.cli.common import instantiate
from fsseg.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
# The paper recipe of each method family on each dataset (what the per-combination experiment files held).
PAPER_RECIPE = {
    ("pfenet", "pascal"): "pascal", ("apanet", "pascal"): "pascal", ("scnet", "pascal"): "pascal",
    ("celp", "pascal"): "celp_pascal", ("cyctr", "pascal"): "cyctr_pascal", ("celp_cyctr", "pascal"): "celp_cyctr_pascal",
    ("pfenet", "coco"): "coco", ("apanet", "coco"): "apanet_coco", ("scnet", "coco"): "apanet_coco",
    ("celp", "coco"): "celp_coco", ("cyctr", "coco"): "cyctr_coco", ("celp_cyctr", "coco"): "celp_cyctr_coco",
    ("bam", "pascal"): "bam_pascal", ("bam", "coco"): "bam_coco",
    ("i2r", "pascal"): "i2r_pascal", ("i2r", "coco"): "i2r_coco",
    ("sccan", "pascal"): "sccan_pascal", ("sccan", "coco"): "sccan_coco", ("aff", "pascal"): "sccan_pascal",
    ("aff", "coco"): "sccan_coco", ("sccan_plus", "pascal"): "sccan_plus_pascal", ("sccan_plus", "coco"): "sccan_plus_coco",
    ("hdmnet", "pascal"): "hdmnet_pascal", ("hdmnet", "coco"): "hdmnet_coco",
    ("ssp", "pascal"): "ssp_pascal", ("pro", "pascal"): "ssp_pascal", ("hpa", "pascal"): "hpa_pascal",
    ("rare", "pascal"): "rare_pascal", ("ssp", "coco"): "ssp_coco", ("pro", "coco"): "ssp_coco",
    ("sccan_plus_pahnet", "pascal"): "sccan_plus_pahnet_pascal", ("sccan_plus_pahnet", "coco"): "sccan_plus_pahnet_coco",
    ("hdmnet_pahnet", "pascal"): "hdmnet_pahnet_pascal", ("hdmnet_pahnet", "coco"): "hdmnet_pahnet_coco",
}  # fmt: skip
RESNETS = ("resnet50", "resnet101")  # the papers' backbones where they have no VGG-16 recipe
ENCODERS = {"cyctr": RESNETS, "celp_cyctr": RESNETS, "sccan": RESNETS, "aff": RESNETS, "sccan_plus": RESNETS,
            "hdmnet": RESNETS, "i2r": ("resnet50_tv", "resnet101_tv"), "ssp": RESNETS, "pro": RESNETS,
            "hpa": RESNETS, "rare": ("vgg16_bn", "resnet50", "resnet101"), "sccan_plus_pahnet": RESNETS,
            "hdmnet_pahnet": RESNETS}  # fmt: skip  # I2R: torchvision's ResNets
COMPOSITIONS = [
    (m, e, r) for (m, d), r in PAPER_RECIPE.items() for e in ENCODERS.get(m, ("vgg16_bn", "resnet50", "resnet101"))
]  # fmt: skip


def test_there_are_experiments_and_methods():
    assert "pfenet_effl0_synth" in EXPERIMENTS and {"pfenet", "apanet", "scnet"} <= set(METHODS)


def _stage1_file(overrides: list[str], tmp_path: Path) -> list[str]:
    """BAM-based compositions read a stage-1 base learner: give them one with the right shapes."""
    import torch

    from fsseg.models.bam import BaseLearner
    from fsseg.models.base_learner import write_artifact

    cfg = compose([*overrides, "encoder.weights=none"])
    if "base_learner_path" not in cfg:
        return []
    encoder = instantiate(cfg.encoder)
    n_base = 60 if "coco" in str(cfg.data.source._target_).lower() else 15
    learner = BaseLearner(encoder.tap_channels["base"], n_base, list(range(1, n_base + 1)))
    meta = {"fold": 0, "encoder": encoder.name, "tap": "base", "in_dim": learner.in_dim,
            "base_class_ids": list(range(1, n_base + 1)), "bins": [1, 2, 3, 6]}  # fmt: skip
    state = {f"head.{k}": v for k, v in learner.state_dict().items()}
    domain_tap = cfg.get("base_task", {}).get("domain_tap")
    if domain_tap:  # I2R's domain classifier beside the base learner
        meta["domain_tap"] = domain_tap
        state.update({"domain.weight": torch.zeros(n_base, encoder.tap_channels[domain_tap]), "domain.bias": torch.zeros(n_base)})
    path = tmp_path / "fold0.pt"
    write_artifact(path, state, meta)
    torch.manual_seed(0)
    return [f"base_learner_path={path}"]


def _model_args(cfg) -> dict:
    """A composition with a predictor (PAHNet) reads a trained predictor run: a frozen stand-in replaces it here
    (test_pahnet_stages.py loads a real one)."""
    if cfg.get("predictor") is None:
        return {}
    import torch

    from fsseg.models.predictors import FrozenPredictor

    class Constant(torch.nn.Module):
        def forward(self, batch):
            return {"logits": torch.zeros(1, 2, 8, 8)}

    return {"predictor": FrozenPredictor(Constant())}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name, tmp_path):
    extra = _stage1_file([f"experiment={name}"], tmp_path)
    cfg = compose([f"experiment={name}", "encoder.weights=none", "hydra.run.dir=/tmp/x", "run_dir=/tmp/x", *extra])
    assert cfg.method_name in name
    data = instantiate(cfg.data)  # constructors do not touch the disk
    assert data.shots == 1 and data.fold == 0
    model = instantiate(
        cfg.model, num_eval_classes=data.num_novel_classes if Path(cfg.data.source.root).exists() else 5, **_model_args(cfg)
    )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_recipes_replace_the_per_combination_files():
    synth = {"synth", "cyctr_synth", "bam_synth", "i2r_synth", "sccan_synth", "sccan_plus_synth", "hdmnet_synth",
             "ssp_synth", "hpa_synth", "rare_synth", "sccan_plus_pahnet_synth", "hdmnet_pahnet_synth"}  # fmt: skip
    readings = {"hpa_pfenet_pascal", "rare_pfenet_pascal"}  # the other reading of an unpublished recipe (tested below)
    assert len(COMPOSITIONS) == 79 and {r for _, _, r in COMPOSITIONS} | synth | readings == set(RECIPES)
    assert all("_effl0_synth" in name for name in EXPERIMENTS)  # aliases of method=<m> recipe=<synth recipe>


@pytest.mark.parametrize(("method", "encoder", "recipe"), COMPOSITIONS, ids=["-".join(c) for c in COMPOSITIONS])
def test_paper_composition_composes_and_instantiates(method, encoder, recipe, tmp_path):
    over = [f"method={method}", f"encoder={encoder}", f"recipe={recipe}"]
    cfg = compose([*over, "encoder.weights=none", "hydra.run.dir=/tmp/x", "run_dir=/tmp/x", *_stage1_file(over, tmp_path)])
    assert cfg.method_name == method and list(cfg.tags) == [method, recipe.rsplit("_", 1)[-1]]
    data = instantiate(cfg.data)
    assert type(data.source).__name__ == ("PascalVOC" if "pascal" in recipe else "COCO")
    model = instantiate(cfg.model, num_eval_classes=5 if "pascal" in recipe else 20, **_model_args(cfg))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


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
    ("overrides", "masking", "bn"),
    [
        ("method=pfenet encoder=resnet50 recipe=pascal", "deepest", "train"),  # PFENet's code: model.train() on the no-grad backbone
        ("method=apanet encoder=vgg16_bn recipe=apanet_coco", "deepest", "train"),
        ("method=celp encoder=resnet101 recipe=celp_pascal", "deepest", "frozen"),  # CELP's train_mode() puts layer0-4 in eval
        ("experiment=pfenet_effl0_synth", "none", "frozen"),  # the embedded recipe keeps the one-pass path
    ],
)
def test_paper_recipes_default_to_the_reference_behaviours(overrides, masking, bn):
    cfg = compose([*overrides.split(), "encoder.weights=none", "hydra.run.dir=/tmp/x", "run_dir=/tmp/x"])
    assert (cfg.model.support_masking, cfg.encoder.bn) == (masking, bn)


@pytest.mark.parametrize("method", ["hpa", "rare"])
def test_hpa_and_rare_recipes_read_bams_pipeline_or_pfenets(method):
    """Their READMEs send training to BAM's repository (default); PFENet's recipe is the other reading."""
    bam = compose([f"method={method}", "encoder=resnet50", f"recipe={method}_pascal", "encoder.weights=none"])
    pfe = compose([f"method={method}", "encoder=resnet50", f"recipe={method}_pfenet_pascal", "encoder.weights=none"])
    assert (bam.optim.base_lr, bam.optim.lr_multiplier, bam.data.batch_size * bam.trainer.devices) == (0.005, 10.0, 8)
    assert (bam.encoder.bn, bam.data.train_filter) == ("frozen", "drop")
    assert (pfe.optim.base_lr, pfe.data.batch_size, pfe.encoder.bn, pfe.data.train_filter) == (0.0025, 4, "train", "keep")
    instantiate(pfe.model, num_eval_classes=5)


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [  # forypipi/I2R config/{pascal,coco}/resnet50{,_base}.yaml and main.py (batch_size per process, bf16)
        ("i2r_pascal", {"data.train_size": 473, "data.scale_range": [0.9, 1.1], "data.batch_size": 8,
                        "trainer.devices": 1, "trainer.precision": "bf16-mixed", "trainer.max_epochs": 300,
                        "optim.base_lr": 0.05, "optim.lr_multiplier": 1.0, "base_task.train_size": 473,
                        "base_task.batch_size": 16, "base_task.epochs": 200, "ensemble.base_resize": "map"}),
        ("i2r_coco", {"data.train_size": 641, "data.scale_range": [0.8, 1.25], "data.batch_size": 24,
                      "trainer.devices": 1, "trainer.max_epochs": 60, "base_task.train_size": 417,
                      "base_task.batch_size": 3, "base_task.epochs": 20}),
    ],
)  # fmt: skip
def test_i2r_recipes_hold_the_reference_configs(recipe, expected):
    from omegaconf import OmegaConf

    cfg = compose(["method=i2r", "encoder=resnet50_tv", f"recipe={recipe}", "encoder.weights=none"])
    got = {key: OmegaConf.select(cfg, key) for key in expected}
    got = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in got.items()}
    assert got == expected


@pytest.mark.parametrize("method, recipe", [("bam", "bam_pascal"), ("bam", "bam_coco"), ("hdmnet", "hdmnet_pascal"),
                                            ("hdmnet", "hdmnet_coco"), ("sccan_plus", "sccan_plus_pascal"),
                                            ("sccan_plus", "sccan_plus_coco")])  # fmt: skip
def test_bam_stage1_global_batch_is_12_with_batch_statistics_over_all_of_it(method, recipe):
    """BAM's *_base.yaml: batch 3 per GPU on 4 GPUs with SyncBN ("bs12 for 1GPU"): 12 images per step and per BN
    statistic, whatever the recipe's device count (a per-process 12 on 4 GPUs was 48)."""
    cfg = compose(["task=base", f"method={method}", "encoder=resnet50", f"recipe={recipe}", "encoder.weights=none"])
    devices = cfg.trainer.devices if cfg.trainer.devices != -1 else 1
    assert cfg.data.batch_size * devices == 12
    assert cfg.trainer.sync_batchnorm == (devices > 1)


@pytest.mark.parametrize("method, recipe", [(m, f"{r}_{d}") for m, r in (("hdmnet", "hdmnet"), ("hdmnet_pahnet", "hdmnet_pahnet"),
                                            ("sccan_plus", "sccan_plus"), ("sccan_plus_pahnet", "sccan_plus_pahnet"))
                                            for d in ("pascal", "coco", "synth")])  # fmt: skip
def test_bam_based_hosts_follow_their_code_on_paper_recipes(method, recipe):
    """HDMNet's, AENet's and PAHNet's train.py: model.train() then fix_bn, which freezes every *BatchNorm* (HDMNet's
    transformer's too) and nothing else (the frozen learner's Dropout2d trains); SCCANPlus classifies feature 5
    resized to the grid. Paper recipes take the code's behaviour, the embedded ones the constructors' defaults."""
    cfg = compose([f"method={method}", "encoder=resnet50", f"recipe={recipe}", "encoder.weights=none"])
    paper = not recipe.endswith("synth")
    assert cfg.head.base_dropout is paper
    if "hdmnet" in method:
        assert cfg.decoder.bn_eval is paper
    else:
        assert cfg.head.base_logits_at == ("grid" if paper else "feature")


README_RUNS = [line.split("fsseg-train", 1)[1].split("#")[0].replace("\\", "").split()
               for line in (CONF.parent / "README.md").read_text().splitlines() if "/bin/fsseg-train " in line]  # fmt: skip


@pytest.mark.parametrize("args", README_RUNS, ids=[" ".join(a)[:60] for a in README_RUNS])
def test_readme_commands_compose_and_instantiate(args, tmp_path):
    """Every fsseg-train command of the README composes and builds (a sweep: its first value of each key)."""
    overrides = [a.split(",")[0] for a in args if a != "-m" and not a.startswith(("hydra", "encoder.weights"))]
    stage1 = [] if "task=base" in overrides else _stage1_file(overrides, tmp_path)  # stage 2 reads a stage-1 file
    cfg = compose([*overrides, "encoder.weights=none", "hydra.run.dir=/tmp/x", "run_dir=/tmp/x", *stage1])
    extra = {"base_class_ids": list(range(6, 21)), "fold": 0, "dataset": "synth"} if "task=base" in overrides else {"num_eval_classes": 5}
    model = instantiate(cfg.model, **extra)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "predictor").glob("*.yaml")))
def test_predictor_composes_and_names_a_trainable_run(name):
    cfg = compose(["experiment=pfenet_effl0_synth", f"predictor={name}", "data.fold=1"])
    if name == "none":
        assert cfg.model.predictor is None
        return
    p = cfg.model.predictor
    assert p.method == name and p.fold == 1 and p.run.endswith(f"predictors/{name}_{p.recipe}/fold1")
    assert p.encoder == cfg.encoder.name and p.dataset == cfg.data.source.root
    assert compose([f"method={p.method}", f"recipe={p.recipe}"]).method_name == name  # the run it names composes


def test_unknown_predictor_is_named_with_the_choices():
    with pytest.raises(MissingConfigException, match=r"predictor/nope(.|\n)*ssp"):
        compose(["predictor=nope"])
