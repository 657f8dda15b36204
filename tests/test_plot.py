"""`npllama plot`: loss curves from metrics.jsonl (matplotlib is optional)."""
import importlib.util
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


def write_timed_metrics(run_dir, n_steps, tokens_per_step, seconds_per_step, start_loss):
    """metrics.jsonl as a real run writes it: tokens/s, step seconds and elapsed time per step."""
    lines = [{"step": 0, "kind": "eval", "val_loss": start_loss, "val_bpb": start_loss / 2, "elapsed": 0.0}]
    for s in range(1, n_steps + 1):
        lines.append({"step": s, "loss": start_loss - 0.01 * s, "lr": 1e-3, "step_seconds": seconds_per_step,
                      "tokens_per_second": tokens_per_step / seconds_per_step, "elapsed": s * seconds_per_step})
        if s % 10 == 0:
            lines.append({"step": s, "kind": "eval", "val_loss": start_loss - 0.009 * s,
                          "val_bpb": (start_loss - 0.009 * s) / 2, "elapsed": s * seconds_per_step + 0.1,
                          "final": s == n_steps})
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_several_runs_against_steps_tokens_and_time_with_a_csv(tmp_path, monkeypatch, capsys):
    from npllama.plot import RunCurves, plot_runs
    small, big = tmp_path / "small", tmp_path / "big"
    write_timed_metrics(small, 30, tokens_per_step=2048, seconds_per_step=0.25, start_loss=5.0)
    write_timed_metrics(big, 20, tokens_per_step=4096, seconds_per_step=1.5, start_loss=6.0)
    curves = RunCurves(big)
    assert curves.tokens_per_step == 4096
    np.testing.assert_allclose(curves.x([0, 10, 20], "tokens"), [0, 40960, 81920])
    np.testing.assert_allclose(curves.x([0, 10, 20], "time"), [0, 15.0, 30.0])
    np.testing.assert_allclose(curves.x([0, 10, 20], "step"), [0, 10, 20])

    monkeypatch.chdir(tmp_path)
    assert cli.main(["plot", str(small), str(big), "--x", "tokens", "--csv", "runs.csv"]) == 0
    out = capsys.readouterr().out.split()
    assert out == ["runs.csv", "compare.png"]
    rows = (tmp_path / "runs.csv").read_text().splitlines()
    assert rows[0] == "run,step,tokens,elapsed,kind,loss,lr,val_loss,val_bpb,final"
    assert len(rows) == 1 + (30 + 4) + (20 + 3)        # every step and evaluation of both runs
    assert "small,10,20480,2.5,train,4.9,0.001,,,0" in rows
    assert "big,20,81920,30.1,eval,,,5.82,2.91,1" in rows
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_MAGIC
        for x in ("step", "time"):
            png = plot_runs([small, big], tmp_path / f"{x}.png", x=x)
            assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    with pytest.raises(ConfigError, match="--x must be one of step, tokens, time"):
        plot_runs([small], x="epochs")
    write_metrics(tmp_path, 5)                 # an old run's metrics: no tokens/s, no wall times
    with pytest.raises(ConfigError, match="does not give the tokens per step; plot it against --x step"):
        plot_runs([tmp_path], x="tokens")


def test_both_final_stars_say_they_cover_all_held_out_tokens(tmp_path):
    """The loss star may sit above the periodic curve and the bits/byte star below it (different
    tokens): each is annotated with what it covers and its value."""
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from npllama.plot import RunCurves, _draw_run
    evals = [{"step": 0, "kind": "eval", "val_loss": 5.0, "val_bpb": 4.0, "val_tokens": 100},
             {"step": 9, "kind": "eval", "val_loss": 3.0, "val_bpb": 2.5, "val_tokens": 1234, "final": True,
              "subset": {"val_loss": 2.9, "val_bpb": 2.6, "val_tokens": 100, "val_bytes": 300}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2)
    _draw_run(ax_loss, ax_bpb, RunCurves(tmp_path), "step", None, None)
    assert [t.get_text() for t in ax_loss.texts] == ["all 1,234 tokens: 3.000"]
    assert [t.get_text() for t in ax_bpb.texts] == ["all 1,234 tokens: 2.500"]
    plt.close(fig)
