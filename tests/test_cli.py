"""The `vnm` command's core subcommands."""

import json

from vnmsparse.cli import main


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
