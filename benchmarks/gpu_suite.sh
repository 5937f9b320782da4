#!/usr/bin/env bash
# Everything this repo checks and measures on a GPU, in one go (about 6-8 minutes on an H100):
#   1. tests/test_cuda.py: fixture conformance, fp16/bf16 sampling, a bf16 training run and the
#      clip pipeline on the GPU (skipped on machines without CUDA);
#   2. the scripts on the GPU with the embedded toy model: build_pairs -> build_latent_cache ->
#      tutorial_train (bf16, latent cache, then resumed) -> demo.py (all modes + evaluation);
#   3. benchmarks/bench_train.py on the real SD2.1 config at 512 (bf16, latent cache);
#   4. benchmarks/bench_inference.py on the real config at 512x512, 20 DDIM steps.
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]   (logs and JSON results go to OUT_DIR)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_out}
mkdir -p "$out"
py=${PYTHON:-python3}
tmp=$(mktemp -d)
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME CMD...: run, log to $out/NAME.log, keep going on failure
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, lightning, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| lightning', lightning.__version__, '| open_clip', open_clip.__version__)"

step cuda_tests $py -m pytest -q -s -p no:cacheprovider tests/test_cuda.py -rs

toy=models/toy/toy_color_v2
step pairs $py build_pairs.py data/sample/bigbuckbunny.mp4 --out "$tmp/data" --size 64 --workers 1
step latent_cache $py build_latent_cache.py "$tmp/data" --ckpt $toy.safetensors --config $toy.yaml --device cuda \
    --precision bf16 --no-progress
train=($py tutorial_train_sd21_color_v2.py --config $toy.yaml --init $toy.safetensors --data "$tmp/data"
       --out "$tmp/run" --size 64 --batch-size 8 --low 0 --high 1 --min-gap 1 --use-latent-cache --devices 1
       --accelerator gpu --precision bf16-mixed --num-workers 2 --ckpt-every 10 --image-every 20 --log-every 5)
step train "${train[@]}" --max-steps 20
step train_resume "${train[@]}" --max-steps 30 --resume auto
step train_export "${train[@]}" --export
step demo $py demo.py --out "$tmp/demo" --device cuda --methods fixed,recursive,anchored
cp "$tmp/demo/report/metrics.json" "$out/demo_metrics.json" 2>/dev/null

step bench_train_b16 $py benchmarks/bench_train.py --batch-size 16 --no-checkpointing --json "$out/train_b16.json"
step bench_train_b16_ckpt $py benchmarks/bench_train.py --batch-size 16 --checkpointing --json "$out/train_b16_ckpt.json"
step bench_train_b32 $py benchmarks/bench_train.py --batch-size 32 --no-checkpointing --json "$out/train_b32.json"
step bench_inference $py benchmarks/bench_inference.py --config models/cldm_v21_color.yaml --device cuda \
    --size 512 --square --frames 16 --repeat 2
rm -rf "$tmp"
exit $status
