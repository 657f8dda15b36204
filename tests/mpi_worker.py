"""`npllama train` as one rank of an mpiexec job, with a fault on one rank (for test_distributed.py).

    mpiexec -n 2 python tests/mpi_worker.py FAULT RANK STEP -- train options...

FAULT is none, kill (SIGKILL itself), raise (a RuntimeError) or stall (stop answering): done by
rank RANK right after it finishes optimizer step STEP.
"""
import os
import signal
import sys
import time

from npllama import cli
from npllama.train import session


def main():
    fault, rank, at_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert sys.argv[4] == "--"
    if fault != "none" and int(os.environ.get("PMI_RANK", "0")) == rank:
        log_step = session.Session.log_step

        def log_step_then_fail(self, *args, **kwargs):
            log_step(self, *args, **kwargs)
            if self.run.step == at_step:
                if fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif fault == "raise":
                    raise RuntimeError(f"injected fault after step {at_step}")
                elif fault == "stall":
                    time.sleep(3600)

        session.Session.log_step = log_step_then_fail
    sys.exit(cli.main(["train", *sys.argv[5:]]))


if __name__ == "__main__":
    main()
