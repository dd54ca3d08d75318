"""From a DataConfig to train/val loaders: the dataset folder and its format (or the cached synthetic
set), the validated samples, the palette, and the loader kind (plain torch, DALI or the device cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cityseg.config import NO_AUGMENT, DataConfig
from cityseg.data.contract import LoaderSpec, PairLoader, dali_available, make_loader
from cityseg.data.formats import (
    Dataset,
    Source,
    as_source,
    find_dataset,
    read_sample,
    sample_sizes,
    validate_samples,
)
from cityseg.data.pairs import MaskCheck, PairError
from cityseg.palette import Palette, cityscapes_palette, far_share


class DatasetError(PairError):
    """Several bad files: the message names the first and counts the rest."""

    def __init__(self, errors: list[PairError], root: Path) -> None:
        first = errors[0]
        more = len(errors) - 1
        problem = first.problem
        if more:
            problem += f" (and {more} more bad file{'s' if more > 1 else ''}: run `cityseg-fast check-data {root}`)"
        super().__init__(first.path, problem)
        self.errors = errors


def resolve_dataset(cfg: DataConfig) -> Dataset:
    """The user's dataset folder in its layout (`cfg.format`, or detected: the note says which), or
    the cached synthetic set of Kaggle pairs (generated on first use)."""
    if cfg.data_dir is not None:
        return find_dataset(cfg.data_dir, cfg.format)
    from cityseg.data.synth import default_dataset

    return Dataset(default_dataset(n_train=cfg.synth_train, n_val=cfg.synth_val, seed=cfg.synth_seed), "pairs")


def resolve_data_dir(cfg: DataConfig) -> Path:
    """The dataset's folder (`resolve_dataset`)."""
    return resolve_dataset(cfg).root


def train_file_count(cfg: DataConfig) -> int:
    """The train files a run lists (before their check): the synthetic set's size without making it."""
    if cfg.data_dir is None:
        return cfg.synth_train
    return len(find_dataset(cfg.data_dir, cfg.format).samples("train"))


FAR_COLOR_DIST = 60.0  # real Kaggle masks: at most ~3 % of a mask's pixels lie this far from every colour
MAX_FAR_SHARE = 0.2
MASK_SAMPLE = 16  # files whose mask colours are checked when --skip-validate skips the full validation


class MaskColourError(PairError):
    """A mask drawn in colours other than the palette's."""


def palette_mismatch_check(palette: Palette) -> MaskCheck:
    """A mask check that rejects masks drawn in other colours than the palette's, which would
    otherwise map silently to wrong classes."""

    def check(path: Path, mask: np.ndarray) -> None:
        share = far_share(torch.from_numpy(np.ascontiguousarray(mask)), palette, FAR_COLOR_DIST)
        if share > MAX_FAR_SHARE:
            raise MaskColourError(
                path, f"mask colours do not match the palette: {share:.0%} of mask pixels are farther than "
                f"{FAR_COLOR_DIST:g} from every class colour (other colour codes: --palette kmeans:K)"
            )

    return check


def split_files(
    root: Path | Dataset,
    split: str,
    *,
    validate: bool,
    workers: int = 4,
    skip_bad: bool = False,
    mask_check: MaskCheck | None = None,
    palette: Palette | None = None,
    id_map: str = "auto",
) -> tuple[Source, list[PairError]]:
    """List a split (of a Dataset in any format, or a folder of Kaggle pairs) as a loader's Source
    and (by default) validate every sample up front, so a bad file is reported by name before training
    starts instead of failing mid-epoch inside a decoder. Returns (source, skipped): bad files raise
    DatasetError, or with `skip_bad` are left out and returned as skipped."""
    dataset = root if isinstance(root, Dataset) else Dataset(Path(root), "pairs")
    source = dataset.source(split, palette or cityscapes_palette(), id_map)
    mask_check = None if source.ids else mask_check  # class ids have no colours to check
    if not validate:
        if mask_check is not None:
            check_mask_sample(source, mask_check, workers, dataset.root)
        return source, []
    good, bad = validate_samples(source, workers=workers, mask_check=mask_check)
    if bad and not skip_bad:
        raise DatasetError(bad, dataset.root)
    if not good:
        raise DatasetError(bad, dataset.root)
    return source.with_samples([sample for sample, _ in good]), bad


def check_mask_sample(source: Source, mask_check: MaskCheck, workers: int, root: Path) -> None:
    """Mask colours of MASK_SAMPLE samples spread over the split: a dataset in another colour code fails
    at once even with validation skipped. Other problems of those files are left to the loader."""
    sample = source.samples[:: max(1, len(source) // MASK_SAMPLE)][:MASK_SAMPLE]
    _, bad = validate_samples(source.with_samples(sample), workers=workers, mask_check=mask_check)
    mismatched = [e for e in bad if isinstance(e, MaskColourError)]
    if mismatched:
        raise DatasetError(mismatched, root)


KMEANS_SAMPLE_FILES = 64


def resolve_palette(cfg: DataConfig, train_files: Source | list[Path], seed: int = 0) -> Palette:
    """`cityscapes` (default), `kmeans:K` learned from a sample of the train masks (colour masks
    only), or a saved palette .json (e.g. a run folder's palette.json)."""
    if cfg.palette == "cityscapes":
        return cityscapes_palette(cfg.max_color_dist)
    from cityseg.palette_kmeans import parse_palette_spec

    source = as_source(train_files)

    def sample_masks() -> torch.Tensor:
        if source.ids:
            raise PairError(source[0].label, f"--palette {cfg.palette} learns mask colours, but this dataset's "
                            "masks hold class ids: use --palette cityscapes or a palette .json")
        picked = source.samples[:: max(1, len(source) // KMEANS_SAMPLE_FILES)][:KMEANS_SAMPLE_FILES]
        masks = [torch.from_numpy(np.ascontiguousarray(read_sample(f, source)[1])) for f in picked]
        if len({tuple(m.shape) for m in masks}) > 1:  # k-means wants one stack: sizes differ, so resize
            side = min(m.shape[0] for m in masks)
            masks = [m.permute(2, 0, 1) for m in masks]
            masks = [torch.nn.functional.interpolate(m[None].float(), size=(side, side), mode="nearest")[0]
                     .to(torch.uint8).permute(1, 2, 0) for m in masks]
        return torch.stack(masks)

    return parse_palette_spec(cfg.palette, sample_masks, cfg.max_color_dist, seed)


def resolve_loader_kind(cfg: DataConfig, device: torch.device) -> str:
    """torch | dali | cache. auto: DALI on a GPU machine (if importable), the plain loader otherwise;
    `cache: device` is the older spelling of `loader: cache`."""
    if cfg.cache == "device" or cfg.loader == "cache":
        return "cache"
    if cfg.loader != "auto":
        return cfg.loader
    return "dali" if device.type == "cuda" and dali_available() else "torch"


def native_size(files: Source | list[Path]) -> int | tuple[int, int] | None:
    """The labels' own size when they all share one (S for square labels, else (H, W)), else None."""
    source = as_source(files)
    sizes = {label for _, label in (sample_sizes(sample, source) for sample in source)}
    if len(sizes) != 1:
        return None
    h, w = sizes.pop()
    return h if h == w else (h, w)


def loader_spec(cfg: DataConfig, *, train: bool, device: torch.device, dtype: torch.dtype, seed: int,
                shard_id: int = 0, num_shards: int = 1, target_size: int | None = None) -> LoaderSpec:
    """Train loaders shuffle, augment and drop the last partial batch; validation loaders do none of it."""
    augment = cfg.augment if train and cfg.augment != NO_AUGMENT else None
    return LoaderSpec(image_size=cfg.image_size, batch_size=cfg.batch_size, augment=augment, shuffle=train,
                      drop_last=train, device=device, dtype=dtype, workers=cfg.workers, threads=cfg.threads,
                      prefetch=cfg.prefetch,
                      seed=seed, shard_id=shard_id, num_shards=num_shards, hw_decoder_load=cfg.hw_decoder_load,
                      target_size=target_size)


def build_loader(kind: str, files: Source | list[Path], palette: Palette, cfg: DataConfig, *, train: bool,
                 device: torch.device, dtype: torch.dtype, seed: int, shard_id: int = 0,
                 num_shards: int = 1) -> PairLoader:
    """The `kind` loader (see `resolve_loader_kind`) over `files`: the contract of cityseg/data/contract.py.
    Validation targets keep the labels' native size (`cfg.val_native`) when all pairs share one."""
    target = native_size(files) if not train and cfg.val_native else None
    spec = loader_spec(cfg, train=train, device=device, dtype=dtype, seed=seed, shard_id=shard_id,
                       num_shards=num_shards, target_size=target)
    if kind == "cache":  # decoded by the loader named beside it: `--loader dali --cache device`
        from cityseg.data.cache_loader import CacheLoader

        return CacheLoader(files, palette, spec, decoder={"dali": "dali", "torch": "plain"}.get(cfg.loader, "auto"))
    return make_loader(kind, files, palette, spec)
