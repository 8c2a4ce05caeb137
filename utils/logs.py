"""Quieter notebooks: hide library warnings and progress bars that are noise for a learner."""

from __future__ import annotations

import logging
import warnings


def quiet() -> None:
    """Silence deprecation warnings, loading/tokenizing progress bars and bitsandbytes' optional-kernel notice.

    Call it before importing torch or bitsandbytes; the trainers' own progress tables stay.
    """
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(IProgress|ensure_weight_tying)")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    datasets.disable_progress_bars()
