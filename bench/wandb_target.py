"""Where a run's W&B mirror goes: mode, project and entity, which always travel together, and
the command-line flags that set them (`bench run`, its workers, the perf gate)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from bench.wandb_sink import MODES, WandbSink


@dataclass(frozen=True)
class WandbTarget:
    mode: str = "auto"           # auto (online with credentials, else offline), online, offline or disabled
    project: str = "ganbench"
    entity: str | None = None    # team or user; None: the account's default

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WandbTarget:
        """The target the flags of `add_wandb_arguments` name."""
        return cls(args.wandb, args.wandb_project, args.wandb_entity)

    def cli_args(self) -> list[str]:
        """The same flags again, for a process this one launches."""
        return ["--wandb", self.mode, "--wandb-project", self.project,
                *(["--wandb-entity", self.entity] if self.entity else [])]

    def sink(self, dir: str | os.PathLike, enabled: bool = True) -> WandbSink:
        """A sink writing W&B's local files under `dir`; `enabled` False: one that does nothing."""
        return WandbSink(mode=self.mode if enabled else "disabled", project=self.project, entity=self.entity,
                         dir=dir)


def add_wandb_arguments(parser: argparse.ArgumentParser, default_mode: str, mode_help: str,
                        project_help: str = "W&B project (default ganbench)") -> None:
    """`--wandb MODE`, `--wandb-project`, `--wandb-entity` (read back with `WandbTarget.from_args`)."""
    parser.add_argument("--wandb", choices=MODES, default=default_mode, help=mode_help)
    parser.add_argument("--wandb-project", default="ganbench", help=project_help)
    parser.add_argument("--wandb-entity", default=None, help="W&B entity (team or user); default: the account's")
