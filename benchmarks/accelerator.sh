#!/usr/bin/env bash
# The headline rows of every benchmark suite on an accelerator, in under 8 minutes.
#
# Runs every suite of `python -m benchmarks.run` once, in one process, at its headline
# configuration (below), and writes each into its own section of the report,
# "<suite> (accelerator)", so the CPU sections of docs/benchmarks.md stay as they are. Each
# section records the command, the device kind and the software versions (harness.provenance),
# and how long the suite took. A suite that fails writes its error into its section and the
# others still run (--keep_going); the script then exits with status 1.
#
# Usage, from anywhere:
#   benchmarks/accelerator.sh [--tiny] [more benchmarks.run flags, e.g. --output=FILE]
#   benchmarks/accelerator.sh --merge FILE   # copy FILE's accelerator sections into the report
#
# On a lent device machine (it reaches no network, so it needs its own Python with jax[cuda]):
#   benchmarks/accelerator.sh --output="$OUT/benchmarks.md"
# and back here:
#   benchmarks/accelerator.sh --merge <fetched folder>/benchmarks.md
#
# --tiny shrinks every size, to check the script on a CPU: all six suites then take about 10
# minutes on 2 busy cores (load 6-9), nearly all of it compilation; tests/test_benchmarks.py
# runs it with --suite=optimizers. PYTHON chooses the interpreter (default: the repository's
# .venv if there is one, else python3).
#
# What "headline" means here, suite by suite (everything else keeps the suite's defaults):
#   optimizers  AdEMAMix on 16M parameters against optax and copy bandwidth; the SAM family.
#   implicit    the d = 2,000 ridge hypergradient against jaxopt; bilevel.solve at k = 5, 50, 500.
#   shampoo     block 128 only (the issue's targets), both models; the quality grid cut to two
#               learning rates, its plots written to a temporary folder (the section's image
#               links still name the CPU run's images in docs/_static).
#   meta        the three inner-step counts, all eight meta-gradients.
#   learned     the default network (16x1) and one smaller (8x1, for the update's split);
#               meta-training throughput on the devices present (8 needed for the sharded row).
#   bilevel     both conditionings, one data seed for the time-budget table (not 3), no
#               application rows (each one trains an example for tens of seconds).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
suffix=" (accelerator)"

if [[ "${1:-}" == "--merge" ]]; then
  [[ $# -ge 2 ]] || { echo "usage: $0 --merge FILE [--output=REPORT]" >&2; exit 2; }
  source_report="$2"
  shift 2
  exec "$PYTHON" -m benchmarks.run --merge_from="$source_report" --section_suffix="$suffix" "$@"
fi

tiny=false
if [[ "${1:-}" == "--tiny" ]]; then
  tiny=true
  shift
fi

plots="$(mktemp -d "${TMPDIR:-/tmp}/metaopt-accelerator-plots.XXXXXX")"
trap 'rm -rf "$plots"' EXIT

headline=(
  --repeats=30 --warmup=3 --compile_repeats=2 --min_repeat_seconds=0.02
  --shampoo_block_sizes=128 --shampoo_learning_rates=1e-3,1e-2
  --learned_networks=16x1,8x1
  --cleaning_seeds=0 --bilevel_applications=
)
tiny_sizes=(
  --repeats=1 --warmup=0 --compile_repeats=1 --min_repeat_seconds=0
  --ademamix_params=4096 --sam_width=8 --sam_inputs=8 --sam_batch=8
  --ridge_features=8 --ridge_samples=32 --ridge_validation_samples=16
  --bilevel_features=4 --bilevel_samples=16 --bilevel_steps=2
  --shampoo_speed_models=transformer --shampoo_block_sizes=8 --shampoo_d_model=8
  --shampoo_heads=2 --shampoo_seq_len=4 --shampoo_vocab=8 --shampoo_batch=2
  --shampoo_root_every=2 --soap_refresh_every=2 --shampoo_learning_rates=1e-2
  --shampoo_digits_hidden=4 --shampoo_digits_steps=2
  --shampoo_markov_vocab=4 --shampoo_markov_seq_len=4 --shampoo_markov_d_model=4
  --shampoo_markov_heads=1 --shampoo_markov_batch=2 --shampoo_markov_steps=2
  --shampoo_markov_eval_every=1
  --meta_inner_steps=1 --meta_tasks=2 --meta_shots=2 --meta_hidden=4
  --learned_speed_models=mlp --learned_mlp_inputs=4 --learned_mlp_width=8
  --learned_mlp_depth=1 --learned_mlp_batch=2 --learned_networks=4x1,2x1
  --learned_task_hidden=2 --learned_task_batch=2 --learned_num_tasks=8
  --learned_truncation_length=1 --learned_horizon=2
  --cleaning_methods=f2sa,implicit_cg --cleaning_l2=1e-2 --cleaning_num_train=20
  --cleaning_num_validation=10 --cleaning_inner_steps=2 --cleaning_time_budget=0.01
  --cleaning_seeds=0 --cleaning_max_outer_steps=2 --cleaning_eval_steps=2
  --cleaning_memory_steps=2 --bilevel_applications=
)
if $tiny; then sizes=("${tiny_sizes[@]}"); else sizes=("${headline[@]}"); fi

status=0
"$PYTHON" -m benchmarks.run --suite=all --keep_going --section_suffix="$suffix" \
  --shampoo_plot_dir="$plots" "${sizes[@]}" "$@" || status=$?
exit "$status"
