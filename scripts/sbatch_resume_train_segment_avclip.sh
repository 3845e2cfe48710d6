#!/bin/bash
# Stage 1: continue a run from its checkpoints/epoch_latest.pt.
#SBATCH --job-name=s1-resume
#SBATCH --output=./sbatch_logs/%J.log
#SBATCH --error=./sbatch_logs/%J.log
source ./scripts/sbatch_env.sh

LOGDIR="./logs/avclip_models"
RUN_ID="xx-xx-xxTxx-xx-xx"  # the run's folder name (its start time)

srun python main.py config="$LOGDIR/$RUN_ID/cfg-$RUN_ID.yaml" training.resume=latest
