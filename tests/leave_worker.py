"""Run by tests/test_distributed_failures.py under `torchrun --nproc_per_node 2` (gloo, CPU): how
`distributed.leave` ends a command, given how it ended (argv[2]). Rank 1 comes to it half a second
late and marks its coming in a file first; rank 0 leaves at once and then writes (argv[1]) whether
the mark was there, i.e. whether it waited for rank 1 in a barrier.

- `returned`: both ranks returned;
- `every-rank`: both raised the error of one collective verdict (`errors.on_every_rank`);
- `one-rank`: each raised an error of its own (a bug's), which no other rank is known to share;
- `late-out`: both returned, and rank 1 comes out of the barrier half a second after rank 0 (its
  mark written then): rank 0 must not tear the group down before every rank's barrier returned.
"""

import json
import sys
import time
from pathlib import Path

from ditforge.errors import UserError, on_every_rank
from ditforge.train import distributed

out, case = Path(sys.argv[1]), sys.argv[2]
d = distributed.init()
mark = out.with_suffix(".rank1-came")
error = {"returned": None, "late-out": None,
         "every-rank": on_every_rank(UserError("the verdict of a collective"), d.is_main),
         "one-rank": RuntimeError(f"rank {d.rank}'s own bug")}[case]
if d.rank == 1 and case == "late-out":
    barrier = distributed.dist.barrier

    def late_barrier(*args, **kwargs):
        barrier(*args, **kwargs)
        time.sleep(0.5)
        mark.touch()

    distributed.dist.barrier = late_barrier
elif d.rank == 1:
    time.sleep(0.5)
    mark.touch()
distributed.leave(d, error)
if d.is_main:
    out.write_text(json.dumps(dict(waited=mark.exists(), initialized=distributed.dist.is_initialized())))
distributed.end_process(0)
