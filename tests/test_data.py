"""The default texts and images read from the Debian packages' files (fetched by scripts/setup.sh)."""

import pytest
import torch

from vnmsparse import data


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
