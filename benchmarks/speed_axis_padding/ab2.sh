#!/bin/bash
. /work/main/.venv/bin/activate
for run in new_3 old_3 new_4; do
  side=${run%_*}; tree=/work/frozen22; [ $side = new ] && tree=/work/frozen22b
  cd $tree
  PYTHONPATH=$tree/src gkpd -v bench speed resnet32_fashion_mnist --ratios 5 --batches 1,64 --objectives error,latency --backends eager --peers none --threads 2 --no-memory --latency-cache /work/s22/ab_cache_$run.json --out /work/s22/ab/$run > /work/s22/ab/$run.log 2>&1
done
echo done > /work/s22/ab/DONE2
