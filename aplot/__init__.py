"""aplot: APLOT reward modeling (Bradley-Terry with an optimal-transport adaptive margin) on TRL."""

from aplot.objective import LOSS_TYPES, ot_margin, point_margin, preference_loss

__version__ = "0.1.0"
__all__ = ["LOSS_TYPES", "ot_margin", "point_margin", "preference_loss", "APLOTConfig", "APLOTRewardTrainer"]


def __getattr__(name):
    # The trainer pulls in TRL and transformers (seconds to import); load it only when asked for.
    if name in ("APLOTConfig", "APLOTRewardTrainer"):
        from aplot import config, trainer

        return getattr(config, name, None) or getattr(trainer, name)
    raise AttributeError(f"module 'aplot' has no attribute {name!r}")
