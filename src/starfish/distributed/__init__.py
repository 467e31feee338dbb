"""More than one process: ``torchrun --nproc-per-node N -m starfish run ... --distributed ddp|fsdp``.

* ``context``: the process group (rank, world size, backend, device) and the float64 all-reduce
  helpers, all the identity in a one-process run;
* ``shares``: which slice of the calibration set, of every healing batch and of the evaluation
  set each rank works on;
* ``statistics``: summing what pruners and repairs measured on each rank's slice;
* ``ddp``: the data-parallel optimizer step (loss share, gradient all-reduce) and BatchNorm buffers;
* ``fsdp``: fully sharded parameters (FSDP2), plugged into the same context.
* ``sharding``: ``--distributed fsdp`` in a run (shard both models after repair, gather them to
  write) and in a compare grid (shard each grid point's student before its healing).

Joining the group for a run (validation first, one-line failures) is ``experiments.launch``: it
reads the run's config, which lives a layer above.
"""

from starfish.distributed.context import DistributedContext, current, is_writer

__all__ = ["DistributedContext", "current", "is_writer"]
