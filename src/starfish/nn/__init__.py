"""Seeing inside a network: batches, block discovery, block I/O capture, prunable-layer ops, the sequential walk, devices."""
