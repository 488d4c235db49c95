"""loralib.exercises.check: right, wrong and untouched answers of each kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loralib.checks import ArgumentTypeError
from loralib.exercises import check


@pytest.mark.parametrize(
    "answer, expected",
    [
        (294_912, 294_912),
        (0.1 + 0.2, 0.3),
        (torch.ones(2, 3), torch.ones(2, 3)),
        (np.arange(4.0), np.arange(4.0)),
        ([1, 2.0], (1, 2)),
        ("query", "query"),
        (True, True),
    ],
)
def test_right_answers_pass(answer, expected, capsys):
    assert check("Exercise 1", answer, expected) is True
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    "answer, expected",
    [
        (294_913, 294_912),
        (0.31, 0.3),
        (torch.ones(2, 3), torch.ones(3, 2)),  # same numbers, wrong shape
        (torch.ones(2), torch.zeros(2)),
        (np.arange(3.0), np.arange(4.0)),
        ([1, 2], [1, 2, 3]),
        ("key", "query"),
        (1, True),  # an int is not a bool answer
        (0.0, 1e-9),
    ],
)
def test_wrong_answers_raise_with_the_hint_but_not_the_answer(answer, expected):
    with pytest.raises(AssertionError) as err:
        check("Exercise 2", answer, expected, hint="count both matrices")
    message = str(err.value)
    assert message.startswith("Exercise 2: ") and message.endswith(" is not right. Hint: count both matrices")
    assert "expected" not in message


def test_an_untouched_answer_is_not_attempted(capsys):
    assert check("Exercise 3", ..., 42) is None  # a notebook cell ending in it shows the note, no stray False
    assert "not attempted" in capsys.readouterr().out


def test_the_tolerance_is_relative_and_checked():
    assert check("e", 100.0001, 100.0, rel_tol=1e-5)
    with pytest.raises(AssertionError):
        check("e", 100.01, 100.0, rel_tol=1e-5)
    with pytest.raises(ArgumentTypeError, match="rel_tol"):
        check("e", 1, 1, rel_tol="small")


def test_grade_keeps_the_answers_out_of_the_cells_and_prints_one_line(capsys):
    from loralib.exercises import grade

    assert grade("04", ...) is None and "not attempted" in capsys.readouterr().out
    assert grade("04", (25_260, 8_420)) is None and capsys.readouterr().out.strip() == "Exercise 04: correct."
    with pytest.raises(AssertionError, match="Hint") as err:
        grade("04", (25_260, 8_421))
    assert "8420" not in str(err.value) and "8_420" not in str(err.value)  # the hint, never the answer
    with pytest.raises(ValueError, match="unknown exercise"):
        grade("99", 1)


@pytest.mark.parametrize(
    "exercise, right, wrong",
    [
        ("01-code", lambda a, b, alpha, r: (alpha / r) * (b @ a), lambda a, b, alpha, r: alpha * (b @ a)),
        (
            "04-code",
            lambda n, b, e, w: (e * -(-n // b), round(e * -(-n // b) * w)),
            lambda n, b, e, w: (e * (n // b), 0),
        ),
        (
            "08-code",
            lambda w0, a, b, s: (w0 + s * b @ a).norm(dim=1),
            lambda w0, a, b, s: (w0 + s * b @ a).norm(dim=0)[: w0.shape[0]],
        ),
    ],
)
def test_coding_exercises_accept_a_right_function_and_refuse_a_wrong_one(exercise, right, wrong, capsys):
    from loralib.exercises import grade

    grade(exercise, lambda *args: ...)
    assert "not attempted" in capsys.readouterr().out
    grade(exercise, right)
    assert capsys.readouterr().out.strip() == f"Exercise {exercise}: correct on every test case."
    with pytest.raises(AssertionError, match="wrong on test case"):
        grade(exercise, wrong)


def test_the_swap_exercise_is_judged_by_what_it_leaves_behind(capsys):
    from torch import nn

    from loralib.exercises import grade

    def shallow(module, make):  # misses the nested ones
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, make(child))
        return module

    with pytest.raises(AssertionError):
        grade("03-swap", shallow)
