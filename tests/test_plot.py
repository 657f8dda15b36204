"""`npllama plot`: loss curves from metrics.jsonl (matplotlib is optional)."""
import json
import sys

import numpy as np
import pytest

from npllama import cli
from npllama.errors import CheckpointError, ConfigError
from npllama.plot import MISSING_MATPLOTLIB, moving_average, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, n_steps=30):
    lines = [{"step": 0, "kind": "eval", "val_loss": 5.5, "val_bpb": 4.0}]
    for s in range(1, n_steps + 1):
        lines.append({"step": s, "loss": 5.5 - 0.1 * s, "lr": 1e-3})
        if s % 10 == 0:
            lines.append({"step": s, "kind": "eval", "val_loss": 5.5 - 0.09 * s, "val_bpb": 4.0 - 0.05 * s,
                          "final": s == n_steps})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 31, "lo'   # torn last line
    (run_dir / "metrics.jsonl").write_text(text)


def test_moving_average():
    np.testing.assert_allclose(moving_average([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average([3, 1], 10), [3, 2])
    assert moving_average([], 3).size == 0


def test_missing_matplotlib_gives_a_clear_error(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    with pytest.raises(ConfigError, match=r"needs matplotlib.*pip install"):
        plot_run(tmp_path)
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert "pip install" in MISSING_MATPLOTLIB


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path)
    out = plot_run(tmp_path)
    assert out == tmp_path / "loss.png"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000

    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.png"), "--smooth", "5"]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert str(tmp_path / "curves.png") in capsys.readouterr().out


def test_plot_errors(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(CheckpointError, match="no metrics file"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="nothing|no training"):
        plot_run(tmp_path)


def test_held_out_curves_say_which_tokens(tmp_path):
    """Periodic and final evaluations are drawn apart (they read different held-out tokens), each
    labelled with its tokens; the final figure on the periodic tokens continues the periodic curve."""
    from npllama.plot import held_out_curves
    from npllama.train import read_metrics
    write_metrics(tmp_path)             # an older run: no token counts, no subset
    evals = [r for r in read_metrics(tmp_path) if r.get("kind") == "eval"]
    periodic, final = held_out_curves(evals)
    assert (periodic["label"], final["label"]) == ("held-out (periodic)", "held-out (final)")
    assert periodic["steps"] == [0, 10, 20] and final["steps"] == [30]
    evals = [{"step": 0, "kind": "eval", "val_loss": 5.0, "val_bpb": 4.0, "val_tokens": 100},
             {"step": 9, "kind": "eval", "val_loss": 3.0, "val_bpb": 2.5, "val_tokens": 1234, "final": True,
              "subset": {"val_loss": 2.9, "val_bpb": 2.4, "val_tokens": 100, "val_bytes": 300}}]
    periodic, final = held_out_curves(evals)
    assert periodic == {"label": "held-out, first 100 tokens (periodic)", "final": False, "steps": [0, 9],
                        "val_loss": [5.0, 2.9], "val_bpb": [4.0, 2.4]}
    assert final == {"label": "held-out, all 1,234 tokens (final)", "final": True, "steps": [9],
                     "val_loss": [3.0], "val_bpb": [2.5]}
