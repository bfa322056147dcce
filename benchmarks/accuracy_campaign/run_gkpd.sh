#!/usr/bin/env bash
# The campaign's GKPD cells (and the auto mix), with the budget of run_baselines.sh, seeds 0-2: 'gkpd-plain' (GKPD
# as planned before issue #12) and 'gkpd-whiten' (factors whitened on 512 training images).
# gkpd-plain at seed 0 first: it is the cell that decides whether GKPD reaches Tucker's 93.45%.
# Run beside run_baselines.sh on one thread each; rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS="${GKPD_CAMPAIGN_THREADS:-1}" MKL_NUM_THREADS="${GKPD_CAMPAIGN_THREADS:-1}"
cell() {  # SEED METHODS RATIO
  gkpd -v bench accuracy resnet32_fashion_mnist --data fashion-mnist --ratios "$3" --epochs 3 \
    --methods "$2" --seed "$1" --no-plot --no-progress --out "benchmarks/accuracy_campaign/cells/seed$1"
}
cell 0 gkpd-plain 5
cell 0 gkpd-plain 10
# the seeds that decide whether GKPD and Tucker differ at 5x (run_baselines.sh runs tucker's)
cell 1 gkpd-plain 5
# the per-layer mix of GKPD, Tucker-2 and SVD (method="auto"), its own row
cell 0 auto 5
cell 0 auto 10
cell 0 gkpd-whiten 5
cell 0 gkpd-whiten 10
cell 2 gkpd-plain 5
for seed in 1 2; do
  cell "$seed" gkpd-plain 10
done
