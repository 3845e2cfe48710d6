#!/bin/bash
# Stage 1: AVCLIP pre-training. Submit: sbatch --nodes=8 --ntasks-per-node=1 --gres=gpu:1 --cpus-per-task=10 \
#   --account=<project> scripts/sbatch_train_segment_avclip.sh
#SBATCH --job-name=s1
#SBATCH --output=./sbatch_logs/%J.log
#SBATCH --error=./sbatch_logs/%J.log
source ./scripts/sbatch_env.sh

DATASET="dataset.vggsound.VGGSound"  # or dataset.audioset.AudioSet, dataset.lrs.LRS3
VIDS_PATH="/path/to/vggsound/h264_video_25fps_256side_16000hz_aac/"
LOGDIR="./logs/avclip_models"

srun python main.py \
    config=./configs/segment_avclip.yaml \
    data.vids_path="$VIDS_PATH" data.dataset.target="$DATASET" \
    training.num_workers=7 logging.logdir="$LOGDIR" logging.use_wandb=True
