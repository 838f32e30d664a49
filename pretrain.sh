#!/usr/bin/env bash
# Pretraining launcher.
#   bash pretrain.sh                                   # CPU demo: offline corpus + small GRAPE-AP model, a few minutes
#   bash pretrain.sh config/paper/train_llama_mha_rope_medium_adam_80g8.py [--key=value ...]
#                                                      # torchrun on every local GPU (one process per GPU)
#   bash pretrain.sh config/cpu/train_cpu_rope.py --max_iters=50   # any config; extra --key=value pass through
set -euo pipefail
cd "$(dirname "$0")"

if [[ $# -eq 0 || "${1:-}" == --* ]]; then
    # no config: the CPU demo (extra --key=value arguments still pass through)
    if ! compgen -G "data/pydoc/train_*.bin" > /dev/null || ! compgen -G "data/pydoc/val_*.bin" > /dev/null; then
        echo "preparing the offline corpus (data/pydoc) ..."
        python data/pydoc/prepare.py
    fi
    python train_adam_finewebedu.py config/cpu/train_cpu_grape_ap.py "$@"
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
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [[ "$gpus" -gt 0 ]]; then
    exec torchrun --standalone --nproc_per_node="$gpus" train_adam_finewebedu.py "$config" "$@"
fi
echo "pretrain.sh: no GPU found; running $config in one CPU process"
exec python train_adam_finewebedu.py "$config" "$@"
