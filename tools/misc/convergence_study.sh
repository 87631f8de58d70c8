#!/usr/bin/env bash
# The convergence study on the toy data (docs/convergence.md): DETR
# (mmdet's, the baseline), the plugin's Conditional DETR, and the plugin's
# Deformable DETR plain and with refinement + two-stage, trained with the
# same backbone, data, augmentation, batch, optimizer and schedule, and
# validated after every epoch.
#
#   bash tools/misc/convergence_study.sh [DATA_DIR] [WORK_DIR]   (make convergence)
#
# Every model gets the toy configs' settings with one schedule given here:
# EPOCHS epochs (12), the learning rate divided by 10 after epoch
# LR_STEP (10), validation every epoch. Two runs at a time, one thread
# each (two cores); a run that finished is not repeated (--resume), so an
# interrupted study continues where it stopped. Then plot_training.py
# overlays the runs and writes the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_DIR=${1:-data/toy}
WORK_DIR=${2:-work_dirs/convergence}
EPOCHS=${EPOCHS:-12}
LR_STEP=${LR_STEP:-10}
PARALLEL=${PARALLEL:-2}
TOOLS_DIR=tools
source "$TOOLS_DIR/python_path.sh"

# name:config, the baseline first (its final mAP is the bar the table uses).
RUNS=(
  "DETR (mmdet):configs/toy/detr_toy.py"
  "Conditional DETR:configs/toy/conditional-detr_toy.py"
  "Deformable DETR:configs/toy/deformable-detr-plain_toy.py"
  "Deformable DETR refine+two-stage:configs/toy/deformable-detr_toy.py"
)

for run in "${RUNS[@]}"; do
  config=${run#*:}
  if [[ ! -f $config ]]; then
    echo "convergence_study.sh: $config is missing" >&2
    exit 1
  fi
done

test -d "$DATA_DIR" || "$PYTHON" tools/misc/make_toy_dataset.py "$DATA_DIR"

train() {  # config work_dir log
  OMP_NUM_THREADS=1 "$PYTHON" tools/train.py "$1" --work-dir "$2" --resume \
    --cfg-options \
    data_root="$DATA_DIR/" \
    train_dataloader.dataset.data_root="$DATA_DIR/" \
    val_dataloader.dataset.data_root="$DATA_DIR/" \
    test_dataloader.dataset.data_root="$DATA_DIR/" \
    val_evaluator.ann_file="$DATA_DIR/annotations/instances_val.json" \
    test_evaluator.ann_file="$DATA_DIR/annotations/instances_val.json" \
    train_cfg.max_epochs="$EPOCHS" train_cfg.val_interval=1 \
    param_scheduler.1.end="$EPOCHS" param_scheduler.1.milestones="[$LR_STEP]" \
    default_hooks.checkpoint.max_keep_ckpts=1 >> "$3" 2>&1
}

dirs=()
labels=()
running=0
status=0
for run in "${RUNS[@]}"; do
  label=${run%%:*}
  config=${run#*:}
  name=$(basename "$config" .py)
  dirs+=("$WORK_DIR/$name")
  labels+=("$label")
  mkdir -p "$WORK_DIR/$name"
  echo "training $label ($config) -> $WORK_DIR/$name/train.log"
  train "$config" "$WORK_DIR/$name" "$WORK_DIR/$name/train.log" &
  running=$((running + 1))
  if (( running >= PARALLEL )); then
    wait -n || status=1
    running=$((running - 1))
  fi
done
while (( running > 0 )); do
  wait -n || status=1
  running=$((running - 1))
done
if (( status != 0 )); then
  echo "convergence_study.sh: a training run failed; see the train.log" \
    "files under $WORK_DIR" >&2
  exit 1
fi

"$PYTHON" tools/analysis_tools/plot_training.py "${dirs[@]}" \
  --labels "${labels[@]}" --out "$WORK_DIR/convergence.png" \
  --table "$WORK_DIR/convergence.md"
