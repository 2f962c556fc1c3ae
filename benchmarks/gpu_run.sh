#!/usr/bin/env bash
# The one command for the GPU speed run (H100). Run from the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_run.sh        # on the device machine, $OUT is set for you
#
# Writes at most 5 files under $OUT: tests.txt, bench.txt (everything printed), bench.json (every number, rewritten
# after every job), profiles.txt (one summary per profiled step), trace.json.gz (one chrome trace). The final table
# and the RATIO/TARGET lines are the last lines printed. Wall time: at most ~7 minutes, torch.compile included:
# the CUDA-only tests get 60 s, the benchmark starts no job after 330 s (all in), and a SIGTERM at 390 s makes
# it report what it has (SIGKILL 20 s later). Needs no network and no `datasets`/`evaluate`.
#
# CPU dry run of the same pipeline (what tests/test_benchmarks.py runs):
#     OUT=/tmp/out DRY_RUN=1 bash benchmarks/gpu_run.sh
set -u
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# inductor's caches (outside $OUT): the second model of a family reuses the first one's compiled kernels
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_bench}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
export TORCH_LOGS=${TORCH_LOGS:-recompiles}  # dynamo recompilations, with their reasons (an empty TORCH_LOGS breaks torch)

if [ "${DRY_RUN:-0}" = "1" ]; then
    ARGS=(--device cpu --model test_resnet --batch-size 8 --warmup 1 --steps 1 --base-workers 0
          --compile-backend aot_eager --robust-steps 2 --robust-eval 16 --check-entries 1001 --threads 1
          --profile-steps 1)
    TEST_DEVICE=cpu BUDGET=${BUDGET:-900} KILL_AT=${KILL_AT:-1000}
else
    ARGS=(--device cuda --model cifar_resnet18 --batch-size 128 --attack-steps 10 --warmup 3 --steps 25
          --base-workers 4 --robust-model test_resnet --robust-steps 150 --robust-eval 1024 --profile-steps 2
          --trace-config bf16)
    TEST_DEVICE=cuda
fi
BUDGET=${BUDGET:-330}    # no benchmark job starts after this many seconds (all in)
KILL_AT=${KILL_AT:-390}  # SIGTERM: the benchmark reports what it has

start=$(date +%s)
echo "# gpu_run.sh: $(date -u +%FT%TZ) host $(hostname) nproc $(nproc)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python -c "import torch, transformers, accelerate, timm; print('# torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| timm', timm.__version__)"

# 1. CUDA-only tests of tests/test_speed.py (sync-free attack under cuda sync debug mode, CUDA-graph replay == eager)
if [ "$TEST_DEVICE" = "cuda" ]; then
    timeout -k 10 60 python -m pytest -q -p no:cacheprovider tests/test_speed.py -k "gpu or cuda" \
        tests/test_safety.py::test_on_a_gpu_the_divergence_verdict_is_read_a_step_late_without_a_host_sync > "$OUT/tests.txt" 2>&1
    echo "# CUDA tests (exit $?): $(tail -n 1 "$OUT/tests.txt")"
fi

# 2. the benchmark: no new job after its time budget; a SIGTERM at 390 s (all in) makes it report what it has
elapsed=$(( $(date +%s) - start ))
timeout -k 20 -s TERM $(( KILL_AT - elapsed )) python benchmarks/bench_step.py "${ARGS[@]}" \
    --time-budget-s $(( BUDGET - elapsed )) --json "$OUT/bench.json" --profile-dir "$OUT" 2>&1 | tee "$OUT/bench.txt"
status=${PIPESTATUS[0]}
echo "# gpu_run.sh: bench exit $status after $(( $(date +%s) - start )) s; files: $(ls "$OUT" | tr '\n' ' ')"
exit "$status"
