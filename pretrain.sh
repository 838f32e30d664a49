#!/usr/bin/env bash
# Pretraining launcher.
#   bash pretrain.sh                                   # CPU demo: offline corpus + small GRAPE-AP model, a few minutes
#   bash pretrain.sh config/paper/train_llama_mha_rope_medium_adam_80g8.py [--key=value ...]
#                                                      # torchrun on every local GPU (one process per GPU)
#   bash pretrain.sh config/cpu/train_cpu_rope.py --max_iters=50   # any config; extra --key=value pass through
#   NPROC_PER_NODE=2 bash pretrain.sh config/...       # another number of processes (CPU: gloo)
# SIGTERM (a cluster's pre-emption) and Ctrl-C make every rank save a checkpoint and exit 0.
set -euo pipefail
cd "$(dirname "$0")"

if [[ $# -eq 0 || "${1:-}" == --* ]]; then
    # no config: the CPU demo (extra --key=value arguments still pass through)
    if ! compgen -G "data/pydoc/train_*.bin" > /dev/null || ! compgen -G "data/pydoc/val_*.bin" > /dev/null; then
        echo "preparing the offline corpus (data/pydoc) ..."
        python data/pydoc/prepare.py
    fi
    # the trainer runs as a child so that this script can print what to do next; a SIGTERM sent
    # to the script is passed on (the trainer saves and exits 0); Ctrl-C reaches it from the terminal
    python train_adam_finewebedu.py config/cpu/train_cpu_grape_ap.py "$@" &
    trainer=$!
    trap 'kill -TERM "$trainer" 2>/dev/null || true' TERM
    trap '' INT
    status=0
    while kill -0 "$trainer" 2>/dev/null; do
        wait "$trainer" && status=0 || status=$?       # returns early when the trap runs: wait again
    done
    [[ $status -eq 0 ]] || exit "$status"
    out=out-cpu-grape-ap                                # the config's out_dir, unless overridden
    for arg in "$@"; do [[ "$arg" == --out_dir=* ]] && out="${arg#--out_dir=}"; done
    echo
    echo "next:"
    echo "  python -m scripts.sample --ckpt=$out --start=\"def \"   # text from the model (streaming decoding)"
    echo "  python -m scripts.eval_length $out                    # loss by position at 1x, 2x, 4x the training context"
    echo "  python -m scripts.plot_curves $out --out curves.png   # training and validation curves"
    echo "  README.md, 'Checkpoints are Hugging Face folders': the folder with transformers' Auto classes and pipeline"
    exit 0
fi

config="$1"
shift
if [[ ! -f "$config" ]]; then
    echo "pretrain.sh: config file '$config' not found (see config/)" >&2
    exit 2
fi
# one process per GPU; NPROC_PER_NODE=N sets the count (on a CPU-only machine: N gloo processes)
gpus=${NPROC_PER_NODE:-$(python -c "import torch; print(torch.cuda.device_count())")}
if [[ "$gpus" -gt 0 ]]; then
    # Pre-emption (SIGTERM) is for the ranks: each saves its part of a checkpoint and exits 0.
    # torchrun's agent would forward it too, SIGKILL ranks still saving after its shutdown
    # timeout and exit 1 with a traceback; so the agent ignores SIGTERM and SIGINT (it ends
    # when the ranks end), and a SIGTERM sent to this script alone is passed to the ranks.
    # (Ctrl-C reaches the ranks from the terminal; passing it on would count as a second press.)
    ( trap '' TERM INT; exec torchrun --standalone --nproc_per_node="$gpus" --signals_to_handle=SIGHUP,SIGQUIT \
        train_adam_finewebedu.py "$config" "$@" ) &
    agent=$!
    trap 'pkill -TERM -P "$agent" || true' TERM
    trap '' INT
    status=0
    while kill -0 "$agent" 2>/dev/null; do
        wait "$agent" && status=0 || status=$?        # returns early when the trap runs: wait again
    done
    wait "$agent" 2>/dev/null && status=0 || { s=$?; [[ $s -eq 127 ]] || status=$s; }   # if not yet collected
    exit "$status"
fi
echo "pretrain.sh: no GPU found; running $config in one CPU process"
exec python train_adam_finewebedu.py "$config" "$@"
