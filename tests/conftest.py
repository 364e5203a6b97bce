"""Test-wide settings: offline, deterministic, one torch thread per worker (tiny models
are faster single-threaded, and two xdist workers share two cores)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# SB3 makes a fresh empty folder in /tmp for every model's logger unless told where
os.environ.setdefault("SB3_LOGDIR", os.path.join(tempfile.gettempdir(), "llm-mdp-tests-sb3"))

import torch

torch.set_num_threads(1)
