"""Lightning's WandbLogger, quiet: Lightning passes `anonymous=None` to wandb.init, and wandb (0.2x and
later) answers every run with "The anonymous setting has no effect". Nothing else changes."""

from lightning.pytorch.loggers.wandb import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
