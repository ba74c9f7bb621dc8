import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_sessionfinish(session, exitstatus):
    """Stop the TFF C++ workers the tests started, so no orphan keeps CI's pipes open."""
    from tff_programs import contexts

    contexts.shutdown()
