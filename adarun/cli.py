"""The `adarun` command: job commands from `jobs.cli`, model commands from `adaspec_worker.commands`.

Both modules are torch-free at import; model commands load torch only when they run.
"""
from __future__ import annotations

import sys

import click

from adaspec_worker.commands import COMMANDS as MODEL_COMMANDS
from jobs.cli import register as register_jobs


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "ADARUN"})
@click.version_option(package_name="adarun")
def cli():
    """adarun: batch generation over Parquet prompts with adaptive speculative decoding on Ray.

    \b
    Example:
      adarun submit manifests/job.yaml
      adarun status out/job
    """


register_jobs(cli)
for _cmd in MODEL_COMMANDS:
    cli.add_command(_cmd)


def main():
    sys.exit(cli.main(standalone_mode=True))
