"""What the benchmarks share: the model shapes, the clock, the child-process protocol and the result files.

- `SHAPES`: every model shape a benchmark builds, by one unambiguous name, and `model_config` to build it.
- `Clock` / `median_lap`: wall and (optionally) process CPU seconds per lap, and their median over repeats;
  `training_timer`: the same clock as a TrainerCallback, one lap per optimizer step or per epoch.
- `start_child` / `run_child`: run `python -m benchmarks.<module> ... --result_file PATH` in its own process (its own
  peak RSS, its own address-space limit, another virtual environment); the child writes its result there as JSON
  (`write_json`) and the parent reads it, or gets `ChildFailed` with the tail of the child's output.
- `RESULTS_DIR`, `write_json`: where a benchmark's JSON results go by default.
- `trl_baseline_python`: the virtual environment with TRL 1.12.0, the last TRL with a PPOTrainer, the baseline of
  the PPO comparisons.

Imports only the standard library at the top: the GPU check imports it on a machine without TRL or datasets, and
the child processes of the TRL 1.12 environment import it too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

# -- model shapes --------------------------------------------------------------------------------------------------

# LlamaConfig arguments that fix the parameter count; each name ends in that count (where it has one). The benchmarks
# add what does not change it (pad/bos/eos ids, positions, norm epsilon) in `model_config(name, **settings)`.
SHAPES = {
    # meta-llama/Llama-3.2-1B: 1.236B parameters, 263M of them in the tied 128256 x 2048 embedding
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    # HuggingFaceTB/SmolLM2-1.7B: 1.711B parameters
    "smollm2-1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True),
    # HuggingFaceTB/SmolLM2-135M: 134.5M parameters
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    # SmolLM2's vocabulary, narrower and deeper than SmolLM2-135M: 69.2M parameters
    "smollm2-narrow-70m": dict(hidden_size=384, num_hidden_layers=32, num_attention_heads=6, num_key_value_heads=2,
                               intermediate_size=1024, vocab_size=49152, tie_word_embeddings=True),
    # SmolLM2-135M's width with the 101-token character vocabulary of rlhf_ext.testing (untied), the layers chosen
    # for the parameter count: 134.6M and 70.9M
    "char-135m": dict(hidden_size=576, num_hidden_layers=38, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=101, tie_word_embeddings=False),
    "char-70m": dict(hidden_size=576, num_hidden_layers=20, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=101, tie_word_embeddings=False),
    # smoke tests: seconds per configuration (0.19M parameters)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1024, tie_word_embeddings=True),
}  # fmt: skip


def model_config(shape: str, **settings):
    """A LlamaConfig of `SHAPES[shape]`, with `settings` for what the shape leaves open (token ids, positions)."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], **settings)


# -- the clock -----------------------------------------------------------------------------------------------------


class Lap(NamedTuple):
    """Seconds between two readings of a `Clock`: wall time, and this process's CPU time (None if not read)."""

    wall_s: float
    cpu_s: float | None


class Clock:
    """Seconds since the last lap (or since it was made): wall time and, with `cpu`, this process's CPU time over all
    its threads, which stays steady when other jobs share the CPU. `sync` runs before every reading (e.g.
    torch.cuda.synchronize), so work a device still has queued counts in the lap it was issued in."""

    def __init__(self, cpu: bool = True, sync: Callable[[], None] | None = None):
        self.cpu, self.sync = cpu, sync
        self._wall, self._cpu = self._read()

    def _read(self) -> tuple[float, float | None]:
        if self.sync is not None:
            self.sync()
        return time.perf_counter(), time.process_time() if self.cpu else None

    def lap(self) -> Lap:
        wall, cpu = self._read()
        lap = Lap(wall - self._wall, None if cpu is None else cpu - self._cpu)
        self._wall, self._cpu = wall, cpu
        return lap


def median_lap(laps: Iterable[Lap]) -> Lap:
    """The median wall time and the median CPU time of `laps` (CPU None unless every lap read it)."""
    laps = list(laps)
    cpu = [lap.cpu_s for lap in laps]
    return Lap(statistics.median(lap.wall_s for lap in laps), None if None in cpu else statistics.median(cpu))


def training_timer(unit: str = "step", every: int = 1):
    """A TrainerCallback whose `laps` are the `Clock` laps of training: with unit "step", from the start of training
    to every `every`-th optimizer step's end and from there to the next (a PPO update of several optimizer steps is
    one lap); with unit "epoch", from each epoch's start to its end."""
    from transformers import TrainerCallback

    if unit not in ("step", "epoch"):
        raise ValueError(f"unit must be 'step' or 'epoch', not {unit!r}")

    class TrainingTimer(TrainerCallback):
        def __init__(self):
            self.laps: list[Lap] = []
            self.clock: Clock | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.clock = Clock()

        def on_epoch_begin(self, args, state, control, **kwargs):
            if unit == "epoch":
                self.clock = Clock()

        def on_epoch_end(self, args, state, control, **kwargs):
            if unit == "epoch":
                self.laps.append(self.clock.lap())

        def on_step_end(self, args, state, control, **kwargs):
            if unit == "step" and state.global_step % every == 0:
                self.laps.append(self.clock.lap())

    return TrainingTimer()


# -- memory readings -----------------------------------------------------------------------------------------------


def peak_rss_gib() -> float:
    """This process's peak resident set so far (ru_maxrss, which Linux gives in KiB), GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def proc_status_gib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM, VmPeak, ...) in GiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        return None
    return None


# -- result files --------------------------------------------------------------------------------------------------


def write_json(path: Path, payload, indent: int = 2) -> Path:
    """Write `payload` as JSON (and a final newline) to `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent) + "\n")
    return path


# -- child processes -----------------------------------------------------------------------------------------------

OUTPUT_TAIL_CHARS = 4000  # of a failed child's output, in the error: its traceback and the lines before it


def add_result_file_argument(parser: argparse.ArgumentParser) -> None:
    """The hidden `--result_file` a parent passes to a child run: where the child writes its result."""
    parser.add_argument("--result_file", type=Path, help=argparse.SUPPRESS)


class ChildFailed(RuntimeError):
    """A child run that exited with an error or wrote no result; `output` is all it printed, `returncode` its exit."""

    def __init__(self, what: str, returncode: int, output: str, log_file: Path):
        self.returncode, self.output = returncode, output
        how = "exited 0 but wrote no result" if returncode == 0 else f"failed with exit code {returncode}"
        super().__init__(f"{what} {how}; the end of its output ({log_file}):\n{output[-OUTPUT_TAIL_CHARS:]}")


@dataclass
class ChildRun:
    """A benchmark module running in its own process; `wait` gives its result."""

    what: str  # the module and its arguments, for the error
    process: subprocess.Popen
    result_file: Path
    log_file: Path
    log: IO[str]

    def wait(self) -> dict:
        """The child's result (the JSON it wrote to `result_file`); `ChildFailed` if it exited with an error or wrote
        none."""
        returncode = self.process.wait()
        self.log.close()
        if returncode == 0 and self.result_file.is_file():
            return json.loads(self.result_file.read_text())
        raise ChildFailed(self.what, returncode, self.log_file.read_text(errors="replace"), self.log_file)


def start_child(module: str, args: list[str], result_file: Path, *, log_file: Path | None = None,
                python: str | Path = sys.executable, env: dict[str, str] | None = None,
                preexec_fn: Callable[[], None] | None = None) -> ChildRun:  # fmt: skip
    """Start `python -m <module> <args> --result_file <result_file>` (e.g. module "benchmarks.real_size").

    Its stdout and stderr go to `log_file` (default: `result_file` with the suffix .log). The repository root leads
    its PYTHONPATH, so the module and rlhf_ext import from this checkout whichever `python` runs it (the TRL 1.12
    environment's, say) and wherever it was started; `env` adds to (or replaces) this process's variables."""
    result_file = Path(result_file)
    log_file = Path(log_file) if log_file else result_file.with_suffix(".log")
    result_file.unlink(missing_ok=True)  # a result left by an earlier run must not pass for this one's
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), child_env.get("PYTHONPATH")) if p)
    command = [str(python), "-m", module, *args, "--result_file", str(result_file)]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "w")  # noqa: SIM115 (closed by ChildRun.wait)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=child_env,
                               preexec_fn=preexec_fn)  # fmt: skip
    return ChildRun(" ".join([module, *args]), process, result_file, log_file, log)


def run_child(module: str, args: list[str], result_file: Path, **kwargs) -> dict:
    """`start_child(...)` and wait for its result."""
    return start_child(module, args, result_file, **kwargs).wait()


# -- the TRL 1.12 baseline -----------------------------------------------------------------------------------------

TRL_BASELINE_VERSION = "1.12.0"
DEFAULT_TRL_VENV = Path(tempfile.gettempdir()) / f"rlhf_ext-bench-trl-{TRL_BASELINE_VERSION}"


def trl_baseline_python(venv: Path = DEFAULT_TRL_VENV) -> Path:
    """The python of a virtual environment with trl==1.12.0 over this environment's packages (created if missing)."""
    python = venv / "bin" / "python"
    if python.exists() and installed_trl_version(python) == TRL_BASELINE_VERSION:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The venv sees this environment's site-packages (torch, transformers, ...) through a .pth file; its own
    # site-packages come first on sys.path, so its trl 1.12.0 shadows the newer one.
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    venv_site = Path(subprocess.check_output([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                             text=True).strip())  # fmt: skip
    (venv_site / "parent_env.pth").write_text("\n".join(site_packages) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", f"trl=={TRL_BASELINE_VERSION}"],
                   check=True)  # fmt: skip
    if installed_trl_version(python) != TRL_BASELINE_VERSION:
        raise RuntimeError(f"{venv} does not import trl {TRL_BASELINE_VERSION}")
    return python


def installed_trl_version(python: Path) -> str | None:
    """The version of trl that `python` imports, or None if it imports none."""
    result = subprocess.run([str(python), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None
