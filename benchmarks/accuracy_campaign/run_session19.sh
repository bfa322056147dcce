#!/usr/bin/env bash
# The nineteenth session's cells (alone on 2 threads, from a frozen worktree of 5f38e11): the
# per-layer mix `auto` at 10x, the one method row the 10x table lacked (auto at 5x is the
# second most accurate row). Rerunning skips finished cells and resumes an interrupted one.
export GKPD_CAMPAIGN_THREADS=${GKPD_CAMPAIGN_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
. "$(dirname "$0")/env.sh"
cell 0 auto 10
cell 1 auto 10
cell 2 auto 10
