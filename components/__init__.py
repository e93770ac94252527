"""KFP components: one file per pipeline step, each a thin wrapper over ``bockd.pipeline.steps``.

The functions in these files are plain Python; :func:`make_components` turns them into lightweight KFP
components on a pinned image. Nothing is installed at run time (no ``packages_to_install``, no kfp
install): the trainer image carries bockd, kfp, MLflow and the KServe SDK.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfp import dsl

from bockd.components.cascade import cascade
from bockd.components.evaluate import evaluate
from bockd.components.measure import measure
from bockd.components.prepare_data import prepare_data
from bockd.components.quantize import quantize
from bockd.components.register import register
from bockd.components.report import report
from bockd.components.select import select
from bockd.components.train_baseline import train_baseline
from bockd.components.train_distributed import train_distributed
from bockd.components.train_ensemble import train_ensemble

__all__ = ["Components", "make_components"]


@dataclass(frozen=True)
class Components:
    prepare_data: dsl.base_component.BaseComponent
    train_ensemble: dsl.base_component.BaseComponent
    train_distributed: dsl.base_component.BaseComponent
    train_baseline: dsl.base_component.BaseComponent
    evaluate: dsl.base_component.BaseComponent
    quantize: dsl.base_component.BaseComponent
    measure: dsl.base_component.BaseComponent
    cascade: dsl.base_component.BaseComponent
    register: dsl.base_component.BaseComponent
    select: dsl.base_component.BaseComponent
    report: dsl.base_component.BaseComponent
    deploy: dsl.base_component.BaseComponent


def make_components(trainer_image: str) -> Components:
    """Every step as a KFP component on ``trainer_image`` (bockd with the pipeline and serving extras)."""
    from bockd.components.deploy import deploy

    def on(image: str, func: object) -> dsl.base_component.BaseComponent:
        return dsl.component(func, base_image=image, install_kfp_package=False)

    return Components(
        prepare_data=on(trainer_image, prepare_data),
        train_ensemble=on(trainer_image, train_ensemble),
        train_distributed=on(trainer_image, train_distributed),
        train_baseline=on(trainer_image, train_baseline),
        evaluate=on(trainer_image, evaluate),
        quantize=on(trainer_image, quantize),
        measure=on(trainer_image, measure),
        cascade=on(trainer_image, cascade),
        register=on(trainer_image, register),
        select=on(trainer_image, select),
        report=on(trainer_image, report),
        deploy=on(trainer_image, deploy),
    )
