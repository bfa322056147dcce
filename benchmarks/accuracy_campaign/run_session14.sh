#!/usr/bin/env bash
# Fourteenth session's queue, each cell alone on 2 threads (GKPD_CAMPAIGN_THREADS=2), one after
# another; rerunning skips finished cells and resumes an interrupted one.
# * CP at its own lr (0.001; 88.35% at the shared 0.01) is the strongest one-seed baseline at 5x
#   (93.71): its seeds 1-2 decide whether it is ahead of GKPD, and it has no 10x cell yet.
# * A lever not yet measured at the full budget: the sequential whitened start (91.04% before
#   fine-tuning at 5x) with the gentle lr that let CP keep its good start (87.82 -> 93.71).
# * Then the seeds the issue asks of baselines within 2 points of GKPD.
export GKPD_CAMPAIGN_THREADS=${GKPD_CAMPAIGN_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
. "$(dirname "$0")/env.sh"
cell 1 cp 5 cells-lr0.001 --lr 0.001
cell 0 gkpd-whiten-sequential 5 cells-lr0.001 --lr 0.001
cell 2 cp 5 cells-lr0.001 --lr 0.001
cell 0 cp 10 cells-lr0.001 --lr 0.001
cell 2 svd 5
for seed in 1 2; do
  cell "$seed" tensor_train 10
  cell "$seed" tensor_ring 5
  cell "$seed" tensor_train 5
  cell "$seed" prune 5
done
