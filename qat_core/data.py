"""Data sets by name, all offline, and the user's own from disk.

``digits`` is scikit-learn's real ``load_digits`` (1,797 8×8 images). ``generated-*`` are class
templates plus noise, for the latency-scale zoo models: their accuracy only shows that training ran.
``table`` (CSV, Parquet) and ``image-folder`` (one sub-folder per class) are read from ``data.path``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qat_core import files
from qat_core.config import DataConfig
from qat_core.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorLoader:
    """Batches from in-memory tensors; reshuffled each epoch from its own seeded generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]


@dataclass
class Data:
    """A data set split for training and testing."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    generated: bool  # True: synthetic data, accuracy is not meaningful
    description: str
    train_loader_fn: Callable[[int, bool, int], Iterable[Batch]] | None = None  # plugins bring loaders
    test_loader_fn: Callable[[int], Iterable[Batch]] | None = None
    classes: list[str] = field(default_factory=list)  # class names, where the data has them
    skipped: list[str] = field(default_factory=list)  # files that could not be read, with the reason
    validation: TensorLoader | None = None  # samples held out from training (``hold_out``), for the fine-tune's guard

    def train_loader(self, batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterable[Batch]:
        if self.train_loader_fn is not None:
            return self.train_loader_fn(batch_size, shuffle, seed)
        return TensorLoader(self.train_x, self.train_y, batch_size, shuffle, seed)

    def test_loader(self, batch_size: int = 512) -> Iterable[Batch]:
        if self.test_loader_fn is not None:
            return self.test_loader_fn(batch_size)
        return TensorLoader(self.test_x, self.test_y, batch_size, shuffle=False)

    def example(self, n: int = 2) -> torch.Tensor:
        return self.train_x[:n]


def _stratified(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A mask of ``fraction`` of each class's samples, drawn at random (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        picked.append(members[: round(len(members) * fraction)])
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[torch.cat(picked)] = True
    return mask


def _split(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, ...]:
    """Stratified train/test split: each class keeps the same share in both parts, fixed by the seed."""
    is_test = _stratified(y, cfg.test_fraction, cfg.split_seed)
    return x[~is_test], y[~is_test], x[is_test], y[is_test]


# The most samples a validation split holds: enough to see a one-point fall (the standard error of 95% accuracy
# on 1,000 samples is 0.7 points), few enough to evaluate at each of a fine-tune's evaluation points.
MAX_VALIDATION_SAMPLES = 1000


def validation_size(train_samples: int, fraction: float) -> int:
    """How many of ``train_samples`` a validation split of ``fraction`` holds out (capped); the split itself
    may differ by a sample a class, as each class rounds its own share."""
    return min(round(train_samples * fraction), MAX_VALIDATION_SAMPLES)


def hold_out(data: Data, fraction: float, seed: int) -> Data:
    """``data`` with a validation split of its training samples held out (``Data.validation``): nothing trains on
    it, neither the FP32 baseline nor the fine-tune, so it judges them as the test set would, without being the
    test set. Stratified like the test split and fixed by ``seed``, with draws of its own (seed + 1): the test
    split stays as it was. ``data`` as it is when ``fraction`` is 0 or too small to hold a sample, or the data
    comes from a plugin's loaders, which cannot be split."""
    size = validation_size(len(data.train_y), fraction)
    if data.train_loader_fn is not None or size == 0:
        return data
    held = _stratified(data.train_y, size / len(data.train_y), (seed + 1) % 2**32)
    if not held.any() or held.all():
        return data
    return replace(data, train_x=data.train_x[~held], train_y=data.train_y[~held],
                   validation=TensorLoader(data.train_x[held], data.train_y[held], 512, shuffle=False))


def _digits_array() -> np.ndarray:
    """scikit-learn's digits table (1797 rows: 64 pixel values 0..16, then the label).

    Read from the file scikit-learn ships rather than through ``sklearn.datasets``, whose import
    alone costs about a second — a sixth of a whole digits run.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.exists():  # a scikit-learn that moved its data: its public loader
        from sklearn.datasets import load_digits

        raw = load_digits()
        return np.column_stack([raw.data, raw.target])
    return np.loadtxt(path, delimiter=",")


def digits(cfg: DataConfig) -> Data:
    """scikit-learn's handwritten digits: (N, 1, 8, 8) in [0, 1], 10 classes."""
    table = torch.from_numpy(_digits_array()).float()
    x = table[:, :64].reshape(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8)
    y = table[:, 64].long()
    tr_x, tr_y, te_x, te_y = _split(x, y, cfg)
    return Data(tr_x, tr_y, te_x, te_y, 10, generated=False,
                description="scikit-learn load_digits: 8×8 handwritten digits, 10 classes")


def _generated(shape: tuple[int, ...], n: int, cfg: DataConfig, classes: int = 10) -> Data:
    """Class templates plus noise: learnable, deterministic, and meaningless as accuracy."""
    g = torch.Generator().manual_seed(1000 + cfg.split_seed)
    templates = torch.randn((classes, *shape), generator=g)
    y = torch.arange(n) % classes
    x = 0.5 * templates[y] + torch.randn((n, *shape), generator=g)
    tr_x, tr_y, te_x, te_y = _split(x, y, cfg)
    return Data(tr_x, tr_y, te_x, te_y, classes, generated=True,
                description=f"generated {shape} samples (class template + noise); accuracy is not meaningful")


def _subset(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``cfg.max_samples`` rows, drawn at random (seeded by the split seed) before the split."""
    if cfg.max_samples is None or len(y) <= cfg.max_samples:
        return x, y
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.split_seed))[:cfg.max_samples]
    return x[keep], y[keep]


TABLE_LIMIT = files.GB  # pandas holds a table several times over while parsing it: past this, sample it first


def _open_table(path: Path) -> tuple[Any, str]:
    """A table file opened once it is known to be a regular file under ``TABLE_LIMIT`` (pandas would block
    on a FIFO and read a device without end), and its kind."""
    kind = "Parquet" if path.suffix.lower() in (".parquet", ".pq") else "CSV"
    if not path.exists():
        raise ConfigError(f"data.path {path}: no such file; give a {kind} table with a label column")
    return files.open_regular(path, "data.path", ConfigError, limit=TABLE_LIMIT), kind


def _read_table(cfg: DataConfig, *columns: str) -> Any:
    """``data.path`` as a pandas DataFrame that has ``columns`` (each named with what to fix if not)."""
    import pandas as pd

    path = Path(cfg.path or "")
    f, kind = _open_table(path)
    try:
        with f:
            frame = pd.read_parquet(f) if kind == "Parquet" else pd.read_csv(f)
    except Exception as err:  # pandas raises many kinds: the file is not a table it can read
        raise ConfigError(f"data.path {path} cannot be read as a {kind} table ({type(err).__name__}: "
                          f"{str(err)[:200]})") from None
    for column, field_name in zip(columns, ("label_column", "text_column")):
        if column not in frame.columns:
            shown = ", ".join(map(str, frame.columns[:12])) + (", …" if len(frame.columns) > 12 else "")
            what = "label" if field_name == "label_column" else "text"
            raise ConfigError(f"{path} has no {what} column {column!r}; its columns are {shown}. "
                              f"Set data.{field_name}")
    return frame


def table_columns(path: str) -> list[str]:
    """The column names of a CSV or Parquet file, read from its header only."""
    import pandas as pd

    f, kind = _open_table(Path(path))
    with f:
        if kind == "CSV":
            try:
                return [str(c) for c in pd.read_csv(f, nrows=0).columns]
            except Exception:  # let the full reader name the problem
                pass
    return [str(c) for c in _read_table(DataConfig(dataset="table", path=path)).columns]


def _classes(labels: Any, path: Path, label: str) -> tuple[list[Any], torch.Tensor]:
    """A label column's classes (sorted) and each row's class index."""
    classes = sorted(labels.unique(), key=str)
    if len(classes) < 2:
        raise ConfigError(f"{path}: the label column {label!r} has {len(classes)} class(es) in its complete rows; "
                          "classification needs at least 2")
    return classes, torch.tensor(labels.map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64))


def _split_checked(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig, what: str) -> tuple[torch.Tensor, ...]:
    parts = _split(x, y, cfg)
    if len(parts[1]) == 0 or len(parts[3]) == 0:
        raise ConfigError(f"{cfg.path}: {len(y)} {what} are too few to hold out a test split; add more or raise "
                          "data.test_fraction")
    return parts


def table(cfg: DataConfig) -> Data:
    """A CSV or Parquet table: one row a sample, numeric feature columns and a label column (any values,
    mapped to classes 0..C-1 in sorted order). Features are standardised with the training split's mean
    and standard deviation; rows with a missing value are skipped and counted."""
    import pandas as pd

    path, label = Path(cfg.path or ""), cfg.label_column
    frame = _read_table(cfg, label)
    features = frame.drop(columns=[label])
    text = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])
            or pd.api.types.is_bool_dtype(features[c])]
    if text:
        raise ConfigError(f"{path}: feature columns must be numbers; {', '.join(text[:8])} "
                          f"{'is' if len(text) == 1 else 'are'} not. Encode them as numbers or drop them")
    if features.shape[1] == 0:
        raise ConfigError(f"{path} has only the label column; a model needs at least one feature column")
    complete = features.notna().all(axis=1) & frame[label].notna()
    skipped = int((~complete).sum())
    missing = frame.isna().sum()  # NaN, an empty cell, "nan": per column, for the note
    missing = ", ".join(f"{c!r} {n}" for c, n in missing[missing > 0].head(3).items())
    features, labels = features[complete], frame[label][complete]
    classes, y = _classes(labels, path, label)
    with np.errstate(over="ignore"):  # a number past float32's ±3.4e38 becomes inf here: named below
        values = features.to_numpy(dtype=np.float32)
    infinite = (~np.isfinite(values)).sum(axis=0)
    if infinite.any():
        named = [f"column {c!r} has inf values in {n} row(s)" for c, n in zip(features.columns, infinite) if n]
        raise ConfigError(f"{path}: {'; '.join(named[:5])}{' …' if len(named) > 5 else ''} (or numbers beyond "
                          "±3.4e38). Replace them with finite numbers, or leave those cells empty to skip the rows")
    x = torch.tensor(values)
    x, y = _subset(x, y, cfg)
    tr_x, tr_y, te_x, te_y = _split_checked(x, y, cfg, "rows")
    mean, std = tr_x.mean(dim=0), tr_x.std(dim=0).clamp_min(1e-6)
    tr_x, te_x = (tr_x - mean) / std, (te_x - mean) / std
    note = f", {skipped} row(s) with a missing value skipped (by column: {missing})" if skipped else ""
    return Data(tr_x, tr_y, te_x, te_y, len(classes), generated=False,
                description=f"{path.name}: {len(y)} rows, {x.shape[1]} features (standardised), {len(classes)} "
                            f"classes from column {label!r}{note}")


def text_table(cfg: DataConfig, tokenizer: Any) -> Data:
    """A CSV or Parquet table of texts and labels, tokenized by the model's own tokenizer: token ids cut
    to ``max_length`` and padded to the longest text, so every batch has one shape. Rows with no text
    or no label are skipped and counted."""
    path, label, text = Path(cfg.path or ""), cfg.label_column, cfg.text_column
    frame = _read_table(cfg, label, text)
    complete = frame[text].notna() & frame[label].notna()
    skipped = int((~complete).sum())
    texts, labels = frame[text][complete].astype(str), frame[label][complete]
    classes, y = _classes(labels, path, label)
    tokens = tokenizer(list(texts), truncation=True, max_length=cfg.max_length, padding="longest",
                       return_tensors="pt")["input_ids"]  # (N, L) int64
    x, y = _subset(tokens, y, cfg)
    tr_x, tr_y, te_x, te_y = _split_checked(x, y, cfg, "rows")
    note = f", {skipped} row(s) without text or label skipped" if skipped else ""
    return Data(tr_x, tr_y, te_x, te_y, len(classes), generated=False, classes=[str(c) for c in classes],
                description=f"{path.name}: {len(y)} texts of {x.shape[1]} tokens, {len(classes)} classes from "
                            f"column {label!r}{note}")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

IMAGENET_PRESET = {"resize_size": 256, "image_size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

MAX_IMAGE_BYTES = 4 * 2**30  # decoded images are held in memory as float32: past this, ask for a cap
MAX_PIXELS = 50_000_000  # one image, from its header: a 50 Mpx photo decodes to 150 MB; a training crop is ~224 px
MAX_FILE_BYTES = 4 * MAX_PIXELS + files.MB  # one image file: an uncompressed RGBA image at the pixel limit


def image_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folder names) and every image file below each, with its class index:
    the layout of torchvision's ``ImageFolder``. Files of other kinds are ignored."""
    if not root.is_dir():
        raise ConfigError(f"data.path {root}: no such folder; give a folder with one sub-folder of images per class"
                          if not root.exists() else f"data.path {root} is a file; image data is a folder with one "
                          "sub-folder of images per class (a table is dataset: table)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(f"{root} has no class folders: put each class's images in a sub-folder named after the "
                          f"class ({root}/cat/1.jpg, {root}/dog/2.jpg)")
    files, empty = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        files += [(p, label) for p in found]
        if not found:
            empty.append(name)
    if empty:
        raise ConfigError(f"{root}: class folder(s) {', '.join(empty[:5])} hold no image files "
                          f"({', '.join(sorted(IMAGE_SUFFIXES)[:5])}, …); add images or remove the folder")
    if len(classes) < 2:
        raise ConfigError(f"{root} has one class folder ({classes[0]}); classification needs at least 2")
    return classes, files


def _decode(path: Path, resize: int, crop: int) -> np.ndarray:
    """One image as (crop, crop, 3) uint8: RGB, shorter side resized to ``resize``, center-cropped. An image of
    more than ``MAX_PIXELS`` (a decompression bomb: a small file declaring a huge image) is refused from its
    header, before it is decoded."""
    from PIL import Image

    with files.open_regular(path, "image", ConfigError, limit=MAX_FILE_BYTES) as f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own limit (89 Mpx) is above ours
        try:
            img = Image.open(f)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            img = None
        if img is None or img.width * img.height > MAX_PIXELS:
            size = "" if img is None else f" ({img.width}×{img.height})"
            raise ConfigError(f"image {path} has more than {MAX_PIXELS / 1e6:g} million pixels{size}: it would take "
                              "GBs to decode. Downscale it (training crops to a few hundred pixels) or remove it")
        img = img.convert("RGB")
        scale = resize / min(img.size)
        w, h = max(crop, round(img.width * scale)), max(crop, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BILINEAR)
        left, top = (w - crop) // 2, (h - crop) // 2
        return np.asarray(img.crop((left, top, left + crop, top + crop)))


SIDE_SAMPLE = 64  # images whose headers set a folder's default crop: the median of a few dozen is stable


def typical_side(root: Path) -> int | None:
    """The median shorter side, in pixels, of up to ``SIDE_SAMPLE`` of the folder's images spread over its
    classes (read from their headers: nothing is decoded); None when none can be read. A folder of 32-px
    images is trained at 32 px, not upscaled to a 224 crop that adds no detail and 49× the work."""
    from PIL import Image

    _, found = image_files(root)
    sample = found[::max(1, len(found) // SIDE_SAMPLE)][:SIDE_SAMPLE]
    sides = []
    for path, _ in sample:
        with contextlib.suppress(OSError, ValueError, SyntaxError, ConfigError, Image.DecompressionBombError):
            with files.open_regular(path, "image", ConfigError, limit=MAX_FILE_BYTES) as f, Image.open(f) as img:
                sides.append(min(img.size))
    return int(np.median(sides)) if sides else None


def _fingerprint(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for f in paths:
        st = f.stat()
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def data_fingerprint(cfg: DataConfig) -> str | None:
    """The state of a data set's files on disk (names, sizes, modification times), or None for built-in
    data: a baseline cached for a folder is not reused once its files change."""
    try:
        if cfg.dataset in ("table", "text-table"):
            return _fingerprint([Path(cfg.path or "")])
        if cfg.dataset == "image-folder":
            return _fingerprint(p for p, _ in image_files(Path(cfg.path or ""))[1])
    except (OSError, ConfigError):  # gone or unreadable: building the data will say why
        return "unreadable"
    return None


_decoded: OrderedDict[str, Data] = OrderedDict()  # the last image folders decoded in this process

DECODED_KEPT = 2


def image_folder(cfg: DataConfig) -> Data:
    """A folder with one sub-folder of images per class: (N, 3, S, S) normalised tensors in memory.
    Unreadable image files are skipped and counted; ``max_samples`` draws the subset before decoding.
    Kept in memory per settings and file state: the app's pages and a run's stages build it again."""
    root = Path(cfg.path or "")
    classes, files = image_files(root)
    key = cfg.model_dump_json() + _fingerprint(p for p, _ in files)
    if key not in _decoded:
        _decoded[key] = _decode_folder(cfg, root, classes, files)
        while len(_decoded) > DECODED_KEPT:
            _decoded.popitem(last=False)
    return _decoded[key]


def _decode_folder(cfg: DataConfig, root: Path, classes: list[str], files: list[tuple[Path, int]]) -> Data:
    if cfg.max_samples is not None and len(files) > cfg.max_samples:
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(cfg.split_seed))[:cfg.max_samples]
        files = [files[i] for i in sorted(keep.tolist())]
    preset = IMAGENET_PRESET | {k: getattr(cfg, k) for k in IMAGENET_PRESET if getattr(cfg, k) is not None}
    crop = preset["image_size"]
    resize = cfg.resize_size or max(crop, round(crop * 256 / 224))  # ImageNet's ratio when only the crop is set
    if len(files) * 3 * crop * crop * 4 > MAX_IMAGE_BYTES:
        raise ConfigError(f"{root}: {len(files):,} images of {crop}×{crop} need more than "
                          f"{MAX_IMAGE_BYTES // 2**30} GB in memory; set data.max_samples (or a smaller "
                          "data.image_size)")
    pixels, labels, skipped = [], [], []
    for path, label in files:
        try:
            pixels.append(_decode(path, resize, crop))
        except (OSError, ValueError, SyntaxError) as err:  # not an image PIL can read: count it
            skipped.append(f"{path.relative_to(root)} ({type(err).__name__})")
            continue
        labels.append(label)
    if len(set(labels)) < 2:
        raise ConfigError(f"{root}: only {len(labels)} of {len(files)} image files could be read "
                          f"(e.g. {', '.join(skipped[:3])}); check the files are images")
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255)  # (N, 3, S, S) in [0, 1]
    mean, std = torch.tensor(preset["mean"]).view(1, 3, 1, 1), torch.tensor(preset["std"]).view(1, 3, 1, 1)
    x = (x - mean) / std
    y = torch.tensor(labels)
    tr_x, tr_y, te_x, te_y = _split_checked(x, y, cfg, "images")
    note = (f"; {len(skipped)} unreadable file(s) skipped: {', '.join(skipped[:3])}" + (" …" if len(skipped) > 3
            else "")) if skipped else ""
    return Data(tr_x, tr_y, te_x, te_y, len(classes), generated=False,
                description=f"{root.name}: {len(y):,} images, {len(classes)} classes ({', '.join(classes[:4])}"
                            f"{', …' if len(classes) > 4 else ''}), resized to {resize} px and center-cropped to "
                            f"{crop}×{crop}{note}", classes=classes, skipped=skipped)


def images224(cfg: DataConfig) -> Data:
    return _generated((3, 224, 224), 160, cfg)


def sequences(cfg: DataConfig) -> Data:
    return _generated((128, 64), 320, cfg)


DATASETS: dict[str, Callable[[DataConfig], Data]] = {  # data.dataset → its loader
    "digits": digits, "generated-images": images224, "generated-sequences": sequences, "table": table,
    "image-folder": image_folder,
}
