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
