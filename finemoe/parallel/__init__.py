"""Parallelism around an unchanged model: DDP or FSDP2 wrappers (wrap.py) and sharded checkpoints
(dcp.py); torchrun launches the processes (finemoe.train.distributed joins them)."""
