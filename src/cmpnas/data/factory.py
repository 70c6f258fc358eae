"""``build_data(cfg)``: one entry point from a :class:`DataConfig` to a ready :class:`DataBundle`.

A source (registered in :data:`DATA_SOURCES`) yields a train pool and a test set; this module then
applies the same steps to every source: stratified subsets, the val split, and mean/std.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cmpnas.config import DataConfig
from cmpnas.data import deepfashion2, digits, fashion_mnist, folder, synthetic
from cmpnas.data.base import (
    DataBundle,
    ImageDataset,
    SourceSplits,
    TensorImageDataset,
    compute_mean_std,
    hold_out_classes,
    split_train_val,
    stratified_subset,
)
from cmpnas.data.transforms import resize_uint8
from cmpnas.errors import CmpnasError
from cmpnas.registry import Registry

VAL_MAX_FRACTION = 0.2  # val never takes more than this share of the training pool
SYNTHETIC_DEFAULT_TRAIN, SYNTHETIC_DEFAULT_TEST = 2000, 500
# Sub-seeds: each random step gets its own stream, so changing one setting does not reshuffle the others.
_SEED_SUBSET_TRAIN, _SEED_SUBSET_TEST, _SEED_VAL, _SEED_STATS, _SEED_OPEN_SET = 1, 2, 3, 4, 6


def _fashion_mnist_source(cfg: DataConfig) -> SourceSplits:
    train_x, train_y, test_x, test_y = fashion_mnist.load_fashion_mnist(cfg.root, download=cfg.download)
    notes = []
    datasets = []
    for images, labels in ((train_x, train_y), (test_x, test_y)):
        x = torch.from_numpy(images).unsqueeze(1)
        if cfg.image_size != x.shape[-1]:
            x = resize_uint8(x, cfg.image_size)
        if cfg.in_chans == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        datasets.append(TensorImageDataset(x, labels))
    if cfg.image_size != train_x.shape[-1]:
        notes.append(f"images resized from {train_x.shape[-1]} to {cfg.image_size} pixels")
    if cfg.in_chans == 3:
        notes.append("grayscale images repeated to 3 channels (data.in_chans=3)")
    return _maybe_open_set(
        cfg,
        SourceSplits(
            train=datasets[0],
            test=datasets[1],
            class_names=list(fashion_mnist.CLASS_NAMES),
            num_classes=len(fashion_mnist.CLASS_NAMES),
            in_chans=cfg.in_chans,
            image_size=cfg.image_size,
            notes=notes,
        ),
    )


def _digits_source(cfg: DataConfig) -> SourceSplits:
    return _maybe_open_set(cfg, digits.load_digits_splits(cfg.image_size, cfg.in_chans, seed=cfg.seed))


def _maybe_open_set(cfg: DataConfig, source: SourceSplits) -> SourceSplits:
    if not cfg.open_set:
        return source
    return hold_out_classes(source, cfg.open_set_test_fraction, cfg.val_size, seed=[cfg.seed, _SEED_OPEN_SET])


def _folder_options(cfg: DataConfig) -> dict:
    return {
        "image_size": cfg.image_size,
        "in_chans": cfg.in_chans,
        "open_set": cfg.open_set,
        "open_set_test_fraction": cfg.open_set_test_fraction,
        "on_bad_image": cfg.on_bad_image,
        "seed": cfg.seed,
    }


def _folder_source(cfg: DataConfig) -> SourceSplits:
    return folder.load_image_folder(cfg.root, **_folder_options(cfg))


def _csv_source(cfg: DataConfig) -> SourceSplits:
    if cfg.root is None:
        raise CmpnasError(
            "data.name=csv needs data.root.", "set data.root to the CSV manifest (path,label[,split])"
        )
    return folder.load_csv_manifest(cfg.root, **_folder_options(cfg))


def _synthetic_source(cfg: DataConfig) -> SourceSplits:
    return synthetic.make_synthetic_splits(
        cfg.subset_train or SYNTHETIC_DEFAULT_TRAIN,
        cfg.subset_test or SYNTHETIC_DEFAULT_TEST,
        num_classes=10,
        image_size=cfg.image_size,
        in_chans=cfg.in_chans,
        seed=cfg.seed,
    )


def _deepfashion2_source(cfg: DataConfig) -> SourceSplits:
    """Ground-truth-box item crops: the train split for train/val, the validation split for test.

    With identity labels the validation split's products are new ones, so its labels are numbered after
    the training classes (an open-set test, like data.open_set for folders).
    """
    if cfg.root is None:
        raise CmpnasError(
            "data.name=deepfashion2 needs data.root.",
            "set data.root to the folder holding train/{image,annos} and validation/{image,annos}",
        )
    crops = {
        split: deepfashion2.DeepFashion2Crops(
            deepfashion2.read_deepfashion2(cfg.root, split, max_images=cfg.max_images),
            cfg.image_size,
            in_chans=cfg.in_chans,
            margin=cfg.margin,
            label=cfg.label,
        )
        for split in ("train", "validation")
    }
    train, test = crops["train"], crops["validation"]
    class_names = [_deepfashion2_class_name(c, cfg.label) for c in train.classes]
    open_set = cfg.label == "identity"
    if open_set:
        # the crop dataset reads its labels from this tensor, so shifting it renumbers the test classes
        test.labels = test.labels + train.num_classes
        class_names += [_deepfashion2_class_name(c, cfg.label) for c in test.classes]
    notes = [
        f"DeepFashion2 {cfg.label} labels: {len(train)} train crops ({train.num_classes} classes), "
        f"{len(test)} validation crops as the test set"
    ]
    if cfg.max_images is not None:
        notes.append(f"only the first {cfg.max_images} annotation files of each split were read")
    return SourceSplits(
        train=train,
        test=test,
        class_names=class_names,
        num_classes=train.num_classes,
        in_chans=cfg.in_chans,
        image_size=cfg.image_size,
        open_set=open_set,
        notes=notes,
    )


def _deepfashion2_class_name(cls: object, label: str) -> str:
    if label == "identity":
        pair_id, style = cls  # type: ignore[misc]
        return f"pair{pair_id}_style{style}"
    return f"category{cls}"


def _ijbc_train_source(cfg: DataConfig) -> SourceSplits:
    """Face training data: an ImageFolder of aligned identities (MS1M style, one folder per person)."""
    records = folder.scan_image_folder(cfg.root)
    if cfg.max_images is not None:
        records = records[: cfg.max_images]
    source = folder.build_source(records, **_folder_options(cfg))
    if (cfg.image_size, cfg.in_chans) != (112, 3):
        source.notes.append(
            f"faces used at {cfg.in_chans}x{cfg.image_size}px; IJB-C evaluation aligns faces to 3x112px "
            "(set data.image_size=112, data.in_chans=3)"
        )
    if cfg.max_images is not None:
        source.notes.append(f"only the first {cfg.max_images} images (in folder order) were read")
    return source


DATA_SOURCES: Registry[Callable[[DataConfig], SourceSplits]] = Registry("data source", {
    "fashion_mnist": _fashion_mnist_source,
    "folder": _folder_source,
    "csv": _csv_source,
    "synthetic": _synthetic_source,
    "digits": _digits_source,
    "deepfashion2": _deepfashion2_source,
    "ijbc_train": _ijbc_train_source,
})

OPEN_SET_SOURCES = frozenset({"folder", "csv", "ijbc_train", "fashion_mnist", "digits"})


def build_data(cfg: DataConfig) -> DataBundle:
    """Load ``cfg.name``, then subset (stratified), split val from train and compute mean/std."""
    source_fn = DATA_SOURCES.get(cfg.name)
    if source_fn is None:
        raise CmpnasError(
            f"Unknown data.name '{cfg.name}'.", f"use one of: {', '.join(sorted(DATA_SOURCES))}"
        )
    if cfg.open_set and cfg.name not in OPEN_SET_SOURCES:
        raise CmpnasError(
            f"data.open_set is not supported for data.name={cfg.name}.",
            f"set data.open_set=false, or use one of: {', '.join(sorted(OPEN_SET_SOURCES))}",
        )
    source = source_fn(cfg)
    notes = list(source.notes)
    pool = _subset(source.train, cfg.subset_train, [cfg.seed, _SEED_SUBSET_TRAIN], "train", notes)
    test = _subset(source.test, cfg.subset_test, [cfg.seed, _SEED_SUBSET_TEST], "test", notes)
    if source.val is not None:
        train, val = pool, source.val
    else:
        val_size = min(cfg.val_size, int(VAL_MAX_FRACTION * len(pool)))
        if val_size < cfg.val_size:
            notes.append(
                f"val_size clipped from {cfg.val_size} to {val_size} "
                f"(at most {VAL_MAX_FRACTION:.0%} of the {len(pool)} training images)"
            )
        train_idx, val_idx = split_train_val(pool.labels, val_size, seed=[cfg.seed, _SEED_VAL])
        train, val = pool.subset(train_idx), pool.subset(val_idx)
    if len(train) == 0 or len(test) == 0:
        raise CmpnasError(
            f"Data '{cfg.name}' has {len(train)} training and {len(test)} test images after splitting.",
            "use more images, or raise data.subset_train / data.subset_test",
        )
    mean, std = compute_mean_std(train, seed=[cfg.seed, _SEED_STATS])
    return DataBundle(
        name=cfg.name,
        train=train,
        val=val,
        test=test,
        num_classes=source.num_classes,
        in_chans=source.in_chans,
        image_size=source.image_size,
        mean=mean,
        std=std,
        class_names=list(source.class_names),
        open_set=source.open_set,
        notes=notes,
    )


def _subset(
    ds: ImageDataset, size: int | None, seed: list[int], split: str, notes: list[str]
) -> ImageDataset:
    if size is None:
        return ds
    if size >= len(ds):
        notes.append(f"subset_{split}={size} >= the {len(ds)} {split} images available: using all")
        return ds
    notes.append(f"{split}: stratified subset of {size} of {len(ds)} images")
    return ds.subset(stratified_subset(ds.labels, size, seed=seed))
