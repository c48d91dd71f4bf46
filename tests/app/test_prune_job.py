"""`vnm prune`: flags, the table, and a saved model that reloads; one slow run on the real SmolLM2 and texts."""

import pytest
import torch

from vnmsparse.checkpoint import load_pretrained, read_sparsity_config
from vnmsparse.app.cli import build_parser, main
from vnmsparse.nn import VNMLinear
from vnmsparse.pattern import VNMPattern
from vnmsparse.app.prune_job import Column, recovery_hint


def test_defaults():
    args = build_parser().parse_args(["prune"])
    assert args.model == "smollm2-135m" and args.pattern == VNMPattern.parse("64:2:8") and args.method == "ria"
    assert (args.calib, args.eval, args.out) == ("austen-train", ["persuasion", "mobydick"], None)
    assert not args.sequential and not args.two_four_copy


def test_bad_flags_are_refused(capsys):
    for argv in (["prune", "--pattern", "64:3:8"], ["prune", "--method", "wanda"], ["prune", "--seq-len", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_job_prints_the_table_and_saves(tiny_job, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--pattern", "16:2:8", "--sequential", "--permute", "--calib-chunks", "2", "--eval-chunks", "2",
                 "--seq-len", "32", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("(sequential)", "16:2:8 ria permuted", "score kept by masks, permuted", "layers pruned", "14 / 15", "75.00%",
                "50.00%", "perplexity (persuasion)", "perplexity (mobydick)", "bytes, whole model",
                "2:4 ria (reference)"):
        assert row in table
    loaded = load_pretrained(out)
    assert sum(isinstance(m, VNMLinear) for m in loaded.modules()) == 14
    assert (out / "tokenizer.txt").exists()
    assert read_sparsity_config(out)[1]["base_model"] == "smollm2-135m"  # where `vnm recover` finds the teacher


def test_job_one_shot_magnitude_without_reference(tiny_job, capsys):
    assert main(["prune", "--pattern", "32:2:8", "--method", "magnitude", "--no-reference", "--calib-chunks", "1",
                 "--eval-chunks", "1", "--seq-len", "32"]) == 0
    table = capsys.readouterr().out
    assert "32:2:8 magnitude" in table and "reference" not in table and "75.00%" in table


def test_training_on_evaluation_text_is_refused_before_loading(tiny_job, capsys):
    assert main(["prune", "--calib", "austen", "--eval", "persuasion"]) == 2
    assert "share ['persuasion']" in capsys.readouterr().err
    assert main(["prune", "--device", "cuda:99"]) == 2
    assert "--device" in capsys.readouterr().err


def test_recovery_hint_names_the_command_when_perplexity_is_far_above_dense():
    dense = Column("dense", None, {"persuasion": 20.0, "mobydick": 50.0}, 1.0, 0)
    close = Column("p", None, {"persuasion": 25.0, "mobydick": 60.0}, 1.0, 0)
    broken = Column("p", None, {"persuasion": 25.0, "mobydick": 4000.0}, 1.0, 0)
    command = ["vnm", "recover", "out dir", "--out", "out dir-recovered"]
    assert recovery_hint([dense, close], command) is None
    hint = recovery_hint([dense, broken], command)
    assert "80.0x dense on mobydick" in hint and "needs recovery" in hint
    assert hint.endswith("vnm recover 'out dir' --out 'out dir-recovered'")


def test_job_prints_the_recover_command(tiny_job, tmp_path, capsys, monkeypatch):
    import vnmsparse.app.prune_job

    monkeypatch.setattr(vnmsparse.app.prune_job, "NEEDS_RECOVERY", 0.0)  # a random tiny model is not broken enough
    assert main(["prune", "--pattern", "32:2:8", "--no-reference", "--calib-chunks", "1", "--eval-chunks", "1",
                 "--seq-len", "32"]) == 0
    assert "vnm recover --model smollm2-135m --pattern 32:2:8 --out pruned-recovered" in capsys.readouterr().out


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
    (["--two-four-copy", "--pattern", "64:2:16"], "--two-four-copy needs a V:2:M pattern with 5 <= M <= 8 and V <= 64"),
    (["--two-four-copy", "--pattern", "128:2:8"], "not 128:2:8"),
])
def test_inputs_are_checked_before_the_model_loads(monkeypatch, capsys, flags, match):
    import vnmsparse.app.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(vnmsparse.app.models, "load_causal_lm", never)
    assert main(["prune", *flags]) == 2
    assert match in capsys.readouterr().err


def test_out_must_not_be_a_file(monkeypatch, tmp_path, capsys):
    import vnmsparse.app.models

    monkeypatch.setattr(vnmsparse.app.models, "load_causal_lm", lambda *a, **k: pytest.fail("loaded"))
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


def test_two_four_copy_is_asked_for_on_every_pruned_layer_counted_and_saved(tiny_job, tmp_path, capsys, monkeypatch):
    import vnmsparse.app.prune_job as job

    tables = []  # the columns each run's table is made of
    monkeypatch.setattr(job, "table", lambda columns, *rest, real=job.table: tables.append(columns) or real(columns, *rest))
    out = tmp_path / "pruned"
    argv = ["prune", "--pattern", "16:2:8", "--method", "magnitude", "--calib-chunks", "1", "--eval-chunks", "1",
            "--seq-len", "32"]
    assert main([*argv, "--no-reference"]) == 0
    assert "+2:4 copy" not in capsys.readouterr().out
    assert main([*argv, "--two-four-copy", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "16:2:8 magnitude +2:4 copy" in table and "+2:4 copy bytes" in table
    (_, plain), (_, copied, reference) = tables
    assert reference.report.copy_bytes == 0  # the 2:4 reference column asks for no copy
    report = copied.report
    assert all(layer.two_four_copy for layer in report.layers) and report.copy_bytes == 2 * report.compressed_bytes
    assert copied.layer_bytes == report.held_bytes == plain.layer_bytes + report.copy_bytes  # counted on the CPU too
    assert copied.bytes == plain.bytes + report.copy_bytes
    loaded = load_pretrained(out)
    assert all(m.two_four_copy for m in loaded.modules() if isinstance(m, VNMLinear))
    # A copy that would gather x (16:2:5) runs on no layer this small: the table says so instead of counting bytes.
    assert main([*argv, "--pattern", "16:2:5", "--no-reference", "--two-four-copy"]) == 0
    table = capsys.readouterr().out
    assert "+2:4 copy bytes" not in table and "16:2:5 magnitude +2:4 copy: 14 of 14 layers hold no 2:4 copy" in table
