"""What a replica computes is the inference core's (:mod:`automl_tl.inference.core`): which members answer
(:func:`plan_for` with the app's ``mode``), how pixels become their inputs (:class:`Preprocessor`), how they
forward (:class:`MemberRunner`) and how their outputs become one calibrated answer (:meth:`Plan.calibrate`),
exactly as the Predictor and export compute it. The names are kept here for the app and its tests.
"""

from __future__ import annotations

from automl_tl.inference.core import BatchResult, MemberRunner, Plan, Preprocessor, best_member_index, plan_for

ServingPlan = Plan

__all__ = ["BatchResult", "MemberRunner", "Plan", "Preprocessor", "ServingPlan", "best_member_index", "plan_for"]
