#!/usr/bin/env bash
# The campaign's GKPD cells, with the budget of run_baselines.sh, seeds 0-2: 'gkpd-plain' (GKPD
# as planned before issue #12) and 'gkpd-whiten' (factors whitened on 512 training images).
# Run beside run_baselines.sh on one thread each; rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS="${GKPD_CAMPAIGN_THREADS:-1}" MKL_NUM_THREADS="${GKPD_CAMPAIGN_THREADS:-1}"
for seed in 0 1 2; do
  gkpd -v bench accuracy resnet32_fashion_mnist --data fashion-mnist --ratios 5,10 --epochs 3 \
    --methods gkpd-plain,gkpd-whiten --seed "$seed" --no-plot --no-progress \
    --out "benchmarks/accuracy_campaign/cells/seed$seed"
done
