"""The exercises (docs/exercises.md): the grader passes every solution, fails every common mistake
on exactly the gradients the page's table names, and grades a student's file from the command line:
a blank function, a wrong answer and a right one."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npllama import cli, reference
from npllama.exercises import EXERCISES, failing, grade, load_answers, train_with

ROOT = Path(__file__).resolve().parent.parent
BLANKS = ROOT / "exercises" / "backward.py"
PAGE = ROOT / "docs" / "exercises.md"

RMSNORM_RIGHT = """    r = r[..., None]
    xhat = x * r
    g = dy * w
    dx = r * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    return dx, np.sum((dy * xhat).reshape(-1, x.shape[-1]), axis=0)
"""
RMSNORM_WRONG = """    r = r[..., None]
    return r * dy * w, np.sum((dy * x * r).reshape(-1, x.shape[-1]), axis=0)
"""


def answers_with(tmp_path, function, body):
    """A copy of exercises/backward.py with ``function``'s blank replaced by ``body``."""
    text = BLANKS.read_text()
    start = text.index(f"def {function}(")
    blank = text.index("    # ---- your code here ----\n    raise NotImplementedError\n", start)
    end = blank + len("    # ---- your code here ----\n    raise NotImplementedError\n")
    path = tmp_path / "backward.py"
    path.write_text(text[:blank] + body + text[end:])
    return path


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_every_solution_passes(seed):
    for exercise in EXERCISES.values():
        rows = grade(exercise, exercise.solution, seed)
        assert not failing(rows), (exercise.name, rows)
        assert max(row[0] for row in rows.values()) < 1e-7


@pytest.mark.parametrize("exercise, mistake", [(e, m) for e in EXERCISES.values() for m in e.mistakes],
                         ids=lambda x: x.name)
def test_every_mistake_fails_on_its_gradients(exercise, mistake):
    for seed in (0, 1):
        rows = grade(exercise, mistake.backward, seed)
        assert failing(rows) == mistake.fails, rows
        for name in mistake.fails - {"shape"}:
            assert rows[name][0] > 1e-2      # off by far more than rounding, not borderline


def test_the_page_table_is_the_code():
    table = {}
    for line in PAGE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in EXERCISES and cells[1].startswith("`"):
            table[(cells[0], cells[1].strip("`"))] = (set(cells[3].split(", ")), set(cells[4].split(", ")) - {""})
    expected = {}
    for exercise in EXERCISES.values():
        for mistake in exercise.mistakes:
            grads = set(grade(exercise, exercise.solution)) if "shape" not in mistake.fails else set()
            expected[(exercise.name, mistake.name)] = (set(mistake.fails), grads - mistake.fails)
    assert table == expected


def test_the_blank_file_has_every_function_blank():
    module = load_answers(BLANKS)
    for exercise in EXERCISES.values():
        f = getattr(module, exercise.function)
        assert f.__doc__ and "docs/" in f.__doc__
        with pytest.raises(NotImplementedError):
            exercise.check(f, np.random.default_rng(0))


def test_cli_grades_a_blank_a_wrong_and_a_right_answer(tmp_path, capsys):
    blank = tmp_path / "blank.py"
    shutil.copy(BLANKS, blank)
    assert cli.main(["gradcheck", "--exercise", "rmsnorm", "--answers", str(blank)]) == 1
    assert "rmsnorm_backward is not written yet" in capsys.readouterr().out

    wrong = answers_with(tmp_path, "rmsnorm_backward", RMSNORM_WRONG)
    assert cli.main(["gradcheck", "--exercise", "rmsnorm", "--answers", str(wrong)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"dx +max-norm\. [\d.e+-]+ +elementwise [\d.e+-]+ +FAIL", out)
    assert re.search(r"dweight +max-norm\. [\d.e-]+ +elementwise [\d.e+-]+ +ok", out)
    assert "wrong: x" in out

    right = answers_with(tmp_path, "rmsnorm_backward", RMSNORM_RIGHT)
    assert cli.main(["gradcheck", "--exercise", "rmsnorm", "--answers", str(right)]) == 0
    assert "all gradients match finite differences" in capsys.readouterr().out


def test_cli_solution_mistake_and_errors(tmp_path, capsys):
    assert cli.main(["gradcheck", "--exercise", "attention", "--solution"]) == 0
    assert "the solution, npllama.reference.attention_backward" in capsys.readouterr().out
    assert cli.main(["gradcheck", "--exercise", "attention", "--mistake", "no_psi"]) == 1
    assert "wrong: k, q" in capsys.readouterr().out
    assert cli.main(["gradcheck", "--exercise", "attention", "--mistake", "nonsense"]) == 1
    assert "no mistake 'nonsense' for attention" in capsys.readouterr().err
    assert cli.main(["gradcheck", "--exercise", "rope", "--answers", str(tmp_path / "missing.py")]) == 1
    assert "missing.py: no such file" in capsys.readouterr().err
    crash = answers_with(tmp_path, "rope_backward", "    return dy @ cos\n")
    assert cli.main(["gradcheck", "--exercise", "rope", "--answers", str(crash)]) == 1
    out = capsys.readouterr().out
    assert "Traceback" in out and "rope_backward raised an exception" in out


def test_train_with_puts_the_answers_into_the_reference_model(tmp_path):
    """The reference model's gradients with the student's backward: the same as npllama's for a right
    answer, different for a wrong one, and npllama's own again after the block."""
    from npllama.config import LlamaConfig
    from npllama.gradcheck import random_params
    cfg = LlamaConfig(vocab_size=11, dim=8, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=6, max_seq_len=8)
    r = np.random.default_rng(0)
    params = random_params(cfg, r)
    tokens, targets = r.integers(0, 11, size=(2, 5)), r.integers(0, 11, size=(2, 5))
    _, grads = reference.loss_and_grad(params, cfg, tokens, targets)
    right = load_answers(answers_with(tmp_path, "rmsnorm_backward", RMSNORM_RIGHT))
    with train_with(right, ["rmsnorm"]):
        assert reference.rmsnorm_backward_reference is right.rmsnorm_backward
        _, mine = reference.loss_and_grad(params, cfg, tokens, targets)
    for name in grads:
        np.testing.assert_allclose(mine[name], grads[name], rtol=1e-12, atol=1e-14)
    wrong = load_answers(answers_with(tmp_path, "rmsnorm_backward", RMSNORM_WRONG))
    with train_with(wrong, ["rmsnorm"]):
        _, bad = reference.loss_and_grad(params, cfg, tokens, targets)
    assert not np.allclose(bad["model.embed_tokens.weight"], grads["model.embed_tokens.weight"])
    assert reference.rmsnorm_backward_reference.__module__ == "npllama.layers.rmsnorm"


def test_train_with_the_embedding_answer():
    class Answers:
        embedding_backward = staticmethod(EXERCISES["embedding"].solution)
    table = np.zeros((5, 3))
    with train_with(Answers, ["embedding"]):
        reference.scatter_add_rows_reference(np.array([1, 1, 4]), np.ones((3, 3)), table)
    np.testing.assert_array_equal(table.sum(axis=1), [0, 6, 0, 0, 3])
