"""The notebooks' exercise checks: tell a reader whether an answer is right, and why not.

Covers `check(exercise, answer, expected)`: an answer left as `...` (Ellipsis, how every exercise cell
starts) is "not attempted" and passes quietly, so the notebooks still run top to bottom; anything else
must equal `expected` (numbers to a relative tolerance, tensors and arrays elementwise, everything else
with ==), or an AssertionError says what was given and the hint (not the expected value). Every exercise is
followed by a hidden solution cell that runs the same check on the worked answer, so CI proves each
solution right. Not here: the exercises themselves (they live in the notebooks).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from loralib.checks import check_number


def _close(answer: Any, expected: Any, rel_tol: float) -> bool:
    if isinstance(expected, torch.Tensor) or isinstance(answer, torch.Tensor):
        a, e = torch.as_tensor(answer), torch.as_tensor(expected)
        return a.shape == e.shape and torch.allclose(a.double(), e.double(), rtol=rel_tol, atol=rel_tol)
    if isinstance(expected, np.ndarray) or isinstance(answer, np.ndarray):
        a, e = np.asarray(answer), np.asarray(expected)
        return a.shape == e.shape and bool(np.allclose(a, e, rtol=rel_tol, atol=rel_tol))
    if isinstance(expected, bool) or isinstance(answer, bool):
        return answer is expected
    if isinstance(expected, (int, float)) and isinstance(answer, (int, float)):
        return math.isclose(answer, expected, rel_tol=rel_tol, abs_tol=0.0 if expected else rel_tol)
    if isinstance(expected, (list, tuple)) and isinstance(answer, (list, tuple)):
        return len(answer) == len(expected) and all(_close(a, e, rel_tol) for a, e in zip(answer, expected))
    return answer == expected


def check(exercise: str, answer: Any, expected: Any, hint: str = "", rel_tol: float = 1e-6) -> bool | None:
    """True if `answer` matches `expected`; None (and a one-line note) if it is still `...`, so an
    unattempted exercise's cell shows that line and nothing else; else AssertionError.

    rel_tol: relative tolerance for numbers, tensors and arrays (1e-6: float rounding, not a wrong
    formula). hint: one line said with a wrong answer.
    """
    rel_tol = check_number(rel_tol, "rel_tol", minimum=0.0)
    if answer is Ellipsis:
        print(
            f"{exercise}: not attempted yet (replace the ... above); the worked solution is in the next cell."
        )
        return None
    if not _close(answer, expected, rel_tol):
        shown = (
            answer
            if not isinstance(answer, (torch.Tensor, np.ndarray))
            else f"array of shape {tuple(answer.shape)}"
        )
        # The expected value is not printed: the solution cell below shows it, for who wants it.
        raise AssertionError(f"{exercise}: {shown!r} is not right." + (f" Hint: {hint}" if hint else ""))
    print(f"{exercise}: correct.")
    return True
