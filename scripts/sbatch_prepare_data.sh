#!/bin/bash
# Prepares a folder of raw videos (or the clips of a CSV) for training as a SLURM array on CPU nodes: each
# task takes its share of the sorted videos (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT) and writes
# DST/manifest-I-of-N.csv and DST/bad_inputs-I-of-N.csv. Resubmit the same array to resume or to retry
# failed tasks: finished files are checked and kept. Create ./sbatch_logs before submitting.
#SBATCH --job-name=prepare
#SBATCH --array=0-99
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=08:00:00
#SBATCH --output=./sbatch_logs/%A_%a.log
#SBATCH --error=./sbatch_logs/%A_%a.log
set -e

SRC="/path/to/raw_videos"
DST="/path/to/my_dataset"  # then train with data.vids_path=$DST/h264_video_25fps_256side_16000hz_aac
CLIPS=""                   # optional: a CSV of video,start_sec,end_sec rows

python scripts/prepare_data.py "$SRC" "$DST" --workers "$SLURM_CPUS_PER_TASK" ${CLIPS:+--clips "$CLIPS"}
