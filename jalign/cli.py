"""``jalign train|generate|convert|pipeline|plot`` (also ``python -m jalign``).

A mistake in what the user gave us (config, data, Hugging Face directory, tokenizer, chat template:
any :class:`jalign.errors.JalignError`, or a file that cannot be read) prints one line naming the file
(and line, key or tensor) and exits 2; a run stopped by non-finite losses exits 3. ``--debug``
anywhere on the command line, or ``JALIGN_DEBUG=1``, also prints the traceback.

XLA's persistent compilation cache is on (a process that compiles the same programs again, e.g. a
resumed run or the next pipeline stage, loads them from disk instead): ``$XDG_CACHE_HOME/jalign/xla``
(default ``~/.cache/jalign/xla``); ``JALIGN_COMPILATION_CACHE=DIR`` moves it,
``JALIGN_COMPILATION_CACHE=off`` or ``--no-compile-cache`` turns it off. A cache directory already
given to jax (``JAX_COMPILATION_CACHE_DIR``) is kept.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Optional

from jalign.errors import ConfigError

USAGE = """usage:
  jalign train CONFIG.yaml [key=value ...]     train with the algorithm named in the config
               [--dry-run [--device-memory GiB] [--no-knobs]]  only plan it on this machine's devices (no weights loaded)
  jalign plan CONFIG.yaml [key=value ...] --devices N [--device-memory GiB] [--host-memory GiB]
                                               per-device memory of every program of the run, compiled
                                               from shapes on N simulated CPU devices (exit 4: does not fit)
  jalign generate --model DIR --prompt TEXT    sample from a checkpoint / Hugging Face directory
  jalign convert --hf DIR --out CKPT           Hugging Face <-> jalign checkpoints
                 --from-checkpoint RUN[/checkpoints/N] --to-hf DIR
  jalign annotate --model RM --input IN --output OUT   SteerLM attributes from a regression reward model
  jalign pipeline [--out DIR] [--seed S] [--fast] the tiny SFT -> RM -> PPO / DPO / GRPO pipeline end to end
  jalign plot RUN_DIR                          plot metrics.jsonl curves to RUN_DIR/curves.png
  jalign config --list [SECTION]               every config key: type, default, meaning (docs/configuration.md)
  jalign config CONFIG.yaml [key=value ...]    print the resolved config (every default filled in)
options for every command:
  --debug               print the traceback of an error too (or JALIGN_DEBUG=1)
  --no-compile-cache    do not use the persistent compilation cache (or JALIGN_COMPILATION_CACHE=off)
"""
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
_OFF = ("off", "0", "false", "no", "none")
# OSErrors that mean "the path the user gave is wrong" (exit 2); others (disk full, I/O) exit 1
_INPUT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG}


# ---- compilation cache ----------------------------------------------------------------------------
def default_compilation_cache_dir(env=os.environ) -> str:
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jalign", "xla")


def _set_jax_option(name: str, value) -> None:
    """Before jax is imported, through its environment variable (read at import); after, directly."""
    if "jax" in sys.modules:
        sys.modules["jax"].config.update(name, value)
    else:
        os.environ[name.upper()] = str(value)


def _configured_jax_cache_dir(env) -> Optional[str]:
    """A cache directory jax was already given (its env variable, or set in this process)."""
    given = env.get("JAX_COMPILATION_CACHE_DIR")
    if not given and "jax" in sys.modules:
        given = sys.modules["jax"].config.jax_compilation_cache_dir
    return given or None


def setup_compilation_cache(enabled: bool = True, env=os.environ) -> Optional[str]:
    """Turn XLA's persistent compilation cache on (returns its directory) or off (returns None)."""
    explicit = env.get("JALIGN_COMPILATION_CACHE", "").strip()
    if not enabled or explicit.lower() in _OFF:
        _set_jax_option("jax_enable_compilation_cache", False)
        return None
    if not explicit:
        given = _configured_jax_cache_dir(env)
        if given:
            return given
    directory = os.path.expanduser(explicit) if explicit else default_compilation_cache_dir(env)
    _set_jax_option("jax_compilation_cache_dir", directory)
    return directory


# ---- errors ---------------------------------------------------------------------------------------
def _user_errors() -> dict[type, int]:
    """Exception classes that are the user's input, with their exit status (only modules already
    imported are consulted, so reporting an error never imports jax)."""
    from jalign.data.formats import DataError
    from jalign.errors import JalignError

    out = {JalignError: EXIT_BAD_INPUT, DataError: EXIT_BAD_INPUT}
    rules = sys.modules.get("sharding.rules")
    if rules is not None:
        out[rules.ShardingRuleError] = EXIT_BAD_INPUT  # names the mesh.rules key
    dist = sys.modules.get("jalign.distributed")
    if dist is not None:
        out[dist.DistributedError] = 1  # the cluster, not the input
    trainer = sys.modules.get("jalign.trainer")
    if trainer is not None:
        out[trainer.TrainingDiverged] = EXIT_DIVERGED
    return out


def describe_os_error(e: OSError) -> str:
    if e.filename is None:
        return str(e)
    names = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{names}: {e.strerror or e}"


def run_command(cmd: str, fn: Callable[[list[str]], int], argv: list[str], debug: bool = False) -> int:
    """``fn(argv)``; a user error becomes one line on stderr and its exit status."""
    try:
        return fn(argv)
    except KeyboardInterrupt:
        print(f"jalign {cmd}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        error = e
        status, message = (EXIT_BAD_INPUT if e.errno in _INPUT_ERRNOS or e.errno is None else 1), describe_os_error(e)
    except Exception as e:
        error = e
        status = next((getattr(e, "exit_code", code) for cls, code in _user_errors().items() if isinstance(e, cls)),
                      None)
        if status is None:
            raise  # a bug, not the input: keep the traceback
        message = str(e)
    if debug:
        traceback.print_exception(error)
    print(f"jalign {cmd}: error: {message}", file=sys.stderr)
    return status


# ---- commands -------------------------------------------------------------------------------------
def _train(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    from jalign.config import load_config

    dry_run, knobs = "--dry-run" in argv, "--no-knobs" not in argv
    argv, memory = _take_option([a for a in argv if a not in ("--dry-run", "--no-knobs")], "--device-memory")
    if (memory is not None or not knobs) and not dry_run:
        raise ConfigError("--device-memory and --no-knobs are options of --dry-run")
    cfg = load_config(argv[0], argv[1:])  # before jax is imported: a bad config fails in a moment
    if dry_run:
        from jalign.plan import dry_run as plan_dry_run

        return plan_dry_run(cfg, argv[1:], _gib(memory, "--device-memory"), knobs=knobs)
    from jalign.trainer import train

    train(cfg)
    return 0


def _take_option(argv: list[str], name: str) -> tuple[list[str], Optional[str]]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``, and VALUE (None when absent)."""
    out, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == name:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name}: missing value")
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out, value


def _gib(value: Optional[str], name: str) -> Optional[float]:
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise ConfigError(f"{name} {value}: expected a positive number of GiB")
    return v


def simulated_devices_env(n: int, env=os.environ) -> dict:
    """The environment for ``n`` simulated CPU devices (set before jax is imported). The backend optimisation
    flags only trade the CPU kernels' speed for compile time; buffer assignment (what a plan reads) is the same."""
    import re

    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    flags += [f"--xla_force_host_platform_device_count={n}", "--xla_backend_optimization_level=0",
              "--xla_llvm_disable_expensive_passes=true"]
    return dict(env, XLA_FLAGS=" ".join(dict.fromkeys(flags)), JAX_PLATFORMS="cpu")


def _plan(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        from jalign.plan import _parser

        _parser().print_help()
        return 0 if argv else 2
    _, devices = _take_option(argv, "--devices")
    if devices is None:
        raise ConfigError("jalign plan: give --devices N (the number of devices the run will use)")
    try:
        n = int(devices)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--devices {devices}: expected a positive integer")
    if "jax" not in sys.modules:
        os.environ.update(simulated_devices_env(n))
    else:  # jax already runs here (e.g. an embedding program): plan in a fresh process with n devices
        import jax

        if jax.device_count() != n or jax.default_backend() != "cpu":
            import subprocess

            return subprocess.run([sys.executable, "-m", "jalign", "plan", *argv], env=simulated_devices_env(n)).returncode
    from jalign.plan import plan_main

    return plan_main(argv)


def _generate(argv):
    from jalign.generate import generate_main

    return generate_main(argv)


def _convert(argv):
    from jalign.models.hf_io import convert_main

    return convert_main(argv)


def _annotate(argv):
    from jalign.annotate import annotate_main

    return annotate_main(argv)


def _pipeline(argv):
    from jalign.pipeline import pipeline_main

    return pipeline_main(argv)


def _plot(argv):
    from jalign.plot import plot_main

    return plot_main(argv)


def _config(argv):
    from jalign.config import ConfigError

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("--list", "--markdown"):
        from jalign import docs_gen

        if argv[0] == "--markdown":
            sys.stdout.write(docs_gen.markdown())
            return 0
        section = argv[1] if len(argv) > 1 else None
        text = docs_gen.listing(section)
        if not text:
            raise ConfigError(f"jalign config --list {section}: no such section (sections: "
                              f"{', '.join(docs_gen.section_names())}, or a key prefix such as train.wandb)")
        print(text)
        return 0
    import yaml

    from jalign.config import load_config, to_dict

    data = to_dict(load_config(argv[0], argv[1:]))
    data.pop("source", None)
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    return 0


COMMANDS = {"train": _train, "plan": _plan, "generate": _generate, "convert": _convert, "annotate": _annotate,
            "pipeline": _pipeline, "plot": _plot, "config": _config}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("JALIGN_DEBUG", "").strip().lower() not in ("", *_OFF)
    cache = "--no-compile-cache" not in argv
    argv = [a for a in argv if a not in ("--debug", "--no-compile-cache")]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        return 2
    if cmd not in ("plot", "config"):
        setup_compilation_cache(cache)
    return run_command(cmd, COMMANDS[cmd], rest, debug)


if __name__ == "__main__":
    sys.exit(main())
