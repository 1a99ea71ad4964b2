"""EpisodeDataModule: prepare/setup split of work, batches, manifests, Hydra configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsseg.data import batch as B
from fsseg.data.datamodule import EpisodeDataModule
from fsseg.data.sources import FSS1000, PascalVOC

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


def make(source, cache, **kw):
    args = dict(fold=0, shots=1, train_size=48, eval_size=40, mean=MEAN, std=STD, eval_episodes=15,
                val_episodes=6, batch_size=4, eval_batch_size=3, cache_dir=str(cache))  # fmt: skip
    args.update(kw)
    return EpisodeDataModule(source, **args)


def test_pascal_datamodule_end_to_end(voc_root, tmp_path):
    dm = make(PascalVOC(voc_root), tmp_path)
    before = dict(vars(dm))
    dm.prepare_data()
    assert dict(vars(dm)).keys() == before.keys() and all(vars(dm)[k] is v for k, v in before.items())
    assert any((tmp_path / "pixel_tables").iterdir())
    dm.setup("fit")
    assert dm.novel_class_ids == [1, 2, 3, 4, 5] and dm.num_novel_classes == 5
    assert dm.base_class_ids == list(range(6, 21)) and dm.class_names[0] == "aeroplane"
    assert dm.novel_class_names == ["aeroplane", "bicycle", "bird", "boat", "bottle"]

    loader = dm.train_dataloader()
    assert len(loader.dataset) == 11  # one episode per qualifying training image
    batch = next(iter(loader))
    assert batch[B.QUERY_IMG].shape == (4, 3, 48, 48) and batch[B.SUPPORT_IMGS].shape == (4, 1, 3, 48, 48)
    assert batch[B.QUERY_MASK].shape == (4, 48, 48) and batch[B.SUPPORT_MASKS].shape == (4, 1, 48, 48)
    assert batch[B.QUERY_BASE_LABEL].shape == (4, 48, 48) and batch[B.CLASS_ID].shape == (4,)
    assert B.QUERY_LABEL_ORI not in batch
    assert all(6 <= c <= 20 for c in batch[B.CLASS_ID].tolist())
    assert torch.equal(batch[B.CLASS_IDX], batch[B.CLASS_ID] - 6)

    val = next(iter(dm.val_dataloader()))
    assert val[B.QUERY_IMG].shape == (3, 3, 40, 40) and val[B.QUERY_LABEL_ORI].dtype == torch.int64
    assert val[B.EPISODE_IDX].tolist() == [0, 1, 2] and val[B.ORI_SIZE].shape == (3, 2)
    test_batches = list(dm.test_dataloader())
    assert sum(len(b[B.EPISODE_IDX]) for b in test_batches) == 15

    man = dm.eval_manifest
    assert len(man.episodes) == 15 and man.path.is_file() and man.seed == 321 and len(man.hash) == 64
    assert dm.val_manifest.seed == 322 and dm.val_manifest.hash != man.hash
    dm2 = make(PascalVOC(voc_root), tmp_path)  # a second run reuses the saved manifests
    dm2.setup("test")
    assert dm2.eval_manifest.hash == man.hash and dm2.eval_manifest.path == man.path
    assert dm2.train_dataset is None  # stage "test" builds no training episodes


def test_train_loader_is_reproducible_with_workers(voc_root, tmp_path):
    def first_epoch(num_workers):
        dm = make(PascalVOC(voc_root), tmp_path, num_workers=num_workers, train_episodes_per_epoch=8, seed=3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        return list(loader)

    a, b = first_epoch(0), first_epoch(2)
    assert len(a) == 2
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_fss_datamodule_uses_split_classes(fss_root, tmp_path):
    dm = make(FSS1000(fss_root), tmp_path, min_pixels=1, eval_split="test", eval_episodes=6, val_episodes=2)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.novel_class_ids == [5, 6] and dm.num_novel_classes == 2 and dm.base_class_ids == [1, 2, 3]
    batch = next(iter(dm.test_dataloader()))
    assert set(batch[B.CLASS_ID].tolist()) <= {5, 6}
    assert set(batch[B.QUERY_MASK].unique().tolist()) <= {0, 1, 255}
    train = next(iter(dm.train_dataloader()))
    assert set(train[B.CLASS_ID].tolist()) <= {1, 2, 3}


@pytest.mark.parametrize("name, reader", [("pascal", "PascalVOC"), ("coco", "COCO"), ("fss1000", "FSS1000"),
                                          ("synth", "PascalVOC")])  # fmt: skip
def test_hydra_data_configs_instantiate(name, reader, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "paths": {"data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")},
            "encoder": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "seed": 0,
            "data": OmegaConf.load(CONF / f"{name}.yaml"),
        }
    )
    dm = instantiate(cfg.data)  # no file access: the data folders do not exist
    assert isinstance(dm, EpisodeDataModule) and type(dm.source).__name__ == reader
    assert str(dm.source.root).startswith(str(tmp_path / "data"))
    sizes = {"pascal": (473, 1000), "coco": (641, 4000), "fss1000": (473, 2400), "synth": (128, 1000)}
    expected = sizes[name]
    assert (dm.train_size, dm.eval_episodes) == expected and dm.fold == 0 and dm.shots == 1
    if name == "pascal":
        assert dm.source.root == tmp_path / "data" / "VOCdevkit" / "VOC2012"
    if name == "synth":
        assert dm.source.root == tmp_path / "data" / "synth"


def test_lightning_fit_advances_the_episode_epoch(voc_root, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.train_sums: dict[int, list[float]] = {}
            self.val_episodes: list[int] = []

        def training_step(self, batch, _):
            total = round(batch[B.QUERY_IMG].sum().item(), 3)
            self.train_sums.setdefault(self.current_epoch, []).append(total)
            return self.w.sum() * 0.0

        def validation_step(self, batch, _):
            self.val_episodes += batch[B.EPISODE_IDX].tolist()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = make(PascalVOC(voc_root), tmp_path, train_episodes_per_epoch=8, seed=1)
    probe = Probe()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(probe, datamodule=dm)
    assert sorted(probe.val_episodes) == sorted(list(range(6)) * 2)  # validation manifest, once per epoch
    loader = dm.train_dataloader()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        expected = [round(b[B.QUERY_IMG].sum().item(), 3) for b in loader]
        assert probe.train_sums[epoch] == expected
    assert probe.train_sums[0] != probe.train_sums[1]


def test_datasets_pickle_for_spawned_workers(voc_root, tmp_path):
    import pickle

    dm = make(PascalVOC(voc_root), tmp_path)
    dm.setup("fit")
    for ds, i in ((dm.train_dataset, 5), (dm.test_dataset, 2)):
        copy = pickle.loads(pickle.dumps(ds))
        a, b = ds[i], copy[i]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_query_subsets_split_images_by_base_class(voc_root, tmp_path):
    """eval_queries=with_base|without_base: novel-class episodes whose queries hold a qualifying base class or none.
    Training split, min_pixels=1: class 1 sits in t00 and t04 (with base classes: under train_filter=keep they were
    training queries, their class-1 pixels trained as background) and in t10 (class 1 only: never used by
    training); supports come from all three, and the partition does not depend on train_filter. Validation
    split: v00 (1 + base 6) and v06 (2 + base 7) hold a base class, the other images none."""
    from fsseg.data.sources import PascalVOC as VOC

    train, val = VOC(voc_root).item_names("train"), VOC(voc_root).item_names("val")
    queries: dict[tuple, set] = {}
    for split, subset, flt in (("train", "with_base", "keep"), ("train", "without_base", "keep"),
                               ("train", "with_base", "drop"), ("val", "with_base", "keep"),
                               ("val", "without_base", "keep")):  # fmt: skip
        dm = make(VOC(voc_root), tmp_path, min_pixels=1, eval_split=split, eval_queries=subset, eval_episodes=12,
                  train_filter=flt)  # fmt: skip
        dm.setup("test")
        assert dm.novel_class_ids == [1, 2, 3, 4, 5]
        man = dm.eval_manifest
        assert subset in man.path.name and man.split == split
        queries[split, subset, flt] = {ep.query for ep in man.episodes}
        for ep in man.episodes:
            assert ep.query not in ep.supports
            if split == "train":
                assert ep.class_id == 1 and set(ep.supports) <= {train[0], train[4], train[10]}
        if split == "train":
            batch = next(iter(dm.test_dataloader()))
            fg = (batch[B.QUERY_LABEL_ORI] == 1).flatten(1).sum(1).tolist()
            assert set(fg) <= {2047, 500, 4000}  # the class-1 pixel counts painted in t00, t04, t10
    assert queries["train", "with_base", "keep"] == queries["train", "with_base", "drop"] == {train[0], train[4]}
    assert queries["train", "without_base", "keep"] == {train[10]}
    assert queries["val", "with_base", "keep"] == {val[0], val[6]}
    assert queries["val", "without_base", "keep"] == {val[k] for k in (1, 2, 3, 4, 5, 7, 8)}


@pytest.mark.parametrize("kw, match", [
    (dict(eval_split="train"), r"data.eval_split='train': expected one of \['val'\] .*got 'all'"),
    (dict(eval_split="train", eval_queries="with_base", eval_classes="base"), r"needs data.eval_classes='novel'"),
    (dict(eval_queries="seen"), r"data.eval_queries='seen': expected one of \['all', 'with_base', 'without_base'\]"),
])  # fmt: skip
def test_query_subsets_bad_config(voc_root, tmp_path, kw, match):
    from fsseg.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        make(PascalVOC(voc_root), tmp_path, **kw)


def test_query_subset_without_queries_is_named(voc_root, tmp_path):
    from fsseg.errors import DataError

    # min_pixels 2048: class 1 qualifies only in t10 (no base class), too few images for an episode anyway
    dm = make(PascalVOC(voc_root), tmp_path, eval_split="train", eval_queries="with_base")
    with pytest.raises(DataError, match=r"eval_queries='with_base': no pascal train image of fold 0"):
        dm.setup("test")
