"""The DALI loader: each format's reader (`fn.readers.file` over the pair files, or over the photo
files and, in step, the label files) -> decode ("mixed" on a GPU, CPU otherwise; PNG always decodes
on the CPU, DALI's GPU decoding being JPEG-only) -> photo and label -> paired augmentation ->
`crop_mirror_normalize` for the photo; the label mapped to class ids on the device: colour masks by
the Triton kernel (or the CPU lookup table), class-id masks by the 256-entry id table.

    loader = DaliPairLoader(files, palette, LoaderSpec(image_size=256, batch_size=32, augment=AugmentConfig(),
                                                       shuffle=True, drop_last=True, device=torch.device("cuda")))
    for image, target in loader: ...

Same contract and epoch as `TorchPairLoader`: the reader gets the plain loader's shards (each padded
to ceil(n / num_shards) like its sampler), so the number of batches, the last partial batch and the
samples of an unshuffled split match it exactly. Training order is a global permutation per epoch,
the same on every rank (`shuffle_after_epoch`), so DDP shards partition each epoch like the sampler's.

Augmentation draws one affine per sample (flip, rotation, zoom, shift; the distribution of
torchvision's `RandomHorizontalFlip` + `RandomAffine` in the plain loader) and warps photo and mask
with the same matrix; the mask is resampled nearest and filled with a colour that maps to 255.
Colour jitter (`fn.color_twist`, applied at once rather than in torchvision's random order, contrast
around mid-grey rather than the image mean) touches the photo only.

DALI cannot seek: `set_epoch(e, start_batch)` (mid-epoch resume) decodes the epoch from its start
and skips `start_batch` batches, and an epoch abandoned half-way (a `break`) rebuilds the pipeline.
The order and the augmentation draws follow DALI's own epoch counter and seeds, not `e`: a resumed
run sees other (equally random) orders than an uninterrupted one.

Errors: a file DALI fails to read or decode becomes the validator's one-line `PairError` naming it.
DALI's libjpeg-turbo only warns on garbage inside the entropy-coded data (Pillow fails such files):
the pair validator, which runs first unless skipped, is what catches those.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import DataNode
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from cityseg.config import AugmentConfig
from cityseg.data.contract import IMAGENET_MEAN, IMAGENET_STD, LoaderSpec, PairLoader, size_hw
from cityseg.data.formats import Source, as_source, labels_to_ids, sample_sizes, validate_sample, validate_samples
from cityseg.data.pairs import PairError, read_header
from cityseg.data.sampler import EpochSampler
from cityseg.palette import IGNORE_INDEX, Palette, map_colors_reference

READER = "pairs"  # the (photo) reader's name: the iterator reads the epoch size from it
LABEL_READER = "labels"  # the label files' reader (formats with separate label files)
OUTPUTS = ["image", "mask", "index", "label_index"]
T = TypeVar("T")


# ---------------------------------------------------------------- reading and decoding


def shard_order(n: int, num_shards: int) -> list[int]:
    """The plain loader's unshuffled shards (interleaved, each padded to ceil(n / num_shards)),
    concatenated: DALI's contiguous equal shards of this list are exactly those shards."""
    return [
        i
        for s in range(num_shards)
        for i in EpochSampler(
            n, 1, shuffle=False, augment=False, drop_last=True, shard_id=s, num_shards=num_shards
        ).shard_indices()
    ]


def _reader(files: Sequence[str], order: Sequence[int], name: str, *, shuffle: bool, seed: int, shard_id: int,
            num_shards: int) -> tuple[DataNode, DataNode]:
    """`fn.readers.file` over `files` in `order`: (encoded file, its index in `files`)."""
    # Training: a full permutation per epoch, equal on every rank (same seed), like the sampler's;
    # random_shuffle would only shuffle within a buffer and within each rank's shard.
    shuffling = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": seed % 2**31} if shuffle else {}
    return fn.readers.file(
        files=[files[i] for i in order],
        labels=list(order),
        name=name,
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=not shuffle,  # validation: rank s always reads the sampler's shard s
        pad_last_batch=True,  # each epoch starts on a batch boundary; the iterator trims the padding
        **shuffling,
    )


def read_source(
    source: Source, order: Sequence[int], *, shuffle: bool, seed: int, shard_id: int, num_shards: int
) -> tuple[DataNode, DataNode | None, DataNode, DataNode | None]:
    """Each format's reader: (encoded photos or pair files, encoded labels or None, index, the label
    reader's index or None). Photos and labels are two file readers with the same order, shards and
    shuffle seed, so they stay in step (the loader checks the two indices agree)."""
    reading = dict(shuffle=shuffle, seed=seed, shard_id=shard_id, num_shards=num_shards)
    photos, index = _reader([str(s.photo) for s in source], order, READER, **reading)
    if source.paired:
        return photos, None, index, None
    labels, label_index = _reader([str(s.label) for s in source], order, LABEL_READER, **reading)
    return photos, labels, index, label_index


def decode_photo(encoded: DataNode, *, gpu: bool, hw_decoder_load: float, max_hw: tuple[int, int]) -> DataNode:
    """JPEG/PNG -> HWC uint8 RGB: nvJPEG ("mixed") on a GPU, CPU operators otherwise."""
    if not gpu:
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    return fn.decoders.image(
        encoded,
        device="mixed",
        output_type=types.RGB,
        hw_decoder_load=hw_decoder_load,
        jpeg_fancy_upsampling=True,  # libjpeg-turbo's chroma upsampling: the CPU loaders' colours
        preallocate_height_hint=max_hw[0],
        preallocate_width_hint=max_hw[1],
    )


def decode_halves(jpegs: DataNode, *, gpu: bool, hw_decoder_load: float, max_height: int) -> tuple[DataNode, DataNode]:
    """Decode (H, 2H, 3) pairs and split them into photo (left) and mask (right), HWC uint8."""
    pairs = decode_photo(jpegs, gpu=gpu, hw_decoder_load=hw_decoder_load, max_hw=(max_height, 2 * max_height))
    photo = fn.slice(pairs, rel_start=(0.0, 0.0), rel_shape=(1.0, 0.5), axis_names="HW")
    mask = fn.slice(pairs, rel_start=(0.0, 0.5), rel_shape=(1.0, 0.5), axis_names="HW")
    return photo, mask


def decode_source(photos: DataNode, labels: DataNode | None, *, ids: bool, gpu: bool, hw_decoder_load: float,
                  max_hw: tuple[int, int]) -> tuple[DataNode, DataNode]:
    """(photo HWC uint8 RGB, label HWC uint8: colour (3 channels) or class ids (1 channel)).

    PNG labels (and PNG photos) decode on the CPU even in the "mixed" decoder: DALI's GPU decoding
    covers JPEG and JPEG 2000 only; the decoded label is then copied to the GPU with the batch."""
    if labels is None:
        return decode_halves(photos, gpu=gpu, hw_decoder_load=hw_decoder_load, max_height=max_hw[0])
    photo = decode_photo(photos, gpu=gpu, hw_decoder_load=hw_decoder_load, max_hw=max_hw)
    # GRAY on an 8-bit grayscale PNG keeps the stored values (tested bit-exact): the class ids.
    label = fn.decoders.image(labels, device="mixed" if gpu else "cpu", output_type=types.GRAY if ids else types.RGB)
    return photo, label


def resize_photo(photo: DataNode, size: int) -> DataNode:
    """Antialiased linear, as the plain loader's `F.resize(..., antialias=True)`."""
    return fn.resize(photo, size=(size, size), antialias=True)


def resize_mask(mask: DataNode, size: int | tuple[int, int], max_side: int) -> DataNode:
    """Nearest, to S x S or (H, W). DALI's nearest picks the same source pixels as torchvision's
    NEAREST_EXACT except on exact ties, which float error in its vertical pass rounds down; a shift of
    a quarter output pixel's worth of the source, far below the 1/(2 * size) gap to any non-tie,
    settles them the same way (tested bit-exact for many size pairs)."""
    h, w = size_hw(size)
    eps = 0.25 / (max(h, w) * max_side)
    return fn.resize(mask, size=(h, w), interp_type=types.INTERP_NN, roi_start=(eps, eps),
                     roi_end=(1.0 + eps, 1.0 + eps), roi_relative=True)


# ---------------------------------------------------------------- pair augmentation


def random_affine(aug: AugmentConfig, size: int) -> DataNode:
    """One source->destination matrix per sample: flip, zoom s, rotation about the centre, shift.

    Same distribution as the plain loader: flip with p = hflip, angle U(-deg, deg), s U(lo, hi),
    shift U(-t, t) * size with t = (hi - 1) / 2, the room a zoom leaves to slide the crop."""
    center = [size / 2.0, size / 2.0]  # warp_affine's (0, 0) is the corner of the first pixel
    mt = None
    if aug.hflip > 0 or aug.scale != (1.0, 1.0):
        s = fn.random.uniform(range=aug.scale) if aug.scale != (1.0, 1.0) else 1.0
        sx = s * (1.0 - 2.0 * fn.random.coin_flip(probability=aug.hflip)) if aug.hflip > 0 else s
        mt = fn.transforms.scale(scale=fn.stack(sx, s), center=center)
    if aug.rotate_deg > 0:
        angle = fn.random.uniform(range=(-aug.rotate_deg, aug.rotate_deg))
        mt = _then(fn.transforms.rotation, mt, angle=angle, center=center)
    shift = max(0.0, (aug.scale[1] - 1.0) / 2.0) * size
    if shift > 0:
        offset = fn.random.uniform(range=(-shift, shift), shape=2)
        mt = _then(fn.transforms.translation, mt, offset=offset)
    return mt


def _then(op: Callable[..., DataNode], mt: DataNode | None, **kwargs) -> DataNode:
    """Apply transform `op` after `mt` (or alone)."""
    return op(**kwargs) if mt is None else op(mt, **kwargs)


def augment_geometry(
    photo: DataNode, mask: DataNode, aug: AugmentConfig, size: int, fill_is_void: bool, channels: int = 3
) -> tuple[DataNode, DataNode, DataNode | int]:
    """Shared geometric draw. Returns (photo, mask, mirror): a flip-only config leaves the photo's
    flip to `crop_mirror_normalize` (free) instead of paying for a warp."""
    if aug.rotate_deg <= 0 and aug.scale == (1.0, 1.0):
        if aug.hflip <= 0:
            return photo, mask, 0
        flip = fn.random.coin_flip(probability=aug.hflip)
        return photo, fn.flip(mask, horizontal=flip), flip
    mt = random_affine(aug, size)
    if not fill_is_void:
        # The fill (black, or id 0) is not void here: carry one more channel, 255 inside the image and
        # 0 where the warp fills, and set those pixels to 255 after the mapping.
        mask = fn.pad(mask, axis_names="C", shape=(channels + 1,), fill_value=255)
    warp = dict(matrix=mt, size=(size, size), inverse_map=False, fill_value=0)
    photo = fn.warp_affine(photo, interp_type=types.INTERP_LINEAR, **warp)
    mask = fn.warp_affine(mask, interp_type=types.INTERP_NN, **warp)
    return photo, mask, 0


def color_jitter(photo: DataNode, aug: AugmentConfig) -> DataNode:
    """Brightness, contrast, saturation factors U(max(0, 1 - v), 1 + v), hue U(-h, h) turns."""
    params = {}
    for name in ("brightness", "contrast", "saturation"):
        v = getattr(aug, name)
        if v > 0:
            params[name] = fn.random.uniform(range=(max(0.0, 1.0 - v), 1.0 + v))
    if aug.hue > 0:
        params["hue"] = fn.random.uniform(range=(-aug.hue * 360.0, aug.hue * 360.0))  # degrees
    return fn.color_twist(photo, **params)


@pipeline_def
def pair_pipeline(
    source: Source,
    order: Sequence[int],
    *,
    size: int,
    target_size: int | tuple[int, int],
    max_hw: tuple[int, int],
    resize_photos: bool,
    resize_masks: bool,
    augment: AugmentConfig | None,
    fill_is_void: bool,
    shuffle: bool,
    reader_seed: int,
    shard_id: int,
    num_shards: int,
    gpu: bool,
    hw_decoder_load: float,
    half: bool,
):
    """(photo float (S, S, 3) normalised, label uint8 (Th, Tw, C or C + 1), file index (1,), the label
    reader's index (1,)) per sample; C = 3 for colour masks, 1 for class ids."""
    encoded, labels, index, label_index = read_source(source, order, shuffle=shuffle, seed=reader_seed,
                                                      shard_id=shard_id, num_shards=num_shards)
    photo, mask = decode_source(encoded, labels, ids=source.ids, gpu=gpu, hw_decoder_load=hw_decoder_load,
                                max_hw=max_hw)
    if resize_photos:
        photo = resize_photo(photo, size)
    if resize_masks:
        mask = resize_mask(mask, target_size, max(max_hw))
    mirror: DataNode | int = 0
    if augment is not None and augment.geometric:
        photo, mask, mirror = augment_geometry(photo, mask, augment, size, fill_is_void, source.label_channels)
    if augment is not None and augment.color:
        photo = color_jitter(photo, augment)
    photo = fn.crop_mirror_normalize(
        photo,
        dtype=types.FLOAT16 if half else types.FLOAT,
        output_layout="HWC",  # NHWC memory = NCHW with channels-last strides, after a permute
        mean=[m * 255 for m in IMAGENET_MEAN],
        std=[s * 255 for s in IMAGENET_STD],
        mirror=mirror,
    )
    return photo, mask, index, index if label_index is None else label_index


# ---------------------------------------------------------------- the loader


def source_heights(files: Sequence[Path]) -> set[int]:
    """Pair heights from the file headers (~0.1 ms each)."""
    return {read_header(path).height for path in files}


def source_sizes(source: Source) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """Photo and label (h, w) sizes from the file headers (~0.1 ms a file): decide whether the graph
    needs a resize. Also the validator's header checks, so a wrong shape or mode is a one-line error
    even with validation skipped."""
    sizes = [sample_sizes(sample, source) for sample in source]
    return {p for p, _ in sizes}, {label for _, label in sizes}


def fill_is_void_for(source: Source, palette: Palette) -> bool:
    """Whether the warp's fill maps to 255: black for colour masks, id 0 for class-id masks."""
    if source.ids:
        return int(source.id_table[0]) == IGNORE_INDEX
    return fill_colour_is_void(palette)


def fill_colour_is_void(palette: Palette) -> bool:
    """Whether black, the warp's fill, maps to 255 (it does in Cityscapes: 'unlabeled')."""
    black = torch.zeros(1, 1, 1, 3, dtype=torch.uint8)
    ids = map_colors_reference(black, palette.centers, palette.classes, palette.max_dist)
    return int(ids) == IGNORE_INDEX


class DaliPairLoader(PairLoader):
    """The loader contract (cityseg/data/contract.py) from a DALI pipeline. A CUDA device decodes
    with nvJPEG ("mixed", `hw_decoder_load` on the A100/H100 hardware decoder) and maps masks with the
    Triton kernel; a CPU device runs the same graph on CPU operators (`device_id=None`)."""

    exact_resume = False  # DALI follows its own epoch counter and seeds (module docstring)

    def __init__(self, files: Source | Sequence[Path], palette: Palette, spec: LoaderSpec) -> None:
        if not files:
            raise ValueError("DaliPairLoader needs at least one file")
        self.spec = spec
        self.source = as_source(files)
        self.files = [s.photo for s in self.source]
        self.palette = palette
        self.device, self.dtype = spec.device, spec.dtype
        self.batch_size, self.drop_last = spec.batch_size, spec.drop_last
        if spec.drop_last:  # training: DALI shards the plain sampler's padded shards, joined end to end
            order, reader_shard, reader_shards = shard_order(len(self.files), spec.num_shards), spec.shard_id, \
                spec.num_shards
            self.per_shard = math.ceil(len(self.files) / spec.num_shards)
        else:  # validation: this rank reads exactly its own unpadded shard, like the plain sampler
            order = EpochSampler(len(self.files), 1, shuffle=False, augment=False, shard_id=spec.shard_id,
                                 num_shards=spec.num_shards).shard_indices()
            reader_shard, reader_shards, self.per_shard = 0, 1, len(order)
        photo_sizes, label_sizes = source_sizes(self.source)
        gpu = self.device.type == "cuda"
        self._pipeline_kwargs = dict(
            source=self.source,
            order=order,
            size=spec.image_size,
            target_size=spec.label_size,
            max_hw=(max(h for h, _ in photo_sizes), max(w for _, w in photo_sizes)),
            resize_photos=photo_sizes != {(spec.image_size, spec.image_size)},
            resize_masks=label_sizes != {spec.label_hw},
            augment=spec.augment,
            fill_is_void=spec.augment is None or fill_is_void_for(self.source, palette),
            shuffle=spec.shuffle,
            reader_seed=spec.seed,
            shard_id=reader_shard,
            num_shards=reader_shards,
            gpu=gpu,
            hw_decoder_load=spec.hw_decoder_load,
            half=spec.dtype in (torch.float16, torch.bfloat16),  # CMN writes fp16; bf16 converts on device
            # A batch bigger than a non-dropping shard would be all padding: one batch of the shard.
            batch_size=spec.batch_size if spec.drop_last else min(spec.batch_size, self.per_shard),
            num_threads=max(1, spec.threads),
            prefetch_queue_depth=max(1, spec.prefetch),
            device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device())
            if gpu
            else None,
            # Different augmentation draws on every rank; the reader's shuffle seed stays shared.
            seed=(spec.seed * 1_000_003 + spec.shard_id) % 2**31,
        )
        self._iterator: DALIGenericIterator | None = None
        self._in_epoch = False  # an epoch was started and not finished (the consumer broke off)
        self._start_batch = 0
        if len(self) > 0:
            self._guarded(self._build)  # starts decoding the first batches now

    def _build(self) -> None:
        # A CPU pipeline's outputs reach torch through DLPack without a copy (dynamic executor).
        self._iterator = DALIGenericIterator(
            pair_pipeline(**self._pipeline_kwargs),
            OUTPUTS,
            reader_name=READER,
            last_batch_policy=LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL,
            auto_reset=True,
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """DALI draws its own per-epoch order (`epoch` is not used: `exact_resume` is False);
        `start_batch` batches are decoded and skipped."""
        self._start_batch = start_batch

    def close(self) -> None:
        """End the pipeline's decode threads now; iterating again builds a fresh pipeline."""
        self._drop_iterator()
        self._in_epoch = False

    def _drop_iterator(self) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            for pipe in iterator._pipes:
                pipe._shutdown()  # DALI's own exit hook would do it, but only at interpreter exit

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_shard // self.batch_size
        return math.ceil(self.per_shard / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for image, target, _ in self.batches():
            yield image, target

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(image, target, index into `files` (B,) int64 on CPU) for the rest of this epoch."""
        if self._in_epoch:
            self._drop_iterator()  # DALI iterators cannot reset mid-epoch: a fresh pipeline restarts it
        skip, self._start_batch = self._start_batch, 0
        if len(self) == 0:
            return
        self._in_epoch = True
        for step in range(len(self)):
            out = self._guarded(self._next)
            if out is None:
                raise RuntimeError(f"DALI ended the epoch after {step} of {len(self)} batches")
            if step >= skip:
                yield self._to_contract(out)
        # The iterator stops (and resets itself) one call after its last batch; DROP also reads and
        # drops the partial batch there.
        if self._guarded(self._next) is not None:
            raise RuntimeError(f"DALI yielded more than the {len(self)} batches of the epoch")
        self._in_epoch = False

    def _next(self) -> dict[str, torch.Tensor] | None:
        """The next DALI batch, None at the end of the epoch."""
        if self._iterator is None:
            self._build()
        try:
            return next(self._iterator)[0]
        except StopIteration:
            return None

    def _guarded(self, step: Callable[[], T]) -> T:
        """Run a DALI call; a failure on a file becomes its one-line `PairError`."""
        try:
            return step()
        except RuntimeError as error:
            self._drop_iterator()  # the pipeline is unusable after an error
            self._in_epoch = False
            raise self._data_error(error) from None

    def _to_contract(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = out["image"].permute(0, 3, 1, 2)  # (B, 3, S, S) view of NHWC memory: channels-last
        if image.dtype != self.dtype:
            image = image.to(self.dtype)  # preserve_format keeps the channels-last strides
        index = out["index"].reshape(-1).to(torch.int64).cpu()
        if not torch.equal(index, out["label_index"].reshape(-1).to(torch.int64).cpu()):
            raise RuntimeError("DALI's photo and label readers went out of step")  # a broken invariant, not data
        mask = out["mask"]  # (B, Th, Tw, C or C + 1) uint8: C = 3 colour, 1 class ids
        c = self.source.label_channels
        target = labels_to_ids(mask[..., :c], self.source, self.palette, torch.int64)
        if mask.shape[-1] == c + 1:
            target.masked_fill_(mask[..., c] == 0, IGNORE_INDEX)
        return image, target, index

    def _data_error(self, error: RuntimeError) -> Exception:
        """A one-line `PairError` naming the file DALI failed on; DALI's own error when no file is bad."""
        message = str(error)
        named = re.search(r"Failed to decode sample #\d+ : (.+)", message)
        samples = {}
        for sample in self.source:
            samples[str(sample.photo)] = sample
            if sample.label is not None:
                samples[str(sample.label)] = sample
        known = {name: Path(name) for name in samples}
        if named and named.group(1).strip() in known:
            path = known[named.group(1).strip()]
        else:  # another operator's message: the longest file name in it ('1.jpg' is in '11.jpg')
            path = max((f for name, f in known.items() if name in message), key=lambda f: len(str(f)), default=None)
        if path is None:
            _, bad = validate_samples(self.source)  # rare: find the culprit the slow way
            return bad[0] if bad else error
        try:
            validate_sample(samples[str(path)], self.source)  # Pillow's diagnosis is the more precise one
        except PairError as bad:
            return bad
        return PairError(path, "corrupt or truncated image data (DALI decoder)")
