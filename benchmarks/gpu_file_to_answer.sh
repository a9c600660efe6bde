# The GPU run of benchmarks/bench_file_to_answer.py (issue 25) on the lent machines, whose image has Python 3.12,
# torch 2.11 and Transformers 5.17 but no PyAV, no lmms-eval and no flash-attn-4, and which reach no package index.
# Each call carries at most 64 MiB, so the wheels travel unpacked and xz-compressed, in two calls on one warm machine:
#
#   bash benchmarks/gpu_file_to_answer.sh bundle DIR   # here (pip reaches the index): writes DIR/a and DIR/b
#   device call 1, carry [DIR/a, benchmarks/.old]:  bash benchmarks/gpu_file_to_answer.sh a DIR/a
#       Transformers 5.25: the decoder against the one shipped at 21afcdb (issue 24), first token, throughput
#   device call 2, carry [DIR/b], within 30 s (the machine must still be warm):
#       bash benchmarks/gpu_file_to_answer.sh b DIR/b     # flash_attention_4, then a bounded flash-attn 2 build
#   any later call, carry [DIR/a/site.tar.xz]:  bash benchmarks/gpu_file_to_answer.sh c DIR/a
#       first token with the tower overlapping decoding; the evaluation with --deterministic
#   d, as c: the evaluation with eager attention, then where bf16 greedy decoding departs from one run to the next,
#       per attention kernel (benchmarks/decode_repro.py); e, as d: only the latter. Their limits, to fit the device
#       time left: EVAL_SECONDS (330), ROUNDS (2), REPRO_SECONDS (d 100, e 150)
#   f, as d: the evaluation with every sdpa call held to PyTorch's flash kernel (EVAL_SECONDS 400, ROUNDS)
#
# All run in the checkout the device tool sends. DIR must be an ignored folder of it (e.g. .gpu); benchmarks/.old
# holds the shipped reader: `python -c "from benchmarks.bench_decode import extract_shipped; extract_shipped()"`.
# Sizes when made: the site of PyAV 15.1 + Transformers 5.25 + huggingface-hub 2.4 + lmms-eval 0.7.3 and their missing
# dependencies, 210 MB unpacked, 37.0 MB as tar.xz; flash-attn-4 4.0.0b36 needs nvidia-cutlass-dsl 4.8.1 whose CUDA 13
# library wheel alone is 92.0 MB (237 MB unpacked; 63.5 MB with xz -9e, 16 minutes on 2 cores), plus 6.0 MB for the
# rest: split 22 MB into call 1 and the remaining 47.5 MB into call 2, with flash-attn 2's source (8.5 MB).
set -o pipefail
# the carried site (DIR/a/site.tar.xz) first on the import path, offline, output unbuffered for the logs
use_site() {
  mkdir -p /tmp/site && tar -xJf "$1/site.tar.xz" -C /tmp/site --strip-components=1 || exit 3
  export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
}
case "$1" in
bundle)
  out=$(realpath -m "$2"); work=$(mktemp -d); mkdir -p "$out/a" "$out/b"
  get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 -d "$@"; }
  get "$work/site" av==15.1.0 transformers==5.25.0 huggingface-hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 \
    truststore==0.10.5 regex==2026.12.2 kernels==0.19.1 tomlkit==0.15.3 idna==3.21 anyio==4.16.0 sniffio==1.3.1 \
    h11==0.16.0 click==8.5.1 typing_extensions==4.16.0 lmms-eval==0.7.3 loguru==0.7.3 dill==0.4.1 pytz==2026.6 || exit 1
  get "$work/fa" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
    torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 || exit 1
  mkdir -p "$work/site_dir" "$work/cu13" "$work/rest"
  for w in "$work"/site/*.whl; do unzip -q -o "$w" -d "$work/site_dir"; done
  unzip -q -o "$work"/fa/nvidia_cutlass_dsl_libs_cu13-*.whl -d "$work/cu13"
  for w in "$work"/fa/*.whl; do case "$w" in *libs_cu13*) ;; *) unzip -q -o "$w" -d "$work/rest";; esac; done
  tar -cf - -C "$work/site_dir" . | xz -9 -T0 > "$out/a/site.tar.xz"
  tar -cf - -C "$work/cu13" . | xz -9e -T0 > "$work/cu13.tar.xz"
  tar -cf - -C "$work/rest" . | xz -9 -T0 > "$out/b/fa_rest.tar.xz"
  head -c 22000000 "$work/cu13.tar.xz" > "$out/a/fa.part1"
  tail -c +22000001 "$work/cu13.tar.xz" > "$out/b/fa.part2"
  # flash-attn 2 is on the index as source only (pip download would build its metadata, which needs CUDA): the sdist
  url=$(python3 -c "import json, urllib.request; print(next(f['url'] for f in json.load(urllib.request.urlopen(
    'https://pypi.org/pypi/flash-attn/2.8.3.post2/json'))['urls'] if f['filename'].endswith('.tar.gz')))") &&
    curl -sSfL -o "$out/b/flash_attn-2.8.3.post2.tar.gz" "https://pypi.org${url#https://pypi.org}" || exit 1
  rm -rf "$work"; du -sh "$out"/a "$out"/b
  ;;
a)
  use_site "$2"
  mkdir -p /tmp/fa_parts && cp "$2/fa.part1" /tmp/fa_parts/ || exit 3
  { nvidia-smi --query-gpu=name,driver_version --format=csv; nproc; python3 -c "import transformers, huggingface_hub, \
av, lmms_eval.api.model, torch; print(transformers.__version__, huggingface_hub.__version__, av.__version__, \
torch.__version__)"; } 2>&1 | tee "$OUT/env_a.txt" || exit 4
  python3 -m benchmarks.bench_decode --compare-shipped 5 --clips h264_5min_1280x720 --clips-dir /dev/shm/decode \
    --json "$OUT/decode_compare.json" 2>&1 | tee "$OUT/decode_compare.log"
  python3 -m benchmarks.bench_file_to_answer --work /dev/shm/fta --json "$OUT/file_to_answer.json" --rounds 2 2>&1 |
    tee "$OUT/file_to_answer.log"
  python3 -m stgridpool ask /dev/shm/fta/clips/h264_300s_1280x720_seed0.mp4 "what is happening in this video ?" \
    --model /dev/shm/fta/checkpoint --max-new-tokens 8 --attn-implementation sdpa > "$OUT/ask_sdpa.txt" 2>&1
  ;;
b)
  [ -f /tmp/fa_parts/fa.part1 ] && [ -d /tmp/site/transformers ] || { echo "cold machine: call 1's files are gone"; exit 5; }
  mkdir -p /tmp/fa && cat /tmp/fa_parts/fa.part1 "$2/fa.part2" | tar -xJ -C /tmp/fa && tar -xJf "$2/fa_rest.tar.xz" -C /tmp/fa ||
    exit 3
  # nvidia-cutlass-dsl puts its packages on sys.path with a .pth file, which PYTHONPATH folders do not run
  export PYTHONPATH=/tmp/fa:/tmp/fa/nvidia_cutlass_dsl/dsl_packages:/tmp/site:$PWD HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
  python3 -m benchmarks.bench_file_to_answer --work /dev/shm/fta --only attn --attn sdpa,flash_attention_4 \
    --json "$OUT/attn.json" 2>&1 | tee "$OUT/attn.log"
  for name in flash_attention_4 flash_attention_2; do
    python3 -m stgridpool ask /dev/shm/fta/clips/h264_300s_1280x720_seed0.mp4 "what is happening in this video ?" \
      --model /dev/shm/fta/checkpoint --max-new-tokens 8 --attn-implementation $name > "$OUT/ask_$name.txt" 2>&1
  done
  # flash_attention_2: build it from source for the H100 alone (sm_90), every core, for FA2_SECONDS; the log shows how
  # far ninja got ("[done/total]"), from which the whole build's time follows
  mkdir -p /tmp/fa2 && tar -xzf "$2"/flash_attn-2.8.3.post2.tar.gz -C /tmp/fa2 && cd /tmp/fa2/flash_attn-2.8.3.post2 &&
    { nvcc --version | tail -2; date +%s; FLASH_ATTN_CUDA_ARCHS=90 MAX_JOBS=16 FLASH_ATTENTION_FORCE_BUILD=TRUE \
      timeout "${FA2_SECONDS:-240}" python3 setup.py build_ext --inplace; echo "rc $?"; date +%s; } > "$OUT/fa2_build.log" 2>&1
  grep -o "^\[[0-9]*/[0-9]*\]" "$OUT/fa2_build.log" | tail -1; tail -c 1500 "$OUT/fa2_build.log"
  ;;
c)  # a later, cold machine: file to first token with the tower overlapping decoding, and the evaluation's answers
    # compared with deterministic GPU algorithms (DIR/a carried again)
  use_site "$2"
  python3 -m benchmarks.bench_file_to_answer --work /dev/shm/fta --only ftft --json "$OUT/ftft_overlap.json" 2>&1 |
    tee "$OUT/ftft_overlap.log"
  python3 -m benchmarks.bench_file_to_answer --work /dev/shm/fta --only eval --deterministic --rounds 2 \
    --json "$OUT/eval_deterministic.json" 2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUT/eval_deterministic.log"
  ;;
d)  # issue 25's open item: the evaluation's answers, prefetch 0 against 2, with eager attention; then where bf16
    # greedy decoding departs from one run to the next, per attention kernel (DIR/a/site.tar.xz carried)
  use_site "$2"
  timeout "${EVAL_SECONDS:-330}" python3 -m benchmarks.bench_file_to_answer --work /dev/shm/fta --only eval \
    --attn eager --rounds "${ROUNDS:-2}" --json "$OUT/eval_eager.json" 2>&1 | grep --line-buffered -v "it/s\]" |
    tee "$OUT/eval_eager.log"
  timeout "${REPRO_SECONDS:-100}" python3 -m benchmarks.decode_repro --work /dev/shm/fta --runs 3 \
    --variants sdpa,flash,cudnn,eager --json "$OUT/decode_repro.json" 2>&1 | tee "$OUT/decode_repro.log"
  ;;
e)  # decode_repro alone, the variants that answer most first (DIR/a/site.tar.xz carried)
  use_site "$2"
  timeout "${REPRO_SECONDS:-150}" python3 -m benchmarks.decode_repro --work /dev/shm/fta --runs 3 \
    --variants sdpa,eager,flash,cudnn,math --json "$OUT/decode_repro.json" 2>&1 | tee "$OUT/decode_repro.log"
  ;;
f)  # the evaluation, prefetch 0 against 2, with every sdpa call held to PyTorch's flash kernel: the one that repeated
    # itself bit for bit in d's decode_repro (DIR/a/site.tar.xz carried)
  use_site "$2"
  timeout "${EVAL_SECONDS:-400}" python3 -m benchmarks.bench_file_to_answer --work /dev/shm/fta --only eval \
    --sdpa-backend flash --rounds "${ROUNDS:-2}" --json "$OUT/eval_flash.json" 2>&1 |
    grep --line-buffered -v "it/s\]" | tee "$OUT/eval_flash.log"
  ;;
*) echo "usage: $0 bundle DIR | a DIR/a | b DIR/b | c DIR/a | d DIR/a | e DIR/a | f DIR/a"; exit 2;;
esac
