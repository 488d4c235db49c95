"""The notebooks' exercise checks: tell a reader whether an answer is right, and why not.

Covers `grade(exercise, answer)`, what every notebook's exercise cell calls: the expected value of an
arithmetic exercise, and the test cases and reference code of a coding one ("01-code", "03-swap"...), live
here and never in a cell; it prints one line (not attempted / correct) or raises with a hint. Underneath,
`check(exercise, answer, expected)`: an answer left as `...` (Ellipsis, how every exercise cell
starts) is "not attempted" and passes quietly, so the notebooks still run top to bottom; anything else
must equal `expected` (numbers to a relative tolerance, tensors and arrays elementwise, everything else
with ==), or an AssertionError says what was given and the hint (not the expected value). Every exercise is
followed by a hidden solution cell that runs the same check on the worked answer, so CI proves each
solution right. Not here: the exercises themselves (they live in the notebooks).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
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


# -- the series' exercises: expected values and reference code live here, never in a notebook cell ------

# Arithmetic answers (what the hidden solution cells also compute from the package), with their hints.
_ANSWERS: dict[str, tuple[Any, str, float]] = {
    "01": ((61_440, 2.60), "r x (d_in + d_out), against d_in x d_out.", 1e-3),
    "02": (
        round(math.sqrt(3 * 1024), 2),
        "kaiming-uniform draws U(±1/√d): its std is 1/√(3d); N(0, 1)'s is 1.",
        1e-3,
    ),
    "03": (
        12 * (4 * 4 * (768 + 768) + 2 * 4 * (768 + 3072)),
        "r x (d_in + d_out) per matrix; the two feed-forward layers are 768 -> 3072 and 3072 -> 768.",
        1e-6,
    ),
    "04": ((25_260, 8_420), "a last, smaller batch still is a step: ceil(rows / batch) per epoch.", 1e-6),
    "05": (37.5, "an unanswerable question answered '' scores 100, an answerable one 0.", 1e-6),
    "06": ((294_912, 9_216), "two 4-bit codes per byte; one scale per 64 weights.", 1e-6),
    "07": (64 / 384, "E||P_i V_j||^2 = i * j / d; phi divides by min(i, j).", 1e-3),
}


def grade(exercise: str, answer: Any) -> None:
    """Grade a notebook exercise by its number ("01" ... "08", a coding one "01-code" ...): prints one line,
    "not attempted" for a `...` (or a function still returning `...`), "correct", or raises AssertionError
    with a hint, never the expected value. Returns None, so the cell shows that one line only."""
    if exercise in _CODE:
        _grade_code(exercise, answer)
        return
    if exercise not in _ANSWERS:
        raise ValueError(f"unknown exercise {exercise!r}; the series has {sorted([*_ANSWERS, *_CODE])}.")
    expected, hint, rel_tol = _ANSWERS[exercise]
    check(f"Exercise {exercise}", answer, expected, hint=hint, rel_tol=rel_tol)


def _not_attempted(exercise: str) -> None:
    print(
        f"Exercise {exercise}: not attempted yet (fill in the function above); the worked solution is in the next cell."
    )


def _grade_code(exercise: str, fn: Any) -> None:
    cases, reference, hint = _CODE[exercise]
    if fn is Ellipsis:
        return _not_attempted(exercise)
    if not callable(fn):
        raise TypeError(f"Exercise {exercise}: pass your function itself, got a {type(fn).__name__}.")
    g = torch.Generator().manual_seed(int(exercise[:2]))
    run = _swap_probe(fn) if exercise == "03-swap" else fn  # the swap is judged by what it leaves behind
    for k, args in enumerate(cases(g)):
        got = run(*args)
        if got is Ellipsis or got is None:
            return _not_attempted(exercise)
        want = reference(*args)
        if not _close(got, want, 1e-6):
            raise AssertionError(
                f"Exercise {exercise}: wrong on test case {k + 1} (inputs of shapes "
                f"{[tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]})."
                + (f" Hint: {hint}" if hint else "")
            )
    print(f"Exercise {exercise}: correct on every test case.")


def _t(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _delta_cases(g):
    return [
        (_t(g, r, d_in), _t(g, d_out, r), alpha, r)
        for r, d_in, d_out, alpha in ((1, 5, 3, 8.0), (4, 7, 6, 16.0), (8, 9, 9, 8.0))
    ]


def _delta_ref(a, b, lora_alpha, r):
    return (b @ a) * (lora_alpha / r)


def _projection_cases(g):
    out = []
    for n, d, r in ((3, 8, 2), (5, 12, 4)):
        linear = torch.nn.Linear(d, d, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(_t(g, d, d))
            linear.bias.copy_(_t(g, d))
        out.append((_t(g, 2, n, d), linear, _t(g, r, d), _t(g, d, r), 0.5))
    return out


def _projection_ref(x, linear, a, b, scaling):
    return x @ linear.weight.T + linear.bias + scaling * (x @ a.T) @ b.T


def _merge_cases(g):
    from loralib.layers import LoraLinear

    out = []
    for d_in, d_out, r, alpha in ((6, 4, 2, 8.0), (10, 10, 4, 2.0)):
        layer = LoraLinear(d_in, d_out, r=r, lora_alpha=alpha, dtype=torch.float64)
        with torch.no_grad():
            layer.lora_B.copy_(_t(g, d_out, r))
        out.append((layer,))
    return out


def _merge_ref(layer):
    return layer.weight.detach() + layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach())


def _swap_cases(g):
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ModuleList([torch.nn.Linear(6, 5)])),
    )
    return [(net,)]


def _swap_probe(swap) -> Any:
    """Run a reader's recursive swap on a nested model; return what to compare: the sorted names of the
    modules that are LoRA layers afterwards, and whether any plain nn.Linear is left."""

    def run(net):
        from loralib.layers import LoraLinear

        net = copy.deepcopy(net)
        result = swap(net, lambda linear: LoraLinear.from_linear(linear, r=2))
        if result is Ellipsis:
            return Ellipsis
        lora = sorted(n for n, m in net.named_modules() if isinstance(m, LoraLinear))
        plain = any(type(m) is torch.nn.Linear for m in net.modules())
        return (lora, plain)

    return run


def _swap_ref(net):
    return (["0", "2.0", "2.1.0"], False)


def _schedule_cases(g):
    return [(67_349, 16, 6, 1 / 3), (2_490, 16, 6, 1 / 3), (100, 32, 3, 0.1), (64, 16, 2, 0.5)]


def _schedule_ref(rows, batch_size, epochs, warmup_fraction):
    total = epochs * math.ceil(rows / batch_size)
    return (total, round(total * warmup_fraction))


def _span_cases(g):
    return [(_t(g, n), _t(g, n), m) for n, m in ((12, 3), (20, 5), (7, 7))]


def _span_ref(start_logits, end_logits, max_answer_len):
    best, where = -math.inf, None
    for i in range(len(start_logits)):
        for j in range(i, min(i + max_answer_len, len(end_logits))):
            score = float(start_logits[i] + end_logits[j])
            if score > best:
                best, where = score, (i, j)
    return where


def _absmax_cases(g):
    return [(_t(g, 4, 64), 4, 64), (_t(g, 8, 32), 8, 16), (_t(g, 2, 128), 3, 32)]


def _absmax_ref(w, bits, block):
    """Blockwise symmetric absmax quantisation to 2^(bits-1) - 1 levels each side, dequantised back."""
    levels = 2 ** (bits - 1) - 1
    blocks = w.reshape(-1, block)
    scale = blocks.abs().amax(dim=1, keepdim=True) / levels
    return (torch.round(blocks / scale) * scale).reshape(w.shape)


def _phi_cases(g):
    return [
        (_t(g, 8, 40), _t(g, 16, 40), 4, 8),
        (_t(g, 8, 40), _t(g, 8, 40), 8, 8),
        (_t(g, 6, 30), _t(g, 12, 30), 1, 12),
    ]


def _phi_ref(a1, a2, i, j):
    from loralib.analysis import subspace_similarity

    return subspace_similarity(a1, a2, i, j)


def _norm_cases(g):
    return [(_t(g, 30, 40), _t(g, 4, 40), _t(g, 30, 4), 0.5), (_t(g, 8, 12), _t(g, 2, 12), _t(g, 8, 2), 2.0)]


def _norm_ref(w0, a, b, s):
    return torch.linalg.vector_norm(w0 + s * b @ a, dim=1)


# exercise -> (test cases from a seeded generator, reference, hint)
_CODE: dict[str, tuple[Callable, Callable, str]] = {
    "01-code": (_delta_cases, _delta_ref, "B is (d_out x r), A is (r x d_in); the scale is lora_alpha / r."),
    "02-code": (
        _projection_cases,
        _projection_ref,
        "the frozen linear's output, plus scaling times (x A^T) B^T.",
    ),
    "03-merge": (_merge_cases, _merge_ref, "W0 + (lora_alpha / r) B A, without changing the layer."),
    "03-swap": (
        _swap_cases,
        _swap_ref,
        "walk named_children(); replace a Linear with setattr, recurse into the rest.",
    ),
    "04-code": (
        _schedule_cases,
        _schedule_ref,
        "ceil(rows / batch) steps per epoch; round the warm-up share.",
    ),
    "05-code": (
        _span_cases,
        _span_ref,
        "every (start, end) with start <= end < start + max_answer_len; the largest sum.",
    ),
    "06-code": (
        _absmax_cases,
        _absmax_ref,
        "per block of `block` weights: scale = max|w| / (2^(bits-1) - 1), round(w / scale) * scale.",
    ),
    "07-code": (
        _phi_cases,
        _phi_ref,
        "right-singular vectors: torch.linalg.svd(A)[2][:i]; ||V1 V2^T||_F^2 / min(i, j).",
    ),
    "08-code": (
        _norm_cases,
        _norm_ref,
        "||W0||^2 + 2 s <W0 A^T, B> + s^2 <B A A^T, B> per row, then the square root.",
    ),
}
