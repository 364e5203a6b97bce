"""Test-wide settings: offline, deterministic, one torch thread per worker (tiny models
are faster single-threaded, and two xdist workers share two cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(1)
