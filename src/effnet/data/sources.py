"""What `effnet predict` reads, each a stream of (name, item) pairs: a folder (recursive, sorted, hidden files and
folders left out), a CSV/TSV of paths, one image file, or shards (a folder with a manifest, or a URL).

`loader(...)` turns a source into batches of preprocessed uint8 images. Every loader worker walks the stream and
keeps every n-th chunk of it, so nothing holds the whole list (memory is flat in the number of images) and the
DataLoader, which asks its workers in turn, hands the batches out in source order. An item that is not a usable
image becomes an error string in its batch, not an exception.
"""
from __future__ import annotations

import csv
import itertools
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from effnet.data import images, manifest
from effnet.errors import EffnetError

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class Folder:
    root: Path

    def items(self) -> Iterator[tuple[str, Path]]:
        for folder, subfolders, files in os.walk(self.root):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                path = Path(folder) / name
                yield str(path), path


@dataclass(frozen=True)
class Table:
    """A CSV/TSV whose `path` column (or, without that header, first column) names the images; relative paths are
    relative to the table's folder, and each row is named by the path as the table writes it."""

    path: Path

    def items(self) -> Iterator[tuple[str, Path | None]]:
        with open(self.path, newline="") as f:
            rows = csv.reader(f, delimiter=TABLE_SUFFIXES[self.path.suffix.lower()])
            first = next(rows, [])
            header = [c.strip().lower() for c in first]
            column = header.index("path") if "path" in header else 0
            for row in rows if "path" in header else itertools.chain([first], rows):
                if any(cell.strip() for cell in row):
                    name = row[column].strip() if column < len(row) else ""
                    yield name, (self.path.parent / name) if name else None


@dataclass(frozen=True)
class File:
    path: Path

    def items(self) -> Iterator[tuple[str, Path]]:
        yield str(self.path), self.path


@dataclass(frozen=True)
class Shards:
    """Every split's samples, named `<split>/<key>`."""

    root: str

    def items(self) -> Iterator[tuple[str, bytes]]:
        for split in manifest.read_manifest(self.root)["splits"]:
            for url in manifest.shard_urls(self.root, split):
                with manifest.open_url(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        stem, _, ext = member.name.rpartition(".")
                        if ext == "jpg":
                            yield f"{split}/{stem}", tar.extractfile(member).read()


Source = Folder | Table | File | Shards


def open_source(spec: str | Path) -> tuple[Source, int]:
    """The source SPEC names and how many items it holds (checked before any work: one line naming SPEC when it
    is not there or holds nothing)."""
    spec = str(spec)
    if "://" in spec or spec.startswith("pipe:"):
        source = Shards(spec)
    elif Path(spec).is_dir():
        source = Shards(spec) if (Path(spec) / manifest.MANIFEST).is_file() else Folder(Path(spec))
    elif Path(spec).is_file():
        source = Table(Path(spec)) if Path(spec).suffix.lower() in TABLE_SUFFIXES else File(Path(spec))
    else:
        raise EffnetError(f"no such file or folder: {spec}")
    total = count(source)
    if total == 0:
        raise EffnetError(f"no images in {spec}")
    return source, total


def count(source: Source) -> int:
    """How many items SOURCE holds (the progress bar's total): a walk of the listing, or the shard manifest's."""
    if isinstance(source, Shards):
        return sum(split["total"] for split in manifest.read_manifest(source.root)["splits"].values())
    return sum(1 for _ in source.items())


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 NCHW, the items that decoded, in order
    names: list[str]  # every item of the chunk
    errors: list[str | None]  # per item: None, or why it is not in `images`


class Batches(IterableDataset):
    """SOURCE in chunks of BATCH_SIZE, each decoded and TRANSFORMed (to a uint8 CHW tensor) where it is read."""

    def __init__(self, source: Source, transform, batch_size: int):
        super().__init__()
        self.source, self.transform, self.batch_size = source, transform, batch_size

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        items = iter(self.source.items())
        for i in itertools.count():
            chunk = list(itertools.islice(items, self.batch_size))
            if not chunk:
                return
            if i % workers == worker:
                yield self.prepare(chunk)

    def prepare(self, chunk: list[tuple[str, object]]) -> Batch:
        decoded, errors = [], []
        for _, item in chunk:
            try:
                if item is None:
                    raise images.ImageError("no path in this row")
                decoded.append(self.transform(images.load(item)))
                errors.append(None)
            except images.ImageError as e:
                errors.append(str(e))
        x = torch.stack(decoded) if decoded else torch.empty(0, dtype=torch.uint8)
        return Batch(x, [name for name, _ in chunk], errors)


def loader(source: Source, transform, batch_size: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(Batches(source, transform, batch_size), batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory)
