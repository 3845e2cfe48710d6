#!/bin/bash
# Sourced by the sbatch_*.sh templates: the rendezvous for torch.distributed (env://) on SLURM.
# Run one task per GPU (`--ntasks-per-node=<GPUs per node>`); main.py maps SLURM_PROCID/SLURM_LOCALID/
# SLURM_NPROCS to RANK/LOCAL_RANK/WORLD_SIZE.
set -e
# the first node of the job hosts the rendezvous, on a free port picked at random
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$(comm -23 <(seq 49152 65535 | sort) <(ss -Htan | awk '{print $4}' | cut -d':' -f2 | sort -u) | shuf | head -n 1)
echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT nodes: $SLURM_JOB_NODELIST"
# MIOpen (AMD GPUs) keeps a per-job cache
export MIOPEN_USER_DB_PATH=/tmp/${USER}-miopen-cache-${SLURM_JOB_ID}
export MIOPEN_CUSTOM_CACHE_DIR=$MIOPEN_USER_DB_PATH
mkdir -p ./sbatch_logs
