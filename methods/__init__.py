"""Continual-learning methods for open_clip models, in pure PyTorch.

`METHODS` maps each registry name to its class. Nothing here imports Ray, MLflow or streams, so
every method can be used in a plain PyTorch loop.
"""
from methods.base import ContinualMethod, HparamError, MethodHparams, TaskInfo
from methods.ctp import CTP
from methods.er import ER
from methods.ewc import EWC
from methods.icarl import ICaRL
from methods.inc_clip import IncCLIP
from methods.finetune import FineTune
from methods.lwf import LwF
from methods.lwf_vr import LwFVR
from methods.mas import MAS
from methods.modx import ModX
from methods.mulki import MulKI
from methods.wc import WeightConsolidation
from methods.we import WeightEnsemble
from methods.wise_ft import WiSEFT
from methods.zscl import ZSCL

METHODS: dict[str, type[ContinualMethod]] = {
    cls.name: cls
    for cls in [
        FineTune,
        LwF, LwFVR, WiSEFT, WeightEnsemble, WeightConsolidation, ZSCL, ModX,
        ER, EWC, MAS, ICaRL, CTP, IncCLIP, MulKI,
    ]
}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def get_method(name: str) -> type[ContinualMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"method.name: unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "ContinualMethod", "HparamError", "MethodHparams", "TaskInfo", "UnknownMethodError", "get_method"]
