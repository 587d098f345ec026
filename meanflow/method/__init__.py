"""The MeanFlow distillation method (DESIGN §2), independent of any network.

- :mod:`.time_sampling`: logit-normal (r, t) with a share of r = t rows.
- :mod:`.guidance`: the guided teacher velocity (embedded guidance, true CFG, ω/κ mixing).
- :mod:`.targets`: flow matching, the differential (JVP) target, the discrete targets
  (``teacher_solver``, ``alphaflow``, ``split``).
- :mod:`.schedule`: the warm-up schedule (phases A, B, C).
- :mod:`.sampler`: the few-step sampler and its time grids (uniform, FLUX shift).
- :mod:`.oracle`: closed-form v and u for Gaussian data, for tests and studies.

Losses (the adaptive weighted loss, alignment) live in ``meanflow.ops`` / ``meanflow.method.alignment``.
"""
from .guidance import GuidanceConfig, GuidedTeacher, cfg_combine, mix_with_student, sample_scales
from .oracle import GaussianOracle
from .sampler import SamplerConfig, flux_mu, sample, shift_times, time_grid
from .schedule import Objective, ScheduleConfig, WarmupSchedule
from .targets import (DiscreteTargetConfig, alphaflow_target, differential_target, discrete_target,
                      flow_matching_target, split_target, tangent_along_v, tangent_along_v_pair,
                      teacher_flow, teacher_solver_target)
from .time_sampling import TimeSamplerConfig, logit_normal, sample_times

__all__ = [
    "GuidanceConfig", "GuidedTeacher", "cfg_combine", "mix_with_student", "sample_scales",
    "GaussianOracle",
    "SamplerConfig", "flux_mu", "sample", "shift_times", "time_grid",
    "Objective", "ScheduleConfig", "WarmupSchedule",
    "DiscreteTargetConfig", "alphaflow_target", "differential_target", "discrete_target",
    "flow_matching_target", "split_target", "tangent_along_v", "tangent_along_v_pair", "teacher_flow",
    "teacher_solver_target",
    "TimeSamplerConfig", "logit_normal", "sample_times",
]
