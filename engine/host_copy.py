"""Host-to-device copies that never make the host wait for the device.

A plain `tensor.to("cuda")` from ordinary (pageable) host memory synchronizes the stream: the host
waits until every kernel queued before it has run. With asynchronous scheduling the previous step is
still running when the next one's inputs are copied, so each such copy would stall the host for the
rest of that step. Staged through pinned memory, the copy is queued like a kernel and the host
returns at once; torch's pinned-memory cache keeps the staging buffer until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor`, a host tensor, on `device`; queued behind the device's work when that is a GPU."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def values_to_device(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A list of numbers as a 1-D tensor on `device` (see `to_device`)."""
    return to_device(torch.tensor(values, dtype=dtype), device)
