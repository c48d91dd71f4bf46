"""`vnm recover`: from a `vnm prune --out` checkpoint (or a model and a pattern) to a recovered, saved model,
on a tiny model in seconds; every bad input refused before a model is loaded."""

import json

import pytest

from vnmsparse.checkpoint import CONFIG_NAME, load_pretrained, read_sparsity_config
from vnmsparse.app.cli import build_parser, main
from vnmsparse.nn import VNMLinear

TINY = ["--seq-len", "32", "--batch-size", "2", "--calib-chunks", "2", "--eval-chunks", "2", "--rank", "4"]


@pytest.fixture
def pruned(tiny_job, tmp_path, capsys):
    """A checkpoint written by `vnm prune --out` (of the tiny model; its base model recorded as the built-in)."""
    out = tmp_path / "pruned"
    assert main(["prune", "--pattern", "16:2:8", "--no-reference", "--calib-chunks", "2", "--eval-chunks", "2",
                 "--seq-len", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: the checks must come first."""
    import vnmsparse.app.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(vnmsparse.app.models, "load_causal_lm", refuse)


def test_defaults():
    args = build_parser().parse_args(["recover", "dir"])
    assert (args.method, args.no_kd, args.minutes, args.steps) == ("lora3", False, None, None)
    assert (args.train, args.eval) == ("austen-train", ["persuasion", "mobydick"])


def test_recovers_a_pruned_checkpoint_end_to_end(pruned, tmp_path, capsys):
    out = tmp_path / "recovered"
    assert main(["recover", str(pruned), "--steps", "3", "--kd-hidden", "0.5", *TINY, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "distillation {'weight': 0.9, 'temperature': 1.0, 'hidden_weight': 0.5" in text
    assert "trained 3 of 3 steps (planned from steps)" in text
    for row in ("dense", "16:2:8 ria (input)", "recovered (lora3 + KD, 3 steps)", "perplexity (persuasion)",
                "perplexity (mobydick)", "14 / 15", "75.00%", "time: prune or train, eval"):
        assert row in text, row
    model = load_pretrained(out)
    layers = [m for m in model.modules() if isinstance(m, VNMLinear)]
    assert len(layers) == 14 and {str(m.pattern) for m in layers} == {"16:2:8"}
    sparsity = read_sparsity_config(out)[1]
    assert sparsity["base_model"] == "smollm2-135m"
    assert sparsity["recovery"]["steps"] == 3 and sparsity["recovery"]["distill"]["hidden_weight"] == 0.5
    assert (out / "tokenizer.txt").exists()


def test_prunes_first_and_plans_steps_from_minutes(tiny_job, capsys):
    assert main(["recover", "--pattern", "32:2:8", "--method", "srste", "--no-kd", "--minutes", "0.02", *TINY]) == 0
    text = capsys.readouterr().out
    assert "32:2:8 ria one-shot" in text and "recovered (srste, " in text and "no distillation" in text
    assert "planned from minutes (probe:" in text


@pytest.mark.parametrize("argv, message", [
    ([], "give a checkpoint folder"),
    (["--steps", "0"], None),
    (["--pattern", "16:2:8", "--train", "austen", "--eval", "persuasion"], "share ['persuasion']"),
    (["--pattern", "16:2:8", "--kd-weight", "2"], "DistillConfig.weight"),
    (["--pattern", "16:2:8", "--teacher", "/no/such/model"], "pass --teacher"),
    (["--pattern", "16:2:8", "--device", "cuda:99"], "--device"),
    (["/no/such/checkpoint"], "no config.json"),
])
def test_bad_inputs_are_refused_before_loading(no_loading, argv, message, capsys):
    if message is None:  # argparse's own refusal
        with pytest.raises(SystemExit):
            main(["recover", *argv])
        return
    assert main(["recover", *argv]) == 2
    assert message in capsys.readouterr().err


def test_checkpoint_inputs_are_checked_before_loading(pruned, no_loading, tmp_path, capsys):
    assert main(["recover", str(pruned), "--pattern", "16:2:8"]) == 2
    assert "not both" in capsys.readouterr().err
    config = json.loads((pruned / CONFIG_NAME).read_text())
    del config["sparsity_config"]["base_model"]
    (pruned / CONFIG_NAME).write_text(json.dumps(config))
    assert main(["recover", str(pruned)]) == 2
    assert "does not record the dense model it was pruned from: pass --teacher" in capsys.readouterr().err
    config["sparsity_config"]["base_model"] = str(tmp_path / "gone")
    (pruned / CONFIG_NAME).write_text(json.dumps(config))
    assert main(["recover", str(pruned)]) == 2
    assert "pass --teacher" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["recover", str(pruned), "--teacher", "smollm2-135m", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
