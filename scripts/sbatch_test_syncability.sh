#!/bin/bash
# Synchronizability test, with the offset accuracy of a stage-2 model across synchronizability thresholds.
#SBATCH --job-name=test-sync
#SBATCH --output=./sbatch_logs/%J.log
#SBATCH --error=./sbatch_logs/%J.log
source ./scripts/sbatch_env.sh

LOGDIR="./logs/sync_models"
S2_ID="xx-xx-xxTxx-xx-xx"  # offset model
S3_ID="xx-xx-xxTxx-xx-xx"  # synchronizability model
VIDS_PATH="/path/to/vggsound/h264_video_25fps_256side_16000hz_aac/"

srun python -m scripts.test_syncability \
    config_sync="$LOGDIR/$S3_ID/cfg-$S3_ID.yaml" ckpt_path_sync="$LOGDIR/$S3_ID/${S3_ID}_best.pt" \
    config_off="$LOGDIR/$S2_ID/cfg-$S2_ID.yaml" ckpt_path_off="$LOGDIR/$S2_ID/${S2_ID}_best.pt" \
    data.dataset.target=dataset.vggsound.VGGSoundSparsePickedCleanTest data.vids_path="$VIDS_PATH" \
    data.iter_times=25 data.dataset.params.load_fixed_offsets_on="[]" logging.log_code_state=False
