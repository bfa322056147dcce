#!/usr/bin/env bash
# The main job, from a fresh machine: set up, then compress the shipped Fashion-MNIST ResNet-32
# 5x with GKPD, fine-tune it with distillation on a short CPU budget, and write
# out/main/report.md, report.json and layers.png. Extra arguments go to scripts/main_job.py
# (e.g. --epochs 30 --train-subset 60000 --budget-minutes 0 --out out/main_long).
set -euo pipefail
started_at=$(date +%s)
cd "$(dirname "$0")/.."

step() { printf '[main job setup %3ss] %s\n' "$(( $(date +%s) - started_at ))" "$*"; }

# 1. The data set: Debian's package installs the IDX files under /usr/share/datasets.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    step "installing dataset-fashion-mnist"
    sudo_cmd=""
    if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
    $sudo_cmd apt-get install -y dataset-fashion-mnist \
        || { $sudo_cmd apt-get update && $sudo_cmd apt-get install -y dataset-fashion-mnist; }
fi

# 2. The environment: torch first (the CPU build; otherwise pip fetches a CUDA build), then
#    the project with its plotting and progress-bar extras.
if [ ! -x .venv/bin/python ]; then
    step "creating .venv"
    python3 -m venv .venv
fi
. .venv/bin/activate
step "installing torch==2.13.0"
pip install -q torch==2.13.0
step "installing gkpd with the [plot,progress] extras"
pip install -q -e '.[plot,progress]'
python -c "import matplotlib, gkpd" || { echo "main job: matplotlib or gkpd did not install" >&2; exit 1; }

# 3. The job itself; its progress goes to the terminal, its results to out/main.
step "set-up done; starting the job"
exec python scripts/main_job.py --started-at "$started_at" "$@"
