"""Lightning's WandbLogger, quiet: Lightning passes `anonymous=None` to wandb.init, and wandb (0.2x and
later) answers every run with "The anonymous setting has no effect". A save dir W&B cannot write is
named: wandb would put the run in the system's temporary directory and say so only in the terminal
chatter calibfuse silences."""

import logging
import os
import tempfile

from lightning.pytorch.loggers.wandb import WandbLogger as LightningWandbLogger

log = logging.getLogger(__name__)


class WandbLogger(LightningWandbLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
        save_dir = self._wandb_init.get("dir")
        if save_dir:
            try:  # what wandb.init tries before it falls back (wandb_init.try_create_root_dir)
                os.makedirs(save_dir, exist_ok=True)
                problem = None if os.access(save_dir, os.W_OK | os.R_OK) else "not writable"
            except OSError as error:
                problem = error.strerror or str(error)
            if problem:
                log.warning(
                    "W&B cannot write its run to %s (%s): wandb puts it in the temporary directory %s instead; "
                    "set logger.wandb.save_dir to a writable dir to keep it with the run",
                    save_dir,
                    problem,
                    tempfile.gettempdir(),
                )
