#!/usr/bin/env bash
# A longer budget (issue 12, item 3, "longer schedules"): at 3 epochs x 60k every structure of
# the Kronecker/Tucker family ends within 0.1 of 92.6% at 10x; do they part with 6 epochs?
# The same distillation as env.sh, 6 epochs; the cells live in cells-6ep/ (one budget per
# directory). GKPD at Tucker-2's 10x size (9.93x asked, as in run_gkpd.sh). Resumable.
. "$(dirname "$0")/env.sh"
for seed in 0 1 2; do
  cell "$seed" gkpd-plain 9.93 cells-6ep --epochs 6
  cell "$seed" tucker 10 cells-6ep --epochs 6
done
