"""The `vnm` command's core subcommands."""

import json

from vnmsparse.app.cli import main


def test_info(capsys):
    assert main(["info", "64:2:8"]) == 0
    out = capsys.readouterr().out
    assert "sparsity           0.7500" in out
    assert "log K per weight   0.2323" in out
    assert "3.37x smaller" in out


def test_select_with_a_table(tmp_path, capsys):
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"gpu": "TestGPU", "speedups": {"64:2:5": 1.6, "64:2:8": 2.2, "128:2:8": 2.1}}))
    assert main(["select", "--target", "1.5", "--table", str(table)]) == 0
    out = capsys.readouterr().out
    assert "speedups from: TestGPU" in out
    assert "choice for target 1.5x: 64:2:5" in out
    assert "128:2:8" not in out  # dominated by 64:2:8: slower and less diverse


def test_select_without_a_table_says_it_is_an_estimate(capsys):
    assert main(["select", "--target", "2"]) == 0
    assert "analytic estimate" in capsys.readouterr().out


def test_errors_exit_2_with_a_message(capsys):
    assert main(["info", "64:3:8"]) == 2
    assert "N must be 2" in capsys.readouterr().err
    assert main(["select", "--target", "100"]) == 2
    assert "no pattern reaches" in capsys.readouterr().err


def test_select_writes_a_plot(tmp_path, capsys):
    png = tmp_path / "front.png"
    assert main(["select", "--target", "2", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_info_says_when_a_format_is_larger_than_dense(capsys):
    assert main(["info", "1:2:4"]) == 0
    assert "2.56x LARGER" in capsys.readouterr().out
    assert main(["info", "2:4"]) == 0
    out = capsys.readouterr().out
    assert "pattern            64:2:4" in out and "x smaller" in out


def test_select_bad_paths_are_named(tmp_path, capsys):
    assert main(["select", "--target", "2", "--table", str(tmp_path / "none.json")]) == 2
    assert "--table" in capsys.readouterr().err
    assert main(["select", "--target", "2", "--plot", str(tmp_path / "no" / "front.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["select", "--target", "2", "--plot", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_plot_labels_do_not_overlap_and_the_choice_is_labelled():
    from vnmsparse.plot import _spaced

    points = [(1.0, 0.45), (1.01, 0.449), (2.0, 0.3), (2.02, 0.301), (14.0, 0.05)]
    kept = _spaced(points, first=1)
    assert kept[0] == 1 and 0 not in kept and 2 in kept and 3 not in kept and 4 in kept
