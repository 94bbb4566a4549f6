"""A W&B logger that never hangs: offline unless an API key is configured."""
from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger as _WandbLogger


def wandb_key_configured() -> bool:
    """An API key in ``WANDB_API_KEY`` or in ``~/.netrc`` (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.exists() and netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_offline() -> bool:
    """Offline unless an API key is configured and ``WANDB_MODE`` does not ask for offline."""
    mode = os.environ.get("WANDB_MODE", "")
    return mode in ("offline", "dryrun", "disabled") or not wandb_key_configured()


class WandbLogger(_WandbLogger):
    """Lightning's ``WandbLogger`` with ``offline`` decided for you, quiet, and started late.

    ``offline=None`` (default): online when an API key is configured and ``WANDB_MODE`` does not say
    otherwise, else offline (a local run folder under ``save_dir/wandb``; ``wandb sync`` uploads it
    later). Project, group and tags come from the config, e.g. group = the paper table, tags = the cell.

    W&B prints nothing (the CLI's summary names the run folder and URL), and the W&B run starts with
    the first thing logged, after the setup checks: a config or data error leaves no empty run.
    ``close`` writes the run's own exit status into its summary.
    """

    def __init__(
        self,
        project: str = "pcn-ep",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        save_dir: str = ".",
        offline: bool | None = None,
        **kwargs,
    ) -> None:
        if offline is None:
            offline = wandb_offline()
        if kwargs.get("settings") is None:  # jsonargparse passes wandb.init's defaults (None)
            import wandb

            kwargs["settings"] = wandb.Settings(silent=True)
        # Absolute: W&B's service process resolves a relative folder against its own working
        # directory, that of the first process that started it (children reuse it).
        save_dir = os.path.abspath(save_dir)
        super().__init__(project=project, name=name, group=group, tags=tags, save_dir=save_dir,
                         offline=offline, **kwargs)
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb: passing it only warns
        self.run_config: dict | None = None  # the whole resolved config (set by the CLI)
        self._begun = False

    @property
    def experiment(self):
        """The W&B run; ``None`` until something is logged (Lightning asks for it before the
        setup checks only to create it early)."""
        if self._experiment is None and not self._begun:
            return None
        Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        return super().experiment

    def log_metrics(self, metrics, step=None) -> None:
        self._begun = True
        super().log_metrics(metrics, step)

    def close(self, status: str) -> None:
        """Finish the W&B run with the command's own status in its summary (``run/status``: ok,
        diverged, failed, or stopped by a signal, to be resumed; the report reads it, since W&B's
        exit code is 0 even for a failed run)."""
        if self._experiment is None:
            return
        self._experiment.summary["run/status"] = status
        self._experiment.finish(exit_code=0 if status == "ok" else 1)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """The module's hyperparameters, plus the whole resolved run config under ``run`` (network,
        data, trainer): a W&B run then says what produced it, not only β and K."""
        self._begun = True
        if self.run_config is not None:
            params = {**dict(params), "run": self.run_config}
        super().log_hyperparams(params, *args, **kwargs)
