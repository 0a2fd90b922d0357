"""The clock every timing reads: the device is synchronised first, so that work queued on a GPU is counted
where it ran, not where the next synchronising call happens to wait for it."""

import time

import torch


def clock(device: torch.device | str = "cpu") -> float:
    """perf_counter() once all work queued on `device` is done."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
