#!/usr/bin/env bash
# The seventeenth session's cells (2 threads, from a frozen worktree of e350993, fed
# from a queue file): gkpd_tucker's third seed at 5x and 10x, the last cells the issue's
# three-seed rule asked for; test runs shared the machine. Rerunning skips finished cells
# and resumes an interrupted one.
export GKPD_CAMPAIGN_THREADS=${GKPD_CAMPAIGN_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
. "$(dirname "$0")/env.sh"
cell 2 gkpd_tucker 5,10
