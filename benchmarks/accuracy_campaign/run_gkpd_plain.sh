#!/usr/bin/env bash
# The campaign's 'gkpd-plain' cells (GKPD as planned before issue #12), with the budget of
# run_baselines.sh; seeds 0-2. Run beside run_baselines.sh on one thread each.
set -euo pipefail
cd "$(dirname "$0")/../.."
. .venv/bin/activate
export OMP_NUM_THREADS="${GKPD_CAMPAIGN_THREADS:-1}" MKL_NUM_THREADS="${GKPD_CAMPAIGN_THREADS:-1}"
for seed in 0 1 2; do
  gkpd -v bench accuracy resnet32_fashion_mnist --data fashion-mnist --ratios 5,10 --epochs 3 \
    --methods gkpd-plain --seed "$seed" --no-plot --no-progress \
    --out "benchmarks/accuracy_campaign/cells/seed$seed"
done
