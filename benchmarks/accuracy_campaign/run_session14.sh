#!/usr/bin/env bash
# The fourteenth session's cells, in the order they ran (each alone on 2 threads; they were fed
# to queue.sh from a queue file, which let the order change while cells ran). Rerunning skips
# finished cells and resumes an interrupted one.
# * CP at its own lr (0.001; 88.35% at the shared 0.01): seeds 1-2 at 5x, and 10x.
# * GKPD levers: the sequential whitened start (91.04% before fine-tuning at 5x) at the gentle
#   lr that lets CP keep its good start; GKPD at a higher lr (0.03), with Tucker-2 beside it.
# * Then the seeds the issue asks of baselines within 2 points of GKPD.
export GKPD_CAMPAIGN_THREADS=${GKPD_CAMPAIGN_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
. "$(dirname "$0")/env.sh"
cell 1 cp 5 cells-lr0.001 --lr 0.001
cell 0 gkpd-whiten-sequential 5 cells-lr0.001 --lr 0.001
cell 0 gkpd-plain 5 cells-lr0.03 --lr 0.03
cell 2 cp 5 cells-lr0.001 --lr 0.001
cell 0 cp 10 cells-lr0.001 --lr 0.001
cell 1 cp 10 cells-lr0.001 --lr 0.001
cell 0 tucker 5 cells-lr0.03 --lr 0.03
# is 0.001 CP's best lr? (only 0.001 and 0.01 measured before)
cell 0 cp 5 cells-lr0.003 --lr 0.003
cell 2 svd 5
for seed in 1 2; do
  cell "$seed" tensor_train 10
  cell "$seed" cp 10 cells-lr0.001 --lr 0.001
  cell "$seed" tensor_ring 5
  cell "$seed" tensor_train 5
  cell "$seed" prune 5
  cell "$seed" gkpd_tucker 5,10
done
