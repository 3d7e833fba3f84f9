"""Multi-host runs through ``jax.distributed`` (the runtime of TPU pods and GPU clusters).

Every process calls :func:`initialize` before touching a device; afterwards ``jax.devices()``
lists the devices of all processes, ``pipelines.sharding.make_mesh`` builds the global mesh,
``pipelines.data.loader`` gives each process its rows of every batch and Orbax writes one
checkpoint from all processes. On CPU the processes exchange data through gloo, which is how the
tests run two processes on one machine:

    python -m pipelines.distributed --coordinator 127.0.0.1:PORT --num-processes 2 \\
        --process-id 0 [--local-devices 2] -- train CONFIG.yaml train.steps=4

runs ``memzoo train`` as process 0 (start the same with ``--process-id 1``).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_devices: int | None = None,
  cpu_collectives: str = "gloo",
  timeout_s: int = 120,
  collective_timeout_s: int | None = 900,
) -> None:
  """Joins the process group; with no arguments the cluster is auto-detected (TPU, SLURM).

  Args:
    coordinator: ``host:port`` of process 0.
    num_processes: processes in the job.
    process_id: this process's rank in ``[0, num_processes)``.
    local_devices: fake CPU devices for this process (sets ``XLA_FLAGS``; only before JAX has
      created its backends, i.e. for local testing).
    cpu_collectives: CPU cross-process collectives, ``gloo`` (or ``mpi``).
    timeout_s: how long to wait for the other processes.
    collective_timeout_s: how long a CPU collective waits for its peers. XLA's default is short
      enough that a process still compiling on a loaded machine makes the other one fail.
  """
  flags = os.environ.get("XLA_FLAGS", "").split()
  if local_devices is not None:
    flags = [f for f in flags if "force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={local_devices}")
  if collective_timeout_s is not None and not any("collective_timeout" in f for f in flags):
    flags.append(f"--xla_cpu_collective_timeout_seconds={collective_timeout_s}")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  # Without a collectives implementation CPU processes cannot all-reduce with each other.
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(
    coordinator_address=coordinator,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=timeout_s,
  )


def shutdown() -> None:
  jax.distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m pipelines.distributed", description=__doc__)
  p.add_argument("--coordinator", required=True, help="host:port of process 0")
  p.add_argument("--num-processes", type=int, required=True)
  p.add_argument("--process-id", type=int, required=True)
  p.add_argument("--local-devices", type=int, default=None)
  p.add_argument("--timeout", type=int, default=120)
  p.add_argument("command", nargs=argparse.REMAINDER, help="-- memzoo subcommand and arguments")
  args = p.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  initialize(
    args.coordinator,
    args.num_processes,
    args.process_id,
    local_devices=args.local_devices,
    timeout_s=args.timeout,
  )
  from pipelines import cli

  try:
    return cli.main(command)
  finally:
    shutdown()


if __name__ == "__main__":
  sys.exit(main())
