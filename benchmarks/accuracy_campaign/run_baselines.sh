#!/usr/bin/env bash
# The accuracy campaign's baseline cells (issue 12): every method but GKPD, at 5x and 10x,
# with the budget of env.sh, one directory per seed; rerunning continues where it stopped.
. "$(dirname "$0")/env.sh"
# closest to GKPD in the recorded 2x16k run first, so that their extra seeds start early
cell 0 tucker 5,10
cell 1 tucker 5,10
cell 2 tucker 5,10
for method in tensor_train prune tensor_ring svd cp student; do
  cell 0 "$method" 5,10
done
# CP at its own learning rate (under the shared 0.01 its first epoch's loss stays at 2.6, and it
# ends 5 points below the others), with GKPD at the same lr beside it; a directory per budget
cell 0 cp 5 cells-lr0.001 --lr 0.001
cell 0 gkpd-plain 5 cells-lr0.001 --lr 0.001
