#!/bin/bash
# Stage 2: the offset classifier on frozen stage-1 extractors.
#SBATCH --job-name=s2
#SBATCH --output=./sbatch_logs/%J.log
#SBATCH --error=./sbatch_logs/%J.log
source ./scripts/sbatch_env.sh

DATASET="dataset.vggsound.VGGSound"  # or dataset.audioset.AudioSet, dataset.lrs.LRS3
VIDS_PATH="/path/to/vggsound/h264_video_25fps_256side_16000hz_aac/"
S1_CKPT="./logs/avclip_models/xx-xx-xxTxx-xx-xx/checkpoints/epoch_best.pt"  # stage 1

srun python main.py \
    config=./configs/sync.yaml \
    data.vids_path="$VIDS_PATH" data.dataset.target="$DATASET" \
    model.params.vfeat_extractor.params.ckpt_path="$S1_CKPT" \
    model.params.afeat_extractor.params.ckpt_path="$S1_CKPT" \
    training.base_batch_size=16 training.num_workers=7 training.patience=10 \
    logging.logdir=./logs/sync_models logging.use_wandb=True
