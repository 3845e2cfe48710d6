#!/bin/bash
# Synchronizability: fine-tune a stage-2 model with a 2-class head.
#SBATCH --job-name=s3
#SBATCH --output=./sbatch_logs/%J.log
#SBATCH --error=./sbatch_logs/%J.log
source ./scripts/sbatch_env.sh

DATASET="dataset.vggsound.VGGSound"
VIDS_PATH="/path/to/vggsound/h264_video_25fps_256side_16000hz_aac/"
S2_ID="xx-xx-xxTxx-xx-xx"  # the stage-2 run

srun python main.py \
    config=./configs/ft_synchability.yaml \
    ckpt_path="./logs/sync_models/$S2_ID/${S2_ID}_best.pt" training.finetune=True \
    data.vids_path="$VIDS_PATH" data.dataset.target="$DATASET" \
    training.num_workers=7 logging.logdir=./logs/sync_models logging.use_wandb=True
