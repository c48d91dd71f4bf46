"""The default texts and images read from the Debian packages' files (fetched by scripts/setup.sh)."""

import pytest
import torch

from vnmsparse.app import data


def test_austen_and_moby_dick_are_real_text():
    austen = data.austen_text()
    assert "It is a truth universally acknowledged" in austen
    assert len(austen) > 3_000_000
    moby = data.moby_dick_text()
    assert moby.startswith("CHAPTER 1. Loomings.")
    assert "Call me Ishmael" in moby[:200]
    assert "Project Gutenberg" not in moby[-2000:]
    assert data.read_text("mobydick") == moby


def test_fashion_mnist():
    images, labels = data.fashion_mnist("t10k")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.unique().tolist()) == set(range(10))
    assert images.float().std() > 50  # real pictures, not zeros


class CharTokenizer:
    def __call__(self, text, return_tensors, add_special_tokens):
        class Out:
            input_ids = torch.tensor([[ord(c) % 256 for c in text]])
        return Out()


def test_token_chunks():
    chunks = data.token_chunks(CharTokenizer(), "abcdefghij", seq_len=3)
    assert chunks.tolist() == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    assert data.token_chunks(CharTokenizer(), "abcdefghij", 3, max_chunks=1).shape == (1, 3)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        data.token_chunks(CharTokenizer(), "ab", 3)
    with pytest.raises(ValueError, match="seq_len"):
        data.token_chunks(CharTokenizer(), "abc", 1)


def test_missing_data_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VNMSPARSE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fetch_data.sh"):
        data.austen_text()
    with pytest.raises(FileNotFoundError, match="fetch_data.sh"):
        data.fashion_mnist()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown novels"):
        data.austen_text(("ulysses",))
    with pytest.raises(ValueError, match="split"):
        data.fashion_mnist("val")
    with pytest.raises(FileNotFoundError, match="not found"):
        data.read_text("/no/such/file.txt")


def test_data_is_found_from_any_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("VNMSPARSE_DATA", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    monkeypatch.chdir(tmp_path)
    assert data.data_dir() == tmp_path / "share" / "vnmsparse" / "data"  # where setup puts it
    (tmp_path / "data").mkdir()
    assert data.data_dir() == data.Path("data")  # a checkout fetched into by an older setup
    (tmp_path / "share" / "vnmsparse" / "data").mkdir(parents=True)
    assert data.data_dir() == tmp_path / "share" / "vnmsparse" / "data"
    with pytest.raises(FileNotFoundError, match="setup.sh"):
        data.check_text("austen")
    monkeypatch.setenv("VNMSPARSE_DATA", str(tmp_path / "mine"))
    assert data.data_dir() == tmp_path / "mine"


def _paragraphs(text: str, min_words: int = 8) -> set[str]:
    """Blank-line-separated paragraphs of at least `min_words` words, whitespace normalised (headings drop out)."""
    paragraphs = (" ".join(p.split()) for p in text.split("\n\n"))
    return {p for p in paragraphs if len(p.split()) >= min_words}


def _windows(text: str, width: int = 64) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + width]) for i in range(0, len(words) - width + 1)}


def test_held_out_splits_share_no_text():
    train = data.read_text(data.TRAIN_TEXT)
    held_out = {name: data.read_text(name) for name in data.HELD_OUT_TEXTS}
    assert data.HELD_OUT_NOVEL not in data.TRAIN_NOVELS and len(data.TRAIN_NOVELS) == 5
    assert "Anne Elliot" in held_out["persuasion"] and "Anne Elliot" not in train
    train_paragraphs, train_windows = _paragraphs(train), _windows(train)
    assert len(train_paragraphs) > 5_000
    for name, text in held_out.items():
        assert len(text) > 400_000, name
        assert not _paragraphs(text) & train_paragraphs, name
        assert not _windows(text) & train_windows, name


def test_check_disjoint_refuses_training_on_evaluation_text(tmp_path):
    data.check_disjoint([data.TRAIN_TEXT], list(data.HELD_OUT_TEXTS))
    with pytest.raises(ValueError, match="share \\['persuasion'\\]"):
        data.check_disjoint(["austen"], ["persuasion"])
    with pytest.raises(ValueError, match="share \\['mobydick'\\]"):
        data.check_disjoint([data.TRAIN_TEXT, "mobydick"], ["mobydick"])
    path = tmp_path / "notes.txt"
    path.write_text("some words")
    data.check_disjoint([str(path)], ["mobydick"])
    with pytest.raises(ValueError, match="share"):
        data.check_disjoint([str(path)], [str(tmp_path / "." / "notes.txt")])
    with pytest.raises(FileNotFoundError, match="persuasion"):
        data.check_disjoint(["/no/such/file.txt"], ["mobydick"])
