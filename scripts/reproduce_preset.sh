#!/usr/bin/env bash
# Run one experiment preset end to end, then build its report from MLflow.
#
#   scripts/reproduce_preset.sh glue_table                      # in Docker: MLflow server + GPU container
#   scripts/reproduce_preset.sh qa_table hydra/launcher=slurm   # extra arguments are Hydra overrides
#   CAMEX_RUNNER=local scripts/reproduce_preset.sh glue_table   # this machine's Python, SQLite store
#   scripts/reproduce_preset.sh glue_table --protocol --seeds 3 -- task=glue/mrpc
#       the paper's protocol: grid -> best -> seeds -> report (python -m camex.protocol and its options,
#       Hydra overrides after --; docs/protocol.md)
#
# docker (default): builds the image, starts the tracking server (docker-compose.yml), runs the
#   preset's sweep in the training service (CAMEX_NPROC > 1: under torchrun on that many GPUs) and
#   builds the report in the same image against the server.
# local: `python run.py -m experiment=<preset>` in the current environment, tracked in
#   $CAMEX_OUTPUTS/mlflow.db, then the report from that database.
# Either way the report lands in $CAMEX_OUTPUTS/reports/<preset> (CAMEX_OUTPUTS defaults to ./outputs).
set -euo pipefail

usage() { echo "usage: [CAMEX_RUNNER=docker|local] [CAMEX_NPROC=N] $0 PRESET [hydra overrides...]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
preset=$1
shift
protocol=0
if [[ ${1:-} == --protocol ]]; then
  protocol=1
  shift
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [[ ! -f conf/experiment/$preset.yaml ]]; then
  presets=$(find conf/experiment -maxdepth 1 -name '*.yaml' -printf '%f\n' | sed 's/\.yaml$//' | sort | paste -sd' ')
  echo "error: experiment preset '$preset' does not exist; allowed: $presets" >&2
  exit 2
fi
runner=${CAMEX_RUNNER:-docker}
nproc=${CAMEX_NPROC:-1}
if [[ $runner != docker && $runner != local ]]; then
  echo "error: CAMEX_RUNNER='$runner' is invalid; allowed: docker, local" >&2
  exit 2
fi
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
  echo "error: CAMEX_NPROC='$nproc' is invalid; allowed: an integer >= 1" >&2
  exit 2
fi
export CAMEX_OUTPUTS=${CAMEX_OUTPUTS:-./outputs}
mkdir -p "$CAMEX_OUTPUTS"  # before Docker would create it as root
report_dir=reports/$preset

if [[ $runner == local ]]; then
  outputs=$(cd "$CAMEX_OUTPUTS" && pwd)
  if ((protocol)); then  # resumable; the report lands in $outputs/reports/<preset>-protocol
    exec python -m camex.protocol "$preset" --output-root "$outputs" "$@"
  fi
  launch=(python run.py)
  ((nproc > 1)) && launch=(torchrun "--nproc_per_node=$nproc" run.py)
  "${launch[@]}" -m "experiment=$preset" "paths.output_root=$outputs" "$@"
  python -m camex.report --tracking-uri "sqlite:///$outputs/mlflow.db" --experiment "$preset" \
    --out "$outputs/$report_dir"
  echo "report: $outputs/$report_dir"
  exit 0
fi

command -v docker >/dev/null || { echo "error: docker is not installed; use CAMEX_RUNNER=local" >&2; exit 2; }
GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
CAMEX_UID=$(id -u)
CAMEX_GID=$(id -g)
export GIT_COMMIT CAMEX_UID CAMEX_GID
docker compose build
docker compose up -d --wait mlflow
if ((protocol)); then
  args=("$@")
  [[ " ${args[*]} " == *" -- "* ]] || args+=(--)
  docker compose run --rm --entrypoint python train -m camex.protocol "$preset" --output-root /app/outputs \
    "${args[@]}" tracking.uri=http://mlflow:5000
  echo "report: $CAMEX_OUTPUTS/reports/$preset-protocol   runs: http://127.0.0.1:${MLFLOW_PORT:-5000}"
  exit 0
fi
if ((nproc > 1)); then
  docker compose run --rm --entrypoint torchrun train "--nproc_per_node=$nproc" run.py \
    tracking.uri=http://mlflow:5000 -m "experiment=$preset" "$@"
else
  docker compose run --rm train -m "experiment=$preset" "$@"
fi
docker compose run --rm --entrypoint python train -m camex.report --tracking-uri http://mlflow:5000 \
  --experiment "$preset" --out "/app/outputs/$report_dir"
echo "report: $CAMEX_OUTPUTS/$report_dir   runs: http://127.0.0.1:${MLFLOW_PORT:-5000}"
