r"""Run directories after training: reopening one of any kind (:mod:`.reopen`: ``load_run``,
``evaluate``) and comparing estimators across runs (:mod:`.compare`; M2's estimators and label
guides: :mod:`.compare_m2`)."""

from .reopen import Run, evaluate, load_run

__all__ = ["Run", "evaluate", "load_run"]
