"""The `adarun` command: job commands from `jobs.cli`, model commands from `adaspec_worker.commands`.

Model commands (train-draft, fit-ldlp, bench) import torch only when they run, so `adarun submit`,
`status` and `report` start fast and the controller never loads torch.
"""
from __future__ import annotations

import sys

import click

from jobs.cli import register as register_jobs


class LazyGroup(click.Group):
    """Subcommands whose module is imported only when that subcommand is invoked."""

    lazy = {
        "train-draft": ("adaspec_worker.commands", "train_draft"),
        "fit-ldlp": ("adaspec_worker.commands", "fit_ldlp"),
        "bench": ("adaspec_worker.commands", "bench"),
    }

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.available()))

    def available(self):
        import importlib.util

        return [n for n, (mod, _) in self.lazy.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx, name):
        if name in self.lazy and name in self.available():
            import importlib

            mod, attr = self.lazy[name]
            cmd = getattr(importlib.import_module(mod), attr, None)
            if cmd is not None:
                return cmd
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "ADARUN"})
@click.version_option(package_name="adarun")
def cli():
    """adarun: batch generation over Parquet prompts with adaptive speculative decoding on Ray.

    \b
    Example:
      adarun submit manifests/job.yaml
      adarun status out/job
    """


register_jobs(cli)


def main():
    sys.exit(cli.main(standalone_mode=True))
