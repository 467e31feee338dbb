"""Training on more than one process: process groups, DDP and FSDP2."""
