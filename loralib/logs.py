"""Quiet model loading for the notebooks: hide what is expected, keep what matters.

Covers `quiet_loading()` and `no_progress_bars()`. transformers 5 prints a "LOAD REPORT" table and a "Loading weights" bar on
every `from_pretrained`; in a notebook that loads a model per section they bury the outputs. The
filter installed here drops a report only when every line of it is expected when a task model is
built from a base checkpoint: a task head (`classifier`, `qa_outputs`, ... from
`loralib.injection.HEAD_NAMES`) newly initialised (MISSING), or a pretraining-only module (`pooler`,
`lm_head`, `cls`) left unused (UNEXPECTED). A report naming any other key (a missing encoder weight, a
size mismatch, a conversion error) still prints, as do all other warnings. bitsandbytes' notice that
its optional `kernels` package is missing on AVX512-BF16 CPUs is dropped too, and so is transformers'
deprecation warning of `is_gradient_checkpointing` that PEFT triggers: it then uses its own CPU
path, which the project pins anyway (`loralib.peft_backend.pin_cpu_4bit_path`). `no_progress_bars()`
turns off the bars of datasets, transformers and the hub for a block (the CLI's --no-progress, a run
with progress=False) and restores them after. Not here: the Trainer's own logging
(`loralib.benchmark.trainer`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

from loralib.injection import HEAD_NAMES

# log_state_dict_report logs through its caller's logger when given one (from_pretrained passes its own).
REPORT_LOGGERS = (
    "transformers.modeling_utils",
    "transformers.modeling_layers",
    "transformers.utils.loading_report",
)
UNUSED_PRETRAINING_MODULES = ("pooler", "lm_head", "cls")
_ROW = re.compile(r"^\s*(?P<key>[\w.\-]+)\s*\|\s*(?P<status>[A-Z_]+)\b")


def expected_report(message: str) -> bool:
    """True if a load report lists only new task heads (MISSING) and unused pretraining modules (UNEXPECTED)."""
    if "LOAD REPORT" not in message:
        return False
    # The header row ("Key | Status") never matches: its status is not upper case.
    rows = [m.groupdict() for m in map(_ROW.match, message.splitlines()) if m]
    if not rows:
        return False
    for row in rows:
        head = row["key"].split(".")[0]
        if row["status"] == "MISSING" and head in HEAD_NAMES:
            continue
        if row["status"] == "UNEXPECTED" and head in UNUSED_PRETRAINING_MODULES:
            continue
        return False
    return True


class _ExpectedReportFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not expected_report(record.getMessage())


# bitsandbytes on an AVX512-BF16 CPU, without the optional `kernels` package (its fallback is fine).
_BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _BnbKernelsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (_BNB_KERNELS_NOTICE in message and "No module named 'kernels'" in message)


def _add_filter(name: str, cls: type[logging.Filter]) -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(f, cls) for f in logger.filters):
        logger.addFilter(cls())


def quiet_loading() -> None:
    """Hide expected load reports and transformers' weight-loading bars; idempotent.

    Hub download bars stay on (huggingface_hub's are re-enabled), so a first download on Colab still
    shows its progress.
    """
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    for name in REPORT_LOGGERS:
        _add_filter(name, _ExpectedReportFilter)
    _add_filter("bitsandbytes.backends.cpu.ops", _BnbKernelsFilter)
    # PEFT probes `model.is_gradient_checkpointing`, which transformers 5 deprecates: a message between the
    # two libraries, not the reader's concern (only this one warning, by its text).
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    hf_logging.disable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """No progress bars from datasets, transformers or the hub inside the block; restored after."""
    import datasets
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    was = (
        datasets.is_progress_bar_enabled(),
        hf_logging.is_progress_bar_enabled(),
        not huggingface_hub.utils.are_progress_bars_disabled(),
    )
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            datasets.enable_progress_bars()
        if was[1]:
            hf_logging.enable_progress_bar()
        if was[2]:
            huggingface_hub.utils.enable_progress_bars()
