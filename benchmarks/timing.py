"""The benchmarks' one timing loop (imports only torch, so any benchmark can use it before choosing which project
code to import)."""

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn, inputs, device: torch.device, reps: int) -> list[float]:
    """Milliseconds of `reps` calls fn(x), x cycling through `inputs`: CUDA events on the GPU, perf_counter
    elsewhere. The one timing loop of the benchmarks."""
    times = []
    for i in range(reps):
        x = inputs[i % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return times
