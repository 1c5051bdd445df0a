"""Runs benchmark suites and writes their tables into docs/benchmarks.md.

Usage, from the repository root::

    python -m benchmarks.run --suite=optimizers
    python -m benchmarks.run --suite=implicit
    python -m benchmarks.run --suite=shampoo         # Shampoo and SOAP against Adam
    python -m benchmarks.run --suite=meta            # MAML / iMAML against jaxopt, optimistix
    python -m benchmarks.run --suite=learned         # learned optimizer against Adam, PES cost
    python -m benchmarks.run --suite=bilevel         # hypercleaning methods, applications
    python -m benchmarks.run --suite=all            # every suite, one after the other
    python -m benchmarks.run --suite=optimizers --ademamix_params=1000000 --sam_width=128
    python -m benchmarks.run --distributed --shard   # on every host of a multi-host slice
    benchmarks/accelerator.sh                        # headline rows of every suite on a GPU/TPU

Each suite replaces only its own section of the report (between
``<!-- BEGIN GENERATED: <suite> -->`` and ``<!-- END GENERATED: <suite> -->``), together with the
command, date and machine of the run. Only process 0 writes. The same code runs on CPU, GPU and
TPU; ``--shard`` lays the arrays out over all devices instead of using one. ``--section_suffix``
names the sections ``<suite><suffix>`` instead (``benchmarks/accelerator.sh`` writes
``<suite> (accelerator)``, so the CPU sections stay as they are), and ``--keep_going`` reports a
failing suite in its section and runs the next one.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
from absl import app, flags

from benchmarks import bilevel, harness, implicit, learned, meta, optimizers, shampoo

SUITES: dict[str, Callable[[harness.Settings], str]] = {
    "optimizers": optimizers.run_suite,
    "implicit": implicit.run_suite,
    "shampoo": shampoo.run_suite,
    "meta": meta.run_suite,
    "learned": learned.run_suite,
    "bilevel": bilevel.run_suite,
}
ALL = "all"

_SUITE = flags.DEFINE_list(
    "suite", ["optimizers"], f"Suites to run, from {sorted(SUITES)}, or {ALL!r} for every one."
)
_OUTPUT = flags.DEFINE_string(
    "output", str(harness.REPORT_PATH), "Markdown report to update (created if missing)."
)
_REPEATS = flags.DEFINE_integer(
    "repeats", 100, "Timed repeats per variant, interleaved across variants.", lower_bound=1
)
_WARMUP = flags.DEFINE_integer(
    "warmup", 3, "Untimed steps per variant after compilation.", lower_bound=0
)
_COMPILE_REPEATS = flags.DEFINE_integer(
    "compile_repeats", 5, "Compilations per variant for the compile time.", lower_bound=1
)
_MIN_REPEAT_SECONDS = flags.DEFINE_float(
    "min_repeat_seconds",
    0.05,
    "Each repeat runs consecutive steps for at least this long (and at least one step).",
    lower_bound=0.0,
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs)."
)
_SHARD = flags.DEFINE_bool(
    "shard",
    False,
    "Lay arrays out over a mesh of all devices (parameters and state split along their leading "
    "axis for AdEMAMix, the batch for SAM) instead of running on one device.",
)
_SECTION_SUFFIX = flags.DEFINE_string(
    "section_suffix",
    "",
    "Appended to each suite's name in the report: its section is <suite><suffix> (for example "
    "' (accelerator)'), so runs on another machine do not replace the default sections.",
)
_KEEP_GOING = flags.DEFINE_bool(
    "keep_going",
    False,
    "When a suite raises, write the error into its section, run the remaining suites, and exit "
    "with status 1 at the end (default: stop at the first error).",
)
_MERGE_FROM = flags.DEFINE_string(
    "merge_from",
    None,
    "Copy the sections of this report whose names end with --section_suffix into --output "
    "(replacing sections of the same name, keeping all others) and exit without running a suite: "
    "brings the report written on another machine into docs/benchmarks.md.",
)

flags.register_validator(
    "suite",
    lambda names: bool(names) and all(name in SUITES or name == ALL for name in names),
    message=f"--suite takes a comma-separated list of names from {sorted(SUITES)}, or {ALL!r}.",
)


def main(argv: Sequence[str]) -> None:
    """Runs the selected suites and, on process 0, writes their sections of the report."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}; all options are flags.")
    if _MERGE_FROM.value is not None:
        _merge_sections(Path(_MERGE_FROM.value), Path(_OUTPUT.value), _SECTION_SUFFIX.value)
        return
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    settings = harness.Settings(
        repeats=_REPEATS.value,
        warmup=_WARMUP.value,
        compile_repeats=_COMPILE_REPEATS.value,
        min_repeat_seconds=_MIN_REPEAT_SECONDS.value,
        mesh=harness.device_mesh() if _SHARD.value else None,
    )
    command = harness.command_line(sys.argv[1:])
    machine = harness.machine_description()
    suites = list(SUITES) if ALL in _SUITE.value else list(dict.fromkeys(_SUITE.value))
    failed = []
    for suite in suites:
        name = suite + _SECTION_SUFFIX.value
        start = time.perf_counter()
        try:
            body = SUITES[suite](settings)
        except Exception:
            if not _KEEP_GOING.value:
                raise
            failed.append(suite)
            error = traceback.format_exc()
            harness.log(error)
            body = f"**This suite failed**; the error:\n\n```\n{error.strip()}\n```\n"
        seconds = time.perf_counter() - start
        harness.log(f"{name}: {seconds:.0f} s")
        body = (
            body.rstrip("\n")
            + f"\n\nThis suite ran in {seconds:.0f} s, set-up and compilation included.\n"
        )
        if jax.process_index() == 0:
            section = f"## {name}\n\n" + harness.provenance(command, machine) + "\n" + body
            harness.write_section(Path(_OUTPUT.value), name, section)
            print(section, flush=True)
    harness.log(f"wrote {_OUTPUT.value}")
    if failed:
        harness.log(f"failed suites: {', '.join(failed)}")
        sys.exit(1)


def _merge_sections(source: Path, destination: Path, suffix: str) -> None:
    """Copies the sections of ``source`` named ``<suite><suffix>`` into ``destination``."""
    if not suffix:
        raise app.UsageError(
            "--merge_from needs --section_suffix (for example ' (accelerator)'): without it the "
            "copied sections would replace this machine's own ones."
        )
    sections = {
        name: body
        for name, body in harness.read_sections(source).items()
        if name.endswith(suffix) and name[: -len(suffix)] in SUITES
    }
    if not sections:
        raise app.UsageError(f"--merge_from={source}: no section named <suite>{suffix} in it.")
    for name, body in sections.items():
        harness.write_section(destination, name, body)
    harness.log(f"copied {', '.join(sections)} from {source} into {destination}")


if __name__ == "__main__":
    app.run(main)
