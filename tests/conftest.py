import os

from hypothesis import HealthCheck, settings

# Bounded example counts keep the suite within CI's budget on two cores; ATTNRS_HYPOTHESIS_PROFILE=thorough
# runs many more locally.
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),  # reproducible in CI, exploring locally
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("ATTNRS_HYPOTHESIS_PROFILE", "ci"))
