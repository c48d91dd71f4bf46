"""`vnm prune`: flags, the table, and a saved model that reloads; one slow run on the real SmolLM2 and texts."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tiny_models import tiny_llama
from vnmsparse.checkpoint import load_pretrained
from vnmsparse.cli import build_parser, main
from vnmsparse.nn import VNMLinear
from vnmsparse.pattern import VNMPattern


class WordTokenizer:
    """Enough of an HF tokenizer for the job: words to ids below 512, and a save_pretrained that writes a file."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        ids = [sum(word.encode()) % 512 for word in text.split()]
        return SimpleNamespace(input_ids=torch.tensor([ids]))

    def save_pretrained(self, folder):
        Path(folder, "tokenizer.txt").write_text("words")


@pytest.fixture
def tiny_job(monkeypatch):
    """The job on a 2-layer LLaMA and a made-up text, so it runs in seconds."""
    import vnmsparse.data
    import vnmsparse.models

    text = " ".join(f"w{i % 97} v{(i * 7) % 31}" for i in range(2000))
    monkeypatch.setattr(vnmsparse.models, "load_causal_lm", lambda *a, **k: (tiny_llama(), WordTokenizer()))
    monkeypatch.setattr(vnmsparse.data, "read_text", lambda name: text)


def test_defaults():
    args = build_parser().parse_args(["prune"])
    assert args.model == "smollm2-135m" and args.pattern == VNMPattern.parse("64:2:8") and args.method == "ria"
    assert (args.calib, args.eval, args.out) == ("austen", "mobydick", None)
    assert not args.sequential


def test_bad_flags_are_refused(capsys):
    for argv in (["prune", "--pattern", "64:3:8"], ["prune", "--method", "wanda"], ["prune", "--seq-len", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_job_prints_the_table_and_saves(tiny_job, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--pattern", "16:2:8", "--sequential", "--permute", "--calib-chunks", "2", "--eval-chunks", "2",
                 "--seq-len", "32", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("(sequential)", "16:2:8 ria permuted", "score kept by masks, permuted", "layers pruned", "14 / 15", "75.00%", "50.00%", "perplexity (mobydick)", "bytes, whole model",
                "2:4 ria (reference)"):
        assert row in table
    loaded = load_pretrained(out)
    assert sum(isinstance(m, VNMLinear) for m in loaded.modules()) == 14
    assert (out / "tokenizer.txt").exists()


def test_job_one_shot_magnitude_without_reference(tiny_job, capsys):
    assert main(["prune", "--pattern", "32:2:8", "--method", "magnitude", "--no-reference", "--calib-chunks", "1",
                 "--eval-chunks", "1", "--seq-len", "32"]) == 0
    table = capsys.readouterr().out
    assert "32:2:8 magnitude" in table and "reference" not in table and "75.00%" in table


@pytest.mark.slow
def test_real_smollm2_end_to_end(tmp_path, capsys):
    out = tmp_path / "smollm2"
    assert main(["prune", "--calib-chunks", "1", "--eval-chunks", "1", "--seq-len", "64", "--no-reference",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "210 / 211" in table and "75.00%" in table
    loaded = load_pretrained(out)
    assert sum(isinstance(m, VNMLinear) for m in loaded.modules()) == 210


def test_pattern_errors_keep_their_reason_and_2_4_is_accepted(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--pattern", "64:2:3"])
    assert "M must be >= 4" in capsys.readouterr().err
    assert build_parser().parse_args(["prune", "--pattern", "2:4"]).pattern == VNMPattern(V=64, M=4)


@pytest.mark.parametrize("flags, match", [
    (["--calib", "no-such-text.txt"], "--calib"),
    (["--eval", "no-such-text.txt"], "--eval"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device"),
])
def test_inputs_are_checked_before_the_model_loads(monkeypatch, capsys, flags, match):
    import vnmsparse.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(vnmsparse.models, "load_causal_lm", never)
    assert main(["prune", *flags]) == 2
    assert match in capsys.readouterr().err


def test_out_must_not_be_a_file(monkeypatch, tmp_path, capsys):
    import vnmsparse.models

    monkeypatch.setattr(vnmsparse.models, "load_causal_lm", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "f").write_text("x")
    assert main(["prune", "--calib", str(tmp_path / "f"), "--eval", str(tmp_path / "f"), "--out", str(tmp_path / "f")]) == 2
    assert "--out" in capsys.readouterr().err


def test_the_load_hint_works_when_pasted(tiny_job, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--pattern", "16:2:8", "--method", "magnitude", "--no-reference", "--calib-chunks", "1",
                 "--eval-chunks", "1", "--seq-len", "32", "--out", str(out)]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1].strip()
    assert hint.startswith("import vnmsparse; model = vnmsparse.load_pretrained(")
    namespace = {}
    exec(hint, namespace)
    assert sum(isinstance(m, VNMLinear) for m in namespace["model"].modules()) == 14
