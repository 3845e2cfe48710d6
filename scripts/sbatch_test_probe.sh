#!/bin/bash
# Test-only evaluation of a stage-2 checkpoint: fixed offsets, then 25 passes with random offsets.
#SBATCH --job-name=test
#SBATCH --output=./sbatch_logs/%J.log
#SBATCH --error=./sbatch_logs/%J.log
source ./scripts/sbatch_env.sh

LOGDIR="./logs/sync_models"
RUN_ID="xx-xx-xxTxx-xx-xx"
VIDS_PATH="/path/to/vggsound/h264_video_25fps_256side_16000hz_aac/"
TEST_ONLY=(config="$LOGDIR/$RUN_ID/cfg-$RUN_ID.yaml" ckpt_path="$LOGDIR/$RUN_ID/${RUN_ID}_best.pt"
           data.vids_path="$VIDS_PATH" training.run_test_only=True training.finetune=False
           logging.log_code_state=False)

srun python main.py "${TEST_ONLY[@]}" data.dataset.target=dataset.vggsound.VGGSoundSparsePickedCleanTestFixedOffsets \
    data.iter_times=1 data.dataset.params.load_fixed_offsets_on="[valid,test]"
srun python main.py "${TEST_ONLY[@]}" data.dataset.target=dataset.vggsound.VGGSoundSparsePicked \
    data.iter_times=25 data.dataset.params.load_fixed_offsets_on="[]"
srun python main.py "${TEST_ONLY[@]}" data.dataset.target=dataset.vggsound.VGGSoundSparsePickedCleanTest \
    data.iter_times=25 data.dataset.params.load_fixed_offsets_on="[]"
