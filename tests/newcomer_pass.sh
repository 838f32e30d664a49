#!/usr/bin/env bash
# A new user's first ten minutes, scripted: a fresh clone, the README's commands in order, each
# command's stdout and stderr kept in a file, then checks of what a newcomer would trip over.
#
#   bash tests/newcomer_pass.sh [WORK_DIR]      # about 10 minutes on 2 cores (the test suite is not run)
#
# Not part of the pytest suite (it trains a model and takes minutes); its figures go to
# results/BENCHMARKS.md ("First ten minutes"). Exits 1 if a check fails, naming it.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/newcomer.XXXXXX)}
mkdir -p "$work"
clone="$work/clone" logs="$work/logs"
rm -rf "$clone" "$logs" && mkdir -p "$logs"
git clone -q "$repo" "$clone" || exit 1
cd "$clone" || exit 1
failed=0

step() {      # step NAME COMMAND...: run it, keep its output, record its exit status and time
    local name=$1; shift
    local start=$SECONDS
    "$@" > "$logs/$name.out" 2> "$logs/$name.err"
    local status=$?
    echo "$name: exit $status in $((SECONDS - start)) s" | tee -a "$logs/steps.txt"
    return $status
}
check() {     # check WHAT CONDITION...: one line per check
    local what=$1; shift
    if "$@"; then echo "ok   $what"; else echo "FAIL $what"; failed=1; fi
}

step pretrain bash pretrain.sh
out=out-cpu-grape-ap
check "pretrain.sh ends with a summary and what to run next" \
    grep -q "^done: 120 iterations" "$logs/pretrain.out"
check "... and names the next commands" grep -q "python -m scripts.sample --ckpt=$out" "$logs/pretrain.out"

step sample python -m scripts.sample --ckpt=$out --start="def " --num_samples=1 --max_new_tokens=40
check "sample.py prints text" test -s "$logs/sample.out"

step eval_length python -m scripts.eval_length $out
logged=$(python -c "from training.runlog import run_log; print(f\"{run_log('$out/log.jsonl')['val'][-1][2]:.4f}\")")
check "eval_length reproduces the log's validation loss ($logged) and says what else it measures" \
    grep -q "own validation batches.*: $logged; log.jsonl at iter 120: $logged" "$logs/eval_length.out"

step plot_curves python -m scripts.plot_curves $out --out "$work/curves.png"
check "plot_curves writes a PNG" test -s "$work/curves.png"

cat > "$work/auto_classes.py" <<EOF
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
model = AutoModelForCausalLM.from_pretrained("$out", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("$out", trust_remote_code=True)
ids = tokenizer("def ", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True, top_k=50, repetition_penalty=1.3)[0]))
print(pipeline("text-generation", model="$out", trust_remote_code=True)("def ", max_new_tokens=40,
                                                                          do_sample=True, top_k=50,
                                                                          repetition_penalty=1.3))
EOF
step auto_classes python "$work/auto_classes.py"
check "the README's pipeline example prints more than the prompt and spaces" \
    python -c "import ast,sys; g=ast.literal_eval(open('$logs/auto_classes.out').read().splitlines()[-1])[0]['generated_text']; sys.exit(not g[4:].strip())"

step lm_eval_adapter python lm-evaluation-harness/lm_eval_grape.py --model grape --model_args pretrained=$out \
    --tasks grape_smoke --include_path lm-evaluation-harness/tasks --batch_size 8
check "the adapter without --device does not warn about CUDA" \
    bash -c "! grep -qi 'cuda.*not available\|requested but CUDA' '$logs/lm_eval_adapter.err' '$logs/lm_eval_adapter.out'"

step dry_run python train_adam_finewebedu.py config/paper/train_llama_mha_rope_medium_adam_80g8.py --dry_run=True --gpu=8xh100
check "the dry run says what the logits line counts" grep -q "logits and loss (3 float32 tokens x vocab arrays" "$logs/dry_run.out"

step compare_dry_run python -m scripts.compare_encodings config/cpu/compare_cpu.py --encodings rope,alibi --seeds 2 --dry_run
check "compare_encodings --dry_run names each run with its real seed" \
    grep -q "^rope run 1 (seed 1338, data_seed 1338): new" "$logs/compare_dry_run.out"

step grid_help python -m scripts.grid_next_patch --help
check "grid_next_patch --help shows its defaults" grep -q "(default: 300)" "$logs/grid_help.out"

echo "logs in $logs"
exit $failed
