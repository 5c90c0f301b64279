#!/usr/bin/env bash
# The `flickr8k` preset (the GPU one) trained on Flickr8k pre-resized to 128 px, its dev-chosen checkpoint's
# test captions written as COCO results files, to be scored on a machine with Java:
#
#   here:   python -m train data resize --from ../shared/data/flickr8k --out data/flickr8k-128 --size 128 --quality 85
#   GPU:    bash studies/gpu_flickr8k.sh                      # OUT=folder for what comes back (default runs/gpu-out)
#   here:   python -m train score runs/gpu-out/epoch_*.test.*.json \
#               --annotations ../shared/data/flickr8k/annotations/captions_official_test.json \
#               --train-annotations ../shared/data/flickr8k/annotations/captions_official_train.json
#
# Training stops (resumably: `fit --resume` continues it) after TRAIN_SECONDS, so that the test captions of the
# best epoch so far come back within a time limit; the preset's 10 epochs are the plan. The model reads 128 px
# images (image_size 128, 8x8 patches of 16 px): 224 px would only upsample the 128 px copy. Needs on the GPU
# machine: torch with CUDA, torchvision, transformers, tokenizers, safetensors, pillow, numpy, tqdm and
# pycocoevalcap's Python files (BLEU, ROUGE-L and CIDEr for the dev choice; no Java there, so no METEOR).
set -euo pipefail

DATA=${DATA:-data/flickr8k-128}
RUN=${RUN:-runs/flickr8k-gpu}
OUT=${OUT:-runs/gpu-out}
TRAIN_SECONDS=${TRAIN_SECONDS:-420}
WORKERS=${WORKERS:-$(( $(nproc) > 12 ? 12 : $(nproc) ))}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# SIGINT: the trainer saves checkpoints/last and stops (exit 130), as Ctrl-C does
status=0
timeout -s INT "$TRAIN_SECONDS" "$PYTHON" -m train fit --preset flickr8k --data-root "$DATA" --run-dir "$RUN" \
    --set model.image_size=128 --set data.num_workers="$WORKERS" --device "$DEVICE" --no-progress "$@" || status=$?
echo "fit exit status $status (0: finished; 124 or 130: stopped at TRAIN_SECONDS=$TRAIN_SECONDS)"
cp "$RUN/run.json" "$RUN/metrics.jsonl" "$OUT/"

read -r EPOCH STRATEGY < <("$PYTHON" -c "
import sys
from blipcore.runs.rundir import RunDir
from blipcore.experiments.study import dev_choice
choice = dev_choice(RunDir(sys.argv[1]))
if choice is None:
    sys.exit('no epoch evaluated on dev before training stopped: nothing to report')
print(*choice)" "$RUN")
echo "dev choice: epoch $EPOCH, $STRATEGY"
"$PYTHON" -m train eval --run-dir "$RUN" --epoch "$EPOCH" --split test --strategies greedy,beam --no-meteor \
    --device "$DEVICE" --captions-out "$OUT"
cp "$RUN/eval/epoch_$(printf %03d "$EPOCH").test.json" "$OUT/"
ls -l "$OUT"
