#!/usr/bin/env bash
# The multi-node path on one machine: two torchrun "nodes" (one CPU process each, gloo) on
# loopback, rendezvous through c10d, i.e. what `srun torchrun ...` or SLURM does across hosts.
# Lightning picks TorchElasticEnvironment from torchrun's variables.
#
#   scripts/torchrun_local.sh RUN_DIR --config configs/pretrain/tiny.yaml \
#       --data.manifest=... --data.tokenizer_dir=... --trainer.max_steps=4
#
# Env: NNODES (2), PORT (29517 + a random offset), PYTHON (python), STRATEGY (ddp). The FSDP2
# strategy of the large configs also runs on CPU/gloo (tests/test_fsdp.py): set
# STRATEGY=foundation.training.cluster.TransformerFSDPStrategy to try it here.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 RUN_DIR [foundation pretrain arguments...]" >&2
  exit 2
fi
RUN_DIR=$1; shift
NNODES=${NNODES:-2}
PORT=${PORT:-$((29517 + RANDOM % 2000))}
PYTHON=${PYTHON:-python}
RDZV_ID=${RDZV_ID:-local-$$}
mkdir -p "$RUN_DIR"

pids=()
for ((node = 0; node < NNODES; node++)); do
  GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
  "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node 1 \
    --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$PORT" --rdzv-id "$RDZV_ID" \
    --local-addr 127.0.0.1 --max-restarts 0 \
    -m foundation.cli pretrain "$@" \
    --trainer.accelerator=cpu --trainer.devices=1 --trainer.num_nodes="$NNODES" \
    --trainer.strategy="${STRATEGY:-ddp}" --run_dir="$RUN_DIR" \
    >"$RUN_DIR/node$node.log" 2>&1 &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
if [[ $status -ne 0 ]]; then
  tail -n 30 "$RUN_DIR"/node*.log >&2
fi
exit $status
