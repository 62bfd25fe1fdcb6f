#!/usr/bin/env bash
# The CUDA benchmark of the tensor data path (issue #22) in one command, sized for 10 minutes of one H200:
# the model-only bound, stage-2 throughput on a 512 px JPEG tree with 14 and 2 workers, extraction, the
# 1,800-photo default recipe (bench/cuda_bench.py says what each is). Results: bench/cuda/results.{json,md}
# (and the log), also copied to $OUT when that is set (the device tool's folder of files to bring back).
#
# The GPU machine's image has torch, torchvision, timm and lightning but not hydra-core/omegaconf/antlr4
# (pure Python). Here, once:   bench/cuda_bench.sh prepare      (copies them from .venv into .whl/site, git-ignored)
# Then with the device tool:   run(command="bench/cuda_bench.sh", carry=[".whl"], timeout_s=600)
# On a CPU, the smoke test:    bench/cuda_bench.sh --tiny --device cpu --out /tmp/cuda-smoke
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  site=$(.venv/bin/python -c "import omegaconf, os; print(os.path.dirname(os.path.dirname(omegaconf.__file__)))")
  mkdir -p .whl/site
  for package in hydra omegaconf antlr4; do
    rm -rf ".whl/site/$package"
    cp -r "$site/$package" .whl/site/
  done
  echo "copied hydra, omegaconf, antlr4 into .whl/site"
  exit 0
fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import hydra, omegaconf, timm, lightning, torchvision" || {
  echo "missing Python packages: run 'bench/cuda_bench.sh prepare' on the development machine and carry .whl" >&2
  exit 2
}
export PYTHONUNBUFFERED=1
out=bench/cuda  # cuda_bench.py's --out, where the log goes too
previous=""
for argument in "$@"; do
  if [ "$previous" = --out ]; then out=$argument; fi
  case "$argument" in --out=*) out=${argument#--out=} ;; esac
  previous=$argument
done
mkdir -p "$out"
status=0
"$PY" bench/cuda_bench.py "$@" 2>&1 | tee "$out/log.txt" || status=$?
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  cp "$out/results.json" "$out/results.md" "$out/log.txt" "$OUT"/ 2>/dev/null || true
fi
exit "$status"
