"""Real data for calibration, training and evaluation, read from Debian packages' files, and its held-out split.

`scripts/fetch_data.sh` unpacks them (without installing R) into the per-user data folder (`user_data_dir()`,
where `scripts/setup.sh` puts them), or $VNMSPARSE_DATA: Jane Austen's novels (r-cran-janeaustenr), Moby Dick
(r-cran-tokenizers), Fashion-MNIST (dataset-fashion-mnist). R's lazy-load databases (.rdx index + .rdb records,
each record a zlib-compressed serialized R object) are read with the `rdata` package.

The texts are split so that evaluation is never on text that was trained or calibrated on: `austen-train` is
five of Austen's six novels (calibration and training), `persuasion` the sixth (held out: same author, unseen
text) and `mobydick` another author. `check_disjoint` refuses a training text that shares a source with an
evaluation text.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from pathlib import Path

import torch

AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
HELD_OUT_NOVEL = "persuasion"
TRAIN_NOVELS = tuple(n for n in AUSTEN_NOVELS if n != HELD_OUT_NOVEL)
# Named texts and the sources each is made of (a source is an Austen novel or "mobydick").
TEXTS: dict[str, tuple[str, ...]] = {
    "austen": AUSTEN_NOVELS,
    "austen-train": TRAIN_NOVELS,
    HELD_OUT_NOVEL: (HELD_OUT_NOVEL,),
    "mobydick": ("mobydick",),
}
TRAIN_TEXT = "austen-train"
HELD_OUT_TEXTS = (HELD_OUT_NOVEL, "mobydick")  # evaluation: same author unseen, another author
DATABASES = {"austen": Path("janeaustenr") / "Rdata", "mobydick": Path("tokenizers") / "Rdata"}  # author -> R database
FETCH_HINT = "run `bash scripts/setup.sh` (or `bash scripts/fetch_data.sh DIR` and set VNMSPARSE_DATA=DIR)"


def user_data_dir() -> Path:
    """The per-user data folder that scripts/setup.sh fills: $XDG_DATA_HOME/vnmsparse/data (~/.local/share/...)."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share").expanduser() / "vnmsparse" / "data"


def data_dir() -> Path:
    """Where the fetched data lives: $VNMSPARSE_DATA, else the per-user folder if setup filled it, else ./data (a
    checkout fetched into by an older setup), so the jobs find their data from any working directory."""
    if os.environ.get("VNMSPARSE_DATA"):
        return Path(os.environ["VNMSPARSE_DATA"]).expanduser()
    user = user_data_dir()
    return user if user.is_dir() or not Path("data").is_dir() else Path("data")


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {FETCH_HINT}")
    return path


def check_text(name_or_path: str) -> None:
    """Raise FileNotFoundError now, before any model is loaded, if `read_text(name_or_path)` could not read it."""
    if name_or_path in TEXTS:
        base = data_dir() / DATABASES["mobydick" if name_or_path == "mobydick" else "austen"]
        _require(base.with_suffix(".rdx"))
        _require(base.with_suffix(".rdb"))
    else:
        _text_file(name_or_path)


def read_r_lazyload(base: Path) -> dict[str, object]:
    """All objects of an R lazy-load database `base`.rdx/.rdb, converted to Python by `rdata`."""
    import rdata

    with warnings.catch_warnings():  # rdata warns that a bare record has no file-type header
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.read_rds(_require(base.with_suffix(".rdx")))
        blob = _require(base.with_suffix(".rdb")).read_bytes()
        objects = {}
        for name, (offset, length) in index["variables"].items():
            record = zlib.decompress(blob[offset + 4 : offset + length])  # 4-byte length prefix, then zlib
            objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(record))
    return objects


def austen_text(novels: tuple[str, ...] = AUSTEN_NOVELS) -> str:
    """Jane Austen's novels as one text (the calibration and training default)."""
    books = read_r_lazyload(data_dir() / DATABASES["austen"])
    unknown = [n for n in novels if n not in books]
    if unknown:
        raise ValueError(f"unknown novels {unknown}; choose from {sorted(books)}")
    return "\n\n".join("\n".join(str(line) for line in books[n]) for n in novels)


def moby_dick_text() -> str:
    """Herman Melville's Moby Dick (the evaluation default), Project Gutenberg header and licence removed."""
    text = str(read_r_lazyload(data_dir() / DATABASES["mobydick"])["mobydick"][0]).replace("\r\n", "\n")
    start = text.find("CHAPTER 1. Loomings.")
    end = text.find("End of Project Gutenberg")
    return text[start if start >= 0 else 0 : end if end > 0 else len(text)].strip()


def read_text(name_or_path: str) -> str:
    """A named text (see `TEXTS`: 'austen-train', 'persuasion', 'mobydick', 'austen') or a UTF-8 text file."""
    check_text(name_or_path)
    if name_or_path == "mobydick":
        return moby_dick_text()
    if name_or_path in TEXTS:
        return austen_text(TEXTS[name_or_path])
    return _text_file(name_or_path).read_text(encoding="utf-8")


def _text_file(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {name_or_path!r} not found (or use one of {sorted(TEXTS)})")
    return path


def text_sources(name_or_path: str) -> frozenset[str]:
    """What a text is made of: its novels (or 'mobydick') for a named text, the resolved path for a file."""
    if name_or_path in TEXTS:
        return frozenset(TEXTS[name_or_path])
    return frozenset({str(_text_file(name_or_path).resolve())})


def check_disjoint(train: list[str], evaluate: list[str]) -> None:
    """Raise ValueError when a training or calibration text shares a source with an evaluation text.

    Checked before anything is loaded, so that no perplexity is ever reported on text the model saw.
    """
    for t in train:
        for e in evaluate:
            shared = text_sources(t) & text_sources(e)
            if shared:
                raise ValueError(f"training text {t!r} and evaluation text {e!r} share {sorted(shared)}: "
                                 f"train on {TRAIN_TEXT!r} and evaluate on {' / '.join(HELD_OUT_TEXTS)}")


def token_chunks(tokenizer, text: str, seq_len: int, max_chunks: int | None = None) -> torch.Tensor:
    """Tokenize `text` once and cut it into (n, seq_len) consecutive, non-overlapping chunks."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = len(ids) // seq_len if max_chunks is None else min(max_chunks, len(ids) // seq_len)
    if n < 1:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one chunk of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images (n, 28, 28) uint8 and labels (n,) int64; split 'train' or 't10k'."""
    if split not in ("train", "t10k"):
        raise ValueError(f"split must be 'train' or 't10k', got {split!r}")
    root = data_dir() / "fashion-mnist"

    def idx(name: str, header: int) -> torch.Tensor:
        raw = gzip.decompress(_require(root / name).read_bytes())
        return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)

    images = idx(f"{split}-images-idx3-ubyte.gz", 16).view(-1, 28, 28)
    labels = idx(f"{split}-labels-idx1-ubyte.gz", 8).to(torch.int64)
    return images, labels
