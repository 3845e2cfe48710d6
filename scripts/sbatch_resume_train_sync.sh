#!/bin/bash
# Stage 2 (or synchronizability fine-tuning): continue a run from its <id>_latest.pt.
#SBATCH --job-name=s2-resume
#SBATCH --output=./sbatch_logs/%J.log
#SBATCH --error=./sbatch_logs/%J.log
source ./scripts/sbatch_env.sh

LOGDIR="./logs/sync_models"
RUN_ID="xx-xx-xxTxx-xx-xx"  # the run's folder name (its start time)

srun python main.py config="$LOGDIR/$RUN_ID/cfg-$RUN_ID.yaml" training.resume=True training.finetune=False
