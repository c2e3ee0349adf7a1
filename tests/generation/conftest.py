from tests.objectives.conftest import one_thread  # noqa: F401  (the fixture, shared)
