"""Quiet model loading for the notebooks: hide what is expected, keep what matters.

Covers `quiet_loading()`. transformers 5 prints a "LOAD REPORT" table and a "Loading weights" bar on
every `from_pretrained`; in a notebook that loads a model per section they bury the outputs. The
filter installed here drops a report only when every line of it is expected when a task model is
built from a base checkpoint: a task head (`classifier`, `qa_outputs`, ... from
`loralib.injection.HEAD_NAMES`) newly initialised (MISSING), or a pretraining-only module (`pooler`,
`lm_head`, `cls`) left unused (UNEXPECTED). A report naming any other key (a missing encoder weight, a
size mismatch, a conversion error) still prints, as do all other warnings. Not here: the Trainer's
own logging (`loralib.benchmark.trainer`).
"""

from __future__ import annotations

import logging
import re

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


def quiet_loading() -> None:
    """Hide expected load reports and transformers' weight-loading bars; idempotent.

    Hub download bars stay on (huggingface_hub's are re-enabled), so a first download on Colab still
    shows its progress.
    """
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    for name in REPORT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedReportFilter) for f in logger.filters):
            logger.addFilter(_ExpectedReportFilter())
    hf_logging.disable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()
