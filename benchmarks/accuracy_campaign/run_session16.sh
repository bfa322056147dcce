#!/usr/bin/env bash
# The sixteenth session's cells, in the order they ran (each alone on 2 threads, from a frozen
# worktree, fed from a queue file between speed benchmarks). Rerunning skips finished cells and
# resumes an interrupted one. The third seeds of Tensor-Train and pruning at 5x, and GKPD's lr
# sweep at 5x completed with 0.003 (the cell runs under the method's own name, gkpd).
export GKPD_CAMPAIGN_THREADS=${GKPD_CAMPAIGN_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
. "$(dirname "$0")/env.sh"
cell 2 tensor_train 5
cell 2 prune 5
cell 0 gkpd 5 cells-lr0.003 --lr 0.003
cell 1 gkpd_tucker 5
cell 1 gkpd_tucker 10
# not reached in the session
cell 2 gkpd_tucker 5,10
