"""Run-time services every stage shares: device and precision selection, checkpoint I/O, torch.distributed
helpers, process memory. Below data, models, inference and engine, so each of them may use it."""
