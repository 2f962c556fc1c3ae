#!/usr/bin/env bash
# The one command for the GPU run (H100 / H200). Run from the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_run.sh        # on the device machine, $OUT is set for you
#
# Three parts, each under a budget (no new job after it) and a kill timer (SIGTERM: the part reports what it has,
# SIGKILL 15 s later), in seconds from the start, so the whole run ends within 6 minutes wall, compilation included:
#   1. the CUDA-only tests: CUDA-graph attack and captured whole step (alone and inside CURETrainer with
#      capture_step=True) replay their eager versions, no host sync (tests.txt; at most 45 s)
#   2. benchmarks/bench_targets.py: alternating CUDA-event windows of CURE (trainer, plain, captured, trainer with
#      capture_step=True, captured bf16 / fp32), profiles, FLOPs and MFU, robust accuracy fp32 vs preset over 2 seeds on the synthetic task,
#      every other method's trainer overhead (targets.txt, targets.json, profiles.txt; no job after 235 s,
#      SIGTERM at 250 s)
#   3. benchmarks/bench_vit_b.py: the ViT-B/16 line, fp32, bf16 and the preset, plain loop and trainer (vit.txt,
#      vit.json; no window after 330 s, SIGTERM at 345 s)
# At most 6 files under $OUT. The TARGET/RATIO lines are the last lines of targets.txt; the VIT line ends vit.txt,
# and both are repeated at the end of what this prints. Needs no network and no `datasets`/`evaluate`.
#
# CPU dry run of the same pipeline, tiny sizes (what tests/test_benchmarks.py runs):
#     OUT=/tmp/out DRY_RUN=1 bash benchmarks/gpu_run.sh
set -u
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# inductor's caches (outside $OUT): a second model object of a family reuses the first one's compiled kernels
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_bench}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
export TORCH_LOGS=${TORCH_LOGS:-recompiles}  # dynamo recompilations, with their reasons (an empty TORCH_LOGS breaks torch)

if [ "${DRY_RUN:-0}" = "1" ]; then
    TARGET_ARGS=(--device cpu --model test_resnet --image-size 16 --batch-size 4 --attack-steps 1 --warmup 1
                 --window-steps 1 --repeats 2 --methods cure,pgd --compile-backend aot_eager --base-workers 0
                 --robust-train 32 --robust-eval 16 --robust-epochs 1 --robust-natural-epochs 1 --threads 1
                 --profile-steps 1)
    VIT_ARGS=(--device cpu --model test_vit --image-size 32 --patch 8 --batch-size 2 --warmup 1 --window-steps 1
              --compile-backend aot_eager --base-workers 0 --threads 1)
    TEST_DEVICE=cpu
    TARGETS_BUDGET=${TARGETS_BUDGET:-600} TARGETS_KILL=${TARGETS_KILL:-700}
    VIT_BUDGET=${VIT_BUDGET:-900} VIT_KILL=${VIT_KILL:-1000}
else
    TARGET_ARGS=(--device cuda)  # its defaults: cifar_resnet18, batch 128, PGD-10, 3 windows of 70 steps, inductor
    VIT_ARGS=(--device cuda)     # its defaults: vit_base_patch16_224 at 224, batch 64, CURE, PGD-3 at 4/255
    TEST_DEVICE=cuda
fi
# seconds since the start: no new job after *_BUDGET, SIGTERM at *_KILL
TARGETS_BUDGET=${TARGETS_BUDGET:-235} TARGETS_KILL=${TARGETS_KILL:-250}
VIT_BUDGET=${VIT_BUDGET:-330} VIT_KILL=${VIT_KILL:-345}

start=$(date +%s)
since() { echo $(( $(date +%s) - start )); }
left() { local s=$(( $1 - $(since) )); [ "$s" -lt 1 ] && s=1; echo "$s"; }
echo "# gpu_run.sh: $(date -u +%FT%TZ) host $(hostname) nproc $(nproc)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python -c "import torch, transformers, accelerate, timm; print('# torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| timm', timm.__version__)"

# 1. CUDA-only tests: sync-free attack, CUDA-graph attack replay == eager, whole-step graph replay == eager step
#    (alone and inside CURETrainer)
if [ "$TEST_DEVICE" = "cuda" ]; then
    timeout -k 10 45 python -m pytest -q -p no:cacheprovider tests/test_speed.py tests/test_capture.py -k "gpu or cuda" \
        tests/test_safety.py::test_on_a_gpu_the_divergence_verdict_is_read_a_step_late_without_a_host_sync > "$OUT/tests.txt" 2>&1
    echo "# CUDA tests (exit $?, $(since) s): $(tail -n 1 "$OUT/tests.txt")"
fi

# 2. the targets
timeout -k 15 -s TERM "$(left "$TARGETS_KILL")" python benchmarks/bench_targets.py "${TARGET_ARGS[@]}" \
    --time-budget-s "$(left "$TARGETS_BUDGET")" --json "$OUT/targets.json" --profile-dir "$OUT" > "$OUT/targets.txt" 2>&1
targets=$?
echo "# bench_targets exit $targets after $(since) s"

# 3. the ViT-B/16 line
timeout -k 15 -s TERM "$(left "$VIT_KILL")" python benchmarks/bench_vit_b.py "${VIT_ARGS[@]}" \
    --time-budget-s "$(left "$VIT_BUDGET")" --json "$OUT/vit.json" > "$OUT/vit.txt" 2>&1
vit=$?
echo "# bench_vit_b exit $vit after $(since) s"

sed -n '/^## ratios and targets/,$p' "$OUT/targets.txt"
grep -E '^(VIT|# bench_vit_b:)' "$OUT/vit.txt"
echo "# gpu_run.sh: done after $(since) s; files: $(ls "$OUT" | tr '\n' ' ')"
[ "$targets" -eq 0 ] && [ "$vit" -eq 0 ]
