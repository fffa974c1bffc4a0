"""Keep the terminal readable: library chatter off, our own lines and progress on."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    # bitsandbytes looks for an optional CPU kernel package that downloads kernels from the hub
    # at run time; it is no help offline, so its warning is noise here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|bitsandbytes|torch)\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
