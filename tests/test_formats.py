"""The format layer (cityseg/data/formats.py): the same tiny scenes saved as Kaggle pairs, as image/mask
folders (colour masks and class-id masks) and as the official Cityscapes layout give every loader the
very same batches; labelIds map to trainIds exactly; the official layout is read over several cities
at 2:1; bad files of every format are one line naming the file; the layout is detected and said."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image

from cityseg.config import AugmentConfig, DataConfig
from cityseg.data.check import check_dataset
from cityseg.data.contract import LOADERS, LoaderSpec, make_loader, normalize
from cityseg.data.formats import Dataset, Source, _table_on, cityscapes_id_table, find_dataset, labels_to_ids
from cityseg.data.loaders import build_loader, split_files
from cityseg.data.pairs import PairError
from cityseg.errors import UserError
from cityseg.palette import IGNORE_INDEX, cityscapes_palette

PALETTE = cityscapes_palette()
KINDS = sorted(LOADERS)
# Written out (the reference): the first labelId of each trainId 0..18, and labelIds that are void.
LABEL_ID_OF_TRAIN_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
VOID_LABEL_IDS = [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]
LAYOUTS = ("pairs", "folders", "folders-ids", "cityscapes")


def scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(photo (h, w, 3) uint8, train ids (h, w) with 255 void) of 4 x 4 blocks."""
    blocks = rng.integers(0, 20, (4, 4))
    blocks[blocks == 19] = IGNORE_INDEX
    ids = np.kron(blocks, np.ones((h // 4, w // 4), dtype=np.int64)).astype(np.uint8)
    colours = colour_mask(ids)
    photo = np.clip(colours * 0.7 + rng.normal(0, 12, colours.shape), 0, 255).astype(np.uint8)
    return photo, ids


def colour_mask(ids: np.ndarray) -> np.ndarray:
    """Train ids -> their palette colours; void drawn black (Cityscapes 'unlabeled')."""
    out = np.zeros((*ids.shape, 3), np.uint8)
    known = ids != IGNORE_INDEX
    out[known] = PALETTE.colors.numpy()[ids[known]]
    return out


def label_ids(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Train ids -> Cityscapes labelIds, void pixels drawn from every void labelId."""
    out = np.asarray(LABEL_ID_OF_TRAIN_ID + [0], np.uint8)[np.minimum(ids, 19)]
    void = ids == IGNORE_INDEX
    out[void] = rng.choice(VOID_LABEL_IDS, int(void.sum()))
    return out


def save(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)
    return path


def write_sample(root: Path, layout: str, split: str, i: int, photo: np.ndarray, ids: np.ndarray,
                 rng: np.random.Generator, city: str = "aachen") -> None:
    """Scene i (1-based) of `split` in `layout`, lossless PNG throughout."""
    if layout == "pairs":
        save(root / split / f"{i}.png", np.concatenate([photo, colour_mask(ids)], axis=1))
    elif layout == "folders":  # mmseg's img_dir/ann_dir: images/{split}/, masks/{split}/
        save(root / "images" / split / f"{i}.png", photo)
        save(root / "masks" / split / f"{i}.png", colour_mask(ids))
    elif layout == "folders-ids":  # the other folder layout, masks of train ids (8-bit grayscale)
        save(root / split / "images" / f"{i}.png", photo)
        save(root / split / "masks" / f"{i}.png", ids)
    else:
        stem = f"{city}_000000_{i:06d}"
        save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", photo)
        save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids(ids, rng))


@pytest.fixture(scope="module")
def scenes() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(7)
    return {"train": [scene(rng, 32, 32) for _ in range(6)], "val": [scene(rng, 32, 32) for _ in range(3)]}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory, scenes) -> dict[str, Path]:
    """The same scenes in every layout."""
    roots = {}
    for layout in LAYOUTS:
        root = roots[layout] = tmp_path_factory.mktemp(layout)
        rng = np.random.default_rng(1)
        for split, items in scenes.items():
            for i, (photo, ids) in enumerate(items, 1):
                write_sample(root, layout, split, i, photo, ids, rng)
    return roots


def spec(**kw) -> LoaderSpec:
    args = dict(image_size=32, batch_size=4, augment=None, shuffle=False, drop_last=False, workers=0, threads=1)
    return LoaderSpec(**{**args, **kw})


def first_batches(kind: str, root: Path, split: str = "train", **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    source, _ = split_files(find_dataset(root), split, validate=True, workers=1, palette=PALETTE)
    with make_loader(kind, source, PALETTE, spec(**kw)) as loader:
        loader.set_epoch(0)
        return list(loader)


# ---------------------------------------------------------------- one contract, every format, every loader


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("image_size", [32, 16])
def test_every_format_gives_every_loader_the_same_batches(layouts, scenes, kind: str, image_size: int) -> None:
    """Validation epochs (augmentation off) are bit-identical across layouts, and at the files' own size
    equal the scenes normalised by hand and their train ids."""
    reference = first_batches(kind, layouts["pairs"], image_size=image_size)
    for layout in LAYOUTS[1:]:
        batches = first_batches(kind, layouts[layout], image_size=image_size)
        assert len(batches) == len(reference) == 2
        for (image, target), (ref_image, ref_target) in zip(batches, reference, strict=True):
            assert torch.equal(target, ref_target), (kind, layout)
            assert torch.equal(image, ref_image), (kind, layout)
    if image_size == 32:
        photos = torch.stack([torch.from_numpy(p) for p, _ in scenes["train"]]).permute(0, 3, 1, 2)
        ids = torch.stack([torch.from_numpy(i) for _, i in scenes["train"]]).long()
        images = torch.cat([image for image, _ in reference])
        assert torch.equal(torch.cat([target for _, target in reference]), ids)
        tolerance = 0.1 if kind == "dali" else 1e-6  # DALI normalises in its own operator
        assert (images - normalize(photos)).abs().max().item() < tolerance


@pytest.mark.parametrize("kind", KINDS)
def test_first_shuffled_training_batch_is_the_same_in_every_format(layouts, kind: str) -> None:
    """Shuffled, drop-last training order (augmentation off): the separate photo and label readers
    keep in step and follow the same permutation as the pair reader."""
    train = dict(shuffle=True, drop_last=True, seed=3)
    ref_image, ref_target = first_batches(kind, layouts["pairs"], **train)[0]
    for layout in LAYOUTS[1:]:
        image, target = first_batches(kind, layouts[layout], **train)[0]
        assert torch.equal(image, ref_image) and torch.equal(target, ref_target), (kind, layout)


@pytest.mark.parametrize("kind", KINDS)
def test_warp_fill_is_void_for_class_id_masks(tmp_path: Path, kind: str) -> None:
    """Train-id masks: id 0 (road) is a class, so the rotation's fill must still become 255, not road."""
    rng = np.random.default_rng(0)
    for i in range(1, 5):
        write_sample(tmp_path, "folders-ids", "train", i, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                     np.zeros((32, 32), np.uint8), rng)
    source = Dataset(tmp_path, "folders").source("train", PALETTE)
    assert source.ids and int(source.id_table[0]) == 0
    augment = AugmentConfig(hflip=0.0, rotate_deg=45.0)
    with make_loader(kind, source, PALETTE, spec(augment=augment, shuffle=True, drop_last=True)) as loader:
        (_, target), = list(loader)
    corners = target[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == IGNORE_INDEX).float().mean() > 0.5  # 45 degrees leaves most corners uncovered
    assert set(target.unique().tolist()) <= {0, IGNORE_INDEX} and (target == 0).any()


# ---------------------------------------------------------------- id maps


def test_cityscapes_label_ids_map_to_train_ids_exactly() -> None:
    table = cityscapes_id_table()
    assert table.dtype == torch.uint8 and table.shape == (256,)
    assert table[LABEL_ID_OF_TRAIN_ID].tolist() == list(range(19))
    assert (table[VOID_LABEL_IDS] == IGNORE_INDEX).all()
    assert (table[34:] == IGNORE_INDEX).all()  # no labelId beyond 33 (license plate is -1)
    assert int((table != IGNORE_INDEX).sum()) == 19
    # Every labelId's colour maps through the palette to the class its id maps to (pole/polegroup:
    # one colour, polegroup void by id but pole by colour, so it is left out).
    for label in CITYSCAPES_LABELS:
        if label.id >= 0 and label.name != "polegroup":
            colour = torch.tensor(label.color, dtype=torch.uint8).view(1, 1, 1, 3)
            assert int(labels_to_ids(colour, Source(()), PALETTE)) == int(table[label.id]), label.name


def test_ids_are_mapped_on_the_labels_device_from_a_table_copied_once() -> None:
    source = Source((), "cityscapes", cityscapes_id_table())
    label = torch.tensor([[7, 26, 0, 33, 255]], dtype=torch.uint8)
    assert labels_to_ids(label, source, PALETTE).tolist() == [[0, 13, 255, 18, 255]]
    assert labels_to_ids(label[..., None], source, PALETTE, torch.uint8).dtype == torch.uint8  # (H, W, 1): DALI's
    assert _table_on(source.id_table, torch.device("cpu")) is _table_on(source.id_table, torch.device("cpu"))


# ---------------------------------------------------------------- the official layout


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A leftImg8bit/gtFine tree of 2:1 frames (64 x 32) over several cities; train ids by photo name."""
    root = tmp_path_factory.mktemp("official")
    rng = np.random.default_rng(3)
    truth = {}
    for split, cities in (("train", {"zurich": 2, "aachen": 2, "bochum": 1}), ("val", {"lindau": 2})):
        for city, n in cities.items():
            for i in range(1, n + 1):
                photo, ids = scene(rng, 32, 64)
                write_sample(root, "cityscapes", split, i, photo, ids, rng, city=city)
                truth[f"{city}_000000_{i:06d}_leftImg8bit.png"] = ids
    return root, truth


def test_official_layout_over_several_cities(official) -> None:
    root, truth = official
    dataset = find_dataset(root)
    assert dataset.format == "cityscapes" and "--format cityscapes" in dataset.note
    train = dataset.source("train", PALETTE)
    assert [s.photo.parent.name for s in train] == ["aachen", "aachen", "bochum", "zurich", "zurich"]
    for sample in train:
        assert sample.label.name == sample.photo.name.replace("_leftImg8bit", "_gtFine_labelIds")
        assert sample.label.parent.name == sample.photo.parent.name and sample.label.parts[-4] == "gtFine"
    # Training squashes the whole 2:1 frame to S x S (the Kaggle set's own policy); validation scores
    # at the labels' native 32 x 64, every pixel the scene's train id.
    cfg = DataConfig(image_size=16, batch_size=2, workers=0)
    with build_loader("torch", train, PALETTE, cfg, train=True, device=torch.device("cpu"), dtype=torch.float32,
                      seed=0) as loader:
        image, target = next(iter(loader))
    assert image.shape == (2, 3, 16, 16) and target.shape == (2, 16, 16)
    val = dataset.source("val", PALETTE)
    for kind in KINDS:
        with build_loader(kind, val, PALETTE, cfg, train=False, device=torch.device("cpu"), dtype=torch.float32,
                          seed=0) as loader:
            assert loader.spec.label_hw == (32, 64)
            (image, target), = list(loader)
        assert image.shape == (2, 3, 16, 16) and target.shape == (2, 32, 64), kind
        expected = torch.stack([torch.from_numpy(truth[s.photo.name]) for s in val]).long()
        assert torch.equal(target, expected), kind


# ---------------------------------------------------------------- detection


def test_layouts_are_detected_and_said(layouts, tmp_path: Path) -> None:
    expected = {"pairs": "pairs", "folders": "folders", "folders-ids": "folders", "cityscapes": "cityscapes"}
    for layout, root in layouts.items():
        dataset = find_dataset(root)
        assert (dataset.format, dataset.root) == (expected[layout], root)
        assert f"--format {expected[layout]}" in dataset.note and "\n" not in dataset.note
    nested = tmp_path / "download"
    nested.mkdir()
    (nested / "cityscapes").symlink_to(layouts["cityscapes"])
    assert find_dataset(nested).root == nested / "cityscapes"  # the one folder below holding a dataset
    with pytest.raises(PairError, match="not a cityscapes dataset: expected leftImg8bit/ and gtFine/"):
        find_dataset(layouts["pairs"], "cityscapes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairError, match="no dataset here"):
        find_dataset(tmp_path / "empty")


# ---------------------------------------------------------------- bad files: one line naming the file


def _break(root: Path, case: str) -> Path:
    """Spoil one file of a copy of a layout; returns the file the message must name."""
    if case == "truncated pair":
        bad = root / "train" / "2.png"
        bad.write_bytes(bad.read_bytes()[:200])
    elif case == "photo without mask":
        (root / "masks" / "train" / "2.png").unlink()
        bad = root / "images" / "train" / "2.png"
    elif case == "mask of another size":
        bad = save(root / "masks" / "train" / "2.png", np.zeros((16, 32, 3), np.uint8))
    elif case == "grayscale photo":
        bad = save(root / "images" / "train" / "2.png", np.zeros((32, 32), np.uint8))
    elif case == "colour mask among class-id masks":
        bad = save(root / "train" / "masks" / "2.png", np.zeros((32, 32, 3), np.uint8))
    elif case == "missing label":
        bad = next((root / "gtFine" / "train" / "aachen").glob("*000002_gtFine_labelIds.png"))
        bad.unlink()
    elif case == "JPEG label":
        bad = next((root / "gtFine" / "train" / "aachen").glob("*000002_gtFine_labelIds.png"))
        save(bad, np.zeros((32, 32), np.uint8), "JPEG")
    else:  # truncated label
        bad = next((root / "gtFine" / "train" / "aachen").glob("*000002_gtFine_labelIds.png"))
        bad.write_bytes(bad.read_bytes()[:100])
    return bad


BAD_CASES = [("pairs", "truncated pair", "truncated"), ("folders", "photo without mask", "no mask named 2.png"),
             ("folders", "mask of another size", "mask is 32x16 but its photo is 32x32"),
             ("folders", "grayscale photo", "grayscale image, expected 8-bit RGB"),
             ("folders-ids", "colour mask among class-id masks", "RGB colour mask among class-id masks"),
             ("cityscapes", "missing label", "missing label of aachen_000000_000002_leftImg8bit.png"),
             ("cityscapes", "JPEG label", "class-id mask stored as JPEG"),
             ("cityscapes", "truncated label", "truncated")]


@pytest.mark.parametrize(("layout", "case", "problem"), BAD_CASES, ids=[c for _, c, _ in BAD_CASES])
def test_a_bad_file_is_one_line_naming_it(layouts, tmp_path: Path, layout: str, case: str, problem: str) -> None:
    import shutil

    root = shutil.copytree(layouts[layout], tmp_path / layout)
    bad = _break(root, case)
    with pytest.raises(UserError) as caught:
        split_files(find_dataset(root), "train", validate=True, workers=1, palette=PALETTE)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{bad}: ") and problem in message, message
    if case not in ("photo without mask", "missing label"):  # listing errors stop check-data itself
        report = check_dataset(root, workers=1, sample=2)
        assert [str(e.path) for e in report.bad] == [str(bad)]


def test_dali_names_a_bad_label_met_mid_epoch(layouts, tmp_path: Path) -> None:
    """Validation skipped: DALI meets the truncated label itself and names it in one line."""
    import shutil

    root = shutil.copytree(layouts["cityscapes"], tmp_path / "cs")
    bad = _break(root, "truncated label")
    source, _ = split_files(find_dataset(root), "train", validate=False, palette=PALETTE)
    with pytest.raises(PairError) as caught, make_loader("dali", source, PALETTE, spec()) as loader:
        list(loader)
    assert str(caught.value).startswith(f"{bad}: ") and "\n" not in str(caught.value)


def test_loader_benchmark_measures_the_official_png_layout(tmp_path: Path) -> None:
    """`benchmarks/loader.py --format cityscapes`: synthetic pairs rewritten as 2:1 PNG frames with
    labelIds, read by the plain loader and DALI (CPU) alike."""
    from benchmarks import loader as bench

    record = bench.run(["--format", "cityscapes", "--n", "4", "--batch-size", "2", "--reps", "1", "--loaders",
                        "torch,dali-cpu", "--workers", "0", "--max-workers", "1", "--synth-size", "32",
                        "--image-size", "32", "--augment", "none", "--json", str(tmp_path / "loader.json")])
    assert record["config"]["format"] == "cityscapes" and "official layout, 64x32 PNG" in record["config"]["data"]
    assert {r["label"]: r["images_per_epoch"] for r in record["results"]} == {"torch w0": 4, "dali-cpu": 4}
