#!/usr/bin/env bash
# The GPU checks of issue 8 (goal 5), prepared to run in one go on a machine lent through the
# workplace's `device` tool, whose image has Python 3.12 with torch, timm, typer, rich, pandas,
# matplotlib, OpenCV and pytest, but neither PyAV nor facenet-pytorch, and reaches no registry.
#
#   bash benchmarks/device_check.sh speed       # CUDA tests, then speed on a >= 5-minute 640x360 video
#   bash benchmarks/device_check.sh agreement   # bf16 against fp32 with the shipped starter
#
# Both write their logs under $OUT (what the device tool brings back; a temporary folder
# elsewhere) and print them too. The two wheels travel in .whl/ (ignored by git; see docs/speed.md,
# "Speed on a GPU", for the download command). PyAV's wheel (36 MB) and the tracked tree with
# the starter (52 MiB) do not fit the tool's 64 MiB together, so run `speed` first with the
# starter moved out of the tree and .whl carried: it installs the wheels into .site/ (ignored),
# which stays on the machine while it is warm, and `agreement` then runs right after with the
# starter back and nothing carried. DEVICE=cpu MINUTES=0.2 runs the same steps on a CPU.
set -u
mode=${1:-speed}
case $mode in
    speed | agreement) ;;
    *) echo "usage: bash benchmarks/device_check.sh speed|agreement"; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-5}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
        || { echo "device_check: installing .whl/*.whl failed"; exit 1; }
fi
export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import av, importlib.util as u; assert u.find_spec('facenet_pytorch')" 2> /dev/null; then
    echo "device_check: PyAV or facenet-pytorch is missing: carry .whl/ (docs/speed.md, Speed on a GPU)," \
         "or run 'speed' first on this machine while it is warm"
    exit 1
fi

status=0
BUDGET=${BUDGET:-540}  # seconds for all steps together: the device tool stops a command at 600
step() {  # step NAME SECONDS COMMAND...: run with a time limit (within BUDGET), log to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, ${left} s of the ${BUDGET} s budget left" | tee "$OUT/$name.txt"
        status=1
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name: $*" | tee "$OUT/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local code=${PIPESTATUS[0]}
    echo "== $name: exit $code" | tee -a "$OUT/$name.txt"
    [ "$code" -eq 0 ] || status=1
}

speed=(benchmarks/detect_speed.py --device "$DEVICE" --backbone resnet50 --videos WolfgangLanger_Pexels.mp4
       --loop-minutes "$MINUTES")
case $mode in
    speed)
        step machine 60 bash -c "nvidia-smi || true; nproc; free -g; $PY -c 'import sys, torch, av, cv2; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available()); \
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\"); \
print(\"av\", av.__version__, \"cv2\", cv2.__version__)'"
        step pytest_cuda 180 "$PY" -m pytest -m cuda -p no:cacheprovider -q tests/test_cuda.py
        # The model on the GPU, three arrangements of the face stage: aucli's default (MTCNN on the
        # model's device, stages one after the other); MTCNN on the CPU, on a thread of its own
        # beside the model on the GPU; and MTCNN on the GPU on that thread.
        step speed_default 200 "$PY" "${speed[@]}"
        step speed_faces_cpu 200 "$PY" "${speed[@]}" --overlap on --face-device cpu
        step speed_overlap 200 "$PY" "${speed[@]}" --overlap on
        ;;
    agreement)
        [ -f aucli/weights/starter.pt ] || { echo "device_check: aucli/weights/starter.pt is not in the tree"; exit 1; }
        step agreement 300 "$PY" benchmarks/detect_speed.py --device "$DEVICE" --checkpoint aucli/weights/starter.pt \
            --agreement
        ;;
esac
echo "device_check: logs in $OUT"
exit $status
